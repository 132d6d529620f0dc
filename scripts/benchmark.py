"""Benchmarks of gajax: aggregators, meta-steps, achieved FLOP/s, and a PyTorch MAML baseline.

    python scripts/benchmark.py --suite=all --json=bench.json --markdown=bench.md
    python scripts/benchmark.py --suite=aggregators --quick          # tiny sizes, seconds

Suites (``--suite``):
  aggregators  each registered aggregator's jitted ``tx.update`` on a stacked pytree (2 leaves), for
               T in {2, 8, 32, 128} tasks and P in {1e4, 1e6} parameters, as a ratio to ``mean`` timed
               in the same process.
  meta_step    meta-iterations/s of the jitted meta-step (sampling, per-task updates, aggregation,
               Adam): sinusoid MLP (MAML / FOMAML / Reptile x mean / gradient agreement) and Conv-4 on
               random Omniglot-shaped images (MAML x mean / agreement; ``--big`` adds FOMAML, Reptile,
               max-pooling and 20-way 1-shot); vmap over tasks vs a Python loop over tasks; one jit
               call per step vs a ``lax.scan`` block of 10 steps.
  flops        achieved FLOP/s of MAML meta-steps (XLA cost analysis, scans unrolled for the count)
               against a float32 2048x2048 matrix product timed in the same run.
  conv         Conv-4 MAML as ``scripts/train.py`` runs it (``lax.scan`` blocks of 10 steps, per step)
               with each convolution implementation (``matmul``: patch matrix products; ``xla``:
               library convolutions, grouped under ``vmap``) x mean / gradient agreement: which
               implementation ``Conv4(conv="auto")`` should pick on this device.
  peers        the sinusoid and 5-way Conv-4 (stride-2 and max-pool) MAML configs written in plain
               PyTorch, as a Python loop over tasks and with torch.func.vmap, at each
               ``--torch_threads`` (optional: needs torch, see requirements-bench.txt; skipped with a
               message without it); ratio torch_ms / jax_ms.

Every comparison is timed inside one process with interleaved repeats (see gajax/benchmarking.py);
rows give the median, min and max over ``--repeats`` samples taken after ``--warmup`` calls (programs
slower than 1 s get ``--max_repeats_slow``). The markdown table is printed last; ``--json`` gets every
row.
"""

import dataclasses
import functools
import importlib
import inspect
import json
import shlex
import sys
import time

from absl import app, flags

import _cli
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gajax import aggregators, algorithms, benchmarking, meta
from gajax.models import Conv4, resolve_conv_impl
from gajax.tasks import sinusoid
from gajax.train import TrainConfig, uses_host_loops

SUITES = ("aggregators", "meta_step", "conv", "flops", "peers", "memory")
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
flags.DEFINE_list("torch_threads", ["2", "1"], "torch.set_num_threads values for the peers suite. "
                  "2 matches XLA's pool on a 2-core machine; 1 is there because on a loaded machine "
                  "PyTorch's OpenMP barriers make 2 threads up to ~35x slower than 1.")
flags.DEFINE_list("configs", None, "Only these meta-step workloads (meta_step, flops, peers), e.g. "
                  "sinusoid,omni5w_stride,omni20w_stride (default: each suite's own choice).")
flags.DEFINE_list("memory_steps", ["1", "5", "25", "100"], "Inner-step counts of the memory suite.")
flags.DEFINE_string("torch_device", "cpu", "Device of the PyTorch baseline in the peers suite: cpu or "
                    "cuda (then each torch step ends with torch.cuda.synchronize()).")
FLAGS = flags.FLAGS

BLOCK = 10  # Steps per lax.scan block in the jit-per-step comparison.


def log(msg):
  print(msg, flush=True)


def timed(contenders, min_sample_s=None):
  """Interleaved timings of ``name -> (fn, args)`` with the flags' repeats; slow programs get fewer.

  Each sample lasts at least ``min_sample_s`` (default 0.1 s, 0.01 s with --quick): millisecond steps
  are averaged over many back-to-back calls, as a training loop runs them.
  """
  if min_sample_s is None:
    min_sample_s = 0.01 if FLAGS.quick else 0.1
  return benchmarking.compare(contenders, repeats=FLAGS.repeats, warmup=FLAGS.warmup,
                              min_sample_s=min_sample_s, slow_s=1.0,
                              slow_repeats=FLAGS.max_repeats_slow)


def row(suite, config, timing, device=None, **extra):
  return {"suite": suite, "config": config, "device": device or benchmarking.device_string(),
          **timing.as_ms(), **extra}


# ---------------------------------------------------------------------------------------------------
# Aggregators.


def aggregator_names():
  """Registered names (the registry is optional: without it, the two built into the package)."""
  try:
    registry = importlib.import_module("gajax.aggregators.registry")
    return list(registry.names()), registry
  except ImportError:
    return ["mean", "gradient_agreement"], None


