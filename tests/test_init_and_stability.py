"""Initialisation schemes, the inner loop's stability diagnostic, and the claim they were built for.

The claim (README, "Initialisation"): on the sinusoid MLP with MAML's inner step 0.01, Flax's default
initialisation puts the support loss's curvature above the stability limit 2 / 0.01 for most tasks,
so the inner loop raises the support loss of many of them; PyTorch's default puts none there.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gajax import aggregators, algorithms, diagnostics, meta
from gajax.models import MLP, Conv4, layer_init
from gajax.tasks import sinusoid

# Compiling dominates this file; the tests need correct machine code, not fast code, and skipping
# LLVM's optimisations cuts XLA:CPU compile time by more than half. Numerics are IEEE either way.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@functools.lru_cache(maxsize=None)
def _wide_mlp(scheme, key=0):
  """Initialised under ``jax.jit`` (run eagerly, each initialiser compiles its own small kernels)."""
  init = jax.jit(MLP((256, 256, 1), init_scheme=scheme).init, compiler_options=FAST_COMPILE)
  return init(jax.random.PRNGKey(key), jnp.zeros((1, 3)))


def test_torch_scheme_is_uniform_fan_in_for_kernels_and_biases():
  p = _wide_mlp("torch")["params"]
  for name, fan_in in (("Dense_0", 3), ("Dense_1", 256), ("Dense_2", 256)):
    bound = 1 / np.sqrt(fan_in)
    for leaf in ("kernel", "bias"):
      w = np.asarray(p[name][leaf])
      assert np.all(np.abs(w) <= bound), (name, leaf)
    w = np.asarray(p[name]["kernel"])
    if w.size > 1000:  # variance of U(-b, b) is b^2 / 3 = 1 / (3 fan_in)
      np.testing.assert_allclose(w.var(), 1 / (3 * fan_in), rtol=0.05)
  assert np.std(p["Dense_1"]["bias"]) > 0.5 * bound / np.sqrt(3)  # biases are drawn, not zero


def test_flax_scheme_is_lecun_normal_with_zero_biases_and_the_old_default():
  p = _wide_mlp("flax")["params"]
  np.testing.assert_allclose(np.var(p["Dense_1"]["kernel"]), 1 / 256, rtol=0.05)
  assert not np.any(p["Dense_1"]["bias"])

  class Plain(nn.Module):  # what MLP was before init schemes existed: Flax's own defaults
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Dense(256)(x))
      x = nn.relu(nn.Dense(256)(x))
      return nn.Dense(1)(x)

  plain = jax.jit(Plain().init, compiler_options=FAST_COMPILE)(jax.random.PRNGKey(0), jnp.zeros((1, 3)))
  for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(_wide_mlp("flax"))):
    np.testing.assert_array_equal(a, b)


def test_imaml_scheme_is_xavier_uniform_with_gain_173_and_biases_in_0_005():
  """imaml_dev's Omniglot network: xavier_uniform_(gain=1.73) on every kernel, U(0, 0.05) biases."""
  c = jax.jit(Conv4(num_classes=5, filters=32, init_scheme="imaml").init, compiler_options=FAST_COMPILE)(
      jax.random.PRNGKey(0), jnp.zeros((2, 28, 28, 1)))["params"]
  for name, fan_in, fan_out in (("Conv_1", 9 * 32, 9 * 32), ("Dense_0", None, 5)):
    k = np.asarray(c[name]["kernel"])
    fan_in = fan_in or k.shape[0]
    bound = 1.73 * np.sqrt(6 / (fan_in + fan_out))
    assert np.all(np.abs(k) <= bound + 1e-7) and np.max(np.abs(k)) > 0.95 * bound
    np.testing.assert_allclose(np.std(k), bound / np.sqrt(3), rtol=0.05)  # uniform's std
    b = np.asarray(c[name]["bias"])
    assert np.all((b >= 0) & (b <= 0.05)) and np.ptp(b) > 0
  biases = np.asarray(c["Conv_1"]["bias"])  # 32 draws of U(0, 0.05): mean 0.025, std of mean 0.0026
  assert 0.015 < biases.mean() < 0.035


