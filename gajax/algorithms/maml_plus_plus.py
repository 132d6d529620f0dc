r"""MAML++ (Antoniou, Edwards & Storkey, 2019, "How to train your MAML", ICLR), each part switchable.

:func:`maml_plus_plus` is MAML (Finn et al., 2017) with three of the paper's section-4 changes, each
behind its own argument, off by default (all off, it is :func:`gajax.algorithms.maml` exactly):

* **LSLR** (learned per-layer per-step inner learning rates), ``lslr=True``;
* **MSL** (multi-step loss with an annealed importance vector), ``multi_step_loss=True``;
* **DA** (derivative-order annealing: first order for the first outer steps), ``first_order_steps``.

The paper's other changes are not here: the per-step batch-norm running statistics and per-step
batch-norm weights and biases (BNRS / BNWB) need a model change and are not implemented; the cosine
annealing of the outer learning rate (CA) is an optax schedule, see :mod:`gajax.train`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gajax.adaptation import adapt, checkpointed_scan
from gajax.algorithms.core import (LossFn, MetaLearner, TaskAux, _adapted_loss, _check, _displacement, _fast,
                                   _support_loss)

PyTree = Any

# The authors' floor on the weight of the non-final steps, as a multiple of 1 / k
# (``min_value_for_non_final_losses = 0.03 / number_of_training_steps_per_iter`` in their code).
MSL_MIN_FACTOR = 0.03


class MAMLPlusPlusParams(NamedTuple):
  """MAML++'s meta-parameters with LSLR: the initialisation and the per-layer per-step inner rates.

  ``inner_lr`` has the structure of ``params``; each leaf is a float array of shape ``[inner_steps]``
  (one rate per parameter tensor per inner step). Make them with :func:`maml_plus_plus_init`.
  """
  params: PyTree
  inner_lr: PyTree


def maml_plus_plus_init(params: PyTree, inner_lr: float, inner_steps: int) -> MAMLPlusPlusParams:
  """LSLR meta-parameters with every per-layer per-step rate set to ``inner_lr`` (in each leaf's dtype)."""
  _check("maml_plus_plus_init", inner_steps, inner_lr)
  return MAMLPlusPlusParams(params, jax.tree_util.tree_map(
      lambda p: jnp.full((inner_steps,), inner_lr, jnp.result_type(p)), params))


def msl_importance(step: jax.Array | int, inner_steps: int, anneal_steps: int,
                   dtype=jnp.float32) -> jax.Array:
  r"""The multi-step loss's importance vector ``v(step)``, shape ``[inner_steps]`` (``dtype``), sums to 1.

  With ``k = inner_steps``, ``m = 0.03 / k`` and ``t = step / anneal_steps``:

  * ``0 <= step < anneal_steps``: the linear interpolation from uniform to ``(m, ..., m, 1 - (k-1) m)``,
    ``v_s = (1 - t) / k + t m`` for ``s < k`` and ``v_k = (1 - t) / k + t (1 - (k - 1) m)``;
  * ``step >= anneal_steps``: only the final step counts, ``v = (0, ..., 0, 1)`` (as in the authors'
    code, which drops the per-step losses after ``multi_step_loss_num_epochs``).
  """
  k = inner_steps
  m = MSL_MIN_FACTOR / k
  t = jnp.asarray(step, dtype) / anneal_steps
  final = jnp.zeros((k,), dtype).at[-1].set(1.0)
  target = jnp.full((k,), m, dtype).at[-1].set(1.0 - (k - 1) * m)
  annealed = (1.0 - t) / k + t * target
  return jnp.where(jnp.asarray(step) < anneal_steps, annealed, final)


def _inner_loop(loss_fn, params, support, rates, *, steps, query=None, first_order=None,
                remat=False):
  """``steps`` steps of ``theta <- theta - lr_s * grad L_s(theta)`` with a per-step rate.

  Args:
    rates: a Python scalar (the same rate every step), or a pytree like ``params`` whose leaves
      have shape ``[steps]`` (leaf rate ``lr[s]`` at step ``s``).
    query: when given, also returns ``L_q(theta_{s+1})`` after every step.
    first_order: ``None`` (second order), or a traced boolean scalar: where true, every inner gradient
      is under ``stop_gradient`` (``where(c, sg(g), g)`` differentiates to ``where(c, 0, dg)``).
    remat: checkpoint blocks of ``ceil(sqrt(steps))`` steps, as :func:`gajax.adaptation.adapt`.

  Returns:
    ``(theta_k, support_losses [k], query_losses [k] or None)``, ``support_losses[s] = L_s(theta_s)``.
  """
  per_step = not isinstance(rates, (int, float))
  grad_fn = jax.value_and_grad(loss_fn)

  def step(p, lr):
    loss, grads = grad_fn(p, support)
    if first_order is not None:
      grads = jax.tree_util.tree_map(
          lambda g: jnp.where(first_order, jax.lax.stop_gradient(g), g), grads)
    if per_step:
      p = jax.tree_util.tree_map(lambda w, g, a: w - a * g, p, grads, lr)
    else:
      p = jax.tree_util.tree_map(lambda w, g: w - rates * g, p, grads)
    if query is None:
      return p, loss
    return p, (loss, loss_fn(p, query))

  if steps == 0:
    empty = jnp.zeros((0,), jnp.float32)
    return params, empty, (None if query is None else empty)
  params, out = checkpointed_scan(step, params, rates if per_step else None, steps, remat=remat)
  if query is None:
    return params, out, None
  return params, out[0], out[1]


def _check_rates(meta_params, inner_steps):
  if not isinstance(meta_params, MAMLPlusPlusParams):
    raise ValueError("maml_plus_plus: with lslr=True the meta-parameters must be MAMLPlusPlusParams "
                     f"(see maml_plus_plus_init), got {type(meta_params).__name__}.")
  p_def = jax.tree_util.tree_structure(meta_params.params)
  r_def = jax.tree_util.tree_structure(meta_params.inner_lr)
  if p_def != r_def:
    raise ValueError(f"maml_plus_plus: inner_lr must have the structure of params, got {r_def} for "
                     f"params {p_def}.")
  for path, r in jax.tree_util.tree_flatten_with_path(meta_params.inner_lr)[0]:
    if jnp.shape(r) != (inner_steps,):
      raise ValueError(f"maml_plus_plus: inner_lr leaf {jax.tree_util.keystr(path)} has shape "
                       f"{jnp.shape(r)}, expected ({inner_steps},) (one rate per inner step).")


def maml_plus_plus(loss_fn: LossFn, *, inner_steps: int, inner_lr: float, lslr: bool = False,
                   multi_step_loss: bool = False, msl_anneal_steps: int = 0,
                   first_order_steps: int = 0, remat: bool = False,
                   fast_ops: bool = True) -> MetaLearner:
  r"""MAML++ (Antoniou, Edwards & Storkey, 2019, "How to train your MAML", ICLR, section 4).

  The inner loop, with ``k = inner_steps`` steps on the support loss ``L_s``,

  .. math:: \theta_0 = \theta,\qquad \theta_{s+1} = \theta_s - \alpha_{s} \odot \nabla L_s(\theta_s),

  and the update is the meta-gradient of the outer loss at outer step ``n`` (``step``),

  .. math:: u = \nabla_{(\theta, \alpha)}\ \sum_{s=1}^{k} v_s(n)\, L_q(\theta_s),

  where ``v = (0, ..., 0, 1)`` (plain MAML's ``L_q(theta_k)``) unless ``multi_step_loss``.

  * **LSLR** ("Learning Per-Layer Per-Step Learning Rates and Gradient Directions"), ``lslr=True``:
    ``alpha_s`` is learned, one scalar per parameter tensor ("layer") per step. The meta-parameters
    are then :class:`MAMLPlusPlusParams` ``(params, inner_lr)``, ``inner_lr`` leaves of shape ``[k]``
    (step ``s`` uses ``inner_lr_leaf[s]``), made by :func:`maml_plus_plus_init`; the update is shaped
    like them (gradients w.r.t. both, as :func:`gajax.algorithms.meta_sgd`), and the ``inner_lr``
    argument of this function is unused (the rates come from the meta-parameters). With
    ``lslr=False`` the meta-parameters are the model parameters and ``alpha_s = inner_lr``.
  * **MSL** ("Multi-Step Loss Optimization"), ``multi_step_loss=True``: the query loss after every
    inner step, weighted by the importance vector of :func:`msl_importance`: with ``m = 0.03 / k``
    (the authors' code) and ``t = n / msl_anneal_steps``, for ``n < msl_anneal_steps``
    ``v_s = (1 - t) / k + t m`` (``s < k``) and ``v_k = (1 - t) / k + t (1 - (k - 1) m)``, a linear
    annealing from uniform (``1 / k`` each) to ``(m, ..., m, 1 - (k - 1) m)``; for
    ``n >= msl_anneal_steps`` only the final step counts, ``v = (0, ..., 0, 1)``, as in the authors'
    code. ``v`` sums to 1 at every step. Needs ``msl_anneal_steps >= 1`` and ``k >= 1``.
  * **DA** ("Derivative-Order Annealing"): for outer steps ``n < first_order_steps`` every inner
    gradient is under ``stop_gradient`` (first-order MAML, Meta-SGD's first-order rate gradient
    with LSLR), from ``n = first_order_steps`` on the full second-order meta-gradient. The switch
    is ``where(n < first_order_steps, stop_gradient(g), g)`` on each inner gradient ``g``, whose
    derivative is ``where(n < first_order_steps, 0, dg)``: one compiled program serves both phases.

  Not part of this function: the per-step batch-norm running statistics and weights / biases
  (BNRS, BNWB; they need a model change; not implemented) and the cosine-annealed outer learning
  rate (CA; an optax schedule, see :mod:`gajax.train`).

  The :class:`TaskAux` is MAML's: ``displacement = theta - theta_k`` (model parameters), the support
  loss before adaptation, the query loss ``L_q(theta_k)`` after the last step (not the weighted
  MSL sum) and the support loss after adaptation. ``adapt`` (evaluation) runs the ``k`` inner steps
  with the learned rates (if ``lslr``) and returns model parameters. ``remat=True`` checkpoints the
  inner loop in blocks of ``ceil(sqrt(k))`` steps, as :func:`gajax.adaptation.adapt`; the update is
  the same.

  The learner has ``needs_step=True``: ``update_fn(params, support, query, step)``, ``step`` the
  outer step count (int32 scalar; :meth:`MetaLearner.with_aux` defaults it to 0).
  """
  _check("maml_plus_plus", inner_steps, inner_lr)
  loss_fn = _fast(loss_fn, fast_ops)
  if not isinstance(inner_lr, (int, float)) or isinstance(inner_lr, bool):
    raise ValueError(f"maml_plus_plus: inner_lr must be a Python float, got {inner_lr!r}.")
  for name, value in (("msl_anneal_steps", msl_anneal_steps), ("first_order_steps", first_order_steps)):
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
      raise ValueError(f"maml_plus_plus: {name} must be an int >= 0, got {value!r}.")
  if multi_step_loss and inner_steps < 1:
    raise ValueError("maml_plus_plus: multi_step_loss needs inner_steps >= 1, got "
                     f"{inner_steps!r}.")
  if multi_step_loss and msl_anneal_steps < 1:
    raise ValueError("maml_plus_plus: multi_step_loss needs msl_anneal_steps >= 1 (the outer steps "
                     f"over which the per-step losses are annealed), got {msl_anneal_steps!r}.")

  def split(meta_params):
    if lslr:
      _check_rates(meta_params, inner_steps)
      return meta_params.params, meta_params.inner_lr
    return meta_params, inner_lr

  def adapt_fn(meta_params, support):
    params, rates = split(meta_params)
    if not lslr:
      return adapt(loss_fn, params, support, steps=inner_steps, lr=rates)[0]
    return _inner_loop(loss_fn, params, support, rates, steps=inner_steps)[0]

  def update_fn(meta_params, support, query, step):
    split(meta_params)  # validate before tracing the gradient.
    first_order = (jnp.asarray(step) < first_order_steps) if first_order_steps > 0 else None

    def outer(mp):
      params, rates = split(mp)
      if multi_step_loss:
        adapted, losses, q_losses = _inner_loop(loss_fn, params, support, rates, steps=inner_steps,
                                                query=query, first_order=first_order, remat=remat)
        weights = msl_importance(step, inner_steps, msl_anneal_steps, q_losses.dtype)
        return jnp.sum(weights * q_losses), (adapted, losses, q_losses[-1])
      adapted, losses, _ = _inner_loop(loss_fn, params, support, rates, steps=inner_steps,
                                       first_order=first_order, remat=remat)
      q_loss = loss_fn(adapted, query)
      return q_loss, (adapted, losses, q_loss)

    (_, (adapted, losses, q_loss)), grads = jax.value_and_grad(outer, has_aux=True)(meta_params)
    params = meta_params.params if lslr else meta_params
    s_loss = _support_loss(losses, loss_fn, params, support)
    return grads, TaskAux(_displacement(params, adapted), s_loss, q_loss,
                          _adapted_loss(loss_fn, adapted, support))

  return MetaLearner("maml++", update_fn, adapt_fn, needs_step=True)
