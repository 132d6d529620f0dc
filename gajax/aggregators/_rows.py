"""Coordinate-wise reductions over the task axis, written as elementwise operations on task rows.

XLA's CPU backend runs a reduction over the *leading* axis of a ``[T, P]`` array (``jnp.sum(x,
axis=0)``, ``jnp.max(x, axis=0)``, ``jnp.sort(x, axis=0)``) far below memory speed: at ``T = 32,
P = 1e6`` on the project's 2-core machine ``jnp.sum(x, axis=0)`` took 455 ms where the chain
``x[0] + x[1] + ... + x[T-1]`` took 7 ms, and ``jnp.sort(x, axis=0)`` took 5.3 s (BUILD.md,
"Elementwise aggregators"). A chain of elementwise operations on rows fuses into one loop that reads
each row once, on every backend, so the coordinate-wise aggregators (trimmed mean, GradDrop, AND-mask)
reduce with the functions here.

Every function takes a leaf ``[T, *s]`` (or a list of ``T`` rows ``[*s]``) and returns ``[*s]``.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

# Rows per unrolled chain of :func:`reduce_rows`; longer leaves loop over chunks of this many rows, so
# that compile time stays bounded.
MAX_CHAIN = 128

# Up to this many tasks :func:`sorted_rows` uses the sorting network, which XLA:CPU fuses into one loop
# (T = 32: 191 comparators, 1.4 s to compile, no temporary buffer); beyond it, ``jnp.sort``. At T = 64
# (543 comparators) XLA:CPU took 28 s to compile the network, wrote 416 MB of temporaries and ran it no
# faster than the sort (BUILD.md, "Elementwise aggregators").
MAX_NETWORK_TASKS = 32


def reduce_rows(leaf: jax.Array, op: Callable[[jax.Array, jax.Array], jax.Array],
                row_fn: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
  """``op`` over ``f(x_0), ..., f(x_{T-1})``, coordinate-wise: ``[T, *s] -> [*s]``.

  ``op`` is associative and commutative (``jnp.add``, ``jnp.maximum``); ``row_fn`` (``f``, default the
  identity) maps each row elementwise first, e.g. a cast to float32 or ``jnp.abs``, and fuses with the
  reduction. Up to :data:`MAX_CHAIN` rows: the left fold ``op(op(f(x_0), f(x_1)), f(x_2))...``,
  unrolled. Beyond: a ``fori_loop`` over whole chunks of :data:`MAX_CHAIN` rows, each chunk's fold
  added to the accumulator, then the leftover rows (sums grouped differently: float rounding only).
  Folding the leaf in halves instead wrote a ``[T/2, P]`` array out and ran 7-13x slower at T = 128.
  """
  f = (lambda r: r) if row_fn is None else row_fn
  chain = lambda rows: functools.reduce(op, [f(rows[i]) for i in range(rows.shape[0])])
  t = leaf.shape[0]
  if t <= MAX_CHAIN:
    return chain(leaf)
  chunks, rest = divmod(t, MAX_CHAIN)

  def chunk_fold(i, acc):  # rows picked one by one: a [MAX_CHAIN, P] dynamic slice was copied out
    rows = [jax.lax.dynamic_index_in_dim(leaf, i * MAX_CHAIN + j, keepdims=False)
            for j in range(MAX_CHAIN)]
    return functools.reduce(op, [f(r) for r in rows], acc)

  acc = jax.lax.fori_loop(1, chunks, chunk_fold, chain(leaf[:MAX_CHAIN]))
  return op(acc, chain(leaf[chunks * MAX_CHAIN:])) if rest else acc


def sum_rows(leaf: jax.Array, row_fn: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
  """``sum_i f(x_i)`` in float32 (each row is cast before it is added): ``[T, *s] -> [*s]``."""
  cast = lambda r: (r if row_fn is None else row_fn(r)).astype(jnp.float32)
  return reduce_rows(leaf, jnp.add, cast)


def max_rows(leaf: jax.Array, row_fn: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
  """``max_i f(x_i)`` coordinate-wise, in the rows' dtype: ``[T, *s] -> [*s]``."""
  return reduce_rows(leaf, jnp.maximum, row_fn)


