"""One factory from a :class:`~gajax.config.TrainConfig` to the pure pieces of a run.

``make_experiment(config)`` builds the task, the learner, the optax chain and the meta-step, and
returns them as an :class:`Experiment` of pure functions (``init``, ``step``, ``evaluate``) that can be
``jit``-ed and ``vmap``-ed over seeds. Training (``gajax.train``), the scripts and the benchmarks all
build their runs here.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import optax

from gajax import aggregators, algorithms, meta, models
from gajax.config import CLASSIFICATION_TASKS, IMAGE_TASKS, TrainConfig
from gajax.tasks import binary, corruption, sinusoid
from gajax.tasks.base import Task

# Where the aggregator's key is folded from the run's key (kept from earlier versions so that runs of
# the random aggregators reproduce).
_AGGREGATOR_STREAM = 7


def make_aggregator(name: str, num_tasks: int) -> optax.GradientTransformationExtraArgs:
  """The aggregator called ``name`` with the settings runs use.

  Sized for ``num_tasks`` where its state needs it (both agreements, GradVac); ``trimmed_mean`` cuts
  one task at each end. Random ones (RLW, GradDrop) are built with a placeholder key that
  :func:`make_experiment`'s ``init`` replaces by one derived from the run's key
  (:func:`gajax.aggregators.with_key`).
  """
  canonical = aggregators.registry.canonical_name(name)
  kwargs = {"gradient_agreement": {"num_tasks": num_tasks}, "cosine_agreement": {"num_tasks": num_tasks},
            "gradvac": {"num_tasks": num_tasks},
            "trimmed_mean": {"trim": 1}}.get(canonical, {})
  if canonical in ("random", "graddrop"):
    kwargs["key"] = jax.random.PRNGKey(0)
  return aggregators.get(canonical, **kwargs)


def make_task(config: TrainConfig) -> Task:
  """The task distribution of ``config`` (Omniglot is loaded, through its cache, here)."""
  init = {"init": config.init} if config.init else {}
  filters = {"filters": config.conv_filters} if config.conv_filters else {}
  if config.task == "omniglot":
    from gajax.tasks import omniglot  # pylint: disable=import-outside-toplevel
    return omniglot.make_task(config.ways, config.shots, config.queries, config.eval_queries,
                              data_dir=config.data_dir or None, split=config.split,
                              downsample=config.conv_downsample, conv=config.conv_impl,
                              head_input=config.conv_head_input, **init, **filters)
  if config.task in IMAGE_TASKS:
    from gajax.tasks import images  # pylint: disable=import-outside-toplevel
    return images.make_task(config.task, config.ways, config.shots, config.queries,
                            config.eval_queries, data_dir=config.data_dir,
                            downsample=config.conv_downsample, conv=config.conv_impl,
                            head_input=config.conv_head_input, **init, **filters)
  eval_queries = 100 if config.eval_queries is None else config.eval_queries
  if config.task == "binary":
    return binary.make_task(shots=config.shots, queries=config.queries, eval_queries=eval_queries)
  return sinusoid.make_task(shots=config.shots, queries=config.queries, eval_queries=eval_queries,
                            **init)


def make_learner(config: TrainConfig, loss_fn, inner_steps: int | None = None) -> algorithms.MetaLearner:
  """The algorithm of ``config`` on ``loss_fn`` (``inner_steps``: override, e.g. for evaluation)."""
  steps = config.inner_steps if inner_steps is None else inner_steps
  # conv_impl="xla" asks for XLA's own convolutions, so the loss is not rewritten into patch
  # products either (gajax.fast_ops.batchable); every other setting keeps the algorithms' default.
  fast = {"fast_ops": config.conv_impl != "xla"}
  if config.algorithm == "metasgd":
    return algorithms.meta_sgd(loss_fn, inner_steps=steps, **fast)
  if config.algorithm == "reptile":
    return algorithms.reptile(loss_fn, inner_steps=steps, inner_lr=config.inner_lr, **fast)
  if config.algorithm == "anil":  # the inner loop adapts the head only (the last Dense layer)
    return algorithms.anil(loss_fn, inner_steps=steps, inner_lr=config.inner_lr,
                           adapt=models.head_mask, **fast)
  if config.algorithm == "maml++":
    return algorithms.maml_plus_plus(
        loss_fn, inner_steps=steps, inner_lr=config.inner_lr, lslr=config.lslr,
        multi_step_loss=config.multi_step_loss, msl_anneal_steps=config.msl_anneal_steps,
        first_order_steps=config.first_order_steps,
        per_step=models.batch_norm_mask if config.bnwb else None, **fast)
  if config.algorithm == "imaml":
    return algorithms.imaml(loss_fn, inner_steps=steps, inner_lr=config.inner_lr,
                            lam=config.imaml_lambda, cg_steps=config.cg_steps,
                            cg_damping=config.cg_damping,
                            inner_optimizer=(optax.adam(config.inner_lr)
                                             if config.imaml_inner_optimizer == "adam" else None),
                            inner_loop=config.imaml_inner_loop, **fast)
  return algorithms.maml(loss_fn, inner_steps=steps, inner_lr=config.inner_lr,
                         first_order=config.algorithm == "fomaml", **fast)


def make_tx(config: TrainConfig) -> optax.GradientTransformation:
  """``chain(aggregator, optimiser)``, inside a non-finite guard when ``config.skip_nonfinite``.

  The guard wraps the whole chain so that a step in which every task is non-finite changes nothing,
  not even the optimiser's moments (:func:`gajax.aggregators.skip_nonfinite_tasks`).
  """
  learning_rate = config.outer_lr
  if config.outer_lr_schedule == "cosine":  # MAML++'s CA: 1e-3 -> 1e-5 over the run
    learning_rate = optax.cosine_decay_schedule(config.outer_lr, config.num_iterations, alpha=0.01)
  optimizer = (optax.adam(learning_rate, eps=config.adam_eps) if config.optimizer == "adam"
               else optax.sgd(learning_rate))
  tx = optax.chain(make_aggregator(config.aggregator, config.meta_batch_size), optimizer)
  return aggregators.skip_nonfinite_tasks(tx) if config.skip_nonfinite else tx


class Experiment(NamedTuple):
  """Pure pieces of one configured run; each may be ``jit``-ed and ``vmap``-ed over seeds.

  Attributes:
    config: the validated config.
    task: the task distribution.
    init: ``key -> MetaState``; every random stream of the run (initialisation, tasks, a random
      aggregator's draws) derives from ``key``.
    step: ``(state, data) -> (state, metrics)``, one meta-step (blocks: ``meta.make_block``); pass
      ``task.train_data`` as ``data``.
    evaluate: ``(params, key, data) -> per-task metric [eval_tasks]``; pass
      :func:`evaluation_data` of the experiment (``task.eval_data``, or the tasks a host-fed task drew).
    place: ``state -> state`` on the devices the step expects (replicated over the task mesh when
      ``num_devices > 1``; the identity otherwise).
  """
  config: TrainConfig
  task: Task
  init: Callable
  step: Callable
  evaluate: Callable
  place: Callable


def make_experiment(config: TrainConfig) -> Experiment:
  """Validates ``config`` and builds its :class:`Experiment`.

  Raises:
    ValueError: an invalid config (see :meth:`TrainConfig.validate`).
  """
  config.validate()
  task = make_task(config)
  learner = make_learner(config, task.loss_fn)
  eval_learner = make_learner(config, task.loss_fn, config.eval_inner_steps)
  tx = make_tx(config)

  def init(key):
    init_key, train_key = jax.random.split(key)
    params = task.init_params(init_key)
    if config.algorithm == "metasgd":
      params = algorithms.meta_sgd_init(params, config.inner_lr)
    if config.algorithm == "maml++" and (config.lslr or config.bnwb):
      params = algorithms.maml_plus_plus_init(
          params, config.inner_lr, config.inner_steps, lslr=config.lslr,
          per_step=models.batch_norm_mask if config.bnwb else None)
    state = meta.init_state(train_key, params, tx)
    return state._replace(opt_state=aggregators.with_key(
        state.opt_state, jax.random.fold_in(key, _AGGREGATOR_STREAM)))

  mesh = None
  num_devices = config.num_devices or jax.local_device_count()
  if num_devices > 1:
    mesh = meta.task_mesh(num_devices)

  def place(state):
    return state if mesh is None else meta.replicate(state, mesh)

  sample = task.sample
  if config.corrupt_fraction > 0:
    # Evaluation stays clean: only the training sampler is wrapped.
    sample = corruption.make_corrupted_sampler(
        sample, fraction=config.corrupt_fraction, kind=config.corruption,
        num_classes=config.ways if config.task in CLASSIFICATION_TASKS else 2)
  step = meta.make_meta_step(learner, tx, sample, config.meta_batch_size, signal=config.signal,
                             mesh=mesh)
  evaluate = meta.make_evaluate(eval_learner, task, config.eval_tasks)
  return Experiment(config, task, init, step, evaluate, place)


def evaluation_data(exp: Experiment):
  """What ``exp.evaluate`` takes as ``data``: ``task.eval_data``; for a task drawn on the host
  (``task.host``), its ``eval_tasks`` evaluation tasks drawn from the config's seed, on the host
  (numpy; copied to the device per evaluation, not held there; :meth:`HostFeed.eval_tasks`)."""
  config, host = exp.config, exp.task.host
  if host is None:
    return exp.task.eval_data
  return host.eval_tasks(config.seed, config.eval_tasks, min(meta.EVAL_CHUNK_SIZE, config.eval_tasks))


def seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """``(train_key, eval_key)`` for a seed; the evaluation tasks depend on the seed only."""
  train_key, eval_key = jax.random.split(jax.random.PRNGKey(seed))
  return train_key, eval_key
