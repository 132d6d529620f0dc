"""Gramian-based aggregators (MGDA, UPGrad, DualProj, CAGrad, IMTL-G, Aligned-MTL, Nash-MTL, Krum) and RLW.

Every expected value comes from an independent float64 reference: SciPy's NNLS for the dual-cone
projections, brute-force enumeration of faces for the min-norm point, SLSQP for CAGrad's dual, a
direct linear solve of IMTL-G's defining equations, an SVD of ``J`` for Aligned-MTL, a root finder in
log space for Nash-MTL and explicit distances for Krum. Inputs share one two-leaf structure with
``P = 20`` coordinates, and jitted functions are cached per (method, T), to keep compilations few.

jit against eager and bfloat16 inputs are checked for every registered aggregator, these included, in
test_aggregator_properties.py (each would cost this file one more compilation or eager run per method).
"""

from __future__ import annotations

import functools
import itertools

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize

from gajax.aggregators import _qp
from gajax.aggregators.aligned_mtl import aligned_mtl, aligned_mtl_weights
from gajax.aggregators.cagrad import cagrad, cagrad_weights
from gajax.aggregators.dualproj import dualproj, dualproj_weights
from gajax.aggregators.imtl_g import imtl_g
from gajax.aggregators.krum import krum, krum_weights
from gajax.aggregators.mgda import mgda, mgda_weights
from gajax.aggregators.nash_mtl import nash_mtl
from gajax.aggregators.random import RandomState, random, random_weights
from gajax.aggregators.skip_nonfinite import skip_nonfinite_tasks
from gajax.aggregators.upgrad import upgrad, upgrad_weights

P = 20
FACTORIES = {
    "mgda": mgda,
    "upgrad": upgrad,
    "dualproj": dualproj,
    "cagrad": cagrad,
    "imtl_g": imtl_g,
    "aligned_mtl": aligned_mtl,
    "nash_mtl": lambda: nash_mtl(max_norm=None),
    "krum": krum,
    "random": lambda: random(jax.random.PRNGKey(0)),
}
DETERMINISTIC = sorted(set(FACTORIES) - {"random"})
NON_CONFLICTING = ("mgda", "upgrad", "dualproj", "nash_mtl")
MIN_TASKS = {"krum": 3}
# Tests do not need optimised machine code; skipping LLVM's optimisations cuts XLA:CPU compile time
# (which dominates this file: the solvers' while loops) by about a third. Numerics are unchanged.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def to_tree(j, dtype=jnp.float32):
  j = np.asarray(j)
  t = j.shape[0]
  return {"a": jnp.asarray(j[:, :8].reshape(t, 4, 2), dtype), "b": jnp.asarray(j[:, 8:], dtype)}


def flat(tree):
  return np.concatenate([np.asarray(tree["a"], np.float64).reshape(-1),
                         np.asarray(tree["b"], np.float64).reshape(-1)])


@functools.lru_cache(maxsize=None)
def transform(name):
  tx = FACTORIES[name]()
  return tx, jax.jit(tx.update, compiler_options=FAST_COMPILE)


def aggregate(name, j, dtype=jnp.float32):
  tx, update = transform(name)
  tree = to_tree(j, dtype)
  out, _ = update(tree, tx.init(None), agreement_signal=tree)
  chex.assert_trees_all_equal_shapes_and_dtypes(out, jax.tree_util.tree_map(lambda x: x[0], tree))
  return flat(out)


# ----------------------------------------------------------------------------- float64 references


def ref_project(j, g):
  """Projection of ``g`` onto ``{x : J x >= 0}``: ``x = g + J^T v``, ``v = argmin_{v>=0} |J^T v + g|``."""
  v, _ = scipy.optimize.nnls(j.T, -g, maxiter=1000)
  return g + j.T @ v


def ref_dualproj(j):
  return ref_project(j, j.mean(axis=0))


def ref_upgrad(j):
  return np.mean([ref_project(j, row) for row in j], axis=0)


