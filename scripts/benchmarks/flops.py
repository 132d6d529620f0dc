"""Suite ``flops``: achieved FLOP/s of MAML meta-steps against a matrix product on the same device.

FLOPs come from XLA's cost analysis of the lowered meta-step (:func:`xla_flops`, every ``lax.scan``
unrolled for the count, since XLA counts a loop body once); the time is the interleaved median of the
jitted step. The peak is a float32 2048x2048 matrix product (``--quick``: 256x256), counted and timed
the same way in the same run. Workloads: MAML + mean on the sinusoid MLP and Conv-4/stride-2 5-way
(``--big`` adds max-pooling and 20-way; ``--quick``: the sinusoid only).
"""

import contextlib
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from benchmarks.common import FLAGS, log, row, timed
from benchmarks.workloads import meta_configs, meta_step, selected


@contextlib.contextmanager
def unrolled_scans():
  """Makes ``jax.lax.scan`` unroll fully while the context is open (for FLOP counting only).

  XLA's cost analysis counts the body of a ``while`` loop once, whatever its trip count, so a
  ``lax.scan`` of ``k`` inner steps would be reported as one. Tracing with every scan unrolled turns
  the loop into straight-line code whose operations XLA counts one by one. Only code that looks
  ``jax.lax.scan`` up at call time (as :func:`gajax.adaptation.adapt` does) is affected. The timed
  programs are never traced inside this context.
  """
  original = jax.lax.scan

  @functools.wraps(original)
  def scan(*args, **kwargs):
    kwargs["unroll"] = True
    return original(*args, **kwargs)

  jax.lax.scan = scan
  try:
    yield
  finally:
    jax.lax.scan = original


def xla_flops(fn: Callable, *args: Any, unroll: bool = True, compiled: bool = False) -> float:
  """FLOPs of one call of ``fn(*args)`` from XLA's cost analysis (``HloCostAnalysis``).

  ``compiled=True`` analyses the optimised program (``jit(fn).lower(*args).compile().cost_analysis()``);
  the default analyses the lowered, unoptimised one (``lower(*args).cost_analysis()``), which skips
  the LLVM compilation: on a loaded 2-core machine that is 2 s instead of 25 s for the sinusoid MAML
  step, whose two counts differ by 3% (106 vs 109 MFLOP: the optimiser rewrites a few ops). Both
  return a dict in jax 0.10 (a list of one dict per program in some older versions); both forms are
  accepted. With ``unroll=True`` scans are unrolled for the count (see :func:`unrolled_scans`); the
  timed program itself is never changed.
  """
  fn = getattr(fn, "__wrapped__", fn)  # A jitted function: count its Python function, retraced.
  context = unrolled_scans() if unroll else contextlib.nullcontext()
  with context:
    # A fresh wrapper, so that a trace cached for `fn` (with rolled scans) is not reused.
    lowered = jax.jit(lambda *a: fn(*a)).lower(*args)
    flops = _flops_of(lowered.compile().cost_analysis() if compiled else lowered.cost_analysis())
    if flops is None and not compiled:
      # jax 0.11 on GPU gave no count for the lowered program (BUILD.md): ask the compiled one.
      flops = _flops_of(lowered.compile().cost_analysis())
  return float("nan") if flops is None else flops


def _flops_of(cost) -> float | None:
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  flops = (cost or {}).get("flops")
  return None if flops is None or flops != flops else float(flops)


def run(rows):
  size = 256 if FLAGS.quick else 2048
  a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (size, size), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  peak_flops = xla_flops(jnp.matmul, a, b)  # 2 n^3, from the same cost analysis.
  names = ["sinusoid"] if FLAGS.quick else ["sinusoid", "omni5w_stride"]
  if FLAGS.big:
    names += ["omni5w_pool", "omni20w_stride"]
  workloads = selected([w for w in meta_configs() if w.name in names])
  contenders = {"peak": (matmul, (a, b))}
  flops = {"peak": peak_flops}
  for w in workloads:
    exp, jitted, args = meta_step(w, "maml", "mean")
    flops[w.name] = xla_flops(exp.step, *args)
    log(f"flops: {w.describe()} maml+mean: {flops[w.name] / 1e9:.3f} GFLOP per meta-step "
        "(XLA cost analysis of the lowered program, scans unrolled)")
    contenders[w.name] = (jitted, args)
  log(f"flops: timing {len(contenders)} programs, interleaved")
  timings = timed(contenders)
  peak = flops["peak"] / timings["peak"].median
  rows.append(row("flops", f"peak: f32 matmul {size}x{size}", timings["peak"], flops=flops["peak"],
                  gflops_per_s=peak / 1e9, fraction_of_peak=1.0))
  for w in workloads:
    t = timings[w.name]
    achieved = flops[w.name] / t.median
    rows.append(row("flops", f"{w.name} maml+mean", t, workload=w.describe(),
                    flops=flops[w.name], gflops_per_s=achieved / 1e9,
                    fraction_of_peak=achieved / peak))
