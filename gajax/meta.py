"""The outer loop: a jit-compiled meta-step over a sampled meta-batch, and evaluation on unseen tasks.

Data flow of one meta-step (everything inside one ``jit``)::

    key, data -> task.sample -> per_task(learner.with_aux)(params, support, query)   # leaves [T, ...]
        -> tx.update(updates, opt_state, params[, agreement_signal=displacements])
        -> optax.apply_updates
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gajax import aggregators
from gajax.algorithms import MetaLearner, per_task
from gajax.tasks.base import Task

PyTree = Any


class MetaState(NamedTuple):
  """Everything a training run carries from one meta-step to the next.

  Attributes:
    step: int32 scalar, the number of meta-steps taken.
    params: the meta-parameters.
    opt_state: the optax state (aggregator first, then the optimiser).
    key: the PRNG key that the next meta-step splits.
  """
  step: jax.Array
  params: PyTree
  opt_state: optax.OptState
  key: jax.Array


def init_state(key: jax.Array, params: PyTree, tx: optax.GradientTransformation) -> MetaState:
  """A fresh :class:`MetaState` at step 0."""
  return MetaState(jnp.zeros((), jnp.int32), params, tx.init(params), key)


def task_mesh(num_devices: int | None = None, axis_name: str = "tasks") -> Mesh:
  """A 1-D mesh over the first ``num_devices`` devices (default: all), for sharding the task axis."""
  devices = jax.devices()
  num_devices = len(devices) if num_devices is None else num_devices
  if not 1 <= num_devices <= len(devices):
    raise ValueError(f"num_devices must be in [1, {len(devices)}] (the devices JAX sees); "
                     f"got {num_devices}.")
  return Mesh(np.asarray(devices[:num_devices]), (axis_name,))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Places every leaf of ``tree`` on all devices of ``mesh`` (parameters, optimiser state, keys)."""
  return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def make_meta_step(learner: MetaLearner, tx: optax.GradientTransformation, sample: Callable,
                   num_tasks: int, *, signal: str = "self",
                   mesh: Mesh | None = None) -> Callable[[MetaState], tuple[MetaState, dict]]:
  """Builds the (unjitted, pure) meta-step ``state -> (state, metrics)``.

  Args:
    learner: the one-task algorithm (see :mod:`gajax.algorithms`).
    tx: an optax transformation whose first element aggregates stacked updates (e.g.
      ``optax.chain(gajax.aggregators.gradient_agreement(), optax.adam(1e-3))``).
    sample: ``(key, num_tasks, data) -> (support, query)``.
    num_tasks: the meta-batch size ``T``.
    signal: ``"self"`` lets the aggregator weigh the updates by themselves; ``"displacement"`` passes
      each task's inner displacement ``theta - theta_i`` as ``agreement_signal`` (the paper's MAML
      variant of gradient agreement).
    mesh: shard the task axis over this 1-D mesh (data parallel over tasks; parameters replicated,
      see :func:`replicate`). Each device adapts its own tasks; the aggregator's reductions over the
      task axis (the batch sum ``G`` of gradient agreement, a Gramian) become XLA collectives, so every
      aggregator sees the global task axis. ``num_tasks`` must be a multiple of the mesh size.

  Returns:
    ``meta_step(state, data=None) -> (state, metrics)``, ``data`` handed to ``sample``; metrics are float32 scalars: ``support_loss`` (before
    adaptation), ``adapted_support_loss`` and ``query_loss`` (after), averaged over tasks,
    ``inner_worse_fraction`` (the share of tasks whose inner loop *raised* their support loss: an
    unstable inner step, e.g. from an initialisation whose curvature exceeds ``2 / inner_lr``),
    ``update_norm``, and when the
    aggregator keeps them, ``weights`` (``[T]``), ``weight_min``, ``weight_max`` and
    ``weight_negative`` (count), and
    ``skipped_tasks`` (non-finite tasks dropped by :func:`gajax.aggregators.skip_nonfinite_tasks`;
    when it equals ``num_tasks`` a guard around the whole chain leaves parameters and optimiser state
    unchanged). Aggregator state is read through :func:`gajax.aggregators.task_weights` and
    :func:`gajax.aggregators.skipped_tasks`, wherever in ``tx``'s state it sits.
  """
  if signal not in ("self", "displacement"):
    raise ValueError(f"make_meta_step: signal must be 'self' or 'displacement', got {signal!r}.")
  if mesh is not None and num_tasks % mesh.size:
    raise ValueError(f"make_meta_step: the meta-batch of {num_tasks} tasks does not split evenly over "
                     f"{mesh.size} devices; use a multiple of {mesh.size}.")
  task_sharding = None if mesh is None else NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))
  def meta_step(state: MetaState, data: PyTree = None):
    key, task_key = jax.random.split(state.key)
    support, query = sample(task_key, num_tasks, data)
    if task_sharding is not None:
      support, query = jax.lax.with_sharding_constraint((support, query), task_sharding)
    # The step is shared by every task (closed over, not vmapped); only learners that declare
    # needs_step read it.
    one_task = functools.partial(learner.with_aux, step=state.step)
    updates, aux = per_task(one_task)(state.params, support, query)
    extra = {"agreement_signal": aux.displacement} if signal == "displacement" else {}
    step_updates, opt_state = tx.update(updates, state.opt_state, state.params, **extra)
    params = optax.apply_updates(state.params, step_updates)
    skipped = aggregators.skipped_tasks(opt_state)
    metrics = {
        "support_loss": jnp.mean(aux.support_loss),
        "adapted_support_loss": jnp.mean(aux.adapted_support_loss),
        "inner_worse_fraction": jnp.mean(
            (aux.adapted_support_loss > aux.support_loss).astype(jnp.float32)),
        "query_loss": jnp.mean(aux.query_loss),
        "update_norm": optax.tree_utils.tree_norm(step_updates),
    }
    if skipped is not None:
      metrics["skipped_tasks"] = skipped.astype(jnp.float32)
    weights = aggregators.task_weights(opt_state)
    if weights is not None and weights.shape[0]:
      metrics.update(weights=weights, weight_min=jnp.min(weights), weight_max=jnp.max(weights),
                     weight_negative=jnp.sum(weights < 0).astype(jnp.float32))
    return MetaState(state.step + 1, params, opt_state, key), metrics

  return meta_step


