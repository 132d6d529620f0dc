"""Aggregator state read and re-keyed through the accessors, wherever in an optax state it sits."""

import jax
import numpy as np
import optax

from gajax import aggregators


def nested(aggregator):
  """The shape of a training run's tx: guard(chain(aggregator, adam))."""
  return aggregators.skip_nonfinite_tasks(optax.chain(aggregator, optax.adam(1e-3)))


def test_task_weights_are_eq_13_on_the_last_update():
  rng = np.random.default_rng(0)
  g = rng.normal(size=(5, 7)).astype(np.float32)
  tx = nested(aggregators.gradient_agreement(num_tasks=5))
  params = {"w": np.zeros(7, np.float32)}
  _, state = tx.update({"w": g}, tx.init(params), params)
  g64 = g.astype(np.float64)
  inner = g64 @ g64.sum(axis=0)  # <g_i, G>
  np.testing.assert_allclose(aggregators.task_weights(state), inner / np.abs(inner).sum(), rtol=1e-5)
  assert int(aggregators.skipped_tasks(state)) == 0


def test_accessors_say_none_where_there_is_nothing():
  tx = optax.chain(aggregators.mean(), optax.sgd(0.1))
  state = tx.init({"w": np.zeros(3, np.float32)})
  assert aggregators.task_weights(state) is None and aggregators.skipped_tasks(state) is None


def test_with_key_replaces_every_random_aggregators_key_and_nothing_else():
  params = {"w": np.zeros(3, np.float32)}
  tx = optax.chain(aggregators.random(0), optax.sgd(1.0))
  # Any pytree of states: here a chain beside a GradDrop state and an agreement state.
  agreement = aggregators.gradient_agreement(num_tasks=4).init(params)._replace(weights=np.ones(4))
  state = (tx.init(params), aggregators.graddrop(key=0).init(params), agreement)
  key = jax.random.PRNGKey(42)
  rekeyed = aggregators.with_key(state, key)
  np.testing.assert_array_equal(rekeyed[0][0].key, key)  # the first gets the key itself
  np.testing.assert_array_equal(rekeyed[1].key, jax.random.fold_in(key, 1))
  np.testing.assert_array_equal(rekeyed[2].weights, np.ones(4))  # other state untouched
  # Same key in, same draws out: the key fully decides the aggregator's randomness.
  g = {"w": np.random.default_rng(1).normal(size=(4, 3)).astype(np.float32)}
  out_a, _ = tx.update(g, rekeyed[0], params)
  out_b, _ = tx.update(g, aggregators.with_key(tx.init(params), key), params)
  out_c, _ = tx.update(g, tx.init(params), params)
  np.testing.assert_array_equal(out_a["w"], out_b["w"])
  assert not np.array_equal(out_a["w"], out_c["w"])
