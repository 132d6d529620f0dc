"""The plain average and sum of per-task updates: the baselines every other aggregator is compared with."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from gajax.aggregators import _base


def _task_count(updates) -> int:
  return _base.num_tasks(updates)


def mean() -> optax.GradientTransformationExtraArgs:
  """Averages stacked per-task updates: ``A(g_1..g_T) = (1/T) sum_i g_i``.

  The outer step of MAML (Finn et al., 2017) and Reptile (Nichol et al., 2018) with the usual ``1/T``.
  Input leaves ``[T, *s]``, output leaves ``[*s]``, accumulated in float32 and returned in the input
  dtype. Linear: ``A(c J) = c A(J)``; permutation invariant over tasks.
  """
  return _base.from_weights_fn(
      lambda updates: jnp.full((_task_count(updates),), 1.0 / _task_count(updates), jnp.float32))


def sum() -> optax.GradientTransformationExtraArgs:  # pylint: disable=redefined-builtin
  """Sums stacked per-task updates: ``A(g_1..g_T) = sum_i g_i`` (TorchJD's ``Sum``)."""
  return _base.from_weights_fn(
      lambda updates: jnp.ones((_task_count(updates),), jnp.float32))
