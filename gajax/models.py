"""Flax (Linen) models of the meta-learning literature, used through pure ``model.apply(params, x)``."""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from gajax.fast_ops import conv_as_patches, max_pool_as_reshape

CONV_IMPLS = ("auto", "matmul", "xla")
INITS = ("flax", "torch", "maml", "imaml")
HEAD_INPUTS = ("flatten", "mean")  # Conv4.head_input


def layer_init(init: str, fan_in: int, *, head: bool = False, conv: bool = False):
  r"""``(kernel_init, bias_init)`` of one layer under the initialisation scheme ``init``.

  ``fan_in`` is the layer's input size (``kh * kw * C_in`` for a convolution); ``conv`` marks a
  convolution and ``head`` the output layer of a convolutional model (only ``"maml"`` treats them
  differently). The schemes:

  - ``"flax"``: Flax's defaults, kernels LeCun normal (truncated, variance ``1 / fan_in``), biases 0.
  - ``"torch"``: PyTorch's defaults for ``nn.Linear`` / ``nn.Conv2d`` (what learn2learn's and
    torchmeta's examples train with): kernels and biases ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, so the
    kernel variance is ``1 / (3 fan_in)``, a third of Flax's.
  - ``"maml"``: Finn et al.'s (2017) reference code: for the fully connected sinusoid regressor,
    truncated normal with standard deviation 0.01 (cut at 2 standard deviations) and zero biases; for
    the convolutional model, Xavier/Glorot uniform convolutions with zero biases and a standard
    normal (std 1) output layer with zero bias.
  - ``"imaml"``: Rajeswaran et al.'s (2019) released Omniglot code: every kernel (convolutions and
    output layer) Xavier/Glorot uniform with gain 1.73, i.e. ``U(-b, b)`` with
    ``b = 1.73 sqrt(6 / (fan_in + fan_out))``, and biases ``U(0, 0.05)``.

  Why it matters: the inner loop's step ``alpha`` is stable only while the support loss's largest
  curvature stays below ``2 / alpha``. On the sinusoid MLP (``alpha = 0.01``) Flax's init puts most
  tasks above that limit at the start of training, PyTorch's puts none (README, "Initialisation").
  """
  if init not in INITS:
    raise ValueError(f"init must be one of {', '.join(INITS)}; got {init!r}.")
  if init == "flax":
    return nn.initializers.lecun_normal(), nn.initializers.zeros
  if init == "torch":
    bound = 1.0 / float(fan_in) ** 0.5
    return _uniform_range(-bound, bound), _uniform_range(-bound, bound)
  if init == "imaml":  # Glorot uniform's variance times gain^2
    return nn.initializers.variance_scaling(1.73 ** 2, "fan_avg", "uniform"), _uniform_range(0.0, 0.05)
  if conv:
    return nn.initializers.glorot_uniform(), nn.initializers.zeros
  if head:
    return nn.initializers.normal(1.0), nn.initializers.zeros
  return nn.initializers.truncated_normal(0.01), nn.initializers.zeros


