"""Tests for gajax.data.cifar_fs: CIFAR-100's python pickles written as Python 2 wrote them, at toy size.

The toy CIFAR-100 has the real 100 class names and 20 superclasses (so the shipped split lists apply),
with 2 train + 1 test images per class instead of 500 + 100.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from gajax.data import base, cifar_fs
import helpers

# CIFAR-100's hierarchy, as in its meta file (fine and coarse label names are alphabetical there).
HIERARCHY = {
    "aquatic_mammals": ["beaver", "dolphin", "otter", "seal", "whale"],
    "fish": ["aquarium_fish", "flatfish", "ray", "shark", "trout"],
    "flowers": ["orchid", "poppy", "rose", "sunflower", "tulip"],
    "food_containers": ["bottle", "bowl", "can", "cup", "plate"],
    "fruit_and_vegetables": ["apple", "mushroom", "orange", "pear", "sweet_pepper"],
    "household_electrical_devices": ["clock", "keyboard", "lamp", "telephone", "television"],
    "household_furniture": ["bed", "chair", "couch", "table", "wardrobe"],
    "insects": ["bee", "beetle", "butterfly", "caterpillar", "cockroach"],
    "large_carnivores": ["bear", "leopard", "lion", "tiger", "wolf"],
    "large_man-made_outdoor_things": ["bridge", "castle", "house", "road", "skyscraper"],
    "large_natural_outdoor_scenes": ["cloud", "forest", "mountain", "plain", "sea"],
    "large_omnivores_and_herbivores": ["camel", "cattle", "chimpanzee", "elephant", "kangaroo"],
    "medium_mammals": ["fox", "porcupine", "possum", "raccoon", "skunk"],
    "non-insect_invertebrates": ["crab", "lobster", "snail", "spider", "worm"],
    "people": ["baby", "boy", "girl", "man", "woman"],
    "reptiles": ["crocodile", "dinosaur", "lizard", "snake", "turtle"],
    "small_mammals": ["hamster", "mouse", "rabbit", "shrew", "squirrel"],
    "trees": ["maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"],
    "vehicles_1": ["bicycle", "bus", "motorcycle", "pickup_truck", "train"],
    "vehicles_2": ["lawn_mower", "rocket", "streetcar", "tank", "tractor"],
}
FINE = sorted(f for fs in HIERARCHY.values() for f in fs)
COARSE = sorted(HIERARCHY)
COARSE_OF = {f: COARSE.index(c) for c, fs in HIERARCHY.items() for f in fs}
PER_CLASS = {"train": 2, "test": 1}
N_IMAGES = 3

# The published splits, written independently of the shipped files (from torchmeta's JSON assets for
# CIFAR-FS, and TADAM's superclass indices for FC100).
CIFAR_FS_TEST = {"baby", "bed", "bicycle", "chimpanzee", "fox", "leopard", "man", "pickup_truck", "plain",
                 "poppy", "rocket", "rose", "snail", "sweet_pepper", "table", "telephone", "wardrobe",
                 "whale", "woman", "worm"}
CIFAR_FS_VAL = {"beaver", "otter", "flatfish", "shark", "lamp", "television", "beetle", "butterfly", "sea",
                "camel", "cattle", "crab", "crocodile", "maple_tree", "motorcycle", "tractor"}
FC100_INDICES = {"train": {1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19}, "val": {8, 11, 13, 16},
                 "test": {0, 7, 12, 14}}


# ----------------------------------------------------------------------------------------------------
# Python 2 pickles.




def _make_cifar(seed: int = 0):
  """``({"train": dict, "test": dict, "meta": dict}, expected [100, 3, 32, 32, 3])`` in CIFAR's format."""
  rng = np.random.default_rng(seed)
  files, per_class = {}, {c: [] for c in range(100)}
  for part in ("train", "test"):
    fine = np.repeat(np.arange(100), PER_CLASS[part])
    fine = fine[rng.permutation(fine.size)]  # files are not sorted by class
    data = rng.integers(0, 256, (fine.size, 3072), dtype=np.uint8)
    for row, c in zip(data, fine):
      per_class[c].append(row.reshape(3, 32, 32).transpose(1, 2, 0))  # R, G, B planes, row-major
    files[part] = {"batch_label": f"{part} batch 1 of 1", "fine_labels": [int(c) for c in fine],
                   "coarse_labels": [COARSE_OF[FINE[c]] for c in fine], "data": data,
                   "filenames": [f"img_{part}_{i:05d}.png" for i in range(fine.size)]}
  files["meta"] = {"fine_label_names": list(FINE), "coarse_label_names": list(COARSE)}
  expected = np.stack([np.stack(per_class[c]) for c in range(100)])
  return files, expected


