"""Tests for gajax.data.cache (the verified, atomic .npz cache) and gajax.data.base (restricted pickles).

Also checks that none of the data readers imports JAX.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gajax.data import base, cache


def _arrays():
  rng = np.random.default_rng(0)
  return {"images": rng.integers(0, 256, (3, 2, 4, 4, 3), dtype=np.uint8),
          "class_names": np.asarray(["a", "bb", "ccc"], dtype=str)}


def _assert_same(a, b):
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


# ----------------------------------------------------------------------------------------------------
# Module boundary.


@pytest.mark.parametrize("module", ["cache", "base", "mini_imagenet", "cifar_fs", "omniglot"])
def test_data_modules_do_not_import_jax(module):
  # A fresh interpreter with ``gajax`` stubbed as a bare namespace (its __init__ imports JAX itself).
  code = (
      "import sys, types\n"
      f"pkg = types.ModuleType('gajax'); pkg.__path__ = [{str(Path(cache.__file__).parents[1])!r}]\n"
      "sys.modules['gajax'] = pkg\n"
      f"import gajax.data.{module}\n"
      "print(sorted(m for m in sys.modules if m == 'jax' or m.startswith(('jax.', 'jaxlib'))))\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout


# ----------------------------------------------------------------------------------------------------
# Location and keys.


def test_cache_dir_honours_env(tmp_path, monkeypatch):
  monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "env"))
  assert cache.default_cache_dir() == tmp_path / "env"
  assert cache.resolve_cache_dir(None) == tmp_path / "env"
  assert cache.resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"
  assert cache.cache_file(None, "x_8px", "ab" * 32) == tmp_path / "env" / f"x_8px_{'ab' * 12}.npz"
  monkeypatch.delenv(cache.CACHE_ENV)
  assert cache.default_cache_dir() == Path.home() / ".cache" / "gajax"


def test_fingerprints_follow_content_not_location(tmp_path):
  for root in (tmp_path / "a", tmp_path / "b"):
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "x.bin").write_bytes(b"12345")
    (root / "y.bin").write_bytes(b"abc")
    os.utime(root / "sub" / "x.bin", ns=(10**18, 10**18))
    os.utime(root / "y.bin", ns=(10**18, 10**18))
  a, b = tmp_path / "a", tmp_path / "b"
  files = lambda r: [r / "y.bin", r / "sub" / "x.bin"]  # noqa: E731
  assert cache.stat_fingerprint(files(a), a) == cache.stat_fingerprint(files(b), b)
  assert cache.tree_fingerprint(a) == cache.tree_fingerprint(b)
  assert cache.sha256_file(a / "y.bin") == cache.sha256_file(b / "y.bin")
  before = (cache.stat_fingerprint(files(a), a), cache.tree_fingerprint(a))
  (a / "y.bin").write_bytes(b"abcd")  # size and mtime change
  assert cache.stat_fingerprint(files(a), a) != before[0] and cache.tree_fingerprint(a) != before[1]
  assert cache.cache_key({"a": 1, "b": [2]}) == cache.cache_key({"b": [2], "a": 1})
  assert cache.cache_key({"a": 1}) != cache.cache_key({"a": 2})


def test_content_digest_sees_names_dtypes_shapes_and_bytes():
  arrays = _arrays()
  d = cache.content_digest(arrays)
  assert cache.content_digest(dict(reversed(list(arrays.items())))) == d
  for change in (
      lambda a: a.update(images=a["images"].reshape(3, 2, 4, 12)),
      lambda a: a.update(images=a["images"].astype(np.int16)),
      lambda a: a.update(class_names=np.asarray(["a", "bb", "ccd"])),
      lambda a: a.update(extra=np.zeros(1)),
      lambda a: a.__setitem__("pictures", a.pop("images")),
  ):
    other = dict(arrays)
    change(other)
    assert cache.content_digest(other) != d


# ----------------------------------------------------------------------------------------------------
# Writing and reading.


def test_round_trip_and_every_kind_of_damage_is_rebuilt(tmp_path):
  path, key = tmp_path / "c" / "x.npz", "k" * 64
  arrays = _arrays()
  assert cache.write_cache(path, key, arrays, what="Test")
  assert [p.name for p in path.parent.iterdir()] == ["x.npz"]
  assert oct(path.stat().st_mode & 0o777) == "0o644"
  _assert_same(cache.read_cache(path, key, what="Test"), arrays)
  assert cache.read_cache(tmp_path / "none.npz", key, what="Test") is None  # missing: silently None

  good = path.read_bytes()
  damaged = {"garbage": b"garbage", "truncated": good[: len(good) // 2], "empty": b""}
  with np.load(path) as z:
    stored = dict(z)
  flipped = dict(stored, images=stored["images"].copy())
  flipped["images"][0, 0, 0, 0, 0] ^= 1
  for name, arrs in {"tampered": flipped, "no digest": {k: v for k, v in stored.items() if k != "digest"}}.items():
    np.savez(tmp_path / "tmp.npz", **arrs)
    damaged[name] = (tmp_path / "tmp.npz").read_bytes()
  for name, data in damaged.items():
    path.write_bytes(data)
    with pytest.warns(RuntimeWarning, match="Test cache is corrupt or stale; rebuilding it"):
      assert cache.read_cache(path, key, what="Test") is None, name

  path.write_bytes(good)
  with pytest.warns(RuntimeWarning, match="corrupt or stale"):
    assert cache.read_cache(path, "other" * 8, what="Test") is None  # another key
  with pytest.warns(RuntimeWarning, match="corrupt or stale"):
    assert cache.read_cache(path, key, what="Test", check=lambda a: a["images"].ndim == 4) is None
  with pytest.warns(RuntimeWarning, match="corrupt or stale"):
    assert cache.read_cache(path, key, what="Test", check=lambda a: a["missing"]) is None
  _assert_same(cache.read_cache(path, key, what="Test", check=cache.class_images_check((4, 4, 3))), arrays)


def test_pickled_objects_are_never_loaded(tmp_path):
  path = tmp_path / "x.npz"
  arrays = {"images": np.zeros((1, 1, 2, 2), np.uint8), "class_names": np.asarray([{"a": 1}], dtype=object)}
  np.savez(path, **arrays, key=np.asarray("k"), digest=np.asarray("d"))
  with pytest.warns(RuntimeWarning, match="corrupt or stale"):
    assert cache.read_cache(path, "k", what="Test", digest_fn=lambda a: "d") is None


def test_class_images_round_trip(tmp_path):
  data = cache.ClassImages(_arrays()["images"], ("a", "bb", "ccc"))
  path = tmp_path / "ci.npz"
  cache.write_cache(path, "k", cache.class_images_arrays(data), what="Test")
  back = cache.class_images_from_arrays(cache.read_cache(path, "k", what="Test",
                                                         check=cache.class_images_check()))
  np.testing.assert_array_equal(back.images, data.images)
  assert back.class_names == data.class_names and isinstance(back.class_names, tuple)
  assert cache.ClassImages is base.ClassImages


def test_reserved_names_are_refused(tmp_path):
  with pytest.raises(ValueError, match="reserved"):
    cache.write_cache(tmp_path / "x.npz", "k", {"key": np.zeros(1)}, what="Test")
  assert list(tmp_path.iterdir()) == []


class _Crash(BaseException):
  pass


@pytest.mark.parametrize("crash_in", ["savez", "fsync", "replace", "interrupt"])
def test_interrupted_write_leaves_nothing_and_keeps_the_old_file(tmp_path, monkeypatch, crash_in):
  path = tmp_path / "c" / "x.npz"
  old = {"images": np.ones((1, 1, 2, 2), np.uint8), "class_names": np.asarray(["old"])}
  cache.write_cache(path, "old", old, what="Test")
  old_bytes = path.read_bytes()

  def crash(*a, **k):
    raise KeyboardInterrupt() if crash_in == "interrupt" else _Crash()

  with monkeypatch.context() as m:
    target = {"savez": (np, "savez"), "fsync": (os, "fsync"), "replace": (os, "replace"),
              "interrupt": (np, "savez")}[crash_in]
    m.setattr(*target, crash)
    with pytest.raises((_Crash, KeyboardInterrupt)):
      cache.write_cache(path, "new", _arrays(), what="Test")
  assert [p.name for p in path.parent.iterdir()] == ["x.npz"]  # no temporary file left
  assert path.read_bytes() == old_bytes

  path.unlink()
  with monkeypatch.context() as m:
    m.setattr(os, "replace", crash)
    with pytest.raises((_Crash, KeyboardInterrupt)):
      cache.write_cache(path, "new", _arrays(), what="Test")
  assert list(path.parent.iterdir()) == []


def test_unwritable_cache_only_warns(tmp_path, monkeypatch):
  def deny(*a, **k):
    raise PermissionError("read-only")

  monkeypatch.setattr(cache.tempfile, "mkstemp", deny)
  with pytest.warns(RuntimeWarning, match="could not write the Test cache"):
    assert cache.write_cache(tmp_path / "x.npz", "k", _arrays(), what="Test") is False
  assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------
# Restricted pickles.


class _Evil:
  def __reduce__(self):
    return (os.system, ("echo pwned",))


def test_load_pickle_reads_data_and_refuses_code(tmp_path):
  value = {"a": np.arange(6, dtype=np.uint8).reshape(2, 3), "b": [1, np.int64(2), 3.5, "s", b"t"],
           b"c": (None, True)}
  for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
    got = base.load_pickle(pickle.dumps(value, protocol=protocol), "mem")
    np.testing.assert_array_equal(got["a"], value["a"])
    assert got["b"] == value["b"] and got[b"c"] == value[b"c"]
  # numpy < 2 spells its modules numpy.core: still read (protocol 2 names globals in plain text).
  old = pickle.dumps(value, protocol=2).replace(b"cnumpy._core.", b"cnumpy.core.")
  assert b"cnumpy.core.multiarray\n_reconstruct" in old
  np.testing.assert_array_equal(base.load_pickle(old, "mem")["a"], value["a"])

  (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"x": _Evil()}, protocol=2))
  with pytest.raises(ValueError, match=r"evil.pkl: refusing to unpickle: it asks for posix.system") as e:
    base.load_pickle(tmp_path / "evil.pkl", str(tmp_path / "evil.pkl"))
  assert "\n" not in str(e.value)
  good = pickle.dumps(value, protocol=4)
  for bad in (good[:-10], b"", b"\x80\x04garbage"):
    with pytest.raises(ValueError, match="mem: corrupt or truncated pickle") as e:
      base.load_pickle(bad, "mem")
    assert "\n" not in str(e.value)
  with pytest.raises(FileNotFoundError, match="nope.pkl: no such file"):
    base.load_pickle(tmp_path / "nope.pkl", str(tmp_path / "nope.pkl"))
