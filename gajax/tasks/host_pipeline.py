"""Few-shot tasks drawn on the host from a memory-mapped split, prefetched to the device.

For data sets that do not fit on the device (tiered-ImageNet's train split is 9.5 GB at 84x84): the
host draws each meta-batch's image indices, gathers those images from the memory-mapped cache
(:func:`gajax.data.tiered_imagenet.load_tiered_imagenet`) as uint8, and a few worker threads keep the
next meta-batches in flight and on their way to the device while the current step runs
(:class:`Prefetcher`). The device converts to float and splits support from query
(:func:`split_support_query`), as the on-device samplers of :mod:`gajax.tasks.images` do.

Randomness
  Meta-batch ``step`` of a run with seed ``seed`` is drawn from
  ``np.random.default_rng((seed, stream, step))`` alone (stream 0: training, 1: evaluation chunks): it does not depend on which thread drew it, in which order, or whether the run was resumed,
  so a resumed run sees exactly the tasks an uninterrupted one would.

The draw
  Each task: ``ways`` distinct classes uniformly without replacement (label ``i`` for the ``i``-th
  drawn), then per class ``shots + queries`` distinct images uniformly from all of that class's images
  (the first ``shots`` form the support set). Classes with fewer images than ``shots + queries`` are an
  error up front.

Why not grain
  ``grain`` (the JAX ecosystem's loader) is built around records transformed one by one; here a whole
  meta-batch is one ``numpy`` gather from a memory map (milliseconds, no decoding: the cache is already
  uint8), so an ordered thread pool does the job without grain's six further dependencies. What share
  of a step waits on input is measured by ``scripts/benchmark.py --suite=host_input``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import time
from typing import Callable, Iterable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from gajax.data.base import RaggedClassImages

TRAIN_STREAM, EVAL_STREAM = 0, 1


def check_ragged(data: RaggedClassImages, ways: int, shots: int, queries: int, what: str = "split") -> None:
  """Raises ``ValueError`` (one line) unless ``ways``-way ``shots + queries``-image tasks can be drawn."""
  for name, v in (("ways", ways), ("shots", shots), ("queries", queries)):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
      raise ValueError(f"{name} must be an int >= 1, got {v!r}")
  counts = np.diff(np.asarray(data.offsets))
  if ways > counts.size:
    raise ValueError(f"ways={ways} exceeds the {counts.size} classes of the {what}")
  if shots + queries > counts.min():
    c = int(np.argmin(counts))
    raise ValueError(f"shots + queries = {shots + queries} exceeds the {int(counts[c])} images of class "
                     f"{data.class_names[c]!r} in the {what}")


def draw_indices(rng: np.random.Generator, offsets: np.ndarray, num_tasks: int, ways: int,
                 per_class: int) -> np.ndarray:
  """int64 ``[num_tasks, ways, per_class]``: rows into the class-major image array (see module doc)."""
  counts = np.diff(offsets)
  out = np.empty((num_tasks, ways, per_class), np.int64)
  for t in range(num_tasks):
    for i, c in enumerate(rng.choice(counts.size, ways, replace=False)):
      out[t, i] = offsets[c] + rng.choice(counts[c], per_class, replace=False)
  return out


def draw_meta_batch(data: RaggedClassImages, seed: int, step: int, num_tasks: int, ways: int,
                    shots: int, queries: int, stream: int = TRAIN_STREAM) -> np.ndarray:
  """Meta-batch ``step`` of seed ``seed``: uint8 ``[num_tasks, ways, shots + queries, H, W, 3]``.

  Deterministic in ``(seed, stream, step)`` (module docstring; ``stream`` keeps evaluation draws apart
  from training ones). Reads only the drawn images from ``data.images`` (a memory map, usually).
  """
  # SeedSequence wants non-negative entries; any int seed (TrainConfig allows negative ones) maps to one.
  rng = np.random.default_rng((int(seed) % 2**64, int(stream), int(step)))
  idx = draw_indices(rng, np.asarray(data.offsets), num_tasks, ways, shots + queries)
  # Sorted reads are kinder to a disk-backed map; the inverse permutation restores the drawn order.
  flat = idx.reshape(-1)
  order = np.argsort(flat, kind="stable")
  images = np.empty((flat.size,) + data.images.shape[1:], np.uint8)
  images[order] = data.images[flat[order]]
  return images.reshape(idx.shape + data.images.shape[1:])


def split_support_query(x: jax.Array, shots: int) -> tuple:
  """One task's ``(support, query)`` from uint8 ``x: [ways, n, H, W, ch]`` (class-major).

  ``x`` becomes float32 ``uint8 / 255``; support is the first ``shots`` images of each class,
  ``{"x": [ways * shots, H, W, ch], "y": int32 [ways * shots]}`` with label ``i`` for class row ``i``;
  query is the rest, likewise. Shared with the on-device samplers of :mod:`gajax.tasks.images`.
  """
  ways, n = x.shape[:2]
  x = x.astype(jnp.float32) / 255.0
  labels = jnp.broadcast_to(jnp.arange(ways, dtype=jnp.int32)[:, None], (ways, n))
  shape = x.shape[2:]

  def part(sl):
    return {"x": x[:, sl].reshape((-1,) + shape), "y": labels[:, sl].reshape(-1)}

  return part(slice(0, shots)), part(slice(shots, n))


class Prefetcher:
  """Iterates ``produce(i)`` for ``i`` in ``items``, in order, with up to ``depth`` items in flight.

  ``workers`` threads call ``produce`` ahead of the consumer (numpy gathers and ``jax.device_put``
  release the GIL), so while the device runs step ``s`` the inputs of steps ``s + 1 .. s + depth`` are
  being read and copied. An exception in ``produce`` is raised from ``next()`` at its item's turn.
  ``close()`` (or leaving a ``with`` block) cancels what is pending; threads finish the item they hold.

  ``wait_seconds`` is the time the consumer spent blocked in ``next()`` (input the device waited on,
  the first item's included), ``items_done`` the items handed out.
  """

  def __init__(self, produce: Callable, items: Iterable, depth: int = 2, workers: int = 2):
    if depth < 1 or workers < 1:
      raise ValueError(f"Prefetcher: depth and workers must be >= 1; got depth={depth}, workers={workers}.")
    self._produce, self._items, self._depth = produce, iter(items), depth
    self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="gajax-prefetch")
    self._pending = collections.deque()
    self.wait_seconds, self.items_done = 0.0, 0
    for _ in range(depth):
      self._submit()

  def _submit(self) -> None:
    for item in self._items:
      self._pending.append(self._pool.submit(self._produce, item))
      return

  def __iter__(self):
    return self

  def __next__(self):
    if not self._pending:
      raise StopIteration
    future = self._pending.popleft()
    start = time.perf_counter()
    try:
      value = future.result()
    except BaseException:
      self.close()
      raise
    self.wait_seconds += time.perf_counter() - start
    self.items_done += 1
    self._submit()
    return value

  def close(self) -> None:
    for future in self._pending:
      future.cancel()
    self._pending.clear()
    self._pool.shutdown(wait=False, cancel_futures=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def host_batches(data: RaggedClassImages, seed: int, num_tasks: int, ways: int, shots: int, queries: int,
                 steps: Iterable[int], *, depth: int = 2, workers: int = 2,
                 device_put: Optional[Callable] = jax.device_put) -> Prefetcher:
  """A :class:`Prefetcher` of the meta-batches of ``steps`` (:func:`draw_meta_batch`), on the device.

  ``device_put=None`` leaves them on the host (numpy). Pass each to the step and split it there with
  :func:`split_support_query` (``jax.vmap`` over the task axis).
  """
  check_ragged(data, ways, shots, queries)

  def produce(step):
    batch = draw_meta_batch(data, seed, step, num_tasks, ways, shots, queries)
    return batch if device_put is None else device_put(batch)

  return Prefetcher(produce, steps, depth=depth, workers=workers)


class HostFeed(NamedTuple):
  """A task distribution drawn on the host: what :class:`gajax.tasks.base.Task` carries as ``host``.

  The training loop (:func:`gajax.train.train`) then feeds each meta-step the meta-batch
  :meth:`train_batches` drew for it (uint8 ``[T, ways, shots + queries, H, W, 3]``, the task's
  ``sample`` splitting it on the device), and evaluates on :meth:`eval_tasks`, drawn once.
  """
  train: RaggedClassImages
  eval: RaggedClassImages
  ways: int
  shots: int
  queries: int
  eval_queries: int

  def train_batches(self, seed: int, num_tasks: int, steps: Iterable[int], **kw) -> Prefetcher:
    """:func:`host_batches` of the training split for ``steps`` (0-based meta-step indices)."""
    return host_batches(self.train, seed, num_tasks, self.ways, self.shots, self.queries, steps, **kw)

  def eval_tasks(self, seed: int, num_tasks: int, chunk_size: int) -> np.ndarray:
    """uint8 ``[ceil(num_tasks / chunk_size), chunk_size, ways, shots + eval_queries, H, W, 3]``:
    chunk ``c`` is :func:`draw_meta_batch` of the evaluation split at ``(seed, EVAL_STREAM, c)``, so
    the evaluation tasks depend on the seed, ``num_tasks`` and ``chunk_size`` only (as on the device,
    :func:`gajax.meta.make_evaluate`)."""
    check_ragged(self.eval, self.ways, self.shots, self.eval_queries, "evaluation split")
    num_chunks = -(-num_tasks // chunk_size)
    return np.stack([draw_meta_batch(self.eval, seed, c, chunk_size, self.ways, self.shots,
                                     self.eval_queries, EVAL_STREAM) for c in range(num_chunks)])
