"""GradDrop, "Just Pick a Sign" (Chen et al., NeurIPS 2020, arXiv:2010.06808)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gajax.aggregators import _base, _rows

PyTree = Any


class GradDropState(NamedTuple):
  """State of :func:`graddrop`.

  Attributes:
    key: the PRNG key for the next update's uniform draws.
  """
  key: jax.Array


def graddrop_purity(leaf: jax.Array) -> jax.Array:
  r"""Gradient sign purity per coordinate, float32 ``[T, *s] -> [*s]``:

  .. math:: P = \tfrac12\Big(1 + \frac{\sum_i g_i}{\sum_i |g_i|}\Big) \in [0, 1].

  ``P = 1`` when every task's component is ``>= 0``, ``P = 0`` when every one is ``<= 0``. Where all
  components are zero, ``P = 0.5``. ``P`` is scale invariant per coordinate, so each coordinate is
  divided by its largest ``|g_i|`` first (no float32 overflow at 1e+30 or underflow at 1e-30).
  """
  peak = _rows.max_rows(leaf, lambda r: jnp.abs(r).astype(jnp.float32))
  peak = jnp.where(peak > 0, peak, 1.0)
  total = _rows.sum_rows(leaf, lambda r: r.astype(jnp.float32) / peak)
  mass = _rows.sum_rows(leaf, lambda r: jnp.abs(r).astype(jnp.float32) / peak)
  return jnp.where(mass > 0, 0.5 * (1.0 + total / jnp.where(mass > 0, mass, 1.0)), 0.5)


def graddrop_mask(leaf: jax.Array, purity: jax.Array, uniform: jax.Array) -> jax.Array:
  """GradDrop's keep mask, bool ``[T, *s]``: ``(P > U and g_i > 0) or (P < U and g_i < 0)``.

  ``purity`` and ``uniform`` have shape ``[*s]``: one draw ``U ~ Uniform[0, 1)`` per coordinate, shared
  by all tasks, so a coordinate keeps either its positive or its negative components.
  """
  return (((purity > uniform) & (leaf > 0))
          | ((purity < uniform) & (leaf < 0)))


def graddrop_combine(leaf: jax.Array, uniform: jax.Array, leak: float = 0.0) -> jax.Array:
  r"""GradDrop of one leaf given the uniform draws: ``sum_i (l + (1 - l) M_i) g_i``.

  ``M`` is :func:`graddrop_mask` of :func:`graddrop_purity`; ``l`` is the leak. Shapes: ``[T, *s]`` and
  ``[*s]`` -> ``[*s]`` in the leaf's dtype, accumulated in float32.
  """
  purity = graddrop_purity(leaf)

  def kept(row):  # row i's term (l + (1 - l) M_i) g_i; the same mask as graddrop_mask, row by row
    scale = leak + (1.0 - leak) * graddrop_mask(row, purity, uniform).astype(jnp.float32)
    return scale * row.astype(jnp.float32)

  return _rows.sum_rows(leaf, kept).astype(leaf.dtype)


def graddrop_uniforms(key: jax.Array, updates: PyTree) -> PyTree:
  """One float32 ``Uniform[0, 1)`` draw per parameter coordinate: leaves ``[T, *s] -> [*s]``.

  The key is split into one key per leaf, in ``tree_leaves`` order.
  """
  leaves, treedef = jax.tree_util.tree_flatten(updates)
  keys = jax.random.split(key, len(leaves))
  draws = [jax.random.uniform(keys[n], leaf.shape[1:], jnp.float32) for n, leaf in enumerate(leaves)]
  return jax.tree_util.tree_unflatten(treedef, draws)


def graddrop(key: jax.Array, leak: float = 0.0) -> optax.GradientTransformationExtraArgs:
  r"""GradDrop (Chen et al., 2020): per coordinate, keeps only the components of one sign.

  Per coordinate, with purity ``P`` (:func:`graddrop_purity`) and a fresh ``U ~ Uniform[0, 1)``, task
  ``i``'s component survives if it is positive and ``P > U``, or negative and ``P < U``; the output is

  .. math:: A(g_1..g_T) = \sum_i \big(\ell + (1-\ell) M_i\big) \odot g_i,

  the **sum** over tasks, as the gradient of a summed multi-task loss (the paper, and TorchJD's
  ``GradDrop``). So where all tasks agree in sign the output is the plain sum; ``leak = 1`` gives the
  plain sum everywhere. Elementwise, per leaf; every coordinate gets its own draw.

  Difference from the paper: the paper applies GradDrop to gradients with respect to a shared
  activation layer (summing over the batch before the purity); here it acts on parameter updates.

  Args:
    key: PRNG key, kept in the state and split once per update.
    leak: ``l`` in ``[0, 1]``, the fraction of every gradient that passes unmasked (one value for
      all tasks).

  Returns:
    An ``optax.GradientTransformationExtraArgs``: input leaves ``[T, *s]`` -> output leaves ``[*s]``
    in the input dtype, state :class:`GradDropState`. Extra keyword arguments are ignored.
  """
  if key is None:
    raise ValueError("graddrop: needs a PRNG key, e.g. graddrop(jax.random.PRNGKey(0)).")
  if not 0.0 <= leak <= 1.0:
    raise ValueError(f"graddrop: leak must be in [0, 1], got {leak}.")

  def init_fn(params):
    del params
    return GradDropState(key=key)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    _base.num_tasks(updates)
    next_key, sub = jax.random.split(state.key)
    uniforms = graddrop_uniforms(sub, updates)
    out = jax.tree_util.tree_map(lambda g, u: graddrop_combine(g, u, leak), updates, uniforms)
    return out, GradDropState(key=next_key)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
