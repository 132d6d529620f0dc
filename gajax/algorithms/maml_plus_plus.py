r"""MAML++ (Antoniou, Edwards & Storkey, 2019, "How to train your MAML", ICLR), each part switchable.

:func:`maml_plus_plus` is MAML (Finn et al., 2017) with three of the paper's section-4 changes, each
behind its own argument, off by default (all off, it is :func:`gajax.algorithms.maml` exactly):

* **LSLR** (learned per-layer per-step inner learning rates), ``lslr=True``;
* **MSL** (multi-step loss with an annealed importance vector), ``multi_step_loss=True``;
* **DA** (derivative-order annealing: first order for the first outer steps), ``first_order_steps``;
* **BNWB** (per-step batch-norm weights and biases), ``per_step=gajax.models.batch_norm_mask``: any
  parameters a mask selects get one copy per inner step.

Not here: the per-step batch-norm running statistics (BNRS): gajax's batch norm always uses the
statistics of the batch it sees (MAML's transductive setting), so there are no running statistics to
keep per step. The cosine annealing of the outer learning rate (CA) is an optax schedule, see
:mod:`gajax.experiment`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gajax.adaptation import adapt, checkpointed_scan
from gajax.algorithms.anil import Mask, _check_mask_leaves, combine, partition
from gajax.algorithms.core import (LossFn, MetaLearner, TaskAux, _adapted_loss, _check, _displacement, _fast,
                                   _support_loss)

PyTree = Any

# The authors' floor on the weight of the non-final steps, as a multiple of 1 / k
# (``min_value_for_non_final_losses = 0.03 / number_of_training_steps_per_iter`` in their code).
MSL_MIN_FACTOR = 0.03


class MAMLPlusPlusParams(NamedTuple):
  """MAML++'s meta-parameters beyond the initialisation: learned rates (LSLR), per-step copies (BNWB).

  Attributes:
    params: the initialisation ``theta``, the model's parameter tree; with ``per_step`` the leaves
      it selects are ``None`` here (they live in ``per_step``).
    inner_lr: with LSLR, the structure of ``params``, each leaf a float array ``[inner_steps]`` (one
      rate per parameter tensor per inner step); ``None`` without.
    per_step: with BNWB, the structure of the model's parameters, the selected leaves stacked into
      ``[inner_steps, *shape]`` (copy ``s`` serves inner step ``s``) and ``None`` elsewhere; ``None``
      without.

  Make them with :func:`maml_plus_plus_init`.
  """
  params: PyTree
  inner_lr: PyTree = None
  per_step: PyTree = None


def resolve_mask(mask: Mask, params: PyTree, what: str = "per_step") -> PyTree:
  """The bool pytree of ``mask`` (or of ``mask(params)``), checked against ``params``' structure."""
  mask = mask(params) if callable(mask) else mask
  want, got = jax.tree_util.tree_structure(params), jax.tree_util.tree_structure(mask)
  if got != want:
    raise ValueError(f"maml_plus_plus: {what} must have the structure of params, got mask {got} for "
                     f"params {want}.")
  _check_mask_leaves(mask, f"maml_plus_plus: {what}", "mark the parameters that get a copy per step")
  return mask


