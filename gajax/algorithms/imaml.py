"""iMAML (Rajeswaran et al., 2019): meta-gradients from the implicit function theorem."""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import jax.scipy.sparse.linalg

from gajax.adaptation import adapt
from gajax.algorithms.core import LossFn, MetaLearner, TaskAux, _adapted_loss, _check, _displacement, _fast

PyTree = Any


def _sq_dist(a, b):
  return sum(jnp.sum(jnp.square(x - y)) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                          jax.tree_util.tree_leaves(b)))


def _check_imaml(inner_steps, inner_lr, lam, cg_steps, cg_tol):
  _check("imaml", inner_steps, inner_lr)
  if inner_steps < 1:
    raise ValueError(f"imaml: inner_steps must be >= 1, got {inner_steps!r}.")
  if (not isinstance(lam, numbers.Real) or isinstance(lam, bool) or not math.isfinite(lam)
      or not lam > 0):
    raise ValueError(f"imaml: lam must be a finite real number > 0, got {lam!r}.")
  if not isinstance(cg_steps, int) or isinstance(cg_steps, bool) or cg_steps < 1:
    raise ValueError(f"imaml: cg_steps must be an int >= 1, got {cg_steps!r}.")
  if (not isinstance(cg_tol, numbers.Real) or isinstance(cg_tol, bool) or not math.isfinite(cg_tol)
      or not cg_tol >= 0):
    raise ValueError(f"imaml: cg_tol must be a finite real number >= 0, got {cg_tol!r}.")


