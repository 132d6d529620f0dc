"""Smoke tests of scripts/benchmark.py: every suite runs with --quick and writes well-formed JSON.

No timing is asserted (the machine is shared); only the structure of the output.
"""

import importlib
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "scripts" / "benchmarks"
ROW_KEYS = {"suite", "config", "device", "median_ms", "min_ms", "max_ms", "repeats"}
HAVE_TORCH = importlib.util.find_spec("torch") is not None


def run_benchmark(*args, pythonpath=(), timeout=900):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([*map(str, pythonpath), str(ROOT)]))
  return subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), *args],
                        capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def test_quick_all_suites_write_rows_and_table(tmp_path):
  out, md = tmp_path / "bench.json", tmp_path / "bench.md"
  # One torch thread: on a loaded CI box two OpenMP threads can make PyTorch 35x slower.
  result = run_benchmark("--suite=all", "--quick", "--torch_threads=1", f"--json={out}",
                         f"--markdown={md}")
  assert result.returncode == 0, result.stderr[-3000:]
  data = json.loads(out.read_text())
  assert data["quick"] is True and data["device"].startswith("cpu")
  rows = data["rows"]
  expected = ({"aggregators", "meta_step", "conv", "flops", "memory", "images", "user_model",
               "host_input"}
              | ({"peers"} if HAVE_TORCH else set()))
  assert {r["suite"] for r in rows} == expected
  for r in rows:
    assert ROW_KEYS <= set(r), r
    assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"] and math.isfinite(r["max_ms"]), r
    if "ratio" in r:
      assert r["baseline"] and 0 < r["ratio_min"] <= r["ratio_max"], r
  configs = {r["config"] for r in rows}
  assert "mean T=2 P=1e+03" in configs and "gradient_agreement T=2 P=1e+03" in configs
  assert all(r["gramian_gflops_per_s"] > 0 for r in rows if r["config"].startswith("gramian (alone)"))
  assert "gramian (alone) T=2 P=1e+03" in configs
  assert any("gradient_agreement" in c and r["suite"] == "meta_step" and "ratio" in r
             for r in rows for c in [r["config"]])
  assert {"sinusoid maml per-task vmap", "sinusoid maml per-task loop"} <= configs
  flops = [r for r in rows if r["suite"] == "flops"]
  assert flops[0]["fraction_of_peak"] == 1.0 and all(r["flops"] > 0 for r in flops)
  conv = {(r["conv"], r["aggregator"]): r for r in rows if r["suite"] == "conv"}
  assert set(conv) == {(c, a) for c in ("matmul", "xla") for a in ("mean", "gradient_agreement")}
  assert conv[("xla", "mean")]["baseline"] == "matmul+mean"
  assert conv[("xla", "gradient_agreement")]["baseline"] == "xla+mean"
  # The two implementations compute the same function: float32 rounding apart on a CPU.
  assert all(r["rel_loss_diff_vs_matmul"]["max"] < 1e-4 for (c, _), r in conv.items() if c == "xla")
  memory = {(r["inner_steps"], r["variant"]): r for r in rows if r["suite"] == "memory"}
  assert set(memory) == {(3, v) for v in ("maml", "maml+remat", "fomaml", "imaml")}
  assert all(r["temp_bytes"] > 0 and r["baseline"] == "maml" for r in memory.values())
  assert memory[(3, "fomaml")]["temp_bytes"] < memory[(3, "maml")]["temp_bytes"]
  assert memory[(3, "imaml")]["temp_bytes"] < memory[(3, "maml")]["temp_bytes"]
  images = {r["config"]: r for r in rows if r["suite"] == "images"}
  assert set(images) == {"conv4 maml", "conv4 fomaml"}
  assert images["conv4 fomaml"]["temp_bytes"] < images["conv4 maml"]["temp_bytes"]
  host = {r["config"]: r for r in rows if r["suite"] == "host_input"}
  assert {"draw+gather", "+ device_put", "maml on device", "maml fed", "fomaml1 fed"} <= set(host)
  assert all(0 <= host[f"{v} fed"]["input_wait_share"] < 1 for v in ("maml", "fomaml1"))
  user = {r["config"]: r for r in rows if r["suite"] == "user_model"}
  assert {"conv4_pool fast_ops", "conv4_pool plain", "conv4_pool gajax Conv4"} <= set(user)
  assert all(r["baseline"] == "fast_ops" for c, r in user.items() if not c.endswith("fast_ops"))
  assert ("conv4_pool torch loop" in user) == HAVE_TORCH
  if HAVE_TORCH:
    torch_rows = [r for r in rows if r["suite"] == "peers" and " torch " in r["config"]]
    assert torch_rows and all(r["baseline"] == "gajax" and r["implementation"] and "ratio" in r
                              for r in torch_rows)
    # gajax as scripts/train.py runs it (scan blocks), with the torch rows' ratio to it.
    assert "sinusoid maml gajax (vmap, scan blocks of 10, per step)" in configs
    assert all(r["vs_scan"]["ratio"] > 0 for r in torch_rows if r["config"].startswith("sinusoid"))
  # The markdown table comes last on stdout, one line per row, and the same table is in --markdown.
  lines = result.stdout.strip().splitlines()
  table = lines[-(len(rows) + 2):]
  assert table[0].startswith("| suite | config |") and all(line.startswith("|") for line in table)
  assert "\n".join(table) in md.read_text()