def maml_plus_plus_init(params: PyTree, inner_lr: float, inner_steps: int, *, lslr: bool = True,
                        per_step: Mask | None = None) -> MAMLPlusPlusParams:
  """MAML++ meta-parameters from model parameters.

  ``lslr``: every per-layer per-step rate set to ``inner_lr`` (in each leaf's dtype), for the leaves
  that adapt. ``per_step`` (a mask, or a callable ``params -> mask`` such as
  :func:`gajax.models.batch_norm_mask`): the selected leaves are moved into ``per_step``, repeated
  ``inner_steps`` times (every step's copy starts equal).
  """
  _check("maml_plus_plus_init", inner_steps, inner_lr)
  per = None
  if per_step is not None:
    if inner_steps < 1:
      raise ValueError(f"maml_plus_plus_init: per_step needs inner_steps >= 1, got {inner_steps!r}.")
    selected, params = partition(params, resolve_mask(per_step, params))
    per = jax.tree_util.tree_map(lambda p: jnp.repeat(p[None], inner_steps, axis=0), selected)
  rates = None
  if lslr:
    rates = jax.tree_util.tree_map(lambda p: jnp.full((inner_steps,), inner_lr, jnp.result_type(p)),
                                   params)
  return MAMLPlusPlusParams(params, rates, per)


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
                remat=False, per_step=None):
  """``steps`` steps of ``theta <- theta - lr_s * grad L_s(theta)`` with a per-step rate.

  Args:
    rates: a Python scalar (the same rate every step), or a pytree like ``params`` whose leaves
      have shape ``[steps]`` (leaf rate ``lr[s]`` at step ``s``).
    query: when given, also returns ``L_q(theta_{s+1})`` after every step.
    first_order: ``None`` (second order), or a traced boolean scalar: where true, every inner gradient
      is under ``stop_gradient`` (``where(c, sg(g), g)`` differentiates to ``where(c, 0, dg)``).
    remat: checkpoint blocks of ``ceil(sqrt(steps))`` steps, as :func:`gajax.adaptation.adapt`.
    per_step: ``None``, or the per-step copies (leaves ``[steps, ...]``, ``None`` where ``params``
      has its leaves): step ``s`` evaluates the model at ``combine(per_step[s], theta_s)`` for its
      support gradient and at ``combine(per_step[s], theta_{s+1})`` for its query loss; the copies
      are not adapted.

  Returns:
    ``(theta_k, support_losses [k], query_losses [k] or None)``, ``support_losses[s] = L_s(theta_s)``.
  """
  per_step_rates = not isinstance(rates, (int, float))

  def model(p, copy):
    return p if per_step is None else combine(copy, p)

  grad_fn = jax.value_and_grad(lambda p, copy: loss_fn(model(p, copy), support))

  def step(p, xs):
    lr, copy = xs
    loss, grads = grad_fn(p, copy)
    if first_order is not None:
      grads = jax.tree_util.tree_map(
          lambda g: jnp.where(first_order, jax.lax.stop_gradient(g), g), grads)
    if per_step_rates:
      p = jax.tree_util.tree_map(lambda w, g, a: w - a * g, p, grads, lr)
    else:
      p = jax.tree_util.tree_map(lambda w, g: w - rates * g, p, grads)
    if query is None:
      return p, loss
    return p, (loss, loss_fn(model(p, copy), query))

  if steps == 0:
    empty = jnp.zeros((0,), jnp.float32)
    return params, empty, (None if query is None else empty)
  xs = (rates if per_step_rates else None, per_step)
  params, out = checkpointed_scan(step, params, xs, steps, remat=remat)
  if query is None:
    return params, out, None
  return params, out[0], out[1]


def _check_meta_params(meta_params, what):
  if not isinstance(meta_params, MAMLPlusPlusParams):
    raise ValueError(f"maml_plus_plus: with {what} the meta-parameters must be MAMLPlusPlusParams "
                     f"(see maml_plus_plus_init), got {type(meta_params).__name__}.")


def _check_per_step(meta_params, inner_steps):
  _check_meta_params(meta_params, "per_step")
  if meta_params.per_step is None:
    raise ValueError("maml_plus_plus: per_step is set but the meta-parameters hold no per-step copies; "
                     "make them with maml_plus_plus_init(..., per_step=<the same mask>).")
  for path, c in jax.tree_util.tree_flatten_with_path(meta_params.per_step)[0]:
    if jnp.ndim(c) < 1 or jnp.shape(c)[0] != inner_steps:
      raise ValueError(f"maml_plus_plus: per_step leaf {jax.tree_util.keystr(path)} has shape "
                       f"{jnp.shape(c)}, expected a leading axis of {inner_steps} (one copy per step).")


