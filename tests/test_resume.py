"""Kill a real training process with SIGKILL, resume it, and get exactly the uninterrupted run's results."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from gajax.checkpoint import Checkpointer
from gajax.train import TrainConfig, make_experiment, run_seeds, seed_keys

ROOT = Path(__file__).resolve().parents[1]
FLAGS = [f"--config={ROOT / 'configs' / 'binary.py'}", "--config.algorithm=maml", "--config.aggregator=agreement",
         "--config.inner_steps=2", "--config.inner_lr=0.5", "--config.meta_batch_size=4",
         "--config.num_iterations=40", "--config.log_every=4", "--checkpoint_every=8",
         "--config.eval_tasks=30"]
CONFIG = TrainConfig(task="binary", algorithm="maml", aggregator="agreement", inner_steps=2,
                     inner_lr=0.5, meta_batch_size=4, num_iterations=40, log_every=4, eval_tasks=30)


def command(workdir):
  return [sys.executable, str(ROOT / "scripts" / "train.py"), *FLAGS, f"--workdir={workdir}"]


def env():
  return dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")


def final_params(workdir):
  like = make_experiment(CONFIG).init(seed_keys(0)[0])
  state, _ = Checkpointer(workdir).restore(like)
  return state


def test_sigkill_then_resume_is_bit_identical(tmp_path):
  clean, killed = tmp_path / "clean", tmp_path / "killed"
  subprocess.run(command(clean), check=True, capture_output=True, env=env(), timeout=300)

  proc = subprocess.Popen(command(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          env=env())
  metrics = killed / "metrics.jsonl"
  deadline = time.time() + 240
  # Kill between checkpoints: after step 12 is logged (checkpoint at 8 exists, the next is at 16).
  while time.time() < deadline:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 12:
      break
    time.sleep(0.05)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not (killed / "eval.json").exists(), "the run finished before it was killed"

  resumed = subprocess.run(command(killed), capture_output=True, text=True, env=env(), timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resumed from the checkpoint at step" in resumed.stdout

  assert (killed / "metrics.jsonl").read_text() == (clean / "metrics.jsonl").read_text()
  steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
  assert steps == list(range(1, 41))
  a, b = json.loads((clean / "eval.json").read_text()), json.loads((killed / "eval.json").read_text())
  assert (a["mean"], a["ci95"]) == (b["mean"], b["ci95"])
  for x, y in zip(jax.tree_util.tree_leaves(final_params(clean)),
                  jax.tree_util.tree_leaves(final_params(killed))):
    np.testing.assert_array_equal(x, y)


def test_incompatible_workdir_is_refused_unless_overwrite(tmp_path):
  base = [sys.executable, str(ROOT / "scripts" / "train.py"), f"--config={ROOT / 'configs' / 'binary.py'}",
          "--config.inner_steps=1", "--config.num_iterations=2", "--config.log_every=2",
          "--config.eval_tasks=5", "--config.meta_batch_size=2", f"--workdir={tmp_path}"]
  subprocess.run(base, check=True, capture_output=True, env=env(), timeout=300)
  refused = subprocess.run(base + ["--config.inner_lr=0.3"], capture_output=True, text=True,
                           env=env(), timeout=300)
  assert refused.returncode != 0
  assert "holds a run with other settings (inner_lr" in refused.stderr.strip().splitlines()[-1]
  again = subprocess.run(base + ["--config.inner_lr=0.3", "--overwrite"], capture_output=True,
                         text=True, env=env(), timeout=300)
  assert again.returncode == 0, again.stderr[-2000:]
  assert json.loads((tmp_path / "eval.json").read_text())["config"]["inner_lr"] == 0.3


def test_time_budget_checkpoints_evaluates_and_resumes(tmp_path):
  """--max_train_minutes stops after the first block past the budget, evaluates there, and a second
  call goes on to num_iterations with every step logged once, as an uninterrupted run."""
  from gajax.train import train_and_evaluate  # pylint: disable=import-outside-toplevel

  workdir = str(tmp_path / "budget")
  quiet = lambda *a, **k: None
  stopped = train_and_evaluate(CONFIG, workdir, checkpoint_every=8, max_train_seconds=1e-9,
                               print_fn=quiet)
  # The budget runs out in the first block (log_every=4): checkpoint and evaluation at step 4.
  assert stopped["stopped_early"] and stopped["steps"] == 4
  assert Checkpointer(workdir).latest_step() == 4
  finished = train_and_evaluate(CONFIG, workdir, checkpoint_every=8, print_fn=quiet)
  assert not finished["stopped_early"] and finished["steps"] == CONFIG.num_iterations
  steps = [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))
           if "eval_mean" not in line]
  assert steps == list(range(1, CONFIG.num_iterations + 1))
  clean = train_and_evaluate(CONFIG, str(tmp_path / "clean"), checkpoint_every=8, print_fn=quiet)
  assert finished["mean"] == clean["mean"]


def test_time_budget_must_be_positive(tmp_path):
  from gajax.train import train_and_evaluate  # pylint: disable=import-outside-toplevel

  with pytest.raises(ValueError, match="max_train_seconds must be > 0"):
    train_and_evaluate(CONFIG, str(tmp_path / "w"), max_train_seconds=0.0)


def test_run_seeds_resumes_to_the_uninterrupted_result(tmp_path):
  """The seed-vmapped driver: stop at 4 steps, resume to 6 with a longer schedule, same numbers."""
  config = TrainConfig(meta_batch_size=4, num_iterations=6, log_every=2, eval_tasks=20,
                       aggregator="agreement")
  quiet = lambda *a, **k: None
  full = run_seeds(config, [0, 1], print_fn=quiet)
  run_seeds(dataclasses.replace(config, num_iterations=4), [0, 1], workdir=str(tmp_path),
            checkpoint_every=2, print_fn=quiet)
  resumed = run_seeds(config, [0, 1], workdir=str(tmp_path), checkpoint_every=2, print_fn=quiet)
  assert resumed["steps"] == 6 and resumed["per_seed"] == full["per_seed"]
  with pytest.raises(ValueError, match="holds a run of seeds"):
    run_seeds(config, [0, 2], workdir=str(tmp_path), print_fn=quiet)
  with pytest.raises(ValueError, match="other settings"):
    run_seeds(dataclasses.replace(config, inner_lr=0.02), [0, 1], workdir=str(tmp_path), print_fn=quiet)


def test_a_second_run_on_a_workdir_is_refused_and_a_killed_run_still_resumes(tmp_path):
  """Two training runs started on one workdir: the second refuses in one line and writes nothing;
  after the first is SIGKILLed, its lock does not block the resume that follows."""
  long_run = [*command(tmp_path)[:-1], "--config.num_iterations=4000", f"--workdir={tmp_path}"]
  first = subprocess.Popen(long_run, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env())
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 4):
    time.sleep(0.05)
  before = metrics.read_text()
  second = subprocess.run(long_run, capture_output=True, text=True, env=env(), timeout=300)
  assert second.returncode != 0
  lines = second.stderr.strip().splitlines()
  assert len(lines) == 1 and f"is in use by another run (pid {first.pid})" in lines[0], lines
  assert first.poll() is None, "the first run ended before the second was refused"
  os.kill(first.pid, signal.SIGKILL)
  first.wait()
  assert metrics.read_text().startswith(before)  # the refused run appended nothing
  resumed = subprocess.run([*long_run, "--max_train_minutes=0.001"], capture_output=True, text=True,
                           env=env(), timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  result = json.loads((tmp_path / "eval.json").read_text())
  assert result["stopped_early"] and result["steps"] < 4000
  steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
  assert steps == list(range(1, len(steps) + 1))  # every step once, none twice


def test_a_workdir_written_before_a_setting_existed_still_resumes(tmp_path):
  """Runs carried across sessions (e.g. the GPU's 20-way pair) predate init/corruption settings."""
  from gajax.train import prepare_workdir  # pylint: disable=import-outside-toplevel
  old = dataclasses.asdict(CONFIG)
  for name in ("init", "corrupt_fraction", "corruption"):
    old.pop(name)
  (tmp_path / "config.json").write_text(json.dumps(old))
  prepare_workdir(CONFIG, str(tmp_path))  # no error: absent settings had their defaults
  with pytest.raises(ValueError, match="init: '' -> 'flax'"):  # a real change is still refused
    prepare_workdir(dataclasses.replace(CONFIG, task="sinusoid", init="flax"), str(tmp_path))
