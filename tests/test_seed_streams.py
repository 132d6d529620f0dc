"""Seed s of a run vmapped over seeds is the single run with --seed=s, random aggregators included."""

import dataclasses

import jax
import numpy as np
import pytest

from gajax import meta
from gajax.train import TrainConfig, make_experiment, seed_keys


@pytest.mark.parametrize("aggregator", ["random", "graddrop"])
def test_vmapped_seed_equals_the_single_run_with_that_seed(aggregator):
  config = TrainConfig(aggregator=aggregator, meta_batch_size=4, inner_steps=1, num_devices=1)
  seeds = [0, 1]

  def train(exp, state):
    return jax.jit(meta.make_block(exp.step, 3))(state, None)[0]

  shared = make_experiment(config)  # run_seeds builds one experiment for all seeds
  keys = jax.numpy.stack([seed_keys(s)[0] for s in seeds])
  vmapped = jax.jit(jax.vmap(meta.make_block(shared.step, 3), in_axes=(0, None)))(
      jax.vmap(shared.init)(keys), None)[0]
  singles = []
  for s in seeds:  # train_and_evaluate builds the experiment from the config with seed=s
    exp = make_experiment(dataclasses.replace(config, seed=s))
    singles.append(train(exp, exp.init(seed_keys(s)[0])))
  for i, single in enumerate(singles):
    for a, b in zip(jax.tree_util.tree_leaves(single.params),
                    jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda x: x[i], vmapped.params))):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # and the seeds differ from each other (the streams are not shared)
  assert not np.allclose(jax.tree_util.tree_leaves(singles[0].params)[0],
                         jax.tree_util.tree_leaves(singles[1].params)[0])