def _check_rates(meta_params, inner_steps):
  _check_meta_params(meta_params, "lslr=True")
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
                   first_order_steps: int = 0, per_step: Mask | None = None, remat: bool = False,
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

  * **BNWB** ("Per-Step Batch Normalization Weights and Biases"), ``per_step=mask`` (a pytree of
    bools like the model's parameters, or a callable ``params -> mask`` such as
    :func:`gajax.models.batch_norm_mask`): the selected parameters ``beta`` get one copy per inner
    step, ``beta_0 .. beta_{k-1}``, meta-learned and not adapted (as the authors' code leaves batch
    norm out of the inner loop). Step ``s`` takes its support gradient at ``(theta_s, beta_s)`` and
    scores its query loss at ``(theta_{s+1}, beta_s)``, so the final query loss and the adapted model
    use ``beta_{k-1}``. The meta-parameters are then :class:`MAMLPlusPlusParams` with ``per_step``
    (:func:`maml_plus_plus_init` with the same mask). With every copy equal to a shared ``beta``,
    the copies' gradients sum to that of MAML with ``beta`` frozen in the inner loop (tested).

  Not part of this function: the per-step batch-norm running statistics (BNRS; gajax's batch norm
  always uses the batch's statistics, so there are none) and the cosine-annealed outer learning rate
  (CA; an optax schedule, see :mod:`gajax.experiment`).

  The :class:`TaskAux` is MAML's: ``displacement = theta - theta_k`` (the adapted parameters), the support
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
  if per_step is not None and inner_steps < 1:
    raise ValueError(f"maml_plus_plus: per_step needs inner_steps >= 1, got {inner_steps!r}.")
  if per_step is not None and not callable(per_step):
    _check_mask_leaves(per_step, "maml_plus_plus: per_step",
                       "mark the parameters that get a copy per step")

  def split(meta_params):
    """``(theta, rates, per-step copies or None)``."""
    if per_step is not None:
      _check_per_step(meta_params, inner_steps)
    if lslr:
      _check_rates(meta_params, inner_steps)
    if lslr or per_step is not None:
      return (meta_params.params, meta_params.inner_lr if lslr else inner_lr,
              meta_params.per_step if per_step is not None else None)
    return meta_params, inner_lr, None

  def model_params(adapted, copies):
    """The model's parameter tree after adaptation: with per-step copies, the last step's."""
    if copies is None:
      return adapted
    return combine(jax.tree_util.tree_map(lambda c: c[-1], copies), adapted)

  def adapt_fn(meta_params, support):
    params, rates, copies = split(meta_params)
    if not lslr and copies is None:
      return adapt(loss_fn, params, support, steps=inner_steps, lr=rates)[0]
    adapted = _inner_loop(loss_fn, params, support, rates, steps=inner_steps, per_step=copies)[0]
    return model_params(adapted, copies)

  def update_fn(meta_params, support, query, step):
    split(meta_params)  # validate before tracing the gradient.
    first_order = (jnp.asarray(step) < first_order_steps) if first_order_steps > 0 else None

    def outer(mp):
      params, rates, copies = split(mp)
      if multi_step_loss:
        adapted, losses, q_losses = _inner_loop(loss_fn, params, support, rates, steps=inner_steps,
                                                query=query, first_order=first_order, remat=remat,
                                                per_step=copies)
        weights = msl_importance(step, inner_steps, msl_anneal_steps, q_losses.dtype)
        return jnp.sum(weights * q_losses), (adapted, losses, q_losses[-1])
      adapted, losses, _ = _inner_loop(loss_fn, params, support, rates, steps=inner_steps,
                                       first_order=first_order, remat=remat, per_step=copies)
      q_loss = loss_fn(model_params(adapted, copies), query)
      return q_loss, (adapted, losses, q_loss)

    (_, (adapted, losses, q_loss)), grads = jax.value_and_grad(outer, has_aux=True)(meta_params)
    params, _, copies = split(meta_params)
    # The loss before adaptation at step 0's copies (the inner loop's first support loss).
    s_loss = _support_loss(losses, loss_fn, params, support)
    return grads, TaskAux(_displacement(params, adapted), s_loss, q_loss,
                          _adapted_loss(loss_fn, model_params(adapted, copies), support))

  return MetaLearner("maml++", update_fn, adapt_fn, needs_step=True)
