"""Training runs: a validated config -> task, learner, optax chain -> jitted blocks of meta-steps.

``make_experiment(config)`` returns pure functions (``init``, ``block``, ``evaluate``) that can be
``vmap``-ed over seeds; ``train_and_evaluate(config, workdir)`` is the single-run driver behind
``scripts/train.py`` (progress on stdout, ``metrics.jsonl`` and ``eval.json`` in ``workdir``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import time
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from gajax import aggregators, algorithms, meta
from gajax.checkpoint import Checkpointer
from gajax.models import CONV_IMPLS, INITS, resolve_conv_impl
from gajax.tasks import binary, corruption, sinusoid
from gajax.tasks.base import Task

TASKS = ("sinusoid", "binary", "omniglot")
ALGORITHMS = ("maml", "fomaml", "reptile", "metasgd")
SIGNALS = ("self", "displacement")
OPTIMIZERS = ("adam", "sgd")
SPLITS = ("maml", "lake")
DOWNSAMPLES = ("stride", "pool")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Every setting of a run. Defaults: the paper's sinusoid setting, sized for ~2 minutes on 2 CPU cores."""
  task: str = "sinusoid"
  algorithm: str = "maml"
  aggregator: str = "agreement"
  signal: str = "self"
  optimizer: str = "adam"
  meta_batch_size: int = 25
  inner_steps: int = 5
  inner_lr: float = 0.01
  outer_lr: float = 1e-3
  num_iterations: int = 10_000
  shots: int = 10
  queries: int = 10
  eval_queries: int | None = None  # None: 100 points for sinusoid/binary, --queries for omniglot.
  ways: int = 5  # omniglot only
  data_dir: str = ""  # omniglot only; "" means $GAJAX_DATA_DIR
  split: str = "maml"  # omniglot only
  conv_downsample: str = "stride"  # omniglot only
  conv_impl: str = "auto"  # omniglot only: how Conv-4 computes (gajax.models.Conv4.conv)
  init: str = ""  # the model's initialisation (gajax.models.INITS); "": the task's default
  corrupt_fraction: float = 0.0  # share of every training meta-batch's tasks that is corrupted
  corruption: str = ""  # how (gajax.tasks.corruption.CORRUPTIONS); needed when corrupt_fraction > 0
  eval_tasks: int = 1000
  eval_inner_steps: int | None = None  # None: the training value.
  eval_every: int = 0  # 0: evaluate only at the end.
  log_every: int = 500
  num_devices: int = 0  # shard the task axis over this many devices; 0: all local devices
  skip_nonfinite: bool = True  # drop tasks whose update has NaN/Inf (and log how many)
  seed: int = 0

  def validate(self) -> "TrainConfig":
    """Returns ``self`` or raises ``ValueError`` with a one-line message naming the bad setting."""
    def need(ok, msg):
      if not ok:
        raise ValueError(msg)
    need(self.task in TASKS, f"--task must be one of {', '.join(TASKS)}; got {self.task!r}.")
    need(self.algorithm in ALGORITHMS,
         f"--algorithm must be one of {', '.join(ALGORITHMS)}; got {self.algorithm!r}.")
    known = aggregator_names()
    need(self.aggregator in known,
         f"--aggregator must be one of {', '.join(known)}; got {self.aggregator!r}.")
    need(self.signal in SIGNALS, f"--signal must be one of {', '.join(SIGNALS)}; got {self.signal!r}.")
    need(self.signal == "self" or self.algorithm in ("maml", "fomaml", "metasgd"),
         "--signal=displacement needs a MAML-family --algorithm (for reptile the update already is "
         "the displacement).")
    need(self.optimizer in OPTIMIZERS,
         f"--optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}.")
    need(self.split in SPLITS, f"--split must be one of {', '.join(SPLITS)}; got {self.split!r}.")
    need(self.conv_downsample in DOWNSAMPLES,
         f"--conv_downsample must be one of {', '.join(DOWNSAMPLES)}; got {self.conv_downsample!r}.")
    need(self.conv_impl in CONV_IMPLS,
         f"--conv_impl must be one of {', '.join(CONV_IMPLS)}; got {self.conv_impl!r}.")
    need(self.init in INITS + ("",),
         f"--init must be one of {', '.join(INITS)} (or empty for the task's default); "
         f"got {self.init!r}.")
    need(np.isfinite(self.corrupt_fraction) and 0 <= self.corrupt_fraction <= 1,
         f"--corrupt_fraction must be in [0, 1]; got {self.corrupt_fraction}.")
    kinds = (corruption.REGRESSION_CORRUPTIONS if self.task == "sinusoid"
             else corruption.LABEL_CORRUPTIONS)
    need(self.corrupt_fraction == 0 or self.corruption in kinds,
         f"--corruption must be one of {', '.join(kinds)} for --task={self.task} when "
         f"--corrupt_fraction > 0; got {self.corruption!r}.")
    need(self.corruption in corruption.CORRUPTIONS + ("",),
         f"--corruption must be one of {', '.join(corruption.CORRUPTIONS)}; got {self.corruption!r}.")
    need(not (self.init and self.task == "binary"),
         "--init applies to the sinusoid MLP and Omniglot's Conv-4, not to binary's logistic regression.")
    need(self.eval_queries is None or self.eval_queries >= 1,
         f"--eval_queries must be >= 1; got {self.eval_queries}.")
    need(self.task != "omniglot" or self.ways >= 2, f"--ways must be >= 2; got {self.ways}.")
    for name in ("meta_batch_size", "shots", "queries", "eval_tasks", "num_iterations", "log_every"):
      need(getattr(self, name) >= 1, f"--{name} must be >= 1; got {getattr(self, name)}.")
    need(self.aggregator not in ("trimmed_mean", "krum") or self.meta_batch_size >= 3,
         f"--aggregator={self.aggregator} needs --meta_batch_size >= 3.")
    need(self.inner_steps >= 0, f"--inner_steps must be >= 0; got {self.inner_steps}.")
    need(self.algorithm != "reptile" or self.inner_steps >= 1, "--inner_steps must be >= 1 for reptile.")
    need(self.eval_inner_steps is None or self.eval_inner_steps >= 0,
         f"--eval_inner_steps must be >= 0; got {self.eval_inner_steps}.")
    need(self.num_devices >= 0, f"--num_devices must be >= 0; got {self.num_devices}.")
    need(self.eval_every >= 0, f"--eval_every must be >= 0; got {self.eval_every}.")
    for name in ("inner_lr", "outer_lr"):
      value = getattr(self, name)
      need(np.isfinite(value) and value >= 0, f"--{name} must be a finite number >= 0; got {value}.")
    need(self.outer_lr > 0, f"--outer_lr must be > 0; got {self.outer_lr}.")
    return self


