"""The cosine-normalised agreement variant: weights, the size invariance, the transformation, errors.

Expected weights come from an independent float64 NumPy reference over the flattened pytree.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gajax import aggregators
from gajax.aggregators import registry

P = 10


def to_tree(j, dtype=jnp.float32):
  """``[T, 10]`` -> a two-leaf pytree ``{"a": [T, 2, 3], "b": [T, 4]}``."""
  j = np.asarray(j)
  t = j.shape[0]
  return {"a": jnp.asarray(j[:, :6].reshape(t, 2, 3), dtype), "b": jnp.asarray(j[:, 6:], dtype)}


def flat(tree):
  """A parameter-shaped pytree ``{"a": [2, 3], "b": [4]}`` -> float64 ``[10]``."""
  return np.concatenate([np.asarray(tree["a"], np.float64).reshape(-1),
                         np.asarray(tree["b"], np.float64).reshape(-1)])


def as_float32(j):
  """The float64 array holding exactly the float32 values the aggregator sees."""
  return np.asarray(j, np.float32).astype(np.float64)


def reference_weights(j):
  """``cos(g_i, G) / sum_k |cos(g_k, G)|`` in float64; ``cos = 0`` for a zero row, uniform if ``G = 0``."""
  j = np.asarray(j, np.float64)
  total = j.sum(axis=0)
  norms = np.linalg.norm(j, axis=1) * np.linalg.norm(total)
  cos = np.divide(j @ total, norms, out=np.zeros(j.shape[0]), where=norms > 0)
  denom = np.abs(cos).sum()
  return cos / denom if denom > 0 else np.full(j.shape[0], 1.0 / j.shape[0])


def batch(t, seed):
  """Rows of very different sizes around a shared direction, so the weights are far from uniform."""
  rng = np.random.default_rng(seed)
  return as_float32((rng.normal(size=(t, P)) + 0.5) * np.exp(rng.normal(size=(t, 1))))


@pytest.mark.parametrize("t", [1, 2, 5, 32])
def test_weights_match_float64_reference(t):
  j = batch(t, t)
  w = aggregators.cosine_agreement_weights(to_tree(j))
  chex.assert_shape(w, (t,))
  chex.assert_type(w, jnp.float32)
  w = np.asarray(w)
  np.testing.assert_allclose(w, reference_weights(j), rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(np.abs(w).sum(), 1.0, rtol=1e-6)
  if t > 1:  # the variant really differs from eq. 13 on such a batch
    paper = np.asarray(aggregators.agreement_weights(to_tree(j)))
    assert np.max(np.abs(w - paper)) > 1e-2


def test_weights_ignore_the_size_of_one_task_given_the_batch_sum():
  """Scaling g_0 by c with G held fixed keeps w_0 / w_k; the paper's w_0 / w_k is multiplied by c.

  G is held fixed by moving the difference (c - 1) g_0 into task 1 (whose own weight then changes);
  tasks 2.. are untouched, so the ratios w_0 / w_k for k >= 2 isolate the effect of |g_0|.
  """
  j = batch(6, 11)
  for c in (1e-3, 0.5, 7.0, 1e3):
    moved = j.copy()
    moved[0] = c * j[0]
    moved[1] = j[1] - (c - 1.0) * j[0]
    moved = as_float32(moved)
    cos_before = np.asarray(aggregators.cosine_agreement_weights(to_tree(j)))
    cos_after = np.asarray(aggregators.cosine_agreement_weights(to_tree(moved)))
    np.testing.assert_allclose(cos_after[0] / cos_after[2:], cos_before[0] / cos_before[2:],
                               rtol=1e-3, err_msg=f"c={c}")
    # Contrast: eq. 13's weights are not invariant, their ratio scales by exactly c.
    paper_before = np.asarray(aggregators.agreement_weights(to_tree(j)))
    paper_after = np.asarray(aggregators.agreement_weights(to_tree(moved)))
    np.testing.assert_allclose(paper_after[0] / paper_after[2:], c * paper_before[0] / paper_before[2:],
                               rtol=1e-3, err_msg=f"c={c}")
    assert not np.allclose(paper_after[0] / paper_after[2:], paper_before[0] / paper_before[2:],
                           rtol=1e-2)


def test_common_scale_invariance_and_extreme_sizes():
  j = batch(5, 3)
  w = np.asarray(aggregators.cosine_agreement_weights(to_tree(j)))
  for scale in (1e-30, 1e30):
    np.testing.assert_allclose(aggregators.cosine_agreement_weights(to_tree(j * scale)), w,
                               rtol=1e-5, atol=1e-6)
  # Tasks 40 orders of magnitude apart: the small ones keep their cosines (one global rescale would
  # flush them to zero in float32).
  mixed = j * np.logspace(-20, 20, 5)[:, None]
  got = np.asarray(aggregators.cosine_agreement_weights(to_tree(mixed)))
  np.testing.assert_allclose(got, reference_weights(as_float32(mixed)), rtol=1e-4, atol=1e-6)
  assert np.all(got[:4] != 0)
  # Exact cancellation of the large entries leaves G = (0, 1e-30, 0, ...), whose squared norm underflows
  # float32 unless G is rescaled on its own: cos(g_0, G) = 0 and cos(g_1, G) = 1.
  j = np.zeros((2, P))
  j[0, 0], j[1, 0], j[1, 1] = 1.0, -1.0, 1e-30
  np.testing.assert_allclose(aggregators.cosine_agreement_weights(to_tree(j)), [0.0, 1.0], atol=1e-6)


def test_zero_sum_gives_uniform_and_zero_rows_get_zero_weight():
  g = np.random.default_rng(5).normal(size=P)
  for j in (np.zeros((4, P)), np.stack([g, -g, 2 * g, -2 * g])):
    np.testing.assert_array_equal(aggregators.cosine_agreement_weights(to_tree(j)), np.full(4, 0.25))
  j = batch(4, 6)
  j[2] = 0.0
  w = np.asarray(aggregators.cosine_agreement_weights(to_tree(j)))
  assert w[2] == 0.0
  np.testing.assert_allclose(w, reference_weights(j), rtol=2e-5, atol=1e-6)


def test_transformation_output_and_state():
  j = batch(5, 7)
  tx = aggregators.cosine_agreement(num_tasks=5)
  state = tx.init(None)
  chex.assert_shape(state.weights, (5,))
  out, state = tx.update(to_tree(j), state)
  w = reference_weights(j)
  np.testing.assert_allclose(flat(out), w @ j, rtol=1e-5, atol=1e-5 * np.abs(j).max())
  np.testing.assert_allclose(state.weights, w, rtol=2e-5, atol=1e-6)
  assert isinstance(state, aggregators.AgreementState)
  assert aggregators.cosine_agreement().init(None).weights.shape == (0,)


def test_agreement_signal_sets_the_weights():
  j, signal = batch(4, 8), batch(4, 9)
  tx = aggregators.cosine_agreement()
  # The signal may have another structure than the updates; only T must match.
  out, state = tx.update(to_tree(j), tx.init(None), agreement_signal={"s": jnp.asarray(signal)})
  w = reference_weights(signal)
  np.testing.assert_allclose(state.weights, w, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(flat(out), w @ j, rtol=1e-5, atol=1e-5 * np.abs(j).max())
  with pytest.raises(ValueError, match="cosine_agreement: agreement_signal has T=3"):
    tx.update(to_tree(j), tx.init(None), agreement_signal={"s": jnp.asarray(signal[:3])})


def test_errors():
  with pytest.raises(ValueError, match="num_tasks must be >= 1"):
    aggregators.cosine_agreement(num_tasks=0)
  tx = aggregators.cosine_agreement(num_tasks=4)
  with pytest.raises(ValueError, match="built for num_tasks=4 but the updates have T=5"):
    tx.update(to_tree(batch(5, 0)), tx.init(None))
  with pytest.raises(ValueError, match="floating point"):
    aggregators.cosine_agreement_weights({"a": jnp.ones((3, 2), jnp.int32)})


def test_jit_matches_eager_and_chains_with_optax():
  j = batch(5, 10)
  tx = aggregators.cosine_agreement(num_tasks=5)
  eager = tx.update(to_tree(j), tx.init(None))
  jitted = jax.jit(tx.update)(to_tree(j), tx.init(None))
  chex.assert_trees_all_close(jitted, eager, rtol=1e-6, atol=1e-7)  # the update and the state
  chex.assert_trees_all_close(jax.jit(aggregators.cosine_agreement_weights)(to_tree(j)),
                              aggregators.cosine_agreement_weights(to_tree(j)), rtol=1e-6, atol=1e-7)
  chain = optax.chain(aggregators.cosine_agreement(num_tasks=5), optax.sgd(0.5))
  params = {"a": jnp.zeros((2, 3)), "b": jnp.zeros((4,))}
  updates, _ = jax.jit(chain.update)(to_tree(j), chain.init(params), params)
  np.testing.assert_allclose(flat(updates), -0.5 * (reference_weights(j) @ j), rtol=1e-5,
                             atol=1e-5 * np.abs(j).max())


def test_registered_by_name():
  assert "cosine_agreement" in registry.names()
  tx = registry.get("cosine_agreement", num_tasks=3)
  assert tx.init(None).weights.shape == (3,)
  assert registry.factory("cosine_agreement") is aggregators.cosine_agreement