def ref_mgda(j):
  """Min-norm point of the convex hull, by enumerating the faces (affine min-norm on each support)."""
  t = j.shape[0]
  best = None
  for size in range(1, t + 1):
    for support in itertools.combinations(range(t), size):
      s = list(support)
      k = j[s] @ j[s].T
      kkt = np.block([[k, np.ones((size, 1))], [np.ones((1, size)), np.zeros((1, 1))]])
      rhs = np.concatenate([np.zeros(size), [1.0]])
      sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
      w = sol[:size]
      if np.any(w < -1e-12):
        continue
      d = w @ j[s]
      if best is None or d @ d < best @ best - 1e-15:
        best = d
  return best


def ref_cagrad(j, c=0.5):
  t = j.shape[0]
  k = j @ j.T
  g0 = j.mean(axis=0)
  r = c * np.linalg.norm(g0)
  a = j @ g0

  def objective(w):
    return w @ a + r * np.sqrt(max(w @ k @ w, 0.0) + 1e-300)

  res = scipy.optimize.minimize(
      objective, np.full(t, 1.0 / t), method="SLSQP", bounds=[(0.0, 1.0)] * t,
      constraints=[{"type": "eq", "fun": lambda w: np.sum(w) - 1.0}],
      options={"ftol": 1e-15, "maxiter": 1000})
  gw = res.x @ j
  return (g0 + r / np.linalg.norm(gw) * gw) / (1 + c * c)


def ref_imtl_g(j):
  """Solves <d, u_1> = <d, u_i> (i >= 2) and sum(alpha) = 1 for d = J^T alpha directly."""
  units = j / np.linalg.norm(j, axis=1, keepdims=True)
  rows = [(units[0] - units[i]) @ j.T for i in range(1, j.shape[0])]
  system = np.vstack(rows + [np.ones(j.shape[0])])
  alpha = np.linalg.solve(system, np.eye(j.shape[0])[-1])
  return alpha @ j


def ref_aligned_mtl(j):
  u, s, vt = np.linalg.svd(j, full_matrices=False)
  return s.min() * (vt.T @ (u.T @ np.full(j.shape[0], 1.0 / j.shape[0])))


def ref_nash_alpha(j):
  k = j @ j.T
  k = k / np.linalg.norm(k)
  sol = scipy.optimize.root(lambda z: k @ np.exp(z) - np.exp(-z), np.zeros(j.shape[0]),
                            method="hybr", options={"xtol": 1e-13})
  alpha = np.exp(sol.x)
  assert np.max(np.abs(k @ alpha * alpha - 1.0)) < 1e-10
  return alpha


def ref_nash_mtl(j):
  return ref_nash_alpha(j) @ j


def ref_krum(j, f=0, m=1):
  t = j.shape[0]
  d = np.array([[np.sum((j[a] - j[b]) ** 2) for b in range(t)] for a in range(t)])
  scores = [np.sum(np.sort(np.delete(d[a], a))[:t - f - 2]) for a in range(t)]
  return j[np.argsort(scores, kind="stable")[:m]].mean(axis=0)


REFERENCES = {"mgda": ref_mgda, "upgrad": ref_upgrad, "dualproj": ref_dualproj, "cagrad": ref_cagrad,
              "imtl_g": ref_imtl_g, "aligned_mtl": ref_aligned_mtl, "nash_mtl": ref_nash_mtl,
              "krum": ref_krum}


def assert_close(name, got, want, rtol=1e-5):
  """Max-abs error within ``rtol`` of the reference's largest entry (we measure <= 2e-6 throughout)."""
  scale = max(np.abs(want).max(), 1e-30)
  np.testing.assert_allclose(got, want, rtol=0, atol=rtol * scale, err_msg=name)


def check_non_conflicting(j, out, rtol=1e-4):
  j = np.asarray(j, np.float64)
  s = np.max(np.abs(j))
  if s == 0:
    return
  j, a = j / s, out / s
  dots = j @ a
  tol = rtol * np.linalg.norm(j, axis=1) * np.linalg.norm(a) + 1e-30
  assert np.all(dots >= -tol), (dots, tol)


