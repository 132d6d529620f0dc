"""Tests for gajax.data.tiered_imagenet and gajax.tasks.host_pipeline: Ren et al.'s layout written for
real (pickled PNG lists, label dicts), at toy size; the memory-mapped cache; the host sampler.

Toy set, 16x16 images (the loader's image size and counts are parameters): classes of unequal size,
interleaved in the pickle, in 2 / 1 / 2 superclasses.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from gajax.data import tiered_imagenet as ti
from gajax.data.base import RaggedClassImages
from gajax.tasks import host_pipeline as hp

SIZE = 16
# split -> per class (label_specific, label_general, image count); labels deliberately not 0..C-1.
LAYOUT = {
    "train": [(7, 3, 6), (2, 1, 4), (5, 3, 7), (9, 1, 5)],
    "val": [(11, 4, 4), (12, 4, 5)],
    "test": [(20, 6, 5), (21, 8, 6), (22, 6, 4)],
}


def _counts(split):
  classes = LAYOUT[split]
  return dict(expected_classes=len(classes), expected_superclasses=len({g for _, g, _ in classes}),
              expected_images=sum(n for _, _, n in classes))


def _png(rng: np.random.Generator, mode: str = "RGB", size: int = SIZE) -> tuple:
  """``(PNG bytes, the RGB pixels the reader must return)``, the latter from the generated array:
  grey repeated over the three channels, RGBA without its alpha (as cv2.imdecode(..., 1) gives too)."""
  pix = rng.integers(0, 256, (size, size, 4), dtype=np.uint8)
  im, rgb = {"RGB": (lambda: Image.fromarray(pix[..., :3]), pix[..., :3]),
             "L": (lambda: Image.fromarray(pix[..., 0]), np.repeat(pix[..., :1], 3, -1)),
             "RGBA": (lambda: Image.fromarray(pix, "RGBA"), pix[..., :3])}[mode]
  buf = io.BytesIO()
  im().save(buf, format="PNG")
  return buf.getvalue(), rgb


def _write_split(root: Path, split: str, rng: np.random.Generator, *, py2: bool = False,
                 names: bool = True, mutate=None):
  """Writes ``<split>_images_png.pkl`` / ``<split>_labels.pkl``; returns the expected RaggedClassImages.

  ``py2``: keys and names as ``bytes``, as a Python 2 pickle read with ``encoding="bytes"`` gives them.
  """
  specific, general = [], []
  for label, sup, n in LAYOUT[split]:
    specific += [label] * n
    general += [sup] * n
  perm = rng.permutation(len(specific))  # interleave the classes in the pickle
  specific, general = np.asarray(specific)[perm], np.asarray(general)[perm]
  pngs, pixels = [], []
  for i in range(len(specific)):
    mode = "L" if i == 1 else ("RGBA" if i == 2 else "RGB")
    data, rgb = _png(rng, mode)
    # cv2.imencode returns a uint8 array [L, 1]; the release holds those; accept bytes too.
    pngs.append(np.frombuffer(data, np.uint8).reshape(-1, 1) if i % 2 else data)
    pixels.append(rgb)
  labels = {"label_specific": specific, "label_general": general}
  if names:
    labels["label_specific_str"] = [f"n{k:08d}" for k in range(30)]
    labels["label_general_str"] = [f"group{k}" for k in range(10)]
  if mutate is not None:
    pngs, labels = mutate(pngs, labels)
  if py2:
    labels = {k.encode(): ([n.encode() for n in v] if k.endswith("_str") else v) for k, v in labels.items()}
  with open(root / f"{split}_images_png.pkl", "wb") as f:
    pickle.dump(pngs, f, protocol=2)
  with open(root / f"{split}_labels.pkl", "wb") as f:
    pickle.dump(labels, f, protocol=2)
  return None if mutate is not None else _reference(pixels, specific, general, names)


def _reference(pixels, specific, general, names):
  """The documented result, written out from the generated pixels: classes by label, pickle order."""
  classes = sorted(set(int(c) for c in specific))
  images, offsets, supers_of = [], [0], []
  for c in classes:
    rows = [i for i in range(len(specific)) if specific[i] == c]
    images += [pixels[i] for i in rows]
    offsets.append(offsets[-1] + len(rows))
    supers_of.append(int(general[rows[0]]))
  supers = sorted(set(supers_of))
  class_names = tuple(f"n{c:08d}" if names else f"class_{c}" for c in classes)
  super_names = tuple(f"group{g}" if names else f"superclass_{g}" for g in supers)
  return RaggedClassImages(np.stack(images), np.asarray(offsets), class_names,
                           np.asarray([supers.index(g) for g in supers_of]), super_names)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiered")
  rng = np.random.default_rng(0)
  expected = {s: _write_split(root, s, rng, py2=(s == "val"), names=(s != "test")) for s in LAYOUT}
  return root, expected


def _load(root, split, cache_dir, **kw):
  return ti.load_tiered_imagenet(root, split, cache_dir, SIZE, **{**_counts(split), **kw})


def _assert_equal(got: RaggedClassImages, want: RaggedClassImages):
  np.testing.assert_array_equal(got.images, want.images)
  np.testing.assert_array_equal(got.offsets, want.offsets)
  np.testing.assert_array_equal(got.superclass, want.superclass)
  assert got.class_names == want.class_names and got.superclass_names == want.superclass_names


def _files(d: Path) -> list:
  return sorted(p.name for p in d.iterdir()) if d.exists() else []


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_round_trip_bit_for_bit_then_from_the_memory_mapped_cache(release, tmp_path, split):
  root, expected = release
  first = _load(root, split, tmp_path)
  _assert_equal(first, expected[split])
  assert isinstance(first.images, np.memmap) and not first.images.flags.writeable
  assert [p.endswith((".npy", ".npz")) for p in _files(tmp_path)] == [True, True]
  with pytest.MonkeyPatch.context() as mp:  # the second load must not decode
    mp.setattr(ti, "_decode_into", lambda *a, **k: pytest.fail("decoded again"))
    second = _load(root, split, tmp_path)
  _assert_equal(second, expected[split])
  np.testing.assert_array_equal(second.counts, np.diff(expected[split].offsets))


def test_corrupt_cached_images_are_detected_and_rebuilt(release, tmp_path):
  root, expected = release
  _load(root, "train", tmp_path)
  (npy,) = [p for p in tmp_path.iterdir() if p.suffix == ".npy"]
  raw = bytearray(npy.read_bytes())
  raw[-5] ^= 0xFF  # one pixel: same size, so only the sha256 catches it
  npy.write_bytes(bytes(raw))
  with pytest.warns(RuntimeWarning, match="sha256; rebuilding"):
    again = _load(root, "train", tmp_path)
  _assert_equal(again, expected["train"])


def _bad_copy(tmp_path, mutate=None, split="train"):
  root = tmp_path / "src"
  root.mkdir()
  _write_split(root, split, np.random.default_rng(3), mutate=mutate)
  return root


def _wrong_size(pngs, labels):
  pngs[3] = _png(np.random.default_rng(1), size=SIZE + 4)[0]
  return pngs, labels


def _wrong_type(pngs, labels):
  pngs[2] = [1, 2, 3]
  return pngs, labels


def _few_names(pngs, labels):
  labels["label_specific_str"] = labels["label_specific_str"][:5]
  return pngs, labels


def _not_a_list(pngs, labels):
  return {"images": pngs}, labels


def _garbage(pngs, labels):
  pngs[4] = b"\x89PNG\r\n\x1a\n" + b"not really" * 20
  return pngs, labels


def _two_supers(pngs, labels):
  labels["label_general"] = labels["label_general"].copy()
  first_of_2 = int(np.flatnonzero(labels["label_specific"] == 2)[0])
  labels["label_general"][first_of_2] = 3
  return pngs, labels


def _no_general(pngs, labels):
  del labels["label_general"]
  return pngs, labels


def _short_list(pngs, labels):
  return pngs[:-1], labels


@pytest.mark.parametrize("mutate, kw, pattern", [
    (_wrong_size, {}, r"train_images_png\.pkl: image 3 is 20x20, expected 16x16"),
    (_garbage, {}, r"train_images_png\.pkl: image 4 is not a decodable PNG"),
    (_wrong_type, {}, r"train_images_png\.pkl: image 2 is a list, expected PNG bytes or a uint8 array"),
    (_few_names, {}, r"train_labels\.pkl: wrong layout: 'label_specific_str' does not name every label"),
    (_not_a_list, {}, r"train_images_png\.pkl: wrong layout: holds a dict, expected a list"),
    (_two_supers, {}, r"train_labels\.pkl: class 2 has images in more than one label_general"),
    (_no_general, {}, r"train_labels\.pkl: wrong layout: no 'label_general' key"),
    (_short_list, {}, r"train_images_png\.pkl: 21 images, but train_labels\.pkl labels 22"),
    (None, {"expected_classes": 5}, r"train_labels\.pkl: 4 classes in the train split, expected 5"),
    (None, {"expected_images": 30}, r"train_labels\.pkl: 22 images in the train split, expected 30"),
    (None, {"expected_superclasses": 20}, r"2 superclasses \(label_general\) in the train split, expected 20"),
])
def test_bad_input_one_line_and_no_cache_left(tmp_path, mutate, kw, pattern):
  root, cache = _bad_copy(tmp_path, mutate), tmp_path / "cache"
  with pytest.raises(ValueError, match=pattern) as info:
    _load(root, "train", cache, **kw)
  assert "\n" not in str(info.value)
  assert _files(cache) == []


def test_truncated_pickle_and_missing_files(tmp_path):
  root, cache = _bad_copy(tmp_path), tmp_path / "cache"
  pkl = root / "train_images_png.pkl"
  pkl.write_bytes(pkl.read_bytes()[:-100])
  with pytest.raises(ValueError, match=r"train_images_png\.pkl: corrupt or truncated pickle"):
    _load(root, "train", cache)
  with pytest.raises(FileNotFoundError, match=r"no val_images_png\.pkl"):
    _load(root, "val", cache)
  with pytest.raises(FileNotFoundError, match="no such folder"):
    _load(tmp_path / "nowhere", "train", cache)
  with pytest.raises(ValueError, match="not a folder"):
    _load(pkl, "train", cache)
  (root / "test_images_png.pkl").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match=r"no test_labels\.pkl"):
    _load(root, "test", cache)
  with pytest.raises(ValueError, match="an expected count mapping has no 'train' entry"):
    ti.load_tiered_imagenet(root, "train", cache, SIZE, expected_classes={"val": 2})
  assert _files(cache) == []


def test_truncated_png_is_an_error_even_with_pillows_load_truncated_images(tmp_path, monkeypatch):
  from PIL import ImageFile  # pylint: disable=import-outside-toplevel

  def cut(pngs, labels):
    pngs[5] = pngs[5][: len(pngs[5]) // 2]
    return pngs, labels

  root, cache = _bad_copy(tmp_path, cut), tmp_path / "cache"
  monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
  with pytest.raises(ValueError, match=r"image 5 is not a decodable PNG"):
    _load(root, "train", cache)
  assert ImageFile.LOAD_TRUNCATED_IMAGES is True and _files(cache) == []


def test_cache_checks_on_reload_and_an_unwritable_cache(release, tmp_path):
  root, expected = release
  _load(root, "test", tmp_path)
  (npy,) = [p for p in tmp_path.iterdir() if p.suffix == ".npy"]
  with pytest.raises(ValueError, match=r"\(cache .*\): 3 classes in the test split, expected 4"):
    _load(root, "test", tmp_path, expected_classes=4)
  npy.write_bytes(npy.read_bytes()[:-SIZE * SIZE * 3])  # one image short: wrong shape and size
  with pytest.warns(RuntimeWarning, match="tiered-ImageNet cache .*rebuilding"):
    again = _load(root, "test", tmp_path, verify=False)
  _assert_equal(again, expected["test"])
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(OSError, match="a_file.*cannot write the cache there.*GAJAX_CACHE_DIR"):
    _load(root, "val", blocker / "cache")


def test_interrupted_decode_leaves_nothing(tmp_path, monkeypatch):
  root, cache = _bad_copy(tmp_path), tmp_path / "cache"
  real, calls = ti._decode_png, []

  def flaky(item, size):
    calls.append(1)
    if len(calls) == 5:
      raise KeyboardInterrupt
    return real(item, size)

  monkeypatch.setattr(ti, "_decode_png", flaky)
  with pytest.raises(KeyboardInterrupt):
    _load(root, "train", cache, num_workers=1)
  assert _files(cache) == []


# ----------------------------------------------------------------------------------------------------
# The host sampler and the prefetcher.


def _ragged(counts, size=2):
  """Every image's pixels hold its own row index (mod 256) and its class, so draws can be traced back."""
  offsets = np.concatenate([[0], np.cumsum(counts)])
  rows = np.arange(offsets[-1])
  cls = np.repeat(np.arange(len(counts)), counts)
  images = np.zeros((rows.size, size, size, 3), np.uint8)
  images[..., 0], images[..., 1] = (rows % 256)[:, None, None], cls[:, None, None]
  images[..., 2] = (rows // 256)[:, None, None]
  return RaggedClassImages(images, offsets, tuple(f"c{i}" for i in range(len(counts))),
                           np.zeros(len(counts), np.int64), ("all",))


def test_draws_are_valid_tasks_uniform_and_seeded():
  data = _ragged([3, 9, 4, 6, 5])
  batches = [hp.draw_meta_batch(data, 0, s, 8, 3, 1, 2) for s in range(300)]
  x = np.stack(batches)  # [steps, T, ways, n, H, W, 3]
  rows = x[..., 0, 0, 0].astype(int) + 256 * x[..., 0, 0, 2].astype(int)
  cls = x[..., 0, 0, 1].astype(int)
  # Each class row holds one class, ways distinct classes per task, distinct images per class row.
  assert (cls == cls[..., :1]).all()
  per_task = cls[..., 0]
  assert all(len(set(t)) == 3 for t in per_task.reshape(-1, 3))
  assert all(len(set(r)) == 3 for r in rows.reshape(-1, 3))
  np.testing.assert_array_equal(np.asarray(data.offsets)[cls] <= rows, True)
  np.testing.assert_array_equal(rows < np.asarray(data.offsets)[cls + 1], True)
  # Uniform over classes (each in 3/5 of the tasks) and over a class's images (6,000+ draws: 5 sigma).
  freq = np.bincount(per_task.reshape(-1), minlength=5) / per_task.reshape(-1, 3).shape[0]
  np.testing.assert_allclose(freq, 0.6, atol=5 * np.sqrt(0.6 * 0.4 / 2400))
  big = rows[cls == 1] - 3
  np.testing.assert_allclose(np.bincount(big, minlength=9) / big.size, 1 / 9,
                             atol=5 * np.sqrt(1 / 9 * 8 / 9 / big.size))
  # (seed, step) alone decides a batch; another seed or step gives another.
  np.testing.assert_array_equal(hp.draw_meta_batch(data, 0, 17, 8, 3, 1, 2), batches[17])
  assert not np.array_equal(hp.draw_meta_batch(data, 1, 17, 8, 3, 1, 2), batches[17])


def test_prefetcher_order_errors_and_split(tmp_path):
  data = _ragged([4, 4, 5])
  with hp.host_batches(data, 3, 2, 3, 1, 1, range(5, 12), depth=3, workers=3) as it:
    got = [np.asarray(b) for b in it]
  want = [hp.draw_meta_batch(data, 3, s, 2, 3, 1, 1) for s in range(5, 12)]
  assert len(got) == 7 and all(np.array_equal(g, w) for g, w in zip(got, want))

  import threading  # pylint: disable=import-outside-toplevel
  item2_failed = threading.Event()

  def produce(i):
    if i == 2:
      item2_failed.set()
      raise OSError("disk gone")
    if i == 1:
      item2_failed.wait(10)  # item 2 fails before item 1 is ready: its error must still wait its turn
    return i
  it = hp.Prefetcher(produce, range(5), depth=3, workers=3)
  assert [next(it), next(it)] == [0, 1]
  with pytest.raises(OSError, match="disk gone"):
    next(it)
  it = hp.Prefetcher(lambda i: i, range(100), depth=2, workers=1)
  assert next(it) == 0
  it.close()
  with pytest.raises(StopIteration):
    next(it)

  support, query = jax.vmap(lambda b: hp.split_support_query(b, 1))(jnp.asarray(want[0]))
  assert support["x"].shape == (2, 3, 2, 2, 3) and query["x"].shape == (2, 3, 2, 2, 3)
  np.testing.assert_allclose(np.asarray(support["x"]), want[0][:, :, 0] / 255.0, rtol=1e-7)
  np.testing.assert_array_equal(np.asarray(query["y"]), np.tile(np.arange(3), (2, 1)))
  with pytest.raises(ValueError, match="shots \\+ queries = 6 exceeds the 4 images of class 'c0'"):
    hp.host_batches(data, 0, 2, 3, 1, 5, range(1))


# ----------------------------------------------------------------------------------------------------
# End to end: the config, the one training loop, resume.


@pytest.fixture(scope="module")
def learnable(tmp_path_factory):
  """A tiered layout whose classes each carry a colour pattern (plus noise): learnable, 16x16."""
  root = tmp_path_factory.mktemp("tiered_signal")
  rng = np.random.default_rng(5)
  for split, classes in (("train", 10), ("test", 6)):
    counts = rng.integers(12, 20, classes)
    patterns = rng.integers(40, 216, (classes, SIZE, SIZE, 3))
    specific = rng.permutation(np.repeat(np.arange(classes), counts))
    pngs = []
    for c in specific:
      pix = np.clip(patterns[c] + rng.integers(-40, 41, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
      buf = io.BytesIO()
      Image.fromarray(pix).save(buf, format="PNG")
      pngs.append(buf.getvalue())
    with open(root / f"{split}_images_png.pkl", "wb") as f:
      pickle.dump(pngs, f, protocol=4)
    with open(root / f"{split}_labels.pkl", "wb") as f:
      pickle.dump({"label_specific": specific, "label_general": specific // 3}, f, protocol=4)
  return root


def _config(root, **kw):
  from gajax.config import TrainConfig  # pylint: disable=import-outside-toplevel
  base = dict(task="tiered_imagenet", data_dir=str(root), ways=3, shots=1, queries=3,
              meta_batch_size=4, inner_steps=1, inner_lr=0.1, conv_filters=8, conv_downsample="pool",
              aggregator="mean", outer_lr=3e-3, num_iterations=40, eval_tasks=40, log_every=20)
  return TrainConfig(**{**base, **kw}).validate()


@pytest.fixture
def small_loader(tmp_path, monkeypatch):
  from gajax.tasks import images as image_tasks  # pylint: disable=import-outside-toplevel
  real = image_tasks.make_task
  monkeypatch.setattr(image_tasks, "make_task", lambda *a, **kw: real(
      *a, **kw, cache_dir=tmp_path / "cache",
      loader_kwargs={"image_size": SIZE, "expected_classes": None, "expected_superclasses": None,
                     "expected_images": None}))


def test_host_fed_run_learns_the_class_signal_and_resumes_bit_exactly(learnable, tmp_path, small_loader):
  import json  # pylint: disable=import-outside-toplevel
  from gajax.train import run_seeds, train_and_evaluate  # pylint: disable=import-outside-toplevel
  lines = []
  whole = train_and_evaluate(_config(learnable), str(tmp_path / "a"),
                             print_fn=lambda *a, **k: lines.append(a[0]))
  # Chance is 1/3; the colour patterns make the unseen test classes easy after adaptation.
  assert whole["mean"] > 0.65, whole
  assert 0 <= whole["input_wait_seconds_this_call"] <= whole["train_seconds_this_call"], whole
  assert sum(line.startswith("step") for line in lines) == 2  # every log_every steps, not every step
  quiet = dict(print_fn=lambda *a, **k: None)
  train_and_evaluate(_config(learnable, num_iterations=20), str(tmp_path / "b"), checkpoint_every=20,
                     **quiet)
  resumed = train_and_evaluate(_config(learnable), str(tmp_path / "b"), **quiet)
  assert resumed["steps"] == 40 and resumed["mean"] == whole["mean"]

  def losses(d):
    rows = [json.loads(line) for line in open(tmp_path / d / "metrics.jsonl")]
    return [r["query_loss"] for r in rows if "query_loss" in r]
  assert len(losses("a")) == 40 and losses("a") == losses("b")
  with pytest.raises(ValueError, match="draws its tasks on the host"):
    run_seeds(_config(learnable), [0, 1])
