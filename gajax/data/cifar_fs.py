"""CIFAR-FS and FC100 as NumPy arrays, from CIFAR-100's python pickles, through a verified uint8 cache.

numpy only, no JAX (see :mod:`gajax.data`).

Data sets
  Both re-split CIFAR-100's 100 classes (600 32x32 RGB images each) by class, pooling CIFAR-100's own
  ``train`` (500 per class) and ``test`` (100 per class) images as both few-shot protocols do:

  * **CIFAR-FS** (Bertinetto et al., ICLR 2019): 64 / 16 / 20 fine classes for train / val / test.
  * **FC100** (Oreshkin et al., NeurIPS 2018): 12 / 4 / 4 of CIFAR-100's 20 superclasses, i.e. 60 / 20 / 20
    fine classes, so that test classes share no superclass with training ones.

  The published split lists ship with the package, as data: ``gajax/data/splits/cifar_fs_{split}.txt``
  (fine class names) and ``fc100_{split}.txt`` (superclass names), one name per line after ``#`` comment
  lines saying where each list comes from and how it was checked. A list whose comments say
  ``UNVERIFIED`` is refused unless ``allow_unverified=True`` (then used with a warning); none of the
  shipped lists is marked so.

Source
  ``path`` is, tried in this order: the ``cifar-100-python/`` folder itself (``train``, ``test``,
  ``meta``), a folder holding it, or the official ``cifar-100-python.tar.gz`` (or a folder holding it), which
  is streamed without extracting. The pickles are Python 2 pickles, read with ``encoding="bytes"`` as
  CIFAR's page says (so their keys are ``b'data'``, ``b'fine_labels'``, ...; ``str`` keys are accepted too)
  by a restricted unpickler that allows only numpy arrays, dicts, lists, strings and numbers
  (:func:`gajax.data.base.load_pickle`). ``b'data'`` is uint8 ``[N, 3072]``: per row the 1024 red, then
  green, then blue values of a 32x32 image in row-major order.

Result and order
  :func:`load_cifar100` returns every class: ``images: uint8 [100, 600, 32, 32, 3]`` (RGB) in CIFAR-100 fine
  label order (alphabetical in the real ``meta``); within a class, the ``train`` file's images in file
  order, then the ``test`` file's. :func:`load_cifar_fs` and :func:`load_fc100` select a split's classes
  from it, in that same label order, as :class:`~gajax.data.base.ClassImages`.

Cache
  One file for all of CIFAR-100, shared by both data sets and all splits:
  ``<cache_dir>/cifar100_32px_<key>.npz`` (see :mod:`gajax.data.cache`); the key covers a format version
  and the relative path, size and mtime of the three pickles or of the tarball.

Errors
  One line naming the file and the problem: ``FileNotFoundError`` for a missing path or pickle;
  ``ValueError`` for a truncated/corrupt tarball or pickle, a wrong layout (keys, shapes, dtypes, label
  ranges, a fine class under two superclasses), counts that do not match, a split list naming a class the
  data lacks, or an unverified split list.
"""

from __future__ import annotations

import importlib.resources
import os
import tarfile
import warnings
import zlib
from pathlib import Path
from typing import Mapping, NamedTuple, Optional, Union

import numpy as np

from gajax.data import cache as _cache
from gajax.data.base import (ClassImages, as_str, is_tarball, load_pickle, normalise_split,
                              one_line, str_keys)

PathLike = Union[str, os.PathLike]

FOLDER = "cifar-100-python"
FILES = ("train", "test", "meta")
TARBALL_NAMES = ("cifar-100-python.tar.gz", "cifar-100-python.tgz", "cifar-100-python.tar")
NUM_FINE = 100
NUM_COARSE = 20
NUM_IMAGES = 600  # per class, CIFAR-100 train (500) + test (100)
IMAGE_SIZE = 32
CIFAR_FS_NUM_CLASSES: Mapping[str, int] = {"train": 64, "val": 16, "test": 20}
FC100_NUM_SUPERCLASSES: Mapping[str, int] = {"train": 12, "val": 4, "test": 4}
DATASETS = ("cifar_fs", "fc100")
_CACHE_VERSION = 1


class Cifar100(NamedTuple):
  """All of CIFAR-100, train and test pooled per class.

  Attributes:
    images: uint8 ``[100, N, 32, 32, 3]`` RGB, fine label order; ``N = 600`` for the real set.
    fine_names: the 100 fine class names (``meta``'s ``fine_label_names``).
    coarse_names: the 20 superclass names (``meta``'s ``coarse_label_names``).
    coarse_of_fine: int64 ``[100]``: the superclass index of each fine class.
  """
  images: np.ndarray
  fine_names: tuple
  coarse_names: tuple
  coarse_of_fine: np.ndarray


# ----------------------------------------------------------------------------------------------------
# Split lists (package data).