# ------------------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("name", sorted(REFERENCES))
@hypothesis.settings(max_examples=20, deadline=None, derandomize=True, database=None)
@hypothesis.given(t=st.sampled_from([2, 3, 5, 8]), seed=st.integers(0, 2**31 - 1))
def test_matches_float64_reference(name, t, seed):
  hypothesis.assume(t >= MIN_TASKS.get(name, 1))
  j = np.random.default_rng(seed).normal(size=(t, P))
  got = aggregate(name, j)
  assert_close(name, got, REFERENCES[name](j))
  if name in NON_CONFLICTING:
    check_non_conflicting(j, got)


def test_projection_methods_on_conflicting_tasks():
  """Few rows, many conflicts: constraints are active, so the QPs' active sets are non-trivial."""
  rng = np.random.default_rng(7)
  for t in (2, 3, 5, 8):
    for _ in range(3):
      g = rng.normal(size=P)
      j = np.outer(np.where(np.arange(t) % 2 == 0, 1.0, -0.7), g) + 0.5 * rng.normal(size=(t, P))
      for name in ("upgrad", "dualproj", "mgda", "cagrad"):
        got = aggregate(name, j)
        assert_close(name, got, REFERENCES[name](j))
        if name != "cagrad":
          check_non_conflicting(j, got)


@pytest.mark.parametrize("name", ["mgda", "upgrad", "dualproj"])
def test_tasks_dropped_by_skip_nonfinite_are_left_out(name):
  """With ``task_mask`` the dropped tasks (zero rows) are absent, not zero updates (MGDA would be 0)."""
  j = np.random.default_rng(23).normal(size=(5, P))
  bad = j.copy()
  bad[1, 3] = np.nan
  tx = skip_nonfinite_tasks(FACTORIES[name]())
  out, state = jax.jit(tx.update, compiler_options=FAST_COMPILE)(to_tree(bad), tx.init(None))
  assert int(state.skipped) == 1
  assert_close(name, flat(out), REFERENCES[name](np.delete(j, 1, axis=0)))


def test_closed_forms_for_two_tasks():
  rng = np.random.default_rng(8)
  for _ in range(5):
    g1, g2 = rng.normal(size=P), rng.normal(size=P)
    g2 = g2 - 1.2 * (g2 @ g1) / (g1 @ g1) * g1 if g1 @ g2 > 0 else g2  # make them conflict
    j = np.stack([g1, g2])
    # MGDA, T = 2: w = clip(<g2 - g1, g2> / |g1 - g2|^2, 0, 1).
    w = np.clip((g2 - g1) @ g2 / np.sum((g1 - g2) ** 2), 0, 1)
    assert_close("mgda", aggregate("mgda", j), w * g1 + (1 - w) * g2)
    # Projection onto {x : <g_i, x> >= 0} when only constraint k is violated: remove its component.
    def proj(x):
      for k in (0, 1):
        if j[k] @ x < 0:
          x = x - (j[k] @ x) / (j[k] @ j[k]) * j[k]
      return x
    assert_close("upgrad", aggregate("upgrad", j), 0.5 * (proj(g1) + proj(g2)))
    assert_close("dualproj", aggregate("dualproj", j), proj(0.5 * (g1 + g2)))


@functools.lru_cache(maxsize=None)
def jitted(fn, **static):
  return jax.jit(functools.partial(fn, **static), compiler_options=FAST_COMPILE)


