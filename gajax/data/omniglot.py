"""Omniglot as NumPy arrays: one-path loading, decoding, a verified uint8 cache, download and fixed splits.

numpy and Pillow only, no JAX: fetching, checking and caching the data (e.g. warming the cache on a
machine without an accelerator) should not pay for, or depend on, starting a JAX runtime. On-device
task sampling and the training ``Task`` live in :mod:`gajax.tasks.omniglot`.

Data sources
  ``load_omniglot(path)`` takes one path (a run passes its config's ``data_dir``; without one,
  ``GAJAX_DATA_DIR`` is read) and tells
  from that path alone which of these it is, trying them in this order:

  1. a folder holding both official zips ``images_background.zip`` and ``images_evaluation.zip``
     (github.com/brendenlake/omniglot, ``python/``; ``download_omniglot`` fetches them);
  2. a tarball (``*.tar.gz``, ``*.tgz``, ``*.tar``) or a folder holding ``omniglot.tar.gz``/``.tgz``/``.tar``
     whose members read ``[omniglot/]images_{background,evaluation}/<Alphabet>/<characterNN>/<file>.png``;
  3. an unpacked folder: ``<path>/images_background`` + ``<path>/images_evaluation``, or the same under
     ``<path>/omniglot/``.

  Archives are streamed member by member (nothing is extracted to disk). When the source carries a
  ``SHA256SUMS`` file next to the ``images_*`` folders (the project's tarball does), every PNG is checked
  against it and every PNG it lists must be present. A missing source raises ``FileNotFoundError``; a
  truncated or corrupt archive (gzip/tar error, zip CRC error), an undecodable PNG, a PNG that is not
  105x105, or wrong counts raise ``ValueError``; both carry one line naming the path and the problem.

Pixel convention
  Each 105x105 1-bit drawing is converted to 8-bit grey (paper 255, ink 0) *before* resizing (Pillow
  silently falls back to nearest-neighbour when resizing mode ``"1"`` images), resized to ``image_size`` x
  ``image_size`` (default 28) with Lanczos-3 -- bit-identical to ``PIL.Image.resize(...,
  Image.Resampling.LANCZOS)`` on the grey image, computed in batches with numpy -- then inverted, so the
  stored uint8 has **0 = background (paper), 255 = ink**. The samplers of :mod:`gajax.tasks.omniglot`
  return ``float32 = uint8 / 255``: ink 1.0, paper 0.0, with antialiased strokes in between. This
  matches MAML's ``1 - image / 255``.

Order
  Characters are ordered: background set first, then evaluation; alphabets sorted by name within each
  set; characters sorted by folder name within an alphabet; drawings sorted by file name. The real set
  gives ``images: uint8 [1623, 20, 28, 28]`` with the first 964 characters from ``images_background``.

Cache
  The decoded array is cached as ``<cache_dir>/omniglot_<size>px_<key>.npz``; ``cache_dir`` is the
  argument, else ``$GAJAX_CACHE_DIR``, else ``~/.cache/gajax``. ``<key>`` hashes a format version, the
  image size and the source content: the sha256 of each archive, or for an unpacked folder the relative
  path, size and mtime of every file under it. The file is written to a temporary file in the same folder
  and moved into place with ``os.replace``, so an interrupted write never leaves a partial cache under the
  final name. The cache stores a sha256 of its own contents; an unreadable, mis-shaped or mismatching
  cache is ignored and rebuilt. Old caches for other keys are left alone (delete them by hand). The
  mechanics are shared with the other readers in :mod:`gajax.data.cache`.

Splits (``split_indices`` / ``split_omniglot``), over characters, deterministic from ``seed``:
  * ``"maml"`` (default; the MAML / Reptile protocol): ``perm = np.random.RandomState(seed).permutation(C)``
    with ``C = 1623`` and ``seed = 0`` by default; the characters ``perm[:1200]`` are the meta-training
    set and ``perm[1200:]`` (423) the test set, each returned in ascending character order. The legacy
    ``RandomState`` stream is used because numpy guarantees it stays fixed across versions. (MAML's own
    code shuffled the character folders with Python's ``random.seed(1)``; this is not that shuffle.)
  * ``"lake"``: the 964 background characters train, the 659 evaluation characters test (Lake et al.).

"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import math
import os
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path
from typing import Iterator, Mapping, NamedTuple, Optional, Union

import numpy as np
from PIL import Image

from gajax.data import cache as _cache
from gajax.data.base import is_tarball

PathLike = Union[str, os.PathLike]

OFFICIAL_BASE_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
SUBSETS = ("images_background", "images_evaluation")
ZIP_NAMES = tuple(s + ".zip" for s in SUBSETS)
TARBALL_NAMES = ("omniglot.tar.gz", "omniglot.tgz", "omniglot.tar")
NUM_CHARACTERS = (964, 659)  # (background, evaluation); 1623 in all
NUM_DRAWINGS = 20
RAW_SIZE = 105
IMAGE_SIZE = 28
MAML_NUM_TRAIN = 1200
# sha256 of the official zips, by file name. Left empty because we have not pinned the upstream files;
# download_omniglot then checks what it fetched by opening it (CRCs) and counting characters/drawings.
KNOWN_SHA256: Mapping[str, str] = {}
DATA_ENV = "GAJAX_DATA_DIR"
# Bump when the decoded content changes (resampling, ink convention, order) so old caches are not reused.
_CACHE_VERSION = 1
_CHUNK = 1 << 20
# The cache mechanics live in gajax.data.cache; these names stay importable from here.
CACHE_ENV = _cache.CACHE_ENV
default_cache_dir = _cache.default_cache_dir
_sha256_file = _cache.sha256_file
_atomic_save_npz = _cache.atomic_save_npz


class OmniglotData(NamedTuple):
  """The decoded set. ``C`` characters, ``D`` drawings each, ``S = image_size``.

  Attributes:
    images: uint8 ``[C, D, S, S]``, 0 = paper, 255 = ink.
    alphabets: ``C`` alphabet names, one per character.
    characters: ``C`` names ``"<Alphabet>/<characterNN>"``.
    is_background: bool ``[C]``, True for characters from ``images_background``.
  """
  images: np.ndarray
  alphabets: list
  characters: list
  is_background: np.ndarray


# ----------------------------------------------------------------------------------------------------
# Locating the source.


class _Source(NamedTuple):
  kind: str  # "zips" | "tar" | "folder"
  paths: tuple  # the two zips | (tarball,) | (folder holding images_background/ and images_evaluation/,)


def resolve_data_path(path: Optional[PathLike] = None) -> Path:
  """Returns ``path``, else ``$GAJAX_DATA_DIR``; raises ``FileNotFoundError`` when neither is set."""
  if path is None or str(path) == "":
    path = os.environ.get(DATA_ENV)
  if not path:
    raise FileNotFoundError("no Omniglot path given: set the config's data_dir (or pass a path) or "
                            f"${DATA_ENV}")
  return Path(path).expanduser()


def _detect_source(path: Path) -> _Source:
  if not path.exists():
    raise FileNotFoundError(f"{path}: no such file or folder (expected the Omniglot tarball, a folder "
                            f"holding {ZIP_NAMES[0]} and {ZIP_NAMES[1]}, or an unpacked folder)")
  if path.is_file():
    if is_tarball(path):
      return _Source("tar", (path,))
    if path.name in ZIP_NAMES:
      raise ValueError(f"{path}: pass the folder that holds both {ZIP_NAMES[0]} and {ZIP_NAMES[1]}, "
                       "not one zip")
    raise ValueError(f"{path}: not a recognised Omniglot source (expected a .tar.gz/.tgz/.tar or a folder)")
  zips = [path / z for z in ZIP_NAMES]
  if all(z.is_file() for z in zips):
    return _Source("zips", tuple(zips))
  for name in TARBALL_NAMES:
    if (path / name).is_file():
      return _Source("tar", (path / name,))
  for root in (path, path / "omniglot"):
    if all((root / s).is_dir() for s in SUBSETS):
      return _Source("folder", (root,))
  present = [z.name for z in zips if z.is_file()]
  if present:
    missing = [z.name for z in zips if not z.is_file()]
    raise FileNotFoundError(f"{path}: found {present[0]} but not {missing[0]}")
  raise FileNotFoundError(f"{path}: no Omniglot data found (looked for {ZIP_NAMES[0]} + {ZIP_NAMES[1]}, "
                          f"{'/'.join(TARBALL_NAMES)}, or images_background/ + images_evaluation/ "
                          "folders, also under omniglot/)")


def _fingerprint(source: _Source) -> list:
  """Content identity of the source, for the cache key."""
  if source.kind in ("zips", "tar"):
    return [[p.name, _sha256_file(p)] for p in source.paths]
  # Hashing 32k loose files would cost as much as decoding them; sizes + mtimes catch real edits.
  return [["folder", _cache.tree_fingerprint(source.paths[0])]]


# ----------------------------------------------------------------------------------------------------
# Reading and decoding.


def _png_key(name: str) -> Optional[tuple]:
  """``".../images_background/A/characterNN/x.png"`` -> ``(0, "A", "characterNN", "x.png")``; else None."""
  parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
  if not parts or not parts[-1].lower().endswith(".png"):
    return None
  # Skip macOS resource forks and hidden files that some zip tools add.
  if any(p.startswith(".") or p == "__MACOSX" for p in parts):
    return None
  for i, p in enumerate(parts):
    if p in SUBSETS:
      if len(parts) - i != 4:
        return None
      return (SUBSETS.index(p), parts[i + 1], parts[i + 2], parts[i + 3])
  return None


def _is_sums_file(name: str) -> bool:
  parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
  return len(parts) <= 2 and parts[-1] == "SHA256SUMS"


_ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError)


def _archive_error(origin: Path, member: Optional[str], e: BaseException) -> ValueError:
  where = f" (at member {member})" if member else ""
  return ValueError(f"{origin}: corrupt or truncated archive{where}: {type(e).__name__}: {e}")


def _iter_members(source: _Source) -> Iterator[tuple]:
  """Yields ``(origin, member_name, key, data_bytes)`` for every PNG or SHA256SUMS (``key`` None).

  ``origin`` is the file read; ``key`` is ``_png_key(member_name)``.

  Archive-level failures (bad gzip stream, truncation, zip CRC) come out as one-line ValueErrors naming
  the archive and the member being read.
  """
  if source.kind == "tar":
    (path,) = source.paths
    member = None
    try:
      # "r|*" streams (gzip or plain) without seeking: each member is read once, in archive order.
      with tarfile.open(path, mode="r|*") as tf:
        for m in tf:
          member = m.name
          key = _png_key(m.name) if m.isfile() else None
          if key is not None or (m.isfile() and _is_sums_file(m.name)):
            data = tf.extractfile(m).read()
            if len(data) != m.size:
              raise EOFError(f"member has {len(data)} of {m.size} bytes")
            yield path, m.name, key, data
    except _ARCHIVE_ERRORS as e:
      raise _archive_error(path, member, e) from e
  elif source.kind == "zips":
    for path in source.paths:
      member = None
      try:
        with zipfile.ZipFile(path) as zf:
          for info in zf.infolist():
            member = info.filename
            key = None if info.is_dir() else _png_key(info.filename)
            if key is not None:
              data = zf.read(info)  # read() checks the member's CRC-32
              yield path, info.filename, key, data
      except _ARCHIVE_ERRORS as e:
        raise _archive_error(path, member, e) from e
  else:
    (root,) = source.paths
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames.sort()
      for name in sorted(filenames):
        rel = os.path.relpath(os.path.join(dirpath, name), root)
        key = _png_key(rel)
        if key is not None or _is_sums_file(rel):
          with open(os.path.join(dirpath, name), "rb") as f:
            yield root, rel, key, f.read()


def _decode_png(data: bytes) -> np.ndarray:
  """PNG bytes -> uint8 ``[105, 105]`` grey, paper 255. Raises when undecodable or not 105x105."""
  with Image.open(io.BytesIO(data)) as im:
    if im.size != (RAW_SIZE, RAW_SIZE):
      raise ValueError(f"size {im.size[0]}x{im.size[1]}, expected {RAW_SIZE}x{RAW_SIZE}")
    return np.asarray(im.convert("L"), dtype=np.uint8)


def _lanczos3(x: float) -> float:
  def sinc(t):
    return 1.0 if t == 0.0 else math.sin(t * math.pi) / (t * math.pi)
  return sinc(x) * sinc(x / 3.0) if -3.0 <= x < 3.0 else 0.0


_PRECISION_BITS = 22  # Pillow's fixed point for 8-bit images: 32 - 8 - 2


@functools.lru_cache(maxsize=None)
def _lanczos_matrix(in_size: int, out_size: int) -> np.ndarray:
  """float64 ``[out_size, in_size]``: Pillow's LANCZOS weights for one axis, in its fixed point.

  Mirrors Pillow's ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` (Resample.c), in the same
  double-precision operations and order, so the result is integer-valued and identical to Pillow's.
  """
  scale = in_size / out_size
  filterscale = max(scale, 1.0)
  support = 3.0 * filterscale
  m = np.zeros((out_size, in_size))
  for xx in range(out_size):
    center = (xx + 0.5) * scale
    xmin = max(int(center - support + 0.5), 0)
    xmax = min(int(center + support + 0.5), in_size)
    w = [_lanczos3((x + xmin - center + 0.5) / filterscale) for x in range(xmax - xmin)]
    total = 0.0
    for v in w:  # sequential, like the C loop (np.sum would pair-wise sum)
      total += v
    for x, v in enumerate(w):
      k = v / total if total != 0.0 else v
      m[xx, xmin + x] = math.trunc(k * (1 << _PRECISION_BITS) + (0.5 if k >= 0 else -0.5))
  return m


def _resize_lanczos(raw: np.ndarray, size: int) -> np.ndarray:
  """uint8 ``[N, H, H]`` -> uint8 ``[N, size, size]``, bit-identical to ``PIL resize(LANCZOS)`` per image.

  Pillow spends most of the load time in per-image resize calls; two batched matmuls do the same work.
  Products and sums stay below 2**53, so float64 arithmetic on the integer weights is exact; each pass
  then rounds and clips to uint8 the way Pillow's ``clip8`` does (horizontal pass first, as Pillow).
  """
  k = _lanczos_matrix(raw.shape[-1], size)
  half, unit = float(1 << (_PRECISION_BITS - 1)), float(1 << _PRECISION_BITS)
  rows = np.clip(np.floor((raw.astype(np.float64) @ k.T + half) / unit), 0, 255)  # [N, H, size]
  out = np.clip(np.floor((k @ rows + half) / unit), 0, 255)  # [N, size, size]
  return out.astype(np.uint8)


def _parse_sums(data: bytes, origin: Path, member: str) -> dict:
  sums = {}
  for line in data.decode("utf-8", errors="replace").splitlines():
    if not line.strip():
      continue
    digest, _, rel = line.strip().partition(" ")
    key = _png_key(rel.strip().lstrip("*"))
    if key is not None:
      sums[key] = digest.lower()
  if not sums:
    raise ValueError(f"{origin}: {member} lists no PNGs")
  return sums


def _check_counts(names: list, counts: list, is_background: np.ndarray, where: str,
                  expected_characters: Optional[tuple], expected_drawings: Optional[int]) -> None:
  if expected_drawings is not None:
    for name, n in zip(names, counts):
      if n != expected_drawings:
        raise ValueError(f"{where}: character {name} has {n} drawings, expected {expected_drawings}")
  if expected_characters is not None:
    got = (int(is_background.sum()), int((~is_background).sum()))
    if got != tuple(expected_characters):
      raise ValueError(f"{where}: found {got[0]} background + {got[1]} evaluation characters, expected "
                       f"{expected_characters[0]} + {expected_characters[1]} (truncated or incomplete data?)")


def _decode_source(source: _Source, size: int, expected_characters: Optional[tuple],
                   expected_drawings: Optional[int]) -> OmniglotData:
  decoded = {}  # key -> uint8 [size, size], 255 = ink
  hashes = {}
  sums = None
  pending_keys, pending = [], []
  where = source.paths[0] if len(source.paths) == 1 else source.paths[0].parent

  def flush():
    # Resize in batches: big enough for fast matmuls, small enough (~20 MB float64) to stay light.
    if pending:
      small = 255 - _resize_lanczos(np.stack(pending), size)
      decoded.update(zip(pending_keys, small))
      pending_keys.clear()
      pending.clear()

  for origin, member, key, data in _iter_members(source):
    if key is None:
      sums = _parse_sums(data, origin, member)
      continue
    if key in hashes:
      raise ValueError(f"{origin}: duplicate member {member}")
    hashes[key] = hashlib.sha256(data).hexdigest()
    try:
      pending.append(_decode_png(data))
    except Exception as e:  # noqa: BLE001 - any decoder failure means a bad file
      raise ValueError(f"{origin}: bad PNG {member}: {type(e).__name__}: {e}") from e
    pending_keys.append(key)
    if len(pending) == 256:
      flush()
  flush()

  if sums is not None:
    for key, digest in sums.items():
      if key not in hashes:
        raise ValueError(f"{where}: {SUBSETS[key[0]]}/{'/'.join(key[1:])} is listed in SHA256SUMS but missing")
      if hashes[key] != digest:
        raise ValueError(f"{where}: sha256 mismatch for {SUBSETS[key[0]]}/{'/'.join(key[1:])}")

  keys = sorted(decoded)  # (subset, alphabet, character, file): the documented order
  characters, counts, background = [], [], []
  for key in keys:
    name = f"{key[1]}/{key[2]}"
    if not characters or characters[-1] != name or background[-1] != (key[0] == 0):
      characters.append(name)
      counts.append(0)
      background.append(key[0] == 0)
    counts[-1] += 1
  is_background = np.asarray(background, dtype=bool)
  if not characters:
    raise ValueError(f"{where}: no Omniglot PNGs found")
  _check_counts(characters, counts, is_background, str(where), expected_characters, expected_drawings)
  if len(set(counts)) != 1:
    raise ValueError(f"{where}: characters have different numbers of drawings ({min(counts)}..{max(counts)})")
  images = np.stack([decoded[k] for k in keys]).reshape(len(characters), counts[0], size, size)
  return OmniglotData(images, [c.split("/")[0] for c in characters], characters, is_background)


# ----------------------------------------------------------------------------------------------------
# Cache.


def _content_digest(images: np.ndarray, characters: list, is_background: np.ndarray) -> str:
  h = hashlib.sha256()
  h.update(repr((images.shape, str(images.dtype))).encode())
  h.update(np.ascontiguousarray(images).tobytes())
  h.update("\n".join(characters).encode())
  h.update(np.asarray(is_background, dtype=bool).tobytes())
  return h.hexdigest()


def _read_cache(path: Path, key: str, size: int) -> Optional[OmniglotData]:
  """The cached data, or None when the file is missing or fails any check (see :func:`cache.read_cache`)."""
  def check(z):
    images, characters, is_background = z["images"], z["characters"], z["is_background"]
    return (images.dtype == np.uint8 and images.ndim == 4 and characters.ndim == 1
            and images.shape[0] == characters.shape[0] == is_background.shape[0]
            and images.shape[2:] == (size, size) and is_background.dtype == bool)

  def digest(z):
    return _content_digest(z["images"], [str(c) for c in z["characters"]], z["is_background"])

  z = _cache.read_cache(path, key, what="Omniglot", digest_fn=digest, check=check)
  if z is None:
    return None
  characters = [str(c) for c in z["characters"]]
  return OmniglotData(z["images"], [c.split("/")[0] for c in characters], characters, z["is_background"])


def load_omniglot(path: Optional[PathLike] = None, cache_dir: Optional[PathLike] = None, *,
                  image_size: int = IMAGE_SIZE,
                  expected_characters: Optional[tuple] = NUM_CHARACTERS,
                  expected_drawings: Optional[int] = NUM_DRAWINGS) -> OmniglotData:
  """Loads Omniglot from any supported source, through the cache.

  Args:
    path: the tarball, a folder holding the two official zips or the tarball, or an unpacked folder
      (see the module docstring). None falls back to ``$GAJAX_DATA_DIR``.
    cache_dir: where the decoded ``.npz`` lives; None means ``$GAJAX_CACHE_DIR`` or ``~/.cache/gajax``.
    image_size: side of the resized square images.
    expected_characters: ``(background, evaluation)`` character counts to insist on; None skips the check.
    expected_drawings: drawings per character to insist on; None skips the check.

  Returns:
    ``OmniglotData`` with ``images: uint8 [C, D, image_size, image_size]`` (0 = paper, 255 = ink).

  Raises:
    FileNotFoundError: no source at ``path``.
    ValueError: a corrupt/truncated archive, a bad PNG, a SHA256SUMS mismatch or wrong counts.
  """
  if not isinstance(image_size, int) or image_size < 1:
    raise ValueError(f"image_size must be a positive int, got {image_size!r}")
  path = resolve_data_path(path)
  source = _detect_source(path)
  key = _cache.cache_key({"version": _CACHE_VERSION, "size": image_size, "kind": source.kind,
                          "source": _fingerprint(source)})
  cache_path = _cache.cache_file(cache_dir, f"omniglot_{image_size}px", key)

  data = _read_cache(cache_path, key, image_size)
  if data is not None:
    counts = [data.images.shape[1]] * len(data.characters)
    _check_counts(data.characters, counts, data.is_background, f"{path} (cache {cache_path})",
                  expected_characters, expected_drawings)
    return data

  data = _decode_source(source, image_size, expected_characters, expected_drawings)
  arrays = dict(images=data.images, characters=np.asarray(data.characters, dtype=str),
                is_background=data.is_background)
  # A read-only or full cache folder only warns: it should cost speed next time, not this run.
  _cache.write_cache(cache_path, key, arrays, what="Omniglot",
                     digest=_content_digest(data.images, data.characters, data.is_background))
  return data


# ----------------------------------------------------------------------------------------------------
# Download.


def _check_zip(path: Path, subset: str, expected: Optional[int], expected_drawings: Optional[int],
               where: str) -> None:
  """Opens a downloaded zip, checks every CRC and the character/drawing counts of ``subset``."""
  try:
    with zipfile.ZipFile(path) as zf:
      bad = zf.testzip()
      if bad is not None:
        raise ValueError(f"{where}: bad CRC for member {bad}")
      counts = {}
      for info in zf.infolist():
        key = _png_key(info.filename)
        if key is not None and SUBSETS[key[0]] == subset:
          counts[key[1:3]] = counts.get(key[1:3], 0) + 1
  except (zipfile.BadZipFile, EOFError, zlib.error, OSError) as e:
    raise ValueError(f"{where}: not a valid zip: {type(e).__name__}: {e}") from e
  if not counts:
    raise ValueError(f"{where}: holds no {subset}/<Alphabet>/<character>/*.png files")
  if expected is not None and len(counts) != expected:
    raise ValueError(f"{where}: {len(counts)} characters under {subset}, expected {expected}")
  if expected_drawings is not None:
    for (alphabet, character), n in sorted(counts.items()):
      if n != expected_drawings:
        raise ValueError(f"{where}: {alphabet}/{character} has {n} drawings, expected {expected_drawings}")


def download_omniglot(dest_dir: PathLike, base_url: str = OFFICIAL_BASE_URL,
                      sha256: Optional[Mapping[str, str]] = None, *,
                      expected_characters: Optional[tuple] = NUM_CHARACTERS,
                      expected_drawings: Optional[int] = NUM_DRAWINGS,
                      timeout: float = 60.0, overwrite: bool = False) -> Path:
  """Fetches ``images_background.zip`` and ``images_evaluation.zip`` from ``base_url`` into ``dest_dir``.

  Each zip is streamed into a temporary file in ``dest_dir``, verified, then moved into place with
  ``os.replace``; a failed check deletes it and raises. The check is the sha256 from ``sha256`` (a
  ``{file name: hex digest}`` dict, merged over ``KNOWN_SHA256``) when one is known; the zip is always
  opened, every member's CRC checked, and its characters and drawings counted. Files already present and
  passing the same checks are kept unless ``overwrite``.

  Args:
    dest_dir: folder to write into (created if needed); pass it to ``load_omniglot`` afterwards.
    base_url: folder URL holding the two zips.
    sha256: expected digests by file name, e.g. ``{"images_background.zip": "ab12..."}``.
    expected_characters: ``(background, evaluation)`` character counts; None skips the count check.
    expected_drawings: drawings per character; None skips the check.
    timeout: socket timeout in seconds.
    overwrite: download even when a valid file is present.

  Returns:
    ``Path(dest_dir)``.

  Raises:
    ValueError: a sha256 mismatch or an invalid zip. OSError: the download itself failed.
  """
  dest = Path(dest_dir).expanduser()
  dest.mkdir(parents=True, exist_ok=True)
  hashes = {**KNOWN_SHA256, **(sha256 or {})}
  counts = expected_characters if expected_characters is not None else (None, None)
  for name, subset, expected in zip(ZIP_NAMES, SUBSETS, counts):
    final = dest / name
    url = f"{base_url.rstrip('/')}/{name}"
    want = hashes.get(name)
    if final.is_file() and not overwrite:
      try:
        if want is not None and _sha256_file(final).lower() != want.lower():
          raise ValueError("sha256 mismatch")
        _check_zip(final, subset, expected, expected_drawings, str(final))
        continue
      except ValueError:
        pass  # an invalid leftover: fetch it again
    fd, tmp = tempfile.mkstemp(prefix=name + ".", suffix=".part", dir=dest)
    try:
      h = hashlib.sha256()
      with os.fdopen(fd, "wb") as f:
        try:
          with urllib.request.urlopen(url, timeout=timeout) as r:
            for chunk in iter(lambda: r.read(_CHUNK), b""):
              h.update(chunk)
              f.write(chunk)
        except (urllib.error.URLError, OSError) as e:
          raise OSError(f"{url}: download failed: {e}") from e
        f.flush()
        os.fsync(f.fileno())
      if want is not None and h.hexdigest() != want.lower():
        raise ValueError(f"{url}: sha256 mismatch: expected {want.lower()}, got {h.hexdigest()}")
      _check_zip(Path(tmp), subset, expected, expected_drawings, url)
      os.replace(tmp, final)
    except BaseException:
      with contextlib.suppress(OSError):
        os.unlink(tmp)
      raise
  return dest


# ----------------------------------------------------------------------------------------------------
# Splits.


def split_indices(is_background: np.ndarray, split: str = "maml", seed: int = 0,
                  num_train: int = MAML_NUM_TRAIN) -> tuple:
  """Character indices of the train and test sets (see the module docstring for the exact rule).

  Args:
    is_background: bool ``[C]`` (only its length matters for ``"maml"``).
    split: ``"maml"`` or ``"lake"``.
    seed: seed of the ``"maml"`` shuffle.
    num_train: size of the ``"maml"`` training set.

  Returns:
    ``(train, test)``: int64 ``[C_train]``, ``[C_test]``, ascending, disjoint, covering ``0..C-1``.
  """
  is_background = np.asarray(is_background, dtype=bool)
  n = is_background.shape[0]
  if split == "maml":
    if not 0 < num_train < n:
      raise ValueError(f"maml split: num_train must be in [1, {n - 1}] for {n} characters, got {num_train}")
    perm = np.random.RandomState(seed).permutation(n)
    return np.sort(perm[:num_train]), np.sort(perm[num_train:])
  if split == "lake":
    train, test = np.flatnonzero(is_background), np.flatnonzero(~is_background)
    if train.size == 0 or test.size == 0:
      raise ValueError("lake split: needs both background and evaluation characters")
    return train, test
  raise ValueError(f"unknown Omniglot split {split!r}; expected 'maml' or 'lake'")


def split_omniglot(data: OmniglotData, split: str = "maml", seed: int = 0,
                   num_train: int = MAML_NUM_TRAIN) -> tuple:
  """``(train_images, test_images)``: uint8 ``[C_train, D, S, S]`` and ``[C_test, D, S, S]``."""
  train, test = split_indices(data.is_background, split, seed, num_train)
  return data.images[train], data.images[test]
