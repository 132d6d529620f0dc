"""Flax (Linen) models of the meta-learning literature, used through pure ``model.apply(params, x)``."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
  """A ReLU multilayer perceptron; ``MLP((64, 64, 1))`` is MAML's sinusoid regressor (1-64-64-1).

  Input ``[..., d_in]``, output ``[..., features[-1]]``.
  """
  features: Sequence[int] = (64, 64, 1)

  @nn.compact
  def __call__(self, x):
    for width in self.features[:-1]:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.features[-1])(x)


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


class Conv4(nn.Module):
  """MAML's "Conv-4" few-shot classifier (Vinyals et al., 2016; Finn et al., 2017).

  Four blocks of [3x3 conv, ``filters`` channels] -> :class:`BatchStatNorm` -> ReLU -> 2x2
  down-sampling, then a linear ``num_classes``-way head. ``downsample="stride"`` uses stride-2
  convolutions ("SAME" padding), as MAML did on Omniglot; ``"pool"`` uses stride-1 convolutions and
  2x2 max-pooling, as on mini-ImageNet. Input ``[B, H, W, C]`` (NHWC), output logits ``[B, num_classes]``.
  """
  num_classes: int
  filters: int = 64
  downsample: str = "stride"

  @nn.compact
  def __call__(self, x):
    if self.downsample not in ("stride", "pool"):
      raise ValueError(f"Conv4: downsample must be 'stride' or 'pool', got {self.downsample!r}.")
    for _ in range(4):
      stride = 2 if self.downsample == "stride" else 1
      x = nn.Conv(self.filters, (3, 3), strides=(stride, stride), padding="SAME")(x)
      x = nn.relu(BatchStatNorm()(x))
      if self.downsample == "pool":
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    return nn.Dense(self.num_classes)(jnp.reshape(x, (x.shape[0], -1)))
