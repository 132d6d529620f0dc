"""MAML (Finn et al., 2017), its first-order variant, and Meta-SGD (Li et al., 2017)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gajax.adaptation import adapt
from gajax.algorithms.core import (LossFn, MetaLearner, TaskAux, _adapted_loss, _check, _displacement, _fast,
                                   _support_loss)

PyTree = Any


class MetaSGDParams(NamedTuple):
  """Meta-SGD's meta-parameters (Li et al., 2017): the initialisation and per-parameter inner rates."""
  params: PyTree
  inner_lr: PyTree


def maml(loss_fn: LossFn, *, inner_steps: int, inner_lr: float,
         first_order: bool = False, remat: bool = False, fast_ops: bool = True) -> MetaLearner:
  r"""MAML (Finn et al., 2017): the meta-gradient of the query loss after ``inner_steps`` steps.

  .. math:: u(\theta) = \nabla_\theta\, L_{query}(\theta_k(\theta)),\quad
            \theta_{s+1} = \theta_s - \alpha \nabla L_{support}(\theta_s),\ \theta_0 = \theta.

  The gradient flows through every inner step (true second order, via ``lax.scan``). With
  ``first_order=True`` this is FOMAML: ``u = \nabla L_{query}(\theta_k)``, the Hessian-vector terms
  dropped. ``remat=True`` checkpoints the inner loop in blocks of ``sqrt(k)`` steps, so the memory of
  the second-order backward pass grows like ``sqrt(k)`` instead of ``k``, for about one more forward
  pass of the loop (see :func:`gajax.adaptation.adapt`); the update is the same.
  """
  _check("maml", inner_steps, inner_lr)
  loss_fn = _fast(loss_fn, fast_ops)

  def adapt_fn(params, support):
    return adapt(loss_fn, params, support, steps=inner_steps, lr=inner_lr,
                 first_order=first_order)[0]

  def update_fn(params, support, query):

    def outer(p):
      adapted, losses = adapt(loss_fn, p, support, steps=inner_steps, lr=inner_lr,
                              first_order=first_order, remat=remat)
      return loss_fn(adapted, query), (adapted, losses)

    (q_loss, (adapted, losses)), grads = jax.value_and_grad(outer, has_aux=True)(params)
    s_loss = _support_loss(losses, loss_fn, params, support)
    return grads, TaskAux(_displacement(params, adapted), s_loss, q_loss,
                          _adapted_loss(loss_fn, adapted, support))

  return MetaLearner("fomaml" if first_order else "maml", update_fn, adapt_fn)


def fomaml(loss_fn: LossFn, *, inner_steps: int, inner_lr: float, fast_ops: bool = True) -> MetaLearner:
  """First-order MAML: :func:`maml` with ``first_order=True``."""
  return maml(loss_fn, inner_steps=inner_steps, inner_lr=inner_lr, first_order=True, fast_ops=fast_ops)


def meta_sgd(loss_fn: LossFn, *, inner_steps: int = 1, first_order: bool = False,
             remat: bool = False, fast_ops: bool = True) -> MetaLearner:
  r"""Meta-SGD (Li et al., 2017): MAML with per-parameter inner learning rates learned in the outer loop.

  Meta-parameters are :class:`MetaSGDParams` ``(theta, alpha)`` with ``alpha`` shaped like ``theta``
  (make them with :func:`meta_sgd_init`). The inner step is ``theta <- theta - alpha * grad`` (elementwise)
  and the update is the gradient of the query loss w.r.t. both ``theta`` and ``alpha``:
  ``d L_q / d alpha = -grad L_q(theta_1) * grad L_s(theta)`` for one step. ``adapt`` returns model
  parameters only. ``remat`` bounds the memory of the backward pass as in :func:`maml`.
  """
  _check("meta_sgd", inner_steps)
  loss_fn = _fast(loss_fn, fast_ops)

  def adapt_fn(meta_params, support):
    return adapt(loss_fn, meta_params.params, support, steps=inner_steps,
                 lr=meta_params.inner_lr, first_order=first_order)[0]

  def update_fn(meta_params, support, query):

    def outer(mp):
      adapted, losses = adapt(loss_fn, mp.params, support, steps=inner_steps, lr=mp.inner_lr,
                              first_order=first_order, remat=remat)
      return loss_fn(adapted, query), (adapted, losses)

    (q_loss, (adapted, losses)), grads = jax.value_and_grad(outer, has_aux=True)(meta_params)
    s_loss = _support_loss(losses, loss_fn, meta_params.params, support)
    return grads, TaskAux(_displacement(meta_params.params, adapted), s_loss, q_loss,
                          _adapted_loss(loss_fn, adapted, support))

  return MetaLearner("metasgd", update_fn, adapt_fn)


def meta_sgd_init(params: PyTree, inner_lr: float) -> MetaSGDParams:
  """Meta-SGD meta-parameters with every inner rate set to ``inner_lr`` (in the parameters' dtype)."""
  return MetaSGDParams(params, jax.tree_util.tree_map(lambda p: jnp.full_like(p, inner_lr), params))