def _split_text(filename: str) -> str:
  return importlib.resources.files("gajax.data").joinpath("splits", filename).read_text(encoding="utf-8")


def split_list(dataset: str, split: str, allow_unverified: bool = False) -> tuple:
  """The names in the shipped split list: fine classes for ``"cifar_fs"``, superclasses for ``"fc100"``.

  Raises:
    ValueError: unknown ``dataset``/``split``, or a list marked ``UNVERIFIED`` without ``allow_unverified``.
  """
  if dataset not in DATASETS:
    raise ValueError(f"unknown data set {dataset!r}; expected one of {DATASETS}")
  split = normalise_split(split)
  filename = f"{dataset}_{split}.txt"
  comments, names = [], []
  for line in _split_text(filename).splitlines():
    line = line.strip()
    if line.startswith("#"):
      comments.append(line)
    elif line:
      names.append(line)
  if any("UNVERIFIED" in c for c in comments):
    if not allow_unverified:
      raise ValueError(f"gajax/data/splits/{filename}: this split list is marked UNVERIFIED (not checked "
                       "against the published split); pass allow_unverified=True to use it anyway")
    warnings.warn(f"gajax/data/splits/{filename}: using a split list marked UNVERIFIED", RuntimeWarning,
                  stacklevel=3)
  if len(set(names)) != len(names):
    raise ValueError(f"gajax/data/splits/{filename}: lists a name twice")
  return tuple(names)


# ----------------------------------------------------------------------------------------------------
# Locating and reading the source.


class _Source(NamedTuple):
  kind: str  # "folder" | "tar"
  path: Path  # the cifar-100-python folder | the tarball


def _detect_source(path: Path) -> _Source:
  if not path.exists():
    raise FileNotFoundError(f"{path}: no such file or folder (expected the {FOLDER}/ folder, a folder "
                            f"holding it, or {TARBALL_NAMES[0]})")
  if path.is_file():
    if is_tarball(path):
      return _Source("tar", path)
    raise ValueError(f"{path}: not a recognised CIFAR-100 source (expected {TARBALL_NAMES[0]} or the "
                     f"{FOLDER}/ folder)")
  for root in (path, path / FOLDER):
    if all((root / f).is_file() for f in FILES):
      return _Source("folder", root)
  for name in TARBALL_NAMES:
    if (path / name).is_file():
      return _Source("tar", path / name)
  for root in (path, path / FOLDER):
    present = [f for f in FILES if (root / f).is_file()]
    if present:
      missing = [f for f in FILES if f not in present]
      raise FileNotFoundError(f"{root / missing[0]}: missing (found {', '.join(present)} next to it)")
  raise FileNotFoundError(f"{path}: no CIFAR-100 python data found (looked for train, test and meta, also "
                          f"under {FOLDER}/, and for {'/'.join(TARBALL_NAMES)})")


def _read_files(source: _Source) -> dict:
  """``{name: (content, origin)}`` for ``train``, ``test``, ``meta``: a ``Path`` (folder) or the member's
  bytes (tarball), and the name used in error messages."""
  if source.kind == "folder":
    return {f: (source.path / f, str(source.path / f)) for f in FILES}
  found, member = {}, None
  try:
    with tarfile.open(source.path, mode="r|*") as tf:  # streamed: each member read once, in order
      for m in tf:
        member = m.name
        parts = [p for p in m.name.replace("\\", "/").split("/") if p not in ("", ".")]
        if (m.isfile() and parts and parts[-1] in FILES and parts[-1] not in found
            and (len(parts) == 1 or parts[-2] == FOLDER)):
          data = tf.extractfile(m).read()
          if len(data) != m.size:
            raise EOFError(f"member has {len(data)} of {m.size} bytes")
          found[parts[-1]] = (data, f"{source.path}:{m.name}")
  except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
    where = f" (at member {member})" if member else ""
    raise ValueError(f"{source.path}: corrupt or truncated archive{where}: {one_line(e)}") from e
  missing = [f for f in FILES if f not in found]
  if missing:
    raise ValueError(f"{source.path}: no {FOLDER}/{missing[0]} member (truncated or not the CIFAR-100 "
                     "python archive?)")
  return found


def _names(value: object, origin: str, key: str, count: int) -> tuple:
  if not isinstance(value, (list, tuple)) or not all(isinstance(x, (bytes, str)) for x in value):
    raise ValueError(f"{origin}: wrong layout: {key} is not a list of names")
  names = tuple(as_str(x) for x in value)
  if len(names) != count or len(set(names)) != count:
    raise ValueError(f"{origin}: {key} holds {len(set(names))} distinct names, expected {count}")
  return names


