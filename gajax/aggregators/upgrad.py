"""UPGrad, from "Jacobian Descent for Multi-Objective Optimization" (Quinton & Rey, 2024).

arXiv:2406.16232; reference implementation: TorchJD.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from gajax.aggregators import _base, _qp


def upgrad_weights(gramian: jax.Array, pref_vector: Sequence[float] | jax.Array | None = None,
                   scales: jax.Array | None = None,
                   task_mask: jax.Array | None = None) -> jax.Array:
  r"""Weights ``w`` with ``sum_i w_i g_i = sum_i pi_C(u_i g_i)``, the mean of the projected updates.

  ``C = {x : J x >= 0}`` is the dual cone of the task updates (rows of ``J``). Each ``u_i g_i`` is
  projected onto ``C`` through the dual QP derived in :func:`gajax.aggregators.dualproj.dualproj_weights`
  with ``u = u_i e_i``:

  .. math::
     v^{(i)} = \arg\min_{v \ge 0} \tfrac12 v^\top K v + u_i K_{:, i}^\top v,\qquad
     \pi_C(u_i g_i) = J^\top (u_i e_i + v^{(i)}),\qquad
     w = u + \sum_i v^{(i)}.

  The ``T`` QPs share ``K`` and are solved together (``vmap`` of the exact active-set solver
  :func:`gajax.aggregators._qp.nonneg_qp`) on ``K / tr K``. Same conventions as TorchJD's
  ``UPGradWeighting`` (sum over ``i`` of the weight vectors of the projections of ``u_i g_i``, default
  ``u = 1/T``), without its ``norm_eps`` / ``reg_eps`` regularisation of the Gramian: our solver's ridge
  is removed by iterative refinement, so we match the exact projections.

  Per-task scales: with ``g_i = s_i h_i`` and ``K`` the Gramian of the ``h_i`` (the cone is unchanged),
  the weights returned are for the ``h_i``: ``s_max (c + sum_i v^(i))`` with ``c = u s / s_max``.

  Args:
    gramian: float32 ``[T, T]`` Gramian of the (possibly rescaled) tasks.
    pref_vector: optional ``[T]`` preference ``u`` (default ``1/T``). Any sign is allowed.
    scales: optional float32 ``[T]`` positive per-task scales ``s_i``.
    task_mask: optional bool ``[T]``: masked tasks (zero rows, whose constraints are then vacuous) get
      no preference weight, and the others are rescaled to keep ``sum_i |u_i|`` (e.g. ``1/T_kept``).

  Returns:
    float32 ``[T]`` weights for the rows the Gramian was built from.
  """
  q, c, s_max = _qp.dual_cone_problem(gramian, pref_vector, scales, task_mask, "upgrad_weights")
  # Row i of q is K_{:, i} (symmetric); problem i has linear term c_i K_{:, i}.
  v = jax.vmap(lambda b: _qp.nonneg_qp(q, b))(c[:, None] * q)
  return s_max * (c + jnp.sum(v, axis=0))


def upgrad(pref_vector: Sequence[float] | None = None) -> optax.GradientTransformationExtraArgs:
  r"""UPGrad (unconflicting projection of gradients): the mean of the updates projected on the dual cone.

  ``A(J) = sum_i pi_C(u_i g_i)`` with ``C = {x : J x >= 0}`` and ``u = 1/T`` by default, i.e. the mean
  of the projected updates ``(1/T) sum_i pi_C(g_i)`` -- TorchJD's ``UPGrad`` output scale (mean, not
  sum). It never conflicts with a task (``<g_i, A(J)> >= 0``), equals the mean when no two tasks
  conflict, and is linear under positive scaling (``A(cJ) = c A(J)``, ``c > 0``: the projection is
  positively homogeneous). Weights from :func:`upgrad_weights`; each task is first rescaled by its own
  power of two (exact; the cone is unchanged).

  Args:
    pref_vector: optional length-``T`` preference vector ``u``; ``None`` for ``1/T``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``: input leaves ``[T, *s]``, output leaves ``[*s]`` in
    the input dtype; extra keyword arguments of ``update`` are ignored except ``task_mask``, whose
    masked tasks get no preference weight (the mean over the kept tasks). Permutation invariant with the
    default preference.
  """
  return _base.from_scaled_gramian_weighting(
      lambda k, s, mask: upgrad_weights(k, pref_vector, s, mask))
