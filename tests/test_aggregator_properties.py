"""Properties every registered aggregator must have, parametrised over ``registry.names()``.

Shape and dtype, finiteness on degenerate inputs, documented task-count limits, permutation invariance
(for the deterministic methods), jit against eager (``chex.variants``), bfloat16, random Jacobians
(hypothesis), the non-conflicting guarantee (MGDA, UPGrad, DualProj), and use inside ``optax.chain``
under ``jax.jit``.

All inputs share one two-leaf structure with ``P = 10`` coordinates and ``T`` in ``{1, 5}`` (and ``T = 2``
for the non-conflicting checks), and the jitted functions are cached per (name, T): compilation
dominates the run time, so every test reuses them (``jax.jit`` of the same ``update`` again, as chex's
``with_jit`` variant does, finds the cached compilation).
"""

from __future__ import annotations

import functools
import importlib.util

from absl.testing import parameterized
import chex
import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gajax.aggregators import registry

NAMES = registry.names()
P = 10
T_MAIN = 5

# Deterministic and symmetric in the tasks. Not here: random, graddrop (random draws), and pcgrad /
# gradvac, whose fixed projection order j = 0..T-1 makes the result depend on the task order.
PERMUTATION_INVARIANT = {"mean", "sum", "gradient_agreement", "mgda", "upgrad", "dualproj", "imtl_g",
                         "aligned_mtl", "nash_mtl", "cagrad", "trimmed_mean", "and_mask", "krum"}
# Claim <g_i, A(J)> >= 0 for every task i.
NON_CONFLICTING = {"mgda", "upgrad", "dualproj"}
# Documented lower limits on T for the arguments below (update must raise ValueError under them).
MIN_TASKS = {"trimmed_mean": 3, "krum": 3}


def factory_kwargs(name, t):
  if name == "gradvac":
    return {"num_tasks": t}
  if name == "trimmed_mean":
    return {"trim": 1}
  return {}


def require(name):
  module = registry._FACTORIES[name][0]  # pylint: disable=protected-access
  if importlib.util.find_spec(f"gajax.aggregators.{module}") is None:
    pytest.skip(f"gajax/aggregators/{module}.py is not written yet")


@functools.lru_cache(maxsize=None)
def build(name, t):
  """``(tx, jitted update)`` for one name and task count."""
  tx = registry.get(name, **factory_kwargs(name, t))
  return tx, jax.jit(tx.update)


def to_tree(j, dtype=jnp.float32):
  j = np.asarray(j)
  t = j.shape[0]
  return {"b": jnp.asarray(j[:, :4], dtype), "w": jnp.asarray(j[:, 4:].reshape(t, 3, 2), dtype)}


def flat(tree):
  return np.concatenate([np.asarray(tree["b"], np.float64).reshape(-1),
                         np.asarray(tree["w"], np.float64).reshape(-1)])


def one_task(tree):
  """The parameter-shaped tree an aggregator must return for stacked updates ``tree``."""
  return jax.tree_util.tree_map(lambda x: x[0], tree)


def aggregate(name, j, dtype=jnp.float32):
  tx, update = build(name, j.shape[0])
  tree = to_tree(j, dtype)
  out, _ = update(tree, tx.init(None))
  chex.assert_trees_all_equal_shapes_and_dtypes(out, one_task(tree))
  return out


def degenerate_cases(t):
  rng = np.random.default_rng(t)
  g, h = rng.normal(size=P), rng.normal(size=P)
  signs = np.where(np.arange(t) % 2 == 0, 1.0, -1.0)
  rand = rng.normal(size=(t, P))
  return {
      "random": rand,
      "zeros": np.zeros((t, P)),
      "duplicates": np.tile(g, (t, 1)),
      "opposite": signs[:, None] * g,
      # Collinear with both signs, one zero row, and a zero sum for odd T: [-2, -1, 0, 1, 2] g.
      "collinear": (np.arange(t) - (t - 1) / 2)[:, None] * g,
      "opposite_pairs": np.stack([(g, -g, h, -h)[k % 4] if k < t - t % 2 else 0 * g
                                  for k in range(t)]),
      "one_zero_row": np.concatenate([np.zeros((1, P)), rand[1:]]),
      "tiny": rand * 1e-30,
      "huge": rand * 1e30,
      "mixed_scale": rand * np.logspace(-20, 20, t)[:, None],
  }


def check_non_conflicting(j, out, rtol=1e-3):
  j = np.asarray(j, np.float64)
  # Rows whose float32 entries are all subnormal reach the aggregator as zero rows (XLA's CPU backend
  # flushes denormals to zero), so no guarantee can hold for them: leave them out of the check.
  j = j[np.max(np.abs(j), axis=1) >= np.finfo(np.float32).tiny]
  if j.shape[0] == 0:
    return
  a = flat(out)
  s = np.max(np.abs(j))
  if s == 0:
    return
  j, a = j / s, a / s
  dots = j @ a
  norms = np.linalg.norm(j, axis=1)
  # Relative to |g_i| |A|, plus float32 rounding of an A that should be 0 (e.g. exactly opposite rows).
  tol = rtol * norms * np.linalg.norm(a) + 1e-6 * norms * norms.max()
  assert np.all(dots >= -tol), (dots, tol)


