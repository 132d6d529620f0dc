"""The same optax chain, unchanged, inside a Flax NNX optimiser and a Linen TrainState."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import flax.linen as nn
from flax import nnx
from flax.training import train_state

from gajax import aggregators

T = 4


def reference_step(params, stacked, lr):
  """Agreement in float64 NumPy, then one SGD step: params - lr * sum_i w_i g_i."""
  flat = np.concatenate([np.asarray(x, np.float64).reshape(T, -1)
                         for x in jax.tree_util.tree_leaves(stacked)], axis=1)
  scores = flat @ flat.sum(0)
  w = scores / np.abs(scores).sum()
  return jax.tree_util.tree_map(lambda p, g: p - lr * np.tensordot(w, g, axes=1), params, stacked)


def test_nnx_optimizer_accepts_stacked_grads():
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  tx = optax.chain(aggregators.gradient_agreement(num_tasks=T), optax.sgd(0.5))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  graphdef, params = nnx.split(model, nnx.Param)
  xs = jax.random.normal(jax.random.PRNGKey(1), (T, 5, 3))
  ys = jax.random.normal(jax.random.PRNGKey(2), (T, 5, 2))

  def task_loss(p, x, y):
    return jnp.mean(jnp.square(nnx.merge(graphdef, p)(x) - y))

  stacked = jax.vmap(jax.grad(task_loss), in_axes=(None, 0, 0))(params, xs, ys)
  before = jax.tree_util.tree_map(np.asarray, nnx.state(model, nnx.Param))
  optimizer.update(model, stacked)
  after = nnx.state(model, nnx.Param)
  want = reference_step(before, jax.tree_util.tree_map(np.asarray, stacked), 0.5)
  for got, exp in zip(jax.tree_util.tree_leaves(after), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-6)
  # The weights are logged in the optimiser's state and have the fixed shape [T].
  weights = optax.tree_utils.tree_get(optimizer.opt_state, "weights")
  assert np.asarray(weights).shape == (T,)
  optimizer.update(model, stacked)  # a second step keeps the state's shapes


def test_linen_train_state_accepts_stacked_grads():
  net = nn.Dense(2)
  params = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 3)))
  tx = optax.chain(aggregators.gradient_agreement(num_tasks=T), optax.sgd(0.5))
  state = train_state.TrainState.create(apply_fn=net.apply, params=params, tx=tx)
  xs = jax.random.normal(jax.random.PRNGKey(1), (T, 5, 3))
  ys = jax.random.normal(jax.random.PRNGKey(2), (T, 5, 2))

  def task_loss(p, x, y):
    return jnp.mean(jnp.square(net.apply(p, x) - y))

  stacked = jax.vmap(jax.grad(task_loss), in_axes=(None, 0, 0))(params, xs, ys)
  new_state = jax.jit(lambda s, g: s.apply_gradients(grads=g))(state, stacked)
  want = reference_step(params, jax.tree_util.tree_map(np.asarray, stacked), 0.5)
  for got, exp in zip(jax.tree_util.tree_leaves(new_state.params), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-6)
  assert int(new_state.step) == 1


def test_maml_on_a_users_nnx_module_matches_the_same_linen_model():
  """README's NNX recipe: split the module, merge inside the loss, MAML per task, nnx.Optimizer."""
  import gajax  # pylint: disable=import-outside-toplevel

  class UserMLP(nnx.Module):
    def __init__(self, rngs):
      self.hidden = nnx.Linear(1, 16, rngs=rngs)
      self.out = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
      return self.out(nnx.relu(self.hidden(x)))

  model = UserMLP(nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)

  def loss_fn(p, batch):
    return jnp.mean(jnp.square(nnx.merge(graphdef, p)(batch["x"]) - batch["y"]))

  learner = gajax.algorithms.maml(loss_fn, inner_steps=2, inner_lr=0.05)
  x = jax.random.uniform(jax.random.PRNGKey(3), (T, 10, 1), minval=-3, maxval=3)
  supports = {"x": x[:, :5], "y": jnp.sin(x[:, :5])}
  queries = {"x": x[:, 5:], "y": jnp.sin(x[:, 5:])}
  updates = gajax.per_task(learner)(params, supports, queries)

  # The same network written in Linen, with the NNX module's weights copied in.
  linen = {"params": {"Dense_0": {"kernel": params["hidden"]["kernel"][...],
                                  "bias": params["hidden"]["bias"][...]},
                      "Dense_1": {"kernel": params["out"]["kernel"][...],
                                  "bias": params["out"]["bias"][...]}}}
  mlp = gajax.models.MLP((16, 1))
  linen_learner = gajax.algorithms.maml(
      lambda p, b: jnp.mean(jnp.square(mlp.apply(p, b["x"]) - b["y"])), inner_steps=2, inner_lr=0.05)
  want = gajax.per_task(linen_learner)(linen, supports, queries)["params"]
  for got, ref in ((updates["hidden"], want["Dense_0"]), (updates["out"], want["Dense_1"])):
    np.testing.assert_allclose(got["kernel"][...], ref["kernel"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got["bias"][...], ref["bias"], rtol=1e-5, atol=1e-7)

  optimizer = nnx.Optimizer(model, optax.chain(gajax.aggregators.mean(), optax.sgd(0.1)), wrt=nnx.Param)
  before = np.asarray(model.out.kernel[...])
  optimizer.update(model, updates)
  np.testing.assert_allclose(model.out.kernel[...],
                             before - 0.1 * np.mean(np.asarray(want["Dense_1"]["kernel"]), axis=0),
                             rtol=1e-5, atol=1e-7)
