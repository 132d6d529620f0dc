"""Is iMAML's implicit meta-gradient the gradient of its inner loop, at a run's checkpoint?

    python scripts/diagnose_imaml.py --workdir=runs/omni_cpu_imaml_mean --step=1000
    python scripts/diagnose_imaml.py --workdir=... --cg_steps=5,50 --cg_damping=0,22 --tasks=6

The run's config.json gives the task, the inner loop (inner_steps, inner_lr, imaml_lambda) and the
data; the checkpoint (--step, default the latest) gives the meta-parameters. For --tasks training
tasks (a fixed key) and every pair of --cg_steps and --cg_damping, iMAML's update is set beside the
gradient differentiated through the same inner loop (gajax.diagnostics.implicit_gradient_report):
their cosine and norm ratio, and the support Hessian's extreme eigenvalues at the adapted
parameters. Prints one row per pair and writes JSON to --json.
"""

import itertools
import json
import sys

import jax
import numpy as np
from absl import app, flags

import _cli

from gajax import diagnostics
from gajax.checkpoint import Checkpointer
from gajax.experiment import make_experiment, seed_keys
from gajax.workdir import load_config

flags.DEFINE_string("workdir", None, "An iMAML training run's workdir (config.json, checkpoints/).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_integer("tasks", 6, "Training tasks to compare on.")
flags.DEFINE_list("cg_steps", ["5", "50"], "Conjugate-gradient steps to try.")
flags.DEFINE_list("cg_damping", ["0"], "CG damping values mu to try (gajax.algorithms.imaml).")
flags.DEFINE_integer("power_iters", 30, "Power-iteration steps for each Hessian eigenvalue.")
flags.DEFINE_string("json", None, "Write the results here as JSON.")
FLAGS = flags.FLAGS


def _numbers(name, kind):
  try:
    values = [kind(v) for v in FLAGS[name].value]
  except ValueError:
    sys.exit(f"error: --{name} must be a comma-separated list of {kind.__name__}s; "
             f"got {','.join(FLAGS[name].value)!r}.")
  if not values or any(not np.isfinite(v) or v < (1 if kind is int else 0) for v in values):
    sys.exit(f"error: --{name} values must be >= {1 if kind is int else 0}; got {values}.")
  return values


def main(argv):
  _cli.start(argv)
  if not FLAGS.workdir:
    sys.exit("error: --workdir is required.")
  cg_steps, dampings = _numbers("cg_steps", int), _numbers("cg_damping", float)
  if FLAGS.tasks < 1 or FLAGS.power_iters < 1:
    sys.exit("error: --tasks and --power_iters must be >= 1.")
  try:
    config = load_config(FLAGS.workdir)
    if config.algorithm != "imaml":
      raise ValueError(f"{FLAGS.workdir} is a {config.algorithm} run; this diagnoses imaml runs.")
    exp = make_experiment(config)
    state, _ = Checkpointer(FLAGS.workdir).restore(exp.init(seed_keys(config.seed)[0]), FLAGS.step)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  k_tasks, k_power = jax.random.split(jax.random.PRNGKey(1234))
  supports, queries = exp.task.sample(k_tasks, FLAGS.tasks, exp.task.train_data)
  rows = []
  for steps, mu in itertools.product(cg_steps, dampings):
    report = jax.jit(lambda p, s, q, k, steps=steps, mu=mu: diagnostics.implicit_gradient_report(
        exp.task.loss_fn, p, s, q, k, inner_steps=config.inner_steps, inner_lr=config.inner_lr,
        lam=config.imaml_lambda, cg_steps=steps, cg_damping=mu, iters=FLAGS.power_iters))
    r = jax.device_get(report(state.params, supports, queries, k_power))
    rows.append({"cg_steps": steps, "cg_damping": mu, **{f: np.asarray(v).tolist()
                                                        for f, v in r._asdict().items()}})
  lam = config.imaml_lambda
  print(f"{FLAGS.workdir} at step {int(state.step)}: {config.inner_steps} inner steps at "
        f"{config.inner_lr}, lambda = {lam:g}; {FLAGS.tasks} training tasks\n")
  print("| CG steps | damping mu | median cosine (implicit, unrolled) | min cosine | median norm ratio "
        "| median lambda_min(H) | tasks with lambda_min < -(lambda + mu) |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    low = np.asarray(r["lambda_min"]) < -(lam + r["cg_damping"])
    print(f"| {r['cg_steps']} | {r['cg_damping']:g} | {np.median(r['cosine']):+.3f} | "
          f"{np.min(r['cosine']):+.3f} | {np.median(r['norm_ratio']):.2f} | "
          f"{np.median(r['lambda_min']):.2f} | {int(low.sum())} / {low.size} |")
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump({"workdir": FLAGS.workdir, "step": int(state.step), "config": config.to_dict(),
                 "rows": rows}, f, indent=2)


if __name__ == "__main__":
  app.run(main, flags_parser=_cli.parse_flags)
