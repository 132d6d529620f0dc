"""Gradient agreement (eq. 13) against an independent float64 NumPy implementation, and its edge cases."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gajax import aggregators


def random_tree(rng, t, dtype=np.float32):
  return {"w": rng.normal(size=(t, 3, 4)).astype(dtype), "b": rng.normal(size=(t, 4)).astype(dtype),
          "nested": [rng.normal(size=(t, 2)).astype(dtype)]}


def reference_weights(tree):
  """Eq. 13 literally, with the full Gram matrix, in float64."""
  flat = np.concatenate([np.asarray(x, np.float64).reshape(x.shape[0], -1)
                         for x in jax.tree_util.tree_leaves(tree)], axis=1)
  gram = flat @ flat.T
  row = gram.sum(axis=1)
  return row / np.abs(row).sum()


@pytest.mark.parametrize("t", [1, 2, 5, 32])
def test_weights_match_float64_reference(t):
  tree = random_tree(np.random.default_rng(t), t)
  # Shift toward a common direction so the weights are not all tiny and the test is meaningful.
  w = np.asarray(aggregators.agreement_weights(tree))
  chex.assert_shape(w, (t,))
  np.testing.assert_allclose(w, reference_weights(tree), rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(np.abs(w).sum(), 1.0, rtol=1e-6)


def test_weights_are_signed_for_a_dissenting_task():
  tree = {"g": np.array([[1.0, 0.0], [1.0, 0.1], [-1.0, 0.0]], np.float32)}
  w = np.asarray(aggregators.agreement_weights(tree))
  assert w[2] < 0 < w[0]


@pytest.mark.parametrize("scale", [1e-30, 1e-3, 7.0, 1e30])
def test_weights_invariant_to_common_positive_scale(scale):
  tree = random_tree(np.random.default_rng(0), 6)
  base = np.asarray(aggregators.agreement_weights(tree))
  scaled = np.asarray(aggregators.agreement_weights(
      jax.tree_util.tree_map(lambda x: x * np.float32(scale), tree)))
  np.testing.assert_allclose(scaled, base, rtol=1e-4, atol=1e-6)


def test_transform_output_is_weighted_sum_without_one_over_t():
  tree = random_tree(np.random.default_rng(1), 5)
  tx = aggregators.gradient_agreement()
  out, state = tx.update(tree, tx.init(None))
  w = reference_weights(tree)
  want = jax.tree_util.tree_map(lambda leaf: np.tensordot(w, leaf.astype(np.float64), axes=1), tree)
  chex.assert_trees_all_close(out, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(state.weights, w, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("tree", [
    {"g": np.zeros((4, 3), np.float32)},
    {"g": np.array([[1.0, 2.0], [-1.0, -2.0]], np.float32)},            # exactly cancelling
    {"g": np.array([[1.0, 2.0], [-1.0, -2.0], [0.0, 0.0]], np.float32)},
    # cancelling at two sizes, with entries 1 / peak would round: G must still be exactly 0
    {"g": np.array([[0.3, -1.7, 0.1], [-0.3, 1.7, -0.1], [0.6, -3.4, 0.2], [-0.6, 3.4, -0.2]],
                   np.float32)},
])
def test_zero_batch_sum_gives_finite_zero_update(tree):
  tx = aggregators.gradient_agreement()
  out, state = tx.update(tree, tx.init(None))
  assert np.all(np.isfinite(state.weights))
  np.testing.assert_allclose(np.abs(state.weights).sum(), 1.0, rtol=1e-6)
  np.testing.assert_allclose(out["g"], 0.0, atol=1e-6)
  np.testing.assert_allclose(state.weights, 1.0 / tree["g"].shape[0], rtol=1e-6)  # G = 0: uniform


def test_separate_signal_sets_weights_and_updates_are_aggregated():
  rng = np.random.default_rng(2)
  updates = random_tree(rng, 4)
  signal = {"d": rng.normal(size=(4, 7)).astype(np.float32)}
  tx = optax.chain(aggregators.gradient_agreement(num_tasks=4), optax.sgd(1.0))
  params = jax.tree_util.tree_map(lambda x: x[0], updates)
  out, state = tx.update(updates, tx.init(params), params, agreement_signal=signal)
  w = reference_weights(signal)
  np.testing.assert_allclose(state[0].weights, w, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(out["b"], -np.tensordot(w, updates["b"], axes=1), rtol=1e-4, atol=1e-5)


def test_bfloat16_leaves_accumulate_in_float32():
  tree = random_tree(np.random.default_rng(3), 8)
  bf16 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), tree)
  w = aggregators.agreement_weights(bf16)
  assert w.dtype == jnp.float32
  # The reference sees exactly the bf16-rounded inputs, so only float32 accumulation error remains.
  rounded = jax.tree_util.tree_map(lambda x: np.asarray(x.astype(jnp.float32)), bf16)
  np.testing.assert_allclose(w, reference_weights(rounded), rtol=1e-4, atol=1e-6)
  out, _ = aggregators.gradient_agreement().update(bf16, aggregators.gradient_agreement().init(None))
  assert out["w"].dtype == jnp.bfloat16


def test_jit_matches_eager():
  tree = random_tree(np.random.default_rng(4), 5)
  tx = aggregators.gradient_agreement(num_tasks=5)
  eager = tx.update(tree, tx.init(None))
  jitted = jax.jit(tx.update)(tree, tx.init(None))
  chex.assert_trees_all_close(eager, jitted, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tree, message", [
    ({"a": np.zeros((3, 2)), "b": np.zeros((4, 2))}, "leading task axis"),
    ({"a": np.zeros((3, 2)), "b": np.float32(1.0)}, "scalar"),
    ({"a": np.zeros((0, 2))}, "T = 0"),
    ({"a": np.zeros((3, 2), np.int32)}, "floating point"),
    ({}, "no array leaves"),
])
def test_bad_input_raises_clear_error(tree, message):
  with pytest.raises(ValueError, match=message):
    aggregators.agreement_weights(tree)
  with pytest.raises(ValueError, match=message):
    aggregators.gradient_agreement().update(tree, aggregators.gradient_agreement().init(None))


def test_task_count_mismatch_with_signal_or_num_tasks():
  updates = {"a": np.ones((3, 2), np.float32)}
  with pytest.raises(ValueError, match="agreement_signal has T=2"):
    tx = aggregators.gradient_agreement()
    tx.update(updates, tx.init(None), agreement_signal={"d": np.ones((2, 5), np.float32)})
  with pytest.raises(ValueError, match="num_tasks=4"):
    tx = aggregators.gradient_agreement(num_tasks=4)
    tx.update(updates, tx.init(None))


def test_mean_is_the_average():
  tree = random_tree(np.random.default_rng(5), 6)
  out, _ = aggregators.mean().update(tree, aggregators.mean().init(None))
  np.testing.assert_allclose(out["w"], tree["w"].astype(np.float64).mean(0), rtol=1e-5, atol=1e-6)
