"""The benchmark suites behind ``scripts/benchmark.py``, one module per suite.

  timing       interleaved, synchronised timings (medians of repeats) and device names.
  common       what every suite shares: the flags' repeat settings, the row format, progress lines.
  workloads    the meta-learning workloads (a name and a ``gajax.train.TrainConfig``), built into
               meta-steps and ``lax.scan`` blocks with the run factory of ``gajax.train``.
  aggregators, meta_step, conv, flops, memory, peers, images, user_model
               the suites; each has ``run(rows)``, which appends its rows and returns skip records.

Command-line flags are defined by ``scripts/benchmark.py`` and read here through ``absl.flags.FLAGS``
when a suite runs. Scripts import this package as ``benchmarks`` (``scripts/`` is ``sys.path[0]``).
"""
