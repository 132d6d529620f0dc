"""Suite ``memory``: the memory of second order, plain vs checkpointed inner loop vs first order.

Conv-4/stride-2 5-way 1-shot, 32 tasks (``--quick``: 2-way, 4 filters), at each ``--memory_steps``
inner-step count (``--quick``: 3 only, since each variant's compile takes most of a quick run): the
per-task updates of one meta-batch (sample, per-task updates, mean over tasks) with MAML, MAML with
its inner loop checkpointed (``remat=True``), FOMAML and iMAML (implicit gradients: 5
conjugate-gradient steps, lambda = 2; no backward pass through the loop).
Memory is XLA's compiled analysis (``temp_size_in_bytes``, the working memory of the program; it
grows with the activations kept for the backward pass); time is the interleaved median per call.
Rows carry both as ratios to plain MAML. The device's own peak is not reported: it cannot be reset
between programs, so it would mix the variants.
"""

import dataclasses

import jax
import jax.numpy as jnp

from benchmarks import timing
from benchmarks.common import FLAGS, log, row, timed
from benchmarks.workloads import named, task_of
from gajax import algorithms
from gajax.train import make_learner

VARIANTS = ("maml", "maml+remat", "fomaml", "imaml")
# iMAML's regulariser and solver in these rows: configs/omniglot.py:5w1s_imaml's (lambda = 2, 5 CG
# steps); its inner loop has the row's step count at the row's inner rate.
IMAML = {"imaml_lambda": 2.0, "cg_steps": 5}


def learner_of(config, variant, loss_fn):
  """The variant's one-task learner. ``remat`` is not a run setting: that one comes from
  ``gajax.algorithms.maml`` directly, with the config's inner loop."""
  if variant == "maml+remat":
    return algorithms.maml(loss_fn, inner_steps=config.inner_steps, inner_lr=config.inner_lr,
                           remat=True)
  extra = IMAML if variant == "imaml" else {}
  return make_learner(dataclasses.replace(config, algorithm=variant, **extra), loss_fn)


def run(rows):
  base = named("omni2w_stride" if FLAGS.quick else "omni5w_stride")
  steps = [3] if FLAGS.quick else [int(k) for k in FLAGS.memory_steps]
  for k in steps:
    w = base.replace(inner_steps=k)
    config = w.config
    log(f"memory: {w.describe()}: plain vs checkpointed (remat) second order vs first order")
    task = task_of(w)
    params = task.init_params(jax.random.PRNGKey(0))
    contenders, memory = {}, {}
    for name in VARIANTS:
      learner = learner_of(config, name, task.loss_fn)

      def updates(p, key, data, learner=learner):
        support, query = task.sample(key, config.meta_batch_size, data)
        return jax.tree_util.tree_map(lambda u: jnp.mean(u, axis=0),
                                      algorithms.per_task(learner)(p, support, query))

      args = (params, jax.random.PRNGKey(1), task.train_data)
      compiled = jax.jit(updates).lower(*args).compile()
      analysis = compiled.memory_analysis()
      memory[name] = None if analysis is None else int(analysis.temp_size_in_bytes)
      contenders[name] = (compiled, args)
    timings = timed(contenders)
    for name, t in timings.items():
      mib = memory[name] / 2**20 if memory[name] is not None else float("nan")
      ratio_mem = (memory[name] / memory["maml"]) if memory[name] and memory["maml"] else float("nan")
      rows.append(row("memory", f"{w.name} {k} inner steps, {name}", t, workload=w.describe(),
                      inner_steps=k, variant=name, temp_bytes=memory[name], memory_vs_maml=ratio_mem,
                      baseline="maml", notes=f"{mib:.0f} MiB working memory ({ratio_mem:.2f}x maml's)",
                      **timing.paired_ratio(t, timings["maml"])))