def test_weighting_functions_on_raw_gramians():
  """The public weightings take an unnormalised Gramian; preferences and ``c`` are traced arguments."""
  rng = np.random.default_rng(9)
  j = rng.normal(size=(5, P))
  k = jnp.asarray(j @ j.T * 1e3, jnp.float32)
  out = lambda w: np.asarray(w, np.float64) @ j
  w = jitted(mgda_weights)(k)
  assert_close("mgda", out(w), ref_mgda(j))
  np.testing.assert_allclose(np.sum(np.asarray(w)), 1.0, rtol=1e-6)
  uniform, pref = np.full(5, 0.2), np.array([0.5, 0.1, 0.2, 0.1, 0.1])
  assert_close("upgrad", out(jitted(upgrad_weights)(k, uniform)), ref_upgrad(j))
  assert_close("upgrad", out(jitted(upgrad_weights)(k, pref)),
               np.sum([ref_project(j, p * row) for p, row in zip(pref, j)], axis=0))
  assert_close("dualproj", out(jitted(dualproj_weights)(k, uniform)), ref_dualproj(j))
  assert_close("dualproj", out(jitted(dualproj_weights)(k, pref)), ref_project(j, pref @ j))
  assert_close("cagrad", out(jitted(cagrad_weights)(k, 0.8)), ref_cagrad(j, 0.8))
  np.testing.assert_allclose(out(jitted(cagrad_weights)(k, 0.0)), j.mean(0), rtol=1e-5)
  assert_close("aligned_mtl", out(aligned_mtl_weights(k)), ref_aligned_mtl(j))
  with pytest.raises(ValueError, match="pref_vector"):
    upgrad_weights(k, np.ones(4))


def test_krum_and_multi_krum():
  rng = np.random.default_rng(10)
  j = rng.normal(size=(8, P))
  j[2] += 100.0  # a Byzantine outlier is never selected
  k = jnp.asarray(j @ j.T, jnp.float32)
  for f, m in ((0, 1), (1, 3), (2, 2)):
    w = np.asarray(krum_weights(k, f, m))
    assert_close("krum", w @ j, ref_krum(j, f, m))
    assert w[2] == 0.0 and np.count_nonzero(w) == m
  tx = krum(3)
  with pytest.raises(ValueError, match="T > 2 \\* num_byzantine \\+ 2"):
    tx.update(to_tree(j), tx.init(None))
  tx = krum(0, 9)
  with pytest.raises(ValueError, match="num_selected"):
    tx.update(to_tree(j), tx.init(None))
  with pytest.raises(ValueError):
    krum(-1)


def test_cagrad_and_nash_arguments():
  with pytest.raises(ValueError):
    cagrad(-1.0)
  with pytest.raises(ValueError):
    nash_mtl(num_iters=0)


def test_nash_mtl_max_norm_and_scale():
  j = np.random.default_rng(12).normal(size=(5, P))
  free = ref_nash_mtl(j)
  np.testing.assert_allclose(np.linalg.norm(free), np.sqrt(5 * np.linalg.norm(j @ j.T)), rtol=1e-6)
  tx = nash_mtl(max_norm=1.0)
  update = jax.jit(tx.update, compiler_options=FAST_COMPILE)
  for scale in (1e-20, 1.0, 1e20):
    got = flat(update(to_tree(j * scale), tx.init(None))[0])
    want = free * scale * min(1.0, 1.0 / (np.linalg.norm(free) * scale))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_aligned_mtl_scale_modes():
  j = np.random.default_rng(13).normal(size=(5, P))
  u, s, vt = np.linalg.svd(j, full_matrices=False)
  base = vt.T @ (u.T @ np.full(5, 0.2))
  k = jnp.asarray(j @ j.T, jnp.float32)
  for mode, sigma in (("min", s.min()), ("median", np.sqrt(np.median(s ** 2))),
                      ("rmse", np.sqrt(np.mean(s ** 2)))):
    got = np.asarray(aligned_mtl_weights(k, scale_mode=mode), np.float64) @ j
    assert_close("aligned_mtl", got, sigma * base)
  with pytest.raises(ValueError, match="scale_mode"):
    aligned_mtl(scale_mode="max")


