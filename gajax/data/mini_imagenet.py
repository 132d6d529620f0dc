"""mini-ImageNet as NumPy arrays: one path, either common layout, a verified uint8 cache.

numpy and Pillow only, no JAX (see :mod:`gajax.data`).

mini-ImageNet (Vinyals et al., 2016) in the class split of Ravi & Larochelle (2017): 100 ImageNet classes,
600 images each, 64 meta-training, 16 validation and 20 test classes.

Sources
  ``load_mini_imagenet(path, split)`` tells from ``path`` alone which layout it is, trying in this order:

  1. **Ravi & Larochelle's CSV layout** -- a folder holding ``images/`` (JPEG files, flat) and
     ``train.csv`` / ``val.csv`` / ``test.csv``, each ``filename,label`` with that header line and one row per
     image, e.g. ``n0153282900000005.jpg,n01532829``. Only the requested split's CSV is read.
  2. **The pickled caches** -- a folder holding ``mini-imagenet-cache-{train,validation,test}.pkl``
     (``-val.pkl`` is accepted for ``validation``), or one such ``.pkl`` file. Each is a pickled dict with
     ``image_data``: uint8 ``[M, 84, 84, 3]`` and ``class_dict``: class name -> list of row indices into
     ``image_data``. A single ``.pkl`` whose name says another split than the one asked for is refused;
     a ``.pkl`` with any other name is taken to be the split asked for.

  Pickles (Python 3, or Python 2 read with ``encoding="latin1"``) are read with a restricted unpickler that allows only numpy arrays, dicts, lists, strings and
  numbers (:func:`gajax.data.base.load_pickle`): a pickle from a mirror cannot run code.

Pixel convention
  uint8 RGB ``[C, N, S, S, 3]``, ``S = image_size`` (default 84). CSV layout: each JPEG is decoded with
  Pillow, converted to RGB (grey/CMYK JPEGs too), and -- unless it is already ``S x S`` -- resized to
  ``S x S`` with ``Image.Resampling.LANCZOS``, ignoring the aspect ratio, as Ravi & Larochelle's
  preprocessing script did; the result equals ``Image.open(f).convert("RGB").resize((S, S), LANCZOS)``.
  Pickle layout: the stored pixels, unchanged; ``image_size`` must equal the pickle's image size
  (no resampling of already-resampled images).

Order
  Classes sorted by name (the WordNet id, e.g. ``n01532829``); within a class, images in the order of the
  CSV rows, or of the pickle's index list.

Counts
  ``expected_classes`` (default ``NUM_CLASSES``: 64/16/20) and ``expected_images`` (default 600) are checked;
  ``None`` skips a check (tests pass small numbers). Every class must have the same number of images either
  way (:class:`~gajax.data.base.ClassImages` has no index array).

Cache
  One file per split: ``<cache_dir>/mini_imagenet_<split>_<S>px_<key>.npz`` (see :mod:`gajax.data.cache`).
  The key covers a format version, the split, ``S``, the layout, and the relative path, size and mtime of
  every file read (the split's CSV and each JPEG it lists, or the pickle). Counts are checked again on every
  cached load.

Errors
  One line naming the file and the problem: ``FileNotFoundError`` for a missing path, CSV, ``images/``
  folder, pickle or listed JPEG; ``ValueError`` for a wrong layout (CSV header, pickle keys), a truncated or
  corrupt pickle, a JPEG that does not decode, images of the wrong size in a pickle, a bad index, or counts
  that do not match.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Mapping, NamedTuple, Optional, Union

import numpy as np
from PIL import Image

from gajax.data import cache as _cache
from gajax.data.base import (ClassImages, as_str, for_each_index, int_vector, load_pickle,
                              normalise_split, one_line, str_keys)

PathLike = Union[str, os.PathLike]

NUM_CLASSES: Mapping[str, int] = {"train": 64, "val": 16, "test": 20}
NUM_IMAGES = 600
IMAGE_SIZE = 84
RESAMPLE = Image.Resampling.LANCZOS
CSV_HEADER = ("filename", "label")
# File-name spellings of each split in the pickled layout; the first is the usual one.
PKL_SPLIT_NAMES: Mapping[str, tuple] = {"train": ("train",), "val": ("validation", "val"), "test": ("test",)}
_PKL_RE = re.compile(r"^mini-imagenet-cache-(train|validation|val|test)\.pkl$")
# Bump when the decoded content changes (resampling, order) so old caches are not reused.
_CACHE_VERSION = 1


class _Source(NamedTuple):
  kind: str  # "csv" | "pkl"
  root: Path  # the folder holding the CSVs and images/ | the folder holding the pickle
  files: tuple  # (the split's csv,) | (the pickle,)


def _detect_source(path: Path, split: str) -> _Source:
  pkl_names = [f"mini-imagenet-cache-{s}.pkl" for s in PKL_SPLIT_NAMES[split]]
  if not path.exists():
    raise FileNotFoundError(f"{path}: no such file or folder (expected a folder with {split}.csv and "
                            f"images/, a folder with {pkl_names[0]}, or that .pkl file)")
  if path.is_file():
    if path.suffix != ".pkl":
      raise ValueError(f"{path}: not a recognised mini-ImageNet source (expected a .pkl file, or a folder "
                       f"with {split}.csv and images/ or with {pkl_names[0]})")
    m = _PKL_RE.match(path.name)
    found = normalise_split(m.group(1), "mini-ImageNet") if m else split
    if found != split:
      raise ValueError(f"{path}: holds the {found!r} split, not {split!r}")
    return _Source("pkl", path.parent, (path,))
  csv_path, images = path / f"{split}.csv", path / "images"
  if csv_path.is_file() and images.is_dir():
    return _Source("csv", path, (csv_path,))
  for name in pkl_names:
    if (path / name).is_file():
      return _Source("pkl", path, (path / name,))
  if csv_path.is_file():
    raise FileNotFoundError(f"{path}: found {split}.csv but no images/ folder")
  if images.is_dir():
    raise FileNotFoundError(f"{path}: found images/ but no {split}.csv")
  raise FileNotFoundError(f"{path}: no mini-ImageNet {split} split found (looked for {split}.csv + images/, "
                          f"and {' / '.join(pkl_names)})")


def _read_csv(csv_path: Path) -> list:
  """``[(filename, label), ...]`` in row order; checks the header and the row shapes."""
  try:
    with open(csv_path, newline="", encoding="utf-8") as f:
      rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise ValueError(f"{csv_path}: unreadable CSV: {one_line(e)}") from e
  if not rows or tuple(c.strip() for c in rows[0]) != CSV_HEADER:
    got = ",".join(rows[0]) if rows else "an empty file"
    raise ValueError(f"{csv_path}: wrong layout: expected the header 'filename,label', got {got!r}")
  out, seen = [], set()
  for lineno, row in enumerate(rows[1:], start=2):
    if len(row) != 2 or not row[0].strip() or not row[1].strip():
      raise ValueError(f"{csv_path}: wrong layout at row {lineno}: expected 'filename,label', got "
                       f"{','.join(row)!r}")
    name, label = row[0].strip(), row[1].strip()
    if name in seen:
      raise ValueError(f"{csv_path}: {name} is listed twice")
    seen.add(name)
    out.append((name, label))
  if not out:
    raise ValueError(f"{csv_path}: lists no images")
  return out


def _group(items: list, where: str, split: str, expected_classes: Optional[int],
           expected_images: Optional[int]) -> tuple:
  """``(class_names, [[item, ...] per class])`` from ``[(item, label)]``; checks the counts."""
  by_class = {}
  for item, label in items:
    by_class.setdefault(label, []).append(item)
  names = tuple(sorted(by_class))
  counts = [len(by_class[c]) for c in names]
  if expected_classes is not None and len(names) != expected_classes:
    raise ValueError(f"{where}: {len(names)} classes in the {split} split, expected {expected_classes}")
  if expected_images is not None:
    for c, n in zip(names, counts):
      if n != expected_images:
        raise ValueError(f"{where}: class {c} has {n} images, expected {expected_images}")
  if len(set(counts)) != 1:
    raise ValueError(f"{where}: classes have different numbers of images ({min(counts)}..{max(counts)})")
  return names, [by_class[c] for c in names]


def _decode_jpeg(path: Path, size: int) -> np.ndarray:
  """One image file -> uint8 ``[size, size, 3]``: RGB, LANCZOS-resized unless already ``size x size``."""
  with Image.open(path) as im:
    im = im.convert("RGB")  # decodes the whole file: a truncated/corrupt JPEG raises here
    if im.size != (size, size):
      im = im.resize((size, size), RESAMPLE)
    return np.asarray(im, dtype=np.uint8)


def _image_files(source: _Source, rows: list) -> list:
  """The JPEG paths the CSV rows name; raises ``FileNotFoundError`` for the first missing one."""
  files = [source.root / "images" / name for name, _ in rows]
  for (name, _), f in zip(rows, files):
    if not f.is_file():
      raise FileNotFoundError(f"{source.files[0]}: lists images/{name}, which is missing")
  return files


def _decode_csv(source: _Source, rows: list, split: str, size: int, expected_classes: Optional[int],
                expected_images: Optional[int], num_workers: int) -> ClassImages:
  (csv_path,) = source.files
  names, groups = _group(rows, str(csv_path), split, expected_classes, expected_images)
  files = [source.root / "images" / f for group in groups for f in group]
  out = np.empty((len(files), size, size, 3), dtype=np.uint8)

  def decode(i):
    try:
      out[i] = _decode_jpeg(files[i], size)
    except Exception as e:  # noqa: BLE001 - any decoder failure means a bad file
      raise ValueError(f"{files[i]}: not a decodable image: {one_line(e)}") from e

  for_each_index(decode, len(files), num_workers)
  return ClassImages(out.reshape(len(names), len(groups[0]), size, size, 3), names)


def _decode_pkl(source: _Source, split: str, size: int, expected_classes: Optional[int],
                expected_images: Optional[int]) -> ClassImages:
  (pkl,) = source.files
  # latin-1: Python 2 pickles (byte-string keys, numpy array buffers) read as numpy recommends; Python 3
  # pickles are unaffected.
  d = str_keys(load_pickle(pkl, str(pkl), encoding="latin1"), str(pkl), "the pickle")
  missing = [k for k in ("image_data", "class_dict") if k not in d]
  if missing:
    raise ValueError(f"{pkl}: wrong layout: no {missing[0]!r} key (has {sorted(map(str, d))})")
  data, class_dict = d["image_data"], d["class_dict"]
  if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 4 or data.shape[3] != 3:
    desc = f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
    raise ValueError(f"{pkl}: wrong layout: image_data is {desc}, expected uint8 [N, H, W, 3]")
  if data.shape[1:3] != (size, size):
    raise ValueError(f"{pkl}: images are {data.shape[1]}x{data.shape[2]}, expected {size}x{size}")
  class_dict = str_keys(class_dict, str(pkl), "class_dict")
  items = []
  for name, idx in class_dict.items():
    idx = int_vector(idx)
    if idx is None:
      raise ValueError(f"{pkl}: wrong layout: class_dict[{name!r}] is not a list of image indices")
    if idx.min() < 0 or idx.max() >= data.shape[0]:
      raise ValueError(f"{pkl}: class_dict[{name!r}] has an index outside [0, {data.shape[0]})")
    items.extend((int(i), as_str(name)) for i in idx)
  used = np.fromiter((i for i, _ in items), dtype=np.int64, count=len(items))
  if np.unique(used).size != used.size:
    raise ValueError(f"{pkl}: class_dict lists some image index more than once")
  names, groups = _group(items, str(pkl), split, expected_classes, expected_images)
  index = np.asarray(groups, dtype=np.int64)  # [C, N]
  return ClassImages(data[index], names)


def load_mini_imagenet(path: PathLike, split: str, cache_dir: Optional[PathLike] = None,
                       image_size: int = IMAGE_SIZE, *,
                       expected_classes: Union[Mapping[str, int], int, None] = NUM_CLASSES,
                       expected_images: Optional[int] = NUM_IMAGES,
                       num_workers: Optional[int] = None) -> ClassImages:
  """Loads one split of mini-ImageNet from either layout, through the cache.

  Args:
    path: a folder with ``images/`` + ``train.csv``/``val.csv``/``test.csv``, a folder with the
      ``mini-imagenet-cache-*.pkl`` files, or one such file (see the module docstring).
    split: ``"train"``, ``"val"`` (or ``"validation"``) or ``"test"``.
    cache_dir: where the decoded ``.npz`` lives; None means ``$GAJAX_CACHE_DIR`` or ``~/.cache/gajax``.
    image_size: side ``S`` of the square images (the CSV layout resizes to it with LANCZOS; a pickle must
      already hold ``S x S`` images).
    expected_classes: classes this split must have: a ``{split: count}`` mapping (default 64/16/20), one
      int, or None to skip the check.
    expected_images: images every class must have (default 600); None skips the check.
    num_workers: decoding threads for the CSV layout; None means ``min(8, os.cpu_count())``.

  Returns:
    ``ClassImages`` with ``images: uint8 [C, N, S, S, 3]`` (RGB) and the ``C`` class names (WordNet ids).

  Raises:
    FileNotFoundError: a missing path, CSV, ``images/`` folder, pickle or listed image.
    ValueError: a wrong layout, a corrupt/truncated pickle, an undecodable image, wrong sizes or counts.
  """
  split = normalise_split(split, "mini-ImageNet")
  if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
    raise ValueError(f"image_size must be a positive int, got {image_size!r}")
  if isinstance(expected_classes, Mapping):
    expected_classes = expected_classes.get(split)
  if num_workers is None:
    num_workers = min(8, os.cpu_count() or 1)
  path = Path(path).expanduser()
  source = _detect_source(path, split)

  if source.kind == "csv":
    rows = _read_csv(source.files[0])
    fingerprint = _cache.stat_fingerprint([source.files[0]] + _image_files(source, rows), source.root)
  else:
    fingerprint = _cache.stat_fingerprint(source.files, source.root)
  key = _cache.cache_key({"version": _CACHE_VERSION, "dataset": "mini_imagenet", "split": split,
                          "size": image_size, "kind": source.kind, "source": fingerprint})
  cache_path = _cache.cache_file(cache_dir, f"mini_imagenet_{split}_{image_size}px", key)

  arrays = _cache.read_cache(cache_path, key, what="mini-ImageNet",
                             check=_cache.class_images_check((image_size, image_size, 3)))
  if arrays is not None:
    data = _cache.class_images_from_arrays(arrays)
    where = f"{source.files[0]} (cache {cache_path})"
    _group([(None, c) for c in data.class_names for _ in range(data.images.shape[1])], where, split,
           expected_classes, expected_images)
    return data

  if source.kind == "csv":
    data = _decode_csv(source, rows, split, image_size, expected_classes, expected_images, num_workers)
  else:
    data = _decode_pkl(source, split, image_size, expected_classes, expected_images)
  _cache.write_cache(cache_path, key, _cache.class_images_arrays(data), what="mini-ImageNet")
  return data
