"""What the data-set readers share besides the cache: their result type and a restricted pickle reader.

numpy only, no JAX (see :mod:`gajax.data`).
"""

from __future__ import annotations

import concurrent.futures
import importlib
import importlib.util
import io
import os
import pickle
from typing import BinaryIO, Callable, NamedTuple, Optional, Union

import numpy as np


class ClassImages(NamedTuple):
  """One split of a few-shot data set: every class with the same number of images.

  Attributes:
    images: uint8 ``[C, N, H, W, 3]`` (RGB) or ``[C, N, H, W]`` (grey): ``N`` images of each of ``C``
      classes. Readers insist on equal counts per class (the few-shot sets read here have them: 600 per
      class for mini-ImageNet, CIFAR-FS and FC100) and raise ``ValueError`` otherwise, so there is no index
      array.
    class_names: the ``C`` class names, in the order of ``images``' first axis.
  """
  images: np.ndarray
  class_names: tuple


class RaggedClassImages(NamedTuple):
  """One split of a few-shot data set whose classes have different numbers of images.

  Attributes:
    images: uint8 ``[M, H, W, 3]``, class-major: class ``c``'s images are
      ``images[offsets[c]:offsets[c + 1]]``. Readers of large sets return a read-only ``np.memmap``
      of their cache, so only the images a sampler touches are read from disk.
    offsets: int64 ``[C + 1]``, ``offsets[0] = 0``, ``offsets[C] = M``, strictly increasing.
    class_names: the ``C`` class names.
    superclass: int64 ``[C]``: each class's index into ``superclass_names``.
    superclass_names: the names of the superclasses (tiered-ImageNet's high-level categories).
  """
  images: np.ndarray
  offsets: np.ndarray
  class_names: tuple
  superclass: np.ndarray
  superclass_names: tuple

  @property
  def counts(self) -> np.ndarray:
    """int64 ``[C]``: images per class."""
    return np.diff(self.offsets)


def one_line(e: BaseException) -> str:
  """``"<Type>: <message>"`` on one line (the first line of the message), for error messages."""
  msg = str(e).strip().splitlines()
  return f"{type(e).__name__}: {msg[0]}" if msg else type(e).__name__


# ----------------------------------------------------------------------------------------------------
# Pickles.

# The only globals a data pickle of numpy arrays, dicts, lists, strings and numbers needs: numpy's array,
# dtype and scalar reconstructors under both module spellings (numpy < 2 wrote ``numpy.core``, numpy >= 2
# writes ``numpy._core``), and ``_codecs.encode``, with which Python 3 writes ``bytes`` at protocol 2.
_ALLOWED_GLOBALS = frozenset({
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"), ("collections", "OrderedDict"),
})
_NUMPY_CORE = "numpy._core" if importlib.util.find_spec("numpy._core") is not None else "numpy.core"


class UnsafePickleError(pickle.UnpicklingError):
  """A pickle asked for a global outside the data allow-list."""


class _DataUnpickler(pickle.Unpickler):
  def find_class(self, module, name):
    if (module, name) not in _ALLOWED_GLOBALS:
      raise UnsafePickleError(f"it asks for {module}.{name}, which a data pickle does not need")
    if module.startswith(("numpy.core.", "numpy._core.")):
      # Import the spelling this numpy has (numpy 2 warns on ``numpy.core``; numpy 1 lacks ``numpy._core``).
      module = _NUMPY_CORE + "." + module.split(".", 2)[2]
    return getattr(importlib.import_module(module), name)


def load_pickle(source: Union[bytes, BinaryIO, str, os.PathLike], origin: str, *,
                encoding: str = "ASCII") -> object:
  """Unpickles data-only content (numpy arrays, dicts, lists, str/bytes, numbers) from a file or bytes.

  Any other global (a class, a function) is refused before it is imported, so a data file fetched from a
  mirror cannot run code. ``encoding`` is :func:`pickle.load`'s: ``"bytes"`` reads Python 2 pickles (CIFAR's)
  with their ``str`` keys and values as ``bytes``.

  Raises:
    FileNotFoundError: ``source`` is a path that does not exist.
    ValueError: one line naming ``origin``: a truncated/corrupt pickle, or one that needs other globals.
  """
  try:
    if isinstance(source, (str, os.PathLike)):
      with open(source, "rb") as f:
        return _DataUnpickler(f, encoding=encoding).load()
    f = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    return _DataUnpickler(f, encoding=encoding).load()
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{origin}: no such file") from e
  except UnsafePickleError as e:
    raise ValueError(f"{origin}: refusing to unpickle: {e}") from e
  except MemoryError:
    raise
  except Exception as e:  # noqa: BLE001 - any failure inside pickle means a bad file
    raise ValueError(f"{origin}: corrupt or truncated pickle: {one_line(e)}") from e


def str_keys(d: object, origin: str, what: str) -> dict:
  """``d`` (a dict, possibly with ``bytes`` keys from a Python 2 pickle) with ``str`` keys."""
  if not isinstance(d, dict):
    raise ValueError(f"{origin}: wrong layout: {what} holds a {type(d).__name__}, expected a dict")
  return {(k.decode("latin-1") if isinstance(k, bytes) else k): v for k, v in d.items()}


def for_each_index(fn: Callable[[int], None], n: int, num_workers: int, chunk: int = 4096) -> None:
  """``fn(i)`` for ``i`` in ``range(n)``, on ``num_workers`` threads (Pillow releases the GIL while
  decoding), ``chunk`` indices at a time to bound the futures alive at once. The first failure by
  position is raised (the rest of its chunk cancelled), so errors name the same file on every run."""
  if num_workers <= 1:
    for i in range(n):
      fn(i)
    return
  with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
    for start in range(0, n, chunk):
      futures = [pool.submit(fn, i) for i in range(start, min(start + chunk, n))]
      try:
        for fut in futures:
          fut.result()
      except BaseException:
        for fut in futures:
          fut.cancel()
        raise


def int_vector(value: object) -> Optional[np.ndarray]:
  """``value`` as a non-empty 1-D integer array, or None when it is not one (ragged, strings, ...)."""
  try:
    a = np.asarray(value)
  except Exception:  # noqa: BLE001 - ragged or odd contents
    return None
  return a if a.ndim == 1 and a.size > 0 and a.dtype.kind in "iu" else None


def as_str(x: object) -> str:
  """A name read from a pickle (``bytes`` in Python 2 pickles, ``str`` or numpy ``str_`` otherwise)."""
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


SPLITS = ("train", "val", "test")


def normalise_split(split: str, what: str = "") -> str:
  """``"validation"`` -> ``"val"``; raises ``ValueError`` for anything but train/val/test."""
  if split == "validation":
    return "val"
  if split not in SPLITS:
    raise ValueError(f"unknown {what + ' ' if what else ''}split {split!r}; expected one of {SPLITS}")
  return split


def is_tarball(path) -> bool:
  """Whether ``path``'s name says it is a tar archive (``.tar.gz``, ``.tgz``, ``.tar``)."""
  return path.name.endswith((".tar.gz", ".tgz", ".tar"))