def test_random_weights_and_state():
  j = np.random.default_rng(14).normal(size=(5, P))
  tx = random(3)
  state = tx.init(None)
  assert isinstance(state, RandomState)
  update = jax.jit(tx.update, compiler_options=FAST_COMPILE)
  out1, state1 = update(to_tree(j), state)
  out2, state2 = update(to_tree(j), state1)
  again, _ = update(to_tree(j), state)
  np.testing.assert_array_equal(flat(out1), flat(again))          # deterministic given the key
  assert not np.allclose(flat(out1), flat(out2))                  # a fresh draw every step
  assert not np.array_equal(np.asarray(state1.key), np.asarray(state2.key))
  w = np.linalg.lstsq(j.T, flat(out1), rcond=None)[0]             # J has full row rank
  assert np.all(w > 0) and abs(w.sum() - 1) < 1e-5
  w = np.asarray(random_weights(jax.random.PRNGKey(1), 7))
  assert w.shape == (7,) and np.all(w > 0) and abs(w.sum() - 1) < 1e-6
  typed = random(jax.random.key(0))
  assert np.all(np.isfinite(flat(typed.update(to_tree(j), typed.init(None))[0])))


# ------------------------------------------------------------------------------------- properties


def degenerate_cases(t):
  rng = np.random.default_rng(100 + t)
  g = rng.normal(size=P)
  rand = rng.normal(size=(t, P))
  return {
      "zeros": np.zeros((t, P)),
      "duplicates": np.tile(g, (t, 1)),
      "opposite": np.where(np.arange(t) % 2 == 0, 1.0, -1.0)[:, None] * g,
      "collinear": (np.arange(t) + 1.0)[:, None] * g,
      "collinear_mixed_signs": (np.arange(t) - 1.5)[:, None] * g,
      "one_zero_row": np.concatenate([np.zeros((1, P)), rand[1:]]),
      "rank_one_plus_dup": np.concatenate([rand[:1], rand[:1], 2 * rand[:1]])[:t],
      "tiny": rand * 1e-30,
      "huge": rand * 1e30,
      "mixed_scale": rand * np.logspace(-15, 15, t)[:, None],
  }


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_degenerate_inputs_give_finite_output(name):
  for t in (1, 3):
    if t < MIN_TASKS.get(name, 1):
      with pytest.raises(ValueError):
        aggregate(name, np.ones((t, P)))
      continue
    for case, j in degenerate_cases(t).items():
      out = aggregate(name, j)
      assert np.all(np.isfinite(out)), (name, t, case, out)
      if case == "zeros":
        np.testing.assert_array_equal(out, 0.0, err_msg=name)
      if case in ("tiny", "huge"):
        base = aggregate(name, degenerate_cases(t)["tiny"] * 1e30)
        scale = 1e-30 if case == "tiny" else 1e30
        np.testing.assert_allclose(out / scale, base, rtol=1e-4,
                                   atol=1e-4 * np.abs(base).max(), err_msg=(name, case))
      if name in NON_CONFLICTING and case not in ("opposite", "collinear_mixed_signs"):
        check_non_conflicting(j, out, rtol=1e-3)


def test_single_task_values():
  g = np.random.default_rng(15).normal(size=(1, P))
  for name in ("mgda", "upgrad", "dualproj", "imtl_g", "aligned_mtl", "random"):
    np.testing.assert_allclose(aggregate(name, g), g[0], rtol=1e-5, err_msg=name)
  np.testing.assert_allclose(aggregate("cagrad", g), g[0] * 1.5 / 1.25, rtol=1e-5)
  np.testing.assert_allclose(aggregate("nash_mtl", g), g[0], rtol=1e-5)  # alpha = 1 on K / |K|_F


def test_opposite_and_degenerate_values():
  g = np.random.default_rng(16).normal(size=P)
  j = np.stack([g, -g])
  for name in ("mgda", "upgrad", "dualproj", "cagrad", "imtl_g", "nash_mtl"):
    # Nash-MTL: alpha grows to ~1e3 along the null direction (eigenvalue floor), so the cancellation
    # leaves float32 noise of relative size ~1e-4.
    atol = (1e-3 if name == "nash_mtl" else 1e-5) * np.abs(g).max()
    np.testing.assert_allclose(aggregate(name, j), 0.0, atol=atol, err_msg=name)
  dup = np.tile(g, (3, 1))
  for name in ("mgda", "upgrad", "dualproj", "imtl_g", "krum"):
    np.testing.assert_allclose(aggregate(name, dup), g, rtol=1e-5, err_msg=name)
  np.testing.assert_allclose(aggregate("aligned_mtl", dup), g, rtol=1e-5)  # rank 1: B u = u


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_permutation_invariance(name):
  rng = np.random.default_rng(17)
  for _ in range(2):
    j = rng.normal(size=(5, P))
    perm = rng.permutation(5)
    a, b = aggregate(name, j), aggregate(name, j[perm])
    np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(a).max(), err_msg=name)


