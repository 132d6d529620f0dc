"""CAGrad, "Conflict-Averse Gradient Descent for Multi-task Learning" (Liu et al., NeurIPS 2021).

arXiv:2110.14048.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from gajax.aggregators import _base, _qp


def cagrad_weights(gramian: jax.Array, c: float = 0.5, *, rescale: bool = True,
                   num_bisections: int = 32) -> jax.Array:
  r"""Weights ``x`` with ``sum_i x_i g_i = d*``, the conflict-averse direction of Liu et al. (2021).

  CAGrad maximises the worst local improvement in a ball around the mean update ``g_0 = J^T u``,
  ``u = 1/T``:

  .. math::
     d^\star = \arg\max_{\|d - g_0\| \le r} \min_i \langle g_i, d\rangle, \qquad r = c \|g_0\|.

  The paper solves the dual ``min_{w in simplex} g_w^T g_0 + r |g_w|`` and sets
  ``d = g_0 + (r / |g_w|) g_w``. We solve the primal directly with exact non-negative QPs. For a level
  ``tau``, let ``P_tau = {d : J d >= tau 1}``; the projection of ``g_0`` onto ``P_tau`` is
  ``g_0 + J^T y(tau)`` with (same derivation as DualProj, with ``J d >= tau 1``)

  .. math::
     y(\tau) = \arg\min_{y \ge 0} \tfrac12 y^\top K y + (K u - \tau \mathbf 1)^\top y,
     \qquad \operatorname{dist}(g_0, P_\tau)^2 = y(\tau)^\top K y(\tau).

  The distance is non-decreasing in ``tau`` (the sets shrink), and ``d*`` is the projection of ``g_0``
  onto ``P_tau*`` with ``tau*`` the largest level at distance ``<= r``. ``tau*`` lies in
  ``[min_i (K u)_i, min_i ((K u)_i + r sqrt(K_ii))]``; we bisect it ``num_bisections`` times (each step
  warm-starts the QP from the previous solution and its swept inverse) and keep the last feasible
  level, so ``|d - g_0| <= r`` always. This ``d`` equals the paper's ``g_0 + (r/|g_w|) g_w`` with
  ``w = y / 1^T y`` (the KKT conditions coincide), and it stays well defined when ``g_w = 0``, where the
  paper's formula divides by zero (TorchJD returns zero weights there; we return the projection of
  ``g_0`` onto the best level set, which attains the optimal worst-case improvement).

  Output scale: with ``rescale=True`` (default) the weights are divided by ``1 + c^2`` as in the
  official code's default (``rescale=1``, "g / (1 + alpha**2)"); TorchJD's ``CAGrad`` does not rescale
  (use ``rescale=False`` to match it). The weights are invariant to a common scale of the ``g_i``.

  Args:
    gramian: float32 ``[T, T]`` Gramian, any common scale.
    c: radius factor ``c >= 0`` (``c = 0`` gives the mean).
    rescale: divide by ``1 + c^2``.
    num_bisections: bisection steps on ``tau`` (32 shrink the bracket by ``2^-32``, below float32
      resolution).

  Returns:
    float32 ``[T]`` weights: ``u + y(tau*)``, divided by ``1 + c^2`` if ``rescale``.
  """
  q, _ = _base.trace_normalized(gramian)
  t = q.shape[0]
  u = jnp.full((t,), 1.0 / t, jnp.float32)
  a = q @ u                                    # <g_i, g_0>
  r = c * jnp.sqrt(jnp.maximum(u @ a, 0.0))    # c |g_0|
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(q), 0.0))
  lo = jnp.min(a)
  hi = jnp.min(a + r * norms)
  zeros = jnp.zeros((t,), jnp.float32)

  def step(_, carry):
    lo, hi, y_lo, state = carry
    mid = 0.5 * (lo + hi)
    state, _ = _qp.nonneg_qp_solve(q, a - mid, state)
    y = state.v
    feasible = y @ q @ y <= r * r
    return (jnp.where(feasible, mid, lo), jnp.where(feasible, hi, mid),
            jnp.where(feasible, y, y_lo), state)

  carry = (lo, hi, zeros, _qp.initial_state(q))
  _, _, y, _ = jax.lax.fori_loop(0, num_bisections, step, carry)
  weights = u + y
  if rescale:
    weights = weights / (1.0 + c * c)
  return weights


def cagrad(c: float = 0.5, rescale: bool = True) -> optax.GradientTransformationExtraArgs:
  r"""CAGrad: the mean update moved within a ball of radius ``c |g_0|`` to maximise the worst gain.

  ``A(J) = d* / (1 + c^2)`` (official code default) with ``d*`` from :func:`cagrad_weights`;
  ``rescale=False`` returns ``d*`` itself (TorchJD's scale). ``c = 0.5`` is the paper's and TorchJD's
  default. Gramian from inputs divided by a power of two near their largest entry (weights are scale
  invariant), applied to the original updates.

  Args:
    c: radius factor, ``c >= 0``.
    rescale: divide the direction by ``1 + c^2``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``: input leaves ``[T, *s]``, output leaves ``[*s]`` in
    the input dtype; extra keyword arguments of ``update`` are ignored. Permutation invariant and
    positively homogeneous.
  """
  if not c >= 0:
    raise ValueError(f"cagrad: c must be >= 0, got {c}.")
  return _base.from_gramian_weighting(lambda k: cagrad_weights(k, c, rescale=rescale))