def test_peers_without_torch_says_skipped_and_exits_0(tmp_path):
  # A `torch` package that fails to import stands in for a machine without PyTorch.
  blocker = tmp_path / "no_torch" / "torch"
  blocker.mkdir(parents=True)
  (blocker / "__init__.py").write_text("raise ImportError('torch is blocked by the test')\n")
  out = tmp_path / "bench.json"
  result = run_benchmark("--suite=peers", "--quick", f"--json={out}", pythonpath=[blocker.parent])
  assert result.returncode == 0, result.stderr[-3000:]
  assert "peers: skipped: PyTorch is not installed" in result.stdout
  data = json.loads(out.read_text())
  assert data["rows"] == []
  assert data["skipped"] == [{"suite": "peers", "reason": "torch not installed"}]


def test_bad_suite_or_config_names_the_problem():
  result = run_benchmark("--suite=meta_step,speed", "--quick")
  assert result.returncode != 0 and "unknown --suite speed" in result.stderr
  result = run_benchmark("--suite=meta_step", "--configs=omni7w", "--quick")
  assert result.returncode != 0 and "unknown --configs omni7w" in result.stderr
  result = run_benchmark("--suite=aggregators", "--aggregator_params=1e2", "--quick")
  assert result.returncode != 0 and (result.stderr.strip().splitlines()[-1]
                                     == "error: --aggregator_params: '1e2' is not a whole number >= 200.")


def test_aggregators_suite_on_chosen_sizes(tmp_path):
  out = tmp_path / "bench.json"
  result = run_benchmark("--suite=aggregators", "--quick", "--aggregators=mgda",
                         "--aggregator_tasks=3", "--aggregator_params=1e4", f"--json={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  configs = {r["config"] for r in json.loads(out.read_text())["rows"]}
  assert configs == {f"{name} T=3 P=1e+04" for name in ("mean", "mgda", "gramian (alone)")}


@pytest.fixture
def benchmarks(monkeypatch):
  """``scripts/benchmarks`` as the package ``benchmarks``, the name scripts import it by, loaded from
  its path: ``scripts/`` stays off ``sys.path`` (its ``train.py`` would shadow other modules)."""
  spec = importlib.util.spec_from_file_location("benchmarks", PACKAGE / "__init__.py",
                                                submodule_search_locations=[str(PACKAGE)])
  package = importlib.util.module_from_spec(spec)
  monkeypatch.setitem(sys.modules, "benchmarks", package)  # Its modules import each other by it.
  spec.loader.exec_module(package)
  yield package
  for name in [n for n in sys.modules if n.startswith("benchmarks.")]:
    del sys.modules[name]


def test_xla_flops_counts_every_scan_iteration(benchmarks):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  flops = importlib.import_module("benchmarks.flops")

  scan = jax.lax.scan

  def five_matmuls(x):
    return jax.lax.scan(lambda c, _: (c @ x, None), x, None, length=5)[0]

  x = jnp.ones((32, 32), jnp.float32)
  one = 2 * 32 ** 3
  assert abs(flops.xla_flops(five_matmuls, x) - 5 * one) <= 0.01 * 5 * one
  assert abs(flops.xla_flops(five_matmuls, x, compiled=True) - 5 * one) <= 0.01 * 5 * one
  # What the unroll is for: XLA counts a while loop's body once.
  assert flops.xla_flops(five_matmuls, x, unroll=False) < 2 * one
  assert jax.lax.scan is scan


def test_compare_interleaves_and_pairs_samples(benchmarks):
  timing = importlib.import_module("benchmarks.timing")

  calls = []
  contenders = {name: (lambda name=name: calls.append(name), ()) for name in ("a", "b")}
  timings = timing.compare(contenders, repeats=3, warmup=2)
  assert set(timings) == {"a", "b"} and all(len(t.samples) == 3 for t in timings.values())
  # Two warm-up calls each, then per repeat one priming call and one timed call, rotating order.
  assert calls[:4] == ["a", "a", "b", "b"]
  assert calls[4:] == ["a", "a", "b", "b", "b", "b", "a", "a", "a", "a", "b", "b"]
  ratio = timing.paired_ratio(timings["a"], timings["b"])
  assert ratio["ratio_min"] <= ratio["ratio_max"] and ratio["ratio"] > 0