@pytest.mark.parametrize("name", ["upgrad", "dualproj", "mgda", "cagrad", "imtl_g", "aligned_mtl"])
def test_positive_homogeneity(name):
  j = np.random.default_rng(18).normal(size=(5, P))
  a = aggregate(name, j)
  for c in (3.7, 0.01, 2.0 ** 40):
    np.testing.assert_allclose(aggregate(name, c * j) / c, a, rtol=0, atol=1e-5 * np.abs(a).max(),
                               err_msg=(name, c))


@pytest.mark.parametrize("name", ["random", "imtl_g"])
def test_inside_optax_chain(name):
  tx = optax.chain(FACTORIES[name](), optax.sgd(0.1))
  params = {"a": jnp.zeros((4, 2)), "b": jnp.zeros((12,))}
  j = np.random.default_rng(21).normal(size=(5, P))
  update = jax.jit(tx.update, compiler_options=FAST_COMPILE)
  updates, state = update(to_tree(j), tx.init(params), params)
  np.testing.assert_allclose(flat(updates), -0.1 * aggregate(name, j), rtol=1e-5, atol=1e-7)
  assert np.all(np.isfinite(flat(update(to_tree(j), state, params)[0])))  # the state round-trips


def test_solver_iterations():
  """The active-set solver needs about |F*| + 1 iterations at T = 32 (its time is the benchmark's)."""
  rng = np.random.default_rng(22)
  j = rng.normal(size=(32, 64))
  j[::2] -= 0.4 * j[1::2]  # conflicts, so that some constraints are active
  k = j @ j.T
  q = jnp.asarray(k / np.trace(k), jnp.float32)
  solve = jax.jit(_qp.nonneg_qp_solve)
  b = jnp.asarray(-np.ones(32), jnp.float32)   # MGDA's QP
  state, iters = solve(q, b)
  v = np.asarray(state.v, np.float64)
  assert int(iters) <= 40 and np.all(v >= 0)
  grad = np.asarray(q, np.float64) @ v - 1.0
  assert np.all(grad > -1e-5) and np.all(np.abs(grad[v > 0]) < 1e-5)   # KKT


# ------------------------------------------------------------------ the blocked Gramian on CPU


