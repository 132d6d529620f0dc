"""Does gradient agreement protect against harmful tasks? Aggregators under corrupted meta-batches.

    python scripts/corruption_benchmark.py --json=results/corruption.json --figure=docs/corruption.png
    python scripts/corruption_benchmark.py --config=configs/omniglot.py:5w1s_short --seeds=2 ...

The shared settings come from --config (default: configs/sinusoid.py:corruption) and its
--config.<field> overrides; each row sets the aggregator, the signal and the corruption.

A fraction p of the tasks of every training meta-batch is corrupted (gajax.tasks.corruption: noise
targets, x10 amplitude outliers, sign-flipped query targets on sinusoids; shuffled or permuted query
labels on Omniglot); evaluation is on clean tasks. Every (corruption, p, aggregator) row trains all
seeds at once (one jit, vmap over seeds), and every row shares the seeds, so seed s sees the same
initialisation, the same clean tasks and the same evaluation tasks in every row: differences between
rows are paired. The p = 0 rows are run once and shared by every corruption.

Aggregators are given as names from gajax.aggregators (``agreement`` is eq. 13 on the updates
themselves), plus ``agreement:displacement`` (the paper's MAML variant: weights from the inner
displacement). Each finished row is written to --json at once, and a rerun with the same --json skips
the rows it already holds, so an interrupted benchmark resumes where it stopped.

Prints a table of each row's metric and its paired difference to the mean aggregator at the same
(corruption, p), with 95% t-intervals over seeds, and draws --figure: the metric against p, one panel
per corruption, one line per aggregator, shaded 95% intervals.
"""

import dataclasses
import json
import os
import shlex
import sys

import matplotlib
import numpy as np
from absl import app, flags

import _cli
from scipy import stats

from gajax.train import TrainConfig, run_seeds

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position

_cli.define_config(os.path.join(_cli.CONFIGS, "sinusoid.py") + ":corruption",
                   "The shared settings: a protocol under configs/ (path[:protocol]) and "
                   "--config.<field> overrides. Default: configs/sinusoid.py:corruption.")
flags.DEFINE_list("corruptions", None, "Corruptions (default: noise,amplitude,sign_flip for sinusoid; "
                  "permute_labels for omniglot).")
flags.DEFINE_list("fractions", ["0", "0.1", "0.2", "0.4"], "Corrupted shares of each meta-batch.")
flags.DEFINE_list("aggregators", ["mean", "agreement", "agreement:displacement", "cosine_agreement",
                                  "trimmed_mean", "krum", "pcgrad", "upgrad", "mgda"],
                  "Aggregators; NAME:displacement takes agreement weights from the inner displacement.")
flags.DEFINE_integer("seeds", 5, "Seeds 0..N-1, trained together.")
flags.DEFINE_string("json", None, "Results file (required): rows are added as they finish; a rerun "
                    "resumes from it.")
flags.DEFINE_string("figure", None, "Write the figure here (PNG).")
flags.DEFINE_string("workdir", None, "Also checkpoint each row's training under <workdir>/<row> every "
                    "--checkpoint_every steps, so a long row resumes mid-way (rows already in --json "
                    "are skipped either way).")
flags.DEFINE_integer("checkpoint_every", 500, "Meta-steps between checkpoints (with --workdir).")
FLAGS = flags.FLAGS

_PER_ROW = ("aggregator", "signal", "corrupt_fraction", "corruption", "seed")
DEFAULT_CORRUPTIONS = {"sinusoid": ["noise", "amplitude", "sign_flip"], "omniglot": ["permute_labels"],
                       "mini_imagenet": ["permute_labels"], "cifar_fs": ["permute_labels"],
                       "fc100": ["permute_labels"]}


# Settings that do not change a row's result (where the data is, how often progress is printed).
_NOT_RESULTS = ("data_dir", "log_every", "eval_every", "num_devices", "conv_impl")


def _comparable(settings):
  """Settings that change the results; one absent from an older file had its default then."""
  defaults = TrainConfig().to_dict()
  return {k: settings.get(k, defaults.get(k)) for k in set(settings) | set(defaults)
          if k not in _NOT_RESULTS + _PER_ROW}


def row_key(corruption, fraction, aggregator):
  return f"{corruption if fraction > 0 else 'clean'}|{fraction:g}|{aggregator}"


def t_interval(values):
  values = np.asarray(values, np.float64)
  if len(values) < 2:
    return float("nan")
  return float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)))


def plan(corruptions, fractions, aggregators):
  """Rows in the order they are run: the clean rows, then the largest fraction first."""
  rows = [("", 0.0, a) for a in aggregators] if 0.0 in fractions else []
  for fraction in sorted((f for f in fractions if f > 0), reverse=True):
    rows += [(c, fraction, a) for c in corruptions for a in aggregators]
  return rows


def table(results, corruptions, fractions, aggregators, metric):
  lines = [f"| corruption | p | aggregator | {metric} (mean over seeds ± 95% t-CI) | "
           "paired diff. vs mean ± 95% t-CI | per seed |", "|---|---|---|---|---|---|"]
  groups = [("", 0.0)] if 0.0 in fractions else []
  groups += [(c, f) for c in corruptions for f in sorted(fractions) if f > 0]
  for corruption, fraction in groups:  # one block per (corruption, p); the clean block once
    base = results.get(row_key(corruption, fraction, "mean"))
    for aggregator in aggregators:
      r = results.get(row_key(corruption, fraction, aggregator))
      if r is None:
        continue
      values = np.asarray(r["per_seed"])
      diff = "" if base is None or aggregator == "mean" else (
          f"{np.mean(values - base['per_seed']):+.4f} ± {t_interval(values - base['per_seed']):.4f}")
      lines.append(f"| {corruption if fraction > 0 else '(clean)'} | {fraction:g} | {aggregator} | "
                   f"{values.mean():.4f} ± {t_interval(values):.4f} | {diff} | "
                   f"{' '.join(f'{v:.3f}' for v in values)} |")
  return "\n".join(lines)


