"""Corrupted meta-batches: a fixed fraction of the tasks in every training meta-batch made harmful.

Eshratifar et al. (2018, arXiv:1810.08178) motivate gradient agreement by robustness: a task whose
update disagrees with the rest of the batch gets a small or negative weight (eq. 13), so outlier or
harmful tasks should hurt less than under plain averaging. To test that, :func:`corrupt` replaces
exactly ``round(p T)`` of the ``T`` tasks of a meta-batch, chosen uniformly at random, by a corrupted
version; evaluation tasks stay clean. Corruptions act on the targets ``"y"`` only (inputs ``"x"`` are
kept), and come in two families:

Regression (float ``"y"`` ``[T, n, ...]``, e.g. sinusoids):
  ``"noise"``: support and query targets replaced by ``N(0, s_t^2)`` noise, ``s_t`` the root mean
    square of task ``t``'s clean targets over support and query together: no signal, same loss scale.
  ``"amplitude"``: support and query targets multiplied by ``AMPLITUDE_FACTOR = 10`` (an outlier in
    size; its meta-gradient is ~100x larger under mean squared error).
  ``"sign_flip"``: query targets negated, support untouched: the meta-gradient then points against
    what adaptation on the support set suggests.

Classification (integer labels ``"y"`` ``[T, n]`` in ``0..C-1``, e.g. Omniglot or the binary toy):
  ``"shuffle_labels"``: the query labels of the task permuted among its query examples (label noise
    that keeps the class counts).
  ``"permute_labels"``: the classes of the task's query relabelled by ``y -> (y + r_t) mod C`` with
    ``r_t`` uniform in ``{1, ..., C - 1}``: a random cyclic relabelling, never the identity, so support
    and query disagree systematically about which class is which.

Everything is a pure function of an explicit PRNG key and jittable, with ``fraction`` and ``kind``
static Python values.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp

PyTree = Any

CORRUPTIONS = ("noise", "amplitude", "sign_flip", "shuffle_labels", "permute_labels")
REGRESSION_CORRUPTIONS = CORRUPTIONS[:3]
LABEL_CORRUPTIONS = CORRUPTIONS[3:]
AMPLITUDE_FACTOR = 10.0

# The corruption key of make_corrupted_sampler is fold_in(key, _STREAM) of the sampler's own key, so
# the clean tasks are exactly those an uncorrupted sampler draws from the same key (runs with and
# without corruption see the same tasks). A large constant keeps the derived key away from the keys
# split(key, n) hands out for small n.
_STREAM = 0x636F7272  # "corr"


def num_corrupted(num_tasks: int, fraction: float) -> int:
  """The number of corrupted tasks in a meta-batch of ``num_tasks``: ``round(fraction * num_tasks)``.

  Rounds half up (``0.5 * 5 -> 3``, ``0.1 * 5 -> 1``); a tolerance of 1e-9 absorbs the binary
  representation of decimal fractions, so ``0.15 * 10`` gives 2 however it rounds in float.

  Raises:
    ValueError: if ``num_tasks < 0`` or ``fraction`` is not in ``[0, 1]``.
  """
  if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 0:
    raise ValueError(f"num_tasks must be an int >= 0, got {num_tasks!r}.")
  _check_fraction(fraction)
  return min(num_tasks, math.floor(fraction * num_tasks + 0.5 + 1e-9))


def _check_fraction(fraction) -> None:
  if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0.0 <= fraction <= 1.0:
    raise ValueError(f"fraction must be a number in [0, 1], got {fraction!r}.")


def _check_kind(kind: str, num_classes: int | None) -> None:
  if kind not in CORRUPTIONS:
    raise ValueError(f"Unknown corruption kind {kind!r}; valid kinds: {', '.join(CORRUPTIONS)}.")
  if kind == "permute_labels":
    if num_classes is None:
      raise ValueError("kind='permute_labels' needs num_classes (the number of classes C per task).")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
      raise ValueError(
          f"num_classes must be an int >= 2 for kind='permute_labels' (with one class every "
          f"relabelling is the identity), got {num_classes!r}.")


def _labels(batch: PyTree, which: str, kind: str) -> jax.Array:
  """``batch["y"]``, checked against ``kind``: float for regression kinds, integer for label kinds."""
  if not isinstance(batch, Mapping) or "y" not in batch:
    raise ValueError(f"corrupt: the {which} batch must be a dict with a 'y' entry (the targets).")
  y = batch["y"]
  dtype = jnp.result_type(y)
  if kind in REGRESSION_CORRUPTIONS and not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
        f"corrupt: kind={kind!r} is for regression targets, but the {which} 'y' has dtype {dtype}; "
        f"for integer labels use one of {', '.join(LABEL_CORRUPTIONS)}.")
  if kind in LABEL_CORRUPTIONS and not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(
        f"corrupt: kind={kind!r} is for integer class labels, but the {which} 'y' has dtype {dtype}; "
        f"for regression targets use one of {', '.join(REGRESSION_CORRUPTIONS)}.")
  if jnp.ndim(y) < 2:
    raise ValueError(
        f"corrupt: the {which} 'y' has shape {jnp.shape(y)}; it needs a task axis and a point axis "
        f"[T, n, ...].")
  return y


def _noise(key, y_s, y_q, num_classes):
  """Gaussian targets with each task's clean root mean square ``s_t`` (over support and query)."""
  del num_classes
  t = y_s.shape[0]
  count = math.prod(y_s.shape[1:]) + math.prod(y_q.shape[1:])
  sq = (jnp.sum(jnp.square(jnp.reshape(y_s, (t, -1)).astype(jnp.float32)), axis=1)
        + jnp.sum(jnp.square(jnp.reshape(y_q, (t, -1)).astype(jnp.float32)), axis=1))
  rms = jnp.sqrt(sq / count)
  k_s, k_q = jax.random.split(key)

  def draw(k, y):
    scale = jnp.reshape(rms, (t,) + (1,) * (y.ndim - 1))
    return (scale * jax.random.normal(k, y.shape, jnp.float32)).astype(y.dtype)

  return draw(k_s, y_s), draw(k_q, y_q)


