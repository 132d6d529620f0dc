"""MGDA, "Multi-Task Learning as Multi-Objective Optimization" (Sener & Koltun, NeurIPS 2018).

arXiv:1810.04650.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from gajax.aggregators import _base, _qp


def mgda_weights(gramian: jax.Array, scales: jax.Array | None = None,
                 task_mask: jax.Array | None = None) -> jax.Array:
  r"""Weights of the minimum-norm point of the convex hull of the task updates.

  .. math::
     w^\star = \arg\min_{w \in \Delta_T} \Big\| \sum_i w_i g_i \Big\|^2
             = \arg\min_{w \ge 0,\ \mathbf 1^\top w = 1} w^\top K w,
     \qquad K_{ij} = \langle g_i, g_j\rangle,

  (Sener & Koltun, 2018, eq. 3 / Désidéri's MGDA). The paper solves it with Frank-Wolfe; we solve it
  exactly with an equivalent non-negative QP. Its KKT conditions are
  ``K w = lambda 1 + mu``, ``mu >= 0``, ``mu^T w = 0``, with ``lambda = w^T K w = |d|^2``. If
  ``lambda > 0``, ``v = w / lambda`` satisfies the KKT conditions of

  .. math::
     \min_{v \ge 0} \tfrac12 v^\top K v - \mathbf 1^\top v,

  so ``w = v / (1^T v)``. When ``0`` is in the hull (``lambda = 0``) that QP is unbounded; the solver's
  ridge keeps ``v`` finite and large along a null direction, and ``v / 1^T v`` tends to a convex
  combination with ``sum_i w_i g_i ~ 0``, the right limit. A zero task (``K_ii = 0``) gives ``w = e_i``.

  Scales: the min-norm point is not invariant to rescaling single tasks, but it is computable from
  the Gramian of rescaled tasks ``h_i = g_i / s_i``: with ``y = S v`` the QP becomes
  ``min_{y >= 0} 1/2 y^T K_h y - (1/s)^T y``. We solve it with the linear term divided by
  ``max_i (1/s_i)`` and return weights for the ``h_i``: ``y * s_min / sum_i y_i (s_min / s_i)``
  (so ``sum_i w_i g_i = sum_i (w_i s_i) h_i``). With ``scales=None`` (all ``s_i = 1``) these are the
  simplex weights ``w`` themselves.

  Masked tasks (``task_mask[i]`` false; their rows are zero, see
  :func:`gajax.aggregators.skip_nonfinite_tasks`) are left out: the hull is that of the kept tasks
  (with every task masked the weights are zero).

  Args:
    gramian: float32 ``[T, T]`` Gramian of the (possibly rescaled) tasks; any common scale.
    scales: optional float32 ``[T]`` positive per-task scales ``s_i`` (``g_i = s_i h_i``).
    task_mask: optional bool ``[T]``, false for tasks to leave out.

  Returns:
    float32 ``[T]`` weights for the rows the Gramian was built from (on the simplex if ``scales`` is
    ``None``).
  """
  q, _ = _base.trace_normalized(gramian)
  t = q.shape[0]
  if scales is None:
    scales = jnp.ones((t,), jnp.float32)
  scales = jnp.asarray(scales, jnp.float32)
  s_min = jnp.min(scales)
  rel = s_min / scales                          # in (0, 1]; the linear term is -rel
  kept = jnp.ones((t,), bool) if task_mask is None else jnp.asarray(task_mask, bool)
  rel = jnp.where(kept, rel, 0.0)               # a zero row with no linear term stays at v_i = 0
  v = _qp.nonneg_qp(q, -rel)
  kappa = jnp.sum(v * rel)                      # = s_min * sum_i v_i / s_i
  ok = kappa > 0
  weights = s_min * v / jnp.where(ok, kappa, 1.0)
  diag = jnp.diagonal(q)
  zero_task = (diag <= 0) & kept
  # A zero update is the min-norm point itself: put all the weight on it (exactly zero output).
  onehot = (jnp.arange(t) == jnp.argmax(zero_task)).astype(jnp.float32) * scales
  return jnp.where(jnp.any(zero_task), onehot, jnp.where(ok, weights, 0.0))


def mgda() -> optax.GradientTransformationExtraArgs:
  r"""MGDA: the minimum-norm element of the convex hull of the task updates, ``sum_i w_i g_i``.

  ``w`` from :func:`mgda_weights`, on the simplex: the output is a convex combination, no extra
  ``1/T`` (as in Sener & Koltun's MGDA-UB and TorchJD's ``MGDA``; no gradient normalisation is
  applied). It is Pareto-stationary-aware: ``<g_i, d> >= |d|^2 >= 0`` for every task, so it never
  conflicts with any task, and it is zero iff ``0`` is in the convex hull.

  Each task is rescaled by its own power of two before the Gramian is formed (exact), so tasks whose
  sizes differ by many orders of magnitude keep the sign conditions above; the solver is the exact
  active-set method of :func:`gajax.aggregators._qp.nonneg_qp` (no Frank-Wolfe iterations).

  Input leaves ``[T, *s]``; output leaves ``[*s]`` in the input dtype. Extra keyword arguments of
  ``update`` are ignored, except ``task_mask`` (tasks dropped by
  :func:`gajax.aggregators.skip_nonfinite_tasks` are left out of the hull instead of acting as zero
  updates, which would make the min-norm point 0). Permutation invariant; positively homogeneous
  (``A(cJ) = c A(J)``, ``c > 0``).
  """
  return _base.from_scaled_gramian_weighting(mgda_weights)
