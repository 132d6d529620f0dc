"""GradVac, "Gradient Vaccine" (Wang, Tsvetkov, Firat & Cao, ICLR 2021, arXiv:2010.05874)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from gajax.aggregators import _base
from gajax.aggregators.pcgrad import projection_order


# Floor of 1 - phi_hat^2 under the square root. It only matters when phi_hat is exactly +-1 in
# float32, where the exact adjustment is infinite; there it caps the step at about 1e4 ||g_i'||/||g_j||.
_MIN_SIN_SQ = 1e-8


class GradVacState(NamedTuple):
  """State of :func:`gradvac`.

  Attributes:
    phi_hat: float32 ``[T, T]``, the EMA targets ``phi_hat_ij`` of ``cos(g_i', g_j)`` (zeros at init;
      the diagonal is never used).
    key: the PRNG key for the next update's orders, or ``None`` for the fixed order.
  """
  phi_hat: jax.Array
  key: jax.Array | None


def gradvac_coefficients(gramian: jax.Array, phi_hat: jax.Array, beta: float,
                         order: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  r"""GradVac's adjusted gradients as coefficients over the original ones, and the new targets.

  With ``g_i' = sum_k C_ik g_k`` (``C_i = e_i`` at the start) and ``K`` the Gramian, for each ``j`` in
  ``order[i]``: ``phi_ij = cos(g_i', g_j) = (C_i K)_j / (sqrt(C_i K C_i^T) sqrt(K_jj))``, and if
  ``phi_ij < phi_hat_ij``

  .. math::
     g_i' \leftarrow g_i' + \frac{\|g_i'\|\,\big(\hat\phi_{ij}\sqrt{1-\phi_{ij}^2}
        - \phi_{ij}\sqrt{1-\hat\phi_{ij}^2}\big)}{\|g_j\|\sqrt{1-\hat\phi_{ij}^2}}\, g_j,

  which sets ``cos(g_i', g_j)`` to ``phi_hat_ij`` exactly (Wang et al., 2021, eq. 5 / Algorithm 1).
  Whether or not it adjusts, ``phi_hat_ij <- (1 - beta) phi_hat_ij + beta phi_ij`` with the cosine
  measured before the adjustment (as in Algorithm 1 and LibMTL). A pair where ``g_i'`` or ``g_j`` is
  zero has no cosine: it is neither adjusted nor does it move ``phi_hat_ij``.

  Args:
    gramian: ``[T, T]``; any positive common scale gives the same result.
    phi_hat: float32 ``[T, T]`` targets.
    beta: EMA rate in ``[0, 1]``.
    order: int ``[T, T - 1]`` from :func:`gajax.aggregators.pcgrad.projection_order`; ``None`` for
      ``j = 0..T-1`` skipping ``i``.

  Returns:
    ``(C, new_phi_hat)``, float32 ``[T, T]`` each.
  """
  k = jnp.asarray(gramian, jnp.float32)
  t = k.shape[0]
  if order is None:
    order = projection_order(t)
  eye = jnp.eye(t, dtype=jnp.float32)
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(k), 0.0))

  def adjust_one(i, row, targets):
    def step(carry, j):
      c, targets = carry
      kc = c @ k
      norm_i = jnp.sqrt(jnp.maximum(kc @ c, 0.0))
      norm_j = norms[j]
      valid = (norm_i > 0) & (norm_j > 0)
      denom = jnp.where(valid, norm_i * norm_j, 1.0)
      cos = jnp.clip(kc[j] / denom, -1.0, 1.0)
      target = targets[j]
      sin_t = jnp.sqrt(jnp.maximum(1.0 - target * target, _MIN_SIN_SQ))
      sin_c = jnp.sqrt(jnp.maximum(1.0 - cos * cos, 0.0))
      step_size = (norm_i * (target * sin_c - cos * sin_t)
                   / (jnp.where(valid, norm_j, 1.0) * sin_t))
      c = c + jnp.where(valid & (cos < target), step_size, 0.0) * eye[j]
      targets = targets.at[j].set(jnp.where(valid, (1.0 - beta) * target + beta * cos, target))
      return (c, targets), None

    (c, targets), _ = jax.lax.scan(step, (eye[i], targets), row)
    return c, targets

  return jax.vmap(adjust_one)(jnp.arange(t), jnp.asarray(order, jnp.int32),
                              jnp.asarray(phi_hat, jnp.float32))


def gradvac(num_tasks: int, beta: float = 0.01,
            key: jax.Array | None = None) -> optax.GradientTransformationExtraArgs:
  r"""Gradient Vaccine (Wang et al., 2021): pulls each pair's cosine up to a running target.

  For each task ``i`` and each other task ``j`` in turn, when ``cos(g_i', g_j)`` is below the EMA
  target ``phi_hat_ij`` (kept in the state), ``g_i'`` gets the multiple of ``g_j`` that lifts the
  cosine exactly to the target; then the target moves toward the observed cosine with rate ``beta``
  (see :func:`gradvac_coefficients`). PCGrad is the special case of fixed targets ``phi_hat = 0``.

  The output is the **sum** of the adjusted gradients ``sum_i g_i'``, as in Algorithm 1 of the paper
  and in LibMTL, and as in :func:`gajax.aggregators.pcgrad`: without adjustments it is the plain sum.

  Differences from the paper: the paper applies GradVac per parameter group (layer or module) with
  one target matrix per group; here the whole model is one group (cosines over all leaves). Targets
  start at 0 (LibMTL's choice). Everything but the final weighted sum runs on the ``T x T`` Gramian,
  normalised by a power of two near the largest absolute entry (the cosines and the step ratios are
  scale invariant).

  Order: with ``key=None`` each task visits ``j = 0..T-1`` (skipping itself); with a key, a random
  order per task and update, the key split once per update and kept in the state.

  Args:
    num_tasks: ``T``, fixed: it sets the shape of the ``[T, T]`` target matrix.
    beta: EMA rate in ``[0, 1]`` (the paper uses 1e-2).
    key: a PRNG key, or ``None`` for the fixed order.

  Returns:
    An ``optax.GradientTransformationExtraArgs``: input leaves ``[T, *s]`` -> output leaves ``[*s]``
    in the input dtype, state :class:`GradVacState`. Extra keyword arguments are ignored.
  """
  t = int(num_tasks)
  if t < 1:
    raise ValueError(f"gradvac: num_tasks must be >= 1, got {num_tasks}.")
  if not 0.0 <= beta <= 1.0:
    raise ValueError(f"gradvac: beta must be in [0, 1], got {beta}.")

  def init_fn(params):
    del params
    return GradVacState(phi_hat=jnp.zeros((t, t), jnp.float32), key=key)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    got = _base.num_tasks(updates)
    if got != t:
      raise ValueError(f"gradvac: built for num_tasks={t} but the updates have T={got}.")
    if state.key is None:
      order, next_key = None, None
    else:
      next_key, sub = jax.random.split(state.key)
      order = projection_order(t, sub)
    coeffs, phi_hat = gradvac_coefficients(_base.normalized_gramian(updates), state.phi_hat, beta,
                                           order)
    weights = jnp.sum(coeffs, axis=0)
    return _base.weighted_sum(updates, weights), GradVacState(phi_hat=phi_hat, key=next_key)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
