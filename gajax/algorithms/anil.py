"""ANIL (Raghu et al., 2020): MAML whose inner loop adapts only the head, the body meta-learned only."""

from __future__ import annotations

from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import numpy as np

from gajax.adaptation import adapt as adapt_loop
from gajax.algorithms.core import (LossFn, MetaLearner, TaskAux, _adapted_loss, _check, _displacement, _fast,
                                   _support_loss)

PyTree = Any
Mask = Union[PyTree, Callable[[PyTree], PyTree]]


def partition(tree: PyTree, mask: PyTree) -> tuple[PyTree, PyTree]:
  """Splits ``tree`` by a bool ``mask`` of the same structure into ``(selected, rest)``.

  ``selected`` keeps the leaves where ``mask`` is True and holds ``None`` elsewhere; ``rest`` is the
  complement. ``None`` is an empty pytree to JAX, so both halves go through ``jax.grad``,
  ``lax.scan`` and ``tree_map`` carrying only their own leaves. :func:`combine` undoes the split.
  """
  selected = jax.tree_util.tree_map(lambda m, x: x if m else None, mask, tree)
  rest = jax.tree_util.tree_map(lambda m, x: None if m else x, mask, tree)
  return selected, rest


def combine(selected: PyTree, rest: PyTree) -> PyTree:
  """The inverse of :func:`partition`: each leaf from ``selected``, or from ``rest`` where it is ``None``."""
  return jax.tree_util.tree_map(lambda s, r: r if s is None else s, selected, rest,
                                is_leaf=lambda x: x is None)


def _check_mask_leaves(mask, what: str = "anil: adapt", hint: str = "mark the head's leaves True"):
  leaves = jax.tree_util.tree_flatten_with_path(mask)[0]
  for path, leaf in leaves:
    if not isinstance(leaf, (bool, np.bool_)):
      raise ValueError(f"{what} must be a pytree of Python bools (or a callable returning one); "
                       f"leaf {jax.tree_util.keystr(path)} is {leaf!r} of type {type(leaf).__name__}.")
  if not any(bool(leaf) for _, leaf in leaves):
    raise ValueError(f"{what} selects no parameter (every leaf is False); {hint}.")


def _resolve_mask(adapt, params):
  """The bool mask for ``params``: ``adapt(params)`` if callable, else ``adapt``, validated."""
  mask = adapt(params) if callable(adapt) else adapt
  want, got = jax.tree_util.tree_structure(params), jax.tree_util.tree_structure(mask)
  if got != want:
    raise ValueError(f"anil: adapt must have the structure of params, got mask {got} for params {want}.")
  _check_mask_leaves(mask)
  return mask


def _inner_lr(inner_lr, params, mask):
  """A scalar rate unchanged; a per-parameter rate pytree cut down to the adapted leaves."""
  structure = jax.tree_util.tree_structure(inner_lr)
  if jax.tree_util.treedef_is_leaf(structure) and jnp.ndim(inner_lr) == 0:
    return inner_lr
  if structure != jax.tree_util.tree_structure(params):
    raise ValueError(f"anil: inner_lr must be a scalar or a pytree with the structure of params, got "
                     f"{structure} for params {jax.tree_util.tree_structure(params)}.")
  return partition(inner_lr, mask)[0]


def anil(loss_fn: LossFn, *, inner_steps: int, inner_lr: float | PyTree, adapt: Mask,
         first_order: bool = False, remat: bool = False, fast_ops: bool = True) -> MetaLearner:
  r"""ANIL, "Almost No Inner Loop" (Raghu et al., 2020, "Rapid Learning or Feature Reuse?").

  The parameters split into a head ``theta_head`` (the leaves ``adapt`` marks True) and a body
  ``theta_body`` (the rest). Only the head is adapted in the inner loop; the body is shared by all
  tasks and learned by the outer loop alone:

  .. math:: u(\theta) = \nabla_\theta\, L_{query}(\theta_{body}, \phi_k(\theta)),\quad
            \phi_{s+1} = \phi_s - \alpha \nabla_\phi L_{support}(\theta_{body}, \phi_s),\
            \phi_0 = \theta_{head}.

  The inner gradients are taken w.r.t. ``phi`` only, so the inner loop never backpropagates into
  the body (the saving ANIL is about). The meta-gradient ``u`` is w.r.t. all of ``theta``: the
  head's part is MAML's second-order gradient through the inner loop, and the body's part includes
  both the direct term and the inner loop's dependence on the body (through
  ``\nabla_\phi L_{support}(\theta_{body}, \cdot)``). ``first_order=True`` stops the inner gradients
  (FO-ANIL): then ``u_{head} = \nabla_\phi L_q`` and ``u_{body} = \partial_{\theta_{body}} L_q`` at
  ``(\theta_{body}, \phi_k)``. ``remat`` bounds the backward pass's memory as in :func:`maml`.
  With every leaf selected ANIL is MAML; with a head mask it is MAML with inner rate 0 on the body.

  Args:
    loss_fn: ``(params, batch) -> scalar``, on the full parameters.
    inner_steps: inner steps ``k >= 0``.
    inner_lr: ``alpha``, a scalar, or a pytree with the structure of params (per-parameter rates;
      the body's entries are unused).
    adapt: which leaves the inner loop adapts: a pytree of Python bools with the structure of
      params (True = head), or a callable ``params -> such a mask`` (the ``optax.masked`` idiom,
      e.g. ``lambda p: jax.tree_util.tree_map_with_path(lambda k, _: "Dense_1" in
      jax.tree_util.keystr(k), p)``).
    first_order: drop the second-order terms of the inner loop.
    remat: checkpoint the inner loop (see :func:`gajax.adaptation.adapt`).

  Returns:
    A :class:`MetaLearner` named ``"anil"``. Its update and ``TaskAux.displacement``
    (``theta - theta_i``, zero on the body) are shaped like params; ``adapt`` returns the full
    adapted parameters ``(theta_body, phi_k)``.
  """
  _check("anil", inner_steps, inner_lr)
  loss_fn = _fast(loss_fn, fast_ops)
  if not callable(adapt):
    _check_mask_leaves(adapt)  # Fail at construction already; the structure is checked per call.

  def run_inner(params, support, first_order_, remat_):
    mask = _resolve_mask(adapt, params)
    head, body = partition(params, mask)

    def inner_loss(phi, batch):
      return loss_fn(combine(phi, body), batch)

    phi, losses = adapt_loop(inner_loss, head, support, steps=inner_steps,
                             lr=_inner_lr(inner_lr, params, mask), first_order=first_order_,
                             remat=remat_)
    return combine(phi, body), losses

  def adapt_fn(params, support):
    return run_inner(params, support, first_order, False)[0]

  def update_fn(params, support, query):

    def outer(p):
      adapted, losses = run_inner(p, support, first_order, remat)
      return loss_fn(adapted, query), (adapted, losses)

    (q_loss, (adapted, losses)), grads = jax.value_and_grad(outer, has_aux=True)(params)
    s_loss = _support_loss(losses, loss_fn, params, support)
    return grads, TaskAux(_displacement(params, adapted), s_loss, q_loss,
                          _adapted_loss(loss_fn, adapted, support))

  return MetaLearner("anil", update_fn, adapt_fn)
