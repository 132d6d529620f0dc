"""The training loop: one run, or several seeds at once in one program, with checkpoints and resume.

One loop serves both: :func:`train_and_evaluate` runs one seed, :func:`run_seeds` runs the same loop
on a state with a leading seed axis (every block of meta-steps is ``jit(vmap(...))`` over seeds, as in
purejaxrl's ``make_train``). Each writes ``metrics.jsonl``, checkpoints and ``eval.json`` to its
workdir and resumes from it (see :func:`train`). The pieces it runs come from
:func:`gajax.experiment.make_experiment`; the config is a :class:`gajax.config.TrainConfig`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from gajax import meta
from gajax.checkpoint import Checkpointer
from gajax.config import TrainConfig
from gajax.experiment import (Experiment, evaluation_data, make_aggregator, make_experiment,
                              make_learner, make_task, make_tx, seed_keys)
from gajax.workdir import RESUMABLE_CHANGES, atomic_write, prepare_workdir, workdir_lock

__all__ = ["TrainConfig", "Experiment", "evaluation_data", "make_aggregator", "make_experiment", "make_learner",
           "make_task", "make_tx", "seed_keys", "RESUMABLE_CHANGES", "prepare_workdir", "workdir_lock",
           "make_block", "train", "train_and_evaluate", "run_seeds", "to_numpy"]


def make_block(exp: Experiment, count: int, *, vmap_seeds: bool = False) -> Callable:
  """A jitted block of ``count`` meta-steps ``(state, data) -> (state, metrics)`` in one ``lax.scan``.

  ``vmap_seeds`` batches the step over a leading seed axis of the state (metrics then are
  ``[count, seeds, ...]``).
  """
  step = jax.vmap(exp.step, in_axes=(0, None)) if vmap_seeds else exp.step
  return jax.jit(meta.make_block(step, count))


def to_numpy(tree):
  """Host copies of every leaf; arrays spanning other processes' devices are gathered first."""
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree_util.tree_map(one, tree)


def _to_host(tree):
  return jax.tree_util.tree_map(lambda x: x.tolist(), to_numpy(tree))


def train_and_evaluate(config: TrainConfig, workdir: str, *, checkpoint_every: int = 1000,
                       overwrite: bool = False, max_train_seconds: Optional[float] = None,
                       print_fn: Callable = print) -> dict:
  """Trains one run, printing progress, and writes ``metrics.jsonl`` and ``eval.json`` to ``workdir``.

  :func:`train` with one seed (``config.seed``) and no seed axis; see there for checkpoints, resume
  and ``max_train_seconds``. On CPU a resumed run ends with bit-identical parameters and ``eval.json``
  to an uninterrupted one (blocks of steps start at the same steps either way).

  Returns the ``eval.json`` contents: ``metric``, ``mean``, ``ci95`` (95% interval over the
  evaluation tasks), ``num_tasks``, ``seed``, ``steps``, ``stopped_early``,
  ``train_seconds_this_call``, ``device`` and ``config``.
  """
  return train(config, workdir, checkpoint_every=checkpoint_every, overwrite=overwrite,
               max_train_seconds=max_train_seconds, print_fn=print_fn)


def run_seeds(config: TrainConfig, seeds: Sequence[int], *, workdir: Optional[str] = None,
              checkpoint_every: int = 1000, print_fn: Callable = print) -> dict:
  """Trains and evaluates ``config`` for several seeds at once: one ``jit`` of a ``vmap`` over seeds.

  :func:`train` with ``seeds``. Seed ``s`` gets exactly the keys of a single run with ``seed=s``, so
  each seed's run is that single run (up to floating-point reassociation under ``vmap``). Seeds run
  on one device (``num_devices`` is set to 1).

  Returns:
    ``{"metric", "per_seed": [mean over eval tasks, one per seed], "per_seed_ci95": [...],
    "seconds", "steps"}``, ``seconds`` being this call's wall time.
  """
  result = train(dataclasses.replace(config, num_devices=1), workdir, seeds=seeds,
                 checkpoint_every=checkpoint_every, print_fn=print_fn)
  return {"metric": result["metric"], "per_seed": result["mean"], "per_seed_ci95": result["ci95"],
          "seconds": result["train_seconds_this_call"], "steps": result["steps"]}


