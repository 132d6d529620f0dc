"""What a task distribution hands the meta-learner: a sampler, a model and its loss and metric."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax

PyTree = Any


class Task(NamedTuple):
  """A task distribution and the model that learns it.

  Attributes:
    name: short name used in flags and logs.
    sample: ``(key, num_tasks) -> (support, query)``, pytrees with a leading task axis ``T``; pure
      and jittable (sampling runs on the device).
    eval_sample: like ``sample``, for evaluation tasks (may draw more query points, or use held-out
      classes).
    init_params: ``key -> params`` of the model.
    loss_fn: ``(params, batch) -> scalar`` training loss for one task's batch.
    metric_fn: ``(params, batch) -> scalar`` reported metric for one task's batch.
    metric: the metric's name, ``"mse"`` or ``"accuracy"`` (accuracy as a fraction in [0, 1]).
  """
  name: str
  sample: Callable[[jax.Array, int], tuple[PyTree, PyTree]]
  eval_sample: Callable[[jax.Array, int], tuple[PyTree, PyTree]]
  init_params: Callable[[jax.Array], PyTree]
  loss_fn: Callable[[PyTree, PyTree], jax.Array]
  metric_fn: Callable[[PyTree, PyTree], jax.Array]
  metric: str
