"""Is the inner loop stable at initialisation? Curvature vs 2 / inner_lr, per initialisation scheme.

    python scripts/diagnose_init.py                                    # sinusoid, 5 steps at 0.01
    python scripts/diagnose_init.py --config=configs/omniglot.py:5w1s --seeds=2

The task, its inner loop (inner_lr, inner_steps), the meta-batch size and the data come from --config
(default: configs/sinusoid.py) and its --config.<field> overrides; its init is replaced by each of
--inits in turn.

For each scheme and seed: a fresh initialisation, a meta-batch of training tasks, and per task the
largest-magnitude eigenvalue of the support loss's Hessian (power iteration) and whether the inner
loop raised the support loss. Prints one row per scheme (medians and shares pooled over seeds) and
writes JSON to --json.
"""

import dataclasses
import json
import sys

import jax
import numpy as np
from absl import app, flags

import _cli

from gajax import diagnostics
from gajax.models import INITS
from gajax.experiment import make_task

_cli.define_config()
flags.DEFINE_list("inits", list(INITS), "Initialisation schemes to compare.")
flags.DEFINE_integer("seeds", 3, "Seeds 0..N-1 (initialisation and tasks).")
flags.DEFINE_integer("power_iters", 30, "Power-iteration steps for the top Hessian eigenvalue.")
flags.DEFINE_string("json", None, "Write the results here as JSON.")
FLAGS = flags.FLAGS


def main(argv):
  _cli.start(argv)
  base = _cli.load_config()
  if base.task not in ("sinusoid", "omniglot"):
    sys.exit(f"error: config: task must be sinusoid or omniglot; got {base.task!r}.")
  if FLAGS.seeds < 1 or FLAGS.power_iters < 1:
    sys.exit("error: --seeds and --power_iters must be >= 1.")
  limit = 2.0 / base.inner_lr if base.inner_lr > 0 else float("inf")
  rows = []
  for scheme in FLAGS.inits:
    try:
      # One query point/image: only the support sets are used here.
      config = dataclasses.replace(base, init=scheme, queries=1).validate()
      task = make_task(config)
    except (ValueError, FileNotFoundError) as e:
      sys.exit(f"error: {e}")
    report = jax.jit(lambda p, s, k, loss_fn=task.loss_fn: diagnostics.inner_loop_report(
        loss_fn, p, s, k, inner_lr=base.inner_lr, inner_steps=base.inner_steps,
        iters=FLAGS.power_iters))
    lam, worse, ratio = [], [], []
    for seed in range(FLAGS.seeds):
      k_init, k_tasks, k_power = jax.random.split(jax.random.PRNGKey(seed), 3)
      params = task.init_params(k_init)
      supports, _ = task.sample(k_tasks, base.meta_batch_size, task.train_data)
      r = jax.device_get(report(params, supports, k_power))
      lam.append(r.lambda_max)
      worse.append(r.adapted_support_loss > r.support_loss)
      ratio.append(r.adapted_support_loss / r.support_loss)
    lam, worse, ratio = (np.concatenate(v) for v in (lam, worse, ratio))
    rows.append({"init": scheme, "tasks": int(lam.size), "median_lambda_max": float(np.median(lam)),
                 "share_above_limit": float(np.mean(lam > limit)),
                 "share_inner_loop_worse": float(np.mean(worse)),
                 "median_adapted_over_start": float(np.median(ratio))})
  print(f"{base.task}: {base.inner_steps} inner step(s) at {base.inner_lr} (stability limit "
        f"2 / lr = {limit:g}); {FLAGS.seeds} seeds x {base.meta_batch_size} tasks\n")
  print("| init | median top Hessian eigenvalue | share of tasks above 2 / lr | share whose inner loop "
        "raised the support loss | median support loss after / before |")
  print("|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['init']} | {r['median_lambda_max']:.1f} | {100 * r['share_above_limit']:.0f}% | "
          f"{100 * r['share_inner_loop_worse']:.0f}% | {r['median_adapted_over_start']:.3f} |")
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump({"config": base.to_dict(), "inits": FLAGS.inits, "seeds": FLAGS.seeds,
                 "power_iters": FLAGS.power_iters, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  app.run(main, flags_parser=_cli.parse_flags)
