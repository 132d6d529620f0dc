"""Krum and Multi-Krum (Blanchard et al., NeurIPS 2017).

"Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from gajax.aggregators import _base


def _check(t: int, num_byzantine: int, num_selected: int, what: str) -> None:
  if t <= 2 * num_byzantine + 2:
    raise ValueError(
        f"{what}: Krum needs T > 2 * num_byzantine + 2 = {2 * num_byzantine + 2} tasks, got T={t}.")
  if num_selected > t:
    raise ValueError(f"{what}: num_selected={num_selected} exceeds the task count T={t}.")


def krum_weights(gramian: jax.Array, num_byzantine: int = 0, num_selected: int = 1) -> jax.Array:
  r"""Krum / Multi-Krum weights: ``1/m`` on the ``m`` updates with the lowest Krum scores, 0 elsewhere.

  With ``f = num_byzantine`` and squared distances from the Gramian,
  ``|g_i - g_j|^2 = K_ii + K_jj - 2 K_ij`` (clipped at 0), the score of ``i`` is the sum of its
  ``T - f - 2`` smallest squared distances to the other updates (Blanchard et al., 2017, sec. 4;
  squared distances as in the paper). Multi-Krum (``m = num_selected > 1``, same paper) averages the
  ``m`` best-scored updates. Ties go to the lower index. The paper's resilience guarantee needs
  ``T > 2 f + 2``, which we require (TorchJD only requires ``T >= f + 3``, enough for the scores to be
  defined); with ``f = 0`` this is ``T >= 3``. Scores are compared on ``K / tr K``: the selection is
  invariant to a common scale.

  Args:
    gramian: float32 ``[T, T]`` Gramian.
    num_byzantine: the number ``f >= 0`` of updates that may be arbitrary.
    num_selected: ``m >= 1``.

  Returns:
    float32 ``[T]`` weights (``m`` entries ``1/m``).
  """
  q, _ = _base.trace_normalized(gramian)
  t = q.shape[0]
  _check(t, num_byzantine, num_selected, "krum_weights")
  diag = jnp.diagonal(q)
  dist = jnp.maximum(diag[:, None] + diag[None, :] - 2.0 * q, 0.0)
  dist = jnp.where(jnp.eye(t, dtype=bool), jnp.inf, dist)
  nearest, _ = jax.lax.top_k(-dist, t - num_byzantine - 2)
  scores = -jnp.sum(nearest, axis=1)
  chosen = jnp.argsort(scores, stable=True)[:num_selected]
  return jnp.zeros((t,), jnp.float32).at[chosen].set(1.0 / num_selected)


def krum(num_byzantine: int = 0, num_selected: int = 1) -> optax.GradientTransformationExtraArgs:
  r"""Krum (``num_selected=1``) or Multi-Krum: the mean of the ``m`` updates closest to their neighbours.

  Weights from :func:`krum_weights`: the output is one input update (Krum) or the mean of
  ``num_selected`` of them, never a ``1/T`` average. ``update`` raises ``ValueError`` unless
  ``T > 2 * num_byzantine + 2`` and ``num_selected <= T``. Gramian from inputs divided by a power of
  two near their largest entry. Input leaves ``[T, *s]``, output leaves ``[*s]`` in the input dtype;
  extra keyword arguments of ``update`` are ignored.

  Args:
    num_byzantine: the number ``f >= 0`` of updates that may be arbitrary (default 0).
    num_selected: ``m >= 1`` updates to average.
  """
  if num_byzantine < 0:
    raise ValueError(f"krum: num_byzantine must be >= 0, got {num_byzantine}.")
  if num_selected < 1:
    raise ValueError(f"krum: num_selected must be >= 1, got {num_selected}.")

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    _check(_base.num_tasks(updates), num_byzantine, num_selected, "krum")
    weights = krum_weights(_base.normalized_gramian(updates), num_byzantine, num_selected)
    return _base.weighted_sum(updates, weights), state

  return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)
