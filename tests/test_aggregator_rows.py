"""Reductions over the task axis as row chains, and the sorting network, against NumPy references."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gajax.aggregators import _rows
from gajax.aggregators.trimmed_mean import trimmed_mean_leaf


def _apply_network(values, n):
  """Runs the comparators on a NumPy array ``[n, m]`` (the network's own arithmetic, in NumPy)."""
  x = np.array(values)
  for a, b in _rows.odd_even_merge_sort_pairs(n):
    x[a], x[b] = np.minimum(x[a], x[b]), np.maximum(x[a], x[b])
  return x


@pytest.mark.parametrize("n", range(1, 15))
def test_network_sorts_every_zero_one_input(n):
  # The 0-1 principle (Knuth, TAOCP 5.3.4): a comparator network sorts every input iff it sorts every
  # one of the 2^n inputs of zeros and ones; this checks all of them, powers of two and not.
  inputs = np.array(list(itertools.product([0, 1], repeat=n)), np.int8).T
  out = _apply_network(inputs, n)
  assert (np.diff(out, axis=0) >= 0).all()
  assert (out.sum(0) == inputs.sum(0)).all()


def test_network_sorts_random_permutations_of_every_size_up_to_33():
  rng = np.random.default_rng(0)
  for n in range(1, 34):
    values = np.stack([rng.permutation(n) for _ in range(50)], axis=1)
    np.testing.assert_array_equal(_apply_network(values, n), np.sort(values, axis=0))


def test_network_sizes_and_validation():
  # Batcher's odd-even merge sort: (1/4) n log n (log n - 1) + n - 1 comparators for n a power of two.
  for n in (2, 4, 8, 16, 32, 64):
    m = n.bit_length() - 1
    assert len(_rows.odd_even_merge_sort_pairs(n)) == n * m * (m - 1) // 4 + n - 1
  assert all(a < b < 20 for a, b in _rows.odd_even_merge_sort_pairs(20))
  with pytest.raises(ValueError, match="n must be >= 1"):
    _rows.odd_even_merge_sort_pairs(0)


def _special_values(t, p, seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(t, p)).astype(np.float32)
  x[:, 0] = np.nan                        # every task NaN
  x[rng.integers(t), 1] = np.nan          # one NaN
  x[:3, 2] = np.nan                       # three NaNs
  x[:, 3] = 1.5                           # all tied
  x[0, 4], x[1, 4] = np.inf, -np.inf
  return x


@pytest.mark.parametrize("t", [2, 5, 32, 33])
def test_sorted_rows_equals_numpy_sort_nans_last(t):
  # t = 33 is past MAX_NETWORK_TASKS and takes jnp.sort; the others take the network.
  x = _special_values(t, 40, seed=t)
  rows = jax.jit(lambda v: jnp.stack(_rows.sorted_rows(v)))(jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(rows), np.sort(x, axis=0))  # NaN == NaN here
  for dtype in (jnp.bfloat16, jnp.float16, jnp.float8_e4m3fn):  # the last has no inf: jnp.sort
    low = jnp.asarray(x, dtype)
    out = jax.jit(lambda v: jnp.stack(_rows.sorted_rows(v)))(low)
    assert out.dtype == dtype
    np.testing.assert_array_equal(np.asarray(out, np.float32),
                                  np.sort(np.asarray(low, np.float32), axis=0))


@pytest.mark.parametrize("t", [1, 2, 7, 128, 129, 300])
def test_reduce_rows_sum_and_max_match_float64(t):
  # 300 rows: two chunks of 128 in the loop and 44 left over; 129: one chunk and one row.
  x = np.random.default_rng(t).normal(size=(t, 3, 5)).astype(np.float32)
  s = jax.jit(_rows.sum_rows)(jnp.asarray(x))
  assert s.dtype == jnp.float32 and s.shape == (3, 5)
  np.testing.assert_allclose(np.asarray(s), x.astype(np.float64).sum(0), rtol=1e-5, atol=1e-5)
  m = jax.jit(lambda v: _rows.max_rows(v, jnp.abs))(jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(m), np.abs(x).max(0))
  signs = jax.jit(lambda v: _rows.reduce_rows(v, jnp.add, lambda r: jnp.sign(r).astype(jnp.int32)))(
      jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(signs), np.sign(x).astype(np.int64).sum(0))


def test_trimmed_mean_above_the_network_sums_the_sorted_slice():
  """Above 32 tasks the trimmed mean sums a slice of ``jnp.sort``'s output (NaNs last) through the
  bounded row chain; it matches float64 NumPy, NaN where more than ``trim`` tasks are NaN."""
  t, trim = 40, 3
  x = np.random.default_rng(5).normal(size=(t, 6)).astype(np.float32)
  x[:2, 0] = np.nan    # 2 NaNs <= trim: cut
  x[:4, 1] = np.nan    # 4 NaNs > trim: NaN
  x[5, 2] = 1e30       # an outlier: cut
  out = np.asarray(jax.jit(lambda v: trimmed_mean_leaf(v, trim))(jnp.asarray(x)))
  ref = np.sort(x.astype(np.float64), axis=0)[trim:t - trim].mean(0)
  np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-7)
  assert np.isnan(out[1]) and np.isfinite(out[0]) and abs(out[2]) < 10


def test_trimmed_mean_cuts_up_to_trim_nans_and_keeps_more():
  t, trim = 9, 2
  x = _special_values(t, 12, seed=3)
  out = np.asarray(jax.jit(lambda v: trimmed_mean_leaf(v, trim))(jnp.asarray(x)))
  with np.errstate(invalid="ignore"):
    ref = np.sort(x.astype(np.float64), axis=0)[trim:t - trim].mean(0)
  np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-7)   # NaN where the reference is NaN
  assert np.isnan(out[0]) and np.isnan(out[2])   # all NaN; 3 NaNs > trim = 2
  assert np.isfinite(out[1])                      # one NaN task is cut like any outlier
  assert np.isfinite(out[4])                      # +inf and -inf are cut at either end
  assert out[3] == 1.5
