"""Any model fast under ``per_task``: convolutions and max-pools rewritten into ops that batch well.

Under :func:`gajax.per_task` every task adapts its own copy of the parameters, so ``jax.vmap`` sees a
convolution whose *kernel* is batched. XLA lowers that to a grouped convolution, which its CPU backend
runs about 8x slower than the equivalent batched matrix product, and 10x slower on an H100 (BUILD.md,
"Benchmarks"); the gradient of ``reduce_window`` max-pooling (select-and-scatter) is slow on CPU too.
gajax's own Conv-4 is written in the fast form. :func:`batchable` gives a user's model the same speed
without touching its code: it traces ``fn`` to a jaxpr and evaluates that jaxpr with

* every ``lax.conv_general_dilated`` (``flax.linen.Conv``, ``nnx.Conv``, any layout, strides,
  padding, input and kernel dilation; one feature group) computed by matrix products of the padded,
  dilated input's ``prod(kernel_size)`` strided slices, the definition of the convolution
  ``y[n, o, s] = sum_{k, c} x_pad[n, s * stride + k * dilation, c] W[k, c, o]`` summed in another
  order (float64: equal to rounding; ``tests/test_fast_ops.py``): as im2col (the slices
  concatenated, one product with the kernel as ``[prod(kernel_size) * C_in, C_out]``) while that
  patch matrix is moderate, else as a sum of one product per kernel offset, which needs no more
  memory than the input (:func:`conv_as_patches`);
* every non-overlapping, unpadded max-pool (``nn.max_pool(x, w, strides=w)``) as a reshape and a max.
  Where a window holds tied maxima, the gradient is shared among them instead of going to one.

Everything else is bound unchanged; nested ``jit`` calls are inlined so their convolutions are found
too, while convolutions inside other higher-order primitives (``lax.scan``, ``cond``, ``custom_vjp``,
``remat``) are left as they are. A function with nothing to rewrite is returned as called, so models
without convolutions (the sinusoid MLP, gajax's own Conv-4) run the very same program.

Every gajax algorithm applies it to its ``loss_fn`` (``fast_ops=True``, the default); pass
``fast_ops=False`` to keep XLA's own convolutions.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Callable

import jax
import jax.extend.core as jex
import jax.numpy as jnp
from jax import lax

_CONV = jex.primitives.conv_general_dilated_p
_MAX_POOL = jex.primitives.reduce_window_max_p
_JIT = jex.primitives.jit_p


# Above this many elements (per call, as traced: one task's batch under per_task) the patch matrix is
# not built: the convolution is summed from one product per kernel offset instead (``form="shifted"``).
PATCH_LIMIT = 2 ** 26


def conv_as_patches(lhs, rhs, *, window_strides, padding, lhs_dilation, rhs_dilation,
                    dimension_numbers, precision=None, preferred_element_type=None, form="auto"):
  """``lax.conv_general_dilated`` with one feature and batch group, computed by matrix products.

  ``form="patches"`` (im2col): the ``prod(K)`` strided slices concatenated into ``[N, *out, K * C]``,
  times the kernel as ``[K * C, O]``: one large product, but ``prod(K)`` times the input's memory
  (9x for 3x3), in the forward and the backward pass. ``form="shifted"``: the sum over kernel
  offsets ``k`` of ``slice_k(x) @ W[k]``, ``prod(K)`` products of depth ``C`` and no patch matrix.
  ``"auto"`` takes ``"patches"`` while the patch matrix has at most :data:`PATCH_LIMIT` elements
  (all of gajax's Omniglot and mini-ImageNet Conv-4 layers), else ``"shifted"`` (e.g. ResNet-12's
  64-channel layers at 84x84, where patches for 4 tasks of 80 images would take tens of GB).

  Args take ``lax.conv_general_dilated_p``'s parameters: ``padding`` explicit ``(low, high)`` pairs
  (negative allowed), ``dimension_numbers`` a ``lax.ConvDimensionNumbers``. Shapes as that primitive's.
  """
  if form not in ("auto", "patches", "shifted"):
    raise ValueError(f"form must be 'auto', 'patches' or 'shifted'; got {form!r}.")
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  nsp = len(lhs_spec) - 2
  x = _transpose(lhs, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))          # [N, *S, C]
  w = _transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))          # [*K, C, O]
  zero = jnp.zeros((), x.dtype)
  x = lax.pad(x, zero, [(0, 0, 0), *((lo, hi, d - 1) for (lo, hi), d in zip(padding, lhs_dilation)),
                        (0, 0, 0)])
  kernel = w.shape[:nsp]
  out = [(x.shape[1 + i] - (kernel[i] - 1) * rhs_dilation[i] - 1) // window_strides[i] + 1
         for i in range(nsp)]
  if min(out) <= 0:  # an empty output: let the primitive itself say so / produce it
    raise _NotRewritable
  slices = []
  for offset in itertools.product(*(range(k) for k in kernel)):
    start = [0, *(o * d for o, d in zip(offset, rhs_dilation)), 0]
    limit = [x.shape[0], *(s + (n - 1) * st + 1 for s, n, st in zip(start[1:], out, window_strides)),
             x.shape[-1]]
    slices.append(lax.slice(x, start, limit, [1, *window_strides, 1]))
  dims = (((x.ndim - 1,), (0,)), ((), ()))
  if form == "auto":
    form = "patches" if len(slices) * slices[0].size <= PATCH_LIMIT else "shifted"
  if form == "patches":
    patches = slices[0] if len(slices) == 1 else jnp.concatenate(slices, axis=-1)  # [N, *out, K*C]
    y = lax.dot_general(patches, w.reshape(math.prod(kernel) * w.shape[-2], w.shape[-1]), dims,
                        precision=precision, preferred_element_type=preferred_element_type)
  else:
    taps = w.reshape(math.prod(kernel), w.shape[-2], w.shape[-1])          # [K, C, O]
    y = None
    for i, piece in enumerate(slices):
      term = lax.dot_general(piece, taps[i], dims, precision=precision,
                             preferred_element_type=preferred_element_type)
      y = term if y is None else y + term                                  # [N, *out, O]
  # y's axes are (batch, *spatial, feature); place them where out_spec says.
  perm = [0] * y.ndim
  perm[out_spec[0]], perm[out_spec[1]] = 0, y.ndim - 1
  for i in range(nsp):
    perm[out_spec[2 + i]] = 1 + i
  return _transpose(y, perm)


def _transpose(x, perm):
  return x if tuple(perm) == tuple(range(x.ndim)) else jnp.transpose(x, perm)


def max_pool_as_reshape(x, *, window_dimensions):
  """``reduce_window`` max with stride = window, no padding or dilation, as a reshape and a max."""
  x = x[tuple(slice(0, n - n % w) for n, w in zip(x.shape, window_dimensions))]
  shape = [s for n, w in zip(x.shape, window_dimensions) for s in (n // w, w)]
  return jnp.max(x.reshape(shape), axis=tuple(range(1, 2 * x.ndim, 2)))


class _NotRewritable(ValueError):
  pass


def _rewrite_conv(params, lhs, rhs):
  if params["feature_group_count"] != 1 or params["batch_group_count"] != 1:
    raise _NotRewritable
  return conv_as_patches(lhs, rhs, window_strides=params["window_strides"],
                         padding=params["padding"], lhs_dilation=params["lhs_dilation"],
                         rhs_dilation=params["rhs_dilation"],
                         dimension_numbers=params["dimension_numbers"],
                         precision=params["precision"],
                         preferred_element_type=params["preferred_element_type"])


def _rewrite_max_pool(params, x):
  window = params["window_dimensions"]
  if (tuple(params["window_strides"]) != tuple(window) or any(p != (0, 0) for p in params["padding"])
      or any(d != 1 for d in (*params["base_dilation"], *params["window_dilation"]))):
    raise _NotRewritable
  return max_pool_as_reshape(x, window_dimensions=window)


_RULES = {_CONV: _rewrite_conv, _MAX_POOL: _rewrite_max_pool}


def _has_targets(jaxpr) -> bool:
  for eqn in jaxpr.eqns:
    if eqn.primitive in _RULES:
      return True
    if eqn.primitive is _JIT and _has_targets(eqn.params["jaxpr"].jaxpr):
      return True
  return False


def _eval(jaxpr, consts, args):
  env = {}

  def read(v):
    return v.val if isinstance(v, jex.Literal) else env[v]

  for var, val in zip(jaxpr.constvars, consts):
    env[var] = val
  for var, val in zip(jaxpr.invars, args):
    env[var] = val
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    outs = None
    if eqn.primitive in _RULES:
      try:
        outs = [_RULES[eqn.primitive](eqn.params, *invals)]
      except _NotRewritable:
        outs = None
    elif eqn.primitive is _JIT:
      inner = eqn.params["jaxpr"]
      outs = _eval(inner.jaxpr, inner.consts, invals)
    if outs is None:
      bind_params = eqn.primitive.get_bind_params(eqn.params)
      subfuns = []
      if isinstance(bind_params, tuple):  # jax < 0.10 returned (subfuns, params)
        subfuns, bind_params = bind_params
      with eqn.ctx.manager:
        outs = eqn.primitive.bind(*subfuns, *invals, **bind_params)
      if not eqn.primitive.multiple_results:
        outs = [outs]
    for var, val in zip(eqn.outvars, outs):
      env[var] = val
  return [read(v) for v in jaxpr.outvars]


def batchable(fn: Callable) -> Callable:
  """``fn`` with its convolutions as patch products and its max-pools as reshapes (module doc).

  ``fn`` takes and returns pytrees of arrays (a ``loss_fn(params, batch)``); the result computes the
  same function to float rounding. Idempotent: ``batchable(batchable(f))`` rewrites once.
  """
  if getattr(fn, "_gajax_batchable", False):
    return fn

  @functools.wraps(fn)
  def wrapper(*args):
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    if not _has_targets(closed.jaxpr):
      return fn(*args)
    outs = _eval(closed.jaxpr, closed.consts, jax.tree_util.tree_leaves(args))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

  wrapper._gajax_batchable = True
  return wrapper