def train(config: TrainConfig, workdir: Optional[str] = None, *, seeds: Optional[Sequence[int]] = None,
          checkpoint_every: int = 1000, overwrite: bool = False,
          max_train_seconds: Optional[float] = None, print_fn: Callable = print) -> dict:
  """The training loop: blocks of jitted meta-steps, logging, evaluation, checkpoints, resume.

  Args:
    config: the run's settings (validated here).
    workdir: where ``config.json``, ``metrics.jsonl`` (one line per meta-step; with ``seeds``, each
      value a list over seeds), ``checkpoints/`` and ``eval.json`` go. ``None`` (only with
      ``seeds``) trains in memory. The workdir is locked for the call (:func:`workdir_lock`): a
      second run on it is refused. Calling again with the same workdir resumes from the latest
      checkpoint, and ``metrics.jsonl`` is cut back to where it stood then, so it never holds a step
      twice or misses one; ``num_iterations`` may grow between calls.
    seeds: train these seeds at once, the state carrying a leading seed axis; ``None``: the single
      run of ``config.seed``.
    checkpoint_every: meta-steps between checkpoints (one is also written at the end).
    overwrite: discard a run already in ``workdir`` instead of resuming it.
    max_train_seconds: a wall-clock budget for this call's training (compilation included): once a
      block ends past it, the state is checkpointed and evaluated there (``stopped_early`` true,
      ``steps`` < ``num_iterations``); calling again resumes.
    print_fn: where progress lines go.

  Returns:
    The ``eval.json`` contents (see :func:`train_and_evaluate`); with ``seeds``, ``mean`` and
    ``ci95`` are lists over seeds and ``seed`` is the list of seeds.

  Raises:
    ValueError: a bad config or argument, a workdir in use, or one holding another run.
  """
  if checkpoint_every < 1:
    raise ValueError(f"checkpoint_every must be >= 1; got {checkpoint_every}.")
  if max_train_seconds is not None and not max_train_seconds > 0:
    raise ValueError(f"max_train_seconds must be > 0; got {max_train_seconds}.")
  if workdir is None and seeds is None:
    raise ValueError("train: a single run needs a workdir (for metrics.jsonl and eval.json).")
  if seeds is not None:
    seeds = [int(s) for s in seeds]
    if not seeds:
      raise ValueError("train: seeds must name at least one seed.")
  exp = make_experiment(config)
  with contextlib.ExitStack() as stack:
    if workdir is not None:
      stack.enter_context(workdir_lock(workdir))
      prepare_workdir(config, workdir, overwrite)
    return _loop(exp, workdir, seeds, checkpoint_every, max_train_seconds, print_fn)


