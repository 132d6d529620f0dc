"""gajax's sinusoid training against a minimal, independent MAML written here in plain JAX.

The reference shares nothing with gajax but the task sampler: its own MLP on a tuple of arrays, its
own inner loop (a Python loop of ``jax.grad``), its own agreement weights and its own Adam. Started
from the same PyTorch-style initial weights (drawn here with NumPy) and fed the same tasks, both must
follow the same trajectory. Where gajax then learns slower than a published implementation, the
cause is in a setting (e.g. the initialisation), not in the pipeline.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gajax.tasks import sinusoid
from gajax.train import TrainConfig, make_experiment

SIZES = [(1, 64), (64, 64), (64, 1)]
# Compiling dominates this file (the runs are ten tiny steps); skipping LLVM's optimisations about halves
# XLA:CPU's compile time. Both sides are compiled this way; the numerics are IEEE either way.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def torch_style_weights(seed):
  rng = np.random.default_rng(seed)
  weights = []
  for fan_in, fan_out in SIZES:
    bound = 1 / np.sqrt(fan_in)
    weights.append((rng.uniform(-bound, bound, (fan_in, fan_out)).astype(np.float32),
                    rng.uniform(-bound, bound, (fan_out,)).astype(np.float32)))
  return weights


def forward(weights, x):
  for i, (w, b) in enumerate(weights):
    x = x @ w + b
    if i < len(weights) - 1:
      x = jnp.maximum(x, 0.0)
  return x


def mse(weights, x, y):
  return jnp.mean((forward(weights, x) - y) ** 2)


@functools.partial(jax.jit, static_argnames="first_order", compiler_options=FAST_COMPILE)
def maml_grad(weights, xs, ys, xq, yq, first_order, lr=0.01, steps=5):
  def query_loss(w0):
    w = w0
    for _ in range(steps):
      g = jax.grad(mse)(w, xs, ys)
      if first_order:  # FOMAML: the inner gradients are constants, d w_k / d w_0 = I
        g = jax.lax.stop_gradient(g)
      w = [(a - lr * ga, b - lr * gb) for (a, b), (ga, gb) in zip(w, g)]
    return mse(w, xq, yq)
  return jax.grad(query_loss)(weights)


def reference_step(weights, adam, support, query, aggregator, t, first_order=False, lr=1e-3):
  grads = [maml_grad(weights, support["x"][i], support["y"][i], query["x"][i], query["y"][i],
                     first_order) for i in range(support["x"].shape[0])]
  flat = np.stack([np.concatenate([np.ravel(a) for pair in g for a in pair]) for g in grads])
  if aggregator == "mean":
    weights_t = np.full(len(grads), 1 / len(grads))
  else:  # eq. 13 of Eshratifar et al.: w_i = <g_i, G> / sum_k |<g_k, G>|
    scores = flat.astype(np.float64) @ flat.sum(0).astype(np.float64)
    weights_t = scores / np.abs(scores).sum()
  g = (weights_t[:, None] * flat).sum(0)
  m, v = adam
  m = 0.9 * m + 0.1 * g
  v = 0.999 * v + 0.001 * g * g
  step = lr * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
  out, i = [], 0
  for w, b in weights:
    nw, nb = w.size, b.size
    out.append((w - step[i:i + nw].reshape(w.shape), b - step[i + nw:i + nw + nb].reshape(b.shape)))
    i += nw + nb
  return out, (m, v)


@pytest.mark.parametrize("algorithm, aggregator", [("maml", "mean"), ("maml", "agreement"),
                                                   ("fomaml", "mean")])
def test_gajax_follows_the_independent_reference_for_ten_meta_steps(algorithm, aggregator):
  config = TrainConfig(algorithm=algorithm, aggregator=aggregator, meta_batch_size=6, num_devices=1,
                       skip_nonfinite=False)
  exp = make_experiment(config)
  weights = torch_style_weights(0)
  params = {"params": {f"Dense_{i}": {"kernel": jnp.asarray(w), "bias": jnp.asarray(b)}
                       for i, (w, b) in enumerate(weights)}}
  state = jax.jit(exp.init, compiler_options=FAST_COMPILE)(jax.random.PRNGKey(3))._replace(params=params)
  step = jax.jit(exp.step, compiler_options=FAST_COMPILE)
  size = sum(w.size + b.size for w, b in weights)
  adam = (np.zeros(size), np.zeros(size))
  key = state.key
  for t in range(1, 11):
    key, task_key = jax.random.split(key)  # how gajax's meta-step draws its tasks
    support, query = sinusoid.sample_tasks(task_key, 6, shots=10, queries=10)
    weights, adam = reference_step(weights, adam, support, query, aggregator, t,
                                   first_order=algorithm == "fomaml")
    state, _ = step(state, None)
  for i, (w, b) in enumerate(weights):
    got = state.params["params"][f"Dense_{i}"]
    np.testing.assert_allclose(got["kernel"], w, rtol=2e-4, atol=2e-6)
    np.testing.assert_allclose(got["bias"], b, rtol=2e-4, atol=2e-6)
  moved = sum(np.abs(np.asarray(w) - w0).max() for (w, _), (w0, _) in zip(weights, torch_style_weights(0)))
  assert moved > 1e-3  # ten Adam steps of 1e-3 must have moved the weights