def _labels(value: object, origin: str, key: str, n: int, count: int) -> np.ndarray:
  try:
    labels = np.asarray(value)
    ok = labels.ndim == 1 and labels.dtype.kind in "iu"
  except Exception:  # noqa: BLE001 - ragged or odd contents
    ok = False
  if not ok:
    raise ValueError(f"{origin}: wrong layout: {key} is not a list of integer labels")
  if labels.shape[0] != n:
    raise ValueError(f"{origin}: {key} has {labels.shape[0]} labels for {n} images")
  if n and (labels.min() < 0 or labels.max() >= count):
    raise ValueError(f"{origin}: {key} has labels outside [0, {count})")
  return labels.astype(np.int64)


def _decode(source: _Source, expected_images: Optional[int]) -> Cifar100:
  files = _read_files(source)
  dicts = {}
  for f in FILES:
    content, origin = files[f]
    dicts[f] = str_keys(load_pickle(content, origin, encoding="bytes"), origin, "the pickle")
  meta, meta_origin = dicts["meta"], files["meta"][1]
  for key in ("fine_label_names", "coarse_label_names"):
    if key not in meta:
      raise ValueError(f"{meta_origin}: wrong layout: no {key!r} key (has {sorted(map(str, meta))})")
  fine_names = _names(meta["fine_label_names"], meta_origin, "fine_label_names", NUM_FINE)
  coarse_names = _names(meta["coarse_label_names"], meta_origin, "coarse_label_names", NUM_COARSE)

  data, fine, coarse = [], [], []
  for f in ("train", "test"):  # this order: a class's train images come first
    d, origin = dicts[f], files[f][1]
    for key in ("data", "fine_labels", "coarse_labels"):
      if key not in d:
        raise ValueError(f"{origin}: wrong layout: no {key!r} key (has {sorted(map(str, d))})")
    x = d["data"]
    if (not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2
        or x.shape[1] != 3 * IMAGE_SIZE * IMAGE_SIZE):
      desc = f"{x.dtype} {list(x.shape)}" if isinstance(x, np.ndarray) else type(x).__name__
      raise ValueError(f"{origin}: wrong layout: data is {desc}, expected uint8 [N, 3072] "
                       "(32x32 RGB planes)")
    data.append(x)
    fine.append(_labels(d["fine_labels"], origin, "fine_labels", x.shape[0], NUM_FINE))
    coarse.append(_labels(d["coarse_labels"], origin, "coarse_labels", x.shape[0], NUM_COARSE))
  x, fine, coarse = np.concatenate(data), np.concatenate(fine), np.concatenate(coarse)

  where = str(source.path)
  counts = np.bincount(fine, minlength=NUM_FINE)
  for c in range(NUM_FINE):
    if expected_images is not None and counts[c] != expected_images:
      raise ValueError(f"{where}: class {fine_names[c]} has {counts[c]} images (train + test), expected "
                       f"{expected_images}")
  if counts.min() == 0 or counts.min() != counts.max():
    raise ValueError(f"{where}: classes have different numbers of images ({counts.min()}..{counts.max()})")
  coarse_of_fine = np.full(NUM_FINE, -1, dtype=np.int64)
  for c in range(NUM_FINE):
    parents = np.unique(coarse[fine == c])
    if parents.size != 1:
      raise ValueError(f"{where}: class {fine_names[c]} has images under {parents.size} superclasses")
    coarse_of_fine[c] = parents[0]

  order = np.argsort(fine, kind="stable")  # by class; train before test, file order within each
  n = int(counts[0])
  images = x[order].reshape(NUM_FINE, n, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 1, 3, 4, 2)
  return Cifar100(np.ascontiguousarray(images), fine_names, coarse_names, coarse_of_fine)


# ----------------------------------------------------------------------------------------------------
# Loading.


def _check_cached(arrays: Mapping[str, np.ndarray]) -> bool:
  images, fine, coarse, parent = (arrays["images"], arrays["fine_names"], arrays["coarse_names"],
                                  arrays["coarse_of_fine"])
  return (images.dtype == np.uint8 and images.ndim == 5 and images.shape[0] == NUM_FINE
          and images.shape[2:] == (IMAGE_SIZE, IMAGE_SIZE, 3) and fine.shape == (NUM_FINE,)
          and coarse.shape == (NUM_COARSE,) and parent.shape == (NUM_FINE,) and parent.dtype == np.int64
          and bool(np.all((parent >= 0) & (parent < NUM_COARSE))))


