"""Meta-trains a model and evaluates it on unseen tasks.

    python scripts/train.py                                   # sinusoid, MAML + gradient agreement
    python scripts/train.py --config=configs/omniglot.py:5w1s --config.aggregator=mean --workdir=/tmp/run

The settings come from ``--config`` (a protocol under configs/; default: configs/sinusoid.py) and
``--config.<field>=<value>`` overrides. Writes <workdir>/config.json, metrics.jsonl (one line per
meta-step), checkpoints/ and eval.json; rerunning with the same --workdir resumes.
"""

import sys

from absl import app, flags

import _cli

from gajax.train import train_and_evaluate

_cli.define_config()
flags.DEFINE_string("workdir", "runs/default", "Where metrics.jsonl, eval.json and checkpoints are "
                    "written; re-running with the same workdir resumes.")
flags.DEFINE_integer("checkpoint_every", 1000, "Meta-steps between checkpoints.")
flags.DEFINE_float("max_train_minutes", None, "Wall-clock budget for this call's training: checkpoint "
                   "and evaluate where it runs out (eval.json says stopped_early); rerun to go on.")
flags.DEFINE_bool("overwrite", False, "Discard a run already in --workdir instead of resuming it.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0, for "
                    "jax.distributed.initialize.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
FLAGS = flags.FLAGS


def main(argv):
  _cli.start(argv)
  if FLAGS.coordinator_address:
    import jax  # pylint: disable=import-outside-toplevel
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  config = _cli.load_config()
  if FLAGS.checkpoint_every < 1:
    sys.exit(f"error: --checkpoint_every must be >= 1; got {FLAGS.checkpoint_every}.")
  if FLAGS.max_train_minutes is not None and not FLAGS.max_train_minutes > 0:
    sys.exit(f"error: --max_train_minutes must be > 0; got {FLAGS.max_train_minutes}.")
  print(f"config: {config}")
  try:
    train_and_evaluate(config, FLAGS.workdir, checkpoint_every=FLAGS.checkpoint_every,
                       overwrite=FLAGS.overwrite,
                       max_train_seconds=(None if FLAGS.max_train_minutes is None
                                          else 60 * FLAGS.max_train_minutes))
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=_cli.parse_flags)
