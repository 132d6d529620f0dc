"""Gradient agreement (Eshratifar, Eigen & Pedram, 2018, arXiv:1810.08178), as an optax transformation."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gajax.aggregators import _base

PyTree = Any


class AgreementState(NamedTuple):
  """State of :func:`gradient_agreement`.

  Attributes:
    weights: float32 ``[T]``, the agreement weights of the last update (zeros before the first).
  """
  weights: jax.Array


def agreement_weights(task_updates: PyTree) -> jax.Array:
  r"""The agreement weights of eq. 1 / 13 of Eshratifar et al. (2018).

  .. math::
     w_i = \frac{\sum_j \langle g_i, g_j\rangle}{\sum_k |\sum_j \langle g_k, g_j\rangle|}
         = \frac{\langle g_i, G\rangle}{\sum_k |\langle g_k, G\rangle|},\qquad G = \sum_j g_j,

  with inner products taken over the whole pytree (every leaf flattened and concatenated). The second
  form costs two passes over the ``T x P`` input and never builds the ``T x T`` Gramian.

  Properties: the weights are signed (a task pointing against the batch sum gets ``w_i < 0``),
  ``sum_i |w_i| = 1``, and they are invariant to a common positive scale of all ``g_i``. We use that
  invariance for robustness: the inputs are divided by their largest absolute entry before the inner
  products, which changes nothing mathematically but keeps float32 from overflowing at 1e+30 or
  underflowing at 1e-30. Everything is accumulated in float32, whatever the leaves' dtype.

  The denominator is zero exactly when ``G = 0`` (``sum_k <g_k, G> = |G|^2``); the paper leaves this
  case open. We return uniform weights ``1/T`` there (so ``sum |w| = 1`` still holds). Aggregating the
  same updates, that gives the mean, which is ``G / T = 0``: a zero step. With a separate signal
  (``agreement_signal``) whose sum vanishes, it falls back to the plain mean of the updates.

  Args:
    task_updates: a pytree whose leaves all have shape ``[T, ...]``.

  Returns:
    float32 weights of shape ``[T]``.
  """
  t = _base.num_tasks(task_updates, what="agreement signal")
  peak = _base.max_abs(task_updates)
  # A zero or non-finite peak would turn the rescaling itself into NaN; 1.0 keeps zeros at zero and
  # lets NaN/Inf inputs propagate as NaN rather than be hidden.
  inv_scale = jnp.where((peak > 0) & jnp.isfinite(peak), 1.0 / peak, 1.0)
  # <g_i, G> * inv_scale^2 without rescaling the T x P input: the scale enters the sum's weights, and
  # once more the P-sized result, so inv_scale^2 itself is never formed (it could overflow float32).
  total = jax.tree_util.tree_map(lambda x: x * inv_scale, _base.task_sum(task_updates, inv_scale))
  scores = _base.inner_products(task_updates, total)
  denom = jnp.sum(jnp.abs(scores))
  safe = denom > 0
  return jnp.where(safe, scores / jnp.where(safe, denom, 1.0), jnp.full((t,), 1.0 / t, jnp.float32))


def gradient_agreement(num_tasks: int | None = None) -> optax.GradientTransformationExtraArgs:
  r"""Aggregates per-task updates by their agreement with the batch: ``sum_i w_i g_i``.

  Weights ``w`` are those of :func:`agreement_weights` (Eshratifar et al., 2018, eq. 13). The output is
  ``sum_i w_i g_i`` with no extra ``1/T``: the L1 normalisation of the weights replaces it (the
  paper's Algorithm 1).

  By default the weights come from the aggregated updates themselves (the book chapter's reading:
  weights from the gradients being combined). The paper's exact MAML variant takes them from a
  different per-task signal, the inner-loop displacement ``theta - theta_i``, while it aggregates the
  query meta-gradients; pass that signal as an extra argument::

      tx = optax.chain(gajax.aggregators.gradient_agreement(), optax.adam(1e-3))
      u, state = tx.update(meta_grads, state, params, agreement_signal=displacements)

  The signal is any pytree with the same task count ``T`` (its structure may differ from the
  updates').

  Args:
    num_tasks: the task count ``T``, if known. It fixes the shape of ``AgreementState.weights`` at
      ``init`` so that the state keeps one shape across steps (needed inside ``lax.scan`` and by
      ``nnx.Optimizer``). With ``None`` the state starts with shape ``[0]`` and takes ``[T]`` after the
      first update.

  Returns:
    An ``optax.GradientTransformationExtraArgs``. Input leaves ``[T, *s]``, output leaves ``[*s]`` in
    the input dtype; ``state.weights`` holds the last weights for logging.
  """
  if num_tasks is not None and num_tasks < 1:
    raise ValueError(f"gradient_agreement: num_tasks must be >= 1, got {num_tasks}.")

  def init_fn(params):
    del params
    return AgreementState(weights=jnp.zeros((num_tasks or 0,), jnp.float32))

  def update_fn(updates, state, params=None, *, agreement_signal=None, task_mask=None,
                **extra_args):
    # task_mask needs no handling: masked tasks arrive as zero rows, which get weight exactly 0.
    del params, extra_args, task_mask
    t = _base.num_tasks(updates)
    if num_tasks is not None and t != num_tasks:
      raise ValueError(
          f"gradient_agreement: built for num_tasks={num_tasks} but the updates have T={t}.")
    signal = updates if agreement_signal is None else agreement_signal
    weights = agreement_weights(signal)
    if weights.shape[0] != t:
      raise ValueError(
          f"gradient_agreement: agreement_signal has T={weights.shape[0]} tasks but the updates "
          f"have T={t}.")
    return _base.weighted_sum(updates, weights), AgreementState(weights=weights)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