def make_block(meta_step: Callable, block_size: int) -> Callable:
  """``block_size`` meta-steps in one ``lax.scan``: ``(state, data) -> (state, metrics stacked [block_size])``.

  Jit the result once; the host then sees a state only every ``block_size`` steps.
  """
  def block(state, data=None):
    return jax.lax.scan(lambda s, _: meta_step(s, data), state, None, length=block_size)
  return block


def mean_ci95(values: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean and the half-width of its normal-approximation 95% interval, ``1.96 s / sqrt(n)``.

  ``s`` is the sample standard deviation (``ddof=1``); with one value the half-width is 0.
  """
  n = values.shape[0]
  std = jnp.std(values, ddof=1) if n > 1 else jnp.zeros((), values.dtype)
  return jnp.mean(values), 1.96 * std / jnp.sqrt(n)


EVAL_CHUNK_SIZE = 100


def make_evaluate(learner: MetaLearner, task: Task, num_tasks: int, *,
                  chunk_size: int = EVAL_CHUNK_SIZE) -> Callable[[PyTree, jax.Array], jax.Array]:
  """Builds ``evaluate(params, key, data=None) -> per-task metric [num_tasks]`` on unseen tasks.

  ``data`` is handed to ``task.eval_sample`` (pass ``task.eval_data``); for a task drawn on the host
  (``task.host``), ``data`` is ``task.host.eval_tasks(seed, num_tasks, chunk_size)`` and ``key`` unused.
  Each task: adapt on its support set with ``learner.adapt``, then ``task.metric_fn`` on its query
  set. Tasks are processed ``chunk_size`` at a time (``vmap``) to bound memory, the chunks inside one
  ``lax.map`` (jit the result). Every chunk draws its tasks from its own key, so the tasks depend on
  ``key``, ``num_tasks`` and ``chunk_size`` only: two models evaluated with the same key see the same
  tasks. Summarise the result with :func:`mean_ci95`.
  """
  if num_tasks < 1:
    raise ValueError(f"evaluate: num_tasks must be >= 1, got {num_tasks}.")
  chunk_size = min(chunk_size, num_tasks)
  num_chunks = -(-num_tasks // chunk_size)

  def one_task(params, support, query):
    return task.metric_fn(learner.adapt(params, support), query)

  def chunk(params, k, data):
    support, query = task.eval_sample(k, chunk_size, data)
    return jax.vmap(one_task, in_axes=(None, 0, 0))(params, support, query)

  def evaluate(params, key, data=None):
    if task.host is not None:  # data: the tasks drawn on the host, [num_chunks, chunk_size, ...]
      if data is None or tuple(data.shape[:2]) != (num_chunks, chunk_size):
        raise ValueError(f"evaluate: task {task.name!r} is drawn on the host: data must be its "
                         f"evaluation tasks, [{num_chunks}, {chunk_size}, ...] "
                         f"(gajax.experiment.evaluation_data); got "
                         f"{None if data is None else tuple(data.shape)}.")
      values = jax.lax.map(lambda d: chunk(params, None, d), data)
    else:
      values = jax.lax.map(lambda k: chunk(params, k, data), jax.random.split(key, num_chunks))
    return jnp.reshape(values, (-1,))[:num_tasks]

  return evaluate