def build_aggregator(name, num_tasks, registry=None):
  """The aggregator ``name`` with the arguments its factory requires, sized for ``num_tasks``."""
  if name == "gradient_agreement":  # Sized state: it can live in a lax.scan carry.
    return aggregators.gradient_agreement(num_tasks=num_tasks)
  if registry is None:
    return aggregators.mean()
  params = inspect.signature(registry.factory(name)).parameters
  kwargs = {}
  if "num_tasks" in params:
    kwargs["num_tasks"] = num_tasks
  if "trim" in params:  # Trimmed mean needs T > 2 * trim: cut a quarter of the tasks at each end.
    kwargs["trim"] = (num_tasks - 1) // 4
  return registry.get(name, **kwargs)


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


def suite_aggregators(rows):
  names, registry = aggregator_names()
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
  tasks = (2, 4) if FLAGS.quick else (2, 8, 32, 128)
  sizes = (1_000,) if FLAGS.quick else (10_000, 1_000_000)
  for num_params in sizes:
    for num_tasks in tasks:
      updates = stacked_updates(jax.random.PRNGKey(0), num_tasks, num_params)
      params = jax.tree_util.tree_map(lambda x: x[0], updates)
      contenders = {}
      for name in wanted:
        try:
          tx = build_aggregator(name, num_tasks, registry)
          state = tx.init(params)
          fn = jax.jit(functools.partial(lambda tx, u, s, p: tx.update(u, s, p), tx))
          jax.block_until_ready(fn(updates, state, params))  # Compile now: failures skip the name.
        except Exception as e:  # pylint: disable=broad-except
          log(f"aggregators: skipping {name!r} at T={num_tasks}, P={num_params:g}: "
              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
          continue
        contenders[name] = (fn, (updates, state, params))
      config = f"T={num_tasks} P={num_params:.0e}"
      log(f"aggregators: {config}: timing {len(contenders)} aggregators, interleaved")
      timings = timed(contenders, min_sample_s=0.002 if FLAGS.quick else 0.02)
      for name, timing in timings.items():
        rows.append(row("aggregators", f"{name} {config}", timing, aggregator=name,
                        num_tasks=num_tasks, num_params=num_params, baseline="mean",
                        **benchmarking.paired_ratio(timing, timings["mean"])))
      del updates, contenders


# ---------------------------------------------------------------------------------------------------
# Meta-step configurations.


@dataclasses.dataclass(frozen=True)
class MetaConfig:
  """One meta-learning workload. ``task``: ``"sinusoid"`` or ``"omniglot"`` (random images)."""
  name: str
  task: str
  num_tasks: int
  inner_steps: int
  inner_lr: float
  shots: int
  queries: int  # Sinusoid: query points per task. Omniglot: query images per class.
  ways: int = 1
  downsample: str = "stride"
  hidden: int = 64  # MLP width (sinusoid) or Conv-4 filters (omniglot).
  image_size: int = 28
  conv: str = "auto"  # Conv-4's implementation (gajax.models.Conv4.conv).

  def describe(self):
    if self.task == "sinusoid":
      return (f"sinusoid MLP 1-{self.hidden}-{self.hidden}-1, {self.shots}+{self.queries} pts, "
              f"{self.num_tasks} tasks, {self.inner_steps} steps")
    return (f"Conv-4/{self.downsample} ({resolve_conv_impl(self.conv)}) {self.ways}-way "
            f"{self.shots}-shot, {self.num_tasks} tasks, {self.inner_steps} steps")


def meta_configs():
  if FLAGS.quick:
    return [
        MetaConfig("sinusoid", "sinusoid", 4, 2, 0.01, 5, 5, hidden=8),
        MetaConfig("omni2w_stride", "omniglot", 2, 1, 0.4, 1, 1, ways=2, hidden=4),
    ]
  configs = [MetaConfig("sinusoid", "sinusoid", 25, 5, 0.01, 10, 10)]
  for downsample in ("stride", "pool"):
    # MAML's Omniglot settings: 5-way 1-shot, meta-batch 32, 1 inner step, alpha = 0.4;
    # 20-way 1-shot, meta-batch 16, 5 inner steps, alpha = 0.1. One query image per class.
    configs.append(MetaConfig(f"omni5w_{downsample}", "omniglot", 32, 1, 0.4, 1, 1, ways=5,
                              downsample=downsample))
    configs.append(MetaConfig(f"omni20w_{downsample}", "omniglot", 16, 5, 0.1, 1, 1, ways=20,
                              downsample=downsample))
  return configs


def selected(configs):
  """``configs`` narrowed to ``--configs`` when given."""
  if FLAGS.configs is None:
    return configs
  return [c for c in configs if c.name in FLAGS.configs]


def omniglot_like(cfg):
  """``(sample, loss_fn, init_params)`` for Conv-4 on random 28x28x1 images with class-major labels.

  The images are random (no dataset needed), drawn on the device inside the meta-step as the real
  Omniglot sampler does; the cost of a meta-step does not depend on pixel values.
  """
  model = Conv4(num_classes=cfg.ways, filters=cfg.hidden, downsample=cfg.downsample, conv=cfg.conv)
  size = cfg.image_size

  def draw(key, num_tasks, per_class):
    images = jax.random.uniform(key, (num_tasks, cfg.ways * per_class, size, size, 1))
    labels = jnp.broadcast_to(jnp.repeat(jnp.arange(cfg.ways), per_class),
                              (num_tasks, cfg.ways * per_class))
    return {"x": images, "y": labels}

  def sample(key, num_tasks, data=None):
    del data  # Generated images: nothing to draw from.
    k_support, k_query = jax.random.split(key)
    return draw(k_support, num_tasks, cfg.shots), draw(k_query, num_tasks, cfg.queries)

  def loss_fn(params, batch):
    logits = model.apply(params, batch["x"])
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]))

  def init_params(key):
    return model.init(key, jnp.zeros((1, size, size, 1), jnp.float32))

  return sample, loss_fn, init_params


