"""The inner loop: ``k`` gradient steps on one task's support data, unrolled with ``lax.scan``."""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]


def adapt(loss_fn: LossFn, params: PyTree, batch: PyTree, *, steps: int,
          lr: float | jax.Array | PyTree, first_order: bool = False,
          remat: bool = False) -> tuple[PyTree, jax.Array]:
  r"""Runs ``steps`` steps of gradient descent ``theta <- theta - lr * grad loss_fn(theta, batch)``.

  The loop is a ``lax.scan``, so differentiating through it gives MAML's full second-order
  meta-gradient (Finn et al., 2017, eq. 1 iterated). With ``first_order=True`` each inner gradient
  is wrapped in ``stop_gradient``, so ``d theta_k / d theta_0 = I`` and the meta-gradient becomes
  first-order MAML's: the query gradient at the adapted parameters.

  Args:
    loss_fn: ``(params, batch) -> scalar``.
    params: the starting parameters ``theta_0``.
    batch: the task's support data, handed to ``loss_fn`` unchanged.
    steps: number of inner steps ``k >= 0`` (a Python int).
    lr: the inner learning rate: a scalar, or a pytree shaped like ``params`` holding per-parameter
      rates (Meta-SGD, Li et al., 2017).
    first_order: drop the second-order terms.
    remat: bound the memory of differentiating through the loop (gradient checkpointing). Plain
      reverse mode keeps every step's activations, so memory grows linearly with ``steps``. With
      ``remat=True`` the ``k`` steps run as ``ceil(k / b)`` blocks of ``b = ceil(sqrt(k))`` steps, each
      block under ``jax.checkpoint``: the backward pass stores only the parameters at block
      boundaries and recomputes one block at a time, so memory grows like ``sqrt(k)`` (parameters at
      ``k / b`` boundaries plus one block's activations) for about one extra forward pass of the
      loop. The values and gradients are those of the plain loop (the same operations, recomputed).

  Returns:
    ``(theta_k, losses)`` where ``losses[s] = loss_fn(theta_s, batch)``, shape ``[steps]``.
  """
  if steps < 0:
    raise ValueError(f"adapt: steps must be >= 0, got {steps}.")
  scalar_lr = jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(lr)) and jnp.ndim(lr) == 0
  if not scalar_lr and jax.tree_util.tree_structure(lr) != jax.tree_util.tree_structure(params):
    raise ValueError("adapt: lr must be a scalar or a pytree with the structure of params, got "
                     f"{jax.tree_util.tree_structure(lr)} for params {jax.tree_util.tree_structure(params)}.")
  grad_fn = jax.value_and_grad(loss_fn)

  def step(p, _):
    loss, grads = grad_fn(p, batch)
    if first_order:
      grads = jax.lax.stop_gradient(grads)
    if scalar_lr:
      p = jax.tree_util.tree_map(lambda w, g: w - lr * g, p, grads)
    else:
      p = jax.tree_util.tree_map(lambda w, g, a: w - a * g, p, grads, lr)
    return p, loss

  if steps == 0:
    return params, jnp.zeros((0,), jnp.float32)
  return checkpointed_scan(step, params, None, steps, remat=remat)


def adapt_with_optimizer(loss_fn: LossFn, params: PyTree, batch: PyTree, *, steps: int,
                         optimizer: optax.GradientTransformation) -> tuple[PyTree, jax.Array]:
  """``steps`` steps of an optax ``optimizer`` on ``loss_fn(., batch)`` from ``params`` (its state
  starts fresh); like :func:`adapt`, returns ``(theta_k, losses)`` with ``losses[s]`` the loss at
  ``theta_s``, shape ``[steps]``. Meant for inner loops that are not differentiated (iMAML's).
  """
  if steps < 1:
    raise ValueError(f"adapt_with_optimizer: steps must be >= 1, got {steps}.")
  grad_fn = jax.value_and_grad(loss_fn)

  def step(carry, _):
    p, state = carry
    loss, grads = grad_fn(p, batch)
    updates, state = optimizer.update(grads, state, p)
    return (optax.apply_updates(p, updates), state), loss

  (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), None, length=steps)
  return params, losses


def checkpointed_scan(step, carry, xs, length: int, *, remat: bool):
  """``jax.lax.scan(step, carry, xs, length=length)``, with the memory of its backward pass bounded.

  With ``remat`` the ``length`` steps run as ``ceil(length / b)`` blocks of ``b = ceil(sqrt(length))``
  steps, each block under ``jax.checkpoint``: differentiating stores the carry at block boundaries
  only and recomputes one block at a time (memory ~ ``sqrt(length)``, about one more forward pass).
  The result is the plain scan's. ``xs`` leaves (or ``None``) have a leading axis ``length``;
  ``length >= 1``.
  """
  if not remat:
    return jax.lax.scan(step, carry, xs, length=length)
  block = math.ceil(math.sqrt(length))
  full, rest = divmod(length, block)
  run_block = jax.checkpoint(lambda c, x, n: jax.lax.scan(step, c, x, length=n), static_argnums=(2,))
  head = None if xs is None else jax.tree_util.tree_map(
      lambda r: jnp.reshape(r[:full * block], (full, block) + r.shape[1:]), xs)
  carry, out = jax.lax.scan(lambda c, x: run_block(c, x, block), carry, head, length=full)
  out = jax.tree_util.tree_map(lambda o: jnp.reshape(o, (full * block,) + o.shape[2:]), out)
  if rest:
    tail = None if xs is None else jax.tree_util.tree_map(lambda r: r[full * block:], xs)
    carry, out_tail = run_block(carry, tail, rest)
    out = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), out, out_tail)
  return carry, out
