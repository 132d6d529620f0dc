"""Shared pieces of the tests (``import helpers``: pytest puts tests/ on ``sys.path``)."""

import contextlib
import io
import os
import pickle
import struct
from unittest import mock

import jax
import numpy as np

from gajax.tasks.sinusoid import make_task


def sinusoid_problem(num_tasks=None, seed=0, dtype=np.float64):
  """A 1 -> 8 -> 1 MLP (body Dense_0, head Dense_1) in ``dtype`` and one (or ``num_tasks``) sinusoid
  tasks: ``(params, support, query, loss_fn)``."""
  task = make_task(hidden=(8,), shots=5, queries=5)
  cast = lambda tree: jax.tree_util.tree_map(lambda x: np.asarray(x, dtype), tree)
  params = cast(task.init_params(jax.random.PRNGKey(seed)))
  support, query = cast(task.sample(jax.random.PRNGKey(seed + 1), num_tasks or 1))
  if num_tasks is None:
    support, query = jax.tree_util.tree_map(lambda x: x[0], (support, query))
  return params, support, query, task.loss_fn


class CacheWriteCrash(BaseException):
  """Raised by :func:`crashing_cache_write`; a BaseException, like a Ctrl-C, so no handler eats it."""


@contextlib.contextmanager
def crashing_cache_write(where: str):
  """While open, a data cache write dies in ``np.savez`` (``where="savez"``) or in the final
  ``os.replace`` (``"replace"``), as an interrupted process would."""
  target = {"savez": (np, "savez"), "replace": (os, "replace")}[where]

  def crash(*args, **kwargs):
    raise CacheWriteCrash()

  with mock.patch.object(*target, crash):
    yield


class _Py2Pickler(pickle._Pickler):
  """Writes what Python 2's cPickle wrote at protocol 2: every ``str``/``bytes`` as a byte string
  (BINSTRING opcodes, so ``encoding="bytes"`` reads them back as ``bytes``) and numpy < 2's module names."""

  dispatch = dict(pickle._Pickler.dispatch)

  def _save_string(self, obj):
    data = obj.encode("latin-1") if isinstance(obj, str) else bytes(obj)
    if len(data) < 256:
      self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
    else:
      self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
    self.memoize(obj)

  dispatch[str] = _save_string
  dispatch[bytes] = _save_string

  def save_global(self, obj, name=None):
    name = name or obj.__qualname__
    module = pickle.whichmodule(obj, name).replace("numpy._core", "numpy.core")
    self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
    self.memoize(obj)


def py2_dumps(value) -> bytes:
  """``value`` pickled as Python 2's cPickle did (see :class:`_Py2Pickler`)."""
  buf = io.BytesIO()
  _Py2Pickler(buf, protocol=2).dump(value)
  return buf.getvalue()
