"""Few-shot image classification from a researcher's own copy: mini-ImageNet, tiered-ImageNet,
CIFAR-FS, FC100.

The readers of :mod:`gajax.data` decode each split once into a verified uint8 cache and return
``ClassImages`` (``images: uint8 [C, N, H, W, 3]``, every class with ``N`` images). Here a split is
moved to the device once and tasks are drawn there, from explicit PRNG keys, as for Omniglot
(:mod:`gajax.tasks.omniglot`): each task draws ``ways`` distinct classes of the split uniformly without
replacement (label ``i`` for the ``i``-th drawn class) and, per class, ``shots + queries`` distinct
images (the first ``shots`` for the support set), so no image is in both sets. ``x = uint8 / 255``
(float32 in [0, 1], no mean/std normalisation: MAML's reference code fed ``image / 255``); no
rotation classes and no augmentation.

Training tasks come from the ``train`` split, evaluation tasks from ``eval_split`` (``test`` by
default; ``val`` for model selection). The learner is MAML's mini-ImageNet Conv-4
(:class:`gajax.models.Conv4`: 32 filters, stride-1 convolutions, 2x2 max-pooling, the last feature map
flattened into the head), with batch statistics in batch norm as in MAML.

Memory: mini-ImageNet's train split is 64 x 600 x 84 x 84 x 3 bytes = 813 MB on the device (the
test split 254 MB), CIFAR-FS's 118 MB. tiered-ImageNet's (9.5 GB train, 4.4 GB test) stay in their
memory-mapped caches on the host: each meta-step's tasks are drawn there and prefetched to the device
(:mod:`gajax.tasks.host_pipeline`; the task's ``host`` field), and the evaluation tasks are drawn once
(600 5-way 1-shot tasks with 15 queries: 1.0 GB of uint8).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from gajax.data import cifar_fs, mini_imagenet, tiered_imagenet
from gajax.models import Conv4
from gajax.tasks.base import Task, classifier_fns
from gajax.tasks.host_pipeline import HostFeed, check_ragged, split_support_query
from gajax.tasks.omniglot import TaskIndices, sample_task_indices

LOADERS = {"mini_imagenet": mini_imagenet.load_mini_imagenet, "cifar_fs": cifar_fs.load_cifar_fs,
           "fc100": cifar_fs.load_fc100, "tiered_imagenet": tiered_imagenet.load_tiered_imagenet}
DATASETS = tuple(LOADERS)
HOST_DATASETS = ("tiered_imagenet",)  # too big for the device: drawn on the host (host_pipeline)


def _check(images_shape: tuple, ways: int, shots: int, queries: int, what: str = "images") -> None:
  if len(images_shape) != 5:
    raise ValueError(f"{what} must be uint8 [classes, images, H, W, channels], got shape "
                     f"{tuple(images_shape)}")
  for name, v in (("ways", ways), ("shots", shots), ("queries", queries)):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
      raise ValueError(f"{name} must be an int >= 1, got {v!r}")
  num_classes, per_class = images_shape[:2]
  if ways > num_classes:
    raise ValueError(f"ways={ways} exceeds the {num_classes} classes of the {what}")
  if shots + queries > per_class:
    raise ValueError(f"shots + queries = {shots + queries} exceeds the {per_class} images per class "
                     f"of the {what}")


def gather_task(images: jax.Array, indices: TaskIndices, shots: int) -> tuple:
  """One task's ``(support, query)`` from ``images: uint8 [C, N, H, W, ch]``: ``x`` float32
  ``[ways * shots, H, W, ch]`` (class-major), ``y`` int32 labels ``0..ways-1``; query likewise
  (:func:`gajax.tasks.host_pipeline.split_support_query`)."""
  return split_support_query(images[indices.classes[:, None], indices.drawings], shots)


@functools.partial(jax.jit, static_argnames=("num_tasks", "ways", "shots", "queries"))
def sample_tasks(key: jax.Array, images: jax.Array, num_tasks: int, ways: int, shots: int,
                 queries: int) -> tuple:
  """A meta-batch of ``num_tasks`` N-way K-shot tasks drawn on the device.

  Task ``t`` uses ``jax.random.split(key, num_tasks)[t]``. Returns ``(support, query)`` with ``x``
  float32 ``[T, ways * shots, H, W, ch]`` (query: ``ways * queries``) and ``y`` int32 ``[T, ...]``.
  """
  _check(images.shape, ways, shots, queries)
  if images.dtype != jnp.uint8:
    raise ValueError(f"images must be uint8, got {images.dtype}")
  num_classes, per_class = images.shape[:2]

  def one(k):
    idx = sample_task_indices(k, num_classes, ways, shots, queries, rotations=False,
                              num_drawings=per_class)
    return gather_task(images, idx, shots)

  return jax.vmap(one)(jax.random.split(key, num_tasks))


def make_task(dataset: str, ways: int = 5, shots: int = 1, queries: int = 15,
              eval_queries: Optional[int] = None, *, data_dir: str, cache_dir=None,
              eval_split: str = "test", filters: int = 32, downsample: str = "pool",
              conv: str = "auto", init: str = "flax", head_input: str = "flatten",
              loader_kwargs: Optional[dict] = None) -> Task:
  """N-way K-shot classification on ``dataset`` (one of :data:`DATASETS`) with MAML's Conv-4.

  Args:
    dataset: ``"mini_imagenet"``, ``"cifar_fs"``, ``"fc100"`` or ``"tiered_imagenet"`` (drawn on the
      host, see the module docstring).
    ways, shots, queries: N, K and query images per class of training tasks (MAML: 15 queries).
    eval_queries: query images per class of evaluation tasks (default: ``queries``).
    data_dir: the file or folder the reader takes (see :mod:`gajax.data.mini_imagenet`,
      :mod:`gajax.data.cifar_fs`); required, these sets are not downloadable.
    cache_dir: where the decoded cache lives (None: ``$GAJAX_CACHE_DIR`` or ``~/.cache/gajax``).
    eval_split: the split evaluation tasks come from, ``"test"`` or ``"val"``.
    filters, downsample, conv, init, head_input: :class:`gajax.models.Conv4`'s settings.
    loader_kwargs: passed to the reader (e.g. ``image_size``, ``expected_images``).
  """
  if dataset not in LOADERS:
    raise ValueError(f"dataset must be one of {', '.join(DATASETS)}; got {dataset!r}.")
  if not data_dir:
    raise ValueError(f"{dataset}: data_dir is required (the data set is not redistributable: point "
                     f"data_dir at your copy; README, 'Beyond Omniglot').")
  if eval_split not in ("test", "val"):
    raise ValueError(f"eval_split must be 'test' or 'val'; got {eval_split!r}.")
  eval_queries = queries if eval_queries is None else eval_queries
  load = functools.partial(LOADERS[dataset], data_dir, cache_dir=cache_dir, **(loader_kwargs or {}))
  train, evaluation = load("train"), load(eval_split)
  host = dataset in HOST_DATASETS
  if host:
    check_ragged(train, ways, shots, queries, f"{dataset} train split")
    check_ragged(evaluation, ways, shots, eval_queries, f"{dataset} {eval_split} split")
  else:
    _check(train.images.shape, ways, shots, queries, f"{dataset} train split")
    _check(evaluation.images.shape, ways, shots, eval_queries, f"{dataset} {eval_split} split")
  model = Conv4(num_classes=ways, filters=filters, downsample=downsample, conv=conv,
                init_scheme=init, head_input=head_input)

  loss_fn, accuracy = classifier_fns(model)

  if host:
    def sample(key, num_tasks, batch):  # batch: uint8 [T, ways, n, H, W, 3] drawn on the host
      del key, num_tasks
      return jax.vmap(lambda b: split_support_query(b, shots))(batch)
    eval_sample = sample
  else:
    def sample(key, num_tasks, images):
      return sample_tasks(key, images, num_tasks, ways, shots, queries)

    def eval_sample(key, num_tasks, images):
      return sample_tasks(key, images, num_tasks, ways, shots, eval_queries)

  image_shape = train.images.shape[-3:]
  return Task(
      name=dataset,
      sample=sample,
      eval_sample=eval_sample,
      init_params=lambda key: model.init(key, jnp.zeros((ways * shots, *image_shape), jnp.float32)),
      loss_fn=loss_fn,
      metric_fn=accuracy,
      metric="accuracy",
      train_data=None if host else jnp.asarray(train.images),
      eval_data=None if host else jnp.asarray(evaluation.images),
      host=HostFeed(train, evaluation, ways, shots, queries, eval_queries) if host else None,
  )
