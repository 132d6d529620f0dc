"""Tests for gajax.data.mini_imagenet: both layouts written in their real formats, at toy size.

Toy set: 4 / 2 / 2 classes x 3 images (the loader's expected counts are parameters).
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gajax.data import base
from gajax.data import mini_imagenet as mi
import helpers

CLASSES = {"train": 4, "val": 2, "test": 2}
IMAGES = 3
COUNTS = dict(expected_classes=CLASSES, expected_images=IMAGES)


def _wnid(split: str, c: int) -> str:
  # Class names deliberately not in creation order, so sorting is visible.
  return f"n{SPLIT_BASE[split] + 7 * (CLASSES[split] - c):08d}"


SPLIT_BASE = {"train": 1000, "val": 2000, "test": 3000}


def _jpeg(rng: np.random.Generator, size: tuple, mode: str = "RGB") -> bytes:
  h, w = size
  yy, xx = np.mgrid[0:h, 0:w]
  base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1)
  pix = np.clip(base + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)
  im = Image.fromarray(pix)
  if mode != "RGB":
    im = im.convert(mode)
  buf = io.BytesIO()
  im.save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def _write_csv(path: Path, rows: list, header: str = "filename,label") -> None:
  path.write_text(header + "\n" + "".join(f"{f},{l}\n" for f, l in rows))


@pytest.fixture(scope="module")
def csv_root(tmp_path_factory) -> Path:
  """Ravi & Larochelle's layout: images/ + train.csv/val.csv/test.csv; JPEGs of mixed sizes and modes."""
  root = tmp_path_factory.mktemp("ravi")
  (root / "images").mkdir()
  rng = np.random.default_rng(0)
  sizes = [(84, 84), (100, 120), (60, 50)]
  for split in base.SPLITS:
    rows = []
    for c in range(CLASSES[split]):
      wnid = _wnid(split, c)
      for j in range(IMAGES):
        name = f"{wnid}{j + 1:08d}.jpg"
        mode = "L" if (c, j) == (0, 1) else ("CMYK" if (c, j) == (1, 2) else "RGB")
        (root / "images" / name).write_bytes(_jpeg(rng, sizes[(c + j) % 3], mode))
        rows.append((name, wnid))
    _write_csv(root / f"{split}.csv", rows)
  return root


def _reference(root: Path, split: str, size: int = 84):
  """What the module documents, written out with Pillow: classes sorted, rows in CSV order, LANCZOS."""
  lines = (root / f"{split}.csv").read_text().splitlines()[1:]
  by_class = {}
  for line in lines:
    f, label = line.split(",")
    by_class.setdefault(label, []).append(f)
  names = tuple(sorted(by_class))
  images = np.stack([np.stack([
      np.asarray(Image.open(root / "images" / f).convert("RGB").resize((size, size), Image.Resampling.LANCZOS))
      for f in by_class[c]]) for c in names])
  return images, names


def _pkl_value(split: str, rng: np.random.Generator, size: int = 84):
  """A pickled-cache dict in the real format, with shuffled rows, and its expected ClassImages."""
  n = CLASSES[split] * IMAGES
  data = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  perm = rng.permutation(n)
  class_dict = {_wnid(split, c): [int(i) for i in perm[c * IMAGES:(c + 1) * IMAGES]]
                for c in range(CLASSES[split])}
  names = tuple(sorted(class_dict))
  expected = np.stack([data[class_dict[c]] for c in names])
  return {"image_data": data, "class_dict": class_dict}, expected, names


@pytest.fixture(scope="module")
def pkl_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("pkl")
  rng = np.random.default_rng(1)
  expected = {}
  for split, fname in (("train", "train"), ("val", "validation"), ("test", "test")):
    value, images, names = _pkl_value(split, rng)
    with open(root / f"mini-imagenet-cache-{fname}.pkl", "wb") as f:
      pickle.dump(value, f, protocol=4)
    expected[split] = (images, names)
  return root, expected