@pytest.mark.parametrize("block", [None, 8])
def test_blocked_cpu_gramian_matches_float64(monkeypatch, block):
  """On CPU, leaves with at least two blocks of columns take the fori_loop over blocks (+ a tail);
  the three Gramians agree with float64 NumPy either way. ``block=8`` makes every leaf here blocked
  (with and without a tail); ``None`` keeps the library's block (4096: only the 20,000-wide leaf)."""
  from gajax.aggregators import _base  # pylint: disable=import-outside-toplevel
  if block is not None:
    monkeypatch.setattr(_base, "CPU_GRAMIAN_BLOCK", block)
  rng = np.random.default_rng(31)
  shapes = [(20_000,), (4, 10), (3, 4, 2), (5,)]  # 20,000 = 4 * 4096 + 3,616; 40 = 5 * 8; 24; 5
  t = 4
  leaves = [rng.normal(size=(t,) + shape) * 10.0 ** rng.integers(-3, 3, size=(t,) + (1,) * len(shape))
            for shape in shapes]
  tree = {str(i): jnp.asarray(leaf, jnp.float32) for i, leaf in enumerate(leaves)}
  j = np.concatenate([np.asarray(leaf, np.float32).reshape(t, -1) for leaf in leaves], axis=1)
  j = j.astype(np.float64)
  # Fresh lambdas: the block size is read when a function is traced, and jax.jit(f) would reuse a
  # trace of f made under another block size.
  assert_close("gramian", np.asarray(jax.jit(lambda u: _base.gramian(u))(tree)), j @ j.T)
  scale = 2.0 ** np.frexp(np.abs(j).max())[1]   # the power of two with peak / scale in [0.5, 1)
  assert_close("normalized", np.asarray(jax.jit(lambda u: _base.normalized_gramian(u))(tree)),
               (j / scale) @ (j / scale).T)
  factors = jnp.asarray([2.0 ** -3, 2.0 ** 4, 1.0, 2.0 ** -10], jnp.float32)
  scaled = j * np.asarray(factors, np.float64)[:, None]
  assert_close("scaled", np.asarray(jax.jit(lambda u, f: _base.scaled_gramian(u, f))(tree, factors)),
               scaled @ scaled.T)
  weights = jnp.asarray([0.5, -2.0, 1.0, 3.0], jnp.float32)
  combined = jax.jit(lambda u, w, f: _base.scaled_weighted_sum(u, w, f))(tree, weights, factors)
  got = np.concatenate([np.ravel(combined[str(i)]) for i in range(len(shapes))])
  assert_close("combination", got, np.asarray(weights, np.float64) @ scaled)
  direction = {str(i): jnp.asarray(rng.normal(size=shape), jnp.float32) for i, shape in enumerate(shapes)}
  d = np.concatenate([np.ravel(np.asarray(direction[str(i)], np.float64)) for i in range(len(shapes))])
  dots = jax.jit(lambda u, v, f: _base.scaled_inner_products(u, v, f))(tree, direction, factors)
  assert_close("dots", np.asarray(dots), scaled @ d)
  norms = jax.jit(lambda u, f: _base.scaled_sq_norms(u, f))(tree, factors)
  assert_close("norms", np.asarray(norms), np.sum(scaled ** 2, axis=1))
  # The blocked path is the one compiled here: the CPU program has a loop, one per blocked leaf.
  loops = jax.jit(lambda u: _base.gramian(u)).lower(tree).as_text().count("while")
  assert loops >= (3 if block == 8 else 1), loops


