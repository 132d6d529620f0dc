"""The non-finite guard: bad tasks get zero weight, the rest renormalise, all-bad steps change nothing."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

from gajax import aggregators, algorithms, meta
from gajax.tasks import sinusoid


def stacked(rng, t):
  return {"w": rng.normal(size=(t, 3, 2)).astype(np.float32), "b": rng.normal(size=(t, 2)).astype(np.float32)}


def drop(tree, bad):
  keep = np.array([i not in bad for i in range(tree["b"].shape[0])])
  return jax.tree_util.tree_map(lambda x: x[keep], tree)


@pytest.mark.parametrize("make", [aggregators.mean, aggregators.gradient_agreement, aggregators.sum])
def test_guard_equals_aggregating_only_the_finite_tasks(make):
  rng = np.random.default_rng(0)
  tree = stacked(rng, 6)
  tree["w"][1, 0, 0] = np.nan
  tree["b"][4, 1] = np.inf
  tx = aggregators.skip_nonfinite_tasks(make())
  out, state = tx.update(tree, tx.init(None))
  assert int(state.skipped) == 2
  clean = drop(tree, {1, 4})
  want, _ = make().update(clean, make().init(None))
  if make is aggregators.sum:  # sum keeps its L1 mass: the kept tasks are scaled by T / T_kept
    want = jax.tree_util.tree_map(lambda x: x * 6 / 4, want)
  for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_nonfinite_signal_drops_the_task_too():
  rng = np.random.default_rng(1)
  tree = stacked(rng, 4)
  signal = {"d": rng.normal(size=(4, 5)).astype(np.float32)}
  signal["d"][2, 3] = np.nan
  tx = aggregators.skip_nonfinite_tasks(aggregators.gradient_agreement())
  out, state = tx.update(tree, tx.init(None), agreement_signal=signal)
  assert int(state.skipped) == 1
  w = np.asarray(state.inner.weights)
  assert w[2] == 0 and np.isclose(np.abs(w).sum(), 1.0)
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(out))


def test_all_tasks_nonfinite_leaves_params_and_adam_state_unchanged():
  task = sinusoid.make_task(shots=4, queries=4, hidden=(8,))
  learner = algorithms.maml(task.loss_fn, inner_steps=1, inner_lr=0.01)
  # The guard around the whole chain, as gajax.train.make_tx builds it: Adam's moments stand still too.
  tx = aggregators.skip_nonfinite_tasks(
      optax.chain(aggregators.gradient_agreement(num_tasks=3), optax.adam(1e-2)))
  good = meta.make_meta_step(learner, tx, task.sample, 3)
  state = meta.init_state(jax.random.PRNGKey(0), task.init_params(jax.random.PRNGKey(1)), tx)
  state, _ = jax.jit(good)(state)  # one real step so Adam's moments are non-zero

  def poisoned(key, n, data):
    support, query = task.sample(key, n, data)
    return support, {"x": query["x"], "y": query["y"] * np.nan}

  bad_step = jax.jit(meta.make_meta_step(learner, tx, poisoned, 3))
  new_state, metrics = bad_step(state)
  assert float(metrics["skipped_tasks"]) == 3
  assert int(aggregators.skipped_tasks(new_state.opt_state)) == 3
  for a, b in zip(jax.tree_util.tree_leaves((state.params, state.opt_state.inner)),
                  jax.tree_util.tree_leaves((new_state.params, new_state.opt_state.inner))):
    np.testing.assert_array_equal(a, b)
  # One finite task is enough to take a step again.
  assert not np.array_equal(jax.tree_util.tree_leaves(jax.jit(good)(new_state)[0].params)[0],
                            jax.tree_util.tree_leaves(new_state.params)[0])


@settings(max_examples=25, deadline=None)
@given(t=st.integers(1, 6), dim=st.integers(1, 5), log_scale=st.sampled_from([-30, -3, 0, 3, 30]),
       nan_rows=st.sets(st.integers(0, 5)), data=st.data())
def test_fuzz_guarded_agreement_never_outputs_nan(t, dim, log_scale, nan_rows, data):
  values = data.draw(st.lists(st.floats(-1, 1, width=32), min_size=t * dim, max_size=t * dim))
  g = np.asarray(values, np.float32).reshape(t, dim) * np.float32(10.0 ** log_scale)
  for r in nan_rows:
    if r < t:
      g[r, data.draw(st.integers(0, dim - 1))] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
  for make in (aggregators.gradient_agreement, aggregators.mean):
    tx = aggregators.skip_nonfinite_tasks(make())
    out, state = tx.update({"g": g}, tx.init(None))
    assert np.all(np.isfinite(out["g"]))
    assert int(state.skipped) == len([r for r in nan_rows if r < t])


_FUZZ_TASK = sinusoid.make_task(shots=3, queries=3, hidden=(4,))
_FUZZ_LEARNER = algorithms.maml(_FUZZ_TASK.loss_fn, inner_steps=1, inner_lr=0.01)


@functools.lru_cache(maxsize=None)
def _fuzz_step(num_tasks, aggregator):
  tx = optax.chain(aggregators.skip_nonfinite_tasks(aggregators.get(aggregator)), optax.adam(1e-2))

  def poisoned(key, n, bad):
    support, query = _FUZZ_TASK.sample(key, n, None)
    return support, {"x": query["x"], "y": query["y"] * bad[:, None, None]}

  return tx, jax.jit(meta.make_meta_step(_FUZZ_LEARNER, tx, poisoned, num_tasks))


@settings(max_examples=12, deadline=None, derandomize=True)
@given(num_tasks=st.sampled_from([1, 3]), aggregator=st.sampled_from(["mean", "agreement"]),
       poison=st.lists(st.sampled_from([1.0, np.nan, np.inf, 1e30]), min_size=4, max_size=4))
def test_fuzz_meta_step_keeps_params_finite(num_tasks, aggregator, poison):
  """Whatever tasks carry NaN/Inf/huge targets, the guarded meta-step never writes a non-finite param."""
  tx, step = _fuzz_step(num_tasks, aggregator)
  state = meta.init_state(jax.random.PRNGKey(0), _FUZZ_TASK.init_params(jax.random.PRNGKey(1)), tx)
  bad = jnp.asarray(poison[:num_tasks], jnp.float32)
  new_state, metrics = step(state, bad)
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(new_state.params))
  expected_skipped = sum(not np.isfinite(p) for p in poison[:num_tasks])
  assert int(metrics["skipped_tasks"]) >= expected_skipped