def _load(path, split, cache_dir, **kw):
  return mi.load_mini_imagenet(path, split, cache_dir, **{**COUNTS, **kw})


def _cache_files(cache_dir: Path) -> list:
  return sorted(p.name for p in cache_dir.iterdir()) if cache_dir.exists() else []


# ----------------------------------------------------------------------------------------------------
# Round trips.


@pytest.mark.parametrize("split", base.SPLITS)
def test_csv_layout_round_trip(tmp_path, csv_root, split):
  data = _load(csv_root, split, tmp_path / "cache")
  images, names = _reference(csv_root, split)
  assert data.images.shape == (CLASSES[split], IMAGES, 84, 84, 3) and data.images.dtype == np.uint8
  assert data.class_names == names and list(names) == sorted(names)
  np.testing.assert_array_equal(data.images, images)
  assert _cache_files(tmp_path / "cache")[0].startswith(f"mini_imagenet_{split}_84px_")


def test_csv_layout_other_size_and_one_worker(tmp_path, csv_root):
  images, _ = _reference(csv_root, "val", size=20)
  a = _load(csv_root, "val", tmp_path / "a", image_size=20, num_workers=1)
  b = _load(csv_root, "validation", tmp_path / "b", image_size=20, num_workers=3)
  np.testing.assert_array_equal(a.images, images)
  np.testing.assert_array_equal(b.images, images)


def test_csv_row_order_within_a_class_is_kept(tmp_path, csv_root):
  root = tmp_path / "copy"
  shutil.copytree(csv_root, root)
  lines = (root / "test.csv").read_text().splitlines()
  (root / "test.csv").write_text("\n".join([lines[0]] + lines[1:][::-1]) + "\n")
  data = _load(root, "test", tmp_path / "cache")
  images, names = _reference(root, "test")
  np.testing.assert_array_equal(data.images, images)
  np.testing.assert_array_equal(data.images[:, ::-1], _reference(csv_root, "test")[0])


@pytest.mark.parametrize("split", base.SPLITS)
def test_pkl_layout_round_trip(tmp_path, pkl_root, split):
  root, expected = pkl_root
  images, names = expected[split]
  single = next(root.glob(f"mini-imagenet-cache-{'validation' if split == 'val' else split}.pkl"))
  for i, path in enumerate((root, single)):
    data = _load(path, split, tmp_path / f"cache{i}")
    assert data.class_names == names
    np.testing.assert_array_equal(data.images, images)


def test_pkl_val_spelling_other_names_and_old_numpy(tmp_path, pkl_root):
  root, expected = pkl_root
  images, names = expected["val"]
  src = (root / "mini-imagenet-cache-validation.pkl").read_bytes()
  (tmp_path / "f").mkdir()
  (tmp_path / "f" / "mini-imagenet-cache-val.pkl").write_bytes(src)
  (tmp_path / "mine.pkl").write_bytes(src)  # any other name: taken to be the split asked for
  # As written by numpy < 2 (module numpy.core), at protocol 2.
  value = pickle.loads(src)
  old = pickle.dumps(value, protocol=2).replace(b"cnumpy._core.", b"cnumpy.core.")
  assert b"cnumpy.core.multiarray" in old
  (tmp_path / "old.pkl").write_bytes(old)
  for path in (tmp_path / "f", tmp_path / "mine.pkl", tmp_path / "old.pkl"):
    data = _load(path, "val", tmp_path / "cache")
    assert data.class_names == names
    np.testing.assert_array_equal(data.images, images)




def test_pkl_written_by_python2(tmp_path, pkl_root):
  root, expected = pkl_root
  value = pickle.loads((root / "mini-imagenet-cache-test.pkl").read_bytes())
  raw = helpers.py2_dumps(value)
  assert b"cnumpy.core.multiarray\n_reconstruct" in raw and b"image_data" in raw
  (tmp_path / "mini-imagenet-cache-test.pkl").write_bytes(raw)
  data = _load(tmp_path / "mini-imagenet-cache-test.pkl", "test", tmp_path / "cache")
  assert data.class_names == expected["test"][1]
  np.testing.assert_array_equal(data.images, expected["test"][0])


