"""Corrupted meta-batches (gajax.tasks.corruption): counts, each corruption against NumPy, errors, jit.

Regression batches are real sinusoid samples; label batches are built by hand (Omniglot's loader is
slow and not needed: the corruptions only look at ``"y"``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gajax.tasks import corruption, sinusoid

KEY = jax.random.PRNGKey(0)
# Compiling dominates this file; skipping LLVM's optimisations cuts XLA:CPU compile time by about half.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def sinusoids(t, shots=10, queries=10, seed=1):
  return sinusoid.sample_tasks(jax.random.PRNGKey(seed), t, shots=shots, queries=queries)


def labelled(t, ways=5, per_class=3, seed=2):
  """An N-way batch like Omniglot's: ``y`` int32 ``[T, ways * per_class]`` (each class ``per_class`` times,
  in a random order per task), ``x`` float32 ``[T, n, 4]``."""
  rng = np.random.default_rng(seed)
  n = ways * per_class

  def one():
    y = np.stack([rng.permutation(np.repeat(np.arange(ways), per_class)) for _ in range(t)])
    return {"x": jnp.asarray(rng.normal(size=(t, n, 4)), jnp.float32), "y": jnp.asarray(y, jnp.int32)}

  return one(), one()


def np_tree(tree):
  return {k: np.asarray(v) for k, v in tree.items()}


@functools.lru_cache(maxsize=None)
def jitted_corrupt(**kwargs):
  return jax.jit(functools.partial(corruption.corrupt, **kwargs), compiler_options=FAST_COMPILE)


def run(support, query, **kwargs):
  """``corrupt`` jitted (one compilation per shape instead of one per primitive and shape, eagerly);
  ``test_jit_matches_eager`` checks that the eager results are the same."""
  s, q, mask = jitted_corrupt(**kwargs)(KEY, support, query)
  return np_tree(s), np_tree(q), np.asarray(mask)


def assert_clean_rows_unchanged(new, old, mask):
  for name in old:
    np.testing.assert_array_equal(np.asarray(new[name])[~mask], np.asarray(old[name])[~mask])


@pytest.mark.parametrize("t,fraction,expected", [
    (1, 0.0, 0), (1, 0.4, 0), (1, 0.5, 1), (1, 1.0, 1), (5, 0.1, 1), (5, 0.5, 3), (10, 0.15, 2),
    (10, 0.25, 3), (16, 0.3, 5), (25, 0.2, 5), (32, 1.0, 32), (0, 0.5, 0)])
def test_num_corrupted_rounds_half_up(t, fraction, expected):
  assert corruption.num_corrupted(t, fraction) == expected


@pytest.mark.parametrize("kind", corruption.REGRESSION_CORRUPTIONS)
@pytest.mark.parametrize("t,fraction", [(8, 0.0), (8, 0.25), (7, 0.5), (8, 1.0), (32, 0.1)])
def test_exact_count_and_clean_tasks_bit_for_bit(kind, t, fraction):
  support, query = sinusoids(t)
  s, q, mask = run(support, query, fraction=fraction, kind=kind)
  assert mask.dtype == bool and mask.shape == (t,)
  assert mask.sum() == int(np.floor(fraction * t + 0.5))
  assert_clean_rows_unchanged(s, support, mask)
  assert_clean_rows_unchanged(q, query, mask)
  # Inputs are never touched, corrupted tasks included.
  np.testing.assert_array_equal(s["x"], support["x"])
  np.testing.assert_array_equal(q["x"], query["x"])
  if mask.any() and kind != "sign_flip":  # every corrupted task's support changed
    assert np.all(np.any(s["y"][mask] != np.asarray(support["y"])[mask], axis=(1, 2)))


def test_fraction_zero_returns_the_inputs():
  support, query = sinusoids(4)
  s, q, mask = corruption.corrupt(KEY, support, query, fraction=0.0, kind="noise")
  assert s is support and q is query
  assert not np.asarray(mask).any()


def test_chosen_set_depends_on_the_key_and_is_uniform():
  support, query = sinusoids(10)
  counts = np.zeros(10)
  masks = set()
  corrupt = jitted_corrupt(fraction=0.3, kind="amplitude")
  for i in range(200):
    _, _, mask = corrupt(jax.random.PRNGKey(i), support, query)
    mask = np.asarray(mask)
    assert mask.sum() == 3
    counts += mask
    masks.add(tuple(mask))
  assert len(masks) > 50  # C(10, 3) = 120 subsets; 200 draws hit many of them
  # Each task is chosen with probability 0.3: 60 of 200 expected, sd ~6.5.
  assert np.all(np.abs(counts - 60) < 30), counts


def test_amplitude_scales_support_and_query_by_ten():
  support, query = sinusoids(8)
  s, q, mask = run(support, query, fraction=0.5, kind="amplitude")
  np.testing.assert_allclose(s["y"][mask], 10.0 * np.asarray(support["y"])[mask], rtol=1e-6)
  np.testing.assert_allclose(q["y"][mask], 10.0 * np.asarray(query["y"])[mask], rtol=1e-6)


def test_sign_flip_negates_the_query_only():
  support, query = sinusoids(8)
  s, q, mask = run(support, query, fraction=0.5, kind="sign_flip")
  np.testing.assert_array_equal(s["y"], support["y"])
  np.testing.assert_array_equal(q["y"][mask], -np.asarray(query["y"])[mask])


def test_noise_is_uncorrelated_with_the_clean_targets_at_the_same_scale():
  support, query = sinusoids(6, shots=2000, queries=3000)
  s, q, mask = run(support, query, fraction=0.5, kind="noise")
  assert mask.sum() == 3
  for t in np.flatnonzero(mask):
    clean = np.concatenate([np.asarray(support["y"])[t].ravel(), np.asarray(query["y"])[t].ravel()])
    noisy = np.concatenate([s["y"][t].ravel(), q["y"][t].ravel()])
    # With 5000 points the sample correlation of independent series has sd ~0.014.
    assert abs(np.corrcoef(clean, noisy)[0, 1]) < 0.06
    rms_clean, rms_noisy = np.sqrt(np.mean(clean**2)), np.sqrt(np.mean(noisy**2))
    assert abs(rms_noisy / rms_clean - 1.0) < 0.1, (rms_clean, rms_noisy)
    # Roughly Gaussian, not just rescaled: about 68% of the points within one sd.
    assert abs(np.mean(np.abs(noisy) < rms_clean) - 0.683) < 0.05


def test_noise_scale_follows_each_task():
  # Tasks of very different amplitudes: each task's noise has its own task's scale.
  support, query = sinusoids(8, shots=500, queries=500)
  s, q, mask = run(support, query, fraction=1.0, kind="noise")
  clean = np.concatenate([np.asarray(support["y"]), np.asarray(query["y"])], axis=1)
  noisy = np.concatenate([s["y"], q["y"]], axis=1)
  ratio = np.sqrt(np.mean(noisy**2, axis=(1, 2))) / np.sqrt(np.mean(clean**2, axis=(1, 2)))
  np.testing.assert_allclose(ratio, 1.0, atol=0.15)


def test_shuffle_labels_permutes_each_query():
  support, query = labelled(12)
  s, q, mask = run(support, query, fraction=0.5, kind="shuffle_labels")
  assert mask.sum() == 6
  np.testing.assert_array_equal(s["y"], support["y"])
  np.testing.assert_array_equal(s["x"], support["x"])
  np.testing.assert_array_equal(q["x"], query["x"])
  assert_clean_rows_unchanged(q, query, mask)
  clean = np.asarray(query["y"])
  for t in np.flatnonzero(mask):
    np.testing.assert_array_equal(np.sort(q["y"][t]), np.sort(clean[t]))  # same multiset
  # Not the identity: with 15 labels of 5 classes a random permutation moves most of them.
  assert np.mean(q["y"][mask] != clean[mask]) > 0.5


@pytest.mark.parametrize("ways", [2, 5])
def test_permute_labels_is_a_non_identity_bijection_per_task(ways):
  support, query = labelled(16, ways=ways)
  s, q, mask = run(support, query, fraction=0.5, kind="permute_labels", num_classes=ways)
  assert mask.sum() == 8
  np.testing.assert_array_equal(s["y"], support["y"])
  np.testing.assert_array_equal(q["x"], query["x"])
  assert_clean_rows_unchanged(q, query, mask)
  clean = np.asarray(query["y"])
  for t in np.flatnonzero(mask):
    pi = {}
    for a, b in zip(clean[t], q["y"][t]):
      assert pi.setdefault(int(a), int(b)) == b  # a function of the clean label
    assert sorted(pi.values()) == sorted(pi) == list(range(ways))  # a bijection of the classes
    assert any(a != b for a, b in pi.items())  # not the identity
    assert all(a != b for a, b in pi.items())  # a cyclic shift by 1..C-1 moves every class


def test_label_corruption_on_the_binary_toy_flips_every_label():
  from gajax.tasks import binary  # pylint: disable=import-outside-toplevel
  w_star = jnp.ones((3,)) / jnp.sqrt(3.0)
  support, query = binary.sample_tasks(KEY, 6, shots=4, queries=8, w_star=w_star, task_spread=0.1)
  s, q, mask = run(support, query, fraction=0.5, kind="permute_labels", num_classes=2)
  np.testing.assert_array_equal(q["y"][mask], 1 - np.asarray(query["y"])[mask])


def test_errors():
  support, query = sinusoids(4)
  labels = labelled(4)
  with pytest.raises(ValueError, match="Unknown corruption kind 'bogus'; valid kinds: noise, amplitude"):
    corruption.corrupt(KEY, support, query, fraction=0.5, kind="bogus")
  with pytest.raises(ValueError, match="fraction must be a number in \\[0, 1\\], got 1.5"):
    corruption.corrupt(KEY, support, query, fraction=1.5, kind="noise")
  for bad in (-0.1, float("nan"), True):
    with pytest.raises(ValueError, match="fraction"):
      corruption.num_corrupted(4, bad)
  with pytest.raises(ValueError, match="num_tasks"):
    corruption.num_corrupted(-1, 0.5)
  with pytest.raises(ValueError, match="is for integer class labels.*dtype float32"):
    corruption.corrupt(KEY, support, query, fraction=0.5, kind="shuffle_labels")
  with pytest.raises(ValueError, match="is for regression targets.*dtype int32"):
    corruption.corrupt(KEY, *labels, fraction=0.5, kind="amplitude")
  with pytest.raises(ValueError, match="needs num_classes"):
    corruption.corrupt(KEY, *labels, fraction=0.5, kind="permute_labels")
  with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
    corruption.corrupt(KEY, *labels, fraction=0.5, kind="permute_labels", num_classes=1)
  with pytest.raises(ValueError, match="the query batch must be a dict with a 'y' entry"):
    corruption.corrupt(KEY, support, {"x": query["x"]}, fraction=0.5, kind="noise")
  with pytest.raises(ValueError, match="support has T=3 tasks but query has T=4"):
    corruption.corrupt(KEY, {"y": support["y"][:3]}, query, fraction=0.5, kind="noise")
  # The sampler wrapper checks its arguments when it is built, not on first use.
  with pytest.raises(ValueError, match="Unknown corruption kind"):
    corruption.make_corrupted_sampler(sinusoids, fraction=0.5, kind="flip")
  with pytest.raises(ValueError, match="fraction"):
    corruption.make_corrupted_sampler(sinusoids, fraction=2.0, kind="noise")


@pytest.mark.parametrize("kind", corruption.CORRUPTIONS)
def test_jit_matches_eager(kind):
  support, query = labelled(8) if kind in corruption.LABEL_CORRUPTIONS else sinusoids(8)
  fn = functools.partial(corruption.corrupt, fraction=0.375, kind=kind, num_classes=5)
  eager = fn(KEY, support, query)
  jitted = jax.jit(fn)(KEY, support, query)
  for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
  assert np.asarray(jitted[2]).sum() == 3


def test_corrupted_sampler():
  sample = functools.partial(sinusoid.sample_tasks, shots=5, queries=5)
  noisy = corruption.make_corrupted_sampler(sample, fraction=0.25, kind="amplitude")
  key = jax.random.PRNGKey(3)
  clean_s, clean_q = sample(key, 8, None)
  s, q = jax.jit(noisy, static_argnums=1)(key, 8, None)
  ratio = np.asarray(q["y"])[:, 0, 0] / np.asarray(clean_q["y"])[:, 0, 0]
  # The clean batch is the unwrapped sampler's for the same key; two of its eight tasks are x10.
  np.testing.assert_allclose(np.sort(ratio), [1.0] * 6 + [10.0] * 2, rtol=1e-5)
  np.testing.assert_array_equal(s["x"], clean_s["x"])
  # The corrupted tasks change with the key (not a fixed constant key inside the wrapper).
  chosen = set()
  for i in range(10):
    k = jax.random.PRNGKey(100 + i)
    _, q = noisy(k, 8)
    chosen.add(tuple(np.asarray(q["y"])[:, 0, 0] != np.asarray(sample(k, 8, None)[1]["y"])[:, 0, 0]))
  assert len(chosen) > 3
  # fraction = 0: exactly the unwrapped sampler.
  s0, q0 = corruption.make_corrupted_sampler(sample, fraction=0.0, kind="noise")(key, 8)
  np.testing.assert_array_equal(q0["y"], clean_q["y"])
  np.testing.assert_array_equal(s0["y"], clean_s["y"])


# ---------------------------------------------------------------------------------------------------
# Wired into training runs: TrainConfig's corrupt_fraction / corruption.


def test_train_config_validates_corruption_settings():
  from gajax.train import TrainConfig  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match="corruption must be one of noise, amplitude, sign_flip"):
    TrainConfig(corrupt_fraction=0.2).validate()
  with pytest.raises(ValueError, match="task=sinusoid"):
    TrainConfig(corrupt_fraction=0.2, corruption="permute_labels").validate()
  with pytest.raises(ValueError, match="corrupt_fraction must be in"):
    TrainConfig(corrupt_fraction=1.5, corruption="noise").validate()
  TrainConfig(task="binary", corrupt_fraction=0.5, corruption="permute_labels").validate()


def test_training_sees_corrupted_tasks_and_evaluation_stays_clean():
  from gajax.train import TrainConfig, make_experiment  # pylint: disable=import-outside-toplevel
  jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  runs = {}
  for fraction in (0.0, 0.5):
    exp = make_experiment(TrainConfig(meta_batch_size=8, eval_tasks=10, corrupt_fraction=fraction,
                                      corruption="amplitude", num_devices=1))
    state = jit(exp.init)(jax.random.PRNGKey(0))
    _, metrics = jit(exp.step)(state, None)
    runs[fraction] = (float(metrics["support_loss"]),
                      np.asarray(jit(exp.evaluate)(state.params, jax.random.PRNGKey(1))))
  # 4 of 8 tasks x10 in amplitude: their support losses x~100 (MSE of a near-zero predictor).
  assert runs[0.5][0] > 20 * runs[0.0][0]
  np.testing.assert_array_equal(runs[0.5][1], runs[0.0][1])  # the same clean evaluation tasks
