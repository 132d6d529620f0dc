"""Benchmarks of gajax: aggregators, meta-steps, achieved FLOP/s, memory, and a PyTorch MAML baseline.

    python scripts/benchmark.py --suite=all --json=bench.json --markdown=bench.md
    python scripts/benchmark.py --suite=aggregators --quick          # tiny sizes, seconds

Suites (``--suite``), one module each in ``scripts/benchmarks/`` (its docstring says what it measures):
  aggregators  each registered aggregator's jitted ``tx.update`` on stacked updates, for T tasks and
               P parameters, as a ratio to ``mean`` timed in the same process.
  meta_step    meta-iterations/s of the jitted meta-step (sinusoid MLP and Conv-4 on random
               Omniglot-shaped images, algorithm x aggregator); vmap over tasks vs a Python loop over
               tasks; one jit call per step vs a ``lax.scan`` block of 10 steps.
  conv         Conv-4 MAML as ``scripts/train.py`` runs it (``lax.scan`` blocks of 10 steps) with each
               convolution implementation (``matmul``, ``xla``) x mean / gradient agreement.
  flops        achieved FLOP/s of MAML meta-steps (XLA cost analysis, scans unrolled for the count)
               against a float32 matrix product timed in the same run.
  peers        the sinusoid and 5-way Conv-4 MAML configs in plain PyTorch (Python loop over tasks,
               torch.func.vmap) at each ``--torch_threads``, against gajax's per-step call and scan
               blocks (optional: needs torch, see requirements-bench.txt; skipped with a message
               without it).
  memory       XLA's working memory and time of MAML, checkpointed (remat) MAML and FOMAML at several
               inner-step counts.
  images       step time and XLA working memory at mini-ImageNet's size (84x84x3, MAML's 5-way
               1-shot settings) for Conv-4 and ResNet-12: MAML, checkpointed MAML, FOMAML.
  host_input   tasks drawn on the host from a memory-mapped split (tiered-ImageNet's path) and
               prefetched: host draw and device_put times, and the share of a fed meta-step spent
               waiting on input.
  user_model   a Conv-4 written in plain flax.linen (max-pool or strided) through gajax's public API,
               with and without ``fast_ops`` (gajax.fast_ops.batchable), against gajax's own Conv-4 and a
               PyTorch loop (when torch is installed).

Workloads are ``gajax.train.TrainConfig``s built into meta-steps by the run factory of
``gajax.train`` (``scripts/benchmarks/workloads.py``). Every comparison is timed inside one process
with interleaved repeats (``scripts/benchmarks/timing.py``); rows give the median, min and max over
``--repeats`` samples taken after ``--warmup`` calls (programs slower than 1 s get
``--max_repeats_slow``). The markdown table is printed last; ``--json`` gets every row.
"""

import json
import shlex
import sys
import time

from absl import app, flags

import _cli
from benchmarks import (aggregators, conv, flops, host_input, images, memory, meta_step, peers, timing,
                        user_model, workloads)
from benchmarks.common import log

SUITES = ("aggregators", "meta_step", "conv", "flops", "peers", "memory", "images", "user_model",
          "host_input")
flags.DEFINE_list("suite", ["all"], f"Suites to run, comma-separated: {', '.join(SUITES)} or all.")
flags.DEFINE_string("json", None, "Write every row here as JSON.")
flags.DEFINE_string("markdown", None, "Also write the final markdown table here.")
flags.DEFINE_integer("repeats", 7, "Timed samples per measurement (the big Conv-4 configs use fewer, "
                     "see --max_repeats_slow).")
flags.DEFINE_integer("warmup", 2, "Untimed calls before timing (the first one compiles).")
flags.DEFINE_integer("max_repeats_slow", 2, "Cap on repeats for measurements slower than 1 s per call "
                     "(the Conv-4 meta-steps), to keep --suite=all within reach on a 2-core CPU.")
flags.DEFINE_bool("quick", False, "Tiny sizes and few repeats: checks that every suite runs.")
flags.DEFINE_bool("big", False, "Also the slow Conv-4 measurements: FOMAML/Reptile and max-pooling in "
                  "meta_step, 20-way 1-shot, jit-vs-scan on Conv-4 (each second-order Conv-4 step "
                  "takes 10-60 s on a 2-core CPU).")
flags.DEFINE_list("aggregators", None, "Aggregators for the aggregators suite (default: all "
                  "registered; with --quick: mean, gradient_agreement).")
flags.DEFINE_list("aggregator_tasks", None, "Task counts T of the aggregators suite (default: 2,8,32,128; "
                  "with --quick: 2,4).")
flags.DEFINE_list("aggregator_params", None, "Parameter counts P of the aggregators suite, e.g. 1e6 "
                  "(default: 1e4,1e6; with --quick: 1e3).")
flags.DEFINE_list("torch_threads", ["2", "1"], "torch.set_num_threads values for the peers suite. "
                  "2 matches XLA's pool on a 2-core machine; 1 is there because on a loaded machine "
                  "PyTorch's OpenMP barriers make 2 threads up to ~35x slower than 1.")