def imaml(loss_fn: LossFn, *, inner_steps: int, inner_lr: float, lam: float, cg_steps: int = 5,
          cg_tol: float = 1e-10, fast_ops: bool = True) -> MetaLearner:
  r"""iMAML (Rajeswaran et al., 2019, "Meta-Learning with Implicit Gradients", NeurIPS; arXiv:1909.04630).

  **Inner problem.** Adaptation is regularised towards the meta-parameters ``theta`` (the paper's
  ``Alg*``, section 3):

  .. math:: \phi^*(\theta) = \arg\min_\phi\ G(\phi, \theta),\quad
            G(\phi, \theta) = L_s(\phi) + \tfrac{\lambda}{2} \lVert \phi - \theta \rVert^2,

  solved approximately by ``inner_steps`` steps of gradient descent at ``inner_lr`` on ``G(., theta)``
  from ``phi_0 = theta``: ``phi <- phi - inner_lr (grad L_s(phi) + lam (phi - theta))``. No gradient
  flows through this loop (``theta`` enters it under ``stop_gradient``).

  **Implicit meta-gradient.** At a stationary point ``grad L_s(phi*) + lam (phi* - theta) = 0``;
  differentiating in ``theta`` gives ``(H + lam I) dphi*/dtheta = lam I``, with ``H = grad^2 L_s(phi*)``,
  i.e. the paper's Lemma 1 (implicit Jacobian)

  .. math:: \frac{d\phi^*}{d\theta} = \Big(I + \tfrac{1}{\lambda} H\Big)^{-1},\qquad
            u = \frac{d L_q(\phi^*(\theta))}{d\theta} = \Big(I + \tfrac{1}{\lambda} H\Big)^{-1}
                \nabla L_q(\phi^*)

  (the Jacobian is symmetric, so no transpose). The update ``u`` is computed at the approximate
  solution ``phi = phi_k`` by ``cg_steps`` iterations of conjugate gradient on
  ``(I + H / lam) u = grad L_q(phi)`` (the paper's Algorithm 2, "Implicit Meta-Gradient
  Computation"), started from ``u = 0``. ``H v`` is a forward-over-reverse Hessian-vector product:
  ``grad L_s`` is linearised once at ``phi`` (``jax.linearize``) and each CG iteration applies the
  linear map, about the cost of one backward pass. CG stops early once the residual is at most
  ``cg_tol * |grad L_q(phi)|`` (``jax.scipy.sparse.linalg.cg``).

  **Non-convex inner losses.** The operator ``v -> v + H v / lam`` is symmetric, and positive definite
  exactly when ``lam > -lambda_min(H)``: always when ``H`` is positive semi-definite, and for a
  non-convex ``L_s`` as long as ``lam`` outweighs the most negative curvature at ``phi`` (then ``phi*``
  is a strict local minimum of ``G`` and the formula above holds locally). Otherwise the operator is
  indefinite or singular, the implicit gradient formula does not describe a minimiser, and CG carries
  no convergence guarantee: the ``cg_steps`` iterations return a Krylov-space iterate that may be
  far from ``(I + H / lam)^{-1} grad L_q`` (and non-finite if a curvature ``p^T A p`` vanishes).
  Raise ``lam`` in that case.

  **Shapes and memory.** The update is shaped like ``params``. Because the inner loop is not
  differentiated, memory does not grow with ``inner_steps``: it is that of one linearisation of
  ``grad L_s`` at ``phi`` plus a few parameter-sized CG vectors, whatever the number of inner steps
  (MAML's backward pass stores every step, see :func:`gajax.algorithms.maml`). The compute is
  ``inner_steps`` gradient evaluations plus ``cg_steps`` Hessian-vector products.

  :class:`TaskAux`: ``displacement = theta - phi``; ``support_loss = L_s(theta)`` (the plain support
  loss; the regulariser is zero at ``theta``); ``query_loss = L_q(phi)``;
  ``adapted_support_loss = L_s(phi)`` (plain, without the regulariser). ``adapt`` runs the same
  regularised inner loop (for evaluation) and returns ``phi`` without a gradient to ``theta``.
  Batch over tasks with :func:`gajax.per_task`; the function is jit- and vmap-able.

  Args:
    loss_fn: ``(params, batch) -> scalar``.
    inner_steps: gradient steps on the regularised objective (an int >= 1).
    inner_lr: their step size (>= 0). Gradient descent on ``G`` converges for
      ``inner_lr < 2 / (lambda_max(H) + lam)``.
    lam: the regularisation strength ``lambda`` (finite, > 0). Large ``lam`` keeps ``phi`` near
      ``theta`` (the update tends to the first-order ``grad L_q(phi)``); small ``lam`` lets ``phi``
      move further and weights the curvature more.
    cg_steps: conjugate-gradient iterations (an int >= 1); the paper uses a handful (about 5).
    cg_tol: relative residual at which CG stops early (>= 0).
  """
  _check_imaml(inner_steps, inner_lr, lam, cg_steps, cg_tol)
  loss_fn = _fast(loss_fn, fast_ops)

  def inner(params, support):
    theta = jax.lax.stop_gradient(params)

    def regularised(p, batch):
      return loss_fn(p, batch) + 0.5 * lam * _sq_dist(p, theta)

    phi, losses = adapt(regularised, theta, support, steps=inner_steps, lr=inner_lr,
                        first_order=True)
    return jax.lax.stop_gradient(phi), jax.lax.stop_gradient(losses)

  def adapt_fn(params, support):
    return inner(params, support)[0]

  def update_fn(params, support, query):
    phi, losses = inner(params, support)
    q_loss, q_grad = jax.value_and_grad(loss_fn)(phi, query)
    _, hvp = jax.linearize(lambda p: jax.grad(loss_fn)(p, support), phi)

    def operator(v):
      return jax.tree_util.tree_map(lambda x, hx: x + hx / lam, v, hvp(v))

    update, _ = jax.scipy.sparse.linalg.cg(operator, q_grad, tol=cg_tol, maxiter=cg_steps)
    # losses[0] = G(theta, theta) = L_s(theta): the regulariser vanishes at the start.
    return update, TaskAux(_displacement(params, phi), losses[0], q_loss,
                           _adapted_loss(loss_fn, phi, support))

  return MetaLearner("imaml", update_fn, adapt_fn)
