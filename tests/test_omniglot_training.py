"""Conv-4 shapes, MAML's meta-gradient through Conv-4 against finite differences, and a short Omniglot
meta-training run on the real archive that beats chance."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gajax import aggregators, algorithms, meta
from gajax.models import Conv4
from gajax.tasks import omniglot



@pytest.mark.parametrize("downsample, spatial", [("stride", 2), ("pool", 1)])
def test_conv4_shapes(downsample, spatial):
  model = Conv4(num_classes=5, filters=8, downsample=downsample)
  x = jnp.zeros((7, 28, 28, 1))
  params = model.init(jax.random.PRNGKey(0), x)
  assert model.apply(params, x).shape == (7, 5)
  # 28 -> 14 -> 7 -> 4 -> 2 with SAME stride-2 convs; 28 -> 14 -> 7 -> 3 -> 1 with VALID 2x2 pools.
  assert params["params"]["Dense_0"]["kernel"].shape == (8 * spatial * spatial, 5)
  kernels = [params["params"][f"Conv_{i}"]["kernel"].shape for i in range(4)]
  assert kernels == [(3, 3, 1, 8)] + [(3, 3, 8, 8)] * 3


def test_batch_norm_uses_batch_statistics():
  """Shifting and scaling every input by a constant leaves the first block's output unchanged."""
  model = Conv4(num_classes=5, filters=8)
  x = jax.random.uniform(jax.random.PRNGKey(1), (6, 28, 28, 1))
  params = model.init(jax.random.PRNGKey(0), x)
  params["params"]["Conv_0"]["bias"] = jnp.zeros(8)
  np.testing.assert_allclose(model.apply(params, 3.0 * x + 0.0), model.apply(params, x), rtol=2e-3,
                             atol=2e-3)


def test_second_order_maml_through_conv4_matches_finite_differences():
  """Two inner steps through Conv-4 with batch statistics: d L_q(U(U(theta))) along random directions.

  The reference re-runs the inner loop as plain Python on perturbed parameters and differences the
  query loss (central, float64), so it shares nothing with ``adapt``'s scan. The default (matmul)
  convolutions; tests/test_conv_matmul.py ties them to XLA's.
  """
  with jax.enable_x64(True):
    model = Conv4(num_classes=3, filters=3, conv="matmul")
    keys = jax.random.split(jax.random.PRNGKey(7), 3)
    support = {"x": jax.random.uniform(keys[0], (3, 28, 28, 1), jnp.float64), "y": jnp.arange(3)}
    query = {"x": jax.random.uniform(keys[1], (6, 28, 28, 1), jnp.float64),
             "y": jnp.array([0, 1, 2, 2, 1, 0])}
    params = jax.tree_util.tree_map(lambda p: p.astype(jnp.float64),
                                    model.init(keys[2], support["x"]))

    def loss_fn(p, batch):
      logits = model.apply(p, batch["x"])
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]))

    inner_lr, steps = 0.3, 2
    learner = algorithms.maml(loss_fn, inner_steps=steps, inner_lr=inner_lr)
    grads = jax.jit(learner)(params, support, query)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    flat_grads = jax.flatten_util.ravel_pytree(grads)[0]
    assert flat_grads.shape == flat.shape and np.all(np.isfinite(flat_grads))

    @jax.jit
    def objective(vec):
      p = unravel(vec)
      for _ in range(steps):
        p = jax.tree_util.tree_map(lambda w, g: w - inner_lr * g, p, jax.grad(loss_fn)(p, support))
      return loss_fn(p, query)

    rng = np.random.default_rng(0)
    # Small: at 1e-4 the difference already crosses ReLU kinks; at 1e-6 it agrees to ~1e-9 (float64).
    eps = 1e-6
    for _ in range(3):
      direction = rng.normal(size=flat.shape)
      plus, minus = float(objective(flat + eps * direction)), float(objective(flat - eps * direction))
      fd = (plus - minus) / (2 * eps)
      np.testing.assert_allclose(float(flat_grads @ direction), fd, rtol=1e-6, atol=1e-9)


def test_short_training_beats_chance(tmp_path, real_tarball):
  task = omniglot.make_task(ways=5, shots=1, queries=2, data_dir=real_tarball,
                            cache_dir=tmp_path / "cache", filters=16)
  learner = algorithms.maml(task.loss_fn, inner_steps=1, inner_lr=0.4, first_order=True)
  tx = optax.chain(aggregators.gradient_agreement(num_tasks=8), optax.adam(3e-3))
  state = meta.init_state(jax.random.PRNGKey(1), task.init_params(jax.random.PRNGKey(0)), tx)
  evaluate = meta.make_evaluate(learner, task, 100)
  before = float(jnp.mean(evaluate(state.params, jax.random.PRNGKey(2), task.eval_data)))
  block = meta.make_block(meta.make_meta_step(learner, tx, task.sample, 8), 60)
  state, metrics = block(state, task.train_data)
  after = float(jnp.mean(evaluate(state.params, jax.random.PRNGKey(2), task.eval_data)))
  assert np.all(np.isfinite(metrics["query_loss"]))
  assert after > 0.4 and after > before + 0.1, (before, after)  # chance is 0.2 for 5-way