def _write_folder(root: Path, files: dict, dumps=helpers.py2_dumps) -> Path:
  root.mkdir(parents=True, exist_ok=True)
  for name, value in files.items():
    (root / name).write_bytes(dumps(value))
  return root


def _write_tar(path: Path, files: dict) -> Path:
  with tarfile.open(path, "w:gz") as tf:
    for name in ("meta", "test", "train"):
      data = helpers.py2_dumps(files[name])
      info = tarfile.TarInfo(f"cifar-100-python/{name}")
      info.size = len(data)
      tf.addfile(info, io.BytesIO(data))
  return path


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
  files, expected = _make_cifar()
  root = _write_folder(tmp_path_factory.mktemp("c") / "cifar-100-python", files)
  return root, files, expected


def _load(fn, path, split, cache_dir, **kw):
  return fn(path, split, cache_dir, **{"expected_images": N_IMAGES, **kw})


def _cache_files(cache_dir: Path) -> list:
  return sorted(p.name for p in cache_dir.iterdir()) if cache_dir.exists() else []


# ----------------------------------------------------------------------------------------------------
# The shipped split lists.


def test_split_lists_are_the_published_ones():
  fs = {s: cifar_fs.split_list("cifar_fs", s) for s in base.SPLITS}
  assert {s: len(v) for s, v in fs.items()} == {"train": 64, "val": 16, "test": 20}
  assert set(fs["test"]) == CIFAR_FS_TEST and set(fs["val"]) == CIFAR_FS_VAL
  assert set(fs["train"]) == set(FINE) - CIFAR_FS_TEST - CIFAR_FS_VAL
  fc = {s: cifar_fs.split_list("fc100", s) for s in base.SPLITS}
  assert {s: {COARSE.index(n) for n in v} for s, v in fc.items()} == FC100_INDICES
  assert cifar_fs.split_list("cifar_fs", "validation") == fs["val"]
  for name in os.listdir(Path(cifar_fs.__file__).parent / "splits"):
    assert "UNVERIFIED" not in (Path(cifar_fs.__file__).parent / "splits" / name).read_text()
  with pytest.raises(ValueError, match="unknown data set 'cub'"):
    cifar_fs.split_list("cub", "train")
  with pytest.raises(ValueError, match="unknown split 'dev'"):
    cifar_fs.split_list("fc100", "dev")


def test_unverified_lists_need_consent(tmp_path, cifar, monkeypatch):
  root, _, expected = cifar
  real = cifar_fs._split_text
  monkeypatch.setattr(cifar_fs, "_split_text",
                      lambda name: "# UNVERIFIED: from memory\n" + real(name) if name == "fc100_val.txt"
                      else real(name))
  with pytest.raises(ValueError, match=r"splits/fc100_val.txt: this split list is marked UNVERIFIED .* "
                                       r"pass allow_unverified=True") as e:
    _load(cifar_fs.load_fc100, root, "val", tmp_path / "cache")
  assert "\n" not in str(e.value)
  assert _cache_files(tmp_path / "cache") == []  # refused before reading anything
  with pytest.warns(RuntimeWarning, match="marked UNVERIFIED"):
    data = _load(cifar_fs.load_fc100, root, "val", tmp_path / "cache", allow_unverified=True)
  assert len(data.class_names) == 20
  _load(cifar_fs.load_fc100, root, "test", tmp_path / "cache")  # other lists are unaffected


# ----------------------------------------------------------------------------------------------------
# Round trips.


def test_py2_pickles_look_like_the_real_ones(cifar):
  root, files, _ = cifar
  with open(root / "train", "rb") as f:
    d = pickle.load(f, encoding="bytes")
  assert set(d) == {b"batch_label", b"fine_labels", b"coarse_labels", b"data", b"filenames"}
  assert d[b"data"].dtype == np.uint8 and d[b"data"].shape == (200, 3072)
  assert isinstance(d[b"filenames"][0], bytes)
  assert b"cnumpy.core.multiarray\n_reconstruct" in (root / "train").read_bytes()