def _amplitude(key, y_s, y_q, num_classes):
  del key, num_classes
  return y_s * AMPLITUDE_FACTOR, y_q * AMPLITUDE_FACTOR


def _sign_flip(key, y_s, y_q, num_classes):
  del key, num_classes
  return y_s, -y_q


def _shuffle_labels(key, y_s, y_q, num_classes):
  """Each task's query labels permuted among its query positions (an independent permutation each)."""
  del num_classes
  keys = jax.random.split(key, y_q.shape[0])
  return y_s, jax.vmap(lambda k, y: jax.random.permutation(k, y, axis=0))(keys, y_q)


def _permute_labels(key, y_s, y_q, num_classes):
  """``y -> (y + r_t) mod C`` on each task's query, ``r_t ~ U{1, ..., C - 1}`` (never the identity)."""
  shift = jax.random.randint(key, (y_q.shape[0],), 1, num_classes).astype(y_q.dtype)
  shift = jnp.reshape(shift, (-1,) + (1,) * (y_q.ndim - 1))
  return y_s, (y_q + shift) % num_classes


_APPLY: dict[str, Callable] = {
    "noise": _noise,
    "amplitude": _amplitude,
    "sign_flip": _sign_flip,
    "shuffle_labels": _shuffle_labels,
    "permute_labels": _permute_labels,
}


def corrupt(key: jax.Array, support: PyTree, query: PyTree, *, fraction: float, kind: str,
            num_classes: int | None = None) -> tuple[PyTree, PyTree, jax.Array]:
  """Corrupts ``num_corrupted(T, fraction)`` tasks of a meta-batch, chosen uniformly at random.

  The chosen set is the first ``k`` entries of a uniform random permutation of ``0..T-1`` (uniform over
  all ``k``-subsets); the other tasks are returned bit for bit. See the module docstring for the kinds.

  Args:
    key: a PRNG key (split here into one key for the choice and one for the corruption).
    support, query: dicts with ``"y"`` of shapes ``[T, n_s, ...]`` and ``[T, n_q, ...]``: float targets
      for ``REGRESSION_CORRUPTIONS``, integer labels in ``0..C-1`` for ``LABEL_CORRUPTIONS``. Other
      entries (``"x"``) are passed through.
    fraction: static, in ``[0, 1]``. With 0 the inputs come back unchanged and nothing is drawn.
    kind: static, one of ``CORRUPTIONS``.
    num_classes: the class count ``C >= 2``, required for ``"permute_labels"`` and ignored otherwise.
      Labels outside ``0..C-1`` are not detected (the check would need concrete values under jit).

  Returns:
    ``(support, query, corrupted)``: the batches with corrupted tasks substituted, and a bool ``[T]``
    mask of the corrupted tasks.

  Raises:
    ValueError: for an unknown ``kind`` (listing the valid ones), a ``fraction`` outside ``[0, 1]``, a
      missing or invalid ``num_classes`` for ``"permute_labels"``, a batch without ``"y"``, a regression
      kind on integer labels or a label kind on float targets, or support and query that disagree on
      ``T``.
  """
  _check_kind(kind, num_classes)
  y_s, y_q = _labels(support, "support", kind), _labels(query, "query", kind)
  t = y_q.shape[0]
  if y_s.shape[0] != t:
    raise ValueError(f"corrupt: support has T={y_s.shape[0]} tasks but query has T={t}.")
  k = num_corrupted(t, fraction)
  if k == 0:
    return support, query, jnp.zeros((t,), bool)
  k_choose, k_apply = jax.random.split(key)
  chosen = jax.random.permutation(k_choose, t)[:k]
  mask = jnp.zeros((t,), bool).at[chosen].set(True)
  new_s, new_q = _APPLY[kind](k_apply, y_s, y_q, num_classes)

  def select(new, old):
    return jnp.where(jnp.reshape(mask, (t,) + (1,) * (old.ndim - 1)), new, old)

  return ({**support, "y": select(new_s, y_s)}, {**query, "y": select(new_q, y_q)}, mask)


def make_corrupted_sampler(sample: Callable, *, fraction: float, kind: str,
                           num_classes: int | None = None) -> Callable:
  """Wraps a task sampler so that every meta-batch it returns is corrupted by :func:`corrupt`.

  Args:
    sample: ``(key, num_tasks, data) -> (support, query)``, a :class:`~gajax.tasks.base.Task` sampler.
    fraction, kind, num_classes: as in :func:`corrupt`; checked here, once.

  Returns:
    ``sample2(key, num_tasks, data=None) -> (support, query)``, pure and jittable like ``sample``. The
    clean batch is ``sample(key, num_tasks, data)``, the very batch the unwrapped sampler returns for
    the same key; the corruption uses ``jax.random.fold_in(key, _STREAM)``. With ``fraction = 0`` it
    returns the clean batch.
  """
  _check_fraction(fraction)
  _check_kind(kind, num_classes)

  def sample2(key: jax.Array, num_tasks: int, data: PyTree = None) -> tuple[PyTree, PyTree]:
    support, query = sample(key, num_tasks, data)
    support, query, _ = corrupt(jax.random.fold_in(key, _STREAM), support, query, fraction=fraction,
                                kind=kind, num_classes=num_classes)
    return support, query

  return sample2
