"""Suite ``images``: step time and memory at mini-ImageNet's size, Conv-4 and ResNet-12.

MAML's mini-ImageNet 5-way 1-shot settings (``configs/images.py:mini_imagenet_5w1s``): 84x84x3
images, meta-batch 4, 1 support and 15 query images per class, 5 inner steps at 0.01; random images
drawn on the device inside the step (the cost does not depend on pixel values, and no data set is
needed). Models: MAML's Conv-4 (32 filters, max-pool, flattened head; ``gajax.models.Conv4``) and
ResNet-12 (``gajax.models.ResNet12``, 12.4M parameters). For each, second-order MAML, the same with its
inner loop checkpointed (``remat=True``) and FOMAML: one jitted meta-step (per-task updates, mean,
Adam), XLA's compiled working memory (``temp_size_in_bytes``) and the interleaved time per step.

ResNet-12's steps take minutes each on a 2-core CPU (about 4 TFLOP a meta-step, most of it the 15
query images per class): there they are compiled for their memory and timed only with ``--big`` (or
on an accelerator). ``--quick``: 16x16 images, 1 inner step,
Conv-4 with 4 filters only, MAML and FOMAML only.
"""

import jax
import jax.numpy as jnp
import optax

import gajax
from benchmarks import timing
from benchmarks.common import FLAGS, log, row, timed
from gajax import models
from gajax.tasks.base import classifier_fns

VARIANTS = ("maml", "maml+remat", "fomaml")


def settings():
  """``(image size, inner steps, {model name: model})``."""
  if FLAGS.quick:
    # ResNet-12's second-order compilation alone takes minutes; the quick check leaves it out.
    return 16, 1, {"conv4": models.Conv4(5, filters=4, downsample="pool")}
  return 84, 5, {"conv4": models.Conv4(5, filters=32, downsample="pool"),
                 "resnet12": models.ResNet12(5)}


def meta_step(model, variant, size, inner_steps, ways=5, shots=1, queries=15, tasks=4):
  """``(compiled step, args, working bytes)`` of one jitted meta-step of ``variant``."""

  loss_fn, _ = classifier_fns(model)
  learner = gajax.algorithms.maml(loss_fn, inner_steps=inner_steps, inner_lr=0.01,
                                  first_order=variant == "fomaml", remat=variant == "maml+remat")
  tx = optax.chain(gajax.aggregators.mean(), optax.adam(1e-3))

  def draw(key, per_class):
    x = jax.random.uniform(key, (tasks, ways * per_class, size, size, 3))
    y = jnp.broadcast_to(jnp.repeat(jnp.arange(ways), per_class), (tasks, ways * per_class))
    return {"x": x, "y": y}

  def step(params, opt_state, key):
    k_support, k_query = jax.random.split(key)
    updates = gajax.per_task(learner)(params, draw(k_support, shots), draw(k_query, queries))
    updates, opt_state = tx.update(updates, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
  args = (params, tx.init(params), jax.random.PRNGKey(1))
  # --quick checks that the suite runs: XLA's cheapest compilation (its time dominates at tiny sizes).
  options = ({"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
             if FLAGS.quick else None)
  compiled = jax.jit(step).lower(*args).compile(compiler_options=options)
  analysis = compiled.memory_analysis()
  return compiled, args, None if analysis is None else int(analysis.temp_size_in_bytes)


def run(rows):
  size, inner_steps, nets = settings()
  slow_on_cpu = jax.default_backend() == "cpu" and not (FLAGS.big or FLAGS.quick)
  for name, model in nets.items():
    describe = (f"{name} mini-ImageNet 5-way 1-shot, {size}x{size}x3, 4 tasks, 15 queries per class, "
                f"{inner_steps} inner steps")
    variants = ("maml", "fomaml") if FLAGS.quick else VARIANTS
    log(f"images: {describe}: {', '.join(variants)}")
    contenders, memory = {}, {}
    for variant in variants:
      compiled, args, memory[variant] = meta_step(model, variant, size, inner_steps)
      if name == "resnet12" and slow_on_cpu:
        log(f"images: {name} {variant}: compiled for its memory only (timing needs --big on a CPU)")
        continue
      contenders[variant] = (compiled, args)
    timings = timed(contenders) if contenders else {}
    for variant in variants:
      mib = memory[variant] / 2**20 if memory[variant] is not None else float("nan")
      extra = {"notes": f"{mib:.0f} MiB working memory"}
      if variant in timings:
        t = timings[variant]
        if variant != "maml" and "maml" in timings:
          extra.update(baseline="maml", **timing.paired_ratio(t, timings["maml"]))
        extra["its_per_s"] = 1.0 / t.median
      else:  # memory only: a row without a time
        t = timing.Timing(float("nan"), float("nan"), float("nan"), ())
        extra["notes"] += " (not timed)"
      rows.append(row("images", f"{name} {variant}", t, workload=describe, variant=variant,
                      temp_bytes=memory[variant], **extra))
