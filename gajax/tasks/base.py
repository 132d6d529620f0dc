"""What a task distribution hands the meta-learner: a sampler, a model and its loss and metric."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any


class Task(NamedTuple):
  """A task distribution and the model that learns it.

  Attributes:
    name: short name used in flags and logs.
    sample: ``(key, num_tasks, data) -> (support, query)``, pytrees with a leading task axis ``T``;
      pure and jittable (sampling runs on the device). ``data`` is ``train_data``.
    eval_sample: like ``sample``, for evaluation tasks, called with ``eval_data`` (may draw more query
      points, or use held-out classes).
    train_data: arrays the training sampler draws from (``None`` for generated tasks). They are
      passed to the jitted step as an argument, not closed over, so that a data set resident on the
      device is not baked into the compiled program as a constant.
    eval_data: arrays the evaluation sampler draws from.
    init_params: ``key -> params`` of the model.
    loss_fn: ``(params, batch) -> scalar`` training loss for one task's batch.
    metric_fn: ``(params, batch) -> scalar`` reported metric for one task's batch.
    metric: the metric's name, ``"mse"`` or ``"accuracy"`` (accuracy as a fraction in [0, 1]).
    host: ``None`` (tasks drawn on the device from ``train_data``), or a
      :class:`gajax.tasks.host_pipeline.HostFeed` for data sets too big for the device: the loop then
      hands ``sample`` each step's meta-batch drawn on the host, and ``eval_sample`` each chunk of the
      evaluation tasks, as ``data`` (the key is unused), ``train_data``/``eval_data`` being ``None``.
  """
  name: str
  sample: Callable[[jax.Array, int, PyTree], tuple[PyTree, PyTree]]
  eval_sample: Callable[[jax.Array, int, PyTree], tuple[PyTree, PyTree]]
  init_params: Callable[[jax.Array], PyTree]
  loss_fn: Callable[[PyTree, PyTree], jax.Array]
  metric_fn: Callable[[PyTree, PyTree], jax.Array]
  metric: str
  train_data: PyTree = None
  eval_data: PyTree = None
  host: Any = None


def classifier_fns(model) -> tuple[Callable, Callable]:
  """``(loss_fn, accuracy)`` of a Flax classifier ``model`` on batches ``{"x", "y"}``.

  ``loss_fn``: mean softmax cross-entropy of ``model.apply(params, x)`` against the integer labels
  ``y``; ``accuracy``: the fraction of argmax predictions equal to ``y``. Both ``(params, batch) ->
  scalar``, as :class:`Task` wants them.
  """
  def loss_fn(params, batch):
    logits = model.apply(params, batch["x"])
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]))

  def accuracy(params, batch):
    return jnp.mean((jnp.argmax(model.apply(params, batch["x"]), -1) == batch["y"]).astype(jnp.float32))

  return loss_fn, accuracy