@functools.lru_cache(maxsize=None)
def odd_even_merge_sort_pairs(n: int) -> tuple[tuple[int, int], ...]:
  """The comparators ``(i, j)``, ``i < j``, of Batcher's odd-even merge sort on ``n`` wires.

  Applying them in order, each as ``(x_i, x_j) <- (min, max)``, sorts any ``n`` values ascending
  (Batcher, "Sorting networks and their applications", AFIPS 1968; Knuth, TAOCP vol. 3, 5.3.4). For
  ``n`` not a power of two the network for the next power of two is used without the comparators that
  touch a wire ``>= n``: those wires would hold ``+inf``, which such a comparator never moves, so the
  rest still sorts. ``n = 32``: 191 comparators, ``n = 128``: 1,471.
  """
  if n < 1:
    raise ValueError(f"odd_even_merge_sort_pairs: n must be >= 1, got {n}.")
  size = 1
  while size < n:
    size *= 2
  pairs = []
  p = 1
  while p < size:            # merge sorted runs of length p into runs of length 2p
    k = p
    while k >= 1:            # compare elements k apart
      for j in range(k % p, size - k, 2 * k):
        for i in range(min(k, size - j - k)):
          a, b = i + j, i + j + k
          if a // (2 * p) == b // (2 * p) and b < n:
            pairs.append((a, b))
      k //= 2
    p *= 2
  return tuple(pairs)


def sort_row_list(rows: Sequence[jax.Array]) -> list[jax.Array]:
  """Sorts ``T`` same-shape rows coordinate-wise, ascending, with :func:`odd_even_merge_sort_pairs`.

  Only ``jnp.minimum`` / ``jnp.maximum``, so the result is exact (every output is one of the inputs)
  and the whole network fuses into one elementwise loop. NaNs propagate through ``min``/``max``, so
  callers replace them first (see :func:`sorted_rows`).
  """
  rows = list(rows)
  for a, b in odd_even_merge_sort_pairs(len(rows)):
    rows[a], rows[b] = jnp.minimum(rows[a], rows[b]), jnp.maximum(rows[a], rows[b])
  return rows


# Dtypes the network sorts: real floats with an infinity to stand in for NaN (not float8_e4m3fn).
NETWORK_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)


def _sorts_by_network(leaf: jax.Array) -> bool:
  return leaf.shape[0] <= MAX_NETWORK_TASKS and any(leaf.dtype == d for d in NETWORK_DTYPES)


def sorted_rows(leaf: jax.Array) -> list[jax.Array]:
  """The ``T`` rows of ``jnp.sort(leaf, axis=0)``, NaNs last: ``[T, *s] -> T x [*s]``.

  Up to :data:`MAX_NETWORK_TASKS` rows of a float in :data:`NETWORK_DTYPES` go through the sorting
  network (NaNs are sorted as ``+inf`` and put back in the top ``n_nan`` positions, which is where
  ``jnp.sort`` places them); more rows, and other dtypes, through ``jnp.sort``. The values are those of
  ``jnp.sort`` except that the network orders ``-0.0`` before ``+0.0`` where ``jnp.sort`` keeps their
  input order; and where values tie, the gradient may be shared among the tied inputs differently.
  """
  t = leaf.shape[0]
  if not _sorts_by_network(leaf):
    ordered = jnp.sort(leaf, axis=0)
    return [ordered[i] for i in range(t)]
  nans = [jnp.isnan(leaf[i]) for i in range(t)]
  rows = sort_row_list([jnp.where(nans[i], jnp.inf, leaf[i]) for i in range(t)])
  n_nan = functools.reduce(jnp.add, [m.astype(jnp.int32) for m in nans])
  return [jnp.where(n_nan > t - 1 - i, jnp.nan, rows[i]).astype(leaf.dtype) for i in range(t)]


def sum_sorted_rows(leaf: jax.Array, start: int, stop: int) -> jax.Array:
  """``sum_{r = start}^{stop - 1} sorted[r]`` in float32, ``sorted = jnp.sort(leaf, axis=0)`` (NaNs
  last, as :func:`sorted_rows`): ``[T, *s] -> [*s]``. The network's rows are folded in order; the
  sorted array's slice goes through :func:`sum_rows`, whose chain stays bounded for any ``T``."""
  if _sorts_by_network(leaf):
    return functools.reduce(jnp.add, [row.astype(jnp.float32) for row in sorted_rows(leaf)[start:stop]])
  return sum_rows(jnp.sort(leaf, axis=0)[start:stop])
