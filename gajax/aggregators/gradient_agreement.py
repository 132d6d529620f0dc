"""Gradient agreement (Eshratifar, Eigen & Pedram, 2018, arXiv:1810.08178), as an optax transformation.

:func:`gradient_agreement` is the paper's eq. 13; :func:`cosine_agreement` is this project's variant
with weights that do not depend on the size of each task's update.
"""

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
  invariance for robustness: the inputs are divided by a power of two near their largest entry before
  the inner products, which changes nothing mathematically (the division is exact) but keeps float32
  from overflowing at 1e+30 or underflowing at 1e-30. Everything is accumulated in float32, whatever
  the leaves' dtype.

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
  # A power of two near the largest entry (1 where it is zero or not finite, so zeros stay zero and
  # NaN/Inf propagate): dividing by it is exact, so updates that cancel exactly ([g, -g, 2g, -2g])
  # still sum to G = 0 exactly; 1 / peak would round and leave a residue whose direction the
  # weights would then follow at full size.
  inv_scale = 1.0 / _base.power_of_two_scale(_base.max_abs(task_updates))
  # <g_i, G> * inv_scale^2 without rescaling the T x P input: the scale enters the sum's weights, and
  # once more the P-sized result, so inv_scale^2 itself is never formed (it could overflow float32).
  total = jax.tree_util.tree_map(lambda x: x * inv_scale, _base.task_sum(task_updates, inv_scale))
  scores = _base.inner_products(task_updates, total)
  denom = jnp.sum(jnp.abs(scores))
  safe = denom > 0
  return jnp.where(safe, scores / jnp.where(safe, denom, 1.0), jnp.full((t,), 1.0 / t, jnp.float32))


def cosine_agreement_weights(task_updates: PyTree) -> jax.Array:
  r"""Cosine-normalised agreement weights: a VARIANT of eq. 13 of Eshratifar et al. (2018), not eq. 13.

  .. math::
     w_i = \frac{\cos(g_i, G)}{\sum_k |\cos(g_k, G)|},\qquad
     \cos(g_i, G) = \frac{\langle g_i, G\rangle}{\|g_i\|\,\|G\|},\qquad G = \sum_j g_j,

  with inner products and norms over the whole pytree (every leaf flattened and concatenated).

  Why a variant: in the paper (:func:`agreement_weights`) ``w_i`` is proportional to
  ``<g_i, G> = |g_i| |G| cos(g_i, G)``, so a task with a large update gets a large weight whatever its
  direction. On sinusoids the meta-gradient of a task grows with its amplitude squared, so the paper's
  weights mostly rank tasks by amplitude. Dividing by ``|g_i|`` keeps only the direction: given ``G``,
  ``w_i`` depends on ``g_i`` only through ``g_i / |g_i|``, so if ``g_i`` becomes ``c g_i`` (``c > 0``)
  with ``G`` unchanged, the ratios ``w_i / w_k`` stay the same, where in the paper ``w_i / w_k`` is
  multiplied by ``c``. (Rescaling ``g_i`` alone also moves ``G`` by ``(c - 1) g_i``, which changes
  every cosine; that is the only way a task's size still enters.) The aggregate ``sum_i w_i g_i``
  still carries each task at its own size. The paper's other properties remain: the weights are
  signed, ``sum_i |w_i| = 1``, and they are invariant to a common positive scale of all ``g_i``.

  Robustness: each ``g_i`` is divided by its own power of two near its largest entry (exact in binary
  floating point) before its norm and its inner product with ``G`` are taken, and ``G`` (summed from the
  inputs divided by a power of two near their largest entry) by a power of two near its own largest
  entry; so tasks of sizes 1e-30 and 1e+30 in one batch neither underflow nor overflow float32. A task
  with ``g_i = 0`` gets ``cos = 0`` (weight 0). ``sum_k |cos(g_k, G)| = 0`` exactly when ``G = 0`` (then
  ``sum_k <g_k, G> = |G|^2 = 0``); there we return uniform weights ``1/T``, as :func:`agreement_weights`
  does. Everything is accumulated in float32, whatever the leaves' dtype.

  Args:
    task_updates: a pytree whose leaves all have shape ``[T, ...]``.

  Returns:
    float32 weights of shape ``[T]``.
  """
  t = _base.num_tasks(task_updates, what="agreement signal")
  # G / 2^e with 2^e near the largest entry: entries in [-T, T], so no overflow. A power of two (not
  # 1 / peak) keeps every product exact, so updates that cancel exactly (g, -g) give G = 0 exactly
  # rather than a rounding residue whose direction the cosines would then report at full size.
  # power_of_two_scale maps a zero or non-finite peak to 1 (zeros stay zero, NaN propagates).
  # The largest entry overall is the largest of the tasks' (needed below): one pass over the input
  # for both (two reductions of |g| made XLA write |g| out, a [T, P] copy).
  task_peaks = _base.task_max_abs(task_updates)
  inv_scale = 1.0 / _base.power_of_two_scale(jnp.max(task_peaks))
  total = _base.task_sum(task_updates, inv_scale)
  # After cancellation G can still be tiny and its squared norm underflow: rescale it once more (the
  # cosine does not depend on the size of G).
  inv_total_scale = 1.0 / _base.power_of_two_scale(_base.max_abs(total))
  total = jax.tree_util.tree_map(lambda x: x * inv_total_scale, total)
  total_norm = jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(total)))
  # Per-task powers of two: every rescaled task has its largest entry in [0.5, 1), so a small task
  # keeps its direction next to a huge one (one global scale would flush it to zero).
  # (Scaled as they are read: writing a scaled [T, P] copy costs more than the rest, BUILD.md.)
  factors = 1.0 / _base.power_of_two_scale(task_peaks)
  task_norms = jnp.sqrt(_base.scaled_sq_norms(task_updates, factors))
  dots = _base.scaled_inner_products(task_updates, total, factors)
  norms = task_norms * total_norm
  cosines = jnp.where(norms > 0, dots / jnp.where(norms > 0, norms, 1.0), 0.0)
  denom = jnp.sum(jnp.abs(cosines))
  safe = denom > 0
  return jnp.where(safe, cosines / jnp.where(safe, denom, 1.0), jnp.full((t,), 1.0 / t, jnp.float32))