def aggregator_names() -> tuple[str, ...]:
  """Names accepted by ``--aggregator``."""
  return aggregators.names() + ("agreement",)


def make_aggregator(name: str, num_tasks: int, seed: int = 0) -> optax.GradientTransformationExtraArgs:
  """The aggregator called ``name`` with the settings scripts use.

  Sized for ``num_tasks`` where its state needs it (both agreements, GradVac); random ones (RLW, GradDrop)
  get a key from ``seed`` (a training run replaces it in ``Experiment.init`` by one derived from the
  run's key); ``trimmed_mean`` cuts one task at each end.
  """
  canonical = aggregators.registry.canonical_name(name)
  kwargs = {"gradient_agreement": {"num_tasks": num_tasks}, "cosine_agreement": {"num_tasks": num_tasks},
            "gradvac": {"num_tasks": num_tasks},
            "trimmed_mean": {"trim": 1}}.get(canonical, {})
  if canonical in ("random", "graddrop"):
    kwargs["key"] = jax.random.fold_in(jax.random.PRNGKey(seed), 7)
  return aggregators.get(canonical, **kwargs)


def make_task(config: TrainConfig) -> Task:
  """The task distribution of ``config`` (Omniglot is loaded, through its cache, here)."""
  init = {"init": config.init} if config.init else {}
  if config.task == "omniglot":
    from gajax.tasks import omniglot  # pylint: disable=import-outside-toplevel
    return omniglot.make_task(config.ways, config.shots, config.queries, config.eval_queries,
                              data_dir=config.data_dir or None, split=config.split,
                              downsample=config.conv_downsample, conv=config.conv_impl, **init)
  eval_queries = 100 if config.eval_queries is None else config.eval_queries
  if config.task == "binary":
    return binary.make_task(shots=config.shots, queries=config.queries, eval_queries=eval_queries)
  return sinusoid.make_task(shots=config.shots, queries=config.queries, eval_queries=eval_queries,
                            **init)


