r"""A small dense non-negative quadratic program solver that runs inside ``jax.jit``.

MGDA, UPGrad, DualProj and CAGrad all reduce to problems of the form

.. math::
   \min_{v \ge 0} \tfrac12 v^\top Q v + b^\top v, \qquad Q \in \mathbb{R}^{T\times T} \text{ PSD},

with ``Q`` a (normalised) Gramian of the task updates, so ``T`` is the task count and the problems are
tiny. :func:`nonneg_qp` solves them exactly (up to float32 rounding) with a primal active-set method,
the quadratic-programming form of Lawson & Hanson's NNLS algorithm (Solving Least Squares Problems,
1974, ch. 23), in one ``lax.while_loop``: no host callback, so it jits, vmaps and runs on accelerators.

The inverse of the free block ``Q_FF`` is kept up to date with Goodnight's sweep operator (The
American Statistician 33(3), 1979): freeing or fixing one coordinate is one ``O(T^2)`` rank-one
update, so an iteration costs a few ``T x T`` elementwise operations and matrix-vector products and no
factorisation (LAPACK calls inside a loop cost far more than the arithmetic at these sizes, and
compile slowly).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from gajax.aggregators import _base


class QPState(NamedTuple):
  """Warm-startable state of :func:`nonneg_qp_solve`.

  Attributes:
    v: float32 ``[T]`` feasible point (``v >= 0``, zero off the free set).
    free: bool ``[T]`` the free set ``F``.
    swept: float32 ``[T, T]`` the matrix ``Q + rho I`` swept on ``F``; its ``F x F`` block is
      ``-(Q_FF + rho I)^{-1}``. It depends on ``Q`` and ``F`` only, so it can be reused for another
      ``b`` with the same ``Q``.
  """
  v: jax.Array
  free: jax.Array
  swept: jax.Array


def _ridge(q: jax.Array, ridge: float) -> jax.Array:
  top = jnp.max(jnp.diagonal(q))
  return ridge * jnp.where(top > 0, top, 1.0)


def _sweep(a: jax.Array, k: jax.Array, sign: jax.Array, rho: jax.Array, top: jax.Array) -> jax.Array:
  r"""Sweeps (``sign = +1``) or reverse-sweeps (``sign = -1``) the symmetric matrix ``a`` on index ``k``.

  With pivot ``d = a_kk``: ``a_ij <- a_ij - a_ik a_kj / d`` off row and column ``k``,
  ``a_ik <- sign a_ik / d``, ``a_kj <- sign a_kj / d`` and ``a_kk <- -1 / d``. Sweeping ``Q + rho I`` on a
  set ``F`` leaves ``-(Q_FF + rho I)^{-1}`` in the ``F`` block, and reverse-sweeping undoes a sweep.
  In exact arithmetic the pivot is ``>= rho`` when sweeping (a Schur complement of ``Q + rho I``) and
  ``<= -1 / (Q_kk + rho)`` when reverse-sweeping; we clip it to those ranges against rounding.
  """
  t = a.shape[0]
  onehot = jnp.arange(t) == k
  col = lax.dynamic_index_in_dim(a, k, axis=1, keepdims=False)
  d = lax.dynamic_index_in_dim(col, k, keepdims=False)
  d = jnp.where(sign > 0, jnp.maximum(d, rho), jnp.minimum(d, -1.0 / (top + rho)))
  scaled = col / d
  new = a - jnp.outer(scaled, col)
  edge = sign * scaled
  new = jnp.where(onehot[None, :], edge[:, None], new)
  new = jnp.where(onehot[:, None], edge[None, :], new)
  return jnp.where(onehot[:, None] & onehot[None, :], -1.0 / d, new)


def initial_state(q: jax.Array, ridge: float = 1e-5) -> QPState:
  """The cold start of :func:`nonneg_qp_solve`: ``v = 0``, no free coordinate."""
  q = jnp.asarray(q, jnp.float32)
  t = q.shape[0]
  return QPState(v=jnp.zeros((t,), jnp.float32), free=jnp.zeros((t,), bool),
                 swept=q + _ridge(q, ridge) * jnp.eye(t, dtype=jnp.float32))


def nonneg_qp_solve(q: jax.Array, b: jax.Array, state: QPState | None = None, *,
                    max_iter: int | None = None, tol: float = 1e-6, ridge: float = 1e-5,
                    refine: int = 2) -> tuple[QPState, jax.Array]:
  """:func:`nonneg_qp` from a given (warm) state; returns the final state and the iteration count."""
  q = jnp.asarray(q, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  t = q.shape[0]
  if max_iter is None:
    max_iter = 3 * t + 10
  if state is None:
    state = initial_state(q, ridge)
  rho = _ridge(q, ridge)
  top = jnp.max(jnp.diagonal(q))
  # One product gives both the gradient Q z + b and the rounding scale |Q| |z| of the KKT test.
  q_pair = jnp.block([[q, jnp.zeros_like(q)], [jnp.zeros_like(q), jnp.abs(q)]])
  b_scale = jnp.max(jnp.abs(b))
  index = jnp.arange(t)

  def solve(free, swept):
    m = free.astype(jnp.float32)
    mask = m[:, None] * m[None, :]
    inverse = -swept * mask                    # (Q_FF + rho I)^{-1}, zero elsewhere
    q_ff = q * mask
    rhs = -b * m
    z = inverse @ rhs
    for _ in range(refine):                    # iterative refinement against Q_FF itself
      z = z + inverse @ (rhs - q_ff @ z)
    return z

  def cond(carry):
    _, _, _, _, _, it, done = carry
    return (~done) & (it < max_iter)

  def body(carry):
    v, free, swept, banned, last, it, _ = carry
    z = solve(free, swept)
    neg = free & (z <= 0)
    any_neg = jnp.any(neg)
    # (a) z > 0 on F: accept it; stop if the KKT conditions hold (gradient >= 0 off F), otherwise
    # free the most violated coordinate.
    pair = q_pair @ jnp.concatenate([z, jnp.abs(z)])
    grad = pair[:t] + b
    scale = b_scale + jnp.max(pair[t:])
    cand = jnp.where(free | banned, jnp.inf, grad)
    j = jnp.argmin(cand)
    add = cand[j] < -tol * scale
    # (b) some z_i <= 0 on F: move from v towards z until the first free coordinate reaches 0 and fix
    # that coordinate.
    ratio = jnp.where(neg, v / jnp.where(neg, jnp.maximum(v - z, 1e-30), 1.0), jnp.inf)
    k = jnp.argmin(ratio)
    alpha = jnp.clip(ratio[k], 0.0, 1.0)
    v_b = jnp.where(free & (index != k), jnp.maximum(v + alpha * (z - v), 0.0), 0.0)
    # A zero-length step (a freshly freed coordinate that rounding puts at <= 0) would cycle: ban it.
    banned_b = banned | ((index == k) & (k == last) & (alpha <= 0))
    pivot = jnp.where(any_neg, k, j)
    sign = jnp.where(any_neg, -1.0, 1.0)
    change = any_neg | add
    swept_new = jnp.where(change, _sweep(swept, pivot, sign, rho, top), swept)
    free_new = jnp.where(change, free ^ (index == pivot), free)
    v_new = jnp.where(any_neg, v_b, z)
    banned_new = jnp.where(any_neg, banned_b, banned)
    last_new = jnp.where(any_neg | ~add, -1, j)
    return v_new, free_new, swept_new, banned_new, last_new, it + 1, ~change

  carry = (jnp.maximum(state.v, 0.0), state.free, state.swept, jnp.zeros((t,), bool), jnp.int32(-1),
           jnp.int32(0), jnp.bool_(False))
  v, free, swept, _, _, iters, _ = lax.while_loop(cond, body, carry)
  return QPState(v=v, free=free, swept=swept), iters


def nonneg_qp(q: jax.Array, b: jax.Array, *, max_iter: int | None = None, tol: float = 1e-6,
              ridge: float = 1e-5, refine: int = 2) -> jax.Array:
  r"""Solves :math:`\min_{v \ge 0} \tfrac12 v^\top Q v + b^\top v` for a symmetric PSD ``Q``.

  Primal active-set method (Lawson & Hanson's NNLS, written for a QP). The state is a feasible ``v``
  and a *free* set ``F`` of coordinates allowed to be positive. Each iteration solves the equality
  problem on ``F`` (``z_F = -Q_FF^{-1} b_F``, ``z = 0`` elsewhere):

  * if ``z_F > 0``, then ``v = z``; if also ``(Q v + b)_j >= -tol * scale`` for every ``j`` outside ``F``
    the KKT conditions hold and we stop; otherwise the most negative ``j`` joins ``F``;
  * otherwise ``v`` moves towards ``z`` until its first free coordinate reaches 0, which leaves ``F``.

  In exact arithmetic the objective strictly decreases and no free set repeats, so it ends after
  finitely many steps (typically ``|F*| + 1``; at most ``max_iter``). ``vmap`` over ``b`` solves a batch
  at the cost of its slowest member.

  Degenerate ``Q`` (rank-deficient, zero): ``Q_FF^{-1}`` is replaced by ``(Q_FF + rho I)^{-1}``,
  ``rho = ridge * max_i Q_ii``, followed by ``refine`` steps of iterative refinement against ``Q_FF``
  itself. Each step multiplies the error along an eigenvector of ``Q_FF`` with eigenvalue ``lambda`` by
  ``rho / (lambda + rho)``: on well-conditioned free sets the ridge leaves no trace at float32
  precision, while along (near) null directions the solution stays finite (at most about
  ``(refine + 1) |b| / rho``) where the exact problem would be unbounded.

  Args:
    q: float32 ``[T, T]`` symmetric PSD matrix, preferably normalised (e.g. trace 1).
    b: float32 ``[T]``.
    max_iter: cap on active-set iterations, default ``3 T + 10``.
    tol: relative KKT tolerance; ``scale = max|b| + max(|Q| |v|)``.
    ridge: relative ridge of the inverse, see above.
    refine: iterative-refinement steps per solve.

  Returns:
    float32 ``[T]`` minimiser ``v >= 0``.
  """
  state, _ = nonneg_qp_solve(q, b, None, max_iter=max_iter, tol=tol, ridge=ridge, refine=refine)
  return state.v


def dual_cone_problem(gramian, pref_vector, scales, task_mask, name):
  """Shared set-up of UPGrad and DualProj: ``(Q, c, s_max)``.

  ``Q = K / tr K`` is the trace-normalised Gramian, ``u`` the preference vector (default ``1/T``,
  renormalised over kept tasks when ``task_mask`` is given) and ``c = u * s / max(s)`` the preference
  expressed on the rescaled rows (``g_i = s_i h_i``).
  """
  q, _ = _base.trace_normalized(gramian)
  t = q.shape[0]
  u = _base.preference_vector(pref_vector, t, name)
  if task_mask is not None:
    u = _base.renormalize_masked(u, task_mask)
  if scales is None:
    scales = jnp.ones((t,), jnp.float32)
  s_max = jnp.max(scales)
  return q, u * (scales / s_max), s_max