def test_cifar100_round_trip(tmp_path, cifar):
  root, files, expected = cifar
  data = cifar_fs.load_cifar100(root, tmp_path / "cache", expected_images=N_IMAGES)
  assert data.images.shape == (100, 3, 32, 32, 3) and data.images.dtype == np.uint8
  assert data.images.flags.c_contiguous
  np.testing.assert_array_equal(data.images, expected)
  assert data.fine_names == tuple(FINE) and data.coarse_names == tuple(COARSE)
  assert [data.coarse_names[i] for i in data.coarse_of_fine] == [
      next(c for c, fs in HIERARCHY.items() if f in fs) for f in FINE]
  assert _cache_files(tmp_path / "cache")[0].startswith("cifar100_32px_")


def test_all_source_forms_agree(tmp_path, cifar):
  root, files, expected = cifar
  (tmp_path / "t").mkdir()
  tar = _write_tar(tmp_path / "t" / "cifar-100-python.tar.gz", files)
  # Python 3 pickles with str keys are read too.
  py3 = _write_folder(tmp_path / "py3", files, dumps=lambda v: pickle.dumps(v, protocol=4))
  for i, path in enumerate((root, root.parent, tar, tmp_path / "t", py3)):
    data = cifar_fs.load_cifar100(path, tmp_path / f"cache{i}", expected_images=N_IMAGES)
    np.testing.assert_array_equal(data.images, expected)


@pytest.mark.parametrize("split", base.SPLITS)
def test_cifar_fs_splits(tmp_path, cifar, split):
  root, _, expected = cifar
  data = _load(cifar_fs.load_cifar_fs, root, split, tmp_path / "cache")
  names = cifar_fs.split_list("cifar_fs", split)
  assert data.class_names == tuple(sorted(names))  # CIFAR-100 label order = alphabetical
  assert data.images.shape == (len(names), N_IMAGES, 32, 32, 3)
  np.testing.assert_array_equal(data.images, expected[[FINE.index(n) for n in data.class_names]])


@pytest.mark.parametrize("split", base.SPLITS)
def test_fc100_splits(tmp_path, cifar, split):
  root, _, expected = cifar
  data = _load(cifar_fs.load_fc100, root, split, tmp_path / "cache")
  want = sorted(f for i in FC100_INDICES[split] for f in HIERARCHY[COARSE[i]])
  assert data.class_names == tuple(want) and len(want) == {"train": 60, "val": 20, "test": 20}[split]
  np.testing.assert_array_equal(data.images, expected[[FINE.index(n) for n in want]])


def test_real_counts_are_the_defaults(tmp_path, cifar):
  root, _, _ = cifar
  assert cifar_fs.NUM_IMAGES == 600
  with pytest.raises(ValueError, match=r"cifar-100-python: class apple has 3 images \(train \+ test\), "
                                       r"expected 600"):
    cifar_fs.load_cifar_fs(root, "test", tmp_path / "cache")
  assert cifar_fs.load_cifar_fs(root, "test", tmp_path / "cache", expected_images=None).images.shape[1] == 3


# ----------------------------------------------------------------------------------------------------
# Cache.


