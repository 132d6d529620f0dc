"""What every suite shares: timings with the flags' repeat settings, the row format, progress lines.

The flags (``--repeats``, ``--warmup``, ``--max_repeats_slow``, ``--quick``, ...) are defined by
``scripts/benchmark.py``; they are read here when a suite runs, not at import.
"""

from absl import flags

from benchmarks import timing

FLAGS = flags.FLAGS


def log(msg):
  print(msg, flush=True)


def timed(contenders, min_sample_s=None):
  """Interleaved timings of ``name -> (fn, args)`` with the flags' repeats; slow programs get fewer.

  Each sample lasts at least ``min_sample_s`` (default 0.1 s, 0.01 s with --quick): millisecond steps
  are averaged over many back-to-back calls, as a training loop runs them.
  """
  if min_sample_s is None:
    min_sample_s = 0.01 if FLAGS.quick else 0.1
  return timing.compare(contenders, repeats=FLAGS.repeats, warmup=FLAGS.warmup,
                        min_sample_s=min_sample_s, slow_s=1.0, slow_repeats=FLAGS.max_repeats_slow)


def row(suite, config, t, device=None, **extra):
  """One JSON row: suite, config, device, the :class:`timing.Timing` in ms, and ``extra``."""
  return {"suite": suite, "config": config, "device": device or timing.device_string(),
          **t.as_ms(), **extra}
