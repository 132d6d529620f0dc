"""Meta-learning algorithms: each maps ``(params, support, query)`` of ONE task to that task's update.

Every algorithm returns a :class:`MetaLearner`, a frozen dataclass that is itself the pure function
``(params, support, query) -> update``. An *update* is gradient-like: the outer loop descends along
it (``optax.sgd``, ``optax.adam``, ...), so MAML's update is the query meta-gradient and Reptile's is
the displacement ``theta - theta_i``. Batch over tasks with :func:`gajax.per_task`.

``support`` and ``query`` are arbitrary pytrees handed unchanged to ``loss_fn(params, batch)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from gajax.adaptation import adapt

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]


class TaskAux(NamedTuple):
  """What one task's update computes on the way, for logging and for the agreement signal.

  Attributes:
    displacement: ``theta - theta_i``, the inner-loop displacement of the model parameters (the
      paper's ``g_i`` in Algorithm 1 of Eshratifar et al., 2018), shaped like the model parameters.
    support_loss: the support loss before adaptation (scalar).
    query_loss: the query loss after adaptation (scalar).
    adapted_support_loss: the support loss after adaptation (scalar). Above ``support_loss``, the
      inner loop made the task's own training loss worse: its step was past the stability limit
      ``2 / lambda_max`` of the loss's curvature (see :mod:`gajax.diagnostics`).
  """
  displacement: PyTree
  support_loss: jax.Array
  query_loss: jax.Array
  adapted_support_loss: jax.Array


class MetaSGDParams(NamedTuple):
  """Meta-SGD's meta-parameters (Li et al., 2017): the initialisation and per-parameter inner rates."""
  params: PyTree
  inner_lr: PyTree


@dataclasses.dataclass(frozen=True)
class MetaLearner:
  """A meta-learning algorithm for one task.

  Calling it, ``learner(params, support, query)``, returns the task's update (shaped like
  ``params``). ``learner.with_aux(...)`` also returns a :class:`TaskAux`, and
  ``learner.adapt(params, support)`` returns the adapted *model* parameters used at evaluation.
  """
  name: str
  update_fn: Callable[[PyTree, PyTree, PyTree], tuple[PyTree, TaskAux]]
  adapt_fn: Callable[[PyTree, PyTree], PyTree]

  def __call__(self, params, support, query):
    return self.update_fn(params, support, query)[0]

  def with_aux(self, params, support, query):
    return self.update_fn(params, support, query)

  def adapt(self, params, support):
    return self.adapt_fn(params, support)


def _support_loss(losses, loss_fn, params, support):
  """The pre-adaptation support loss: the inner loop's first loss, or one forward pass if k = 0."""
  return losses[0] if losses.shape[0] else jax.lax.stop_gradient(loss_fn(params, support))


def _check(name, inner_steps, inner_lr=None):
  if not isinstance(inner_steps, int) or inner_steps < 0:
    raise ValueError(f"{name}: inner_steps must be an int >= 0, got {inner_steps!r}.")
  if inner_lr is not None and isinstance(inner_lr, (int, float)) and not inner_lr >= 0:
    raise ValueError(f"{name}: inner_lr must be >= 0, got {inner_lr!r}.")


def _adapted_loss(loss_fn, adapted, batch):
  """A forward pass for logging only: no gradient flows through it."""
  return jax.lax.stop_gradient(loss_fn(jax.lax.stop_gradient(adapted), batch))


def _displacement(params, adapted):
  return jax.lax.stop_gradient(jax.tree_util.tree_map(jnp.subtract, params, adapted))


def maml(loss_fn: LossFn, *, inner_steps: int, inner_lr: float,
         first_order: bool = False, remat: bool = False) -> MetaLearner:
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


def fomaml(loss_fn: LossFn, *, inner_steps: int, inner_lr: float) -> MetaLearner:
  """First-order MAML: :func:`maml` with ``first_order=True``."""
  return maml(loss_fn, inner_steps=inner_steps, inner_lr=inner_lr, first_order=True)


def reptile(loss_fn: LossFn, *, inner_steps: int, inner_lr: float) -> MetaLearner:
  r"""Reptile (Nichol et al., 2018): the update is the inner-loop displacement ``theta - theta_k``.

  The inner loop runs plain SGD on the *support* data only; the query data never joins it. The query
  is used only to report the post-adaptation loss in :class:`TaskAux` (an extra forward pass, outside
  the gradient). Descending along ``u = theta - theta_k`` with step ``beta`` gives Reptile's
  ``theta <- theta + beta (theta_k - theta)``.
  """
  _check("reptile", inner_steps, inner_lr)
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


def meta_sgd(loss_fn: LossFn, *, inner_steps: int = 1, first_order: bool = False,
             remat: bool = False) -> MetaLearner:
  r"""Meta-SGD (Li et al., 2017): MAML with per-parameter inner learning rates learned in the outer loop.

  Meta-parameters are :class:`MetaSGDParams` ``(theta, alpha)`` with ``alpha`` shaped like ``theta``
  (make them with :func:`meta_sgd_init`). The inner step is ``theta <- theta - alpha * grad`` (elementwise)
  and the update is the gradient of the query loss w.r.t. both ``theta`` and ``alpha``:
  ``d L_q / d alpha = -grad L_q(theta_1) * grad L_s(theta)`` for one step. ``adapt`` returns model
  parameters only. ``remat`` bounds the memory of the backward pass as in :func:`maml`.
  """
  _check("meta_sgd", inner_steps)

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


def per_task(fn: Callable) -> Callable:
  """Vectorises a one-task function over the leading task axis of ``support`` and ``query``.

  ``per_task(fn)(params, supports, queries)`` maps ``fn(params, support_i, query_i)`` over ``i`` with
  ``params`` shared (``jax.vmap`` with ``in_axes=(None, 0, 0)``); every output leaf gains a leading
  task axis ``T``.
  """
  batched = jax.vmap(fn, in_axes=(None, 0, 0))

  def wrapper(params, supports, queries):
    counts = {}
    for what, tree in (("support", supports), ("query", queries)):
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if jnp.ndim(leaf) == 0:
          raise ValueError(f"per_task: {what} leaf {jax.tree_util.keystr(path)} is a scalar; "
                           "support and query leaves need a leading task axis.")
        counts.setdefault(jnp.shape(leaf)[0], f"{what} leaf {jax.tree_util.keystr(path)}")
    if len(counts) > 1:
      detail = ", ".join(f"{name} has {t}" for t, name in counts.items())
      raise ValueError(f"per_task: support and query disagree on the task count ({detail}).")
    return batched(params, supports, queries)

  return wrapper
