"""Is iMAML's implicit meta-gradient the gradient of its inner loop, at a run's checkpoint?

    python scripts/diagnose_imaml.py --workdir=runs/omni_cpu_imaml_mean --step=1000
    python scripts/diagnose_imaml.py --workdir=... --cg_steps=5,50 --cg_damping=0,22 --tasks=6

The run's config.json gives the task, the inner loop (inner_steps, inner_lr, imaml_lambda,
imaml_inner_loop) and the
data; the checkpoint (--step, default the latest) gives the meta-parameters. For --tasks clean
training tasks (a fixed key; a run's corruption is not applied) and every pair of --cg_steps and
--cg_damping (default: 0 and the run's own), iMAML's update is set beside the gradient
differentiated through the same inner loop (gajax.diagnostics.implicit_gradient_report): their
cosine and norm ratio, and the support Hessian's extreme eigenvalues at the adapted parameters.
Prints one row per pair and writes JSON to --json. Runs with gradient-descent inner loops
(imaml_inner_optimizer=sgd) whose tasks are sampled on the device (not tiered_imagenet).
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
flags.DEFINE_list("cg_damping", None, "CG damping values mu to try (gajax.algorithms.imaml); "
                  "default: 0 and the run's cg_damping.")
flags.DEFINE_integer("lanczos_iters", 30, "Lanczos iterations (Hessian-vector products) for the "
                     "Hessian's extreme eigenvalues.")
flags.DEFINE_string("json", None, "Write the results here as JSON.")
FLAGS = flags.FLAGS


def _numbers(name, kind, default=None):
  if FLAGS[name].value is None:
    return default
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
  cg_steps = _numbers("cg_steps", int)
  if FLAGS.tasks < 1 or FLAGS.lanczos_iters < 1:
    sys.exit("error: --tasks and --lanczos_iters must be >= 1.")
  try:
    config = load_config(FLAGS.workdir)
    if config.algorithm != "imaml":
      raise ValueError(f"{FLAGS.workdir} is a {config.algorithm} run; this diagnoses imaml runs.")
    if config.imaml_inner_optimizer != "sgd":
      raise ValueError(f"{FLAGS.workdir}'s inner loop is {config.imaml_inner_optimizer}; the unrolled "
                       "reference differentiates gradient descent (imaml_inner_optimizer=sgd) only.")
    exp = make_experiment(config)
    if exp.task.host is not None:
      raise ValueError(f"task {config.task} is drawn on the host; this script samples tasks on the "
                       "device (omniglot, sinusoid, mini_imagenet, cifar_fs, fc100).")
    state, _ = Checkpointer(FLAGS.workdir).restore(exp.init(seed_keys(config.seed)[0]), FLAGS.step)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  dampings = _numbers("cg_damping", float, default=sorted({0.0, config.cg_damping}))
  settings = list(itertools.product(cg_steps, dampings))
  k_tasks, k_lanczos = jax.random.split(jax.random.PRNGKey(1234))
  supports, queries = exp.task.sample(k_tasks, FLAGS.tasks, exp.task.train_data)
  report = jax.jit(lambda p, s, q, k: diagnostics.implicit_gradient_report(
      exp.task.loss_fn, p, s, q, k, inner_steps=config.inner_steps, inner_lr=config.inner_lr,
      lam=config.imaml_lambda, cg_settings=settings, iters=FLAGS.lanczos_iters,
      inner_loop=config.imaml_inner_loop))
  r = jax.device_get(report(state.params, supports, queries, k_lanczos))
  low = np.asarray(r.lambda_min)
  rows = [{"cg_steps": steps, "cg_damping": mu, "cosine": np.asarray(r.cosine[i]).tolist(),
           "norm_ratio": np.asarray(r.norm_ratio[i]).tolist()}
          for i, (steps, mu) in enumerate(settings)]
  lam = config.imaml_lambda
  print(f"{FLAGS.workdir} at step {int(state.step)}: {config.inner_steps} inner steps at "
        f"{config.inner_lr}, lambda = {lam:g}, inner loop {config.imaml_inner_loop}; {FLAGS.tasks} "
        "training tasks; support Hessian at the "
        f"adapted parameters: lambda_min median {np.median(low):.2f} (min {np.min(low):.2f}), "
        f"lambda_max median {np.median(r.lambda_max):.2f}\n")
  print("| CG steps | damping mu | median cosine (implicit, unrolled) | min cosine | median norm ratio "
        "| tasks with lambda_min < -(lambda + mu) |")
  print("|---|---|---|---|---|---|")
  for row in rows:
    indefinite = int(np.sum(low < -(lam + row["cg_damping"])))
    print(f"| {row['cg_steps']} | {row['cg_damping']:g} | {np.median(row['cosine']):+.3f} | "
          f"{np.min(row['cosine']):+.3f} | {np.median(row['norm_ratio']):.2f} | "
          f"{indefinite} / {low.size} |")
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump({"workdir": FLAGS.workdir, "step": int(state.step), "config": config.to_dict(),
                 "lambda_min": low.tolist(), "lambda_max": np.asarray(r.lambda_max).tolist(),
                 "rows": rows}, f, indent=2)

if __name__ == "__main__":
  app.run(main, flags_parser=_cli.parse_flags)
