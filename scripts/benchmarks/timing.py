"""Timing helpers of the benchmark suites: medians of repeated, synchronised calls.

Every measurement calls ``jax.block_until_ready`` on the result, so the time covers the computation
and not only its asynchronous dispatch. Comparisons between functions (``compare``) interleave their
repeats (A, B, A, B, ... in a rotating order) inside one process: on a shared machine the load drifts
over seconds, and interleaving makes that drift hit every contender alike, so the *ratio* of two
medians is far steadier than either time alone.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import numpy as np


class Timing(NamedTuple):
  """Seconds per call: the median, min and max over repeats, and the raw samples."""
  median: float
  min: float
  max: float
  samples: tuple[float, ...]

  @property
  def median_ms(self) -> float:
    return 1e3 * self.median

  def as_ms(self) -> dict:
    """``{"median_ms", "min_ms", "max_ms", "repeats"}`` for JSON rows."""
    return {"median_ms": 1e3 * self.median, "min_ms": 1e3 * self.min, "max_ms": 1e3 * self.max,
            "repeats": len(self.samples)}


def _timing(samples: Sequence[float]) -> Timing:
  samples = tuple(float(s) for s in samples)
  return Timing(float(np.median(samples)), min(samples), max(samples), samples)


def _call_once(fn: Callable, args: tuple) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


# Calls shorter than this get one untimed call at the start of every sample (see ``compare``).
_PRIME_BELOW_S = 0.1


def _sample(fn: Callable, args: tuple, number: int, prime: bool) -> float:
  """Mean seconds per call over ``number`` back-to-back calls, each synchronised.

  With ``prime``, one untimed call comes first: the first call after another contender ran is slower
  (thread pools parked, caches holding the other program's data; on a loaded 2-core machine we saw a
  1 ms JAX step take 5 ms right after a PyTorch step), and steady-state throughput is what a training
  loop sees.
  """
  if prime:
    jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(number):
    jax.block_until_ready(fn(*args))
  return (time.perf_counter() - start) / number


def time_fn(fn: Callable, *args: Any, repeats: int = 10, warmup: int = 2,
            min_sample_s: float = 0.0) -> Timing:
  """Times ``fn(*args)``: ``warmup`` untimed calls (compilation, caches), then ``repeats`` samples.

  Args:
    fn: the function, typically jitted; its result is waited for with ``jax.block_until_ready``.
    repeats: timed samples; the :class:`Timing` summarises them.
    warmup: untimed calls first (at least two are made: the first call of a jitted function compiles,
      the second sizes the samples).
    min_sample_s: each sample averages as many back-to-back calls as needed to last this long, so
      that microsecond-scale functions are not dominated by timer and scheduler noise.
  """
  return compare({"fn": (fn, args)}, repeats=repeats, warmup=warmup,
                 min_sample_s=min_sample_s)["fn"]


def compare(contenders: Mapping[str, tuple[Callable, tuple]], *, repeats: int = 10,
            warmup: int = 2, min_sample_s: float = 0.0, slow_s: float = float("inf"),
            slow_repeats: int | None = None) -> dict[str, Timing]:
  """Times several ``name -> (fn, args)`` with their repeats interleaved; returns ``name -> Timing``.

  Repeat ``r`` runs one sample of every contender, starting from contender ``r mod n``, so no
  contender is always first (right after another's memory traffic) or always last. Contenders faster
  than 0.1 s per call get one untimed call at the start of each sample (see ``_sample``).

  Args:
    contenders: ``name -> (fn, args)``; each sample calls ``fn(*args)`` and waits for the result.
    repeats: samples per contender.
    warmup: untimed calls per contender before sampling (at least one: the first call compiles).
      The second warm-up call is timed to size the samples.
    min_sample_s: each sample averages as many back-to-back calls as needed to last this long, so
      that microsecond-scale functions are not dominated by timer and scheduler noise.
    slow_s, slow_repeats: when the slowest contender's warm call takes over ``slow_s`` seconds, take
      only ``slow_repeats`` samples, skip the warm-up calls beyond the second, and keep that second
      (already warm) call as the first sample (a budget for programs that take many seconds).
  """
  if repeats < 1:
    raise ValueError(f"compare: repeats must be >= 1, got {repeats}.")
  names = list(contenders)
  once = {}
  for name in names:  # Compile everything, and time one warm call of each, before any sample.
    fn, args = contenders[name]
    _call_once(fn, args)
    once[name] = max(_call_once(fn, args), 1e-7)
  slow = max(once.values()) > slow_s
  if slow and slow_repeats is not None:
    repeats = min(repeats, slow_repeats)
  for name in names:
    for _ in range(0 if slow else warmup - 2):
      _call_once(*contenders[name])
  numbers = {name: max(1, int(np.ceil(min_sample_s / once[name]))) for name in names}
  primes = {name: once[name] < _PRIME_BELOW_S for name in names}
  samples: dict[str, list[float]] = {name: [once[name]] if slow else [] for name in names}
  for r in range(1 if slow else 0, repeats):
    order = names[r % len(names):] + names[:r % len(names)]
    for name in order:
      fn, args = contenders[name]
      samples[name].append(_sample(fn, args, numbers[name], primes[name]))
  return {name: _timing(samples[name]) for name in names}


def paired_ratio(numerator: Timing, denominator: Timing) -> dict:
  """Ratio of two interleaved timings: the ratio of medians, and min/max of the per-repeat ratios.

  Sample ``r`` of both was taken in the same round of :func:`compare`, under the same load, so the
  per-repeat ratios show how steady the comparison is.
  """
  per_repeat = [a / b for a, b in zip(numerator.samples, denominator.samples)]
  return {"ratio": numerator.median / denominator.median,
          "ratio_min": min(per_repeat), "ratio_max": max(per_repeat)}


def cpu_name() -> str:
  """The CPU model from ``/proc/cpuinfo`` where there is one, else ``platform.processor()``."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def device_string() -> str:
  """One line naming the JAX backend device, e.g. ``"cpu: AMD EPYC, 2 cores, jax 0.10.2"``."""
  device = jax.devices()[0]
  if device.platform == "cpu":
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu: {cpu_name()}, {cores} cores, jax {jax.__version__}"
  return f"{device.platform}: {device.device_kind}, jax {jax.__version__}"


def per_call(timing: Timing, calls: int) -> Timing:
  """``timing`` of a program that makes ``calls`` steps, as a time per step."""
  return Timing(*(x / calls for x in timing[:3]), tuple(x / calls for x in timing.samples))
