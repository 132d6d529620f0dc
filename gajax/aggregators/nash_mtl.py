"""Nash-MTL, "Multi-Task Learning as a Bargaining Game" (Navon et al., ICML 2022, arXiv:2202.01017)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from gajax.aggregators import _base


def _spd_solve(matrix: jax.Array, rhs: jax.Array) -> jax.Array:
  """``matrix^{-1} rhs`` for SPD ``matrix`` and a vector ``rhs``: Cholesky and two triangular solves."""
  chol = jax.lax.linalg.cholesky(matrix, symmetrize_input=False)
  y = jax.lax.linalg.triangular_solve(chol, rhs[:, None], left_side=True, lower=True)
  return jax.lax.linalg.triangular_solve(chol, y, left_side=True, lower=True, transpose_a=True)[:, 0]


def nash_mtl_weights(gramian: jax.Array, *, num_iters: int = 20,
                     max_norm: float | jax.Array | None = None, rtol: float = 1e-6) -> jax.Array:
  r"""The Nash bargaining weights: ``alpha > 0`` with ``(K_hat alpha)_i = 1 / alpha_i`` for every task.

  Navon et al. (2022, Thm. 5.1) show that the Nash bargaining solution over the ball of updates is
  ``d = sum_i alpha_i g_i`` with ``alpha_i <g_i, d> = 1``, i.e. ``K alpha = 1 / alpha`` elementwise. The
  paper (and TorchJD, which wraps the official code) reaches it with a sequence of CVXPY convex
  approximations on the Gramian normalised by its Frobenius norm, ``K_hat = K / |K|_F``; we keep that
  normalisation (so ``alpha`` is invariant to the scale of the updates and ``|d| = sqrt(T |K|_F)``) and
  solve the same equations exactly, as the minimiser of the strictly convex, self-concordant

  .. math::
     f(\alpha) = \tfrac12 \alpha^\top \hat K \alpha - \sum_i \log \alpha_i,
     \qquad \nabla f = \hat K \alpha - 1/\alpha,
     \qquad \nabla^2 f = \hat K + \operatorname{diag}(1/\alpha^2),

  by ``num_iters`` damped Newton steps ``alpha <- alpha - Delta / (1 + lambda)``,
  ``Delta = (nabla^2 f)^{-1} nabla f``, ``lambda^2 = nabla f^T Delta`` (Nesterov & Nemirovski): every
  step stays in ``alpha > 0`` without a line search, the damped phase ends after ``O(f(alpha_0) - f*)``
  steps and the last ones converge quadratically. The start is the best multiple of ``1``,
  ``alpha_0 = sqrt(T / 1^T K_hat 1) 1``.

  Degenerate ``K``: ``f`` is unbounded when a direction ``z >= 0`` has ``J^T z = 0`` (e.g. opposite
  updates), where no bargaining solution exists. We raise the eigenvalues of ``K_hat`` to at least
  ``rtol * lambda_max`` (no change on well-conditioned Gramians), which keeps ``alpha`` finite and
  makes it grow along such ``z`` so that ``d`` tends to 0 (opposite updates: ``d = 0``).

  ``max_norm`` (official code and TorchJD: 1.0, there by clipping the gradient norm after the
  weighted backward pass) scales ``alpha`` down so that ``|sum_i alpha_i g_i| <= max_norm``, the norm
  being measured with ``gramian`` as given. ``None`` or ``0`` disables it. The official option of
  recomputing the weights only every few steps (``update_weights_every``) is not provided.

  Args:
    gramian: float32 ``[T, T]`` Gramian (any common scale).
    num_iters: damped Newton steps.
    max_norm: optional bound on the aggregate's norm, in the units of ``gramian``.
    rtol: eigenvalue floor relative to the largest eigenvalue of ``K_hat``.

  Returns:
    float32 ``[T]`` positive weights.
  """
  k = jnp.asarray(gramian, jnp.float32)
  t = k.shape[0]
  fro = jnp.sqrt(jnp.sum(k * k))
  q = k / jnp.where((fro > 0) & jnp.isfinite(fro), fro, 1.0)
  lam, vecs = jnp.linalg.eigh(q)
  top = jnp.max(lam)
  floor = jnp.where(top > 0, rtol * top, 1.0)
  q = (vecs * jnp.maximum(lam, floor)) @ vecs.T
  q = 0.5 * (q + q.T)
  ones = jnp.ones((t,), jnp.float32)
  alpha0 = jnp.sqrt(t / jnp.maximum(ones @ q @ ones, floor * t)) * ones

  def newton(_, alpha):
    grad = q @ alpha - 1.0 / alpha
    hess = q + jnp.diag(1.0 / (alpha * alpha))
    delta = _spd_solve(hess, grad)
    decrement = jnp.sqrt(jnp.maximum(grad @ delta, 0.0))
    new = alpha - delta / (1.0 + decrement)
    # Positivity holds in exact arithmetic (|delta_i| / alpha_i <= decrement); guard the rounding.
    return jnp.maximum(new, 1e-3 * alpha)

  alpha = jax.lax.fori_loop(0, num_iters, newton, alpha0)
  if max_norm is not None:
    norm = jnp.sqrt(jnp.maximum(alpha @ k @ alpha, 0.0))
    limit = jnp.asarray(max_norm, jnp.float32)
    factor = jnp.where((limit > 0) & (norm > limit), limit / jnp.where(norm > 0, norm, 1.0), 1.0)
    alpha = alpha * factor
  return alpha


def nash_mtl(num_iters: int = 20, max_norm: float | None = 1.0) -> optax.GradientTransformationExtraArgs:
  r"""Nash-MTL: ``sum_i alpha_i g_i`` with the Nash bargaining weights of :func:`nash_mtl_weights`.

  Without clipping the output norm is ``sqrt(T |K|_F)``, growing linearly with the scale of the
  updates. ``max_norm=1.0`` (the official code's and TorchJD's default) then caps the output norm at
  1; pass ``None`` or ``0`` to disable it. The Gramian is built from the inputs divided by the power of
  two ``s`` just above their largest entry (so 1e+30 does not overflow), and the cap is applied in
  those units as ``max_norm / s``.

  Args:
    num_iters: damped Newton steps (20 reach float32 accuracy on well-conditioned Gramians).
    max_norm: cap on the output's global norm; ``None`` or ``0`` for none.

  Returns:
    An ``optax.GradientTransformationExtraArgs``: input leaves ``[T, *s]``, output leaves ``[*s]`` in
    the input dtype; extra keyword arguments of ``update`` are ignored. Permutation invariant.
  """
  if num_iters < 1:
    raise ValueError(f"nash_mtl: num_iters must be >= 1, got {num_iters}.")

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    _base.num_tasks(updates)
    scale = _base.power_of_two_scale(_base.max_abs(updates))
    limit = None if not max_norm else max_norm / scale
    weights = nash_mtl_weights(_base.normalized_gramian(updates, scale), num_iters=num_iters,
                               max_norm=limit)
    return _base.weighted_sum(updates, weights), state

  return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)
