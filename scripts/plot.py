"""Plots learning curves and agreement-weight distributions from training workdirs, as PNG files.

    python scripts/plot.py --workdirs=runs/mean,runs/agreement --labels=mean,agreement --out=plots

Writes <out>/curves.png (meta-test metric vs meta-step, one line per run, shaded 95% CI; needs runs
trained with --eval_every), <out>/stability.png (training query loss and the share of tasks whose inner
loop raised their support loss, binned over --smooth steps) and <out>/weights.png (for runs that log
agreement weights: the 5/25/50/75/95 percentiles of the per-task weights over training, and the
fraction of negative weights).
"""

import json
import os
import sys

import matplotlib
import numpy as np
from absl import app, flags

import _cli

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position

flags.DEFINE_list("workdirs", None, "Training workdirs (each holds metrics.jsonl).")
flags.DEFINE_list("labels", None, "One label per workdir (default: the folder names).")
flags.DEFINE_string("out", "plots", "Output folder for the PNG files.")
flags.DEFINE_integer("smooth", 100, "Meta-steps per bin for the weight percentiles.")
FLAGS = flags.FLAGS


def read_metrics(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found")
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  evals = [r for r in rows if "eval_mean" in r]
  weights = [(r["step"], r["weights"]) for r in rows if "weights" in r]
  train = [r for r in rows if "inner_worse_fraction" in r]
  return evals, weights, train


def plot_curves(runs, path):
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, evals, *_ in runs:
    if not evals:
      continue
    steps = np.array([r["step"] for r in evals])
    mean = np.array([r["eval_mean"] for r in evals])
    ci = np.array([r["eval_ci95"] for r in evals])
    ax.plot(steps, mean, label=label)
    ax.fill_between(steps, mean - ci, mean + ci, alpha=0.25)
  ax.set_xlabel("meta-step")
  ax.set_ylabel("meta-test metric (mean, 95% CI)")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _binned(steps, values, bin_size):
  edges = np.array_split(np.arange(len(steps)), max(1, len(steps) // max(1, bin_size)))
  return np.array([steps[e].mean() for e in edges]), np.array([values[e].mean() for e in edges])


def plot_stability(runs, path, bin_size):
  fig, (ax_loss, ax_worse) = plt.subplots(1, 2, figsize=(10, 3.6))
  for label, _, _, train in runs:
    if not train:
      continue
    steps = np.array([r["step"] for r in train])
    for ax, key in ((ax_loss, "query_loss"), (ax_worse, "inner_worse_fraction")):
      x, y = _binned(steps, np.array([r[key] for r in train]), bin_size)
      ax.plot(x, 100 * y if key == "inner_worse_fraction" else y, label=label)
  ax_loss.set_yscale("log")
  ax_loss.set_title("training query loss (after adaptation)")
  ax_worse.set_title("tasks whose inner loop raised the support loss (%)")
  for ax in (ax_loss, ax_worse):
    ax.set_xlabel("meta-step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_weights(runs, path, bin_size):
  runs = [(label, w) for label, _, w, _ in runs if w]
  fig, axes = plt.subplots(len(runs), 2, figsize=(10, 3 * len(runs)), squeeze=False)
  for (label, weights), (ax_w, ax_neg) in zip(runs, axes):
    steps = np.array([s for s, _ in weights])
    values = np.array([w for _, w in weights])  # [steps, T]
    bins = max(1, len(steps) // max(1, bin_size))
    edges = np.array_split(np.arange(len(steps)), bins)
    centers = np.array([steps[e].mean() for e in edges])
    pct = np.array([np.percentile(values[e], [5, 25, 50, 75, 95]) for e in edges])
    ax_w.fill_between(centers, pct[:, 0], pct[:, 4], alpha=0.2, label="5-95%")
    ax_w.fill_between(centers, pct[:, 1], pct[:, 3], alpha=0.4, label="25-75%")
    ax_w.plot(centers, pct[:, 2], label="median")
    ax_w.axhline(1.0 / values.shape[1], color="k", ls="--", lw=0.8, label="1/T (the mean)")
    ax_w.set_title(f"{label}: agreement weights")
    ax_w.set_xlabel("meta-step")
    ax_w.legend(fontsize=7)
    negative = np.array([(values[e] < 0).mean() for e in edges])
    ax_neg.plot(centers, negative)
    ax_neg.set_title(f"{label}: fraction of negative weights")
    ax_neg.set_xlabel("meta-step")
    ax_neg.set_ylim(0, max(0.05, negative.max() * 1.1))
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  _cli.start(argv)
  if not FLAGS.workdirs:
    sys.exit("error: --workdirs is required.")
  labels = FLAGS.labels or [os.path.basename(os.path.normpath(w)) for w in FLAGS.workdirs]
  if len(labels) != len(FLAGS.workdirs):
    sys.exit(f"error: {len(labels)} --labels for {len(FLAGS.workdirs)} --workdirs.")
  try:
    runs = [(label, *read_metrics(w)) for label, w in zip(labels, FLAGS.workdirs)]
  except FileNotFoundError as e:
    sys.exit(f"error: {e}")
  os.makedirs(FLAGS.out, exist_ok=True)
  written = []
  if any(evals for _, evals, _, _ in runs):
    plot_curves(runs, os.path.join(FLAGS.out, "curves.png"))
    written.append("curves.png")
  if any(train for *_, train in runs):
    plot_stability(runs, os.path.join(FLAGS.out, "stability.png"), FLAGS.smooth)
    written.append("stability.png")
  if any(w for _, _, w, _ in runs):
    plot_weights(runs, os.path.join(FLAGS.out, "weights.png"), FLAGS.smooth)
    written.append("weights.png")
  if not written:
    sys.exit("error: nothing to plot: train with --eval_every for curves; weights need an agreement run.")
  print(f"wrote {', '.join(os.path.join(FLAGS.out, w) for w in written)}")


if __name__ == "__main__":
  app.run(main)
