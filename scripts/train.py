"""Meta-trains a model and evaluates it on unseen tasks.

    python scripts/train.py                                   # sinusoid, MAML + gradient agreement
    python scripts/train.py --algorithm=reptile --aggregator=mean --workdir=/tmp/run

Writes <workdir>/metrics.jsonl (one line per meta-step) and <workdir>/eval.json.
"""

import dataclasses
import sys

from absl import app, flags

import _cli

from gajax.train import TrainConfig, train_and_evaluate

_D = TrainConfig()
flags.DEFINE_string("task", _D.task, "Task distribution: sinusoid, binary or omniglot.")
flags.DEFINE_string("algorithm", _D.algorithm, "maml, fomaml, reptile or metasgd.")
flags.DEFINE_string("aggregator", _D.aggregator, "How per-task updates are combined (mean, agreement, ...).")
flags.DEFINE_string("signal", _D.signal, "Agreement weights from the updates themselves ('self') or from "
                    "the inner displacement theta - theta_i ('displacement', the paper's MAML variant).")
flags.DEFINE_string("optimizer", _D.optimizer, "Outer optimiser: adam or sgd.")
flags.DEFINE_integer("meta_batch_size", _D.meta_batch_size, "Tasks per meta-step.")
flags.DEFINE_integer("inner_steps", _D.inner_steps, "Inner gradient steps per task.")
flags.DEFINE_float("inner_lr", _D.inner_lr, "Inner learning rate (Meta-SGD: its initial value).")
flags.DEFINE_float("outer_lr", _D.outer_lr, "Outer learning rate.")
flags.DEFINE_integer("num_iterations", _D.num_iterations, "Meta-steps.")
flags.DEFINE_integer("shots", _D.shots, "Support points per task (per class for omniglot).")
flags.DEFINE_integer("queries", _D.queries, "Query points per training task (per class for omniglot).")
flags.DEFINE_integer("eval_queries", None, "Query points per evaluation task (per class for omniglot; "
                     "default: 100 points for sinusoid/binary, --queries for omniglot).")
flags.DEFINE_integer("ways", _D.ways, "Omniglot: classes per task (N-way).")
flags.DEFINE_string("data_dir", _D.data_dir, "Omniglot: the tarball, the official zips' folder or an "
                    "unpacked folder (default: $GAJAX_DATA_DIR).")
flags.DEFINE_string("split", _D.split, "Omniglot: 'maml' (1200 training characters) or 'lake' "
                    "(background/evaluation).")
flags.DEFINE_string("conv_downsample", _D.conv_downsample, "Omniglot Conv-4: 'stride' (stride-2 convs, "
                    "MAML on Omniglot) or 'pool' (max-pooling).")
flags.DEFINE_string("conv_impl", _D.conv_impl, "Omniglot Conv-4: 'matmul' (patches x matrix), 'xla' "
                    "(library convolutions) or 'auto' (= matmul, the fastest measured on CPU and "
                    "GPU; BUILD.md).")
flags.DEFINE_string("init", _D.init, "Model initialisation: flax (Flax's defaults), torch (PyTorch's "
                    "defaults) or maml (MAML's reference code); empty: the task's default (sinusoid: "
                    "torch, omniglot: flax; README, 'Initialisation').")
flags.DEFINE_float("corrupt_fraction", _D.corrupt_fraction, "Share of the tasks of every training "
                   "meta-batch that is corrupted (evaluation stays clean).")
flags.DEFINE_string("corruption", _D.corruption, "How: noise, amplitude or sign_flip (sinusoid); "
                    "shuffle_labels or permute_labels (omniglot, binary). See gajax.tasks.corruption.")
flags.DEFINE_integer("eval_tasks", _D.eval_tasks, "Unseen tasks in the final evaluation.")
flags.DEFINE_integer("eval_inner_steps", None, "Inner steps at evaluation (default: --inner_steps).")
flags.DEFINE_integer("eval_every", _D.eval_every, "Evaluate every N meta-steps (0: only at the end).")
flags.DEFINE_integer("log_every", _D.log_every, "Meta-steps per jitted block and progress line.")
flags.DEFINE_integer("num_devices", _D.num_devices, "Shard the meta-batch's tasks over this many "
                     "devices (0: all local devices); --meta_batch_size must be a multiple of it.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0, for "
                    "jax.distributed.initialize.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
flags.DEFINE_bool("skip_nonfinite", _D.skip_nonfinite, "Give tasks with NaN/Inf updates zero weight "
                  "(counted as skipped_tasks in metrics.jsonl).")
flags.DEFINE_integer("seed", _D.seed, "Seed of initialisation, training tasks and evaluation tasks.")
flags.DEFINE_string("workdir", "runs/default", "Where metrics.jsonl, eval.json and checkpoints are "
                    "written; re-running with the same workdir resumes.")
flags.DEFINE_integer("checkpoint_every", 1000, "Meta-steps between checkpoints.")
flags.DEFINE_float("max_train_minutes", None, "Wall-clock budget for this call's training: checkpoint "
                   "and evaluate where it runs out (eval.json says stopped_early); rerun to go on.")
flags.DEFINE_bool("overwrite", False, "Discard a run already in --workdir instead of resuming it.")
FLAGS = flags.FLAGS


def main(argv):
  _cli.start(argv)
  if FLAGS.coordinator_address:
    import jax  # pylint: disable=import-outside-toplevel
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  fields = {f.name for f in dataclasses.fields(TrainConfig)}
  try:
    config = TrainConfig(**{name: FLAGS[name].value for name in fields}).validate()
  except ValueError as e:
    sys.exit(f"error: {e}")
  print(f"config: {config}")
  try:
    train_and_evaluate(config, FLAGS.workdir, checkpoint_every=FLAGS.checkpoint_every,
                       overwrite=FLAGS.overwrite,
                       max_train_seconds=(None if FLAGS.max_train_minutes is None
                                          else 60 * FLAGS.max_train_minutes))
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