def test_maml_scheme_mlp_is_truncated_normal_001_and_conv4_is_xavier_with_normal_head():
  p = _wide_mlp("maml")["params"]
  for name in ("Dense_0", "Dense_1", "Dense_2"):
    w = np.asarray(p[name]["kernel"])
    assert np.all(np.abs(w) <= 0.02 + 1e-7)  # cut at 2 standard deviations
    assert not np.any(p[name]["bias"])
  # std of a normal truncated at +-2 sigma: sigma * 0.8796
  np.testing.assert_allclose(np.std(p["Dense_1"]["kernel"]), 0.01 * 0.8796, rtol=0.05)

  c = jax.jit(Conv4(num_classes=5, filters=32, init_scheme="maml").init, compiler_options=FAST_COMPILE)(
      jax.random.PRNGKey(0), jnp.zeros((2, 28, 28, 1)))["params"]
  k = np.asarray(c["Conv_1"]["kernel"])  # [3, 3, 32, 32]: fan_in = fan_out = 9 * 32
  bound = np.sqrt(6 / (9 * 32 + 9 * 32))
  assert np.all(np.abs(k) <= bound) and np.abs(k).max() > 0.9 * bound
  assert not np.any(c["Conv_1"]["bias"])
  np.testing.assert_allclose(np.std(c["Dense_0"]["kernel"]), 1.0, rtol=0.15)


def test_schemes_share_one_parameter_tree_and_bad_names_are_refused():
  trees = [jax.tree_util.tree_structure(_wide_mlp(s)) for s in ("flax", "torch", "maml")]
  assert trees[0] == trees[1] == trees[2]
  with pytest.raises(ValueError, match="init must be one of flax, torch, maml, imaml; got 'xavier'"):
    layer_init("xavier", 4)
  with pytest.raises(ValueError, match="init must be one of"):
    MLP((4, 1), init_scheme="kaiming").init(jax.random.PRNGKey(0), jnp.zeros((1, 1)))


def _mlp_curvature_problem(seed):
  """``(loss, params, batch, dense Hessian eigenvalues)`` of a small float64 MLP regression (x64 on)."""
  model = MLP((6, 5, 1), init_scheme="torch")
  params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64),
                                  model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 1))))
  x = jnp.linspace(-3, 3, 12, dtype=jnp.float64)[:, None]
  batch = {"x": x, "y": 2.0 * jnp.sin(x + 0.4)}

  def loss(p, b):
    return jnp.mean(jnp.square(model.apply(p, b["x"]) - b["y"]))

  flat, unravel = jax.flatten_util.ravel_pytree(params)
  hessian = jax.jit(jax.hessian(lambda f: loss(unravel(f), batch)), compiler_options=FAST_COMPILE)
  return loss, params, batch, np.linalg.eigvalsh(np.asarray(hessian(flat)))


def test_top_hessian_eigenvalue_matches_the_dense_hessian():
  jax.config.update("jax_enable_x64", True)
  try:
    loss, params, batch, eigs = _mlp_curvature_problem(3)
    want = eigs[np.argmax(np.abs(eigs))]
    top = jax.jit(functools.partial(diagnostics.top_hessian_eigenvalue, loss, iters=300),
                  compiler_options=FAST_COMPILE)
    got = top(params, batch, jax.random.PRNGKey(0))
    np.testing.assert_allclose(float(got), want, rtol=1e-4)
  finally:
    jax.config.update("jax_enable_x64", False)


