"""PCGrad, GradVac, GradDrop, AND-mask, trimmed mean and the registry, against float64 NumPy references."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gajax.aggregators import registry
from gajax.aggregators.and_mask import and_mask
from gajax.aggregators.graddrop import (graddrop, graddrop_combine, graddrop_mask, graddrop_purity,
                                        graddrop_uniforms)
from gajax.aggregators.gradvac import GradVacState, gradvac
from gajax.aggregators.pcgrad import pcgrad, pcgrad_weights, projection_order
from gajax.aggregators.trimmed_mean import trimmed_mean

# Every test uses the same two-leaf structure, P = 10 coordinates, so compiled functions are reused.
_SHAPES = {"b": (4,), "w": (3, 2)}
P = 10


def to_tree(j, dtype=jnp.float32):
  """``[T, 10]`` -> ``{"b": [T, 4], "w": [T, 3, 2]}`` (``b`` first: the order of ``tree_leaves``)."""
  j = np.asarray(j)
  t = j.shape[0]
  return {"b": jnp.asarray(j[:, :4].reshape(t, 4), dtype),
          "w": jnp.asarray(j[:, 4:].reshape(t, 3, 2), dtype)}


def flat(tree):
  return np.concatenate([np.asarray(tree["b"], np.float64).reshape(-1),
                         np.asarray(tree["w"], np.float64).reshape(-1)])


def rand(seed, t, p=P):
  return np.random.default_rng(seed).normal(size=(t, p))


@functools.lru_cache(maxsize=None)
def jitted_update(tx_name, *args):
  """One jitted ``update`` per (transform, arguments); the transform is rebuilt for ``init``."""
  seed_key = lambda seed: None if seed is None else jax.random.PRNGKey(seed)
  tx = {"pcgrad": lambda seed: pcgrad(seed_key(seed)),
        "gradvac": lambda t, beta, seed=None: gradvac(t, beta, seed_key(seed)),
        "graddrop": lambda seed, leak: graddrop(seed_key(seed), leak),
        "and_mask": and_mask, "trimmed_mean": trimmed_mean}[tx_name](*args)
  return tx, jax.jit(tx.update)


def fixed_order(t):
  return [[j for j in range(t) if j != i] for i in range(t)]


# ---------------------------------------------------------------------------------------------------
# PCGrad


def np_pcgrad(j, order):
  """Algorithm 1 of Yu et al. (2020), literally, on explicit float64 vectors; returns the sum."""
  out = []
  for i in range(len(j)):
    g = j[i].copy()
    for k in order[i]:
      dot = g @ j[k]
      if dot < 0:
        g = g - dot / (j[k] @ j[k]) * j[k]
    out.append(g)
  return np.sum(out, axis=0)


def run_pcgrad(j, key=None):
  tx, update = jitted_update("pcgrad", key)
  return update(to_tree(j), tx.init(None))


def test_pcgrad_matches_numpy_fixed_order():
  for seed in range(3):
    j = rand(seed, 4)
    out, state = run_pcgrad(j)
    ref = np_pcgrad(j, fixed_order(4))
    np.testing.assert_allclose(flat(out), ref, atol=1e-5 * np.linalg.norm(ref))
    assert state.key is None


def test_pcgrad_matches_numpy_random_order_and_splits_key():
  tx, update = jitted_update("pcgrad", 3)
  state = tx.init(None)
  seen = set()
  for seed in range(3):
    j = rand(10 + seed, 4)
    next_key, sub = jax.random.split(state.key)
    order = np.asarray(projection_order(4, sub))
    seen.add(order.tobytes())
    out, state = update(to_tree(j), state)
    np.testing.assert_array_equal(np.asarray(state.key), np.asarray(next_key))
    ref = np_pcgrad(j, order)
    np.testing.assert_allclose(flat(out), ref, atol=1e-5 * np.linalg.norm(ref))
  assert len(seen) > 1  # the order changes between updates


def test_projection_order_rows_are_permutations_of_the_others():
  for key in (None, jax.random.PRNGKey(0)):
    order = np.asarray(projection_order(5, key))
    chex.assert_shape(order, (5, 4))
    for i, row in enumerate(order):
      assert sorted(row.tolist()) == [k for k in range(5) if k != i]
  np.testing.assert_array_equal(np.asarray(projection_order(5)), np.array(fixed_order(5)))
  chex.assert_shape(projection_order(1), (1, 0))


def test_pcgrad_two_tasks_closed_form():
  rng = np.random.default_rng(0)
  g1 = rng.normal(size=P)
  g2 = -g1 + 0.5 * rng.normal(size=P)  # conflicting
  assert g1 @ g2 < 0
  expected = (g1 - (g1 @ g2) / (g2 @ g2) * g2) + (g2 - (g1 @ g2) / (g1 @ g1) * g1)
  out, _ = run_pcgrad(np.stack([g1, g2]))
  np.testing.assert_allclose(flat(out), expected, atol=1e-5 * np.linalg.norm(g1))
  # Both projected gradients are orthogonal to the other task: <A, g_i> = <g_i', g_i> = |g_i'|^2 >= 0.
  # Without conflict, PCGrad is the plain sum.
  h2 = g1 + 0.1 * rng.normal(size=P)
  out, _ = run_pcgrad(np.stack([g1, h2]))
  np.testing.assert_allclose(flat(out), g1 + h2, rtol=1e-5, atol=1e-6)


def test_pcgrad_weights_on_gramian():
  j = rand(7, 4)
  w = np.asarray(pcgrad_weights(jnp.asarray(j @ j.T, jnp.float32)))
  np.testing.assert_allclose(w @ j, np_pcgrad(j, fixed_order(4)), atol=1e-4)
  order = jnp.array([[3, 2, 1], [3, 0, 2], [0, 1, 3], [2, 1, 0]])
  w = np.asarray(pcgrad_weights(jnp.asarray(j @ j.T, jnp.float32), order))
  np.testing.assert_allclose(w @ j, np_pcgrad(j, np.asarray(order)), atol=1e-4)


def test_pcgrad_fixed_order_is_not_permutation_invariant():
  j = np.array([[-0.7, -0.2], [1.7, 0.7], [-1.6, 0.0]])
  j = np.pad(j, ((0, 0), (0, P - 2)))
  perm = [2, 0, 1]
  a, _ = run_pcgrad(j[:3])
  b, _ = run_pcgrad(j[perm])
  np.testing.assert_allclose(flat(a), np_pcgrad(j, fixed_order(3)), atol=1e-5)
  np.testing.assert_allclose(flat(b), np_pcgrad(j[perm], fixed_order(3)), atol=1e-5)
  assert np.abs(flat(a) - flat(b)).max() > 0.1


def test_pcgrad_extreme_scales_and_zero_rows():
  j = rand(1, 4)
  ref = np_pcgrad(j, fixed_order(4))
  for scale in (1e-30, 1e30):
    out, _ = run_pcgrad(j * scale)
    np.testing.assert_allclose(flat(out) / scale, ref, atol=1e-4 * np.linalg.norm(ref))
  j[2] = 0.0
  out, _ = run_pcgrad(j)
  assert np.all(np.isfinite(flat(out)))
  np.testing.assert_allclose(flat(out), np_pcgrad(j, fixed_order(4)), atol=1e-4)


# ---------------------------------------------------------------------------------------------------
# GradVac


def np_gradvac(j, phi_hat, beta, order):
  """Algorithm 1 of Wang et al. (2021) on explicit float64 vectors; returns (sum, new phi_hat)."""
  phi_hat = np.array(phi_hat, np.float64)
  out = []
  for i in range(len(j)):
    g = j[i].copy()
    for k in order[i]:
      ni, nk = np.linalg.norm(g), np.linalg.norm(j[k])
      if ni == 0 or nk == 0:
        continue
      cos = g @ j[k] / (ni * nk)
      target = phi_hat[i, k]
      if cos < target:
        g = g + ni * (target * np.sqrt(1 - cos**2) - cos * np.sqrt(1 - target**2)) / (
            nk * np.sqrt(1 - target**2)) * j[k]
      phi_hat[i, k] = (1 - beta) * target + beta * cos
    out.append(g)
  return np.sum(out, axis=0), phi_hat


def test_gradvac_matches_numpy_over_several_steps():
  t, beta = 4, 0.5
  tx, update = jitted_update("gradvac", t, beta)
  state = tx.init(None)
  phi = np.zeros((t, t))
  rng = np.random.default_rng(0)
  common = rng.normal(size=P)
  for step in range(4):
    # Positively correlated tasks whose correlation drops: targets > 0 get enforced.
    j = (1.0 - 0.3 * step) * common + rng.normal(size=(t, P))
    out, state = update(to_tree(j), state)
    ref, phi = np_gradvac(j, phi, beta, fixed_order(t))
    np.testing.assert_allclose(flat(out), ref, atol=1e-4 * np.linalg.norm(ref))
    np.testing.assert_allclose(np.asarray(state.phi_hat), phi, atol=1e-5)


def test_gradvac_given_targets_and_random_order():
  t, beta = 4, 0.01
  key = jax.random.PRNGKey(5)
  tx, update = jitted_update("gradvac", t, beta, 5)
  rng = np.random.default_rng(1)
  phi0 = rng.uniform(-0.5, 0.8, size=(t, t))
  np.fill_diagonal(phi0, 0.0)
  state = GradVacState(phi_hat=jnp.asarray(phi0, jnp.float32), key=key)
  j = rng.normal(size=(t, P))
  next_key, sub = jax.random.split(key)
  order = np.asarray(projection_order(t, sub))
  out, state = update(to_tree(j), state)
  ref, phi = np_gradvac(j, phi0, beta, order)
  np.testing.assert_allclose(flat(out), ref, atol=1e-4 * np.linalg.norm(ref))
  np.testing.assert_allclose(np.asarray(state.phi_hat), phi, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(state.key), np.asarray(next_key))


def test_gradvac_two_tasks_reaches_target_cosine():
  rng = np.random.default_rng(2)
  g1, g2 = rng.normal(size=P), rng.normal(size=P)
  target = 0.6
  tx, update = jitted_update("gradvac", 2, 0.0)
  state = GradVacState(phi_hat=jnp.full((2, 2), target, jnp.float32), key=None)
  out, state = update(to_tree(np.stack([g1, g2])), state)
  ref, _ = np_gradvac(np.stack([g1, g2]), np.full((2, 2), target), 0.0, fixed_order(2))
  np.testing.assert_allclose(flat(out), ref, atol=1e-4 * np.linalg.norm(ref))
  # Closed form for task 1: g1' = g1 + a g2 with cos(g1', g2) = target.
  cos = g1 @ g2 / np.linalg.norm(g1) / np.linalg.norm(g2)
  a = np.linalg.norm(g1) * (target * np.sqrt(1 - cos**2) - cos * np.sqrt(1 - target**2)) / (
      np.linalg.norm(g2) * np.sqrt(1 - target**2))
  g1p = g1 + a * g2
  np.testing.assert_allclose(g1p @ g2 / np.linalg.norm(g1p) / np.linalg.norm(g2), target, atol=1e-9)
  np.testing.assert_allclose(np.asarray(state.phi_hat), np.full((2, 2), target))  # beta = 0


def test_gradvac_with_zero_targets_and_beta_zero_is_pcgrad():
  j = rand(3, 4)
  tx, update = jitted_update("gradvac", 4, 0.0)
  out, state = update(to_tree(j), tx.init(None))
  np.testing.assert_allclose(flat(out), np_pcgrad(j, fixed_order(4)), atol=1e-4)
  np.testing.assert_array_equal(np.asarray(state.phi_hat), 0.0)


def test_gradvac_degenerate_inputs_and_validation():
  tx, update = jitted_update("gradvac", 4, 0.5)
  state = tx.init(None)
  j = rand(4, 4)
  j[1] = 0.0
  j[2] = j[3]
  for inp in (j, j * 1e30, j * 1e-30, np.zeros((4, P)), np.stack([j[0], -j[0], j[0], -j[0]])):
    out, state = update(to_tree(inp), state)
    assert np.all(np.isfinite(flat(out)))
    assert np.all(np.isfinite(np.asarray(state.phi_hat)))
  # Target +1 exactly (no finite exact step): still finite.
  state = GradVacState(phi_hat=jnp.ones((4, 4), jnp.float32), key=None)
  out, _ = update(to_tree(rand(5, 4)), state)
  assert np.all(np.isfinite(flat(out)))
  with pytest.raises(ValueError, match="num_tasks=4 but the updates have T=3"):
    gradvac(4).update(to_tree(rand(0, 3)), gradvac(4).init(None))
  with pytest.raises(ValueError, match="beta"):
    gradvac(4, beta=1.5)


# ---------------------------------------------------------------------------------------------------
# GradDrop


def np_graddrop(g, u, leak=0.0):
  """Chen et al. (2020) per coordinate, float64: g ``[T, P]``, u ``[P]``."""
  total, mass = g.sum(0), np.abs(g).sum(0)
  purity = np.where(mass > 0, 0.5 * (1 + total / np.where(mass > 0, mass, 1)), 0.5)
  mask = ((purity > u) & (g > 0)) | ((purity < u) & (g < 0))
  return ((leak + (1 - leak) * mask) * g).sum(0), purity


def test_graddrop_combine_matches_numpy_given_uniforms():
  rng = np.random.default_rng(0)
  g = rng.normal(size=(5, 200))
  g[:, :20] = np.abs(g[:, :20])  # pure positive
  g[:, 20:40] = -np.abs(g[:, 20:40])  # pure negative
  g[:, 40:50] = 0.0  # no mass
  g[2, 50:60] = 0.0
  u = rng.uniform(size=200)
  gj = jnp.asarray(g, jnp.float32)
  for leak in (0.0, 0.3):
    ref, purity = np_graddrop(g, u, leak)
    out = graddrop_combine(gj, jnp.asarray(u, jnp.float32), leak)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(graddrop_purity(gj)), purity, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(graddrop_purity(gj))[40:50], 0.5)
  mask = np.asarray(graddrop_mask(gj, graddrop_purity(gj), jnp.asarray(u, jnp.float32)))
  # Each coordinate keeps one sign only.
  assert not np.any((mask & (g > 0)).any(0) & (mask & (g < 0)).any(0))


@pytest.mark.parametrize("t", [40, 130])
def test_graddrop_and_and_mask_with_many_tasks_match_numpy(t):
  # 40 tasks: one unrolled chain; 130: a chunk of 128 rows, then 2 more.
  rng = np.random.default_rng(t)
  g = rng.normal(size=(t, 64))
  g[:, :8] = np.abs(g[:, :8])
  g[:, 8:16] *= 1e-30  # tiny but normal in float32
  u = rng.uniform(size=64)
  ref, purity = np_graddrop(g, u, 0.25)
  gj = jnp.asarray(g, jnp.float32)
  out = jax.jit(graddrop_combine, static_argnums=2)(gj, jnp.asarray(u, jnp.float32), 0.25)
  scale = np.abs(g).max(0)  # compare per column at its own size
  np.testing.assert_allclose(np.asarray(out) / scale, ref / scale, atol=1e-5)
  np.testing.assert_allclose(np.asarray(jax.jit(graddrop_purity)(gj)), purity, atol=1e-6)
  g[:, 16:24] = -np.abs(g[:, 16:24])
  g[:3, 24:32] = 0.0
  for threshold in (0.0, 0.1, 1.0):
    out = and_mask(threshold).update({"w": jnp.asarray(g, jnp.float32)}, None)[0]["w"]
    np.testing.assert_allclose(np.asarray(out), np_and_mask(g, threshold), rtol=1e-5, atol=1e-6)


def test_graddrop_transform_uses_split_key_and_per_leaf_draws():
  tx, update = jitted_update("graddrop", 1, 0.0)
  state = tx.init(None)
  for seed in range(2):
    tree = to_tree(rand(seed, 4))
    next_key, sub = jax.random.split(state.key)
    uniforms = graddrop_uniforms(sub, tree)
    out, state = update(tree, state)
    np.testing.assert_array_equal(np.asarray(state.key), np.asarray(next_key))
    for name in _SHAPES:
      ref, _ = np_graddrop(np.asarray(tree[name], np.float64).reshape(4, -1),
                           np.asarray(uniforms[name], np.float64).reshape(-1))
      np.testing.assert_allclose(np.asarray(out[name]).reshape(-1), ref, rtol=1e-5, atol=1e-5)


def test_graddrop_same_sign_is_sum_and_leak_one_is_sum():
  tx, update = jitted_update("graddrop", 2, 0.0)
  state = tx.init(None)
  j = np.abs(rand(0, 4)) * np.sign(rand(1, 1))  # one sign per coordinate, shared by all tasks
  j[1, :3] = 0.0
  for _ in range(3):
    out, state = update(to_tree(j), state)
    np.testing.assert_allclose(flat(out), j.sum(0), rtol=1e-6, atol=1e-6)
  tx1, update1 = jitted_update("graddrop", 2, 1.0)
  j = rand(2, 4)
  out, _ = update1(to_tree(j), tx1.init(None))
  np.testing.assert_allclose(flat(out), j.sum(0), rtol=1e-5, atol=1e-6)


def test_graddrop_degenerate_and_validation():
  tx, update = jitted_update("graddrop", 2, 0.0)
  state = tx.init(None)
  for inp in (np.zeros((4, P)), rand(0, 4) * 1e30, rand(0, 4) * 1e-30):
    out, state = update(to_tree(inp), state)
    assert np.all(np.isfinite(flat(out)))
  out, _ = update(to_tree(np.zeros((4, P))), state)
  np.testing.assert_array_equal(flat(out), 0.0)
  with pytest.raises(ValueError, match="leak"):
    graddrop(jax.random.PRNGKey(0), leak=-0.1)
  with pytest.raises(ValueError, match="PRNG key"):
    graddrop(None)


# ---------------------------------------------------------------------------------------------------
# AND-mask


def np_and_mask(g, threshold):
  score = np.abs(np.sign(g).sum(0)) / g.shape[0]
  return np.where(score >= threshold - 1e-12, g.mean(0), 0.0)


def test_and_mask_matches_numpy():
  rng = np.random.default_rng(0)
  j = rng.normal(size=(3, P))
  j[:, 0] = [1.0, 2.0, 3.0]
  j[:, 1] = [1.0, -2.0, 3.0]
  j[:, 2] = [0.0, 2.0, 3.0]
  j[:, 3] = [0.0, 0.0, 0.0]
  j[:, 4] = [-1.0, -2.0, -0.5]
  for threshold in (0.0, 1.0 / 3.0, 0.5, 2.0 / 3.0, 1.0):
    _, update = jitted_update("and_mask", threshold)
    out, _ = update(to_tree(j), None)
    np.testing.assert_allclose(flat(out), np_and_mask(j, threshold), rtol=1e-6, atol=1e-7)
  _, update = jitted_update("and_mask", 1.0)
  out = flat(update(to_tree(j), None)[0])
  np.testing.assert_allclose(out[[0, 4]], [2.0, -3.5 / 3], rtol=1e-6)
  np.testing.assert_array_equal(out[[1, 2, 3]], 0.0)
  _, update = jitted_update("and_mask", 2.0 / 3.0)
  out = flat(update(to_tree(j), None)[0])
  np.testing.assert_allclose(out[2], 5.0 / 3.0, rtol=1e-6)  # score |0 + 1 + 1| / 3 = 2/3: kept
  assert out[1] == 0.0  # score |1 - 1 + 1| / 3 = 1/3: dropped
  for bad in (-0.1, 1.1):
    with pytest.raises(ValueError, match="threshold"):
      and_mask(bad)


# ---------------------------------------------------------------------------------------------------
# Trimmed mean


def test_trimmed_mean_matches_sorted_reference():
  j = rand(0, 7)
  j[3] = 1e6  # an outlier task
  for trim in (0, 1, 3):
    _, update = jitted_update("trimmed_mean", trim)
    out, _ = update(to_tree(j), None)
    ref = np.sort(j, axis=0)[trim:7 - trim].mean(0)
    np.testing.assert_allclose(flat(out), ref, rtol=1e-5, atol=1e-6)
  _, update = jitted_update("trimmed_mean", 1)
  assert np.abs(flat(update(to_tree(j), None)[0])).max() < 10.0  # the outlier is cut


def test_trimmed_mean_validation():
  with pytest.raises(ValueError, match=r"needs T > 2 \* trim = 4"):
    trimmed_mean(2).update(to_tree(rand(0, 4)), None)
  for bad in (-1, 1.5, True):
    with pytest.raises(ValueError, match="non-negative integer"):
      trimmed_mean(bad)


# ---------------------------------------------------------------------------------------------------
# Registry


def test_registry_names_and_errors():
  required = {"sum", "mean", "gradient_agreement", "random", "pcgrad", "mgda", "cagrad", "upgrad",
              "dualproj", "imtl_g", "aligned_mtl", "nash_mtl", "graddrop", "and_mask", "gradvac",
              "trimmed_mean", "krum"}
  assert required <= set(registry.names())
  assert registry.canonical_name("agreement") == "gradient_agreement"
  with pytest.raises(ValueError, match=r"valid names: .*pcgrad"):
    registry.get("no_such_method")
  with pytest.raises(ValueError, match=r"'pcgrad' does not take bogus; it takes: key"):
    registry.get("pcgrad", bogus=1)
  with pytest.raises(ValueError, match="num_tasks"):
    registry.get("gradvac")
  with pytest.raises(ValueError, match="trim"):
    registry.get("trimmed_mean")


def test_registry_builds_and_defaults_key():
  j = to_tree(rand(0, 4))
  tx = registry.get("graddrop")  # key defaulted
  assert np.asarray(tx.init(None).key).tolist() == np.asarray(jax.random.PRNGKey(0)).tolist()
  assert registry.get("pcgrad").init(None).key is None  # optional key: deterministic order
  tx = registry.get("agreement")
  out, _ = jax.jit(tx.update)(j, tx.init(None))
  chex.assert_trees_all_equal_shapes_and_dtypes(out, jax.tree_util.tree_map(lambda x: x[0], j))
  tx = registry.get("gradvac", num_tasks=4, beta=0.1)
  chex.assert_shape(tx.init(None).phi_hat, (4, 4))