def workload(cfg):
  """``(sample, loss_fn, init_params)`` of a :class:`MetaConfig`."""
  if cfg.task == "sinusoid":
    task = sinusoid.make_task(shots=cfg.shots, queries=cfg.queries, hidden=(cfg.hidden, cfg.hidden))
    return task.sample, task.loss_fn, task.init_params
  return omniglot_like(cfg)


def make_learner(cfg, algorithm, loss_fn):
  if algorithm == "reptile":
    return algorithms.reptile(loss_fn, inner_steps=cfg.inner_steps, inner_lr=cfg.inner_lr)
  return algorithms.maml(loss_fn, inner_steps=cfg.inner_steps, inner_lr=cfg.inner_lr,
                         first_order=algorithm == "fomaml")


@functools.lru_cache(maxsize=None)
def meta_step(cfg, algorithm, aggregator):
  """``(step, jitted step, state)`` for one workload; cached, so suites share compiled steps."""
  sample, loss_fn, init_params = workload(cfg)
  tx = optax.chain(build_aggregator(aggregator, cfg.num_tasks), optax.adam(1e-3))
  step = meta.make_meta_step(make_learner(cfg, algorithm, loss_fn), tx, sample, cfg.num_tasks)
  state = meta.init_state(jax.random.PRNGKey(1), init_params(jax.random.PRNGKey(0)), tx)
  return step, jax.jit(step), state


@functools.lru_cache(maxsize=None)
def scan_block(cfg, algorithm, aggregator):
  """``(block, state)``: ``BLOCK`` meta-steps as one jitted ``lax.scan``, as ``scripts/train.py`` runs
  them; ``block(state) -> (state, metrics)``. Cached, so suites share one compiled block."""
  step, _, state = meta_step(cfg, algorithm, aggregator)
  return jax.jit(meta.make_block(step, BLOCK)), state


def time_meta_steps(cfg, pairs):
  """Interleaved timings of ``(algorithm, aggregator)`` meta-steps of ``cfg``: ``pair -> Timing``."""
  contenders = {}
  for algorithm, aggregator in pairs:
    _, jitted, state = meta_step(cfg, algorithm, aggregator)
    contenders[(algorithm, aggregator)] = (jitted, (state,))
  return timed(contenders)


