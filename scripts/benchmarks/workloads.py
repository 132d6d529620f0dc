"""The meta-learning workloads of the suites, built with the run factory of ``gajax.train``.

A :class:`Workload` is a name and the ``TrainConfig`` of a run (task, meta-batch, inner loop, Conv-4
settings). Its meta-step is what ``scripts/train.py`` would run for that config: the learner, the
optax chain (aggregator, then Adam) and the step come from ``gajax.train`` (``make_experiment``, or
``make_learner`` / ``make_tx`` and ``meta.make_meta_step``). Two settings differ from a training run:

* the task axis is not sharded (``num_devices=1``) and updates are not screened for non-finite
  tasks (``skip_nonfinite=False``): the chain is the aggregator and Adam alone;
* the Omniglot workloads draw random 28x28x1 images on the device instead of loading Omniglot, so
  no data set is needed (the cost of a meta-step does not depend on pixel values). Their Conv-4 width
  is the workload's ``filters``; the sinusoid MLP is ``gajax.tasks.sinusoid``'s default.
"""

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
from absl import flags

from gajax import meta
from gajax.models import Conv4, resolve_conv_impl
from gajax.tasks import sinusoid
from gajax.tasks.base import Task, classifier_fns
from gajax.train import (Experiment, TrainConfig, make_experiment, make_learner, make_task,
                         make_tx)

FLAGS = flags.FLAGS

BLOCK = 10  # Meta-steps per lax.scan block.
IMAGE_SIZE = 28  # Omniglot's, as gajax.tasks.omniglot resizes it.
# The sinusoid MLP's hidden widths: the task's default (TrainConfig has no width setting).
SINUSOID_HIDDEN = tuple(inspect.signature(sinusoid.make_task).parameters["hidden"].default)
# Settings every workload shares (see the module docstring); aggregator and algorithm vary per step.
BASE = TrainConfig(algorithm="maml", aggregator="mean", optimizer="adam", outer_lr=1e-3,
                   num_devices=1, skip_nonfinite=False)


@dataclasses.dataclass(frozen=True)
class Workload:
  """A named meta-learning workload: a run's config, and Conv-4's width for the Omniglot ones."""
  name: str
  config: TrainConfig
  filters: int = 64  # Conv-4 filters (task="omniglot" only).

  def replace(self, **changes) -> "Workload":
    """This workload with some ``TrainConfig`` fields changed (same name)."""
    return dataclasses.replace(self, config=dataclasses.replace(self.config, **changes))

  def describe(self) -> str:
    c = self.config
    if c.task == "sinusoid":
      widths = "-".join(map(str, SINUSOID_HIDDEN))
      return (f"sinusoid MLP 1-{widths}-1, {c.shots}+{c.queries} pts, {c.meta_batch_size} tasks, "
              f"{c.inner_steps} steps")
    return (f"Conv-4/{c.conv_downsample} ({resolve_conv_impl(c.conv_impl)}) {c.ways}-way "
            f"{c.shots}-shot, {c.meta_batch_size} tasks, {c.inner_steps} steps")


def workload(name, task, num_tasks, inner_steps, inner_lr, shots, queries, *, ways=5,
             downsample="stride", filters=64) -> Workload:
  config = dataclasses.replace(BASE, task=task, meta_batch_size=num_tasks, inner_steps=inner_steps,
                               inner_lr=inner_lr, shots=shots, queries=queries, ways=ways,
                               conv_downsample=downsample)
  return Workload(name, config.validate(), filters)


def meta_configs():
  """Every workload (``--configs`` picks among their names)."""
  if FLAGS.quick:
    return [workload("sinusoid", "sinusoid", 4, 2, 0.01, 5, 5),
            workload("omni2w_stride", "omniglot", 2, 1, 0.4, 1, 1, ways=2, filters=4)]
  configs = [workload("sinusoid", "sinusoid", 25, 5, 0.01, 10, 10)]
  for downsample in ("stride", "pool"):
    # MAML's Omniglot settings: 5-way 1-shot, meta-batch 32, 1 inner step, alpha = 0.4;
    # 20-way 1-shot, meta-batch 16, 5 inner steps, alpha = 0.1. One query image per class.
    configs.append(workload(f"omni5w_{downsample}", "omniglot", 32, 1, 0.4, 1, 1, ways=5,
                            downsample=downsample))
    configs.append(workload(f"omni20w_{downsample}", "omniglot", 16, 5, 0.1, 1, 1, ways=20,
                            downsample=downsample))
  return configs


