"""Suite ``meta_step``: meta-iterations/s of the jitted meta-step, and what dispatch costs.

Rows, per workload (see :mod:`benchmarks.workloads`):

* each (algorithm, aggregator) pair's jitted meta-step (sampling, per-task updates, aggregation, Adam),
  timed interleaved; the aggregator rows carry the ratio to the same algorithm with ``mean``. The
  sinusoid MLP gets MAML / FOMAML / Reptile x mean / gradient agreement; Conv-4 on random
  Omniglot-shaped images gets MAML x mean / agreement (``--big`` adds FOMAML, Reptile, max-pooling
  and 20-way 1-shot);
* ``per-task vmap`` vs ``loop``: MAML's per-task updates as one ``vmap`` vs a Python loop calling a
  jitted one-task function (how PyTorch MAML code is usually written);
* ``jit_per_step`` vs ``scan``: ``BLOCK`` calls of ``jax.jit(exp.step)`` vs one jitted ``lax.scan``
  block of ``BLOCK`` steps (how ``scripts/train.py`` runs), per step (Conv-4 only with ``--big``).
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax

from benchmarks import timing
from benchmarks.common import FLAGS, log, row, timed
from benchmarks.workloads import BLOCK, meta_step, named, scan_block, selected, task_of
from gajax import algorithms
from gajax.train import make_learner, make_tx

ALL_PAIRS = tuple((a, g) for a in ("maml", "fomaml", "reptile") for g in ("mean", "gradient_agreement"))


def time_meta_steps(w, pairs):
  """Interleaved timings of ``(algorithm, aggregator)`` meta-steps of ``w``: ``pair -> Timing``."""
  contenders = {}
  for algorithm, aggregator in pairs:
    _, jitted, args = meta_step(w, algorithm, aggregator)
    contenders[(algorithm, aggregator)] = (jitted, args)
  return timed(contenders)


def loop_vs_vmap(w):
  """MAML's per-task updates by ``vmap`` (one jit) vs a Python loop calling a jitted one-task fn.

  Both start from the same pre-sampled meta-batch and end with the same jitted mean + Adam update,
  so the difference is the per-task part alone: one batched program vs ``T`` dispatches of a
  single-task program (how PyTorch MAML code, e.g. learn2learn's examples, is usually written).
  """
  config = dataclasses.replace(w.config, algorithm="maml", aggregator="mean")
  task = task_of(w)
  learner = make_learner(config, task.loss_fn)
  tx = make_tx(config)
  params = task.init_params(jax.random.PRNGKey(0))
  opt_state = tx.init(params)
  support, query = jax.jit(task.sample, static_argnums=1)(jax.random.PRNGKey(1),
                                                          config.meta_batch_size, task.train_data)

  def apply(params, opt_state, stacked):
    updates, opt_state = tx.update(stacked, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  @jax.jit
  def vmapped(params, opt_state, support, query):
    return apply(params, opt_state, algorithms.per_task(learner)(params, support, query))

  single = jax.jit(learner)
  # Stacking the per-task updates happens inside the jitted apply: one dispatch, not one per leaf.
  apply_list = jax.jit(lambda p, s, updates: apply(p, s, jax.tree_util.tree_map(
      lambda *u: jnp.stack(u), *updates)))
  tasks = [jax.tree_util.tree_map(lambda x, i=i: x[i], (support, query))
           for i in range(config.meta_batch_size)]

  def looped(params, opt_state):
    return apply_list(params, opt_state, [single(params, s, q) for s, q in tasks])

  contenders = {"vmap": (vmapped, (params, opt_state, support, query)),
                "loop": (looped, (params, opt_state))}
  return timed(contenders)


def jit_vs_scan(w):
  """``BLOCK`` meta-steps: ``BLOCK`` calls of the jitted step vs one jitted ``lax.scan`` block."""
  _, jitted, args = meta_step(w, "maml", "mean")
  block, _ = scan_block(w, "maml", "mean")
  state, data = args

  def per_step(state):
    for _ in range(BLOCK):
      state, _ = jitted(state, data)
    return state

  contenders = {"scan": (lambda s: block(s, data)[0], (state,)),
                "jit_per_step": (per_step, (state,))}
  return timed(contenders)


def plan():
  """``[(workload, (algorithm, aggregator) pairs, dispatch comparisons?)]`` for this suite.

  A second-order Conv-4 meta-step takes seconds to tens of seconds on a 2-core CPU (and a minute or
  two to compile), so by default Conv-4 gets the MAML pair only (the agreement overhead) on the
  stride-2 net, plus the vmap-vs-loop comparison; ``--big`` adds every algorithm, max-pooling and the
  20-way configs.
  """
  if FLAGS.quick:  # Every compile costs seconds: one pair on the sinusoid, one step on Conv-4.
    steps = [(named("sinusoid"), ALL_PAIRS[:2], True), (named("omni2w_stride"), ALL_PAIRS[:1], True)]
  elif FLAGS.big:
    steps = [(named("sinusoid"), ALL_PAIRS, True), (named("omni5w_stride"), ALL_PAIRS, True),
             (named("omni5w_pool"), ALL_PAIRS, True), (named("omni20w_stride"), ALL_PAIRS, False),
             (named("omni20w_pool"), ALL_PAIRS[:2], False)]
  else:
    steps = [(named("sinusoid"), ALL_PAIRS, True), (named("omni5w_stride"), ALL_PAIRS[:2], True)]
  return [(w, pairs, dispatch) for w, pairs, dispatch in steps if selected([w])]


def add_comparison(rows, w, timings, baseline, label):
  """One row per contender of ``timings``, each with its ratio to ``timings[baseline]``."""
  for name, t in timings.items():
    rows.append(row("meta_step", f"{w.name} {label.format(name)}", t, workload=w.describe(),
                    its_per_s=1.0 / t.median, baseline=baseline,
                    **timing.paired_ratio(t, timings[baseline])))


def run(rows):
  for w, pairs, dispatch in plan():
    log(f"meta_step: {w.describe()}: {len(pairs)} variants, interleaved")
    timings = time_meta_steps(w, pairs)
    for (algorithm, aggregator), t in timings.items():
      extra = {}
      if aggregator != "mean":
        extra = {"baseline": f"{algorithm}+mean",
                 **timing.paired_ratio(t, timings[(algorithm, "mean")])}
      rows.append(row("meta_step", f"{w.name} {algorithm}+{aggregator}", t,
                      workload=w.describe(), algorithm=algorithm, aggregator=aggregator,
                      its_per_s=1.0 / t.median, **extra))
    if not dispatch:
      continue
    log(f"meta_step: {w.describe()}: vmap vs Python loop over tasks (MAML)")
    add_comparison(rows, w, loop_vs_vmap(w), "vmap", "maml per-task {}")
    if w.config.task != "sinusoid" and not FLAGS.big:
      continue  # Ten multi-second Conv-4 steps per sample: only with --big.
    log(f"meta_step: {w.describe()}: one jit per step vs lax.scan blocks of {BLOCK}")
    timings = jit_vs_scan(w)
    for name, t in timings.items():
      per_step = timing.per_call(t, BLOCK)
      extra = {"baseline": "scan", **timing.paired_ratio(t, timings["scan"])}
      rows.append(row("meta_step", f"{w.name} maml+mean {name} (per step, blocks of {BLOCK})",
                      per_step, workload=w.describe(), its_per_s=1.0 / per_step.median, **extra))
