"""Compares algorithms x aggregators x agreement signals over several seeds and prints one table.

    python scripts/compare.py --config=configs/sinusoid.py --algorithms=maml,reptile \
        --aggregators=mean,agreement --seeds=5

The shared settings come from --config (a protocol under configs/) and --config.<field> overrides;
the algorithm, aggregator and signal of each row from the flags below (the config's own are ignored).

Every seed of a row is trained inside one jit (vmap over seeds); all rows share the seeds, so seed s
sees the same initialisation, training tasks and evaluation tasks in every row. The table gives the
mean over seeds of each seed's evaluation metric (itself a mean over --eval_tasks unseen tasks), a 95%
t-interval across seeds, and each row's paired difference to the first row. JSON goes to --json.
"""

import dataclasses
import json
import os
import shlex
import sys

import numpy as np
from absl import app, flags

import _cli
from scipy import stats

from gajax.train import run_seeds

_cli.define_config()
flags.DEFINE_list("algorithms", ["maml"], "Algorithms to compare.")
flags.DEFINE_list("aggregators", ["mean", "agreement"], "Aggregators to compare.")
flags.DEFINE_list("signals", ["self"], "Agreement signals: self and/or displacement (applied to "
                  "agreement rows of MAML-family algorithms only).")
flags.DEFINE_integer("seeds", 5, "Number of seeds (0..N-1).")
flags.DEFINE_string("json", None, "Write the results here as JSON.")
flags.DEFINE_string("workdir", None, "Checkpoint each row under <workdir>/<algorithm>_<aggregator>_<signal> "
                    "(every --checkpoint_every steps); rerunning resumes every row where it stopped.")
flags.DEFINE_integer("checkpoint_every", 2000, "Meta-steps between checkpoints (with --workdir).")
FLAGS = flags.FLAGS


def rows_to_run():
  for algorithm in FLAGS.algorithms:
    for aggregator in FLAGS.aggregators:
      signals = FLAGS.signals if aggregator in ("agreement", "gradient_agreement") else ["self"]
      for signal in signals:
        if signal == "displacement" and algorithm == "reptile":
          continue
        yield algorithm, aggregator, signal


def t_interval(values):
  values = np.asarray(values, np.float64)
  if len(values) < 2:
    return float("nan")
  return float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)))


def main(argv):
  _cli.start(argv)
  if FLAGS.seeds < 1:
    sys.exit(f"error: --seeds must be >= 1; got {FLAGS.seeds}.")
  base = _cli.load_config()
  shared = {k: v for k, v in base.to_dict().items()
            if k not in ("algorithm", "aggregator", "signal", "seed")}
  seeds = list(range(FLAGS.seeds))
  results = []
  for algorithm, aggregator, signal in rows_to_run():
    try:
      config = dataclasses.replace(base, algorithm=algorithm, aggregator=aggregator,
                                   signal=signal).validate()
    except ValueError as e:
      sys.exit(f"error: config: {e}")
    print(f"{algorithm} / {aggregator} / {signal}: {FLAGS.seeds} seeds", flush=True)
    workdir = (os.path.join(FLAGS.workdir, f"{algorithm}_{aggregator}_{signal}") if FLAGS.workdir
               else None)
    try:
      out = run_seeds(config, seeds, workdir=workdir, checkpoint_every=FLAGS.checkpoint_every)
    except ValueError as e:
      sys.exit(f"error: {e}")
    results.append({"algorithm": algorithm, "aggregator": aggregator, "signal": signal, **out})
    # Rewritten after every row: a long comparison that is interrupted keeps the rows it finished.
    report(results, seeds, shared, final=False)
  report(results, seeds, shared, final=True)


def report(results, seeds, shared, final):
  """Fills in each row's mean, interval and paired difference; prints the table (when final) and
  writes --json."""
  command = "python scripts/compare.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  metric = results[0]["metric"]
  base = np.asarray(results[0]["per_seed"])
  lines = [f"| algorithm | aggregator | signal | {metric} (mean over {len(seeds)} seeds ± 95% t-CI) "
           f"| paired diff. vs first row | per seed | minutes |", "|---|---|---|---|---|---|---|"]
  for r in results:
    values = np.asarray(r["per_seed"])
    diff = values - base
    r["mean"], r["ci95"] = float(values.mean()), t_interval(values)
    r["diff_mean"], r["diff_ci95"] = float(diff.mean()), t_interval(diff)
    lines.append(f"| {r['algorithm']} | {r['aggregator']} | {r['signal']} | {r['mean']:.4f} ± "
                 f"{r['ci95']:.4f} | {r['diff_mean']:+.4f} ± {r['diff_ci95']:.4f} | "
                 f"{' '.join(f'{v:.3f}' for v in values)} | {r['seconds'] / 60:.1f} |")
  if final:
    print(f"\n{command}\n(each seed: {shared['eval_tasks']} unseen tasks; settings: "
          f"{json.dumps(shared)})\n")
    print("\n".join(lines))
  else:
    print(lines[-1], flush=True)
  if FLAGS.json:
    tmp = FLAGS.json + ".tmp"
    with open(tmp, "w") as f:
      json.dump({"command": command, "settings": shared, "seeds": seeds, "rows": results,
                 "complete": final}, f, indent=2)
    os.replace(tmp, FLAGS.json)

if __name__ == "__main__":
  app.run(main, flags_parser=_cli.parse_flags)
