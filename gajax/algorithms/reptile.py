"""Reptile (Nichol et al., 2018): the update is the inner-loop displacement."""

from __future__ import annotations

from typing import Any

import jax

from gajax.adaptation import adapt
from gajax.algorithms.core import LossFn, MetaLearner, TaskAux, _adapted_loss, _check, _displacement, _fast

PyTree = Any


def reptile(loss_fn: LossFn, *, inner_steps: int, inner_lr: float,
            fast_ops: bool = True) -> MetaLearner:
  r"""Reptile (Nichol et al., 2018): the update is the inner-loop displacement ``theta - theta_k``.

  The inner loop runs plain SGD on the *support* data only; the query data never joins it. The query
  is used only to report the post-adaptation loss in :class:`TaskAux` (an extra forward pass, outside
  the gradient). Descending along ``u = theta - theta_k`` with step ``beta`` gives Reptile's
  ``theta <- theta + beta (theta_k - theta)``.
  """
  _check("reptile", inner_steps, inner_lr)
  loss_fn = _fast(loss_fn, fast_ops)
  if inner_steps == 0:
    raise ValueError("reptile: inner_steps must be >= 1 (with 0 the update is always zero).")

  def adapt_fn(params, support):
    return adapt(loss_fn, params, support, steps=inner_steps, lr=inner_lr, first_order=True)[0]

  def update_fn(params, support, query):
    adapted, losses = adapt(loss_fn, params, support, steps=inner_steps, lr=inner_lr,
                            first_order=True)
    disp = _displacement(params, adapted)
    q_loss = jax.lax.stop_gradient(loss_fn(adapted, query))
    return disp, TaskAux(disp, losses[0], q_loss, _adapted_loss(loss_fn, adapted, support))

  return MetaLearner("reptile", update_fn, adapt_fn)
