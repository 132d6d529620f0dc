"""IMTL-G, the gradient part of "Towards Impartial Multi-task Learning" (Liu et al., ICLR 2021)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from gajax.aggregators import _base


def imtl_g_weights(gramian: jax.Array, *, ridge: float = 1e-8, cancel_tol: float = 1e-4) -> jax.Array:
  r"""Weights ``alpha`` (summing to 1) whose aggregate has the same projection on every unit update.

  IMTL-G asks for ``d = sum_i alpha_i g_i`` with ``sum_i alpha_i = 1`` and
  ``<d, g_i / |g_i|>`` equal for all ``i`` (Liu et al., 2021, sec. 3.2). With ``K`` the Gramian and
  ``n_i = |g_i| = sqrt(K_ii)``, ``<d, g_i> = (K alpha)_i``, so the condition reads

  .. math::
     K \alpha = k\, n \quad (k \in \mathbb R), \qquad \mathbf 1^\top \alpha = 1
     \;\Longrightarrow\; \alpha = \frac{K^{-1} n}{\mathbf 1^\top K^{-1} n}.

  This is the paper's closed form ``alpha_{2:T} = g_1 D^T (U D^T)^{-1}`` written with the Gramian only
  (TorchJD's ``IMTLG`` normalises ``pinv(K) n`` the same way). For rank-deficient ``K`` we use a ridge
  on ``K / tr K`` instead of a pseudo-inverse: ``v = (K/trK + ridge I)^{-1} n`` via ``eigh`` (eigenvalues
  clipped at 0 first). On well-conditioned ``K`` the ridge changes nothing at float32 precision; on
  singular ones ``v`` is dominated by a null direction ``z`` of ``K`` (``J^T z = 0``), which is the
  continuous limit: e.g. for ``g_2 -> -g_1`` the weights tend to ``(1/2, 1/2)`` and ``d -> 0``.

  When no such ``alpha`` exists (``1^T v`` cancels: ``|1^T v| <= cancel_tol * sum_i |v_i|``, e.g. for
  ``g_3 = (g_1 + g_2)/2``, or all updates zero) we return zero weights, as TorchJD does.

  Args:
    gramian: float32 ``[T, T]`` Gramian, any common scale (the weights are scale invariant).
    ridge: ridge relative to ``tr K``.
    cancel_tol: relative cancellation threshold for ``1^T v``.

  Returns:
    float32 ``[T]`` weights summing to 1, or zeros.
  """
  q, _ = _base.trace_normalized(gramian)
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(q), 0.0))
  lam, vecs = jnp.linalg.eigh(q)
  lam = jnp.maximum(lam, 0.0) + ridge
  v = vecs @ ((vecs.T @ norms) / lam)
  total = jnp.sum(v)
  ok = jnp.abs(total) > cancel_tol * jnp.sum(jnp.abs(v))
  return jnp.where(ok, v / jnp.where(ok, total, 1.0), 0.0)


def imtl_g() -> optax.GradientTransformationExtraArgs:
  r"""IMTL-G: ``sum_i alpha_i g_i``, equal projections on every unit update, ``sum_i alpha_i = 1``.

  Weights from :func:`imtl_g_weights`; the output scale follows the paper and TorchJD (weights sum to
  1, so identical updates give that update back). Gramian from inputs divided by a power of two near
  their largest entry (weights are scale invariant), applied to the original updates. Input leaves
  ``[T, *s]``, output leaves ``[*s]`` in the input dtype; extra keyword arguments of ``update`` are
  ignored. Permutation invariant; positively homogeneous.
  """
  return _base.from_gramian_weighting(imtl_g_weights)
