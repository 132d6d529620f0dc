"""Suite ``host_input``: what share of a meta-step waits on input when tasks are drawn on the host.

tiered-ImageNet's path (``gajax.tasks.host_pipeline``): a split in a memory-mapped uint8 cache, each
meta-batch drawn and gathered on the host and prefetched to the device while the step before runs.
The split here is synthetic, written as the loader writes its cache (``gajax.data.cache.atomic_memmap``):
tiered-ImageNet's 351 training classes, ragged counts (``--host_input_images`` per class on average,
default 100: 35,100 images, 743 MB at 84x84x3; the real split is 9.5 GB), random pixels, in a temporary
folder. The page cache holds it after the first pass, as it would hold a real split that fits in RAM;
a split larger than RAM reads from disk and is slower to gather than measured here.

Rows, at MAML's mini-ImageNet 5-way 1-shot settings (meta-batch 4, 15 queries per class, Conv-4 with 32
filters, max-pool, flattened head; ``configs/images.py:tiered_imagenet_5w1s``):
  draw+gather     ``draw_meta_batch`` on the host (6.8 MB of uint8 per meta-batch)
  + device_put    the same, then ``jax.device_put`` to the device and wait for it
  <v> on device   one jitted meta-step of variant ``<v>`` with its batch already on the device
  <v> fed         the same steps fed by ``host_batches`` (2 workers, depth 2), each step synchronised
                  as the training loop's metrics fetch does; ``input_wait_share`` = the time the loop
                  waited on the pipeline / the wall time of the fed steps.
Variants: ``maml`` (second order, 5 inner steps at 0.01, the protocol) and ``fomaml1`` (first order, one
inner step: a step several times cheaper, where input would show first). ``--quick``: 16x16 images, 20
classes, Conv-4 with 4 filters, 2 fed steps.
"""

import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

import gajax
from benchmarks import timing
from benchmarks.common import FLAGS, log, row, timed
from gajax import models
from gajax.data.base import RaggedClassImages
from gajax.data.cache import atomic_memmap
from gajax.tasks import host_pipeline
from gajax.tasks.base import classifier_fns

flags.DEFINE_integer("host_input_images", 100, "host_input suite: images per class on average (351 "
                     "classes) of the synthetic memory-mapped split.")
flags.DEFINE_integer("host_input_steps", 4, "host_input suite: meta-steps fed by the pipeline per variant.")

WAYS, SHOTS, QUERIES, TASKS = 5, 1, 15, 4


def synthetic_split(folder: str, classes: int, per_class: int, size: int) -> RaggedClassImages:
  """A ragged split of random uint8 images in a memory-mapped ``.npy``, as the tiered cache holds it."""
  rng = np.random.default_rng(0)
  counts = rng.integers(max(QUERIES + SHOTS, per_class * 3 // 4), per_class * 5 // 4 + 1, classes)
  offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
  path = f"{folder}/split.npy"
  with atomic_memmap(path, (int(offsets[-1]), size, size, 3)) as out:
    for start in range(0, out.shape[0], 4096):
      stop = min(start + 4096, out.shape[0])
      out[start:stop] = rng.integers(0, 256, (stop - start, size, size, 3), dtype=np.uint8)
  return RaggedClassImages(np.load(path, mmap_mode="r"), offsets, tuple(map(str, range(classes))),
                           np.zeros(classes, np.int64), ("all",))


def make_step(model, variant, size):
  loss_fn, _ = classifier_fns(model)
  learner = (gajax.algorithms.maml(loss_fn, inner_steps=5, inner_lr=0.01) if variant == "maml" else
             gajax.algorithms.maml(loss_fn, inner_steps=1, inner_lr=0.01, first_order=True))
  tx = optax.chain(gajax.aggregators.mean(), optax.adam(1e-3))

  @jax.jit
  def step(params, opt_state, batch):
    support, query = jax.vmap(lambda b: host_pipeline.split_support_query(b, SHOTS))(batch)
    updates = gajax.per_task(learner)(params, support, query)
    updates, opt_state = tx.update(updates, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
  return step, params, tx.init(params)


def run(rows):
  quick = FLAGS.quick
  size, classes = (16, 20) if quick else (84, 351)
  per_class = 20 if quick else FLAGS.host_input_images
  fed_steps = 2 if quick else FLAGS.host_input_steps
  model = models.Conv4(WAYS, filters=4 if quick else 32, downsample="pool")
  with tempfile.TemporaryDirectory(prefix="gajax_host_input_") as folder:
    data = synthetic_split(folder, classes, per_class, size)
    describe = (f"{classes} classes, {int(data.offsets[-1])} images of {size}x{size}x3 memory-mapped "
                f"({data.images.nbytes / 2**20:.0f} MiB); 5-way 1-shot, 15 queries, {TASKS} tasks")
    log(f"host_input: {describe}")
    np.asarray(data.images).sum()  # one pass: the page cache holds the split, as after a first epoch

    counter = iter(range(10**9))

    def draw():
      return host_pipeline.draw_meta_batch(data, 0, next(counter), TASKS, WAYS, SHOTS, QUERIES)

    def draw_put():
      return jax.device_put(draw())

    host_times = timed({"draw+gather": (draw, ()), "+ device_put": (draw_put, ())})
    for name, t in host_times.items():
      rows.append(row("host_input", name, t, workload=describe,
                      notes=f"{TASKS * WAYS * (SHOTS + QUERIES) * size * size * 3 / 2**20:.1f} MiB a meta-batch"))

    for variant in ("maml", "fomaml1"):
      step, params, opt_state = make_step(model, variant, size)
      batch = jax.device_put(draw())
      on_device = timed({"on device": (step, (params, opt_state, batch))})["on device"]
      rows.append(row("host_input", f"{variant} on device", on_device, workload=describe,
                      variant=variant, its_per_s=1.0 / on_device.median))
      with host_pipeline.host_batches(data, 0, TASKS, WAYS, SHOTS, QUERIES, range(fed_steps)) as feed:
        start = time.perf_counter()
        for b in feed:
          params, opt_state = jax.block_until_ready(step(params, opt_state, b))
        wall = time.perf_counter() - start
        wait = feed.wait_seconds
      per_step = timing._timing([wall / fed_steps])  # pylint: disable=protected-access
      share = wait / wall
      log(f"host_input: {variant}: fed {fed_steps} steps in {wall:.2f} s, waited {wait:.3f} s on input "
          f"({100 * share:.1f}%)")
      rows.append(row("host_input", f"{variant} fed", per_step, workload=describe, variant=variant,
                      baseline=f"{variant} on device", ratio=per_step.median / on_device.median,
                      ratio_min=per_step.median / on_device.max, ratio_max=per_step.median / on_device.min,
                      input_wait_share=share,
                      input_wait_seconds=wait, fed_steps=fed_steps,
                      notes=f"{100 * share:.1f}% of the wall time waiting on input "
                            f"({wait:.3f} s over {fed_steps} steps, the first batch's included)"))
