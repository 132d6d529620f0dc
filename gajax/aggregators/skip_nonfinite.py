"""A guard that keeps tasks with NaN/Inf updates from poisoning the aggregate."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gajax.aggregators import _base

PyTree = Any


class SkipNonfiniteState(NamedTuple):
  """State of :func:`skip_nonfinite_tasks`.

  Attributes:
    inner: the wrapped aggregator's state.
    skipped: int32 scalar, how many tasks the last update dropped.
  """
  inner: optax.OptState
  skipped: jax.Array


def finite_tasks(tree: PyTree) -> jax.Array:
  """Bool ``[T]``: whether every entry of task ``i``'s slice of every leaf is finite."""
  per_leaf = [jnp.all(jnp.isfinite(jnp.reshape(leaf, (leaf.shape[0], -1))), axis=1)
              for leaf in jax.tree_util.tree_leaves(tree)]
  return jnp.all(jnp.stack(per_leaf), axis=0)


def _zero_rows(tree: PyTree, keep: jax.Array) -> PyTree:
  return jax.tree_util.tree_map(
      lambda leaf: jnp.where(jnp.reshape(keep, (-1,) + (1,) * (leaf.ndim - 1)), leaf,
                             jnp.zeros((), leaf.dtype)), tree)


def skip_nonfinite_tasks(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """Wraps an aggregator, or a whole ``optax.chain(aggregator, optimiser)``, so that tasks whose update
  (or agreement signal) has a NaN/Inf get no weight.

  Such tasks' rows are replaced by zeros before ``inner`` sees them, and ``inner`` receives the extra
  argument ``task_mask`` (bool ``[T]``, true for kept tasks; ``optax.chain`` hands it to every member).
  ``mean``/``sum`` and ``gradient_agreement`` renormalise over the kept tasks (the mean of the kept
  tasks; for agreement a zero row already gets weight 0 and the L1 normalisation runs over the rest).
  Aggregators that do not read ``task_mask`` see the dropped tasks as zero updates. The count of
  dropped tasks is kept in the state (read it with :func:`skipped_tasks`).

  With every task dropped the step is skipped whole, in the manner of ``optax.apply_if_finite``: the
  output is all zeros and ``inner``'s state stays as it was (an entry whose shape ``inner`` fixes only
  on its first update, such as agreement weights built without ``num_tasks``, takes its new value).
  Wrap the whole chain, as ``gajax.train.make_tx`` does, so that this also holds the optimiser's
  moments still: wrapped around the aggregator alone, Adam's momentum would move the parameters.
  """

  def init_fn(params):
    return SkipNonfiniteState(inner.init(params), jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None, *, agreement_signal=None, **extra_args):
    t = _base.num_tasks(updates)
    keep = finite_tasks(updates)
    if agreement_signal is not None:
      _base.num_tasks(agreement_signal, what="agreement signal")
      keep = keep & finite_tasks(agreement_signal)
      extra_args["agreement_signal"] = _zero_rows(agreement_signal, keep)
    out, inner_state = inner.update(_zero_rows(updates, keep), state.inner, params, task_mask=keep,
                                    **extra_args)
    none_kept = ~jnp.any(keep)
    out = jax.tree_util.tree_map(lambda x: jnp.where(none_kept, jnp.zeros_like(x), x), out)
    inner_state = jax.tree_util.tree_map(
        lambda old, new: jnp.where(none_kept, old, new) if old.shape == new.shape else new,
        state.inner, inner_state)
    skipped = (t - jnp.sum(keep)).astype(jnp.int32)
    return out, SkipNonfiniteState(inner_state, skipped)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)

