"""What every algorithm shares: the :class:`MetaLearner` contract, :class:`TaskAux`, and :func:`per_task`.

Each algorithm maps ``(params, support, query)`` of ONE task to that task's update.

Every algorithm returns a :class:`MetaLearner`, a frozen dataclass that is itself the pure function
``(params, support, query) -> update``. An *update* is gradient-like: the outer loop descends along
it (``optax.sgd``, ``optax.adam``, ...), so MAML's update is the query meta-gradient and Reptile's is
the displacement ``theta - theta_i``. Batch over tasks with :func:`gajax.per_task`.

``support`` and ``query`` are arbitrary pytrees handed unchanged to ``loss_fn(params, batch)``;
every algorithm first passes ``loss_fn`` through :func:`_fast` (``fast_ops``, see
:mod:`gajax.fast_ops`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from gajax.fast_ops import batchable


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


@dataclasses.dataclass(frozen=True)
class MetaLearner:
  """A meta-learning algorithm for one task.

  Calling it, ``learner(params, support, query)``, returns the task's update (shaped like
  ``params``). ``learner.with_aux(...)`` also returns a :class:`TaskAux`, and
  ``learner.adapt(params, support)`` returns the adapted *model* parameters used at evaluation.

  A learner whose update changes over training (MAML++'s annealed multi-step loss and derivative
  order) sets ``needs_step``: its ``update_fn`` then takes the outer step count as a fourth argument
  (an int32 scalar; :func:`gajax.meta.make_meta_step` passes ``state.step``), and calling it without
  ``step`` uses step 0.
  """
  name: str
  update_fn: Callable[..., tuple[PyTree, TaskAux]]
  adapt_fn: Callable[[PyTree, PyTree], PyTree]
  needs_step: bool = False

  def __call__(self, params, support, query, step=None):
    return self.with_aux(params, support, query, step)[0]

  def with_aux(self, params, support, query, step=None):
    if self.needs_step:
      return self.update_fn(params, support, query, jnp.asarray(0 if step is None else step, jnp.int32))
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


def _fast(loss_fn, fast_ops: bool):
  """``fast_ops=True`` (every algorithm's default): the loss with its convolutions and max-pools in
  the forms that batch well over per-task parameters (:func:`gajax.fast_ops.batchable`)."""
  return batchable(loss_fn) if fast_ops else loss_fn


def _adapted_loss(loss_fn, adapted, batch):
  """A forward pass for logging only: no gradient flows through it."""
  return jax.lax.stop_gradient(loss_fn(jax.lax.stop_gradient(adapted), batch))


def _displacement(params, adapted):
  return jax.lax.stop_gradient(jax.tree_util.tree_map(jnp.subtract, params, adapted))


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
