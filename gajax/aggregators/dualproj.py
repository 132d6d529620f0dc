"""DualProj, from "Jacobian Descent for Multi-Objective Optimization" (Quinton & Rey, 2024).

arXiv:2406.16232; reference implementation: TorchJD.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import optax

from gajax.aggregators import _base, _qp


def dualproj_weights(gramian: jax.Array, pref_vector: Sequence[float] | jax.Array | None = None,
                     scales: jax.Array | None = None,
                     task_mask: jax.Array | None = None) -> jax.Array:
  r"""Weights ``u + v*``: ``sum_i (u_i + v*_i) g_i`` is the projection of ``J^T u`` on the dual cone.

  With ``J`` the ``[T, P]`` matrix of task updates (rows ``g_i``), ``K = J J^T`` and ``u`` the
  preference vector (default ``1/T``: the mean update), the dual cone of the rows is
  ``C = {x : J x >= 0}``, the directions that conflict with no task. Projecting ``g = J^T u`` onto it,

  .. math::
     \min_x \tfrac12 \|x - g\|^2 \ \text{s.t.}\ J x \ge 0,
     \quad L(x, v) = \tfrac12\|x - g\|^2 - v^\top J x,\ v \ge 0.

  Stationarity gives ``x = g + J^T v = J^T (u + v)``; substituting back, the dual function is
  ``-1/2 v^T K v - v^T K u`` (up to a constant), so

  .. math::
     v^\star = \arg\min_{v \ge 0} \tfrac12 v^\top K v + (K u)^\top v,
     \qquad \pi_C(g) = J^\top (u + v^\star),

  with strong duality since the constraints are linear and ``x = 0`` is feasible. Only ``K`` is
  needed, so the cost is independent of ``P``. We solve the QP exactly with
  :func:`gajax.aggregators._qp.nonneg_qp` on ``K / tr K`` (the weights are invariant to a common scale).
  Unlike TorchJD (``norm_eps=1e-4``, ``reg_eps=1e-4`` added to the normalised Gramian) we do not
  regularise the problem itself: the solver's ridge only stabilises its inverses and is removed by
  iterative refinement, so results match the exact projection to float32 precision.

  Per-task scales: the cone ``{x : J x >= 0}`` does not change when rows are rescaled by positive
  ``s_i``, so the QP can use the Gramian of ``h_i = g_i / s_i`` (``g = sum_i u_i s_i h_i``); the returned
  weights are then for the ``h_i`` (``s_max (c + v)`` with ``c = u s / s_max``, to keep float32 in range).

  Args:
    gramian: float32 ``[T, T]`` Gramian of the (possibly rescaled) tasks.
    pref_vector: optional ``[T]`` preference ``u`` (default ``1/T``). Any sign is allowed.
    scales: optional float32 ``[T]`` positive per-task scales ``s_i`` (``g_i = s_i h_i``).
    task_mask: optional bool ``[T]``: masked tasks (zero rows, whose constraints are then vacuous) get
      no preference weight, and the others are rescaled to keep ``sum_i |u_i|`` (e.g. ``1/T_kept``).

  Returns:
    float32 ``[T]`` weights for the rows the Gramian was built from.
  """
  q, c, s_max = _qp.dual_cone_problem(gramian, pref_vector, scales, task_mask, "dualproj_weights")
  v = _qp.nonneg_qp(q, q @ c)
  return s_max * (c + v)


def dualproj(pref_vector: Sequence[float] | None = None) -> optax.GradientTransformationExtraArgs:
  r"""DualProj: the (preference-weighted) mean update projected on the dual cone ``{x : J x >= 0}``.

  ``A(J) = pi_C(J^T u)`` with ``u = 1/T`` by default, as TorchJD's ``DualProj`` (whose default
  preference is the mean): the output never conflicts with a task (``<g_i, A(J)> >= 0``) and equals the
  mean when the mean conflicts with none. Weights from :func:`dualproj_weights`; each task is first
  rescaled by its own power of two (exact), which leaves the cone unchanged and keeps the sign
  conditions accurate when task sizes differ by many orders of magnitude.

  Args:
    pref_vector: optional length-``T`` preference vector ``u``; ``None`` for ``1/T``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``: input leaves ``[T, *s]``, output leaves ``[*s]`` in
    the input dtype; extra keyword arguments of ``update`` are ignored except ``task_mask``, whose
    masked tasks get no preference weight (the mean over the kept tasks). Positively homogeneous and
    (with the default preference) permutation invariant.
  """
  return _base.from_scaled_gramian_weighting(
      lambda k, s, mask: dualproj_weights(k, pref_vector, s, mask))
