"""AND-mask, "Learning explanations that are hard to vary" (Parascandolo et al., ICLR 2021,
arXiv:2009.00329)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from gajax.aggregators import _base, _rows


def _required_agreement(num_tasks: int, threshold: float) -> int:
  # |sum_i sign(g_i)| / T >= threshold  <=>  |sum_i sign(g_i)| >= ceil(threshold * T), compared as
  # integers so that e.g. threshold = 2/3 with T = 3 is not lost to rounding.
  return max(0, math.ceil(threshold * num_tasks - 1e-9))


def and_mask_keep(leaf: jax.Array, threshold: float) -> jax.Array:
  r"""The AND-mask of one leaf, bool ``[T, *s] -> [*s]``:

  .. math:: m = \Big[\frac{|\sum_i \operatorname{sign}(g_i)|}{T} \ge \tau\Big],

  with ``sign(0) = 0``: a task with a zero component counts as agreeing with neither sign.
  """
  t = leaf.shape[0]
  votes = jnp.abs(_rows.reduce_rows(leaf, jnp.add, lambda r: jnp.sign(r).astype(jnp.int32)))
  return votes >= _required_agreement(t, threshold)


def and_mask(threshold: float = 1.0) -> optax.GradientTransformationExtraArgs:
  r"""AND-mask (Parascandolo et al., 2021): the mean update, zeroed where the tasks' signs disagree.

  Per coordinate, the agreement score is ``|sum_i sign(g_i)| / T`` in ``[0, 1]`` and

  .. math:: A(g_1..g_T) = m \odot \frac1T \sum_i g_i,\qquad m = [\text{score} \ge \tau].

  This is the convention of the paper's code (``mask = mean(sign(grads)).abs() >= threshold``, applied
  to the **mean** gradient). ``threshold = 1`` keeps only coordinates where every task has the same
  strict sign (the logical AND); ``threshold = 0`` is the plain mean. The paper's optional rescaling by
  the inverse mask density is not applied. Elementwise, per leaf, stateless, permutation invariant.

  Args:
    threshold: ``tau`` in ``[0, 1]``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``: input leaves ``[T, *s]`` -> output leaves ``[*s]``
    in the input dtype (mean accumulated in float32). Extra keyword arguments are ignored.
  """
  if not 0.0 <= threshold <= 1.0:
    raise ValueError(f"and_mask: threshold must be in [0, 1], got {threshold}.")

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    t = _base.num_tasks(updates)

    def one(leaf):
      mean = _rows.sum_rows(leaf) / t
      return jnp.where(and_mask_keep(leaf, threshold), mean, 0.0).astype(leaf.dtype)

    return jax.tree_util.tree_map(one, updates), state

  return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)
