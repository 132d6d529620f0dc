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