def named(name):
  return next(w for w in meta_configs() if w.name == name)


def selected(configs):
  """``configs`` narrowed to ``--configs`` when given."""
  if FLAGS.configs is None:
    return configs
  return [c for c in configs if c.name in FLAGS.configs]


def random_omniglot(w: Workload) -> Task:
  """Conv-4 on random Omniglot-shaped images (``[T, ways * k, 28, 28, 1]``, class-major labels).

  The images are drawn on the device inside the meta-step, as the real Omniglot sampler gathers
  them there; ``data`` is unused.
  """
  c = w.config
  model = Conv4(num_classes=c.ways, filters=w.filters, downsample=c.conv_downsample, conv=c.conv_impl)

  def draw(key, num_tasks, per_class):
    images = jax.random.uniform(key, (num_tasks, c.ways * per_class, IMAGE_SIZE, IMAGE_SIZE, 1))
    labels = jnp.broadcast_to(jnp.repeat(jnp.arange(c.ways), per_class),
                              (num_tasks, c.ways * per_class))
    return {"x": images, "y": labels}

  def sample(key, num_tasks, data=None):
    del data  # Generated images: nothing to draw from.
    k_support, k_query = jax.random.split(key)
    return draw(k_support, num_tasks, c.shots), draw(k_query, num_tasks, c.queries)

  loss_fn, accuracy = classifier_fns(model)

  return Task(name="omniglot", sample=sample, eval_sample=sample, loss_fn=loss_fn, metric_fn=accuracy,
              metric="accuracy",
              init_params=lambda key: model.init(key, jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 1))))


def task_of(w: Workload) -> Task:
  """The workload's task: ``gajax.train.make_task`` for the sinusoid, random images for Omniglot."""
  if w.config.task == "omniglot":
    return random_omniglot(w)
  return make_task(w.config)


@functools.lru_cache(maxsize=None)
def experiment(w: Workload, algorithm: str, aggregator: str) -> Experiment:
  """The run of ``w`` with this algorithm and aggregator; ``gajax.train.make_experiment`` where the
  task needs no data set, else the same pieces around :func:`random_omniglot`. Cached."""
  config = dataclasses.replace(w.config, algorithm=algorithm, aggregator=aggregator).validate()
  if config.task != "omniglot":
    return make_experiment(config)
  task = random_omniglot(w)
  tx = make_tx(config)
  step = meta.make_meta_step(make_learner(config, task.loss_fn), tx, task.sample,
                             config.meta_batch_size, signal=config.signal)

  def init(key):
    init_key, train_key = jax.random.split(key)
    return meta.init_state(train_key, task.init_params(init_key), tx)

  evaluate = meta.make_evaluate(make_learner(config, task.loss_fn, config.eval_inner_steps), task,
                                config.eval_tasks)
  return Experiment(config=config, task=task, init=init, step=step, evaluate=evaluate,
                    place=lambda state: state)


@functools.lru_cache(maxsize=None)
def meta_step(w: Workload, algorithm: str, aggregator: str):
  """``(exp, jitted step, args)``: ``jax.jit(exp.step)`` and its ``(state, data)``. Cached, so suites
  share compiled steps."""
  exp = experiment(w, algorithm, aggregator)
  return exp, jax.jit(exp.step), (exp.init(jax.random.PRNGKey(0)), exp.task.train_data)


@functools.lru_cache(maxsize=None)
def scan_block(w: Workload, algorithm: str, aggregator: str):
  """``(block, args)``: ``BLOCK`` meta-steps as one jitted ``lax.scan``, as ``scripts/train.py`` runs
  them; ``block(*args) -> (state, metrics [BLOCK])``. Cached, so suites share one compiled block."""
  exp, _, args = meta_step(w, algorithm, aggregator)
  return jax.jit(meta.make_block(exp.step, BLOCK)), args