def _agreement_transformation(name: str, weights_fn, num_tasks: int | None
                              ) -> optax.GradientTransformationExtraArgs:
  """``sum_i w_i g_i`` with ``w = weights_fn(signal)``: the transformation behind both agreement methods.

  ``name`` prefixes the error messages; see :func:`gradient_agreement` for the arguments.
  """
  if num_tasks is not None and num_tasks < 1:
    raise ValueError(f"{name}: num_tasks must be >= 1, got {num_tasks}.")

  def init_fn(params):
    del params
    return AgreementState(weights=jnp.zeros((num_tasks or 0,), jnp.float32))

  def update_fn(updates, state, params=None, *, agreement_signal=None, task_mask=None,
                **extra_args):
    # task_mask needs no handling: masked tasks arrive as zero rows, which get weight exactly 0.
    del params, extra_args, task_mask
    t = _base.num_tasks(updates)
    if num_tasks is not None and t != num_tasks:
      raise ValueError(f"{name}: built for num_tasks={num_tasks} but the updates have T={t}.")
    signal = updates if agreement_signal is None else agreement_signal
    weights = weights_fn(signal)
    if weights.shape[0] != t:
      raise ValueError(
          f"{name}: agreement_signal has T={weights.shape[0]} tasks but the updates have T={t}.")
    return _base.weighted_sum(updates, weights), AgreementState(weights=weights)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


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
  return _agreement_transformation("gradient_agreement", agreement_weights, num_tasks)


def cosine_agreement(num_tasks: int | None = None) -> optax.GradientTransformationExtraArgs:
  r"""VARIANT of :func:`gradient_agreement` with cosine-normalised weights: ``sum_i w_i g_i``.

  Weights ``w`` are those of :func:`cosine_agreement_weights`, ``w_i = cos(g_i, G) / sum_k
  |cos(g_k, G)|``, which is not the paper's eq. 13 (Eshratifar et al., 2018): there ``w_i`` is
  proportional to ``<g_i, G>`` and so grows with the size of ``g_i``. Everything else is as in
  :func:`gradient_agreement`: the same :class:`AgreementState`, the optional ``agreement_signal`` extra
  argument (weights from that signal, applied to the updates), ``task_mask`` accepted, the same
  errors, no extra ``1/T``.

  Args:
    num_tasks: the task count ``T``, if known (fixes the shape of ``AgreementState.weights``).

  Returns:
    An ``optax.GradientTransformationExtraArgs``. Input leaves ``[T, *s]``, output leaves ``[*s]`` in
    the input dtype; ``state.weights`` holds the last weights for logging.
  """
  return _agreement_transformation("cosine_agreement", cosine_agreement_weights, num_tasks)
