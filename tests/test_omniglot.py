"""Tests for gajax.data.omniglot (sources, verification, cache, download, splits) and gajax.tasks.omniglot
(task sampling).

Synthetic sets are tiny (10 characters x 20 drawings); one test reads the real archive.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import io
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from PIL import Image

from gajax.data import omniglot as omniglot_data
from gajax.tasks import omniglot
import helpers


# Alphabet -> number of characters. Names are listed out of order on purpose.
BACKGROUND = {"Beta_(b)": 3, "Alpha": 3}
EVALUATION = {"Gamma": 2, "Delta": 2}
COUNTS = (6, 4)
DRAWINGS = 20


def _character_names():
  """The documented order: background then evaluation, alphabets sorted, characters sorted."""
  out = []
  for subset, alphabets in (("images_background", BACKGROUND), ("images_evaluation", EVALUATION)):
    for alphabet in sorted(alphabets):
      for j in range(alphabets[alphabet]):
        out.append((subset, alphabet, f"character{j + 1:02d}"))
  return out


def _png_bytes(c: int, d: int, rng: np.random.Generator) -> bytes:
  """A 1-bit 105x105 drawing: paper = 1, ink = 0; a top-left block whose size encodes (c, d) + noise."""
  paper = np.ones((105, 105), dtype=bool)
  paper[: 5 + 4 * d, : 10 + 7 * c] = False
  paper[rng.random((105, 105)) < 0.01] = False
  buf = io.BytesIO()
  Image.fromarray(paper).convert("1").save(buf, format="PNG")
  return buf.getvalue()


@pytest.fixture(scope="module")
def files():
  """``{relative path: png bytes}`` in the official layout, and the ordered list of PNG paths per character."""
  rng = np.random.default_rng(0)
  out, per_char = {}, []
  for c, (subset, alphabet, character) in enumerate(_character_names()):
    paths = []
    for d in range(DRAWINGS):
      rel = f"{subset}/{alphabet}/{character}/{100 + c:04d}_{d + 1:02d}.png"
      out[rel] = _png_bytes(c, d, rng)
      paths.append(rel)
    per_char.append(paths)
  return out, per_char


def _reference(png: bytes) -> np.ndarray:
  """The documented pipeline, written out: grey, LANCZOS to 28x28, invert so that ink = 255."""
  im = Image.open(io.BytesIO(png)).convert("L").resize((28, 28), Image.Resampling.LANCZOS)
  return 255 - np.asarray(im)


def _write_tar(path: Path, files: dict, prefix: str = "omniglot/", sums: bool = False) -> Path:
  names = sorted(files, reverse=True)  # archive order must not matter
  with tarfile.open(path, "w:gz") as tf:
    def add(name, data):
      info = tarfile.TarInfo(prefix + name)
      info.size = len(data)
      tf.addfile(info, io.BytesIO(data))
    add("LICENSE", b"MIT\n")
    if sums:
      add("SHA256SUMS", "".join(f"{hashlib.sha256(files[n]).hexdigest()}  {n}\n"
                                for n in sorted(files)).encode())
    for name in names:
      add(name, files[name])
  return path


def _write_zips(folder: Path, files: dict, compression=zipfile.ZIP_DEFLATED) -> Path:
  folder.mkdir(parents=True, exist_ok=True)
  for subset in omniglot_data.SUBSETS:
    with zipfile.ZipFile(folder / f"{subset}.zip", "w", compression) as zf:
      zf.writestr(f"{subset}/", b"")
      for name in sorted(files):
        if name.startswith(subset + "/"):
          zf.writestr(name, files[name])
  return folder


def _write_folder(root: Path, files: dict) -> Path:
  for name, data in files.items():
    p = root / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
  return root


def _load(path, cache_dir, **kw):
  return omniglot_data.load_omniglot(path, cache_dir, expected_characters=COUNTS, **kw)


# ----------------------------------------------------------------------------------------------------
# Module boundary.


def test_data_module_does_not_import_jax():
  # In a fresh interpreter, so that this test process's own jax import cannot hide one. ``gajax`` is
  # stubbed as a bare namespace first: its __init__ re-exports the JAX API and would import jax itself;
  # what is checked is what gajax.data.omniglot (and gajax.data) pull in.
  code = (
      "import sys, types\n"
      f"pkg = types.ModuleType('gajax'); pkg.__path__ = [{str(Path(omniglot_data.__file__).parents[1])!r}]\n"
      "sys.modules['gajax'] = pkg\n"
      "import gajax.data.omniglot\n"
      "print(sorted(m for m in sys.modules if m == 'jax' or m.startswith(('jax.', 'jaxlib'))))\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout


# ----------------------------------------------------------------------------------------------------
# Sources, order, pixel convention.


def test_all_source_forms_give_the_same_ordered_data(tmp_path, files):
  pngs, per_char = files
  (tmp_path / "a").mkdir()
  tar = _write_tar(tmp_path / "a" / "omniglot.tar.gz", pngs)
  forms = {
      "tarball": tar,
      "folder with tarball": tmp_path / "a",
      "two zips": _write_zips(tmp_path / "z", pngs),
      "unpacked omniglot/": _write_folder(tmp_path / "u1" / "omniglot", pngs).parent,
      "unpacked flat": _write_folder(tmp_path / "u2", pngs),
  }
  names = _character_names()
  want = np.stack([np.stack([_reference(pngs[p]) for p in paths]) for paths in per_char])
  for i, (form, path) in enumerate(forms.items()):
    data = _load(path, tmp_path / f"cache{i}")
    assert data.images.dtype == np.uint8 and data.images.shape == (10, 20, 28, 28), form
    assert data.characters == [f"{a}/{c}" for _, a, c in names], form
    assert data.alphabets == [a for _, a, _ in names], form
    np.testing.assert_array_equal(data.is_background, [True] * 6 + [False] * 4, err_msg=form)
    np.testing.assert_array_equal(data.images, want, err_msg=form)


def test_ink_is_255_and_paper_is_0(tmp_path, files):
  pngs, _ = files
  data = _load(_write_tar(tmp_path / "o.tar.gz", pngs), tmp_path / "cache")
  img = data.images[9, 19]  # ink block rows [0, 81), cols [0, 73) of 105
  assert img[2, 2] == 255 and img[-2, -2] < 64
  for c in (0, 9):
    for d in (0, 19):
      ink = (5 + 4 * d) * (10 + 7 * c) / 105**2
      assert abs(data.images[c, d].mean() / 255 - ink) < 0.03  # + ~1% noise ink


@pytest.mark.parametrize("size", [14, 28, 64])
def test_batched_resize_is_bit_identical_to_pillow(size):
  rng = np.random.default_rng(size)
  raw = np.concatenate([rng.integers(0, 256, (8, 105, 105)), 255 * (rng.random((8, 105, 105)) < 0.9)])
  raw = raw.astype(np.uint8)
  want = np.stack([np.asarray(Image.fromarray(r).resize((size, size), Image.Resampling.LANCZOS)) for r in raw])
  np.testing.assert_array_equal(omniglot_data._resize_lanczos(raw, size), want)


def test_sha256sums_are_checked(tmp_path, files):
  pngs, _ = files
  assert _load(_write_tar(tmp_path / "ok.tar.gz", pngs, sums=True), tmp_path / "c1").images.shape[0] == 10
  bad = dict(pngs)
  name = sorted(bad)[3]
  bad[name] = _png_bytes(0, 0, np.random.default_rng(5))
  good_sums = {n: hashlib.sha256(pngs[n]).hexdigest() for n in pngs}
  path = tmp_path / "bad.tar.gz"
  with tarfile.open(path, "w:gz") as tf:
    for n, data in [("SHA256SUMS", "".join(f"{good_sums[n]}  {n}\n" for n in sorted(pngs)).encode())] + [
        (n, bad[n]) for n in sorted(bad)]:
      info = tarfile.TarInfo("omniglot/" + n)
      info.size = len(data)
      tf.addfile(info, io.BytesIO(data))
  with pytest.raises(ValueError, match="sha256 mismatch.*" + name.split("/")[-1]):
    _load(path, tmp_path / "c2")


# ----------------------------------------------------------------------------------------------------
# Clear errors on bad sources.


def test_missing_sources(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
    omniglot_data.load_omniglot(tmp_path / "nope", tmp_path / "c")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no Omniglot data found"):
    omniglot_data.load_omniglot(tmp_path / "empty", tmp_path / "c")
  (tmp_path / "one").mkdir()
  (tmp_path / "one" / "images_background.zip").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match="images_evaluation.zip"):
    omniglot_data.load_omniglot(tmp_path / "one", tmp_path / "c")


def test_no_path_uses_env_or_fails(tmp_path, files, monkeypatch):
  monkeypatch.delenv(omniglot_data.DATA_ENV, raising=False)
  with pytest.raises(FileNotFoundError, match="GAJAX_DATA_DIR"):
    omniglot_data.load_omniglot(None, tmp_path / "c")
  monkeypatch.setenv(omniglot_data.DATA_ENV, str(_write_zips(tmp_path / "z", files[0])))
  monkeypatch.setenv(omniglot_data.CACHE_ENV, str(tmp_path / "envcache"))
  assert omniglot_data.load_omniglot(expected_characters=COUNTS).images.shape == (10, 20, 28, 28)
  assert len(list((tmp_path / "envcache").glob("omniglot_28px_*.npz"))) == 1


def test_truncated_tarball(tmp_path, files):
  full = _write_tar(tmp_path / "full.tar.gz", files[0]).read_bytes()
  path = tmp_path / "cut.tar.gz"
  path.write_bytes(full[: len(full) // 2])
  with pytest.raises(ValueError, match=f"{path}: corrupt or truncated archive"):
    _load(path, tmp_path / "c")
  assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


def test_garbage_png(tmp_path, files):
  pngs = dict(files[0])
  name = sorted(pngs)[7]
  pngs[name] = b"this is not a png"
  path = _write_tar(tmp_path / "g.tar.gz", pngs)
  with pytest.raises(ValueError, match=f"{path}: bad PNG omniglot/{name}"):
    _load(path, tmp_path / "c")


def test_zip_bad_crc(tmp_path, files):
  pngs = files[0]
  folder = _write_zips(tmp_path / "z", pngs, compression=zipfile.ZIP_STORED)
  target = folder / "images_evaluation.zip"
  raw = bytearray(target.read_bytes())
  name = sorted(n for n in pngs if n.startswith("images_evaluation/"))[0]
  at = raw.find(pngs[name]) + len(pngs[name]) // 2
  raw[at] ^= 0xFF
  target.write_bytes(bytes(raw))
  with pytest.raises(ValueError, match=f"{target}: corrupt or truncated archive.*CRC"):
    _load(folder, tmp_path / "c")


def test_wrong_counts(tmp_path, files):
  pngs = dict(files[0])
  path = _write_tar(tmp_path / "o.tar.gz", pngs)
  with pytest.raises(ValueError, match="found 6 background \\+ 4 evaluation characters, expected 964 \\+ 659"):
    omniglot_data.load_omniglot(path, tmp_path / "c")  # default counts are the real ones
  del pngs[sorted(pngs)[0]]
  path = _write_tar(tmp_path / "short.tar.gz", pngs)
  with pytest.raises(ValueError, match="Alpha/character01 has 19 drawings, expected 20"):
    _load(path, tmp_path / "c")


def test_wrong_image_size(tmp_path, files):
  pngs = dict(files[0])
  buf = io.BytesIO()
  Image.new("1", (104, 105), 1).save(buf, format="PNG")
  pngs[sorted(pngs)[0]] = buf.getvalue()
  with pytest.raises(ValueError, match="bad PNG.*104x105"):
    _load(_write_folder(tmp_path / "f", pngs), tmp_path / "c")


# ----------------------------------------------------------------------------------------------------
# Cache.


def test_cache_hit_key_and_rebuild(tmp_path, files, monkeypatch):
  pngs, _ = files
  path = _write_tar(tmp_path / "o.tar.gz", pngs)
  cache = tmp_path / "cache"
  first = _load(path, cache)
  (cached,) = cache.glob("*.npz")
  assert cached.name.startswith("omniglot_28px_")

  def no_decoding(*a, **k):
    raise AssertionError("decoded although cached")

  with monkeypatch.context() as m:
    m.setattr(omniglot_data, "_decode_png", no_decoding)
    again = _load(path, cache)
  np.testing.assert_array_equal(again.images, first.images)
  assert again.characters == first.characters and again.alphabets == first.alphabets

  # The key depends on the size and on the source content.
  assert _load(path, cache, image_size=14).images.shape == (10, 20, 14, 14)
  other = dict(pngs)
  other[sorted(other)[0]] = _png_bytes(3, 3, np.random.default_rng(1))
  _load(_write_tar(tmp_path / "other.tar.gz", other), cache)
  assert len(list(cache.glob("*.npz"))) == 3

  # Garbage, truncation and tampering are all detected and rebuilt.
  good = cached.read_bytes()
  for bad in (b"garbage", good[: len(good) // 2]):
    cached.write_bytes(bad)
    with pytest.warns(RuntimeWarning, match="corrupt or stale"):
      np.testing.assert_array_equal(_load(path, cache).images, first.images)
    assert cached.read_bytes() == good
  with np.load(cached) as z:
    arrays = dict(z)
  arrays["images"] = arrays["images"].copy()
  arrays["images"][0, 0, 0, 0] ^= 1
  np.savez(cached, **arrays)
  with pytest.warns(RuntimeWarning, match="corrupt or stale"):
    np.testing.assert_array_equal(_load(path, cache).images, first.images)


@pytest.mark.parametrize("crash_in", ["savez", "replace"])
def test_interrupted_cache_write_leaves_nothing(tmp_path, files, monkeypatch, crash_in):
  path = _write_zips(tmp_path / "z", files[0])
  cache = tmp_path / "cache"
  with helpers.crashing_cache_write(crash_in), pytest.raises(helpers.CacheWriteCrash):
    _load(path, cache)
  assert list(cache.iterdir()) == []
  assert _load(path, cache).images.shape == (10, 20, 28, 28)
  assert [p.suffix for p in cache.iterdir()] == [".npz"]


def test_unwritable_cache_only_warns(tmp_path, files, monkeypatch):
  path = _write_zips(tmp_path / "z", files[0])

  def deny(*a, **k):
    raise PermissionError("read-only")

  monkeypatch.setattr(omniglot_data.tempfile, "mkstemp", deny)
  with pytest.warns(RuntimeWarning, match="could not write"):
    assert _load(path, tmp_path / "cache").images.shape[0] == 10


# ----------------------------------------------------------------------------------------------------
# Download, from a local server only.


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
  def log_message(self, *args):
    pass


@contextlib.contextmanager
def _serve(folder: Path):
  server = http.server.ThreadingHTTPServer(
      ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}/python"
  finally:
    server.shutdown()
    server.server_close()
    thread.join()


def test_download(tmp_path, files, monkeypatch):
  for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
  served = _write_zips(tmp_path / "www" / "python", files[0])
  digests = {n: hashlib.sha256((served / n).read_bytes()).hexdigest() for n in omniglot_data.ZIP_NAMES}
  with _serve(tmp_path / "www") as url:
    dest = omniglot_data.download_omniglot(tmp_path / "dl", url, digests, expected_characters=COUNTS)
    for n in omniglot_data.ZIP_NAMES:
      assert (dest / n).read_bytes() == (served / n).read_bytes()
    assert _load(dest, tmp_path / "cache").images.shape == (10, 20, 28, 28)

    # No known digest: the structure check still runs, and rejects the wrong counts.
    with pytest.raises(ValueError, match="images_background.zip: 6 characters under images_background, "
                                         "expected 964"):
      omniglot_data.download_omniglot(tmp_path / "dl2", url)
    assert list((tmp_path / "dl2").iterdir()) == []

    wrong = {"images_evaluation.zip": "0" * 64}
    with pytest.raises(ValueError, match="images_evaluation.zip: sha256 mismatch"):
      omniglot_data.download_omniglot(tmp_path / "dl3", url, wrong, expected_characters=COUNTS)
    assert [p.name for p in (tmp_path / "dl3").iterdir()] == ["images_background.zip"]

    with pytest.raises(OSError, match="download failed"):
      omniglot_data.download_omniglot(tmp_path / "dl4", url + "/missing", expected_characters=COUNTS)
    assert list((tmp_path / "dl4").iterdir()) == []


# ----------------------------------------------------------------------------------------------------
# Splits.


def test_maml_split():
  is_bg = np.arange(1623) < 964
  train, test = omniglot_data.split_indices(is_bg)
  assert train.shape == (1200,) and test.shape == (423,)
  np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(1623))
  perm = np.random.RandomState(0).permutation(1623)
  np.testing.assert_array_equal(train, np.sort(perm[:1200]))
  # Pinned, so that a change of the documented rule (or of numpy's legacy stream) cannot go unnoticed.
  assert perm[:5].tolist() == [501, 752, 1520, 883, 107] and perm[1200:1203].tolist() == [698, 1048, 1390]
  np.testing.assert_array_equal(omniglot_data.split_indices(is_bg, seed=0)[1], test)
  assert not np.array_equal(omniglot_data.split_indices(is_bg, seed=1)[1], test)


def test_lake_split_and_split_omniglot():
  is_bg = np.arange(1623) < 964
  train, test = omniglot_data.split_indices(is_bg, "lake")
  assert train.size == 964 and test.size == 659 and train.max() < test.min()
  images = np.arange(10, dtype=np.uint8)[:, None, None, None] * np.ones((10, 2, 3, 3), np.uint8)
  data = omniglot_data.OmniglotData(images, ["A"] * 10, [f"A/c{i}" for i in range(10)], np.arange(10) < 6)
  tr, te = omniglot_data.split_omniglot(data, "lake")
  np.testing.assert_array_equal(tr[:, 0, 0, 0], np.arange(6))
  np.testing.assert_array_equal(te[:, 0, 0, 0], np.arange(6, 10))
  tr, te = omniglot_data.split_omniglot(data, "maml", seed=3, num_train=7)
  assert tr.shape == (7, 2, 3, 3) and te.shape == (3, 2, 3, 3)
  assert set(tr[:, 0, 0, 0]) | set(te[:, 0, 0, 0]) == set(range(10))
  with pytest.raises(ValueError, match="unknown Omniglot split"):
    omniglot_data.split_indices(is_bg, "random")
  with pytest.raises(ValueError, match="num_train"):
    omniglot_data.split_indices(np.ones(10, bool), "maml")


# ----------------------------------------------------------------------------------------------------
# Task sampling.

_RNG_IMAGES = np.random.default_rng(0).integers(0, 256, (10, 20, 28, 28), dtype=np.uint8)
_DEVICE_IMAGES = jnp.asarray(_RNG_IMAGES)


def _expected_x(images: np.ndarray, classes: np.ndarray, drawings: np.ndarray, rotations: bool):
  """Independent gather in numpy: uint8 [ways, n, S, S] with np.rot90 applied per class."""
  out = []
  for c, ds in zip(classes, drawings):
    ch, k = (c // 4, c % 4) if rotations else (c, 0)
    out.append(np.stack([np.rot90(images[ch, d], k) for d in ds]))
  return np.stack(out)


def _as_uint8(x) -> np.ndarray:
  """float32 in [0, 1] back to the exact uint8 (XLA's x / 255 may differ from numpy's in the last ulp)."""
  x = np.asarray(x)
  assert x.min() >= 0.0 and x.max() <= 1.0
  return np.round(x * 255.0).astype(np.uint8)


def _check_tasks(images, key, num_tasks, ways, shots, queries, rotations):
  support, query, idx = omniglot.sample_tasks_with_indices(
      key, jnp.asarray(images), num_tasks, ways, shots, queries, rotations)
  n = shots + queries
  s = images.shape[-1]
  assert support["x"].shape == (num_tasks, ways * shots, s, s, 1) and support["x"].dtype == jnp.float32
  assert query["x"].shape == (num_tasks, ways * queries, s, s, 1)
  assert support["y"].dtype == jnp.int32 and query["y"].dtype == jnp.int32
  classes, drawings = np.asarray(idx.classes), np.asarray(idx.drawings)
  assert classes.shape == (num_tasks, ways) and drawings.shape == (num_tasks, ways, n)
  num_classes = images.shape[0] * (4 if rotations else 1)
  for t in range(num_tasks):
    assert len(set(classes[t].tolist())) == ways and classes[t].min() >= 0 and classes[t].max() < num_classes
    for w in range(ways):
      assert len(set(drawings[t, w].tolist())) == n and drawings[t, w].max() < images.shape[1]
      assert not set(drawings[t, w, :shots]) & set(drawings[t, w, shots:])
    np.testing.assert_array_equal(support["y"][t], np.repeat(np.arange(ways), shots))
    np.testing.assert_array_equal(query["y"][t], np.repeat(np.arange(ways), queries))
    want = _expected_x(images, classes[t], drawings[t], rotations)
    np.testing.assert_array_equal(_as_uint8(support["x"][t, ..., 0]), want[:, :shots].reshape(-1, s, s))
    np.testing.assert_array_equal(_as_uint8(query["x"][t, ..., 0]), want[:, shots:].reshape(-1, s, s))


# Few static configurations on purpose: each one costs an XLA compile (about a second on CPU), while
# new keys for a compiled configuration are free. The first and last are reused by the tests below.
_CONFIGS = [  # (num_tasks, ways, shots, queries, rotations)
    (16, 20, 1, 19, True),  # every drawing used; shots + queries = 20
    (3, 7, 5, 4, False),
    (4, 5, 2, 3, True),
]


@pytest.mark.parametrize("config", _CONFIGS)
@settings(max_examples=4, deadline=None, derandomize=True, phases=(Phase.explicit, Phase.generate))
@given(seed=st.integers(0, 2**31 - 1))
def test_sampler_invariants(config, seed):
  _check_tasks(_RNG_IMAGES, jax.random.key(seed), *config)


def test_every_class_and_rotation_occurs():
  # 10 characters x 4 rotations = 40 classes; 16 tasks of 20 ways must touch all 40, and with
  # shots + queries = 20 every task uses every drawing.
  key = jax.random.key(0)
  support, query, idx = omniglot.sample_tasks_with_indices(key, _DEVICE_IMAGES, *_CONFIGS[0])
  assert set(np.asarray(idx.classes).ravel().tolist()) == set(range(40))
  assert np.array_equal(np.sort(np.asarray(idx.drawings), axis=-1), np.broadcast_to(np.arange(20), (16, 20, 20)))
  # sample_tasks and make_sampler give exactly the same tasks for the same key.
  sample = omniglot.make_sampler(_RNG_IMAGES, ways=20, shots=1, queries=19)
  for s2, q2 in (sample(key, 16), omniglot.sample_tasks(key, _DEVICE_IMAGES, *_CONFIGS[0])):
    np.testing.assert_array_equal(s2["x"], support["x"])
    np.testing.assert_array_equal(q2["y"], query["y"])
  s3, _ = sample(jax.random.key(1), 16)
  assert not np.array_equal(s3["x"], support["x"])


def test_rotations_against_loaded_images(tmp_path, files):
  data = _load(_write_tar(tmp_path / "o.tar.gz", files[0]), tmp_path / "cache")
  _check_tasks(data.images, jax.random.key(7), *_CONFIGS[2])
  # The drawings are asymmetric (ink block in the top-left corner), so each rotation is distinguishable.
  img = data.images[2, 5]
  assert len({np.rot90(img, k).tobytes() for k in range(4)}) == 4


def test_sampler_nests_in_jit_and_vmap():
  @jax.jit
  def step(keys, images):
    return jax.vmap(lambda k: omniglot.sample_tasks(k, images, 2, 3, 1, 2))(keys)

  support, query = step(jax.random.split(jax.random.key(0), 3), _DEVICE_IMAGES)
  assert support["x"].shape == (3, 2, 3, 28, 28, 1) and query["y"].shape == (3, 2, 6)


def test_sampler_errors():
  with pytest.raises(ValueError, match="ways=41 exceeds the 40 available classes"):
    omniglot.make_sampler(_RNG_IMAGES, 41, 1, 1)
  with pytest.raises(ValueError, match="ways=11 exceeds the 10 available classes"):
    omniglot.make_sampler(_RNG_IMAGES, 11, 1, 1, rotations=False)
  with pytest.raises(ValueError, match="shots \\+ queries = 21 exceeds the 20 drawings"):
    omniglot.make_sampler(_RNG_IMAGES, 5, 1, 20)
  with pytest.raises(ValueError, match="shots must be an int >= 1"):
    omniglot.make_sampler(_RNG_IMAGES, 5, 0, 1)
  with pytest.raises(ValueError, match="queries must be an int >= 1"):
    omniglot.sample_tasks(jax.random.key(0), _DEVICE_IMAGES, 2, 5, 1, 0)
  with pytest.raises(ValueError, match="num_tasks"):
    omniglot.sample_tasks(jax.random.key(0), _DEVICE_IMAGES, 0, 5, 1, 1)
  with pytest.raises(ValueError, match="uint8"):
    omniglot.make_sampler(_RNG_IMAGES.astype(np.float32), 5, 1, 1)
  with pytest.raises(ValueError, match="square"):
    omniglot.make_sampler(_RNG_IMAGES[..., :20], 5, 1, 1)


# ----------------------------------------------------------------------------------------------------
# The real archive.


def test_real_archive(tmp_path, real_tarball):
  t0 = time.perf_counter()
  data = omniglot_data.load_omniglot(real_tarball, tmp_path / "cache")
  first = time.perf_counter() - t0
  assert data.images.shape == (1623, 20, 28, 28) and data.images.dtype == np.uint8
  assert int(data.is_background.sum()) == 964
  assert len(set(np.asarray(data.alphabets)[data.is_background])) == 30
  assert len(set(np.asarray(data.alphabets)[~data.is_background])) == 20
  assert data.characters[0] == "Alphabet_of_the_Magi/character01"
  assert data.images.mean() < 255 * 0.25  # strokes are sparse: paper is 0
  # The first character against Pillow directly, from the archive's first members.
  first_char = {}
  with tarfile.open(real_tarball, "r|gz") as tf:
    for m in tf:
      if m.name.startswith("omniglot/images_background/Alphabet_of_the_Magi/character01/"):
        first_char[m.name] = _reference(tf.extractfile(m).read())
      if len(first_char) == 20:
        break
  np.testing.assert_array_equal(data.images[0], np.stack([first_char[k] for k in sorted(first_char)]))
  t0 = time.perf_counter()
  again = omniglot_data.load_omniglot(real_tarball, tmp_path / "cache")
  cached = time.perf_counter() - t0
  np.testing.assert_array_equal(again.images, data.images)
  assert cached < 5.0 and cached < first / 3, (first, cached)
  train, test = omniglot_data.split_omniglot(data)
  assert train.shape == (1200, 20, 28, 28) and test.shape == (423, 20, 28, 28)
  train, test = omniglot_data.split_omniglot(data, "lake")
  assert train.shape[0] == 964 and test.shape[0] == 659
  print(f"real Omniglot: first load {first:.1f} s, cached load {cached:.2f} s")