flags.DEFINE_list("configs", None, "Only these meta-step workloads (meta_step, flops, peers), e.g. "
                  "sinusoid,omni5w_stride,omni20w_stride (default: each suite's own choice).")
flags.DEFINE_list("memory_steps", ["1", "5", "25", "100"], "Inner-step counts of the memory suite.")
flags.DEFINE_string("torch_device", "cpu", "Device of the PyTorch baseline in the peers suite: cpu or "
                    "cuda (then each torch step ends with torch.cuda.synchronize()).")
FLAGS = flags.FLAGS

RUNNERS = {"aggregators": aggregators.run, "meta_step": meta_step.run, "conv": conv.run,
           "flops": flops.run, "peers": peers.run, "memory": memory.run,
           "images": images.run, "user_model": user_model.run, "host_input": host_input.run}
assert set(RUNNERS) == set(SUITES)


def fmt_ms(ms):
  return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def markdown(rows):
  lines = ["| suite | config | median ms | min-max ms | ratio (min-max) | vs | notes |",
           "| --- | --- | ---: | ---: | ---: | --- | --- |"]
  for r in rows:
    ratio = (f"{r['ratio']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})" if "ratio" in r
             else "")
    notes = []
    if "its_per_s" in r:
      notes.append(f"{r['its_per_s']:.1f} it/s")
    if "notes" in r:
      notes.append(r["notes"])
    if "gflops_per_s" in r:
      notes.append(f"{r['flops'] / 1e9:.3g} GFLOP, {r['gflops_per_s']:.1f} GFLOP/s, "
                   f"{100 * r['fraction_of_peak']:.1f}% of peak")
    lines.append(f"| {r['suite']} | {r['config']} | {fmt_ms(r['median_ms'])} | "
                 f"{fmt_ms(r['min_ms'])}-{fmt_ms(r['max_ms'])} | {ratio} | {r.get('baseline', '')} | "
                 f"{'; '.join(notes)} |")
  return "\n".join(lines)


def main(argv):
  _cli.start(argv)
  if FLAGS.repeats < 1 or FLAGS.warmup < 0 or FLAGS.max_repeats_slow < 1:
    sys.exit("error: --repeats and --max_repeats_slow must be >= 1 and --warmup >= 0.")
  try:
    FLAGS.torch_threads = [int(n) for n in FLAGS.torch_threads]
    assert all(n >= 1 for n in FLAGS.torch_threads)
  except (ValueError, AssertionError):
    sys.exit(f"error: --torch_threads must be integers >= 1; got {FLAGS.torch_threads}.")
  try:
    aggregators.grid()
  except ValueError as e:
    sys.exit(f"error: {e}")
  if FLAGS.torch_device != "cpu" and not FLAGS.torch_device.startswith("cuda"):
    sys.exit(f"error: --torch_device must be cpu or cuda[:N]; got {FLAGS.torch_device!r}.")
  if FLAGS.quick:
    FLAGS.repeats = min(FLAGS.repeats, 2)
    FLAGS.warmup = min(FLAGS.warmup, 1)
  suites = SUITES if "all" in FLAGS.suite else tuple(FLAGS.suite)
  unknown = [s for s in suites if s not in SUITES]
  if unknown:
    sys.exit(f"error: unknown --suite {', '.join(unknown)}; choose from {', '.join(SUITES)} or all.")
  known = {w.name for w in workloads.meta_configs()}
  if FLAGS.configs and not set(FLAGS.configs) <= known:
    sys.exit(f"error: unknown --configs {', '.join(sorted(set(FLAGS.configs) - known))}; choose from "
             f"{', '.join(sorted(known))}.")
  log(f"device: {timing.device_string()}; suites: {', '.join(suites)}"
      f"{' (quick)' if FLAGS.quick else ''}; repeats {FLAGS.repeats}, warmup {FLAGS.warmup}")
  rows, skipped = [], []
  start = time.perf_counter()
  command = "python scripts/benchmark.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])

  def save():  # After every suite, so an interrupted run keeps what it measured.
    if FLAGS.json:
      with open(FLAGS.json, "w") as f:
        json.dump({"command": command, "device": timing.device_string(), "quick": FLAGS.quick,
                   "seconds": time.perf_counter() - start, "rows": rows, "skipped": skipped}, f,
                  indent=1)
    if FLAGS.markdown:
      with open(FLAGS.markdown, "w") as f:
        f.write(f"`{command}` on {timing.device_string()}\n\n{markdown(rows)}\n")

  for suite in suites:
    suite_start = time.perf_counter()
    skipped += RUNNERS[suite](rows) or []
    log(f"{suite}: done in {time.perf_counter() - suite_start:.0f} s")
    save()
  log(f"\ntotal {time.perf_counter() - start:.0f} s; `{command}`\n")
  print(markdown(rows))


if __name__ == "__main__":
  app.run(main)
