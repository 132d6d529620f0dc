"""Is the inner loop stable at initialisation? Curvature vs 2 / inner_lr, per initialisation scheme.

    python scripts/diagnose_init.py                                    # sinusoid, 5 steps at 0.01
    python scripts/diagnose_init.py --task=omniglot --data_dir=../shared/data/omniglot/omniglot.tar.gz \
        --ways=5 --shots=1 --inner_lr=0.4 --inner_steps=1

For each scheme and seed: a fresh initialisation, a meta-batch of training tasks, and per task the
largest-magnitude eigenvalue of the support loss's Hessian (power iteration) and whether the inner
loop raised the support loss. Prints one row per scheme (medians and shares pooled over seeds) and
writes JSON to --json.
"""

import json
import sys

import jax
import numpy as np
from absl import app, flags

import _cli

from gajax import diagnostics
from gajax.models import INITS
from gajax.train import TrainConfig, make_task

flags.DEFINE_string("task", "sinusoid", "sinusoid or omniglot.")
flags.DEFINE_list("inits", list(INITS), "Initialisation schemes to compare.")
flags.DEFINE_integer("seeds", 3, "Seeds 0..N-1 (initialisation and tasks).")
flags.DEFINE_integer("meta_batch_size", 25, "Tasks per seed.")
flags.DEFINE_float("inner_lr", 0.01, "Inner learning rate.")
flags.DEFINE_integer("inner_steps", 5, "Inner steps.")
flags.DEFINE_integer("power_iters", 30, "Power-iteration steps for the top Hessian eigenvalue.")
flags.DEFINE_integer("ways", 5, "Omniglot: classes per task.")
flags.DEFINE_integer("shots", 10, "Support examples per task (per class for omniglot).")
flags.DEFINE_string("data_dir", "", "Omniglot: the data (default: $GAJAX_DATA_DIR).")
flags.DEFINE_string("json", None, "Write the results here as JSON.")
FLAGS = flags.FLAGS


def main(argv):
  _cli.start(argv)
  if FLAGS.task not in ("sinusoid", "omniglot"):
    sys.exit(f"error: --task must be sinusoid or omniglot; got {FLAGS.task!r}.")
  if FLAGS.seeds < 1 or FLAGS.meta_batch_size < 1 or FLAGS.power_iters < 1:
    sys.exit("error: --seeds, --meta_batch_size and --power_iters must be >= 1.")
  limit = 2.0 / FLAGS.inner_lr if FLAGS.inner_lr > 0 else float("inf")
  rows = []
  for scheme in FLAGS.inits:
    try:
      config = TrainConfig(task=FLAGS.task, init=scheme, ways=FLAGS.ways, shots=FLAGS.shots,
                           queries=1, data_dir=FLAGS.data_dir, inner_lr=FLAGS.inner_lr,
                           inner_steps=FLAGS.inner_steps).validate()
      task = make_task(config)
    except (ValueError, FileNotFoundError) as e:
      sys.exit(f"error: {e}")
    report = jax.jit(lambda p, s, k, loss_fn=task.loss_fn: diagnostics.inner_loop_report(
        loss_fn, p, s, k, inner_lr=FLAGS.inner_lr, inner_steps=FLAGS.inner_steps,
        iters=FLAGS.power_iters))
    lam, worse, ratio = [], [], []
    for seed in range(FLAGS.seeds):
      k_init, k_tasks, k_power = jax.random.split(jax.random.PRNGKey(seed), 3)
      params = task.init_params(k_init)
      supports, _ = task.sample(k_tasks, FLAGS.meta_batch_size, task.train_data)
      r = jax.device_get(report(params, supports, k_power))
      lam.append(r.lambda_max)
      worse.append(r.adapted_support_loss > r.support_loss)
      ratio.append(r.adapted_support_loss / r.support_loss)
    lam, worse, ratio = (np.concatenate(v) for v in (lam, worse, ratio))
    rows.append({"init": scheme, "tasks": int(lam.size), "median_lambda_max": float(np.median(lam)),
                 "share_above_limit": float(np.mean(lam > limit)),
                 "share_inner_loop_worse": float(np.mean(worse)),
                 "median_adapted_over_start": float(np.median(ratio))})
  print(f"{FLAGS.task}: {FLAGS.inner_steps} inner step(s) at {FLAGS.inner_lr} (stability limit "
        f"2 / lr = {limit:g}); {FLAGS.seeds} seeds x {FLAGS.meta_batch_size} tasks\n")
  print("| init | median top Hessian eigenvalue | share of tasks above 2 / lr | share whose inner loop "
        "raised the support loss | median support loss after / before |")
  print("|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['init']} | {r['median_lambda_max']:.1f} | {100 * r['share_above_limit']:.0f}% | "
          f"{100 * r['share_inner_loop_worse']:.0f}% | {r['median_adapted_over_start']:.3f} |")
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump({"flags": {k: FLAGS[k].value for k in ("task", "inits", "seeds", "meta_batch_size",
                                                         "inner_lr", "inner_steps", "power_iters",
                                                         "ways", "shots")}, "rows": rows}, f,
                indent=2)


if __name__ == "__main__":
  app.run(main)
