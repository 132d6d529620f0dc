"""The verified on-disk cache shared by the data-set readers (and, re-exported from
:mod:`gajax.data.base`, their common in-memory result :class:`ClassImages`).

numpy only, no JAX (see :mod:`gajax.data`).

Every reader (:mod:`gajax.data.omniglot`, :mod:`gajax.data.mini_imagenet`, :mod:`gajax.data.cifar_fs`)
decodes its source once and keeps the decoded uint8 arrays in one ``.npz`` file (tiered-ImageNet, too
big to load whole, keeps its images in a memory-mapped ``.npy`` written by :func:`atomic_memmap` beside
a small ``.npz`` manifest that records the ``.npy``'s sha256; :mod:`gajax.data.tiered_imagenet`):

* **Where.** ``<cache_dir>/<stem>_<key[:24]>.npz``; ``cache_dir`` is the reader's argument, else
  ``$GAJAX_CACHE_DIR``, else ``~/.cache/gajax`` (:func:`resolve_cache_dir`).
* **Key.** ``key`` is the sha256 of a JSON object (:func:`cache_key`) holding a format version, the decode
  settings (image size, split, ...) and a fingerprint of the source: the sha256 of an archive
  (:func:`sha256_file`), or the relative path, size and mtime of every file read (:func:`stat_fingerprint`,
  :func:`tree_fingerprint`) where hashing would cost as much as decoding. A changed source or setting gives
  a new file; old files are left alone (delete them by hand).
* **Verified.** The file stores the full ``key`` and a sha256 of its own contents (``digest``); a file that
  is unreadable, truncated, for another key, fails the reader's shape checks or whose digest does not match
  is not trusted: a ``RuntimeWarning`` says "... cache is corrupt or stale; rebuilding it" and the reader
  decodes again (:func:`read_cache`).
* **Atomic.** The file is written to a temporary file in the same folder (``<name>.<random>.tmp``),
  flushed and fsynced, then moved into place with ``os.replace`` (:func:`atomic_save_npz`). An exception or
  ``KeyboardInterrupt`` at any point deletes the temporary file, so the cache folder holds either the old
  state or the complete new file; only a hard kill (SIGKILL, power loss) mid-write can leave a ``*.tmp``
  file, which is never read. A cache folder that cannot be written only costs a warning
  (:func:`write_cache`), except for a memory-mapped array (:func:`atomic_memmap`), which is used from
  the cache and so cannot do without it (a one-line ``OSError``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Optional, Union

import numpy as np

from gajax.data.base import ClassImages  # noqa: F401 - re-exported: the readers' common result

PathLike = Union[str, os.PathLike]

CACHE_ENV = "GAJAX_CACHE_DIR"
_CHUNK = 1 << 20
# Entries every cache file carries besides the data.
_RESERVED = ("key", "digest")


# ----------------------------------------------------------------------------------------------------
# Where, and under which key.


def default_cache_dir() -> Path:
  """``$GAJAX_CACHE_DIR`` if set, else ``~/.cache/gajax``."""
  env = os.environ.get(CACHE_ENV)
  return Path(env).expanduser() if env else Path.home() / ".cache" / "gajax"


def resolve_cache_dir(cache_dir: Optional[PathLike] = None) -> Path:
  """``cache_dir`` if given, else :func:`default_cache_dir`."""
  return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def sha256_file(path: PathLike) -> str:
  """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(_CHUNK), b""):
      h.update(chunk)
  return h.hexdigest()