def _loop(exp, workdir, seeds, checkpoint_every, max_train_seconds, print_fn):
  config = exp.config
  stacked = seeds is not None
  host = exp.task.host
  if host is not None and stacked:
    raise ValueError(f"task={config.task} draws its tasks on the host, one run at a time: train one "
                     "seed per call (no seeds=[...]).")
  keys = [seed_keys(s) for s in (seeds if stacked else [config.seed])]
  if stacked:
    state = jax.vmap(exp.init)(jnp.stack([k[0] for k in keys]))
    eval_key = jnp.stack([k[1] for k in keys])
    evaluate = jax.jit(jax.vmap(exp.evaluate, in_axes=(0, 0, None)))
  else:
    state, eval_key = exp.init(keys[0][0]), keys[0][1]
    evaluate = jax.jit(exp.evaluate)

  def steps_of(state):
    return int(np.asarray(state.step).reshape(-1)[0])

  checkpointer = metrics_file = None
  if workdir is not None:
    checkpointer = Checkpointer(workdir)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if checkpointer.latest_step() is not None:
      state, info = checkpointer.restore(state)
      if stacked and info.get("seeds") != seeds:
        raise ValueError(f"{workdir} holds a run of seeds {info.get('seeds')}, not {seeds}; use "
                         "another workdir.")
      if steps_of(state) > config.num_iterations:
        raise ValueError(f"{workdir} holds a checkpoint at step {steps_of(state)}, past "
                         f"num_iterations={config.num_iterations}.")
      if os.path.exists(metrics_path):
        with open(metrics_path, "r+") as f:
          f.truncate(info.get("metrics_bytes", os.path.getsize(metrics_path)))
      print_fn(f"resumed from the checkpoint at step {steps_of(state)} in {workdir}")
    else:
      open(metrics_path, "w").close()
    metrics_file = open(metrics_path, "a")  # pylint: disable=consider-using-with
  state = exp.place(state)

  eval_data = feed = None

  def evaluate_now(params):
    return to_numpy(evaluate(params, eval_key, eval_data))

  last_eval = None  # (step, per-task values) of the latest in-loop evaluation
  blocks = {}  # block length -> jitted block of meta-steps
  start = time.perf_counter()
  done = first = steps_of(state)
  shown = None  # metrics since the last progress line
  try:
    eval_data = evaluation_data(exp)
    if host is not None:
      # One meta-batch per step, drawn on the host and prefetched while the step before runs; the
      # draw of step s depends on (seed, s) only, so a resumed run sees the same tasks.
      feed = host.train_batches(config.seed, config.meta_batch_size, range(done, config.num_iterations))
    while done < config.num_iterations:
      count = min(config.log_every, config.num_iterations - done,
                  checkpoint_every - done % checkpoint_every)
      if config.eval_every:
        count = min(count, config.eval_every - done % config.eval_every)
      if feed is not None:
        count = 1
      if count not in blocks:
        blocks[count] = make_block(exp, count, vmap_seeds=stacked)
      state, metrics = blocks[count](state, next(feed) if feed is not None else exp.task.train_data)
      metrics = _to_host(metrics)
      shown = metrics if shown is None else {k: shown[k] + v for k, v in metrics.items()}
      done += count
      if metrics_file is not None:
        for i in range(count):
          metrics_file.write(json.dumps({"step": done - count + i + 1,
                                         **{k: v[i] for k, v in metrics.items()}}) + "\n")
      if config.eval_every and (done % config.eval_every == 0 or done == config.num_iterations):
        last_eval = (done, evaluate_now(state.params))
        means, cis = _summarise(last_eval[1], stacked)
        if metrics_file is not None:
          metrics_file.write(json.dumps({"step": done, "eval_mean": means, "eval_ci95": cis}) + "\n")
      out_of_time = (max_train_seconds is not None
                     and time.perf_counter() - start > max_train_seconds)
      if checkpointer is not None and (done % checkpoint_every == 0 or done == config.num_iterations
                                       or out_of_time):
        metrics_file.flush()
        os.fsync(metrics_file.fileno())
        info = {"metrics_bytes": metrics_file.tell(), **({"seeds": seeds} if stacked else {})}
        checkpointer.save(done, to_numpy(state), info)
      elif metrics_file is not None:
        metrics_file.flush()
      if (feed is None or done % config.log_every == 0 or done == config.num_iterations or out_of_time
          or (config.eval_every and done % config.eval_every == 0)):
        print_fn(_progress_line(shown, done, config.num_iterations,
                                (done - first) / (time.perf_counter() - start)), flush=True)
        shown = None
      if out_of_time and done < config.num_iterations:
        print_fn(f"time budget of {max_train_seconds:.0f} s spent at step {done}: checkpointed; "
                 "evaluating here (run again with the same workdir to go on)")
        break
  finally:
    if feed is not None:
      feed.close()
    if metrics_file is not None:
      metrics_file.close()
    if checkpointer is not None:
      checkpointer.close()
  train_seconds = time.perf_counter() - start

  # An evaluation at the final step (eval_every dividing it) is not run twice.
  values = (last_eval[1] if last_eval is not None and last_eval[0] == steps_of(state)
            else evaluate_now(state.params))
  means, cis = _summarise(values, stacked)
  result = {"metric": exp.task.metric, "mean": means, "ci95": cis,
            "num_tasks": int(values.shape[-1]), "seed": seeds if stacked else config.seed,
            "steps": steps_of(state), "stopped_early": steps_of(state) < config.num_iterations,
            "train_seconds_this_call": train_seconds, "device": jax.devices()[0].device_kind,
            "config": config.to_dict()}
  if feed is not None:  # how long the device waited on the host pipeline (first batch included)
    result["input_wait_seconds_this_call"] = feed.wait_seconds
    print_fn(f"input: waited {feed.wait_seconds:.1f} s of {train_seconds:.1f} s of training on the host "
             f"pipeline ({100 * feed.wait_seconds / max(train_seconds, 1e-9):.1f}%)")
  if workdir is not None:
    atomic_write(os.path.join(workdir, "eval.json"), json.dumps(result, indent=2))
  print_fn(f"eval: {exp.task.metric} {_fmt(means)} ± {_fmt(cis)} "
           f"(95% CI over {result['num_tasks']} unseen tasks{' per seed' if stacked else ''})")
  return result


def _summarise(values: np.ndarray, stacked: bool):
  """Mean and 95% half-width over evaluation tasks: floats, or lists over seeds when ``stacked``."""
  if stacked:
    means, cis = jax.vmap(meta.mean_ci95)(jnp.asarray(values))
    return np.asarray(means).tolist(), np.asarray(cis).tolist()
  mean, ci = meta.mean_ci95(jnp.asarray(values))
  return float(mean), float(ci)


def _fmt(value) -> str:
  if isinstance(value, list):
    return "[" + " ".join(f"{v:.4f}" for v in value) + "]"
  return f"{value:.4f}"


def _progress_line(metrics: dict, done: int, total: int, rate: float) -> str:
  """One line per block: the block's mean losses (per seed when there is a seed axis)."""
  def block_mean(name):
    value = np.mean(np.asarray(metrics[name], np.float64), axis=0)  # over the block's steps
    return value.tolist() if value.ndim else float(value)

  worse = np.mean(metrics["inner_worse_fraction"])
  skipped = int(np.sum(metrics.get("skipped_tasks", 0)))
  return (f"step {done:>7d}/{total}  support_loss {_fmt(block_mean('support_loss'))}  query_loss "
          f"{_fmt(block_mean('query_loss'))}  inner loop worse {100 * worse:.0f}%  {rate:.1f} it/s"
          + (f"  skipped {skipped} non-finite tasks" if skipped else ""))
