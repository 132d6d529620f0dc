"""Aligned-MTL, "Independent Component Alignment for Multi-Task Learning" (Senushkin et al., 2023).

CVPR 2023, arXiv:2305.19000.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from gajax.aggregators import _base

_SCALE_MODES = ("min", "median", "rmse")


def aligned_mtl_weights(gramian: jax.Array, pref_vector: Sequence[float] | jax.Array | None = None,
                        *, scale_mode: str = "min", rtol: float | None = None) -> jax.Array:
  r"""Weights ``B u`` of Aligned-MTL: the task updates' singular values all set to one common value.

  With ``J = U Sigma V^T`` (thin SVD of the ``[T, P]`` update matrix) and ``K = J J^T = U Sigma^2 U^T``,
  Aligned-MTL replaces ``J`` by the aligned matrix ``sigma J_hat = sigma U V^T`` whose rows are
  orthogonal with equal norms (condition number 1), and aggregates it with preferences ``u``. In
  Gramian form (the official ``ProcrustesSolver`` and TorchJD's ``AlignedMTL``):

  .. math::
     K = V \Lambda V^\top,\qquad B = \sqrt{\lambda_\mathrm{ref}}\; V_r \Lambda_r^{-1/2} V_r^\top,
     \qquad w = B u,\qquad \sum_i w_i g_i = \sqrt{\lambda_\mathrm{ref}}\, V_J U^\top u,

  where ``r`` keeps the eigenvalues above ``rtol * lambda_max`` (default ``rtol = T * eps_float32``, the
  official code's tolerance) and ``lambda_ref`` is the smallest kept eigenvalue (``scale_mode="min"``,
  the paper's default), their median (lower median, as ``torch.median``) or their mean (``"rmse"``).
  ``B`` is invariant to a common scale of the ``g_i`` (``sqrt(lambda_ref)`` and ``Lambda^{-1/2}``
  cancel), so we work on ``K / tr K``. All updates zero (no kept eigenvalue): zero weights.

  Args:
    gramian: float32 ``[T, T]`` Gramian, any common scale.
    pref_vector: optional ``[T]`` preference ``u``; default ``1/T`` (TorchJD's default, the mean of the
      aligned updates; the official code sums them, i.e. ``u = 1``).
    scale_mode: ``"min"``, ``"median"`` or ``"rmse"``.
    rtol: relative eigenvalue cut-off; ``None`` for ``T * eps_float32``.

  Returns:
    float32 ``[T]`` weights.
  """
  if scale_mode not in _SCALE_MODES:
    raise ValueError(f"aligned_mtl: scale_mode must be one of {_SCALE_MODES}, got {scale_mode!r}.")
  q, _ = _base.trace_normalized(gramian)
  t = q.shape[0]
  u = _base.preference_vector(pref_vector, t, "aligned_mtl_weights")
  if rtol is None:
    rtol = t * float(jnp.finfo(jnp.float32).eps)
  lam, vecs = jnp.linalg.eigh(q)               # ascending
  keep = lam > rtol * jnp.max(lam)
  count = jnp.sum(keep)
  if scale_mode == "min":
    ref = jnp.min(jnp.where(keep, lam, jnp.inf))
  elif scale_mode == "rmse":
    ref = jnp.sum(jnp.where(keep, lam, 0.0)) / jnp.maximum(count, 1)
  else:
    # Kept eigenvalues are the top `count` of the ascending list; torch.median takes the lower middle.
    ref = lam[jnp.clip(t - count + (count - 1) // 2, 0, t - 1)]
  inv_sqrt = jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, lam, 1.0)), 0.0)
  ref = jnp.where(count > 0, ref, 0.0)
  return jnp.sqrt(ref) * (vecs @ (inv_sqrt * (vecs.T @ u)))


def aligned_mtl(pref_vector: Sequence[float] | None = None, scale_mode: str = "min",
                rtol: float | None = None) -> optax.GradientTransformationExtraArgs:
  r"""Aligned-MTL: aggregates the task updates after equalising their singular values.

  ``A(J) = sqrt(lambda_ref) V U^T u`` (:func:`aligned_mtl_weights`), ``u = 1/T`` by default (TorchJD's
  scale; the paper's code sums, ``u = 1``). The smallest singular value sets the common scale by
  default, so the update is bounded by the weakest direction. Gramian from inputs divided by a power
  of two near their largest entry (weights are scale invariant), applied to the original updates.

  Returns:
    An ``optax.GradientTransformationExtraArgs``: input leaves ``[T, *s]``, output leaves ``[*s]`` in
    the input dtype; extra keyword arguments of ``update`` are ignored. Permutation invariant with the
    default preference; positively homogeneous.
  """
  if scale_mode not in _SCALE_MODES:
    raise ValueError(f"aligned_mtl: scale_mode must be one of {_SCALE_MODES}, got {scale_mode!r}.")
  return _base.from_gramian_weighting(
      lambda k: aligned_mtl_weights(k, pref_vector, scale_mode=scale_mode, rtol=rtol))