def _uniform_range(low: float, high: float):
  """An initialiser drawing ``U(low, high)`` (Flax has none with explicit bounds)."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, low, high)
  return init


class MLP(nn.Module):
  """A ReLU multilayer perceptron; ``MLP((64, 64, 1))`` is MAML's sinusoid regressor (1-64-64-1).

  Input ``[..., d_in]``, output ``[..., features[-1]]``. ``init_scheme`` picks the initialisation
  (:func:`layer_init`: ``"flax"``, ``"torch"`` or ``"maml"``; not ``init``, Flax's method name); the
  parameter tree is the same under every scheme.
  """
  features: Sequence[int] = (64, 64, 1)
  init_scheme: str = "flax"

  @nn.compact
  def __call__(self, x):
    for i, width in enumerate(self.features):
      kernel_init, bias_init = layer_init(self.init_scheme, x.shape[-1])
      x = nn.Dense(width, kernel_init=kernel_init, bias_init=bias_init)(x)
      if i < len(self.features) - 1:
        x = nn.relu(x)
    return x


class BatchStatNorm(nn.Module):
  """Batch normalisation that always uses the current batch's statistics, with learned scale and bias.

  This is how MAML (Finn et al., 2017) ran batch norm: no running averages, batch statistics both
  during adaptation and at evaluation (transductive over the task's support or query set). Statistics
  are over every axis but the last (channels).
  """
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes)
    var = jnp.mean(jnp.square(x - mean), axis=axes)
    return (x - mean) * (scale / jnp.sqrt(var + self.epsilon)) + bias


def conv_as_matmul(x: jax.Array, kernel: jax.Array, bias: jax.Array, stride: int) -> jax.Array:
  """A 2-D convolution with "SAME" padding written as patches times a matrix (im2col).

  ``x [N, H, W, C]``, ``kernel [kh, kw, C, F]``, ``bias [F]`` -> ``[N, ceil(H/s), ceil(W/s), F]``; the
  same function as ``nn.Conv(F, (kh, kw), strides=s, padding="SAME")`` with that kernel and bias
  (padding from ``lax.padtype_to_pads``, so the asymmetric "SAME" padding of stride 2 matches too).

  Why: under ``jax.vmap`` over tasks, every task has its own adapted kernel, and XLA lowers a batched
  convolution to a grouped convolution, which its CPU backend runs several times slower than the
  batched matrix product this becomes (Conv-4 MAML, 32 tasks: 3.9 s -> 0.52 s per meta-step on two
  cores; BUILD.md). The patches are ``kh * kw`` strided slices of the padded input, so the backward
  pass (and MAML's second-order pass) is slices, pads and matrix products only.
  """
  pads = lax.padtype_to_pads(x.shape[1:3], kernel.shape[:2], (stride, stride), "SAME")
  dimensions = lax.conv_dimension_numbers(x.shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))
  return conv_as_patches(x, kernel, window_strides=(stride, stride), padding=pads,
                         lhs_dilation=(1, 1), rhs_dilation=(1, 1),
                         dimension_numbers=dimensions) + bias


class MatmulConv(nn.Module):
  """``nn.Conv(features, (3, 3), strides, padding="SAME")`` computed by :func:`conv_as_matmul`.

  Its parameters are ``nn.Conv``'s (``kernel [3, 3, C, F]`` with the same initialiser, ``bias [F]``),
  so a parameter tree or checkpoint works with either implementation.
  """
  features: int
  stride: int = 1
  kernel_size: tuple[int, int] = (3, 3)
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    # float32 parameters, as nn.Conv's default param_dtype (also under jax_enable_x64).
    kernel = self.param("kernel", self.kernel_init,
                        (*self.kernel_size, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
    return conv_as_matmul(x, kernel, bias, self.stride)


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max-pooling with stride 2 and "VALID" padding, ``[N, H, W, C] -> [N, H//2, W//2, C]``.

  The same values as ``nn.max_pool(x, (2, 2), strides=(2, 2))``, as a reshape and a max: XLA's CPU
  backend runs the gradient of ``reduce_window`` (select-and-scatter) slowly. Where a window holds
  tied maxima the gradient is shared among them instead of going to the first; after a ReLU such
  ties are zeros, whose gradient the ReLU zeroes anyway.
  """
  return max_pool_as_reshape(x, window_dimensions=(1, 2, 2, 1))


def resolve_conv_impl(conv: str) -> str:
  """``"auto"`` -> ``"matmul"`` (measured fastest on CPU and on an H100; see :class:`Conv4`)."""
  if conv not in CONV_IMPLS:
    raise ValueError(f"conv must be one of {', '.join(CONV_IMPLS)}; got {conv!r}.")
  return "matmul" if conv == "auto" else conv


class Conv4(nn.Module):
  """MAML's "Conv-4" few-shot classifier (Vinyals et al., 2016; Finn et al., 2017).

  Four blocks of [3x3 conv, ``filters`` channels] -> :class:`BatchStatNorm` -> ReLU -> 2x2
  down-sampling, then a linear ``num_classes``-way head. ``downsample="stride"`` uses stride-2
  convolutions ("SAME" padding), as MAML did on Omniglot; ``"pool"`` uses stride-1 convolutions and
  2x2 max-pooling, as on mini-ImageNet. Input ``[B, H, W, C]`` (NHWC), output logits ``[B, num_classes]``.

  ``conv`` picks how the convolutions and pooling are computed; the function and the parameters are the
  same either way: ``"xla"`` uses ``lax.conv_general_dilated`` and ``reduce_window`` max-pooling,
  ``"matmul"`` uses :func:`conv_as_matmul` and :func:`max_pool_2x2`, and ``"auto"`` (default) picks
  ``"matmul"``. Under ``vmap`` over tasks, each task's adapted kernel turns a library convolution into
  a grouped one, which XLA runs slowly on both backends we measured; the patch matrix product
  becomes a batched GEMM instead. Vmapped second-order MAML meta-steps (5-way 1-shot, 32 tasks):
  7.6x faster on a 2-core CPU, 10x on an H100 (1.09 vs 11 ms); 20-way: 5x on the H100 (BUILD.md).
  TPUs are unmeasured.

  ``init_scheme`` picks the initialisation scheme of the convolutions and the head (:func:`layer_init`);
  batch norm starts at scale 1, bias 0 under every scheme.

  ``head_input`` is what the head sees: ``"flatten"`` the last feature map flattened (``2x2x64 = 256``
  inputs on 28x28 Omniglot), ``"mean"`` its spatial mean (64 inputs), as MAML's reference code does
  for Omniglot (``reduce_mean`` over height and width before the last matmul; mini-ImageNet flattens).
  """
  num_classes: int
  filters: int = 64
  downsample: str = "stride"
  conv: str = "auto"
  init_scheme: str = "flax"
  head_input: str = "flatten"

  @nn.compact
  def __call__(self, x):
    if self.downsample not in ("stride", "pool"):
      raise ValueError(f"Conv4: downsample must be 'stride' or 'pool', got {self.downsample!r}.")
    if self.head_input not in HEAD_INPUTS:
      raise ValueError(f"Conv4: head_input must be one of {', '.join(HEAD_INPUTS)}, got "
                       f"{self.head_input!r}.")
    impl = resolve_conv_impl(self.conv)
    stride = 2 if self.downsample == "stride" else 1
    for i in range(4):
      kernel_init, bias_init = layer_init(self.init_scheme, 9 * x.shape[-1], conv=True)
      if impl == "matmul":
        x = MatmulConv(self.filters, stride, kernel_init=kernel_init, bias_init=bias_init,
                       name=f"Conv_{i}")(x)
      else:
        x = nn.Conv(self.filters, (3, 3), strides=(stride, stride), padding="SAME",
                    kernel_init=kernel_init, bias_init=bias_init, name=f"Conv_{i}")(x)
      x = nn.relu(BatchStatNorm()(x))
      if self.downsample == "pool":
        x = (max_pool_2x2(x) if impl == "matmul"
             else nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID"))
    if self.head_input == "mean":
      x = jnp.mean(x, axis=(1, 2))
    else:
      x = jnp.reshape(x, (x.shape[0], -1))
    kernel_init, bias_init = layer_init(self.init_scheme, x.shape[-1], head=True)
    return nn.Dense(self.num_classes, kernel_init=kernel_init, bias_init=bias_init)(x)


def head_mask(params) -> dict:
  """A mask over ``params`` (bool leaves, same structure): True on the head, the model's last ``Dense``.

  For :class:`MLP` and :class:`Conv4` the head is the ``Dense_<k>`` with the largest ``k`` in
  ``params["params"]``: Flax numbers a module's layers in creation order and both models create the
  head last. The mask selects what ANIL adapts (:func:`gajax.algorithms.anil`).

  Raises:
    ValueError: ``params`` has no ``Dense_<k>`` layer under ``"params"``.
  """
  layers = params.get("params", {}) if isinstance(params, dict) else {}
  dense = [name for name in layers if name.startswith("Dense_") and name[6:].isdigit()]
  if not dense:
    raise ValueError("head_mask: params has no Dense_<k> layer under 'params'; pass an explicit mask.")
  head = max(dense, key=lambda name: int(name[6:]))
  def layer_mask(collection, name, layer):
    return jax.tree_util.tree_map(lambda _: collection == "params" and name == head, layer)

  return {collection: {name: layer_mask(collection, name, layer) for name, layer in layers.items()}
          for collection, layers in params.items()}


def batch_norm_mask(params) -> dict:
  """A bool pytree like ``params``: True for the scale and bias of every :class:`BatchStatNorm`.

  Flax names those modules ``BatchStatNorm_<i>`` (at any depth), in :class:`Conv4` and
  :class:`ResNet12` alike. The mask selects what MAML++'s per-step batch-norm weights and biases
  (BNWB) copy per inner step (:func:`gajax.algorithms.maml_plus_plus`).

  Raises:
    ValueError: ``params`` has no ``BatchStatNorm`` parameter.
  """
  def is_bn(path, _):
    return any(str(getattr(k, "key", "")).startswith("BatchStatNorm_") for k in path)

  mask = jax.tree_util.tree_map_with_path(is_bn, params)
  if not any(jax.tree_util.tree_leaves(mask)):
    raise ValueError("batch_norm_mask: params has no BatchStatNorm_<i> layer; pass an explicit mask.")
  return mask


class ResNet12(nn.Module):
  """ResNet-12, the backbone of TADAM (Oreshkin et al., 2018) and MetaOptNet (Lee et al., 2019).

  Four residual blocks of widths ``widths`` (default 64-160-320-640). Each block: three
  [3x3 conv (no bias) -> :class:`BatchStatNorm`] with a leaky ReLU (slope 0.1) after the first two,
  plus a 1x1 conv -> batch norm shortcut; their sum through a leaky ReLU, then 2x2 max-pooling. The
  last map is averaged over space and a linear head gives ``num_classes`` logits. Input
  ``[B, H, W, C]``; on 84x84 mini-ImageNet the maps are 42, 21, 10 and 5 pixels wide (12.4M
  parameters at the default widths). Kernels are He-normal (fan-out), as MetaOptNet initialises them.

  Batch norm uses batch statistics (MAML's transductive setting); DropBlock, which MetaOptNet trains
  with, is not included. Written with ``nn.Conv`` and ``nn.max_pool``: gajax's algorithms compute them
  as patch products and reshapes under ``per_task`` (``fast_ops``, :mod:`gajax.fast_ops`).
  """
  num_classes: int
  widths: Sequence[int] = (64, 160, 320, 640)

  @nn.compact
  def __call__(self, x):
    he = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
    for width in self.widths:
      shortcut = BatchStatNorm()(nn.Conv(width, (1, 1), use_bias=False, kernel_init=he)(x))
      for i in range(3):
        x = BatchStatNorm()(nn.Conv(width, (3, 3), use_bias=False, kernel_init=he)(x))
        if i < 2:
          x = nn.leaky_relu(x, 0.1)
      x = nn.max_pool(nn.leaky_relu(x + shortcut, 0.1), (2, 2), strides=(2, 2))
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))