def test_one_cache_for_everything_reused_and_rebuilt(tmp_path, cifar, monkeypatch):
  root, _, expected = cifar
  cache = tmp_path / "cache"
  first = _load(cifar_fs.load_cifar_fs, root, "train", cache)
  (cached,) = cache.glob("*.npz")

  def no_unpickling(*a, **k):
    raise AssertionError("unpickled although cached")

  with monkeypatch.context() as m:
    m.setattr(cifar_fs, "load_pickle", no_unpickling)
    for fn in (cifar_fs.load_cifar_fs, cifar_fs.load_fc100):
      for split in base.SPLITS:
        _load(fn, root, split, cache)
    np.testing.assert_array_equal(_load(cifar_fs.load_cifar_fs, root, "train", cache).images, first.images)
    with pytest.raises(ValueError, match=r"\(cache .*\): every class has 3 images, expected 600"):
      cifar_fs.load_cifar_fs(root, "train", cache)
  assert list(cache.glob("*.npz")) == [cached]

  good = cached.read_bytes()
  for bad in (b"garbage", good[: len(good) // 2]):
    cached.write_bytes(bad)
    with pytest.warns(RuntimeWarning, match="CIFAR-100 cache is corrupt or stale"):
      np.testing.assert_array_equal(_load(cifar_fs.load_cifar_fs, root, "train", cache).images, first.images)
    assert cached.read_bytes() == good
  with np.load(cached) as z:
    arrays = dict(z)
  arrays["coarse_of_fine"] = arrays["coarse_of_fine"].copy()
  arrays["coarse_of_fine"][0] += 1
  np.savez(cached, **arrays)
  with pytest.warns(RuntimeWarning, match="corrupt or stale"):
    np.testing.assert_array_equal(_load(cifar_fs.load_fc100, root, "test", cache).images,
                                  _load(cifar_fs.load_fc100, root, "test", tmp_path / "fresh").images)

  # A copy with the same sizes and mtimes shares the cache; a changed source file is a new key.
  copy = tmp_path / "copy"
  shutil.copytree(root, copy)  # copy2 keeps mtimes
  _load(cifar_fs.load_cifar_fs, copy, "train", cache)
  assert len(list(cache.glob("*.npz"))) == 1
  st = (copy / "test").stat()
  os.utime(copy / "test", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  _load(cifar_fs.load_cifar_fs, copy, "train", cache)
  assert len(list(cache.glob("*.npz"))) == 2


@pytest.mark.parametrize("crash_in", ["savez", "replace"])
def test_interrupted_cache_write_leaves_nothing(tmp_path, cifar, monkeypatch, crash_in):
  root, _, _ = cifar
  cache = tmp_path / "cache"
  with helpers.crashing_cache_write(crash_in), pytest.raises(helpers.CacheWriteCrash):
    _load(cifar_fs.load_fc100, root, "train", cache)
  assert _cache_files(cache) == []
  _load(cifar_fs.load_fc100, root, "train", cache)
  assert [Path(p).suffix for p in _cache_files(cache)] == [".npz"]


# ----------------------------------------------------------------------------------------------------
# Errors: one line, naming the file and the problem; nothing cached.


def _expect_error(exc, match, path, cache_dir, fn=cifar_fs.load_cifar_fs, split="train", **kw):
  with pytest.raises(exc, match=match) as e:
    _load(fn, path, split, cache_dir, **kw)
  assert "\n" not in str(e.value)
  assert _cache_files(cache_dir) == []
  return e.value


def test_missing_sources(tmp_path, cifar):
  root, _, _ = cifar
  cache = tmp_path / "cache"
  _expect_error(FileNotFoundError, "nowhere: no such file or folder", tmp_path / "nowhere", cache)
  (tmp_path / "empty").mkdir()
  _expect_error(FileNotFoundError, "empty: no CIFAR-100 python data found", tmp_path / "empty", cache)
  partial = tmp_path / "partial" / "cifar-100-python"
  shutil.copytree(root, partial)
  (partial / "test").unlink()
  _expect_error(FileNotFoundError, r"cifar-100-python/test: missing \(found train, meta next to it\)",
                partial.parent, cache)
  (tmp_path / "cifar.zip").write_bytes(b"PK")
  _expect_error(ValueError, "cifar.zip: not a recognised CIFAR-100 source", tmp_path / "cifar.zip", cache)


def _bad_copy(tmp_path, root, name, content: bytes) -> Path:
  bad = tmp_path / "bad"
  if bad.exists():
    shutil.rmtree(bad)
  shutil.copytree(root, bad)
  (bad / name).write_bytes(content)
  return bad


def test_corrupt_pickles_and_archives(tmp_path, cifar):
  root, files, _ = cifar
  cache = tmp_path / "cache"
  good = (root / "train").read_bytes()
  bad = _bad_copy(tmp_path, root, "train", good[: len(good) // 2])
  _expect_error(ValueError, r"bad/train: corrupt or truncated pickle: \w+", bad, cache)
  bad = _bad_copy(tmp_path, root, "meta", b"")
  _expect_error(ValueError, r"bad/meta: corrupt or truncated pickle", bad, cache)
  tar = _write_tar(tmp_path / "cifar-100-python.tar.gz", files)
  data = tar.read_bytes()
  tar.write_bytes(data[: len(data) // 2])
  _expect_error(ValueError, r"cifar-100-python.tar.gz: corrupt or truncated archive", tar, cache)
  tar.write_bytes(b"\x1f\x8b" + b"\x00" * 100)
  _expect_error(ValueError, r"cifar-100-python.tar.gz: corrupt or truncated archive", tar, cache)
  with tarfile.open(tar, "w:gz") as tf:  # a good archive without the test member
    info = tarfile.TarInfo("cifar-100-python/meta")
    meta = helpers.py2_dumps(files["meta"])
    info.size = len(meta)
    tf.addfile(info, io.BytesIO(meta))
  _expect_error(ValueError, r"cifar-100-python.tar.gz: no cifar-100-python/train member", tar, cache)


def test_wrong_layouts_and_counts(tmp_path, cifar):
  root, files, _ = cifar
  cache = tmp_path / "cache"

  def with_train(**changes):
    value = dict(files["train"], **changes)
    for k, v in changes.items():
      if v is None:
        del value[k]
    return _bad_copy(tmp_path, root, "train", helpers.py2_dumps(value))

  train = files["train"]
  _expect_error(ValueError, r"bad/train: wrong layout: the pickle holds a list, expected a dict",
                _bad_copy(tmp_path, root, "train", helpers.py2_dumps([1, 2])), cache)
  _expect_error(ValueError, r"bad/train: wrong layout: no 'data' key", with_train(data=None), cache)
  _expect_error(ValueError, r"bad/train: wrong layout: data is uint8 \[200, 3000\], expected uint8 \[N, 3072\]",
                with_train(data=np.ascontiguousarray(train["data"][:, :3000])), cache)
  _expect_error(ValueError, r"bad/train: wrong layout: data is float32",
                with_train(data=train["data"].astype(np.float32)), cache)
  _expect_error(ValueError, r"bad/train: fine_labels has 199 labels for 200 images",
                with_train(fine_labels=train["fine_labels"][:-1]), cache)
  _expect_error(ValueError, r"bad/train: fine_labels has labels outside \[0, 100\)",
                with_train(fine_labels=[100] + train["fine_labels"][1:]), cache)
  _expect_error(ValueError, r"bad/train: wrong layout: coarse_labels is not a list of integer labels",
                with_train(coarse_labels=["x"] * 200), cache)
  coarse = list(train["coarse_labels"])
  coarse[0] = (coarse[0] + 1) % 20
  _expect_error(ValueError, rf"bad: class {FINE[train['fine_labels'][0]]} has images under 2 superclasses",
                with_train(coarse_labels=coarse), cache)
  # One image moved to another class: wrong counts.
  fine = list(train["fine_labels"])
  victim, donor = fine[0], (fine[0] + 1) % 100
  fine[0] = donor
  coarse = [COARSE_OF[FINE[c]] for c in fine]
  _expect_error(ValueError, rf"bad: class {FINE[min(victim, donor)]} has [24] images \(train \+ test\), "
                            r"expected 3", with_train(fine_labels=fine, coarse_labels=coarse), cache)
  _expect_error(ValueError, r"bad: classes have different numbers of images \(2..4\)",
                with_train(fine_labels=fine, coarse_labels=coarse), cache, expected_images=None)

  meta = files["meta"]
  bad = _bad_copy(tmp_path, root, "meta", helpers.py2_dumps(dict(meta, fine_label_names=meta["fine_label_names"][:99])))
  _expect_error(ValueError, r"bad/meta: fine_label_names holds 99 distinct names, expected 100", bad, cache)
  bad = _bad_copy(tmp_path, root, "meta", helpers.py2_dumps({"fine_label_names": meta["fine_label_names"]}))
  _expect_error(ValueError, r"bad/meta: wrong layout: no 'coarse_label_names' key", bad, cache)
  renamed = ["APPLE" if n == "apple" else n for n in meta["fine_label_names"]]
  bad = _bad_copy(tmp_path, root, "meta", helpers.py2_dumps(dict(meta, fine_label_names=renamed)))
  # Decoding succeeds (and is cached), then the split list names a class the data lacks.
  with pytest.raises(ValueError, match=r"bad: CIFAR-FS train class 'apple' is not among the data's fine "
                                       r"classes"):
    _load(cifar_fs.load_cifar_fs, bad, "train", tmp_path / "cache2")
  assert _load(cifar_fs.load_cifar_fs, bad, "test", tmp_path / "cache2").images.shape[0] == 20
