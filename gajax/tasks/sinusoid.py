"""Sinusoid regression (Finn et al., 2017; Eshratifar et al., 2018, section 4.1).

A task is ``f(x) = a sin(x + phi)`` with amplitude ``a ~ U[0.1, 5.0]`` and phase ``phi ~ U[0, 2 pi]``;
inputs ``x ~ U[-5, 5]``. The learner is MAML's MLP 1 -> 64 -> 64 -> 1 trained on mean squared error.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gajax.models import MLP
from gajax.tasks.base import Task

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, 2.0 * jnp.pi)
INPUT_RANGE = (-5.0, 5.0)


def sample_tasks(key: jax.Array, num_tasks: int, data=None, *, shots: int, queries: int):
  """Draws ``num_tasks`` sinusoids and ``shots`` support / ``queries`` query points of each.

  ``data`` is unused (the tasks are generated); it is there to match :class:`~gajax.tasks.base.Task`.

  Returns:
    ``(support, query)``, dicts with ``"x"`` and ``"y"`` of shapes ``[T, shots, 1]`` and
    ``[T, queries, 1]`` (float32). Support and query points are independent draws.
  """
  del data
  k_amp, k_phase, k_x = jax.random.split(key, 3)
  amp = jax.random.uniform(k_amp, (num_tasks, 1, 1), minval=AMPLITUDE[0], maxval=AMPLITUDE[1])
  phase = jax.random.uniform(k_phase, (num_tasks, 1, 1), minval=PHASE[0], maxval=PHASE[1])
  x = jax.random.uniform(k_x, (num_tasks, shots + queries, 1), minval=INPUT_RANGE[0],
                         maxval=INPUT_RANGE[1])
  y = amp * jnp.sin(x + phase)
  return ({"x": x[:, :shots], "y": y[:, :shots]}, {"x": x[:, shots:], "y": y[:, shots:]})


# The sinusoid's default initialisation (gajax.models.layer_init); README's "Initialisation" has the
# measurements behind the choice.
DEFAULT_INIT = "torch"


def make_task(shots: int = 10, queries: int = 10, eval_queries: int = 100,
              hidden: tuple[int, ...] = (64, 64), init: str = DEFAULT_INIT) -> Task:
  """The sinusoid task distribution with an MLP learner.

  Args:
    shots: support points per task (the paper's K = 10).
    queries: query points per training task.
    eval_queries: query points per evaluation task (more points, less noise in the reported MSE).
    hidden: hidden widths of the MLP.
    init: the MLP's initialisation scheme, ``"flax"``, ``"torch"`` or ``"maml"``
      (:func:`gajax.models.layer_init`).
  """
  model = MLP(tuple(hidden) + (1,), init_scheme=init)

  def loss_fn(params, batch):
    return jnp.mean(jnp.square(model.apply(params, batch["x"]) - batch["y"]))

  return Task(
      name="sinusoid",
      sample=functools.partial(sample_tasks, shots=shots, queries=queries),
      eval_sample=functools.partial(sample_tasks, shots=shots, queries=eval_queries),
      init_params=lambda key: model.init(key, jnp.zeros((1, 1), jnp.float32)),
      loss_fn=loss_fn,
      metric_fn=loss_fn,
      metric="mse",
  )
