"""Re-evaluates the latest checkpoint of a training run on unseen tasks.

    python scripts/evaluate.py --workdir=runs/default [--eval_tasks=1000] [--data_dir=...]

The run's settings come from <workdir>/config.json; the flags below override the evaluation settings
only. Writes <workdir>/eval.json (or --output) with the metric's mean and 95% CI over the tasks.
"""

import dataclasses
import json
import os
import sys

import jax
from absl import app, flags

import _cli

from gajax import meta
from gajax.checkpoint import Checkpointer
from gajax.config import IMAML_FIELDS, TrainConfig
from gajax.experiment import evaluation_data, make_experiment, seed_keys
from gajax.workdir import atomic_write, load_config

flags.DEFINE_string("workdir", None, "A training run's workdir (holds config.json and checkpoints/).")
flags.DEFINE_integer("eval_tasks", None, "Unseen tasks (default: the run's --eval_tasks).")
flags.DEFINE_integer("eval_inner_steps", None, "Inner steps at evaluation (default: the run's).")
flags.DEFINE_integer("eval_queries", None, "Query examples per evaluation task (default: the run's).")
flags.DEFINE_string("data_dir", None, "Omniglot data path (default: the run's --data_dir).")
flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")
flags.DEFINE_string("output", None, "Where to write the JSON (default: <workdir>/eval.json).")
flags.DEFINE_bool("plain_adaptation", False, "iMAML runs only: adapt at evaluation by plain gradient "
                  "descent at inner_lr (no proximal term), as the iMAML authors' evaluation does "
                  "(lambda = 0), instead of the run's regularised inner loop.")
FLAGS = flags.FLAGS


def main(argv):
  _cli.start(argv)
  if not FLAGS.workdir:
    sys.exit("error: --workdir is required.")
  try:
    config = load_config(FLAGS.workdir)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  overrides = {name: FLAGS[name].value for name in ("eval_tasks", "eval_inner_steps", "eval_queries",
                                                    "data_dir") if FLAGS[name].value is not None}
  if FLAGS.plain_adaptation:
    if config.algorithm != "imaml":
      sys.exit(f"error: --plain_adaptation applies to imaml runs; {FLAGS.workdir} is a "
               f"{config.algorithm} run.")
    # FOMAML's inner loop is plain gradient descent on the support loss; the parameters are the same.
    defaults = TrainConfig()
    overrides.update(algorithm="fomaml", **{f: getattr(defaults, f) for f in IMAML_FIELDS})
  try:
    config = dataclasses.replace(config, **overrides).validate()
    exp = make_experiment(config)
    checkpointer = Checkpointer(FLAGS.workdir)
    state, _ = checkpointer.restore(exp.init(seed_keys(config.seed)[0]), FLAGS.step)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  values = jax.jit(exp.evaluate)(state.params, seed_keys(config.seed)[1], evaluation_data(exp))
  mean, ci = meta.mean_ci95(values)
  result = {"metric": exp.task.metric, "mean": float(mean), "ci95": float(ci),
            "num_tasks": int(values.shape[0]), "seed": config.seed, "steps": int(state.step),
            "plain_adaptation": FLAGS.plain_adaptation,
            "config": config.to_dict()}
  output = FLAGS.output or os.path.join(FLAGS.workdir, "eval.json")
  atomic_write(output, json.dumps(result, indent=2))
  print(f"eval at step {result['steps']}: {result['metric']} {result['mean']:.4f} ± "
        f"{result['ci95']:.4f} (95% CI over {result['num_tasks']} unseen tasks) -> {output}")


if __name__ == "__main__":
  app.run(main, flags_parser=_cli.parse_flags)