def figure(results, corruptions, fractions, aggregators, metric, path):
  fig, axes = plt.subplots(1, len(corruptions), figsize=(4.6 * len(corruptions), 3.8), squeeze=False)
  for ax, corruption in zip(axes[0], corruptions):
    for aggregator in aggregators:
      points = [(f, results[row_key(corruption, f, aggregator)]["per_seed"]) for f in sorted(fractions)
                if row_key(corruption, f, aggregator) in results]
      if not points:
        continue
      x = np.array([f for f, _ in points])
      mean = np.array([np.mean(v) for _, v in points])
      ci = np.array([t_interval(v) for _, v in points])
      ax.plot(x, mean, marker="o", ms=3, label=aggregator)
      ax.fill_between(x, mean - ci, mean + ci, alpha=0.15)
    ax.set_title(f"corruption: {corruption}")
    ax.set_xlabel("corrupted share of each meta-batch")
    ax.set_ylabel(f"clean meta-test {metric}")
    if metric == "mse":
      ax.set_yscale("log")
    ax.grid(alpha=0.3)
  axes[0][-1].legend(fontsize=7, loc="best")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  _cli.start(argv)
  if not FLAGS.json:
    sys.exit("error: --json is required (it holds the rows and lets a rerun resume).")
  base = _cli.load_config()
  if base.task not in DEFAULT_CORRUPTIONS:
    sys.exit(f"error: config: task must be one of {', '.join(DEFAULT_CORRUPTIONS)}; got {base.task!r}.")
  if FLAGS.seeds < 2:
    sys.exit(f"error: --seeds must be >= 2 for intervals over seeds; got {FLAGS.seeds}.")
  corruptions = FLAGS.corruptions or DEFAULT_CORRUPTIONS[base.task]
  try:
    fractions = sorted({float(f) for f in FLAGS.fractions})
  except ValueError as e:
    sys.exit(f"error: --fractions: {e}")
  if "mean" not in FLAGS.aggregators:
    sys.exit("error: --aggregators must include mean (the baseline of the paired differences).")
  settings = {k: v for k, v in base.to_dict().items() if k not in _PER_ROW}
  configs = {}
  for corruption, fraction, aggregator in plan(corruptions, fractions, FLAGS.aggregators):
    name, _, signal = aggregator.partition(":")
    try:
      configs[row_key(corruption, fraction, aggregator)] = dataclasses.replace(
          base, aggregator=name, signal=signal or "self", corrupt_fraction=fraction,
          corruption=corruption).validate()
    except ValueError as e:
      sys.exit(f"error: config: {e}")

  results, saved = {}, {}
  if os.path.exists(FLAGS.json):
    with open(FLAGS.json) as f:
      saved = json.load(f)
    if (_comparable(saved.get("settings", {})) != _comparable(settings)
        or saved.get("seeds") != FLAGS.seeds):
      sys.exit(f"error: {FLAGS.json} holds a benchmark with other settings ({saved.get('settings')}, "
               f"{saved.get('seeds')} seeds); use another --json.")
    results = saved["rows"]
    print(f"resuming: {len(results)} rows already in {FLAGS.json}")
  command = "python scripts/corruption_benchmark.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  metric = None
  for i, (key, config) in enumerate(configs.items()):
    if key in results:
      continue
    print(f"[{i + 1}/{len(configs)}] {key}: {FLAGS.seeds} seeds", flush=True)
    workdir = (os.path.join(FLAGS.workdir, key.replace("|", "_").replace(":", "-")) if FLAGS.workdir
               else None)
    try:
      out = run_seeds(config, list(range(FLAGS.seeds)), workdir=workdir,
                      checkpoint_every=FLAGS.checkpoint_every)
    except ValueError as e:
      sys.exit(f"error: {e}")
    results[key] = {"per_seed": out["per_seed"], "per_seed_ci95": out["per_seed_ci95"],
                    "metric": out["metric"], "minutes": out["seconds"] / 60}
    tmp = f"{FLAGS.json}.tmp"
    with open(tmp, "w") as f:
      json.dump({"command": command, "settings": settings, "seeds": FLAGS.seeds, "rows": results}, f,
                indent=2)
    os.replace(tmp, FLAGS.json)
  metric = next(iter(results.values()))["metric"] if results else "metric"
  print(f"\n{command}\n(settings: {json.dumps(settings)}; seeds 0-{FLAGS.seeds - 1}; each seed's "
        f"metric over {base.eval_tasks} clean tasks)\n")
  print(table(results, corruptions, fractions, FLAGS.aggregators, metric))
  if FLAGS.figure:
    figure(results, corruptions, fractions, FLAGS.aggregators, metric, FLAGS.figure)
    print(f"\nwrote {FLAGS.figure}")


if __name__ == "__main__":
  app.run(main, flags_parser=_cli.parse_flags)
