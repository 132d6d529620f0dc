"""Shared pieces of every aggregator: input validation and float32 reductions over stacked pytrees.

A *stacked* pytree holds one update per task: every leaf has shape ``[T, *param_shape]`` with the same
task count ``T >= 1``. Aggregators reduce it to a parameter-shaped pytree. All reductions over the
parameter axis accumulate in float32 (``preferred_element_type``), so bfloat16 and float16 leaves give
the same weights as their float32 copies would, up to the rounding of the inputs themselves.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

PyTree = Any


def _leaf_name(path) -> str:
  return jax.tree_util.keystr(path) or "<root>"


def num_tasks(updates: PyTree, *, what: str = "task updates") -> int:
  """Validates a stacked pytree and returns its task count ``T``.

  Raises:
    ValueError: with a one-line message naming the offending leaf when the tree is empty, a leaf is a
      scalar, a leaf is not floating point, the leading sizes differ, or ``T == 0``.
  """
  leaves = jax.tree_util.tree_flatten_with_path(updates)[0]
  if not leaves:
    raise ValueError(f"{what}: the pytree has no array leaves.")
  sizes = {}
  for path, leaf in leaves:
    name = _leaf_name(path)
    shape = jnp.shape(leaf)
    if len(shape) == 0:
      raise ValueError(
          f"{what}: leaf {name} is a scalar; every leaf needs a leading task axis [T, ...].")
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      raise ValueError(
          f"{what}: leaf {name} has dtype {jnp.result_type(leaf)}; updates must be floating point.")
    sizes.setdefault(shape[0], name)
  if len(sizes) > 1:
    detail = ", ".join(f"{name} has {size}" for size, name in sizes.items())
    raise ValueError(f"{what}: leaves disagree on the leading task axis ({detail}).")
  (t,) = sizes
  if t == 0:
    raise ValueError(f"{what}: the task axis is empty (T = 0); need at least one task.")
  return t


def _flat(leaf: jax.Array) -> jax.Array:
  return jnp.reshape(leaf, (leaf.shape[0], -1))


def max_abs(updates: PyTree) -> jax.Array:
  """Largest absolute entry over the whole stacked pytree, as a float32 scalar."""
  return jnp.max(jnp.stack([jnp.max(jnp.abs(leaf)).astype(jnp.float32)
                            for leaf in jax.tree_util.tree_leaves(updates)]))


def task_sum(updates: PyTree, scale: jax.Array | float = 1.0) -> PyTree:
  """``G = scale * sum_i g_i`` per leaf, in float32. Shapes: ``[T, *s] -> [*s]``."""
  return jax.tree_util.tree_map(
      lambda leaf: jnp.sum(leaf.astype(jnp.float32) * scale, axis=0), updates)


def inner_products(updates: PyTree, direction: PyTree, scale: jax.Array | float = 1.0) -> jax.Array:
  """``<scale * g_i, d>`` for every task, summed over all leaves, in float32. Returns shape ``[T]``."""
  parts = [
      jnp.einsum("tp,p->t", _flat(g).astype(jnp.float32) * scale, jnp.ravel(d),
                 preferred_element_type=jnp.float32)
      for g, d in zip(jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(direction))
  ]
  return sum(parts[1:], parts[0])


def gramian(updates: PyTree) -> jax.Array:
  """The ``[T, T]`` Gramian ``sum over leaves of g g^T``, accumulated in float32."""
  parts = [jnp.einsum("tp,sp->ts", _flat(leaf), _flat(leaf), preferred_element_type=jnp.float32)
           for leaf in jax.tree_util.tree_leaves(updates)]
  return sum(parts[1:], parts[0])


def weighted_sum(updates: PyTree, weights: jax.Array) -> PyTree:
  """``sum_i w_i g_i`` per leaf, accumulated in float32 and cast back to the leaf's dtype.

  Shapes: ``updates`` leaves ``[T, *s]``, ``weights`` ``[T]`` -> leaves ``[*s]``.
  """
  weights = weights.astype(jnp.float32)
  return jax.tree_util.tree_map(
      lambda leaf: jnp.tensordot(weights, leaf, axes=1,
                                 preferred_element_type=jnp.float32).astype(leaf.dtype),
      updates)


def from_weights_fn(weights_fn) -> optax.GradientTransformationExtraArgs:
  """Builds a stateless aggregator ``sum_i w_i g_i`` from ``weights_fn(updates) -> w`` of shape ``[T]``.

  Extra keyword arguments of ``update`` are accepted and ignored, so that scripts can pass the same
  arguments (such as ``agreement_signal``) whichever aggregator they hold.
  """

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    num_tasks(updates)
    return weighted_sum(updates, weights_fn(updates)), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
