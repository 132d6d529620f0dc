"""Omniglot few-shot tasks: on-device sampling from explicit PRNG keys, and the training ``Task``.

The data come from :mod:`gajax.data.omniglot` (sources, decoding, the verified uint8 cache, download
and the class splits) as uint8 ``[C, D, S, S]`` with 0 = paper, 255 = ink; the samplers here turn them
into float32 ``x = uint8 / 255`` batches (ink 1.0) on the device.

Task sampling (``sample_tasks`` / ``make_sampler``), jitted, on device, from explicit PRNG keys:
  With ``rotations=True`` each character ``c`` yields 4 classes ``4 * c + k``, the character rotated by
  ``k * 90`` degrees counter-clockwise (``np.rot90(image, k)``), for the training *and* the test
  characters, as in MAML's Omniglot protocol. Each task draws ``ways`` distinct classes uniformly without
  replacement from all ``4 * C`` classes (Reptile-style: two rotations of one character are distinct
  classes and may share a task; MAML instead drew distinct characters and one rotation each). The i-th
  drawn class gets label ``i``; since the draw order is uniformly random, so is the class-to-label map.
  Per class, ``shots + queries`` distinct drawings out of 20 are drawn; the first ``shots`` form the
  support set, the rest the query set, so no drawing is in both. Examples are laid out class-major:
  support ``y = [0]*shots + [1]*shots + ...``.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from gajax.data import omniglot as omniglot_data
from gajax.models import Conv4
from gajax.tasks.base import Task, classifier_fns


class TaskIndices(NamedTuple):
  """What one task drew.

  Attributes:
    classes: int32 ``[ways]``; class ids, label ``i`` is ``classes[i]``. With rotations a class id is
      ``4 * character + k`` (rotation by ``k * 90`` degrees), without it is the character index.
    drawings: int32 ``[ways, shots + queries]``; distinct drawing indices per class, the first ``shots``
      for the support set.
  """
  classes: jax.Array
  drawings: jax.Array


# ----------------------------------------------------------------------------------------------------
# On-device task sampling.


def _num_classes(images_shape: tuple, ways: int, shots: int, queries: int, rotations: bool) -> int:
  """Validates a task spec against ``images_shape = [C, D, H, W]``; returns the class count."""
  if len(images_shape) != 4:
    raise ValueError(f"images must be [characters, drawings, H, W], got shape {tuple(images_shape)}")
  num_characters, num_drawings, h, w = images_shape
  for name, v in (("ways", ways), ("shots", shots), ("queries", queries)):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
      raise ValueError(f"{name} must be an int >= 1, got {v!r}")
  if rotations and h != w:
    raise ValueError(f"rotations need square images, got {h}x{w}")
  num_classes = num_characters * (4 if rotations else 1)
  if ways > num_classes:
    raise ValueError(f"ways={ways} exceeds the {num_classes} available classes "
                     f"({num_characters} characters{' x 4 rotations' if rotations else ''})")
  if shots + queries > num_drawings:
    raise ValueError(f"shots + queries = {shots + queries} exceeds the {num_drawings} drawings per character")
  return num_classes


def sample_task_indices(key: jax.Array, num_characters: int, ways: int, shots: int, queries: int,
                        rotations: bool = True,
                        num_drawings: int = omniglot_data.NUM_DRAWINGS) -> TaskIndices:
  """Draws one task's classes and drawings (see ``TaskIndices``). Traceable; all ints must be static.

  Both draws are "top-k of i.i.d. uniforms" (the Gumbel-top-k trick with equal weights, as
  ``jax.random.choice(replace=False, p=...)`` does): the indices of the k largest of n exchangeable
  uniforms are a uniformly random k-subset in uniformly random order, and are always distinct. One
  uniform draw serves the whole task, which keeps compile time far below ``choice``/``permutation``.
  """
  num_classes = _num_classes((num_characters, num_drawings, 1, 1), ways, shots, queries, rotations)
  u = jax.random.uniform(key, (num_classes + ways * num_drawings,))
  classes = jax.lax.top_k(u[:num_classes], ways)[1]
  drawings = jax.lax.top_k(u[num_classes:].reshape(ways, num_drawings), shots + queries)[1]
  return TaskIndices(classes.astype(jnp.int32), drawings.astype(jnp.int32))


def gather_task(images: jax.Array, indices: TaskIndices, shots: int, rotations: bool = True) -> tuple:
  """Builds one task's ``(support, query)`` from ``images: uint8 [C, D, S, S]`` and drawn indices.

  Returns:
    ``support = {"x": float32 [ways*shots, S, S, 1], "y": int32 [ways*shots]}`` and ``query`` likewise
    with ``ways*queries`` examples; ``x`` is ``uint8 / 255`` (ink 1.0).
  """
  ways, n = indices.drawings.shape
  if rotations:
    characters, turns = indices.classes // 4, indices.classes % 4
  else:
    characters, turns = indices.classes, None
  x = images[characters[:, None], indices.drawings]  # [ways, n, S, S]
  if rotations:
    # Four rotated copies then a per-class select: a gather instead of data-dependent control flow.
    rotated = jnp.stack([jnp.rot90(x, k, axes=(-2, -1)) for k in range(4)])  # [4, ways, n, S, S]
    x = rotated[turns, jnp.arange(ways)]
  x = (x.astype(jnp.float32) / 255.0)[..., None]
  labels = jnp.broadcast_to(jnp.arange(ways, dtype=jnp.int32)[:, None], (ways, n))
  side = x.shape[2:]

  def part(sl):
    return {"x": x[:, sl].reshape((-1,) + side), "y": labels[:, sl].reshape(-1)}

  return part(slice(0, shots)), part(slice(shots, n))


def _check_images(images, num_tasks: int) -> None:
  if not isinstance(num_tasks, (int, np.integer)) or isinstance(num_tasks, bool) or num_tasks < 1:
    raise ValueError(f"num_tasks must be an int >= 1, got {num_tasks!r}")
  if images.dtype != jnp.uint8:
    raise ValueError(f"images must be uint8 (0 = paper, 255 = ink), got {images.dtype}")


_STATIC = ("num_tasks", "ways", "shots", "queries", "rotations")


@functools.partial(jax.jit, static_argnames=_STATIC)
def sample_tasks_with_indices(key: jax.Array, images: jax.Array, num_tasks: int, ways: int, shots: int,
                              queries: int, rotations: bool = True) -> tuple:
  """``sample_tasks`` that also returns what it drew: ``(support, query, TaskIndices)``.

  The indices have a leading task axis: ``classes: int32 [T, ways]``, ``drawings: int32 [T, ways,
  shots + queries]``. Task ``t`` uses the key ``jax.random.split(key, num_tasks)[t]``.
  """
  _num_classes(images.shape, ways, shots, queries, rotations)
  _check_images(images, num_tasks)
  num_characters, num_drawings = images.shape[:2]

  def one(k):
    idx = sample_task_indices(k, num_characters, ways, shots, queries, rotations, num_drawings)
    support, query = gather_task(images, idx, shots, rotations)
    return support, query, idx

  return jax.vmap(one)(jax.random.split(key, num_tasks))


@functools.partial(jax.jit, static_argnames=_STATIC)
def sample_tasks(key: jax.Array, images: jax.Array, num_tasks: int, ways: int, shots: int, queries: int,
                 rotations: bool = True) -> tuple:
  """Samples a meta-batch of ``num_tasks`` N-way K-shot tasks on device.

  Args:
    key: a PRNG key; task ``t`` uses ``jax.random.split(key, num_tasks)[t]``.
    images: uint8 ``[C, D, S, S]``, ideally already a device array (e.g. one split from
      ``gajax.data.omniglot.split_omniglot`` through ``jnp.asarray`` once); a numpy array is copied to
      device on every call.
    num_tasks, ways, shots, queries: static Python ints.
    rotations: treat the 4 rotations of each character as classes.

  Returns:
    ``(support, query)`` with ``support = {"x": float32 [T, ways*shots, S, S, 1], "y": int32
    [T, ways*shots]}`` and ``query = {"x": float32 [T, ways*queries, S, S, 1], "y": int32
    [T, ways*queries]}``; labels are ``0..ways-1``; ``x = uint8 / 255`` (ink 1.0).
  """
  support, query, _ = sample_tasks_with_indices(key, images, num_tasks, ways, shots, queries, rotations)
  return support, query


def make_sampler(images: np.ndarray, ways: int, shots: int, queries: int,
                 rotations: bool = True) -> Callable[[jax.Array, int], tuple]:
  """Moves ``images`` (uint8 ``[C, D, S, S]``) to device once and returns ``sample(key, num_tasks)``.

  ``sample`` returns what ``sample_tasks`` does. It holds the device array in a closure; calling it from
  inside another ``jit`` would bake the array into that program as a constant, so there call
  ``sample_tasks`` with the array as an argument instead.
  """
  images = jnp.asarray(images)
  _num_classes(images.shape, ways, shots, queries, rotations)
  _check_images(images, 1)

  def sample(key: jax.Array, num_tasks: int) -> tuple:
    return sample_tasks(key, images, num_tasks, ways, shots, queries, rotations)

  return sample


# ----------------------------------------------------------------------------------------------------
# The task distribution for training.


def make_task(ways: int = 5, shots: int = 1, queries: int = 1, eval_queries: Optional[int] = None, *,
              data_dir: Optional[omniglot_data.PathLike] = None,
              cache_dir: Optional[omniglot_data.PathLike] = None,
              split: str = "maml", split_seed: int = 0, rotations: bool = True,
              downsample: str = "stride", filters: int = 64, conv: str = "auto", init: str = "flax",
              head_input: str = "flatten"):
  """N-way K-shot Omniglot with MAML's Conv-4 learner (:class:`gajax.models.Conv4`).

  Training tasks come from the meta-training characters of ``split``, evaluation tasks from the test
  characters; both uint8 splits are moved to the device once and handed to the samplers as
  ``train_data`` / ``eval_data`` (never closed over). Loss: softmax cross-entropy; metric: accuracy as
  a fraction. Batch norm uses the statistics of the batch it sees (support during adaptation, query
  when scored), as in MAML; see :class:`gajax.models.BatchStatNorm`.

  Args:
    ways, shots, queries: N, K, and query examples per class of training tasks.
    eval_queries: query examples per class of evaluation tasks (default: ``queries``).
    data_dir: the data path for :func:`gajax.data.omniglot.load_omniglot` (None: ``$GAJAX_DATA_DIR``).
    split, split_seed: see :func:`gajax.data.omniglot.split_indices`.
    rotations: 90/180/270-degree rotations as extra classes.
    downsample, filters: Conv-4's down-sampling (``"stride"`` or ``"pool"``) and width.
    conv: how Conv-4 computes its convolutions (``"auto"``, ``"matmul"``, ``"xla"``; see
      :class:`gajax.models.Conv4`).
    init: Conv-4's initialisation scheme, ``"flax"``, ``"torch"`` or ``"maml"``
      (:func:`gajax.models.layer_init`).
    head_input: what Conv-4's head sees, ``"flatten"`` or ``"mean"`` (MAML's reference code; see
      :class:`gajax.models.Conv4`).
  """
  eval_queries = queries if eval_queries is None else eval_queries
  data = omniglot_data.load_omniglot(data_dir, cache_dir)
  train_images, test_images = omniglot_data.split_omniglot(data, split=split, seed=split_seed)
  for images, q in ((train_images, queries), (test_images, eval_queries)):
    _num_classes(images.shape, ways, shots, q, rotations)
  model = Conv4(num_classes=ways, filters=filters, downsample=downsample, conv=conv, init_scheme=init,
                head_input=head_input)
  size = data.images.shape[-1]

  loss_fn, accuracy = classifier_fns(model)

  def sample(key, num_tasks, images):
    return sample_tasks(key, images, num_tasks, ways, shots, queries, rotations)

  def eval_sample(key, num_tasks, images):
    return sample_tasks(key, images, num_tasks, ways, shots, eval_queries, rotations)

  return Task(
      name="omniglot",
      sample=sample,
      eval_sample=eval_sample,
      init_params=lambda key: model.init(key, jnp.zeros((ways * shots, size, size, 1), jnp.float32)),
      loss_fn=loss_fn,
      metric_fn=accuracy,
      metric="accuracy",
      train_data=jnp.asarray(train_images),
      eval_data=jnp.asarray(test_images),
  )
