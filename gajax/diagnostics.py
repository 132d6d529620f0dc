"""Is the inner loop stable? The support loss's curvature against the inner step size; and is
iMAML's implicit meta-gradient the gradient it stands for?

Gradient descent with step ``alpha`` on a loss whose Hessian has largest eigenvalue ``lambda_max``
can only decrease the loss along that direction while ``alpha < 2 / lambda_max`` (the classical
stability limit of gradient descent on a quadratic). Past it the inner loop of MAML, FOMAML or
Reptile oscillates or diverges and *raises* the task's support loss, and the meta-gradients of such
tasks are large and erratic. These functions measure both for one task and for a meta-batch.

iMAML (:func:`gajax.algorithms.imaml`) replaces the gradient through its inner loop by the implicit
formula ``(I + H / lam)^{-1} grad L_q``, which holds at a strict minimiser of the regularised inner
problem, i.e. while ``lambda_min(H) > -lam``. :func:`implicit_gradient_report` sets the update beside
the gradient differentiated through the same inner loop, with ``H``'s extreme eigenvalues.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.flatten_util
import jax.numpy as jnp
from optax.tree_utils import tree_vdot

from gajax.adaptation import adapt
from gajax.algorithms.imaml import imaml, implicit_update, inner_loop_solution
from gajax.fast_ops import batchable

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]


class InnerLoopReport(NamedTuple):
  """Per-task stability figures; every field has a leading task axis ``[T]``.

  Attributes:
    lambda_max: the largest-magnitude eigenvalue of the support loss's Hessian at the start.
    support_loss: the support loss before adaptation.
    adapted_support_loss: the support loss after the inner loop.
  """
  lambda_max: jax.Array
  support_loss: jax.Array
  adapted_support_loss: jax.Array


def hvp(loss_fn: LossFn, params: PyTree, batch: PyTree, vector: PyTree) -> PyTree:
  """The Hessian-vector product ``H v`` of ``loss_fn(., batch)`` at ``params`` (forward over reverse)."""
  grad_fn = jax.grad(loss_fn)
  return jax.jvp(lambda p: grad_fn(p, batch), (params,), (vector,))[1]


def top_hessian_eigenvalue(loss_fn: LossFn, params: PyTree, batch: PyTree, key: jax.Array, *,
                           iters: int = 30) -> jax.Array:
  r"""The largest-magnitude eigenvalue of ``\nabla^2 loss_fn(params, batch)``, by power iteration.

  ``iters`` Hessian-vector products from a random unit start; returns the Rayleigh quotient
  ``v^T H v`` of the last iterate (float32 scalar). It converges at the rate of the ratio of the two
  largest eigenvalue magnitudes; 30 iterations are ample for the small models here, and a test
  checks it against the eigenvalues of the dense Hessian.
  """
  if iters < 1:
    raise ValueError(f"top_hessian_eigenvalue: iters must be >= 1, got {iters}.")
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(key, len(leaves))
  start = jax.tree_util.tree_unflatten(
      treedef, [jax.random.normal(k, jnp.shape(x), jnp.result_type(x)) for k, x in zip(keys, leaves)])

  def normalise(v):
    norm = jnp.sqrt(sum(jnp.vdot(x, x) for x in jax.tree_util.tree_leaves(v)))
    return jax.tree_util.tree_map(lambda x: x / jnp.where(norm > 0, norm, 1.0), v)

  v = jax.lax.fori_loop(0, iters, lambda _, v: normalise(hvp(loss_fn, params, batch, v)),
                        normalise(start))
  return tree_vdot(v, hvp(loss_fn, params, batch, v))


def hessian_eigenvalue_range(loss_fn: LossFn, params: PyTree, batch: PyTree, key: jax.Array, *,
                             iters: int = 30) -> tuple[jax.Array, jax.Array]:
  """``(lambda_min, lambda_max)`` of the Hessian of ``loss_fn(., batch)`` at ``params``, by Lanczos.

  ``iters`` Hessian-vector products from a random unit start build an orthonormal Krylov basis
  (fully re-orthogonalised, so float32 round-off does not create ghost eigenvalues, and restarted
  from a fresh direction if the space becomes invariant); the extreme
  eigenvalues of the projected tridiagonal matrix (Ritz values) converge to the Hessian's extremes
  much faster than power iteration does on a crowded spectrum. Ritz values lie inside the spectrum
  (up to round-off: in float32 the breakdown test, ``1e3 eps |Hv|``, can drop a coupling of about
  1e-4 of ``|Hv|``): the returned ``lambda_min`` is an estimate from above and ``lambda_max`` one
  from below, each exact once ``iters`` reaches the number of parameters. A test checks both against a dense
  eigendecomposition. Memory: ``iters + 1`` parameter-sized vectors.
  """
  if iters < 1:
    raise ValueError(f"hessian_eigenvalue_range: iters must be >= 1, got {iters}.")
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  iters = min(iters, flat.size)
  apply = lambda v: jax.flatten_util.ravel_pytree(hvp(loss_fn, params, batch, unravel(v)))[0]
  start = jax.random.normal(key, flat.shape, flat.dtype)
  basis = jnp.zeros((iters + 1,) + flat.shape, flat.dtype).at[0].set(start / jnp.linalg.norm(start))

  def project_out(basis, w):
    # Rows past the current one are still zero, so this removes exactly the basis built so far
    # (twice, for orthogonality to working precision).
    w = w - basis.T @ (basis @ w)
    return w - basis.T @ (basis @ w)

  def body(i, carry):
    basis, alphas, betas = carry
    hv = apply(basis[i])
    alphas = alphas.at[i].set(jnp.vdot(hv, basis[i]))
    w = project_out(basis, hv)
    beta = jnp.linalg.norm(w)
    # Breakdown: the Krylov space is invariant (w is round-off). Continue from a fresh random
    # direction orthogonal to it, with a zero coupling, so the tridiagonal matrix splits into blocks
    # whose eigenvalues are all eigenvalues of H (normalising round-off would create ghosts).
    broken = beta <= 1e3 * jnp.finfo(flat.dtype).eps * (jnp.linalg.norm(hv) + 1e-30)
    fresh = project_out(basis, jax.random.normal(jax.random.fold_in(key, i), flat.shape, flat.dtype))
    w, beta = jnp.where(broken, fresh, w), jnp.where(broken, 0.0, beta)
    betas = betas.at[i].set(beta)
    basis = basis.at[i + 1].set(w / jnp.linalg.norm(w))
    return basis, alphas, betas

  zeros = jnp.zeros((iters,), flat.dtype)
  _, alphas, betas = jax.lax.fori_loop(0, iters, body, (basis, zeros, zeros))
  tridiagonal = jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)
  ritz = jnp.linalg.eigvalsh(tridiagonal)
  return ritz[0], ritz[-1]


def inner_loop_report(loss_fn: LossFn, params: PyTree, supports: PyTree, key: jax.Array, *,
                      inner_lr: float, inner_steps: int, iters: int = 30) -> InnerLoopReport:
  """:class:`InnerLoopReport` of every task of a meta-batch (support leaves ``[T, ...]``).

  Compare ``lambda_max`` with ``2 / inner_lr``; ``adapted_support_loss > support_loss`` marks a task
  whose ``inner_steps`` plain gradient steps at ``inner_lr`` made its own support loss worse.
  """
  num_tasks = jax.tree_util.tree_leaves(supports)[0].shape[0]

  def one(support, k):
    lam = top_hessian_eigenvalue(loss_fn, params, support, k, iters=iters)
    adapted, _ = adapt(loss_fn, params, support, steps=inner_steps, lr=inner_lr, first_order=True)
    return lam, loss_fn(params, support), loss_fn(adapted, support)

  lam, before, after = jax.vmap(one)(supports, jax.random.split(key, num_tasks))
  return InnerLoopReport(lam, before, after)


class ImplicitGradientReport(NamedTuple):
  """Figures of :func:`implicit_gradient_report` for ``T`` tasks and ``S`` CG settings.

  Attributes:
    cosine: ``[S, T]``, cosine between iMAML's update and the unrolled meta-gradient.
    norm_ratio: ``[S, T]``, ``|update| / |unrolled|``.
    lambda_min: ``[T]``, the support loss Hessian's smallest eigenvalue at the adapted parameters
      (Lanczos, :func:`hessian_eigenvalue_range`: an estimate from above); below ``-(lam + mu)``
      the CG operator with damping ``mu`` is indefinite and the implicit formula describes no
      minimiser.
    lambda_max: ``[T]``, its largest eigenvalue there (an estimate from below).
  """
  cosine: jax.Array
  norm_ratio: jax.Array
  lambda_min: jax.Array
  lambda_max: jax.Array


def unrolled_imaml_gradient(loss_fn: LossFn, params: PyTree, support: PyTree, query: PyTree, *,
                            inner_steps: int, inner_lr: float, lam: float,
                            inner_loop: str = "proximal") -> PyTree:
  r"""``d/dtheta L_q(phi_k(theta))`` through the ``inner_steps`` steps of gradient descent on
  ``L_s(phi) + lam/2 |phi - theta|^2`` from ``theta`` (reverse mode through the loop, as MAML's):
  the exact gradient of what iMAML's default inner loop computes, which the implicit formula
  approximates. ``inner_loop="pull_back"``: through the authors' loop instead (the steps on
  ``L_s`` alone, then ``phi <- phi - inner_lr lam (phi - theta)``; :func:`gajax.algorithms.imaml`).
  """
  def objective(theta):
    phi, _ = inner_loop_solution(loss_fn, theta, support, inner_steps=inner_steps,
                                 inner_lr=inner_lr, lam=lam, inner_loop=inner_loop,
                                 first_order=False)
    return loss_fn(phi, query)

  return jax.grad(objective)(params)


def implicit_gradient_report(loss_fn: LossFn, params: PyTree, supports: PyTree, queries: PyTree,
                             key: jax.Array, *, inner_steps: int, inner_lr: float, lam: float,
                             cg_settings: Sequence[tuple[int, float]] = ((5, 0.0),),
                             iters: int = 30, inner_loop: str = "proximal") -> ImplicitGradientReport:
  """iMAML's update against :func:`unrolled_imaml_gradient` for every task of a meta-batch.

  ``supports`` / ``queries`` have a leading task axis ``[T]``; ``cg_settings`` lists
  ``(cg_steps, cg_damping)`` pairs, each giving one row of the cosines and norm ratios (the unrolled
  gradient and the eigenvalues are computed once). iMAML's inner loop is gradient descent at
  ``inner_lr`` here, the loop the unrolled gradient differentiates. A cosine near 1 says the
  implicit formula stands for the gradient of the inner loop that ran; a low or negative one with
  ``lambda_min < -lam`` points at the indefinite CG operator (damp it: ``cg_damping``).
  ``inner_loop`` is iMAML's (``"proximal"`` or the authors' ``"pull_back"``), for both the update
  and the unrolled gradient.
  """
  if not cg_settings:
    raise ValueError("implicit_gradient_report: cg_settings must list at least one "
                     "(cg_steps, cg_damping) pair.")
  # Convolutions and max-pools in the forms that batch well over the per-task adapted parameters.
  loss_fn = batchable(loss_fn)
  learner = imaml(loss_fn, inner_steps=inner_steps, inner_lr=inner_lr, lam=lam, fast_ops=False,
                  inner_loop=inner_loop)
  num_tasks = jax.tree_util.tree_leaves(supports)[0].shape[0]

  def one(support, query, k):
    unrolled = unrolled_imaml_gradient(loss_fn, params, support, query, inner_steps=inner_steps,
                                       inner_lr=inner_lr, lam=lam, inner_loop=inner_loop)
    norm_r = jnp.sqrt(tree_vdot(unrolled, unrolled))
    phi = learner.adapt(params, support)  # once: the CG settings share the inner loop
    cosines, ratios = [], []
    for steps, mu in cg_settings:
      update, _ = implicit_update(loss_fn, phi, support, query, lam=lam, cg_steps=steps,
                                  cg_damping=mu)
      norm_u = jnp.sqrt(tree_vdot(update, update))
      cosines.append(tree_vdot(update, unrolled) / (norm_u * norm_r))
      ratios.append(norm_u / norm_r)
    return (jnp.stack(cosines), jnp.stack(ratios),
            *hessian_eigenvalue_range(loss_fn, phi, support, k, iters=iters))

  cosine, ratio, low, high = jax.vmap(one)(supports, queries, jax.random.split(key, num_tasks))
  return ImplicitGradientReport(cosine.T, ratio.T, low, high)