@pytest.mark.parametrize("name", NAMES)
def test_degenerate_inputs_give_finite_parameter_shaped_output(name):
  require(name)
  for t in (1, T_MAIN):
    for case, j in degenerate_cases(t).items():
      if t < MIN_TASKS.get(name, 1):
        with pytest.raises(ValueError):
          aggregate(name, j)
        break
      out = aggregate(name, j)
      assert np.all(np.isfinite(flat(out))), (name, t, case, flat(out))
      if case == "zeros":
        np.testing.assert_array_equal(flat(out), 0.0, err_msg=name)


@pytest.mark.parametrize("name", sorted(PERMUTATION_INVARIANT & set(NAMES)))
def test_permutation_invariance(name):
  require(name)
  rng = np.random.default_rng(0)
  for _ in range(2):
    j = rng.normal(size=(T_MAIN, P))
    perm = rng.permutation(T_MAIN)
    a, b = flat(aggregate(name, j)), flat(aggregate(name, j[perm]))
    np.testing.assert_allclose(a, b, atol=1e-4 * (np.abs(a).max() + 1e-6), err_msg=name)


class JitAndEagerTest(chex.TestCase):
  """Every aggregator's ``update`` under ``jax.jit`` and eagerly (chex's ``with_jit`` / ``without_jit``)."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters((name, name) for name in NAMES)
  def test_update_is_parameter_shaped_finite_and_matches_the_cached_jit(self, name):
    require(name)
    tx, update = build(name, T_MAIN)
    tree = to_tree(np.random.default_rng(1).normal(size=(T_MAIN, P)))
    state = tx.init(None)
    out, new_state = self.variant(tx.update)(tree, state)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, one_task(tree))
    chex.assert_tree_all_finite(out)
    chex.assert_trees_all_equal_structs(new_state, state)
    want, _ = update(tree, state)
    scale = max(np.abs(x).max() for x in jax.tree_util.tree_leaves(want))
    chex.assert_trees_all_close(out, want, rtol=0.0, atol=1e-5 * (scale + 1e-6))


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_close_to_float32(name):
  require(name)
  j = np.random.default_rng(2).normal(size=(T_MAIN, P))
  j = np.asarray(jnp.asarray(j, jnp.bfloat16).astype(jnp.float32))  # same values in both dtypes
  ref = flat(aggregate(name, j))
  low = flat(aggregate(name, j, dtype=jnp.bfloat16))
  assert np.all(np.isfinite(low)), name
  # bfloat16 keeps 8 significant bits: the output's own rounding is up to 2^-9 of the largest entry;
  # measured at most 3.6e-3 of it (nash_mtl). test_aggregators_gramian.py relies on this test.
  np.testing.assert_allclose(low, ref, atol=1e-2 * (np.abs(ref).max() + 1e-6), err_msg=name)


_jacobians = hnp.arrays(
    np.float32, (T_MAIN, P),
    elements=st.one_of(st.just(0.0), st.floats(-1e3, 1e3, width=32, allow_subnormal=False)))


@pytest.mark.parametrize("name", NAMES)
@hypothesis.settings(max_examples=12, deadline=None, derandomize=True, database=None)
@hypothesis.given(j=_jacobians, exponent=st.integers(-30, 30))
def test_random_jacobians(name, j, exponent):
  require(name)
  j = j.astype(np.float64) * 10.0**exponent
  out = aggregate(name, j)
  assert np.all(np.isfinite(flat(out))), (name, flat(out))
  if name in NON_CONFLICTING:
    check_non_conflicting(j, out)


@pytest.mark.parametrize("name", sorted(NON_CONFLICTING & set(NAMES)))
def test_non_conflicting_on_conflicting_inputs(name):
  require(name)
  rng = np.random.default_rng(3)
  g = rng.normal(size=P)
  cases = [rng.normal(size=(T_MAIN, P)),
           np.stack([g, -g + 0.1 * rng.normal(size=P)]),
           np.stack([g, -0.5 * g + rng.normal(size=P)]),
           degenerate_cases(T_MAIN)["opposite"],
           degenerate_cases(T_MAIN)["mixed_scale"]]
  for j in cases:
    check_non_conflicting(j, aggregate(name, j))


@functools.lru_cache(maxsize=None)
def chained_step(name):
  agg = registry.get(name, **factory_kwargs(name, T_MAIN))
  tx = optax.chain(agg, optax.sgd(0.1))

  @jax.jit
  def step(params, opt_state, stacked):
    updates, opt_state = tx.update(stacked, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return tx, step


@pytest.mark.parametrize("name", NAMES)
def test_inside_optax_chain_under_jit(name):
  require(name)
  tx, step = chained_step(name)
  params = {"b": jnp.zeros((4,)), "w": jnp.zeros((3, 2))}
  opt_state = tx.init(params)
  j = np.random.default_rng(4).normal(size=(T_MAIN, P))
  expected = -0.1 * flat(aggregate(name, j))
  new_params, opt_state = step(params, opt_state, to_tree(j))
  np.testing.assert_allclose(flat(new_params), expected, rtol=1e-5, atol=1e-6, err_msg=name)
  new_params, opt_state = step(new_params, opt_state, to_tree(j))  # the state round-trips
  assert np.all(np.isfinite(flat(new_params)))


def test_every_registered_module_exists():
  missing = [name for name in NAMES
             if importlib.util.find_spec(
                 f"gajax.aggregators.{registry._FACTORIES[name][0]}") is None]  # pylint: disable=protected-access
  assert not missing, f"registered but not written: {missing}"
  for name in NAMES:
    assert callable(registry.factory(name))
