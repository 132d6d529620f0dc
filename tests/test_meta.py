"""The meta-step and evaluation: jit equals eager, the agreement signal is wired, CIs, learning happens."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from gajax import aggregators, algorithms, meta
from gajax.tasks import binary, sinusoid
from gajax.train import TrainConfig, make_experiment


# Compiling dominates this file; skipping LLVM's optimisations cuts XLA:CPU compile time by about half.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)


@functools.lru_cache(maxsize=None)
def small_setup(signal="self"):
  """``(task, learner, state, step, jitted step)`` with gradient agreement, shared by the tests: the
  jitted step then compiles once for the module."""
  task = sinusoid.make_task(shots=5, queries=5, eval_queries=20, hidden=(16,))
  learner = algorithms.maml(task.loss_fn, inner_steps=2, inner_lr=0.01)
  tx = optax.chain(aggregators.gradient_agreement(num_tasks=6), optax.sgd(0.01))
  state = meta.init_state(jax.random.PRNGKey(1), task.init_params(jax.random.PRNGKey(0)), tx)
  step = meta.make_meta_step(learner, tx, task.sample, 6, signal=signal)
  return task, learner, state, step, jit(step)


def test_meta_step_jit_matches_eager():
  _, _, state, step, jit_step = small_setup()
  eager_state, eager_metrics = step(state)
  jit_state, jit_metrics = jit_step(state)
  chex.assert_trees_all_close((eager_state, eager_metrics), (jit_state, jit_metrics), rtol=2e-5,
                              atol=1e-6)
  assert set(jit_metrics) >= {"support_loss", "query_loss", "weight_min", "weight_negative"}


def test_displacement_signal_sets_the_weights():
  task, learner, state, _, step = small_setup(signal="displacement")
  new_state, _ = step(state)
  # Recompute by hand: same tasks (same key split), displacement-based weights.
  _, task_key = jax.random.split(state.key)
  support, query = task.sample(task_key, 6, None)

  @jit
  def by_hand(params, support, query):  # both signals' weights, outside the meta-step
    updates, aux = algorithms.per_task(learner.with_aux)(params, support, query)
    return aggregators.agreement_weights(aux.displacement), aggregators.agreement_weights(updates)

  want, self_weights = by_hand(state.params, support, query)
  got = optax.tree_utils.tree_get(new_state.opt_state, "weights")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  assert not np.allclose(got, self_weights, atol=1e-4)


def test_block_equals_repeated_steps():
  """Three steps in one scan equal three jitted steps, the aggregator's state (weights) included."""
  _, _, state, step, jit_step = small_setup()
  block_state, block_metrics = jit(meta.make_block(step, 3))(state)
  s = state
  for _ in range(3):
    s, m = jit_step(s)
  np.testing.assert_allclose(block_metrics["query_loss"][-1], m["query_loss"], rtol=1e-5)
  np.testing.assert_allclose(block_metrics["weights"][-1], m["weights"], rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(block_state.params, s.params, rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(block_state.opt_state, s.opt_state, rtol=1e-5, atol=1e-7)
  assert int(block_state.step) == 3


def test_mean_ci95_matches_scipy():
  values = np.random.default_rng(0).normal(size=50).astype(np.float32)
  mean, ci = meta.mean_ci95(jnp.asarray(values))
  np.testing.assert_allclose(mean, values.mean(), rtol=1e-6)
  np.testing.assert_allclose(ci, 1.96 * stats.sem(values), rtol=1e-5)


def test_evaluate_is_adapt_then_metric_per_task():
  task, learner, state, _, _ = small_setup()
  values = jit(meta.make_evaluate(learner, task, 7, chunk_size=3))(state.params, jax.random.PRNGKey(5))
  assert values.shape == (7,)
  keys = jax.random.split(jax.random.PRNGKey(5), 3)
  support, query = task.eval_sample(keys[1], 3, None)  # tasks 3..5 come from the second chunk's key
  one_task = jit(lambda params, s, q: task.metric_fn(learner.adapt(params, s), q))
  for i in range(3):
    s = jax.tree_util.tree_map(lambda x: x[i], support)
    q = jax.tree_util.tree_map(lambda x: x[i], query)
    np.testing.assert_allclose(values[3 + i], one_task(state.params, s, q), rtol=1e-5)


# Sinusoid with the mean: from PyTorch's init (the sinusoid default) agreement is slower at the start
# (150 steps: 4.14 -> 3.41 MSE, against the mean's 1.92; README, "Initialisation").
@pytest.mark.parametrize("task_name, algorithm, aggregator, inner_lr, optimizer, outer_lr", [
    ("sinusoid", "maml", "mean", 0.01, "adam", 3e-3),
    ("binary", "reptile", "agreement", 0.5, "sgd", 1.0)])
def test_short_training_beats_the_untrained_model(task_name, algorithm, aggregator, inner_lr, optimizer,
                                                  outer_lr):
  config = TrainConfig(task=task_name, algorithm=algorithm, aggregator=aggregator, num_iterations=150,
                       log_every=150, meta_batch_size=8, eval_tasks=200, inner_lr=inner_lr,
                       optimizer=optimizer, outer_lr=outer_lr)
  exp = make_experiment(config)
  state = jit(exp.init)(jax.random.PRNGKey(0))
  evaluate = jit(exp.evaluate)
  before = float(jnp.mean(evaluate(state.params, jax.random.PRNGKey(9))))
  state, _ = jit(meta.make_block(exp.step, 150))(state)
  after = float(jnp.mean(evaluate(state.params, jax.random.PRNGKey(9))))
  if exp.task.metric == "mse":
    assert after < 0.8 * before
  else:  # accuracy: chance is about 0.5 for the untrained model
    assert after > before + 0.1


def test_binary_labels_follow_a_learnable_rule():
  task = binary.make_task()
  support, query = task.sample(jax.random.PRNGKey(0), 64, None)
  labels = np.concatenate([np.asarray(support["y"]).ravel(), np.asarray(query["y"]).ravel()])
  assert set(np.unique(labels)) == {0, 1}
  assert 0.3 < labels.mean() < 0.7