def test_csv_layout_wins_over_pickles_in_the_same_folder(tmp_path, csv_root, pkl_root):
  root = tmp_path / "both"
  shutil.copytree(csv_root, root)
  shutil.copy(pkl_root[0] / "mini-imagenet-cache-test.pkl", root)
  np.testing.assert_array_equal(_load(root, "test", tmp_path / "c").images, _reference(csv_root, "test")[0])


def test_real_counts_are_the_defaults(tmp_path, csv_root):
  assert dict(mi.NUM_CLASSES) == {"train": 64, "val": 16, "test": 20} and mi.NUM_IMAGES == 600
  with pytest.raises(ValueError, match="4 classes in the train split, expected 64"):
    mi.load_mini_imagenet(csv_root, "train", tmp_path / "c")
  data = mi.load_mini_imagenet(csv_root, "train", tmp_path / "c", expected_classes=None, expected_images=None)
  assert data.images.shape[:2] == (4, 3)


# ----------------------------------------------------------------------------------------------------
# Cache.


def test_cache_is_reused_keyed_and_rebuilt(tmp_path, csv_root, monkeypatch):
  root = tmp_path / "copy"
  shutil.copytree(csv_root, root)
  cache = tmp_path / "cache"
  first = _load(root, "train", cache)
  (cached,) = cache.glob("*.npz")

  def no_decoding(*a, **k):
    raise AssertionError("decoded although cached")

  with monkeypatch.context() as m:
    m.setattr(mi, "_decode_jpeg", no_decoding)
    again = _load(root, "train", cache)
  np.testing.assert_array_equal(again.images, first.images)
  assert again.class_names == first.class_names

  # Cached counts are checked too.
  with pytest.raises(ValueError, match=r"\(cache .*\): 4 classes in the train split, expected 5"):
    _load(root, "train", cache, expected_classes=5)

  # The key follows the size and the files read.
  _load(root, "train", cache, image_size=32)
  assert len(list(cache.glob("*.npz"))) == 2
  img = root / "images" / (root / "train.csv").read_text().splitlines()[1].split(",")[0]
  st = img.stat()
  os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  _load(root, "train", cache)
  assert len(list(cache.glob("*.npz"))) == 3

  # Garbage, truncation and tampering are detected and rebuilt.
  good = cached.read_bytes()
  os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))  # back to the first key
  for bad in (b"garbage", good[: len(good) // 2]):
    cached.write_bytes(bad)
    with pytest.warns(RuntimeWarning, match="mini-ImageNet cache is corrupt or stale"):
      np.testing.assert_array_equal(_load(root, "train", cache).images, first.images)
    assert cached.read_bytes() == good
  with np.load(cached) as z:
    arrays = dict(z)
  arrays["images"] = arrays["images"].copy()
  arrays["images"][0, 0, 0, 0, 0] ^= 1
  np.savez(cached, **arrays)
  with pytest.warns(RuntimeWarning, match="corrupt or stale"):
    np.testing.assert_array_equal(_load(root, "train", cache).images, first.images)


def test_pkl_cache_is_reused(tmp_path, pkl_root, monkeypatch):
  root, expected = pkl_root
  cache = tmp_path / "cache"
  _load(root, "test", cache)

  def no_unpickling(*a, **k):
    raise AssertionError("unpickled although cached")

  monkeypatch.setattr(mi, "load_pickle", no_unpickling)
  data = _load(root, "test", cache)
  np.testing.assert_array_equal(data.images, expected["test"][0])


@pytest.mark.parametrize("crash_in", ["savez", "replace"])
def test_interrupted_cache_write_leaves_nothing(tmp_path, csv_root, monkeypatch, crash_in):
  cache = tmp_path / "cache"
  with helpers.crashing_cache_write(crash_in), pytest.raises(helpers.CacheWriteCrash):
    _load(csv_root, "test", cache)
  assert _cache_files(cache) == []
  _load(csv_root, "test", cache)
  assert [Path(p).suffix for p in _cache_files(cache)] == [".npz"]


def test_interrupted_decode_leaves_nothing(tmp_path, csv_root, monkeypatch):
  calls = []

  def interrupt(path, size):
    calls.append(path)
    if len(calls) == 3:
      raise KeyboardInterrupt()
    return np.zeros((size, size, 3), np.uint8)

  monkeypatch.setattr(mi, "_decode_jpeg", interrupt)
  with pytest.raises(KeyboardInterrupt):
    _load(csv_root, "train", tmp_path / "cache", num_workers=1)
  assert _cache_files(tmp_path / "cache") == []


# ----------------------------------------------------------------------------------------------------
# Errors: one line, naming the file and the problem; nothing cached.


def _expect_error(exc, match, path, split, cache_dir, **kw):
  with pytest.raises(exc, match=match) as e:
    _load(path, split, cache_dir, **kw)
  assert "\n" not in str(e.value)
  assert _cache_files(cache_dir) == []
  return e.value


def test_missing_sources_and_wrong_layouts(tmp_path, csv_root, pkl_root):
  cache = tmp_path / "cache"
  _expect_error(FileNotFoundError, "nowhere: no such file or folder", tmp_path / "nowhere", "train", cache)
  (tmp_path / "empty").mkdir()
  _expect_error(FileNotFoundError, r"empty: no mini-ImageNet train split found", tmp_path / "empty",
                "train", cache)
  only_csv = tmp_path / "only_csv"
  only_csv.mkdir()
  shutil.copy(csv_root / "train.csv", only_csv)
  _expect_error(FileNotFoundError, "only_csv: found train.csv but no images/ folder", only_csv, "train", cache)
  only_images = tmp_path / "only_images"
  shutil.copytree(csv_root / "images", only_images / "images")
  _expect_error(FileNotFoundError, "only_images: found images/ but no val.csv", only_images, "val", cache)
  (tmp_path / "x.npy").write_bytes(b"")
  _expect_error(ValueError, r"x.npy: not a recognised mini-ImageNet source", tmp_path / "x.npy", "train", cache)
  _expect_error(ValueError, r"mini-imagenet-cache-train.pkl: holds the 'train' split, not 'test'",
                pkl_root[0] / "mini-imagenet-cache-train.pkl", "test", cache)
  with pytest.raises(ValueError, match="unknown mini-ImageNet split 'dev'"):
    _load(csv_root, "dev", cache)
  with pytest.raises(ValueError, match="image_size must be a positive int"):
    _load(csv_root, "train", cache, image_size=0)


def _csv_copy(tmp_path, csv_root, name="bad") -> Path:
  root = tmp_path / name
  shutil.copytree(csv_root, root)
  return root


def test_csv_errors(tmp_path, csv_root):
  cache = tmp_path / "cache"
  root = _csv_copy(tmp_path, csv_root)
  rows = [tuple(l.split(",")) for l in (root / "train.csv").read_text().splitlines()[1:]]

  _write_csv(root / "train.csv", rows, header="file,class")
  _expect_error(ValueError, r"train.csv: wrong layout: expected the header 'filename,label', got 'file,class'",
                root, "train", cache)
  (root / "train.csv").write_text("")
  _expect_error(ValueError, r"train.csv: wrong layout: expected the header", root, "train", cache)
  (root / "train.csv").write_text("filename,label\na.jpg,n1,extra\n")
  _expect_error(ValueError, r"train.csv: wrong layout at row 2", root, "train", cache)
  _write_csv(root / "train.csv", rows + rows[:1])
  _expect_error(ValueError, r"train.csv: \S+ is listed twice", root, "train", cache)

  # A class too few (the "63 classes in train.csv" case), and a class with an image too few.
  dropped = [r for r in rows if r[1] != rows[0][1]]
  _write_csv(root / "train.csv", dropped)
  _expect_error(ValueError, r"train.csv: 3 classes in the train split, expected 4", root, "train", cache)
  _write_csv(root / "train.csv", rows[1:])
  _expect_error(ValueError, rf"train.csv: class {rows[0][1]} has 2 images, expected 3", root, "train", cache)
  _expect_error(ValueError, r"train.csv: classes have different numbers of images \(2..3\)", root, "train",
                cache, expected_images=None)

  _write_csv(root / "train.csv", rows)
  (root / "images" / rows[4][0]).unlink()
  _expect_error(FileNotFoundError, rf"train.csv: lists images/{rows[4][0]}, which is missing", root, "train",
                cache)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_undecodable_jpeg(tmp_path, csv_root, damage):
  root = _csv_copy(tmp_path, csv_root)
  name = (root / "val.csv").read_text().splitlines()[2].split(",")[0]
  jpg = root / "images" / name
  good = jpg.read_bytes()
  jpg.write_bytes({"garbage": b"not a jpeg at all", "truncated": good[: len(good) // 3], "empty": b""}[damage])
  for workers in (1, 4):
    _expect_error(ValueError, rf"images/{name}: not a decodable image: \w+", root, "val", tmp_path / "cache",
                  num_workers=workers)


def test_pickle_errors(tmp_path, pkl_root):
  cache = tmp_path / "cache"
  src = pkl_root[0] / "mini-imagenet-cache-test.pkl"
  value = pickle.loads(src.read_bytes())
  bad = tmp_path / "mini-imagenet-cache-test.pkl"

  def write(v):
    bad.write_bytes(pickle.dumps(v, protocol=4))

  bad.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
  _expect_error(ValueError, r"mini-imagenet-cache-test.pkl: corrupt or truncated pickle: \w+", bad, "test", cache)
  bad.write_bytes(b"\x00garbage")
  _expect_error(ValueError, r"corrupt or truncated pickle", bad, "test", cache)
  write([1, 2])
  _expect_error(ValueError, r"test.pkl: wrong layout: the pickle holds a list, expected a dict", bad, "test", cache)
  write({"images": value["image_data"]})
  _expect_error(ValueError, r"test.pkl: wrong layout: no 'image_data' key", bad, "test", cache)
  write(dict(value, image_data=value["image_data"].astype(np.float32)))
  _expect_error(ValueError, r"test.pkl: wrong layout: image_data is float32 \[6, 84, 84, 3\], expected uint8",
                bad, "test", cache)
  write(dict(value, image_data=np.ascontiguousarray(value["image_data"][:, :80, :80])))
  _expect_error(ValueError, r"test.pkl: images are 80x80, expected 84x84", bad, "test", cache)
  _expect_error(ValueError, r"test.pkl: images are 84x84, expected 32x32", src, "test", cache, image_size=32)
  first = sorted(value["class_dict"])[0]
  write(dict(value, class_dict=dict(value["class_dict"], **{first: [0, 1, 99]})))
  _expect_error(ValueError, rf"test.pkl: class_dict\['{first}'\] has an index outside \[0, 6\)", bad, "test",
                cache)
  write(dict(value, class_dict=dict(value["class_dict"], **{first: "abc"})))
  _expect_error(ValueError, rf"class_dict\['{first}'\] is not a list of image indices", bad, "test", cache)
  other = sorted(value["class_dict"])[1]
  write(dict(value, class_dict=dict(value["class_dict"], **{first: value["class_dict"][other]})))
  _expect_error(ValueError, r"test.pkl: class_dict lists some image index more than once", bad, "test", cache)
  write(dict(value, class_dict={first: value["class_dict"][first]}))
  _expect_error(ValueError, r"test.pkl: 1 classes in the test split, expected 2", bad, "test", cache)

  class Evil:
    def __reduce__(self):
      return (os.system, ("echo pwned",))

  write(dict(value, extra=Evil()))
  _expect_error(ValueError, r"test.pkl: refusing to unpickle: it asks for \S*system", bad, "test", cache)