def test_lanczos_eigenvalue_range_matches_the_dense_hessian():
  """Both extremes of an indefinite Hessian (the MLP's has negative curvature) within 1e-6."""
  jax.config.update("jax_enable_x64", True)
  try:
    loss, params, batch, eigs = _mlp_curvature_problem(4)
    assert eigs[0] < -1e-3 * abs(eigs[-1])  # indefinite: the lower end is a real test
    span = jax.jit(functools.partial(diagnostics.hessian_eigenvalue_range, loss, iters=eigs.size),
                   compiler_options=FAST_COMPILE)
    low, high = span(params, batch, jax.random.PRNGKey(0))
    np.testing.assert_allclose([float(low), float(high)], [eigs[0], eigs[-1]], rtol=1e-6, atol=1e-9)
    # Fewer iterations than parameters: Ritz values stay inside the spectrum.
    low, high = diagnostics.hessian_eigenvalue_range(loss, params, batch, jax.random.PRNGKey(1),
                                                     iters=8)
    assert eigs[0] - 1e-9 <= float(low) < 0 and 0 < float(high) <= eigs[-1] + 1e-9
  finally:
    jax.config.update("jax_enable_x64", False)


@functools.lru_cache(maxsize=None)
def _sinusoid_report(scheme):
  """``(init_params, jitted inner_loop_report)`` of one scheme, shared by the seeds."""
  task = sinusoid.make_task(init=scheme)
  report = functools.partial(diagnostics.inner_loop_report, task.loss_fn, inner_lr=0.01, inner_steps=5)
  return (jax.jit(task.init_params, compiler_options=FAST_COMPILE),
          jax.jit(report, compiler_options=FAST_COMPILE))


@pytest.mark.parametrize("seed", [0, 1])
def test_flax_init_is_past_the_inner_stability_limit_on_sinusoids_and_torch_init_is_not(seed):
  supports, _ = sinusoid.sample_tasks(jax.random.PRNGKey(100 + seed), 25, shots=10, queries=1)
  report = {}
  for scheme in ("flax", "torch"):
    init_params, inner_loop_report = _sinusoid_report(scheme)
    r = inner_loop_report(init_params(jax.random.PRNGKey(seed)), supports, jax.random.PRNGKey(7))
    report[scheme] = (np.median(r.lambda_max),
                      np.mean(np.asarray(r.adapted_support_loss) > np.asarray(r.support_loss)))
  limit = 2 / 0.01
  assert report["flax"][0] > limit and report["flax"][1] >= 0.1, report
  assert report["torch"][0] < limit / 2 and report["torch"][1] == 0.0, report


def test_meta_step_logs_the_share_of_tasks_made_worse_by_the_inner_loop():
  """Quadratic tasks 0.5 c_i |w - t_i|^2: one step at lr a maps w - t to (1 - a c_i)(w - t), so the
  support loss rises exactly when a c_i > 2, and after k steps it is (1 - a c_i)^(2k) times the start."""
  curv = jnp.asarray([0.5, 1.0, 2.5, 3.0, 1.5, 4.0], jnp.float32)  # with lr 1: tasks 2, 3, 5 unstable
  lr, steps = 1.0, 2

  def loss_fn(w, batch):
    return 0.5 * batch["c"] * jnp.sum(jnp.square(w["w"] - batch["t"]))

  def sample(key, num_tasks, data=None):
    t = jax.random.normal(key, (num_tasks, 3))
    batch = {"c": curv, "t": t}
    return batch, batch

  learner = algorithms.maml(loss_fn, inner_steps=steps, inner_lr=lr, first_order=True)
  tx = optax.chain(aggregators.mean(), optax.sgd(0.0))
  params = {"w": jnp.zeros(3)}
  state = meta.init_state(jax.random.PRNGKey(0), params, tx)
  _, metrics = jax.jit(meta.make_meta_step(learner, tx, sample, 6))(state)
  assert float(metrics["inner_worse_fraction"]) == pytest.approx(3 / 6)
  _, task_key = jax.random.split(state.key)
  t = np.asarray(sample(task_key, 6)[0]["t"], np.float64)
  c = np.asarray(curv, np.float64)
  before = 0.5 * c * np.sum(t ** 2, axis=1)
  after = before * (1 - lr * c) ** (2 * steps)
  np.testing.assert_allclose(float(metrics["support_loss"]), before.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["adapted_support_loss"]), after.mean(), rtol=1e-5)
