"""Reading and re-keying aggregator state inside any optax state, without knowing where it sits.

A training step holds its aggregator somewhere inside an ``optax.chain`` (and perhaps a
:func:`~gajax.aggregators.skip_nonfinite_tasks` guard); these accessors find the state by its type,
so a caller never reaches into the tree by position or field name.
"""

from __future__ import annotations

import jax
import optax

from gajax.aggregators.gradient_agreement import AgreementState
from gajax.aggregators.graddrop import GradDropState
from gajax.aggregators.random import RandomState
from gajax.aggregators.skip_nonfinite import SkipNonfiniteState

_KEYED = (RandomState, GradDropState)


def _find(opt_state: optax.OptState, kind) -> list:
  nodes = jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, kind))
  return [n for n in nodes if isinstance(n, kind)]


def task_weights(opt_state: optax.OptState) -> jax.Array | None:
  """The per-task weights ``[T]`` of the last update of a gradient/cosine agreement in ``opt_state``
  (zeros before the first update, ``[0]`` when built without ``num_tasks``), or ``None`` if it holds none."""
  found = _find(opt_state, AgreementState)
  return found[0].weights if found else None


def skipped_tasks(opt_state: optax.OptState) -> jax.Array | None:
  """How many tasks the last update of a :func:`~gajax.aggregators.skip_nonfinite_tasks` guard in
  ``opt_state`` dropped (int32 scalar), or ``None`` if there is no guard."""
  found = _find(opt_state, SkipNonfiniteState)
  return found[0].skipped if found else None


def with_key(opt_state: optax.OptState, key: jax.Array) -> optax.OptState:
  """``opt_state`` with the key of every random aggregator in it (``random``, ``graddrop``) replaced.

  The random aggregators take a key when they are built, as optax's ``add_noise`` takes a seed; a
  training run calls this in its ``init`` with a key derived from the run's own key, so that every
  random stream of the run comes from that one key (and seeds vmapped in one program each get theirs).
  The first random aggregator gets ``key`` itself, any further one ``fold_in(key, i)``.
  """
  count = [0]

  def rekey(node):
    if isinstance(node, _KEYED):
      count[0] += 1
      return node._replace(key=key if count[0] == 1 else jax.random.fold_in(key, count[0] - 1))
    return node

  return jax.tree_util.tree_map(rekey, opt_state, is_leaf=lambda x: isinstance(x, _KEYED))
