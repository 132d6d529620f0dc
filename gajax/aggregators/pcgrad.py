"""PCGrad, "Gradient Surgery for Multi-Task Learning" (Yu et al., NeurIPS 2020, arXiv:2001.06782)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from gajax.aggregators import _base



class PCGradState(NamedTuple):
  """State of :func:`pcgrad`.

  Attributes:
    key: the PRNG key for the next update's projection orders, or ``None`` for the fixed order.
  """
  key: jax.Array | None


def projection_order(num_tasks: int, key: jax.Array | None = None) -> jax.Array:
  """The order in which each task is projected onto the other tasks, as int32 ``[T, T - 1]``.

  Row ``i`` lists every ``j != i`` once. With ``key=None`` it is ``0, 1, ..., T - 1`` without ``i``;
  with a key, each row is an independent uniform random permutation (the paper's Algorithm 1 shuffles
  the other tasks anew for each task).
  """
  t = int(num_tasks)
  if t < 1:
    raise ValueError(f"projection_order: num_tasks must be >= 1, got {t}.")
  if t == 1:
    return jnp.zeros((1, 0), jnp.int32)
  base = jnp.arange(t - 1, dtype=jnp.int32)
  if key is None:
    ranks = jnp.broadcast_to(base, (t, t - 1))
  else:
    ranks = jax.vmap(lambda k: jax.random.permutation(k, base))(jax.random.split(key, t))
  # Rank r of row i maps to task r when r < i and to r + 1 otherwise, which skips i.
  return ranks + (ranks >= jnp.arange(t, dtype=jnp.int32)[:, None]).astype(jnp.int32)


def pcgrad_coefficients(gramian: jax.Array, order: jax.Array | None = None) -> jax.Array:
  r"""The projected gradients of PCGrad as coefficients over the original ones: ``C`` of ``[T, T]``.

  Each projected gradient is kept as ``g_i' = sum_k C_ik g_k``, starting from ``C_i = e_i``. For each
  ``j`` in ``order[i]``:

  .. math::
     \langle g_i', g_j\rangle = (C K)_{ij} < 0 \implies
     g_i' \leftarrow g_i' - \frac{\langle g_i', g_j\rangle}{\|g_j\|^2} g_j,\quad
     \text{i.e. } C_{ij} \leftarrow C_{ij} - \frac{(C_i K)_j}{K_{jj}},

  with ``K`` the Gramian. Only ``K`` is read, so the cost is ``O(T^3)`` whatever the parameter count.
  A ``g_j = 0`` (``K_jj = 0``) never triggers a projection.

  Args:
    gramian: ``[T, T]`` Gramian ``K_ij = <g_i, g_j>``; any positive common scale gives the same ``C``.
    order: int ``[T, T - 1]`` from :func:`projection_order`; ``None`` for the fixed order.

  Returns:
    float32 ``[T, T]`` coefficients ``C``.
  """
  k = jnp.asarray(gramian, jnp.float32)
  t = k.shape[0]
  if order is None:
    order = projection_order(t)
  eye = jnp.eye(t, dtype=jnp.float32)

  def project_one(i, row):
    def step(c, j):
      dot = c @ k[:, j]
      sq = k[j, j]
      shift = jnp.where((dot < 0) & (sq > 0), dot / jnp.where(sq > 0, sq, 1.0), 0.0)
      return c - shift * eye[j], None

    c, _ = jax.lax.scan(step, eye[i], row)
    return c

  return jax.vmap(project_one)(jnp.arange(t), jnp.asarray(order, jnp.int32))


def pcgrad_weights(gramian: jax.Array, order: jax.Array | None = None) -> jax.Array:
  """PCGrad's weights ``w`` with ``sum_i g_i' = sum_k w_k g_k``: the column sums of
  :func:`pcgrad_coefficients`. Shapes: ``[T, T]`` (and order ``[T, T - 1]``) -> float32 ``[T]``."""
  return jnp.sum(pcgrad_coefficients(gramian, order), axis=0)


def pcgrad(key: jax.Array | None = None) -> optax.GradientTransformationExtraArgs:
  r"""PCGrad (Yu et al., 2020): projects each task's gradient off the gradients it conflicts with.

  For each task ``i``, ``g_i' = g_i``; then for the other tasks ``j`` in turn, if
  ``<g_i', g_j> < 0``, ``g_i' <- g_i' - <g_i', g_j> / ||g_j||^2 g_j``. The output is

  .. math:: A(g_1..g_T) = \sum_i g_i' = \sum_k w_k g_k,\qquad w = \mathbf{1}^\top C,

  the **sum** of the projected gradients, as in the paper's Algorithm 1 (the multi-task loss is the
  sum of the task losses) and in TorchJD's ``PCGrad``. Without conflicts it is the plain sum; divide the
  learning rate by ``T`` for the scale of :func:`gajax.aggregators.mean`.

  The projections are computed on the ``T x T`` Gramian (see :func:`pcgrad_coefficients`), normalised
  by a power of two near the largest absolute entry (the weights are scale invariant) so that inputs
  of size 1e+30 or 1e-30 work in float32, followed by one weighted sum over the parameters.

  Order: with ``key=None`` each task visits ``j = 0, ..., T - 1`` (skipping itself), deterministic
  but **not** permutation invariant over tasks. With a key, each task gets its own random order at
  every update, as in the paper; the key is kept in the state and split once per update.

  Args:
    key: a PRNG key, or ``None`` for the fixed order.

  Returns:
    An ``optax.GradientTransformationExtraArgs``: input leaves ``[T, *s]`` -> output leaves ``[*s]``
    in the input dtype, state :class:`PCGradState`. Extra keyword arguments are ignored.
  """

  def init_fn(params):
    del params
    return PCGradState(key=key)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    t = _base.num_tasks(updates)
    if state.key is None:
      order, next_key = None, None
    else:
      next_key, sub = jax.random.split(state.key)
      order = projection_order(t, sub)
    weights = pcgrad_weights(_base.normalized_gramian(updates), order)
    return _base.weighted_sum(updates, weights), PCGradState(key=next_key)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