def loop_vs_vmap(cfg):
  """MAML's per-task updates by ``vmap`` (one jit) vs a Python loop calling a jitted one-task fn.

  Both start from the same pre-sampled meta-batch and end with the same jitted mean + Adam update,
  so the difference is the per-task part alone: one batched program vs ``T`` dispatches of a
  single-task program (how PyTorch MAML code, e.g. learn2learn's examples, is usually written).
  """
  sample, loss_fn, init_params = workload(cfg)
  learner = make_learner(cfg, "maml", loss_fn)
  tx = optax.chain(aggregators.mean(), optax.adam(1e-3))
  params = init_params(jax.random.PRNGKey(0))
  opt_state = tx.init(params)
  support, query = jax.jit(sample, static_argnums=1)(jax.random.PRNGKey(1), cfg.num_tasks)

  def apply(params, opt_state, stacked):
    updates, opt_state = tx.update(stacked, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  @jax.jit
  def vmapped(params, opt_state, support, query):
    return apply(params, opt_state, algorithms.per_task(learner)(params, support, query))

  single = jax.jit(learner)
  # Stacking the per-task updates happens inside the jitted apply: one dispatch, not one per leaf.
  apply_list = jax.jit(lambda p, s, updates: apply(p, s, jax.tree_util.tree_map(
      lambda *u: jnp.stack(u), *updates)))
  tasks = [jax.tree_util.tree_map(lambda x, i=i: x[i], (support, query))
           for i in range(cfg.num_tasks)]

  def looped(params, opt_state):
    return apply_list(params, opt_state, [single(params, s, q) for s, q in tasks])

  contenders = {"vmap": (vmapped, (params, opt_state, support, query)),
                "loop": (looped, (params, opt_state))}
  return timed(contenders)


def jit_vs_scan(cfg):
  """``BLOCK`` meta-steps: ``BLOCK`` calls of the jitted step vs one jitted ``lax.scan`` block."""
  _, jitted, state = meta_step(cfg, "maml", "mean")
  block, _ = scan_block(cfg, "maml", "mean")

  def per_step(state):
    for _ in range(BLOCK):
      state, _ = jitted(state)
    return state

  contenders = {"scan": (lambda s: block(s)[0], (state,)), "jit_per_step": (per_step, (state,))}
  return timed(contenders)


def per_call(timing, calls):
  """``timing`` of a program that makes ``calls`` meta-steps, as a time per meta-step."""
  return benchmarking.Timing(*(x / calls for x in timing[:3]), tuple(x / calls for x in timing.samples))


def trains_with_scan(cfg):
  """Whether ``scripts/train.py`` runs this workload as ``lax.scan`` blocks (not a host loop)."""
  return not uses_host_loops(TrainConfig(task=cfg.task, conv_impl=cfg.conv))


ALL_PAIRS = tuple((a, g) for a in ("maml", "fomaml", "reptile") for g in ("mean", "gradient_agreement"))


def meta_step_plan():
  """``[(config, (algorithm, aggregator) pairs, dispatch comparisons?)]`` for the meta_step suite.

  A second-order Conv-4 meta-step takes seconds to tens of seconds on a 2-core CPU (and a minute or
  two to compile), so by default Conv-4 gets the MAML pair only (the agreement overhead) on the
  stride-2 net, plus the vmap-vs-loop comparison; ``--big`` adds every algorithm, max-pooling and the
  20-way configs.
  """
  configs = {c.name: c for c in meta_configs()}
  if FLAGS.quick:  # Every compile costs seconds: one pair on the sinusoid, one step on Conv-4.
    return [(configs["sinusoid"], ALL_PAIRS[:2], True), (configs["omni2w_stride"], ALL_PAIRS[:1], True)]
  plan = [(configs["sinusoid"], ALL_PAIRS, True), (configs["omni5w_stride"], ALL_PAIRS[:2], True)]
  if FLAGS.big:
    plan = [(configs["sinusoid"], ALL_PAIRS, True), (configs["omni5w_stride"], ALL_PAIRS, True),
            (configs["omni5w_pool"], ALL_PAIRS, True), (configs["omni20w_stride"], ALL_PAIRS, False),
            (configs["omni20w_pool"], ALL_PAIRS[:2], False)]
  return [(cfg, pairs, dispatch) for cfg, pairs, dispatch in plan if selected([cfg])]


def add_comparison(rows, cfg, timings, baseline, label):
  """One meta_step row per contender of ``timings``, each with its ratio to ``timings[baseline]``."""
  for name, timing in timings.items():
    rows.append(row("meta_step", f"{cfg.name} {label.format(name)}", timing, workload=cfg.describe(),
                    its_per_s=1.0 / timing.median, baseline=baseline,
                    **benchmarking.paired_ratio(timing, timings[baseline])))


def suite_meta_step(rows):
  for cfg, pairs, dispatch in meta_step_plan():
    log(f"meta_step: {cfg.describe()}: {len(pairs)} variants, interleaved")
    timings = time_meta_steps(cfg, pairs)
    for (algorithm, aggregator), timing in timings.items():
      extra = {}
      if aggregator != "mean":
        extra = {"baseline": f"{algorithm}+mean",
                 **benchmarking.paired_ratio(timing, timings[(algorithm, "mean")])}
      rows.append(row("meta_step", f"{cfg.name} {algorithm}+{aggregator}", timing,
                      workload=cfg.describe(), algorithm=algorithm, aggregator=aggregator,
                      its_per_s=1.0 / timing.median, **extra))
    if not dispatch:
      continue
    log(f"meta_step: {cfg.describe()}: vmap vs Python loop over tasks (MAML)")
    add_comparison(rows, cfg, loop_vs_vmap(cfg), "vmap", "maml per-task {}")
    if cfg.task != "sinusoid" and not FLAGS.big:
      continue  # Ten multi-second Conv-4 steps per sample: only with --big.
    log(f"meta_step: {cfg.describe()}: one jit per step vs lax.scan blocks of {BLOCK}")
    timings = jit_vs_scan(cfg)
    for name, timing in timings.items():
      per_step = per_call(timing, BLOCK)
      extra = {"baseline": "scan", **benchmarking.paired_ratio(timing, timings["scan"])}
      rows.append(row("meta_step", f"{cfg.name} maml+mean {name} (per step, blocks of {BLOCK})",
                      per_step, workload=cfg.describe(), its_per_s=1.0 / per_step.median, **extra))


def conv_configs():
  """Conv-4 workloads of the conv suite: the stride-2 nets (MAML's Omniglot architecture).

  On a CPU the 20-way net only with ``--big``: there a block of its XLA-convolution steps takes
  minutes.
  """
  if FLAGS.quick:
    names = ("omni2w_stride",)
  elif FLAGS.big or jax.default_backend() != "cpu":
    names = ("omni5w_stride", "omni20w_stride")
  else:
    names = ("omni5w_stride",)
  return selected([c for c in meta_configs() if c.name in names])


def suite_conv(rows):
  for cfg in conv_configs():
    log(f"conv: {cfg.describe()}: matmul vs XLA convolutions x mean vs agreement, scan blocks of "
        f"{BLOCK}, interleaved")
    contenders, blocks = {}, {}
    for conv in ("matmul", "xla"):
      for aggregator in ("mean", "gradient_agreement"):
        block, state = scan_block(dataclasses.replace(cfg, conv=conv), "maml", aggregator)
        contenders[(conv, aggregator)] = (lambda s, block=block: block(s)[0], (state,))
        blocks[(conv, aggregator)] = (block, state)
    timings = {name: per_call(t, BLOCK) for name, t in timed(contenders).items()}
    # Same function? Both implementations from the same state and keys: the query losses of the
    # block's steps should agree to float32 (or TF32, on GPUs) rounding.
    losses = {k: np.asarray(block(state)[1]["query_loss"], np.float64)
              for k, (block, state) in blocks.items()}
    for (conv, aggregator), timing in timings.items():
      # Mean rows against matmul+mean (the implementation's cost), agreement rows against the mean
      # row of the same implementation (the aggregator's overhead).
      baseline = ("matmul", "mean") if aggregator == "mean" else (conv, "mean")
      rows.append(row("conv", f"{cfg.name} maml+{aggregator} conv={conv} (per step, blocks of "
                      f"{BLOCK})", timing, workload=cfg.describe(), conv=conv, aggregator=aggregator,
                      its_per_s=1.0 / timing.median, baseline="+".join(baseline),
                      **benchmarking.paired_ratio(timing, timings[baseline])))
      if conv != "matmul":
        # Step 1 starts from the same parameters, so only rounding separates the two (float32;
        # TF32 in both on recent NVIDIA GPUs); later steps add Adam's amplification of it.
        rel = np.abs(losses[(conv, aggregator)] - losses[("matmul", aggregator)]) / np.abs(
            losses[("matmul", aggregator)])
        rows[-1]["rel_loss_diff_vs_matmul"] = {"step_1": float(rel[0]), "max": float(np.max(rel))}
        rows[-1]["notes"] = (f"query loss vs matmul's: {rel[0]:.1e} at step 1, {np.max(rel):.1e} "
                             f"at most over {BLOCK} steps")


# ---------------------------------------------------------------------------------------------------
# Memory of second order: plain reverse mode vs checkpointed inner loop vs first order.


def suite_memory(rows):
  """Conv-4 5-way 1-shot, 32 tasks: per-task updates of one meta-batch at several inner-step counts.

  Memory is XLA's compiled analysis (``temp_size_in_bytes``, the working memory of the program; it
  grows with the activations kept for the backward pass); time is the interleaved median per call
  (sample, per-task updates, mean over tasks). The device's own peak is not reported: it cannot be
  reset between programs, so it would mix the variants.
  """
  base = next(c for c in meta_configs() if c.name == ("omni2w_stride" if FLAGS.quick else "omni5w_stride"))
  steps = [1, 3] if FLAGS.quick else [int(k) for k in FLAGS.memory_steps]
  variants = {"maml": {}, "maml+remat": {"remat": True}, "fomaml": {"first_order": True}}
  for k in steps:
    cfg = dataclasses.replace(base, inner_steps=k)
    log(f"memory: {cfg.describe()}: plain vs checkpointed (remat) second order vs first order")
    sample, loss_fn, init_params = workload(cfg)
    params = init_params(jax.random.PRNGKey(0))
    contenders, memory = {}, {}
    for name, kwargs in variants.items():
      learner = algorithms.maml(loss_fn, inner_steps=k, inner_lr=cfg.inner_lr, **kwargs)

      def updates(p, key, learner=learner):
        support, query = sample(key, cfg.num_tasks)
        return jax.tree_util.tree_map(lambda u: jnp.mean(u, axis=0),
                                      algorithms.per_task(learner)(p, support, query))

      compiled = jax.jit(updates).lower(params, jax.random.PRNGKey(1)).compile()
      analysis = compiled.memory_analysis()
      memory[name] = None if analysis is None else int(analysis.temp_size_in_bytes)
      contenders[name] = (compiled, (params, jax.random.PRNGKey(1)))
    timings = timed(contenders)
    for name, timing in timings.items():
      mib = memory[name] / 2**20 if memory[name] is not None else float("nan")
      ratio_mem = (memory[name] / memory["maml"]) if memory[name] and memory["maml"] else float("nan")
      rows.append(row("memory", f"{cfg.name} {k} inner steps, {name}", timing, workload=cfg.describe(),
                      inner_steps=k, variant=name, temp_bytes=memory[name], memory_vs_maml=ratio_mem,
                      baseline="maml", notes=f"{mib:.0f} MiB working memory ({ratio_mem:.2f}x maml's)",
                      **benchmarking.paired_ratio(timing, timings["maml"])))


# ---------------------------------------------------------------------------------------------------
# FLOP/s.


def suite_flops(rows):
  size = 256 if FLAGS.quick else 2048
  a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (size, size), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  peak_flops = benchmarking.xla_flops(jnp.matmul, a, b)  # 2 n^3, from the same cost analysis.
  # MAML+mean on the sinusoid and Conv-4 (stride-2, 5-way; with --big also max-pool and 20-way).
  names = ["sinusoid"] if FLAGS.quick else ["sinusoid", "omni5w_stride"]
  if FLAGS.big:
    names += ["omni5w_pool", "omni20w_stride"]
  configs = selected([c for c in meta_configs() if c.name in names])
  contenders = {"peak": (matmul, (a, b))}
  flops = {"peak": peak_flops}
  for cfg in configs:
    step, jitted, state = meta_step(cfg, "maml", "mean")
    flops[cfg.name] = benchmarking.xla_flops(step, state)
    log(f"flops: {cfg.describe()} maml+mean: {flops[cfg.name] / 1e9:.3f} GFLOP per meta-step "
        "(XLA cost analysis of the lowered program, scans unrolled)")
    contenders[cfg.name] = (jitted, (state,))
  log(f"flops: timing {len(contenders)} programs, interleaved")
  timings = timed(contenders)
  peak = flops["peak"] / timings["peak"].median
  rows.append(row("flops", f"peak: f32 matmul {size}x{size}", timings["peak"], flops=flops["peak"],
                  gflops_per_s=peak / 1e9, fraction_of_peak=1.0))
  for cfg in configs:
    timing = timings[cfg.name]
    achieved = flops[cfg.name] / timing.median
    rows.append(row("flops", f"{cfg.name} maml+mean", timing, workload=cfg.describe(),
                    flops=flops[cfg.name], gflops_per_s=achieved / 1e9,
                    fraction_of_peak=achieved / peak))


# ---------------------------------------------------------------------------------------------------
# PyTorch peers.


def peer_configs():
  configs = meta_configs()
  if FLAGS.quick or FLAGS.configs:
    return selected(configs)
  return [c for c in configs if c.name in ("sinusoid", "omni5w_stride", "omni5w_pool")]


def torch_maml(torch, cfg, vectorised, threads):
  """A plain PyTorch second-order MAML meta-step for ``cfg`` (mean over tasks, then Adam).

  ``vectorised=False``: a Python loop over tasks; each inner step is
  ``torch.autograd.grad(loss, fast_weights, create_graph=True)``, and each task's query loss is
  back-propagated on its own (the pattern of learn2learn's MAML examples).
  ``vectorised=True``: ``torch.func.vmap`` over tasks of ``torch.func.grad`` of the query loss after an
  inner loop of ``torch.func.grad`` steps (the closest PyTorch analogue of gajax's ``vmap``).
  Data are drawn inside the step with torch's RNG, as gajax draws them inside its jitted step. Each
  call first sets ``torch.set_num_threads(threads)``.
  """
  F = torch.nn.functional
  dev = torch.device(FLAGS.torch_device)
  gen = torch.Generator(device=dev).manual_seed(0)
  on = {"device": dev}

  def sync():
    if dev.type == "cuda":
      torch.cuda.synchronize()

  if cfg.task == "sinusoid":
    sizes = [(1, cfg.hidden), (cfg.hidden, cfg.hidden), (cfg.hidden, 1)]
    params = []
    for fan_in, fan_out in sizes:
      params += [torch.randn(fan_in, fan_out, generator=gen, **on) / fan_in ** 0.5, torch.zeros(fan_out, **on)]

    def forward(p, x):
      h = torch.relu(x @ p[0] + p[1])
      h = torch.relu(h @ p[2] + p[3])
      return h @ p[4] + p[5]

    def loss_fn(p, x, y):
      return torch.mean((forward(p, x) - y) ** 2)

    def sample():
      t = cfg.num_tasks
      amp = torch.empty(t, 1, 1, **on).uniform_(0.1, 5.0, generator=gen)
      phase = torch.empty(t, 1, 1, **on).uniform_(0.0, 2 * np.pi, generator=gen)
      x = torch.empty(t, cfg.shots + cfg.queries, 1, **on).uniform_(-5.0, 5.0, generator=gen)
      y = amp * torch.sin(x + phase)
      return x[:, :cfg.shots], y[:, :cfg.shots], x[:, cfg.shots:], y[:, cfg.shots:]
  else:
    stride = 2 if cfg.downsample == "stride" else 1
    params, channels, size = [], 1, cfg.image_size
    for _ in range(4):
      params += [torch.randn(cfg.hidden, channels, 3, 3, generator=gen, **on) / (9 * channels) ** 0.5,
                 torch.zeros(cfg.hidden, **on), torch.ones(cfg.hidden, **on), torch.zeros(cfg.hidden, **on)]
      channels = cfg.hidden
      size = -(-size // 2) if stride == 2 else size // 2
    params += [torch.randn(cfg.hidden * size * size, cfg.ways, generator=gen, **on) * 0.01,
               torch.zeros(cfg.ways, **on)]

    def forward(p, x):  # x: [N, 1, H, W] (NCHW, PyTorch's native layout).
      for i in range(4):
        w, b, scale, shift = p[4 * i:4 * i + 4]
        x = F.conv2d(x, w, b, stride=stride, padding=1)
        # Batch statistics always (MAML's transductive batch norm), as gajax's BatchStatNorm.
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        x = (x - mean) / torch.sqrt(var + 1e-5) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        x = torch.relu(x)
        if stride == 1:
          x = F.max_pool2d(x, 2)
      return x.flatten(1) @ p[16] + p[17]

    def loss_fn(p, x, y):
      return F.cross_entropy(forward(p, x), y)

    def draw(per_class):
      n = cfg.ways * per_class
      x = torch.rand(cfg.num_tasks, n, 1, cfg.image_size, cfg.image_size, generator=gen, **on)
      y = torch.arange(cfg.ways, **on).repeat_interleave(per_class).expand(cfg.num_tasks, n)
      return x, y

    def sample():
      return (*draw(cfg.shots), *draw(cfg.queries))

  params = [p.requires_grad_() for p in params]
  opt = torch.optim.Adam(params, lr=1e-3)
  steps, lr, t = cfg.inner_steps, cfg.inner_lr, cfg.num_tasks

  def looped():
    torch.set_num_threads(threads)
    xs, ys, xq, yq = sample()
    opt.zero_grad()
    for i in range(t):
      fast = list(params)
      for _ in range(steps):
        grads = torch.autograd.grad(loss_fn(fast, xs[i], ys[i]), fast, create_graph=True)
        fast = [w - lr * g for w, g in zip(fast, grads)]
      (loss_fn(fast, xq[i], yq[i]) / t).backward()
    opt.step()
    sync()

  from torch.func import grad, vmap  # pylint: disable=import-outside-toplevel

  def query_loss(p, xs, ys, xq, yq):
    for _ in range(steps):
      g = grad(loss_fn)(p, xs, ys)
      p = tuple(w - lr * gi for w, gi in zip(p, g))
    return loss_fn(p, xq, yq)

  per_task = vmap(grad(query_loss), in_dims=(None, 0, 0, 0, 0))

  def vectorised_step():
    torch.set_num_threads(threads)
    xs, ys, xq, yq = sample()
    meta_grads = per_task(tuple(p.detach() for p in params), xs, ys, xq, yq)
    for p, g in zip(params, meta_grads):
      p.grad = g.mean(0)
    opt.step()
    sync()

  return vectorised_step if vectorised else looped


def suite_peers(rows):
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    log("peers: skipped: PyTorch is not installed (optional; pip install -r requirements-bench.txt).")
    return [{"suite": "peers", "reason": "torch not installed"}]
  skipped = []
  flavours = {"loop": (False, "Python loop over tasks, torch.autograd.grad(create_graph=True)"),
              "vmap": (True, "torch.func.vmap over tasks of nested torch.func.grad")}
  for cfg in peer_configs():
    _, jitted, state = meta_step(cfg, "maml", "mean")
    contenders = {"jax": (jitted, (state,))}
    if trains_with_scan(cfg):  # As scripts/train.py runs it: lax.scan blocks of steps.
      block, _ = scan_block(cfg, "maml", "mean")
      contenders["jax_scan"] = (lambda s, block=block: block(s)[0], (state,))
    for threads in FLAGS.torch_threads:
      for flavour, (vectorised, _) in flavours.items():
        name = (flavour, threads)
        fn = torch_maml(torch, cfg, vectorised, threads)
        try:
          fn()
        except Exception as e:  # pylint: disable=broad-except
          msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
          log(f"peers: {cfg.name} torch {flavour} failed, skipped: {msg}")
          skipped.append({"suite": "peers", "config": f"{cfg.name} torch {flavour}", "reason": msg})
          continue
        contenders[name] = (fn, ())
    log(f"peers: {cfg.describe()}: gajax vs PyTorch MAML (second order, Adam), interleaved")
    timings = timed(contenders)
    jax_timing = timings.pop("jax")
    rows.append(row("peers", f"{cfg.name} maml gajax (vmap, jit per step)", jax_timing,
                    workload=cfg.describe(), its_per_s=1.0 / jax_timing.median))
    scan_timing = timings.pop("jax_scan", None)
    if scan_timing is not None:
      scan_timing = per_call(scan_timing, BLOCK)
      rows.append(row("peers", f"{cfg.name} maml gajax (vmap, scan blocks of {BLOCK}, per step)",
                      scan_timing, workload=cfg.describe(), its_per_s=1.0 / scan_timing.median,
                      baseline="gajax jit per step", **benchmarking.paired_ratio(scan_timing,
                                                                                 jax_timing)))
    for (flavour, threads), timing in timings.items():
      if FLAGS.torch_device.startswith("cuda"):
        device = f"{FLAGS.torch_device}: {torch.cuda.get_device_name()}, torch {torch.__version__}"
      else:
        device = f"cpu: {benchmarking.cpu_name()}, torch {torch.__version__}, {threads} thread(s)"
      rows.append(row("peers", f"{cfg.name} maml torch {flavour} {threads}t", timing, device=device,
                      workload=cfg.describe(), baseline="gajax", implementation=flavours[flavour][1],
                      torch_threads=threads, its_per_s=1.0 / timing.median,
                      **benchmarking.paired_ratio(timing, jax_timing)))
      if scan_timing is not None:
        rows[-1]["vs_scan"] = benchmarking.paired_ratio(timing, scan_timing)
        rows[-1]["notes"] = f"{rows[-1]['vs_scan']['ratio']:.1f}x the gajax scan step"
  return skipped


# ---------------------------------------------------------------------------------------------------
# Output.


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
  if FLAGS.torch_device != "cpu" and not FLAGS.torch_device.startswith("cuda"):
    sys.exit(f"error: --torch_device must be cpu or cuda[:N]; got {FLAGS.torch_device!r}.")
  if FLAGS.quick:
    FLAGS.repeats = min(FLAGS.repeats, 2)
    FLAGS.warmup = min(FLAGS.warmup, 1)
  suites = SUITES if "all" in FLAGS.suite else tuple(FLAGS.suite)
  unknown = [s for s in suites if s not in SUITES]
  if unknown:
    sys.exit(f"error: unknown --suite {', '.join(unknown)}; choose from {', '.join(SUITES)} or all.")
  known = {c.name for c in meta_configs()}
  if FLAGS.configs and not set(FLAGS.configs) <= known:
    sys.exit(f"error: unknown --configs {', '.join(sorted(set(FLAGS.configs) - known))}; choose from "
             f"{', '.join(sorted(known))}.")
  runners = {"aggregators": suite_aggregators, "meta_step": suite_meta_step, "conv": suite_conv,
             "flops": suite_flops, "peers": suite_peers, "memory": suite_memory}
  log(f"device: {benchmarking.device_string()}; suites: {', '.join(suites)}"
      f"{' (quick)' if FLAGS.quick else ''}; repeats {FLAGS.repeats}, warmup {FLAGS.warmup}")
  rows, skipped = [], []
  start = time.perf_counter()
  command = "python scripts/benchmark.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])

  def save():  # After every suite, so an interrupted run keeps what it measured.
    if FLAGS.json:
      with open(FLAGS.json, "w") as f:
        json.dump({"command": command, "device": benchmarking.device_string(), "quick": FLAGS.quick,
                   "seconds": time.perf_counter() - start, "rows": rows, "skipped": skipped}, f,
                  indent=1)
    if FLAGS.markdown:
      with open(FLAGS.markdown, "w") as f:
        f.write(f"`{command}` on {benchmarking.device_string()}\n\n{markdown(rows)}\n")

  for suite in suites:
    suite_start = time.perf_counter()
    skipped += runners[suite](rows) or []
    log(f"{suite}: done in {time.perf_counter() - suite_start:.0f} s")
    save()
  log(f"\ntotal {time.perf_counter() - start:.0f} s; `{command}`\n")
  print(markdown(rows))


if __name__ == "__main__":
  app.run(main)