def stat_fingerprint(paths: Iterable[PathLike], root: PathLike) -> str:
  """sha256 over ``relative path, size, mtime_ns`` of each of ``paths`` (relative to ``root``), in order.

  Cheap identity for sources too big (or too many files) to hash: a real edit changes the size or the
  mtime. Paths are taken relative to ``root`` so that moving the whole source keeps its fingerprint.
  """
  h = hashlib.sha256()
  for p in paths:
    st = os.stat(p)
    h.update(f"{os.path.relpath(p, root)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
  return h.hexdigest()


def tree_fingerprint(root: PathLike) -> str:
  """:func:`stat_fingerprint` of every file under ``root``, walked in sorted order."""
  entries = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for name in sorted(filenames):
      full = os.path.join(dirpath, name)
      st = os.stat(full)
      entries.append(f"{os.path.relpath(full, root)}\t{st.st_size}\t{st.st_mtime_ns}")
  return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def cache_key(material: Mapping) -> str:
  """Hex sha256 of ``material`` as canonical JSON (sorted keys): the full cache key."""
  return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def cache_file(cache_dir: Optional[PathLike], stem: str, key: str) -> Path:
  """``<resolved cache_dir>/<stem>_<key[:24]>.npz``."""
  return resolve_cache_dir(cache_dir) / f"{stem}_{key[:24]}.npz"


# ----------------------------------------------------------------------------------------------------
# Writing and reading.


def content_digest(arrays: Mapping[str, np.ndarray]) -> str:
  """Hex sha256 over every array's name, dtype, shape and bytes, in sorted name order."""
  h = hashlib.sha256()
  for name in sorted(arrays):
    a = np.asarray(arrays[name])
    h.update(repr((name, str(a.dtype), a.shape)).encode())
    if a.dtype.kind in "US":  # strings: their text, not numpy's fixed-width padding
      h.update("\n".join(str(x) for x in a.reshape(-1)).encode())
    else:
      h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def atomic_save_npz(path: Path, **arrays) -> None:
  """Writes an ``.npz`` so that ``path`` holds either nothing/the old file or the complete new one.

  Temporary file in the same folder, ``np.savez``, flush, fsync, ``os.replace``; on any exception
  (``BaseException``: ``KeyboardInterrupt`` too) the temporary file is deleted and the exception re-raised.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a cache is fine to share read-only
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise
  # Make the rename itself durable where the platform allows (not on every file system / OS).
  with contextlib.suppress(OSError, AttributeError):
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
      os.fsync(dfd)
    finally:
      os.close(dfd)


@contextlib.contextmanager
def atomic_memmap(path: Path, shape: tuple, dtype=np.uint8) -> Iterator[np.memmap]:
  """Yields a writable ``np.memmap`` of a new ``.npy`` that appears at ``path`` only once complete.

  For arrays too large to build in memory (tiered-ImageNet's 9.5 GB train split): the caller fills
  the yielded array; on a clean exit it is flushed, fsynced and renamed onto ``path`` (as
  :func:`atomic_save_npz` does); on any exception (``KeyboardInterrupt`` too) the temporary file is
  deleted, so a cache folder never holds a half-written array under a real name. The file's blocks are
  reserved first (``posix_fallocate``), so a full disk is an ``OSError`` up front, not a SIGBUS midway.

  Raises:
    OSError: one line naming the folder when it cannot be written or has no room (unlike
      :func:`write_cache`, which only warns: a memory-mapped data set cannot be used without its cache).
  """
  path = Path(path)
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
  except OSError as e:
    raise OSError(f"{path.parent}: cannot write the cache there ({e.strerror or e}); point "
                  f"${CACHE_ENV} or cache_dir at a writable folder") from e
  os.close(fd)
  try:
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=tuple(shape))  # a sparse file
    # Reserve every block now: a disk that fills while a memory map is written kills the process with
    # SIGBUS (no exception, no clean-up); reserved up front, a full disk is an OSError before any work.
    if hasattr(os, "posix_fallocate"):
      with open(tmp, "rb+") as f:
        try:
          os.posix_fallocate(f.fileno(), 0, os.path.getsize(tmp))
        except OSError as e:
          # Other errors (EOPNOTSUPP, EINVAL): a file system without fallocate; write as is.
          if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise OSError(f"{path.parent}: no room for the {os.path.getsize(tmp) / 2**30:.1f} GiB cache "
                          f"({e.strerror or e}); free space or point ${CACHE_ENV} or cache_dir "
                          "elsewhere") from e
    yield out
    out.flush()
    del out
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


def write_cache(path: Path, key: str, arrays: Mapping[str, np.ndarray], *, what: str,
                digest: Optional[str] = None) -> bool:
  """Saves ``arrays`` plus ``key`` and ``digest`` atomically; returns False (and warns) on ``OSError``.

  ``digest`` defaults to :func:`content_digest` of ``arrays``. A read-only or full cache folder should cost
  speed next time, not this run, so ``OSError`` only warns; any other exception propagates (after the
  temporary file is removed).
  """
  bad = [k for k in arrays if k in _RESERVED]
  if bad:
    raise ValueError(f"array names {bad} are reserved in a cache file")
  if digest is None:
    digest = content_digest(arrays)
  try:
    atomic_save_npz(path, **arrays, key=np.asarray(key), digest=np.asarray(digest))
  except OSError as e:
    warnings.warn(f"{path}: could not write the {what} cache: {e}", RuntimeWarning, stacklevel=3)
    return False
  return True


def read_cache(path: Path, key: str, *, what: str,
               digest_fn: Callable[[Mapping[str, np.ndarray]], str] = content_digest,
               check: Optional[Callable[[Mapping[str, np.ndarray]], bool]] = None) -> Optional[dict]:
  """The cached arrays (without ``key``/``digest``), or None when the file is missing or fails a check.

  The checks, cheapest first: the file opens as an ``.npz`` without pickles, its stored key equals ``key``,
  ``check(arrays)`` (the reader's dtype/shape test) is true, and ``digest_fn(arrays)`` equals the stored
  digest. Any failure other than a missing file warns ``"<path>: <what> cache is corrupt or stale;
  rebuilding it"`` (``RuntimeWarning``).
  """
  if not Path(path).is_file():
    return None
  try:
    with np.load(path, allow_pickle=False) as z:
      arrays = {name: z[name] for name in z.files}  # reading each member checks its CRC
    stored_key, stored_digest = str(arrays.pop("key")), str(arrays.pop("digest"))
    ok = (stored_key == key and (check is None or bool(check(arrays)))
          and stored_digest == digest_fn(arrays))
  except Exception:  # noqa: BLE001 - any unreadable cache is simply rebuilt
    ok = False
  if not ok:
    warnings.warn(f"{path}: {what} cache is corrupt or stale; rebuilding it", RuntimeWarning, stacklevel=3)
    return None
  return arrays


# ----------------------------------------------------------------------------------------------------
# ClassImages <-> cache arrays.


def class_images_arrays(data: ClassImages) -> dict:
  """The arrays :func:`write_cache` stores for a :class:`ClassImages`."""
  return {"images": data.images, "class_names": np.asarray(list(data.class_names), dtype=str)}


def class_images_check(image_shape: Optional[tuple] = None) -> Callable[[Mapping[str, np.ndarray]], bool]:
  """A ``check`` for :func:`read_cache`: uint8 ``[C, N, *image_shape]`` with ``C`` class names."""
  def check(arrays):
    images, names = arrays["images"], arrays["class_names"]
    return (images.dtype == np.uint8 and images.ndim in (4, 5) and names.ndim == 1
            and images.shape[0] == names.shape[0]
            and (image_shape is None or images.shape[2:] == tuple(image_shape)))
  return check


def class_images_from_arrays(arrays: Mapping[str, np.ndarray]) -> ClassImages:
  """Inverse of :func:`class_images_arrays`."""
  return ClassImages(arrays["images"], tuple(str(c) for c in arrays["class_names"]))