@pytest.mark.parametrize("t", [9, 15, 20, 64, 65])
@pytest.mark.parametrize("kind", ["gramian", "normalized", "scaled"])
def test_blocked_gramian_from_row_groups_matches_float64(monkeypatch, t, kind):
  """Between 9 and 64 tasks each whole block's Gramian is assembled from the products of 8-row
  groups on and below the diagonal (the last group shorter at 9, 15 and 20), mirrored above; 65
  tasks take the one product per block. Either way the three Gramians match float64 NumPy, and the
  grouped ones are exactly symmetric (their lower triangle is mirrored)."""
  from gajax.aggregators import _base  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(_base, "CPU_GRAMIAN_BLOCK", 16)
  rng = np.random.default_rng(33)
  j = rng.normal(size=(t, 16 * 3 + 5)) * 10.0 ** rng.integers(-3, 3, size=(t, 1))
  j = np.asarray(np.asarray(j, np.float32), np.float64)
  tree = {"w": jnp.asarray(j, jnp.float32)}
  factors = 2.0 ** rng.integers(-4, 5, size=t)
  unit = j / 2.0 ** np.frexp(np.abs(j).max())[1]   # divided by the power of two above the peak
  fn, want = {
      "gramian": (jax.jit(lambda u: _base.gramian(u)), j @ j.T),
      "normalized": (jax.jit(lambda u: _base.normalized_gramian(u)), unit @ unit.T),
      "scaled": (jax.jit(lambda u: _base.scaled_gramian(u, jnp.asarray(factors, jnp.float32))),
                 (j * factors[:, None]) @ (j * factors[:, None]).T),
  }[kind]
  got = np.asarray(fn(tree))
  assert_close(kind, got, want)
  groups = -(-t // 8)
  # Products: one per group pair on or below the diagonal in the loop, one for the tail block.
  dots = fn.lower(tree).as_text().count("dot_general")
  assert dots == (groups * (groups + 1) // 2 + 1 if t <= 64 else 2), dots
  if t <= 64:
    np.testing.assert_array_equal(got, got.T)


def test_row_group_products_stay_within_budget(monkeypatch):
  """With room for one leaf's group products, the largest blocked leaf gets them and the others keep
  one product per block; the result still matches float64."""
  from gajax.aggregators import _base  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(_base, "CPU_GRAMIAN_BLOCK", 16)
  monkeypatch.setattr(_base, "CPU_GRAMIAN_MAX_GROUP_PRODUCTS", 8)   # 20 tasks: 6 products a leaf
  rng = np.random.default_rng(34)
  widths = [16 * 3 + 5, 16 * 5, 16 * 2, 7]  # blocked with a tail, the largest, blocked, one product
  tree = {str(i): jnp.asarray(rng.normal(size=(20, w)), jnp.float32) for i, w in enumerate(widths)}
  j = np.concatenate([np.asarray(tree[str(i)], np.float64) for i in range(len(widths))], axis=1)
  fn = jax.jit(lambda u: _base.gramian(u))
  assert_close("gramian", np.asarray(fn(tree)), j @ j.T)
  # 6 (the largest, grouped) + 2 (loop + tail) + 1 + 1.
  assert fn.lower(tree).as_text().count("dot_general") == 10


@pytest.mark.parametrize("block", [4, 5])
@pytest.mark.parametrize("name", ["mgda", "upgrad", "dualproj"])
def test_blocked_path_keeps_tasks_40_orders_of_magnitude_apart(monkeypatch, name, block):
  """A task of size 1e-20 beside two of 1e+20, each with its own power-of-two scale: the blocked CPU
  path (blocks of 4: leaves of 8 and 12 columns in 2 and 3 blocks; of 5: the 12 in 2 blocks + a
  tail) gives what the one-product path gives, finite. For MGDA both match a float64 reference
  built for this case (below); combining with coefficients w_i / s_i instead of w_i (g_i / s_i)
  misses it by 1% (the big tasks' coefficients underflow)."""
  from gajax.aggregators import _base  # pylint: disable=import-outside-toplevel
  j = np.random.default_rng(32).normal(size=(3, P)) * np.array([1e-20, 1e20, 1e20])[:, None]
  j = np.asarray(np.asarray(j, np.float32), np.float64)
  whole = aggregate(name, j)
  monkeypatch.setattr(_base, "CPU_GRAMIAN_BLOCK", block)
  tx = FACTORIES[name]()
  params = jax.tree_util.tree_map(lambda x: x[0], to_tree(j))
  blocked = jax.jit(lambda u, s, p: tx.update(u, s, p)[0])(to_tree(j), tx.init(params), params)
  got = flat(blocked)
  assert np.all(np.isfinite(got)), got
  assert_close(name, got, whole)
  if name == "mgda":
    # min |sum_i a_i g_i| over the simplex: with a_i = b_i / s_i (h_i = g_i / s_i of size ~1) the
    # constraint is sum_i b_i / s_i = 1, where 1 / s_1 = 2^66 outweighs 1 / s_2, 1 / s_3 = 2^-67 by
    # 2^133: so b_1 = s_1 to float64 precision and b_2, b_3 >= 0 are free, an NNLS problem (the
    # generic face-enumeration reference above loses ~1e-4 at this conditioning).
    s = 2.0 ** np.ceil(np.log2(np.abs(j).max(axis=1)))
    h = j / s[:, None]
    b, _ = scipy.optimize.nnls(h[1:].T, -s[0] * h[0])
    want = s[0] * h[0] + b @ h[1:]
    assert_close(name, whole, want)
    assert_close(name, got, want)


def test_gramian_below_two_blocks_is_one_product():
  from gajax.aggregators import _base  # pylint: disable=import-outside-toplevel
  tree = {"w": jnp.ones((3, 2 * _base.CPU_GRAMIAN_BLOCK - 1))}
  assert "while" not in jax.jit(_base.gramian).lower(tree).as_text()