def make_learner(config: TrainConfig, loss_fn, inner_steps: int | None = None) -> algorithms.MetaLearner:
  steps = config.inner_steps if inner_steps is None else inner_steps
  if config.algorithm == "metasgd":
    return algorithms.meta_sgd(loss_fn, inner_steps=steps)
  if config.algorithm == "reptile":
    return algorithms.reptile(loss_fn, inner_steps=steps, inner_lr=config.inner_lr)
  return algorithms.maml(loss_fn, inner_steps=steps, inner_lr=config.inner_lr,
                         first_order=config.algorithm == "fomaml")


def make_tx(config: TrainConfig) -> optax.GradientTransformation:
  optimizer = {"adam": optax.adam, "sgd": optax.sgd}[config.optimizer](config.outer_lr)
  aggregator = make_aggregator(config.aggregator, config.meta_batch_size, config.seed)
  if config.skip_nonfinite:
    aggregator = aggregators.skip_nonfinite_tasks(aggregator)
  return optax.chain(aggregator, optimizer)


class Experiment(NamedTuple):
  """Pure pieces of one configured run; each may be ``jit``-ed and ``vmap``-ed over seeds.

  Attributes:
    config: the validated config.
    task: the task distribution.
    init: ``key -> MetaState``.
    step: ``(state, data) -> (state, metrics)``, one meta-step (blocks: ``meta.make_block``); pass
      ``task.train_data`` as ``data``.
    evaluate: ``(params, key, data) -> per-task metric [eval_tasks]``; pass ``task.eval_data``.
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
  config.validate()
  task = make_task(config)
  learner = make_learner(config, task.loss_fn)
  eval_learner = make_learner(config, task.loss_fn, config.eval_inner_steps)
  tx = make_tx(config)

  random_aggregator = aggregators.registry.canonical_name(config.aggregator) in ("random", "graddrop")

  def init(key):
    init_key, train_key = jax.random.split(key)
    params = task.init_params(init_key)
    if config.algorithm == "metasgd":
      params = algorithms.meta_sgd_init(params, config.inner_lr)
    state = meta.init_state(train_key, params, tx)
    if random_aggregator:
      # The aggregator's stream comes from the run's key here, not from the key it was built with, so
      # that under a vmap over seeds (run_seeds) each seed gets the stream of its own single run.
      state = state._replace(opt_state=optax.tree_utils.tree_set(
          state.opt_state, key=jax.random.fold_in(key, 7)))
    return state

  def place(state):
    return state if mesh is None else meta.replicate(state, mesh)

  mesh = None
  num_devices = config.num_devices or jax.local_device_count()
  if num_devices > 1:
    mesh = meta.task_mesh(num_devices)
  sample = task.sample
  if config.corrupt_fraction > 0:
    # Evaluation stays clean: only the training sampler is wrapped.
    sample = corruption.make_corrupted_sampler(
        sample, fraction=config.corrupt_fraction, kind=config.corruption,
        num_classes=config.ways if config.task == "omniglot" else 2)
  step = meta.make_meta_step(learner, tx, sample, config.meta_batch_size, signal=config.signal,
                             mesh=mesh)
  evaluate = meta.make_evaluate(eval_learner, task, config.eval_tasks, scan=not uses_host_loops(config))
  return Experiment(config, task, init, step, evaluate, place)


def uses_host_loops(config: TrainConfig) -> bool:
  """Whether to loop over jitted steps on the host instead of one ``lax.scan`` (see meta.make_block).

  Only for Conv-4 with library convolutions (``--conv_impl=xla``) on XLA's CPU backend, which runs
  convolutions inside a ``while`` loop several times slower than at the top level of a program. The
  CPU default (``matmul``) has no convolutions and runs as fast in a scan; on GPU the scan wins too.
  """
  return (config.task == "omniglot" and jax.default_backend() == "cpu"
          and resolve_conv_impl(config.conv_impl) == "xla")


def make_jit(config: TrainConfig, fn: Callable) -> Callable:
  """``jax.jit(fn)``, unless ``fn`` already is a host loop over jitted pieces."""
  return fn if uses_host_loops(config) else jax.jit(fn)


def make_block(exp: Experiment, count: int, *, vmap_seeds: bool = False) -> Callable:
  """A compiled block of ``count`` meta-steps ``(state, data) -> (state, metrics)``.

  One ``lax.scan``, except where :func:`uses_host_loops` says a host loop over a jitted step is
  faster (see :func:`gajax.meta.make_block`). ``vmap_seeds`` batches the step over a leading
  seed axis of the state.
  """
  step = jax.vmap(exp.step, in_axes=(0, None)) if vmap_seeds else exp.step
  if uses_host_loops(exp.config):
    return meta.make_block(step, count, scan=False)
  return jax.jit(meta.make_block(step, count))


def seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """``(train_key, eval_key)`` for a seed; the evaluation tasks depend on the seed only."""
  train_key, eval_key = jax.random.split(jax.random.PRNGKey(seed))
  return train_key, eval_key


def to_numpy(tree):
  """Host copies of every leaf; arrays spanning other processes' devices are gathered first."""
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree_util.tree_map(one, tree)


