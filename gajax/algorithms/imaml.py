"""iMAML (Rajeswaran et al., 2019): meta-gradients from the implicit function theorem."""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import jax.scipy.sparse.linalg
import optax

from gajax.adaptation import adapt, adapt_with_optimizer
from gajax.algorithms.core import LossFn, MetaLearner, TaskAux, _adapted_loss, _check, _displacement, _fast

PyTree = Any


def _sq_dist(a, b):
  return sum(jnp.sum(jnp.square(x - y)) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                          jax.tree_util.tree_leaves(b)))


def _finite_nonneg(value):
  return (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
          and value >= 0)


INNER_LOOPS = ("proximal", "pull_back")


def _check_imaml(inner_steps, inner_lr, lam, cg_steps, cg_tol, cg_damping, inner_optimizer,
                 inner_loop):
  _check("imaml", inner_steps, inner_lr)
  if inner_steps < 1:
    raise ValueError(f"imaml: inner_steps must be >= 1, got {inner_steps!r}.")
  if (not isinstance(lam, numbers.Real) or isinstance(lam, bool) or not math.isfinite(lam)
      or not lam > 0):
    raise ValueError(f"imaml: lam must be a finite real number > 0, got {lam!r}.")
  if not isinstance(cg_steps, int) or isinstance(cg_steps, bool) or cg_steps < 1:
    raise ValueError(f"imaml: cg_steps must be an int >= 1, got {cg_steps!r}.")
  if not _finite_nonneg(cg_tol):
    raise ValueError(f"imaml: cg_tol must be a finite real number >= 0, got {cg_tol!r}.")
  if not _finite_nonneg(cg_damping):
    raise ValueError(f"imaml: cg_damping must be a finite real number >= 0, got {cg_damping!r}.")
  if inner_optimizer is not None and not isinstance(inner_optimizer, optax.GradientTransformation):
    raise TypeError("imaml: inner_optimizer must be an optax.GradientTransformation (e.g. "
                    f"optax.adam(1e-3)) or None, got {type(inner_optimizer).__name__}.")
  if inner_loop not in INNER_LOOPS:
    raise ValueError(f"imaml: inner_loop must be one of {', '.join(INNER_LOOPS)}; got {inner_loop!r}.")
  if (inner_loop == "pull_back" and isinstance(inner_lr, numbers.Real)
      and not inner_lr * lam <= 1):
    raise ValueError(f"imaml: inner_loop='pull_back' moves phi a fraction inner_lr * lam back towards "
                     f"theta, which must be <= 1; got {inner_lr} * {lam} = {inner_lr * lam:g}.")


def implicit_update(loss_fn: LossFn, phi: PyTree, support: PyTree, query: PyTree, *, lam: float,
                    cg_steps: int, cg_tol: float = 1e-10,
                    cg_damping: float = 0.0) -> tuple[PyTree, jax.Array]:
  """iMAML's meta-gradient at the adapted parameters ``phi``: ``cg_steps`` CG iterations on
  ``(I + (H + cg_damping I) / lam) u = grad L_q(phi)``, ``H`` the support loss's Hessian at ``phi``
  (:func:`imaml` gives the math). Returns ``(u, L_q(phi))``; arguments as :func:`imaml`'s, unchecked.
  """
  q_loss, q_grad = jax.value_and_grad(loss_fn)(phi, query)
  _, hvp = jax.linearize(lambda p: jax.grad(loss_fn)(p, support), phi)

  def operator(v):
    # (1 + mu / lam) v + H v / lam, written so that mu = 0 is the undamped operator exactly.
    return jax.tree_util.tree_map(lambda x, hx: x + (hx + cg_damping * x) / lam, v, hvp(v))

  update, _ = jax.scipy.sparse.linalg.cg(operator, q_grad, tol=cg_tol, maxiter=cg_steps)
  return update, q_loss


def inner_loop_solution(loss_fn: LossFn, theta: PyTree, support: PyTree, *, inner_steps: int,
                        inner_lr: float, lam: float, inner_loop: str = "proximal",
                        inner_optimizer: optax.GradientTransformation | None = None,
                        first_order: bool = True) -> tuple[PyTree, jax.Array]:
  """iMAML's inner loop from ``theta`` (:func:`imaml` gives both ``inner_loop`` variants): returns
  ``(phi, losses)``, ``losses[s]`` the objective at step ``s`` (``losses[0] = L_s(theta)``). With
  ``first_order=False`` (and no ``inner_optimizer``) it is differentiable in ``theta`` through every
  step, as :func:`gajax.diagnostics.unrolled_imaml_gradient` needs; arguments unchecked.
  """
  def regularised(p, batch):
    return loss_fn(p, batch) + 0.5 * lam * _sq_dist(p, theta)

  objective = regularised if inner_loop == "proximal" else loss_fn
  if inner_optimizer is None:
    phi, losses = adapt(objective, theta, support, steps=inner_steps, lr=inner_lr,
                        first_order=first_order)
  else:
    phi, losses = adapt_with_optimizer(objective, theta, support, steps=inner_steps,
                                       optimizer=inner_optimizer)
  if inner_loop == "pull_back":
    phi = jax.tree_util.tree_map(lambda p, t: p - (inner_lr * lam) * (p - t), phi, theta)
  return phi, losses


