"""Is the inner loop stable? The support loss's curvature against the inner step size.

Gradient descent with step ``alpha`` on a loss whose Hessian has largest eigenvalue ``lambda_max``
can only decrease the loss along that direction while ``alpha < 2 / lambda_max`` (the classical
stability limit of gradient descent on a quadratic). Past it the inner loop of MAML, FOMAML or
Reptile oscillates or diverges and *raises* the task's support loss, and the meta-gradients of such
tasks are large and erratic. These functions measure both for one task and for a meta-batch.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from gajax.adaptation import adapt

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

  def body(_, v):
    return normalise(hvp(loss_fn, params, batch, v))

  v = jax.lax.fori_loop(0, iters, body, normalise(start))
  hv = hvp(loss_fn, params, batch, v)
  return sum(jnp.vdot(a, b) for a, b in zip(jax.tree_util.tree_leaves(v), jax.tree_util.tree_leaves(hv)))


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
