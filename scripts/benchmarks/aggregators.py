"""Suite ``aggregators``: the cost of each aggregator's update, as a ratio to ``mean``.

Each registered aggregator's jitted ``tx.update`` on a stacked pytree of two leaves, for
T in {2, 8, 32, 128} tasks and P in {1e4, 1e6} parameters (``--quick``: T in {2, 4}, P = 1e3), all
aggregators of one (T, P) timed interleaved in one process; rows carry the ratio to ``mean``.
Aggregators are built as training runs build them (``gajax.train.make_aggregator``), except
``trimmed_mean``, which cuts a quarter of the tasks at each end here (so it runs at T = 2 too).
A ``gramian (alone)`` row times the float32 ``[T, T]`` Gramian by itself, with its GFLOP/s.
"""

import functools
import math

import jax

from benchmarks import timing
from benchmarks.common import FLAGS, log, row, timed
from gajax import aggregators
from gajax.train import make_aggregator


def build(name, num_tasks):
  """The aggregator ``name`` sized for ``num_tasks``."""
  if aggregators.registry.canonical_name(name) == "trimmed_mean":  # Needs T > 2 * trim.
    return aggregators.get(name, trim=(num_tasks - 1) // 4)
  return make_aggregator(name, num_tasks)


def stacked_updates(key, num_tasks, num_params):
  """``num_params`` split over two leaves, ``[T, P/2]`` and ``[T, P/200, 100]``: per-task ``c + noise``.

  A shared component makes the tasks agree on average, as meta-gradients do, so conflict-based
  methods take their usual branches rather than the all-orthogonal special case.
  """
  half = num_params // 2
  shapes = [(half,), (half // 100, 100)]
  leaves = []
  for i, shape in enumerate(shapes):
    k_common, k_noise = jax.random.split(jax.random.fold_in(key, i))
    common = jax.random.normal(k_common, shape)
    noise = jax.random.normal(k_noise, (num_tasks,) + shape)
    leaves.append(common + 2.0 * noise)
  return {"w": leaves[0], "b": leaves[1]}


def _counts(flag, values, least):
  """``--flag=1e6,32`` as ints >= ``least``, or a one-line error naming the flag."""
  counts = []
  for value in values:
    try:
      number = float(value)
    except ValueError:
      number = float("nan")
    if not (math.isfinite(number) and number >= least and number == int(number)):
      raise ValueError(f"--{flag}: {value!r} is not a whole number >= {least}.")
    counts.append(int(number))
  return tuple(counts)


def grid():
  """``(task counts, parameter counts)`` of the suite from the flags; ValueError names a bad flag."""
  tasks = (2, 4) if FLAGS.quick else (2, 8, 32, 128)
  sizes = (1_000,) if FLAGS.quick else (10_000, 1_000_000)
  if FLAGS.aggregator_tasks:
    tasks = _counts("aggregator_tasks", FLAGS.aggregator_tasks, least=1)
  if FLAGS.aggregator_params:
    sizes = _counts("aggregator_params", FLAGS.aggregator_params, least=200)
  return tasks, sizes


def run(rows):
  names = list(aggregators.names())
  if FLAGS.aggregators:
    wanted = FLAGS.aggregators
  elif FLAGS.quick:
    wanted = ["mean", "gradient_agreement"]
  else:
    wanted = names
  for name in wanted:
    if name not in names:
      log(f"aggregators: skipping {name!r}: not registered (have: {', '.join(names)}).")
  wanted = [n for n in wanted if n in names]
  if "mean" not in wanted:
    wanted = ["mean"] + wanted
  tasks, sizes = grid()
  for num_params in sizes:
    for num_tasks in tasks:
      updates = stacked_updates(jax.random.PRNGKey(0), num_tasks, num_params)
      params = jax.tree_util.tree_map(lambda x: x[0], updates)
      contenders = {}
      for name in wanted:
        try:
          tx = build(name, num_tasks)
          state = tx.init(params)
          fn = jax.jit(functools.partial(lambda tx, u, s, p: tx.update(u, s, p), tx))
          jax.block_until_ready(fn(updates, state, params))  # Compile now: failures skip the name.
        except Exception as e:  # pylint: disable=broad-except
          log(f"aggregators: skipping {name!r} at T={num_tasks}, P={num_params:g}: "
              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
          continue
        contenders[name] = (fn, (updates, state, params))
      # The T x T Gramian alone (what every Gramian-based aggregator computes first), to separate
      # its cost from the weights' solver: 2 T^2 P flops, reported as achieved GFLOP/s.
      contenders["gramian (alone)"] = (jax.jit(aggregators.gramian), (updates,))
      config = f"T={num_tasks} P={num_params:.0e}"
      log(f"aggregators: {config}: timing {len(contenders)} aggregators, interleaved")
      timings = timed(contenders, min_sample_s=0.002 if FLAGS.quick else 0.02)
      for name, t in timings.items():
        extra = {}
        if name == "gramian (alone)":
          gflops = 2 * num_tasks ** 2 * num_params / t.median / 1e9
          extra = {"gramian_gflops_per_s": gflops, "notes": f"{gflops:.1f} GFLOP/s"}
        rows.append(row("aggregators", f"{name} {config}", t, aggregator=name,
                        num_tasks=num_tasks, num_params=num_params, baseline="mean",
                        **timing.paired_ratio(t, timings["mean"]), **extra))
      del updates, contenders
