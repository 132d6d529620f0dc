"""Smoke runs of the scripts as a user runs them, in subprocesses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(name, *args, timeout=300, **env_vars):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", **env_vars)
  return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], capture_output=True,
                        text=True, timeout=timeout, env=env, cwd=ROOT)


def test_train_writes_metrics_and_eval(tmp_path):
  result = run_script("train.py", "--config.num_iterations=7", "--config.log_every=4",
                      "--config.eval_tasks=20", "--config.meta_batch_size=4", "--config.eval_every=4",
                      f"--workdir={tmp_path}")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "it/s" in result.stdout
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train_rows = [r for r in rows if "query_loss" in r]
  assert [r["step"] for r in train_rows] == list(range(1, 8))
  assert [r["step"] for r in rows if "eval_mean" in r] == [4, 7]
  result_json = json.loads((tmp_path / "eval.json").read_text())
  assert result_json["metric"] == "mse" and result_json["num_tasks"] == 20
  assert result_json["ci95"] > 0 and result_json["mean"] > 0
  assert result_json["config"]["meta_batch_size"] == 4 and result_json["steps"] == 7
  assert all(len(r["weights"]) == 4 for r in train_rows)
  assert all(0 <= r["inner_worse_fraction"] <= 1 and r["adapted_support_loss"] > 0 for r in train_rows)

  # evaluate.py restores the final checkpoint and reproduces eval.json exactly.
  again = run_script("evaluate.py", f"--workdir={tmp_path}", f"--output={tmp_path / 'again.json'}")
  assert again.returncode == 0, again.stderr[-2000:]
  reevaluated = json.loads((tmp_path / "again.json").read_text())
  assert (reevaluated["mean"], reevaluated["ci95"]) == (result_json["mean"], result_json["ci95"])

  plotted = run_script("plot.py", f"--workdirs={tmp_path}", f"--out={tmp_path / 'plots'}")
  assert plotted.returncode == 0, plotted.stderr[-2000:]
  for name in ("curves.png", "weights.png", "stability.png"):
    assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_omniglot_train_and_evaluate(tmp_path, real_tarball):
  """The Omniglot path end to end: real archive, Meta-SGD (the one with learned inner rates), agreement."""
  cache = str(tmp_path / "cache")  # not the user's ~/.cache
  run = tmp_path / "run"
  result = run_script("train.py", "--config=configs/omniglot.py:5w1s",
                      f"--config.data_dir={real_tarball}", "--config.queries=2", "--config.eval_queries=3", "--config.meta_batch_size=2",
                      "--config.eval_inner_steps=2", "--config.algorithm=metasgd",
                      "--config.aggregator=agreement", "--config.num_iterations=2",
                      "--config.eval_every=1", "--config.eval_tasks=12", "--config.log_every=1",
                      f"--workdir={run}", GAJAX_CACHE_DIR=cache)
  assert result.returncode == 0, result.stderr[-2000:]
  rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "eval_mean" in r] == [1, 2]  # blocks of 1: one compile
  assert all(np.isfinite(r["query_loss"]) and len(r["weights"]) == 2 for r in rows if "query_loss" in r)
  result_json = json.loads((run / "eval.json").read_text())
  assert result_json["metric"] == "accuracy" and result_json["num_tasks"] == 12
  # 12 tasks x 5 classes x 3 queries: the accuracy is a multiple of 1/180 in [0, 1].
  assert 0 <= result_json["mean"] <= 1
  assert abs(result_json["mean"] * 180 - round(result_json["mean"] * 180)) < 1e-3
  assert result_json["config"]["ways"] == 5 and result_json["config"]["eval_inner_steps"] == 2

  # evaluate.py with the data path given again (as on another machine) reproduces the number.
  again = run_script("evaluate.py", f"--workdir={run}", f"--data_dir={real_tarball}",
                     f"--output={tmp_path / 'again.json'}", GAJAX_CACHE_DIR=cache)
  assert again.returncode == 0, again.stderr[-2000:]
  reevaluated = json.loads((tmp_path / "again.json").read_text())
  assert (reevaluated["mean"], reevaluated["ci95"]) == (result_json["mean"], result_json["ci95"])


def test_evaluate_rejects_a_folder_without_a_run(tmp_path):
  result = run_script("evaluate.py", f"--workdir={tmp_path}")
  assert result.returncode != 0 and "config.json not found" in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("flag, message", [
    ("--config.shots=0", "config: shots must be >= 1"),
    ("--config.inner_lr=-1", "config: inner_lr must be"),
    ("--config.algorithm=foo", "config: algorithm must be one of"),
    ("--config.aggregator=nope", "config: aggregator must be one of"),
    ("--config.task=imagenet", "config: task must be one of"),
    ("--config.init=kaiming", "config: init must be one of flax, torch, maml"),
    ("--config.bogus=1", "no such config field bogus"),  # unknown field
    ("--config.num_iterations=ten", "--config.num_iterations=ten: invalid literal"),  # ill-typed
    ("--config.num_iterations=1.5", "--config.num_iterations=1.5"),  # a float for an int
    ("--config=configs/omniglot.py:7w1s", "has no protocol '7w1s'"),
    ("--config=configs/nope.py", "no such config file"),
    ("--num_iterations=10", "Unknown command line flag 'num_iterations'"),  # the old flat flags
])
def test_train_rejects_bad_flags_with_one_line(flag, message, tmp_path):
  result = run_script("train.py", flag, f"--workdir={tmp_path}")
  assert result.returncode != 0
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]
  assert not (tmp_path / "metrics.jsonl").exists()


def test_diagnose_init_reports_each_scheme(tmp_path):
  out = tmp_path / "diag.json"
  result = run_script("diagnose_init.py", "--inits=flax,torch", "--seeds=1",
                      "--config.meta_batch_size=3", "--power_iters=3", f"--json={out}")
  assert result.returncode == 0, result.stderr[-2000:]
  rows = json.loads(out.read_text())["rows"]
  assert [r["init"] for r in rows] == ["flax", "torch"] and all(r["tasks"] == 3 for r in rows)
  assert all(0 <= r["share_inner_loop_worse"] <= 1 and r["median_lambda_max"] > 0 for r in rows)
  assert "| flax |" in result.stdout
  bad = run_script("diagnose_init.py", "--inits=kaiming")
  assert bad.returncode != 0 and "init must be one of" in bad.stderr.strip().splitlines()[-1]


def test_diagnose_imaml_compares_implicit_and_unrolled_gradients(tmp_path):
  run = tmp_path / "run"
  result = run_script("train.py", "--config.algorithm=imaml", "--config.imaml_lambda=5",
                      "--config.inner_lr=0.02", "--config.inner_steps=3", "--config.num_iterations=1",
                      "--config.meta_batch_size=2", "--config.eval_tasks=4", f"--workdir={run}")
  assert result.returncode == 0, result.stderr[-2000:]
  out = tmp_path / "diag.json"
  result = run_script("diagnose_imaml.py", f"--workdir={run}", "--tasks=2", "--cg_steps=3",
                      "--cg_damping=0,1e6", "--lanczos_iters=4", f"--json={out}")
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads(out.read_text())
  rows = report["rows"]
  assert report["step"] == 1 and [(r["cg_steps"], r["cg_damping"]) for r in rows] == [(3, 0), (3, 1e6)]
  for r in rows:
    assert len(r["cosine"]) == 2 and all(-1 - 1e-5 <= c <= 1 + 1e-5 for c in r["cosine"])
  assert len(report["lambda_min"]) == 2 and all(np.isfinite(report["lambda_max"]))
  # Damping shrinks the update by about 1 + mu / lam; the unrolled gradient does not change.
  assert all(d < 1e-3 * u for d, u in zip(rows[1]["norm_ratio"], rows[0]["norm_ratio"]))
  assert "| 3 | 1e+06 |" in result.stdout

  other = tmp_path / "maml"  # a MAML run's settings (no checkpoint needed to be refused)
  other.mkdir()
  (other / "config.json").write_text(json.dumps(
      {**json.loads((run / "config.json").read_text()), "algorithm": "maml", "imaml_lambda": 1.0}))
  bad = run_script("diagnose_imaml.py", f"--workdir={other}")
  assert bad.returncode != 0 and "this diagnoses imaml runs" in bad.stderr.strip().splitlines()[-1]

  # evaluate.py --plain_adaptation: the same tasks adapted without the proximal term (lambda = 5
  # holds the regularised loop near theta, so the two evaluations differ).
  evals = {}
  for name, extra in (("regularised", []), ("plain", ["--plain_adaptation"])):
    done = run_script("evaluate.py", f"--workdir={run}", f"--output={tmp_path / name}.json", *extra)
    assert done.returncode == 0, done.stderr[-2000:]
    evals[name] = json.loads((tmp_path / f"{name}.json").read_text())
  assert evals["plain"]["plain_adaptation"] and not evals["regularised"]["plain_adaptation"]
  assert evals["plain"]["mean"] != evals["regularised"]["mean"]
  bad = run_script("evaluate.py", f"--workdir={other}", "--plain_adaptation")
  assert bad.returncode != 0 and "applies to imaml runs" in bad.stderr.strip().splitlines()[-1]


def test_corruption_benchmark_runs_resumes_and_refuses_other_settings(tmp_path):
  out, fig = tmp_path / "grid.json", tmp_path / "grid.png"
  args = ["--seeds=2", "--config.num_iterations=4", "--config.log_every=2", "--config.eval_tasks=10",
          "--config.meta_batch_size=4", "--fractions=0,0.5", "--corruptions=amplitude", "--aggregators=mean,agreement:displacement",
          f"--json={out}"]
  first = run_script("corruption_benchmark.py", *args, f"--figure={fig}")
  assert first.returncode == 0, first.stderr[-2000:]
  rows = json.loads(out.read_text())["rows"]
  assert sorted(rows) == ["amplitude|0.5|agreement:displacement", "amplitude|0.5|mean",
                          "clean|0|agreement:displacement", "clean|0|mean"]
  assert all(len(r["per_seed"]) == 2 and np.all(np.isfinite(r["per_seed"])) for r in rows.values())
  assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "| amplitude | 0.5 | agreement:displacement |" in first.stdout
  again = run_script("corruption_benchmark.py", *args)  # nothing left to train: resumes, prints
  assert again.returncode == 0 and "resuming: 4 rows" in again.stdout
  assert json.loads(out.read_text())["rows"] == rows
  other = run_script("corruption_benchmark.py", *args[:-1], "--config.num_iterations=5", f"--json={out}")
  assert other.returncode != 0 and "other settings" in other.stderr.strip().splitlines()[-1]