def imaml(loss_fn: LossFn, *, inner_steps: int, inner_lr: float, lam: float, cg_steps: int = 5,
          cg_tol: float = 1e-10, cg_damping: float = 0.0,
          inner_optimizer: optax.GradientTransformation | None = None,
          inner_loop: str = "proximal", fast_ops: bool = True) -> MetaLearner:
  r"""iMAML (Rajeswaran et al., 2019, "Meta-Learning with Implicit Gradients", NeurIPS; arXiv:1909.04630).

  **Inner problem.** Adaptation is regularised towards the meta-parameters ``theta`` (the paper's
  ``Alg*``, section 3):

  .. math:: \phi^*(\theta) = \arg\min_\phi\ G(\phi, \theta),\quad
            G(\phi, \theta) = L_s(\phi) + \tfrac{\lambda}{2} \lVert \phi - \theta \rVert^2,

  solved approximately by ``inner_steps`` steps of gradient descent at ``inner_lr`` on ``G(., theta)``
  from ``phi_0 = theta``: ``phi <- phi - inner_lr (grad L_s(phi) + lam (phi - theta))``, or by
  ``inner_steps`` steps of any optax ``inner_optimizer`` on ``G(., theta)`` (the paper's point: the
  implicit gradient needs only an approximate minimiser, not how it was found). No gradient flows
  through this loop (``theta`` enters it under ``stop_gradient``).

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
  Raise ``lam``, or damp the solve, in that case.

  **Damping** (``cg_damping = mu >= 0``). CG then solves ``(I + (H + mu I) / lam) u = grad L_q(phi)``:
  the Hessian is shifted by ``mu I`` (Levenberg-Marquardt damping), which makes the operator positive
  definite once ``mu > -lambda_min(H) - lam`` and shrinks ``u`` towards the first-order
  ``grad L_q(phi) / (1 + mu / lam)`` as ``mu`` grows. ``mu = 0`` is the paper's formula. The authors'
  released Omniglot code (``imaml_dev``) solves ``((1 + d) I + H / (lam + lam_d)) u = g`` with
  ``d = 1``, ``lam_d = 10``: that is ``lam / (lam + lam_d)`` times this operator with
  ``mu = (1 + d)(lam + lam_d) - lam`` (22 at ``lam = 2``), so its ``u`` is this one's times
  ``(lam + lam_d) / lam``, a constant factor that Adam's normalisation all but removes.

  **The authors' inner loop** (``inner_loop="pull_back"``). The released Omniglot code (``imaml_dev``,
  ``examples/omniglot_implicit_maml.py``) does not minimise ``G``: it runs ``inner_steps`` steps of
  the inner optimiser on the plain support loss ``L_s`` from ``theta``, then one gradient step on
  the regulariser alone at ``inner_lr``, ``phi <- phi - inner_lr lam (phi - theta)``: ``phi`` is
  pulled a fraction ``inner_lr lam`` (0.2 in their Omniglot command) of the way back to ``theta``.
  The update is then computed at that ``phi`` exactly as above (the formula no longer describes a
  stationary point of ``G``: it is the heuristic their results were obtained with). Their
  evaluation adapts with ``lam = 0``, i.e. plain steps and no pull-back (``scripts/evaluate.py
  --plain_adaptation``); ``adapt`` here runs the training inner loop, pull-back included.

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
    cg_damping: ``mu >= 0``, the shift of the Hessian in the CG operator (above); 0 is undamped.
    inner_optimizer: an optax transformation that minimises ``G`` in the inner loop (its own
      learning rate; ``inner_lr`` is then unused), e.g. ``optax.adam(1e-2)``; ``None`` (the
      default): gradient descent at ``inner_lr``. Its state starts fresh for every task.
    inner_loop: ``"proximal"`` (the paper: the inner steps minimise ``G``) or ``"pull_back"`` (the
      authors' code: the steps minimise ``L_s``, then one step of ``inner_lr * lam`` back towards
      ``theta``; needs ``inner_lr * lam <= 1``, and uses ``inner_lr`` for the pull-back even with an
      ``inner_optimizer``).
  """
  _check_imaml(inner_steps, inner_lr, lam, cg_steps, cg_tol, cg_damping, inner_optimizer,
               inner_loop)
  loss_fn = _fast(loss_fn, fast_ops)

  def inner(params, support):
    phi, losses = inner_loop_solution(loss_fn, jax.lax.stop_gradient(params), support,
                                      inner_steps=inner_steps, inner_lr=inner_lr, lam=lam,
                                      inner_loop=inner_loop, inner_optimizer=inner_optimizer)
    return jax.lax.stop_gradient(phi), jax.lax.stop_gradient(losses)

  def adapt_fn(params, support):
    return inner(params, support)[0]

  def update_fn(params, support, query):
    phi, losses = inner(params, support)
    update, q_loss = implicit_update(loss_fn, phi, support, query, lam=lam, cg_steps=cg_steps,
                                     cg_tol=cg_tol, cg_damping=cg_damping)
    # losses[0] = L_s(theta) under both inner loops (G's regulariser vanishes at the start).
    return update, TaskAux(_displacement(params, phi), losses[0], q_loss,
                           _adapted_loss(loss_fn, phi, support))

  return MetaLearner("imaml", update_fn, adapt_fn)
