"""Random loss weighting (RLW), "Reasonable Effectiveness of Random Weighting" (Lin et al., 2022).

TMLR 2022, arXiv:2111.10603.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from gajax.aggregators import _base


class RandomState(NamedTuple):
  """State of :func:`random`.

  Attributes:
    key: the PRNG key from which the next update's weights are drawn.
  """
  key: jax.Array


def random_weights(key: jax.Array, num_tasks: int) -> jax.Array:
  r"""RLW weights ``w = softmax(z)``, ``z ~ N(0, I_T)``: float32 ``[T]``, positive, summing to 1.

  The normal-then-softmax draw is the paper's default (Lin et al., sec. 3) and TorchJD's ``Random``.
  """
  return jax.nn.softmax(jax.random.normal(key, (num_tasks,), jnp.float32))


def random(key: jax.Array | int) -> optax.GradientTransformationExtraArgs:
  r"""RLW: ``sum_i w_i g_i`` with fresh weights ``w = softmax(N(0, I))`` at every update.

  The weights sum to 1, so the output is a random convex combination (mean scale, like TorchJD's
  ``Random``). The key lives in :class:`RandomState`; each ``update`` splits it, draws the weights with
  one half and stores the other, so a jitted training step stays deterministic given the initial key.

  Args:
    key: a ``jax.random`` key (raw ``PRNGKey`` or typed ``key``) or an int seed.

  Returns:
    An ``optax.GradientTransformationExtraArgs``: input leaves ``[T, *s]``, output leaves ``[*s]`` in
    the input dtype; extra keyword arguments of ``update`` are ignored.
  """
  if isinstance(key, int):
    key = jax.random.PRNGKey(key)

  def init_fn(params):
    del params
    return RandomState(key=key)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    t = _base.num_tasks(updates)
    next_key, draw = jax.random.split(state.key)
    return _base.weighted_sum(updates, random_weights(draw, t)), RandomState(key=next_key)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
