"""tiered-ImageNet as a memory-mapped, verified uint8 cache: the split never has to fit in memory.

numpy and Pillow only, no JAX (see :mod:`gajax.data`).

tiered-ImageNet (Ren et al., 2018, "Meta-Learning for Semi-Supervised Few-Shot Classification"): 608
ImageNet classes, 779,165 images at 84x84, grouped into 34 high-level categories that are split 20 / 6 /
8 between train, validation and test, so that test classes are far from training ones: 351 / 97 / 160
classes, 448,695 / 124,261 / 206,209 images. Classes have different numbers of images (732 to 1,300),
so the result is a :class:`~gajax.data.base.RaggedClassImages` (class-major images plus offsets), not a
``ClassImages``.

Source
  Ren et al.'s release, as most repositories pass it around: one folder holding, per split,
  ``<split>_images_png.pkl`` -- a pickled list of PNG-encoded images, each a ``bytes`` or a uint8 numpy
  array (what ``cv2.imencode`` returns) -- and ``<split>_labels.pkl`` -- a pickled dict with
  ``label_specific`` (int ``[N]``, the class of each image), ``label_general`` (int ``[N]``, its
  high-level category) and, optionally, ``label_specific_str`` / ``label_general_str`` (the names, indexed
  by label). ``split`` is ``train``, ``val`` (or ``validation``) or ``test``; only that split's two files
  are read. Python 2 pickles (``bytes`` keys) are read too, with the restricted unpickler of
  :func:`gajax.data.base.load_pickle` (a pickle from a mirror cannot run code).

Pixel convention
  uint8 RGB ``[M, 84, 84, 3]``: each PNG decoded with Pillow and converted to RGB (grey and RGBA PNGs
  too). Loaders built on ``cv2.imdecode`` get BGR from the same files; gajax's images are RGB like its
  other readers'. Images are not resized: one that is not ``image_size`` square is an error.

Order
  Classes sorted by ``label_specific``; within a class, images in the pickle's order. Class names come
  from ``label_specific_str`` when present, else ``"class_<label>"``; superclasses likewise.

Counts
  ``expected_classes`` (default 351 / 97 / 160), ``expected_superclasses`` (20 / 6 / 8) and
  ``expected_images`` (the split's total: 448,695 / 124,261 / 206,209) are checked; ``None`` skips a check
  (tests pass small numbers). Every class must lie in exactly one superclass.

Cache
  Two files per split in the cache folder (see :mod:`gajax.data.cache`):
  ``tiered_imagenet_<split>_<S>px_<key>.npy`` (the images, uint8 ``[M, S, S, 3]``, memory-mapped on every
  load) and ``..._<key>.npz`` (offsets, names, superclasses, and the sha256 and size of the ``.npy``).
  The key covers a format version, the split, ``S``, and the size and mtime of both pickles. The ``.npy``
  is written through :func:`gajax.data.cache.atomic_memmap` (a temporary file renamed into place when
  complete) before its manifest, so a failure or ``KeyboardInterrupt`` leaves no partial file. Each load
  checks the manifest's key and digest, the ``.npy``'s shape and size and, with ``verify=True``
  (default), its sha256 (about 10 s for the 9.5 GB train split at the 1 GB/s sha256 ran here; pass ``verify=False``
  to trust the size and key alone). A cache that fails a check is rebuilt with a ``RuntimeWarning``.

Memory
  Decoding reads a split's PNG pickle into memory at once (pickles cannot be streamed: about as much RAM
  as the file's size, several GB for train); the decoded images go straight to the memory-mapped cache.
  Later loads read nothing but the manifest until a sampler touches images
  (:mod:`gajax.tasks.host_pipeline`).

Errors
  One line naming the file and the problem: ``FileNotFoundError`` for a missing folder or pickle;
  ``OSError`` for a cache folder that cannot be written or has no room (the images are used from the
  cache, so there is no running without it);
  ``ValueError`` for a wrong layout (keys, types, lengths), a truncated or corrupt pickle, a PNG that does
  not decode, an image of the wrong size, a class in two superclasses, or counts that do not match.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Mapping, Optional, Union

import numpy as np
from PIL import Image, ImageFile

from gajax.data import cache as _cache
from gajax.data.base import (RaggedClassImages, as_str, for_each_index, int_vector, load_pickle,
                              normalise_split, one_line, str_keys)

PathLike = Union[str, os.PathLike]

NUM_CLASSES: Mapping[str, int] = {"train": 351, "val": 97, "test": 160}
NUM_SUPERCLASSES: Mapping[str, int] = {"train": 20, "val": 6, "test": 8}
NUM_IMAGES: Mapping[str, int] = {"train": 448_695, "val": 124_261, "test": 206_209}
IMAGE_SIZE = 84
# Bump when the decoded content or the cache's layout changes so old caches are not reused.
_CACHE_VERSION = 1
_CHUNK = 4096  # images decoded per batch of thread-pool work


def source_files(path: Path, split: str) -> tuple:
  """``(images pickle, labels pickle)`` of ``split`` in the folder ``path``; one-line errors if missing."""
  if not path.exists():
    raise FileNotFoundError(f"{path}: no such folder (expected a folder with {split}_images_png.pkl and "
                            f"{split}_labels.pkl)")
  if not path.is_dir():
    raise ValueError(f"{path}: not a folder (tiered-ImageNet is a folder with {split}_images_png.pkl and "
                     f"{split}_labels.pkl)")
  images, labels = path / f"{split}_images_png.pkl", path / f"{split}_labels.pkl"
  for f in (images, labels):
    if not f.is_file():
      raise FileNotFoundError(f"{path}: no {f.name} (tiered-ImageNet's {split} split is "
                              f"{images.name} + {labels.name})")
  return images, labels


def _int_vector(value: object, origin: str, key: str) -> np.ndarray:
  a = int_vector(value)
  if a is None:
    raise ValueError(f"{origin}: wrong layout: {key!r} is not a list of integer labels")
  if a.min() < 0:
    raise ValueError(f"{origin}: {key!r} has a negative label")
  return a.astype(np.int64)


def _names(d: dict, key: str, labels: np.ndarray, origin: str, prefix: str) -> tuple:
  """The name of each label in ``labels`` (sorted unique) from ``d[key]`` if present."""
  if key not in d:
    return tuple(f"{prefix}_{int(c)}" for c in labels)
  names = d[key]
  if not isinstance(names, (list, tuple, np.ndarray)) or len(names) <= int(labels.max()):
    raise ValueError(f"{origin}: wrong layout: {key!r} does not name every label (needs at least "
                     f"{int(labels.max()) + 1} names)")
  return tuple(as_str(names[int(c)]) for c in labels)


def _read_labels(labels_pkl: Path, split: str, expected_classes, expected_superclasses,
                 expected_images) -> tuple:
  """``(order, offsets, class_names, superclass, superclass_names)`` from the labels pickle."""
  origin = str(labels_pkl)
  d = str_keys(load_pickle(labels_pkl, origin, encoding="bytes"), origin, "the labels pickle")
  missing = [k for k in ("label_specific", "label_general") if k not in d]
  if missing:
    raise ValueError(f"{origin}: wrong layout: no {missing[0]!r} key (has {sorted(map(str, d))})")
  specific = _int_vector(d["label_specific"], origin, "label_specific")
  general = _int_vector(d["label_general"], origin, "label_general")
  if specific.shape != general.shape:
    raise ValueError(f"{origin}: label_specific has {specific.size} entries but label_general "
                     f"{general.size}")
  if expected_images is not None and specific.size != expected_images:
    raise ValueError(f"{origin}: {specific.size} images in the {split} split, expected {expected_images}")
  classes, counts = np.unique(specific, return_counts=True)
  if expected_classes is not None and classes.size != expected_classes:
    raise ValueError(f"{origin}: {classes.size} classes in the {split} split, expected {expected_classes}")
  order = np.argsort(specific, kind="stable")  # class-major, pickle order within a class
  offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
  general_sorted = general[order]
  first = general_sorted[offsets[:-1]]
  for c in range(classes.size):
    if np.any(general_sorted[offsets[c]:offsets[c + 1]] != first[c]):
      raise ValueError(f"{origin}: class {int(classes[c])} has images in more than one label_general")
  supers = np.unique(first)
  if expected_superclasses is not None and supers.size != expected_superclasses:
    raise ValueError(f"{origin}: {supers.size} superclasses (label_general) in the {split} split, "
                     f"expected {expected_superclasses}")
  class_names = _names(d, "label_specific_str", classes, origin, "class")
  super_names = _names(d, "label_general_str", supers, origin, "superclass")
  superclass = np.searchsorted(supers, first).astype(np.int64)
  return order, offsets, class_names, superclass, super_names


class _WrongImage(ValueError):
  """An entry that decodes but is not what the layout says (wrong type or size)."""


def _png_bytes(item: object) -> bytes:
  if isinstance(item, (bytes, bytearray)):
    return bytes(item)
  if isinstance(item, np.ndarray) and item.dtype == np.uint8:
    return item.tobytes()
  raise _WrongImage(f"is a {type(item).__name__}"
                  + (f" of {item.dtype}" if isinstance(item, np.ndarray) else "")
                  + ", expected PNG bytes or a uint8 array")


def _decode_png(item: object, size: int) -> np.ndarray:
  with Image.open(io.BytesIO(_png_bytes(item))) as im:
    if im.size != (size, size):
      raise _WrongImage(f"is {im.size[0]}x{im.size[1]}, expected {size}x{size}")
    return np.asarray(im.convert("RGB"), dtype=np.uint8)  # decodes it all: a truncated PNG raises


def _decode_into(out: np.ndarray, pngs, order: np.ndarray, size: int, origin: str, num_workers: int):
  """``out[i] = decode(pngs[order[i]])`` for every ``i``, ``num_workers`` threads, chunk by chunk."""
  # Pillow pads a truncated PNG silently when this global is on (training code often sets it): a cut
  # file must be an error here, not a cached grey stripe.
  if ImageFile.LOAD_TRUNCATED_IMAGES:
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
      return _decode_into(out, pngs, order, size, origin, num_workers)
    finally:
      ImageFile.LOAD_TRUNCATED_IMAGES = True
  def decode(i):
    j = int(order[i])
    try:
      out[i] = _decode_png(pngs[j], size)
    except _WrongImage as e:
      raise ValueError(f"{origin}: image {j} {e}") from e
    except Exception as e:  # noqa: BLE001 - any decoder failure means a bad entry
      raise ValueError(f"{origin}: image {j} is not a decodable PNG: {one_line(e)}") from e

  for_each_index(decode, len(order), num_workers, _CHUNK)


def _check_manifest(size: int):
  def check(arrays):
    o = arrays["offsets"]
    return (o.ndim == 1 and o.size >= 2 and o[0] == 0 and bool(np.all(np.diff(o) > 0))
            and arrays["class_names"].shape == (o.size - 1,)
            and arrays["superclass"].shape == (o.size - 1,)
            and int(arrays["image_size"]) == size)
  return check


def _open_cached(manifest: Path, npy: Path, key: str, size: int, verify: bool) -> Optional[RaggedClassImages]:
  arrays = _cache.read_cache(manifest, key, what="tiered-ImageNet", check=_check_manifest(size))
  if arrays is None:
    return None
  problem = None
  try:
    images = np.load(npy, mmap_mode="r")
    m = int(arrays["offsets"][-1])
    if images.dtype != np.uint8 or images.shape != (m, size, size, 3):
      problem = f"holds {images.dtype} {list(images.shape)}, expected uint8 [{m}, {size}, {size}, 3]"
    elif os.path.getsize(npy) != int(arrays["npy_bytes"]):
      problem = "has the wrong size"
    elif verify and _cache.sha256_file(npy) != str(arrays["npy_sha256"]):
      problem = "does not match its recorded sha256"
  except (OSError, ValueError) as e:
    problem = f"is unreadable ({one_line(e)})"
  if problem:
    warnings.warn(f"{npy}: tiered-ImageNet cache {problem}; rebuilding it", RuntimeWarning, stacklevel=3)
    return None
  return RaggedClassImages(images, arrays["offsets"].astype(np.int64),
                          tuple(str(c) for c in arrays["class_names"]),
                          arrays["superclass"].astype(np.int64),
                          tuple(str(c) for c in arrays["superclass_names"]))


def load_tiered_imagenet(path: PathLike, split: str, cache_dir: Optional[PathLike] = None,
                         image_size: int = IMAGE_SIZE, *,
                         expected_classes: Union[Mapping[str, int], int, None] = NUM_CLASSES,
                         expected_superclasses: Union[Mapping[str, int], int, None] = NUM_SUPERCLASSES,
                         expected_images: Union[Mapping[str, int], int, None] = NUM_IMAGES,
                         verify: bool = True, num_workers: Optional[int] = None) -> RaggedClassImages:
  """Loads one split of tiered-ImageNet through its memory-mapped cache (see the module docstring).

  Args:
    path: the folder holding ``<split>_images_png.pkl`` and ``<split>_labels.pkl``.
    split: ``"train"``, ``"val"`` (or ``"validation"``) or ``"test"``.
    cache_dir: where the cache lives; None means ``$GAJAX_CACHE_DIR`` or ``~/.cache/gajax``.
    image_size: side ``S`` every PNG must have (84 in the release).
    expected_classes, expected_superclasses, expected_images: counts the split must have: a
      ``{split: count}`` mapping (the defaults are the release's), one int, or None to skip the check.
    verify: check the cached images' sha256 on load (reads the whole file once); False checks the
      manifest, shape and size only.
    num_workers: PNG-decoding threads; None means ``min(8, os.cpu_count())``.

  Returns:
    ``RaggedClassImages`` whose ``images`` is a read-only ``np.memmap`` uint8 ``[M, S, S, 3]`` (RGB).

  Raises:
    FileNotFoundError: a missing folder or pickle.
    OSError: the cache folder cannot be written or has no room for the images.
    ValueError: a wrong layout, a corrupt/truncated pickle, an undecodable PNG, a wrong image size, a
      class in two superclasses, or counts that do not match.
  """
  split = normalise_split(split, "tiered-ImageNet")
  if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
    raise ValueError(f"image_size must be a positive int, got {image_size!r}")

  def per_split(v):
    if isinstance(v, Mapping):
      if split not in v:
        raise ValueError(f"an expected count mapping has no {split!r} entry: {dict(v)}")
      return v[split]
    return v

  expected = (per_split(expected_classes), per_split(expected_superclasses), per_split(expected_images))
  num_workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers
  path = Path(path).expanduser()
  images_pkl, labels_pkl = source_files(path, split)
  key = _cache.cache_key({"version": _CACHE_VERSION, "dataset": "tiered_imagenet", "split": split,
                          "size": image_size,
                          "source": _cache.stat_fingerprint([images_pkl, labels_pkl], path)})
  manifest = _cache.cache_file(cache_dir, f"tiered_imagenet_{split}_{image_size}px", key)
  npy = manifest.with_suffix(".npy")

  data = _open_cached(manifest, npy, key, image_size, verify) if npy.is_file() else None
  if data is not None:
    where = f"{labels_pkl} (cache {manifest})"
    n_classes, n_supers, n_images = expected
    for what, got, want in (("classes", len(data.class_names), n_classes),
                            ("superclasses", len(data.superclass_names), n_supers),
                            ("images", int(data.offsets[-1]), n_images)):
      if want is not None and got != want:
        raise ValueError(f"{where}: {got} {what} in the {split} split, expected {want}")
    return data

  order, offsets, class_names, superclass, super_names = _read_labels(labels_pkl, split, *expected)
  pngs = load_pickle(images_pkl, str(images_pkl), encoding="bytes")
  if not isinstance(pngs, (list, tuple)) and not (isinstance(pngs, np.ndarray) and pngs.ndim == 1):
    raise ValueError(f"{images_pkl}: wrong layout: holds a {type(pngs).__name__}, expected a list of "
                     "PNG-encoded images")
  if len(pngs) != order.size:
    raise ValueError(f"{images_pkl}: {len(pngs)} images, but {labels_pkl.name} labels {order.size}")
  shape = (order.size, image_size, image_size, 3)
  with _cache.atomic_memmap(npy, shape) as out:
    _decode_into(out, pngs, order, image_size, str(images_pkl), num_workers)
  del pngs
  _cache.write_cache(manifest, key, {
      "offsets": offsets, "class_names": np.asarray(class_names, dtype=str), "superclass": superclass,
      "superclass_names": np.asarray(super_names, dtype=str), "image_size": np.asarray(image_size),
      "npy_sha256": np.asarray(_cache.sha256_file(npy)), "npy_bytes": np.asarray(os.path.getsize(npy)),
  }, what="tiered-ImageNet")
  return RaggedClassImages(np.load(npy, mmap_mode="r"), offsets, class_names, superclass, super_names)
