"""Every algorithm of the config runs through the one factory and loop, with any aggregator and, where
it is defined, gradient agreement's displacement signal."""

import dataclasses

import jax
import numpy as np
import pytest

from gajax import meta
from gajax.config import ALGORITHMS, DISPLACEMENT_ALGORITHMS, TrainConfig
from gajax.train import make_experiment, seed_keys

BASE = TrainConfig(meta_batch_size=3, inner_steps=2, num_devices=1, eval_tasks=4)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_two_meta_steps_are_finite_and_move_the_parameters(algorithm):
  signal = "displacement" if algorithm in DISPLACEMENT_ALGORITHMS else "self"
  exp = make_experiment(dataclasses.replace(BASE, algorithm=algorithm, signal=signal,
                                            aggregator="agreement"))
  state = exp.init(seed_keys(0)[0])
  new, metrics = jax.jit(meta.make_block(exp.step, 2))(state, exp.task.train_data)
  assert np.all(np.isfinite(metrics["query_loss"])) and np.all(metrics["update_norm"] > 0)
  moved = [not np.allclose(a, b) for a, b in zip(jax.tree_util.tree_leaves(state.params),
                                                 jax.tree_util.tree_leaves(new.params))]
  if algorithm == "anil":  # ANIL's body learns through the outer loop too: every layer moves
    assert all(moved)
  else:
    assert any(moved)
  weights = np.asarray(metrics["weights"])
  assert weights.shape == (2, 3) and np.allclose(np.abs(weights).sum(axis=1), 1, atol=1e-5)
  values = jax.jit(exp.evaluate)(new.params, seed_keys(0)[1], exp.task.eval_data)
  assert values.shape == (4,) and np.all(np.isfinite(values))


def test_anil_on_a_model_without_a_body_is_refused():
  with pytest.raises(ValueError, match="anil adapts the model's head"):
    dataclasses.replace(BASE, algorithm="anil", task="binary").validate()


def test_maml_plus_plus_with_every_switch_learns_its_rates():
  config = dataclasses.replace(BASE, algorithm="maml++", lslr=True, multi_step_loss=True,
                               msl_anneal_steps=10, first_order_steps=1, outer_lr_schedule="cosine",
                               num_iterations=20)
  exp = make_experiment(config)
  state = exp.init(seed_keys(0)[0])
  assert np.asarray(state.params.inner_lr["params"]["Dense_0"]["kernel"]).shape == (2,)  # per step
  new, metrics = jax.jit(meta.make_block(exp.step, 2))(state, exp.task.train_data)
  assert np.all(np.isfinite(metrics["query_loss"]))
  rates = np.asarray(new.params.inner_lr["params"]["Dense_0"]["kernel"])
  assert not np.allclose(rates, 0.01) and np.all(np.isfinite(rates))


def test_cosine_outer_schedule_follows_its_closed_form():
  from gajax.experiment import make_tx  # pylint: disable=import-outside-toplevel
  n = 10
  config = dataclasses.replace(BASE, aggregator="mean", optimizer="sgd", outer_lr=0.5,
                               outer_lr_schedule="cosine", num_iterations=n)
  tx = make_tx(config)
  params = {"w": np.zeros(1, np.float32)}
  state = tx.init(params)
  sizes = []
  for _ in range(n + 1):
    u, state = tx.update({"w": np.ones((3, 1), np.float32)}, state, params)  # mean gradient 1
    sizes.append(-float(u["w"][0]))
  # lr(t) = 0.5 (0.01 + 0.99 (1 + cos(pi min(t, n) / n)) / 2): from 0.5 down to 0.005.
  want = [0.5 * (0.01 + 0.99 * (1 + np.cos(np.pi * min(t, n) / n)) / 2) for t in range(n + 1)]
  np.testing.assert_allclose(sizes, want, rtol=1e-5)