def _to_host(tree):
  return jax.tree_util.tree_map(lambda x: x.tolist(), to_numpy(tree))


# Settings that may change when a run is resumed: they do not change what the meta-steps compute.
RESUMABLE_CHANGES = ("num_iterations", "eval_tasks", "eval_every", "eval_queries", "eval_inner_steps",
                     "log_every", "data_dir", "num_devices", "conv_impl")


def prepare_workdir(config: TrainConfig, workdir: str, overwrite: bool = False) -> None:
  """Creates ``workdir`` or checks that the run it holds used compatible settings.

  Raises:
    ValueError: the workdir holds a run whose settings differ in anything but
      :data:`RESUMABLE_CHANGES` (and ``overwrite`` is false).
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  if overwrite:
    for name in ("metrics.jsonl", "eval.json", "config.json"):
      if os.path.exists(os.path.join(workdir, name)):
        os.remove(os.path.join(workdir, name))
    shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    new = dataclasses.asdict(config)
    # A setting added after the run was written (absent from its config.json) had its default then.
    defaults = dataclasses.asdict(TrainConfig())
    diff = [k for k in sorted(set(old) | set(new))
            if k not in RESUMABLE_CHANGES and old.get(k, defaults.get(k)) != new.get(k)]
    if diff:
      detail = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
      raise ValueError(f"{workdir} holds a run with other settings ({detail}); use another "
                       "--workdir or pass --overwrite to discard it.")
  _atomic_write(path, json.dumps(dataclasses.asdict(config), indent=2))


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds an exclusive lock on ``workdir`` for one run; a second run on it is refused at once.

  An ``flock`` on ``<workdir>/lock``: the operating system drops it when the holding process ends,
  however it ends, so a run killed with SIGKILL leaves nothing that blocks the resume that follows.

  Raises:
    ValueError: another live process holds the workdir (its pid is in the message).
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "lock")
  handle = open(path, "a+")  # pylint: disable=consider-using-with
  try:
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      handle.seek(0)
      holder = handle.read().strip() or "unknown"
      raise ValueError(f"{workdir} is in use by another run (pid {holder}); wait for it to finish or "
                       "use another workdir.") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    yield
  finally:
    handle.close()  # releases the lock


def _atomic_write(path: str, text: str) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def train_and_evaluate(config: TrainConfig, workdir: str, *, checkpoint_every: int = 1000,
                       overwrite: bool = False, max_train_seconds: Optional[float] = None,
                       print_fn: Callable = print) -> dict:
  """Trains one run, printing progress, and writes ``metrics.jsonl`` and ``eval.json`` to ``workdir``.

  Every ``checkpoint_every`` meta-steps (and at the end) the whole state is checkpointed with orbax
  (see :mod:`gajax.checkpoint`). Calling this again with the same ``workdir`` resumes from the latest
  checkpoint: ``metrics.jsonl`` is cut back to where it stood at that checkpoint, so it never holds a
  step twice or misses one, and on CPU the resumed run ends with bit-identical parameters and
  ``eval.json`` to an uninterrupted one (blocks of steps start at the same steps either way).

  ``max_train_seconds`` is a wall-clock budget for this call's training: once a block of steps ends
  past it, the state is checkpointed at that step and the run is evaluated there (``eval.json`` then
  has ``"stopped_early": true`` and ``"steps"`` < ``num_iterations``); calling again resumes towards
  ``num_iterations``. Compilation counts towards the budget.

  Returns the ``eval.json`` contents.
  """
  if checkpoint_every < 1:
    raise ValueError(f"--checkpoint_every must be >= 1; got {checkpoint_every}.")
  if max_train_seconds is not None and not max_train_seconds > 0:
    raise ValueError(f"--max_train_minutes must be > 0; got {max_train_seconds / 60:g}.")
  exp = make_experiment(config)
  with workdir_lock(workdir):
    return _train_and_evaluate(exp, workdir, checkpoint_every, overwrite, max_train_seconds, print_fn)


def _train_and_evaluate(exp, workdir, checkpoint_every, overwrite, max_train_seconds, print_fn):
  config = exp.config
  prepare_workdir(config, workdir, overwrite)
  train_key, eval_key = seed_keys(config.seed)
  blocks = {}  # block length -> jitted block of meta-steps
  evaluate = make_jit(exp.config, exp.evaluate)
  state = exp.init(train_key)
  checkpointer = Checkpointer(workdir)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if checkpointer.latest_step() is not None:
    state, info = checkpointer.restore(state)
    if int(state.step) > config.num_iterations:
      raise ValueError(f"{workdir} holds a checkpoint at step {int(state.step)}, past "
                       f"--num_iterations={config.num_iterations}.")
    with open(metrics_path, "r+") as f:
      f.truncate(info["metrics_bytes"])
    print_fn(f"resumed from the checkpoint at step {int(state.step)} in {workdir}")
  else:
    open(metrics_path, "w").close()
  state = exp.place(state)

  with open(metrics_path, "a") as metrics_file:
    start, done = time.perf_counter(), int(state.step)
    first = done
    while done < config.num_iterations:
      count = min(config.log_every, config.num_iterations - done,
                  checkpoint_every - done % checkpoint_every)
      if config.eval_every:
        count = min(count, config.eval_every - done % config.eval_every)
      if count not in blocks:
        blocks[count] = make_block(exp, count)
      state, metrics = blocks[count](state, exp.task.train_data)
      metrics = _to_host(metrics)
      for i in range(count):
        metrics_file.write(json.dumps({"step": done + i + 1, **{k: v[i] for k, v in metrics.items()}})
                           + "\n")
      done += count
      if config.eval_every and (done % config.eval_every == 0 or done == config.num_iterations):
        mean, ci = meta.mean_ci95(to_numpy(evaluate(state.params, eval_key, exp.task.eval_data)))
        metrics_file.write(json.dumps({"step": done, "eval_mean": float(mean),
                                       "eval_ci95": float(ci)}) + "\n")
      metrics_file.flush()
      out_of_time = (max_train_seconds is not None
                     and time.perf_counter() - start > max_train_seconds)
      if done % checkpoint_every == 0 or done == config.num_iterations or out_of_time:
        os.fsync(metrics_file.fileno())
        checkpointer.save(done, to_numpy(state), {"metrics_bytes": metrics_file.tell()})
      skipped = int(np.sum(metrics.get("skipped_tasks", 0)))
      print_fn(f"step {done:>7d}/{config.num_iterations}  support_loss "
               f"{np.mean(metrics['support_loss']):.4f}  query_loss "
               f"{np.mean(metrics['query_loss']):.4f}  inner loop worse "
               f"{100 * np.mean(metrics['inner_worse_fraction']):.0f}%  "
               f"{(done - first) / (time.perf_counter() - start):.1f} it/s"
               + (f"  skipped {skipped} non-finite tasks" if skipped else ""), flush=True)
      if out_of_time and done < config.num_iterations:
        print_fn(f"time budget of {max_train_seconds:.0f} s spent at step {done}: checkpointed; "
                 "evaluating here (run again with the same --workdir to go on)")
        break
  checkpointer.close()
  train_seconds = time.perf_counter() - start

  values = to_numpy(evaluate(state.params, eval_key, exp.task.eval_data))
  mean, ci = meta.mean_ci95(values)
  result = {"metric": exp.task.metric, "mean": float(mean), "ci95": float(ci),
            "num_tasks": int(values.shape[0]), "seed": config.seed, "steps": int(state.step),
            "stopped_early": int(state.step) < config.num_iterations,
            "train_seconds_this_call": train_seconds, "device": jax.devices()[0].device_kind,
            "config": dataclasses.asdict(config)}
  _atomic_write(os.path.join(workdir, "eval.json"), json.dumps(result, indent=2))
  print_fn(f"eval: {exp.task.metric} {result['mean']:.4f} ± {result['ci95']:.4f} "
           f"(95% CI over {result['num_tasks']} unseen tasks)")
  return result


def run_seeds(config: TrainConfig, seeds: list[int], *, workdir: Optional[str] = None,
              checkpoint_every: int = 1000, print_fn: Callable = print) -> dict:
  """Trains and evaluates ``config`` for several seeds at once: one ``jit`` of a ``vmap`` over seeds.

  Seed ``s`` gets exactly the keys that ``train_and_evaluate`` would use for ``--seed=s``, so each
  seed's run is the single run with that seed (up to floating-point reassociation under ``vmap``).

  With ``workdir``, the seed-stacked state is checkpointed every ``checkpoint_every`` meta-steps and
  at the end, and a call with the same ``workdir`` resumes from the latest checkpoint (``config.json``
  guards the settings as in :func:`train_and_evaluate`; ``num_iterations`` may grow, so a finished
  10,000-step run can be continued to 70,000). A finished run is only evaluated again.

  Returns:
    ``{"metric", "per_seed": [mean over eval tasks, one per seed], "per_seed_ci95": [...],
    "seconds", "steps"}``, ``seconds`` being this call's wall time.
  """
  if checkpoint_every < 1:
    raise ValueError(f"checkpoint_every must be >= 1; got {checkpoint_every}.")
  # Seeds are vmapped on one device; sharding tasks inside a vmap over seeds is not set up here.
  exp = make_experiment(dataclasses.replace(config, num_devices=1))
  keys = [seed_keys(s) for s in seeds]
  train_keys = jnp.stack([k[0] for k in keys])
  eval_keys = jnp.stack([k[1] for k in keys])
  state = jax.vmap(exp.init)(train_keys)
  with contextlib.ExitStack() as stack:
    if workdir is not None:
      stack.enter_context(workdir_lock(workdir))
    return _run_seeds(config, seeds, exp, state, eval_keys, workdir, checkpoint_every, print_fn)


def _run_seeds(config, seeds, exp, state, eval_keys, workdir, checkpoint_every, print_fn):
  checkpointer = None
  if workdir is not None:
    prepare_workdir(config, workdir)
    checkpointer = Checkpointer(workdir)
    if checkpointer.latest_step() is not None:
      state, info = checkpointer.restore(state)
      if info.get("seeds") != list(seeds):
        raise ValueError(f"{workdir} holds a run of seeds {info.get('seeds')}, not {list(seeds)}; "
                         "use another workdir.")
      if int(state.step[0]) > config.num_iterations:
        raise ValueError(f"{workdir} holds a checkpoint at step {int(state.step[0])}, past "
                         f"num_iterations={config.num_iterations}.")
      print_fn(f"  resumed from the checkpoint at step {int(state.step[0])} in {workdir}")
  blocks = {}
  start = time.perf_counter()
  done = first = int(state.step[0])
  while done < config.num_iterations:
    count = min(config.log_every, config.num_iterations - done,
                checkpoint_every - done % checkpoint_every)
    if count not in blocks:
      blocks[count] = make_block(exp, count, vmap_seeds=True)
    state, metrics = blocks[count](state, exp.task.train_data)
    done += count
    if checkpointer is not None and (done % checkpoint_every == 0 or done == config.num_iterations):
      checkpointer.save(done, to_numpy(state), {"seeds": list(seeds)})
    loss = np.asarray(metrics["query_loss"]).mean(axis=0)  # metrics are [count, seeds]
    print_fn(f"  step {done:>7d}/{config.num_iterations}  query_loss per seed "
             f"{np.array2string(loss, precision=3)}  "
             f"{(done - first) / (time.perf_counter() - start):.1f} it/s", flush=True)
  if checkpointer is not None:
    checkpointer.close()
  if uses_host_loops(exp.config):
    values = jnp.stack([exp.evaluate(jax.tree_util.tree_map(lambda x: x[i], state.params), k,
                                     exp.task.eval_data) for i, k in enumerate(eval_keys)])
  else:
    values = jax.jit(jax.vmap(exp.evaluate, in_axes=(0, 0, None)))(state.params, eval_keys,
                                                                      exp.task.eval_data)
  means, cis = jax.vmap(meta.mean_ci95)(values)
  return {"metric": exp.task.metric, "per_seed": np.asarray(means).tolist(),
          "per_seed_ci95": np.asarray(cis).tolist(), "seconds": time.perf_counter() - start,
          "steps": done}
