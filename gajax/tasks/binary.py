"""The book's toy: few-shot logistic regression on random features, fixed so there is something to learn.

Hands-On Meta Learning with Python (ch. 8) meta-trains a logistic regression on 50 random features with
coin-flip labels. Here each task has a hidden linear rule ``w_t = w_star + sigma * eps_t`` around a
shared direction ``w_star`` (fixed by ``rule_seed``), and labels are ``y = 1[x . w_t > 0]`` with
``x ~ N(0, I_50)``; with ``|w_star| = 1`` and ``sigma = 0.1`` the
per-task part has norm about 0.7, so tasks are related but not identical. The shared part is what meta-learning can discover; the per-task part is what the
inner loop must adapt to from ``shots`` labelled points.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from gajax.models import MLP
from gajax.tasks.base import Task


def sample_tasks(key: jax.Array, num_tasks: int, data=None, *, shots: int, queries: int,
                 w_star: jax.Array, task_spread: float):
  """Draws tasks and points. Returns dicts with ``"x"`` ``[T, n, d]`` float32 and ``"y"`` ``[T, n]`` int32.

  ``data`` is unused (the tasks are generated).
  """
  del data
  k_rule, k_x = jax.random.split(key)
  dim = w_star.shape[0]
  rules = w_star + task_spread * jax.random.normal(k_rule, (num_tasks, dim))
  x = jax.random.normal(k_x, (num_tasks, shots + queries, dim))
  y = (jnp.einsum("tnd,td->tn", x, rules) > 0).astype(jnp.int32)
  return ({"x": x[:, :shots], "y": y[:, :shots]}, {"x": x[:, shots:], "y": y[:, shots:]})


def make_task(shots: int = 10, queries: int = 10, eval_queries: int = 100, dim: int = 50,
              task_spread: float = 0.1, rule_seed: int = 1234) -> Task:
  """The fixed binary classification toy with a logistic-regression learner (one ``Dense(1)``)."""
  w_star = jax.random.normal(jax.random.PRNGKey(rule_seed), (dim,))
  w_star = w_star / jnp.linalg.norm(w_star)
  model = MLP((1,))
  sample = functools.partial(sample_tasks, w_star=w_star, task_spread=task_spread)

  def logits(params, batch):
    return model.apply(params, batch["x"])[..., 0]

  def loss_fn(params, batch):
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits(params, batch), batch["y"]))

  def accuracy(params, batch):
    return jnp.mean(((logits(params, batch) > 0).astype(jnp.int32) == batch["y"]).astype(jnp.float32))

  return Task(
      name="binary",
      sample=functools.partial(sample, shots=shots, queries=queries),
      eval_sample=functools.partial(sample, shots=shots, queries=eval_queries),
      init_params=lambda key: model.init(key, jnp.zeros((1, dim), jnp.float32)),
      loss_fn=loss_fn,
      metric_fn=accuracy,
      metric="accuracy",
  )