def test_adam_eps_reaches_the_outer_optimiser():
  """make_tx's Adam uses adam_eps: with gradients of size 1e-3, eps = 1e-3 halves the first step
  (m / (sqrt(v) + eps) = 1e-3 / 2e-3), while optax's default eps leaves it at lr."""
  from gajax.experiment import make_tx  # pylint: disable=import-outside-toplevel
  params = {"w": np.zeros(1, np.float32)}
  grads = {"w": np.full((3, 1), 1e-3, np.float32)}
  steps = {}
  for eps in (1e-8, 1e-3):
    tx = make_tx(dataclasses.replace(BASE, aggregator="mean", outer_lr=0.1, adam_eps=eps).validate())
    steps[eps] = float(tx.update(grads, tx.init(params), params)[0]["w"][0])
  np.testing.assert_allclose(steps[1e-8], -0.1, rtol=1e-4)
  np.testing.assert_allclose(steps[1e-3], -0.05, rtol=1e-4)


@pytest.mark.parametrize("change, message", [
    ({"lslr": True}, "lslr apply to algorithm='maml\\+\\+' only"),
    ({"algorithm": "maml++", "multi_step_loss": True}, "multi_step_loss needs msl_anneal_steps"),
    ({"algorithm": "maml++", "lslr": True, "eval_inner_steps": 3}, "eval_inner_steps must equal"),
    ({"outer_lr_schedule": "linear"}, "outer_lr_schedule must be one of"),
])
def test_maml_plus_plus_settings_are_checked(change, message):
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(BASE, **change).validate()


def test_imaml_config_reaches_the_learner():
  """cg_damping and imaml_inner_optimizer reach gajax.algorithms.imaml: the config's learner gives
  the update of one built directly with those arguments, and a different one without them."""
  import optax  # pylint: disable=import-outside-toplevel
  from gajax import algorithms  # pylint: disable=import-outside-toplevel
  from gajax.experiment import make_learner, make_task  # pylint: disable=import-outside-toplevel
  config = dataclasses.replace(BASE, algorithm="imaml", inner_lr=0.02, imaml_lambda=3.0, cg_steps=4)
  task = make_task(config)
  params = task.init_params(jax.random.PRNGKey(0))
  supports, queries = task.sample(jax.random.PRNGKey(1), 1, task.train_data)
  one = lambda tree: jax.tree_util.tree_map(lambda x: x[0], tree)
  flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(tree)])
  direct = dict(inner_steps=2, inner_lr=0.02, lam=3.0, cg_steps=4)
  got, want = {}, {}
  for name, change, kwargs in [
      ("plain", {}, {}),
      ("damped", {"cg_damping": 50.0}, {"cg_damping": 50.0}),
      ("adam", {"imaml_inner_optimizer": "adam"}, {"inner_optimizer": optax.adam(0.02)}),
      ("pull_back", {"imaml_inner_loop": "pull_back"}, {"inner_loop": "pull_back"})]:
    learner = make_learner(dataclasses.replace(config, **change).validate(), task.loss_fn)
    got[name] = flat(jax.jit(learner)(params, one(supports), one(queries)))
    want[name] = flat(jax.jit(algorithms.imaml(task.loss_fn, **direct, **kwargs))(
        params, one(supports), one(queries)))
    np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-7)
  for name in ("damped", "adam", "pull_back"):
    assert not np.allclose(got[name], got["plain"]), name


@pytest.mark.parametrize("change, message", [
    ({"algorithm": "imaml", "cg_damping": -1.0}, "cg_damping must be a finite number >= 0"),
    ({"algorithm": "imaml", "imaml_inner_optimizer": "lbfgs"}, "imaml_inner_optimizer must be one of"),
    ({"cg_damping": 1.0, "cg_steps": 3}, "cg_steps, cg_damping apply to algorithm='imaml' only"),
    ({"imaml_inner_loop": "pull_back"}, "imaml_inner_loop apply to algorithm='imaml' only"),
    ({"algorithm": "imaml", "imaml_inner_loop": "pull_back", "inner_lr": 0.6, "imaml_lambda": 2.0},
     "a fraction inner_lr \\* imaml_lambda back towards theta: it must be <= 1; got 0.6 \\* 2.0"),
    ({"algorithm": "imaml", "imaml_inner_loop": "newton"}, "imaml_inner_loop must be one of"),
    ({"adam_eps": 0.0}, "adam_eps must be a finite number > 0"),
    ({"optimizer": "sgd", "adam_eps": 1e-3}, "adam_eps applies to optimizer='adam' only"),
])
def test_imaml_settings_are_checked(change, message):
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(BASE, **change).validate()