def load_cifar100(path: PathLike, cache_dir: Optional[PathLike] = None, *,
                  expected_images: Optional[int] = NUM_IMAGES) -> Cifar100:
  """All of CIFAR-100, train and test pooled per class, through the cache (see the module docstring).

  Args:
    path: the ``cifar-100-python/`` folder, a folder holding it, or ``cifar-100-python.tar.gz``.
    cache_dir: where the decoded ``.npz`` lives; None means ``$GAJAX_CACHE_DIR`` or ``~/.cache/gajax``.
    expected_images: images every class must have, train + test (default 600); None skips the check
      (every class must still have the same number).

  Raises:
    FileNotFoundError: no source at ``path``, or one of its three pickles is missing.
    ValueError: a corrupt/truncated archive or pickle, a wrong layout, or wrong counts.
  """
  path = Path(path).expanduser()
  source = _detect_source(path)
  files = [source.path / f for f in FILES] if source.kind == "folder" else [source.path]
  key = _cache.cache_key({"version": _CACHE_VERSION, "dataset": "cifar100", "kind": source.kind,
                          "source": _cache.stat_fingerprint(files, files[0].parent)})
  cache_path = _cache.cache_file(cache_dir, f"cifar100_{IMAGE_SIZE}px", key)

  arrays = _cache.read_cache(cache_path, key, what="CIFAR-100", check=_check_cached)
  if arrays is not None:
    data = Cifar100(arrays["images"], tuple(str(c) for c in arrays["fine_names"]),
                    tuple(str(c) for c in arrays["coarse_names"]), arrays["coarse_of_fine"])
    n = data.images.shape[1]
    if expected_images is not None and n != expected_images:
      raise ValueError(f"{path} (cache {cache_path}): every class has {n} images, expected {expected_images}")
    return data

  data = _decode(source, expected_images)
  _cache.write_cache(cache_path, key, {
      "images": data.images, "fine_names": np.asarray(data.fine_names, dtype=str),
      "coarse_names": np.asarray(data.coarse_names, dtype=str), "coarse_of_fine": data.coarse_of_fine,
  }, what="CIFAR-100")
  return data


def _select(data: Cifar100, fine_indices: np.ndarray) -> ClassImages:
  fine_indices = np.sort(np.asarray(fine_indices, dtype=np.int64))
  return ClassImages(data.images[fine_indices], tuple(data.fine_names[i] for i in fine_indices))


def _listed(path, split, cache_dir, expected_images, allow_unverified, kind):
  """``(split, data, indices)``: ``kind``'s split list checked and located among ``data``'s names.

  ``kind`` is ``"cifar_fs"`` (fine class names) or ``"fc100"`` (superclass names).
  """
  split = normalise_split(split)
  names = split_list(kind, split, allow_unverified)
  fine = kind == "cifar_fs"
  expected, what = ((CIFAR_FS_NUM_CLASSES[split], "classes") if fine
                    else (FC100_NUM_SUPERCLASSES[split], "superclasses"))
  if len(names) != expected:
    raise ValueError(f"gajax/data/splits/{kind}_{split}.txt: lists {len(names)} {what}, expected "
                     f"{expected}")
  data = load_cifar100(path, cache_dir, expected_images=expected_images)
  known = data.fine_names if fine else data.coarse_names
  index = {n: i for i, n in enumerate(known)}
  missing = [n for n in names if n not in index]
  if missing:
    label, item, among = ("CIFAR-FS", "class", "fine classes") if fine else ("FC100", "superclass",
                                                                            "superclasses")
    raise ValueError(f"{path}: {label} {split} {item} {missing[0]!r} is not among the data's {among}")
  return split, data, np.asarray([index[n] for n in names])


def load_cifar_fs(path: PathLike, split: str, cache_dir: Optional[PathLike] = None, *,
                  expected_images: Optional[int] = NUM_IMAGES, allow_unverified: bool = False) -> ClassImages:
  """One split of CIFAR-FS (64 / 16 / 20 classes): ``images: uint8 [C, 600, 32, 32, 3]``.

  Args: as :func:`load_cifar100`, plus ``split`` (``"train"``, ``"val"``/``"validation"``, ``"test"``) and
  ``allow_unverified`` (use a split list marked ``UNVERIFIED``; none shipped is).
  """
  _, data, classes = _listed(path, split, cache_dir, expected_images, allow_unverified, "cifar_fs")
  return _select(data, classes)


def load_fc100(path: PathLike, split: str, cache_dir: Optional[PathLike] = None, *,
               expected_images: Optional[int] = NUM_IMAGES, allow_unverified: bool = False) -> ClassImages:
  """One split of FC100 (12 / 4 / 4 superclasses = 60 / 20 / 20 classes): ``uint8 [C, 600, 32, 32, 3]``.

  Args: as :func:`load_cifar_fs`. Class names are the fine names; every listed superclass must hold 5.
  """
  split, data, supers = _listed(path, split, cache_dir, expected_images, allow_unverified, "fc100")
  fine = np.flatnonzero(np.isin(data.coarse_of_fine, supers))
  if fine.size != NUM_FINE // NUM_COARSE * len(supers):
    raise ValueError(f"{path}: the FC100 {split} superclasses hold {fine.size} classes, expected "
                     f"{NUM_FINE // NUM_COARSE * len(supers)}")
  return _select(data, fine)
