"""MAML++ against MAML (every switch off), a hand-unrolled float64 reference (LSLR, MSL, DA) and its contract."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gajax.algorithms.core import per_task
from gajax.algorithms.maml import maml
from gajax.algorithms.maml_plus_plus import (MAMLPlusPlusParams, maml_plus_plus, maml_plus_plus_init,
                                             msl_importance)
from helpers import sinusoid_problem

LR = 0.05
K = 3


def random_rates(params, seed=0):
  """Per-leaf per-step rates, all different, so a wrong step or leaf index shows."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda p: rng.uniform(0.02, 0.08, size=(K,)).astype(p.dtype), params)


def assert_trees_close(got, want, rtol=1e-12, atol=1e-14):
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


def assert_trees_equal(got, want):
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_array_equal(g, w)


def max_abs_diff(a, b):
  return max(float(np.abs(x - y).max()) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                        jax.tree_util.tree_leaves(b)))


def test_every_switch_off_is_maml_bit_for_bit_and_first_order_phase_is_fomaml():
  with jax.enable_x64(True):
    params, support, query, loss_fn = sinusoid_problem(dtype=np.float32)
    plain = jax.jit(maml_plus_plus(loss_fn, inner_steps=K, inner_lr=LR).with_aux)
    want = jax.jit(maml(loss_fn, inner_steps=K, inner_lr=LR).with_aux)(params, support, query)
    for step in (0, 7, 10_000):
      assert_trees_equal(plain(params, support, query, jnp.int32(step)), want)

    fo_phase = jax.jit(maml_plus_plus(loss_fn, inner_steps=K, inner_lr=LR, first_order_steps=5).with_aux)
    fo_want = jax.jit(maml(loss_fn, inner_steps=K, inner_lr=LR, first_order=True).with_aux)(
        params, support, query)
    for step in (0, 4):
      assert_trees_close(fo_phase(params, support, query, jnp.int32(step)), fo_want, rtol=1e-5, atol=1e-6)
    assert max_abs_diff(fo_want[0], want[0]) > 1e-4  # first and second order differ here.


def test_importance_vector_follows_the_hand_derived_annealing():
  # k = 3, m = 0.03 / 3 = 0.01, anneal over 10 steps, t = step / 10:
  # non-final (1 - t) / 3 + 0.01 t, final (1 - t) / 3 + 0.98 t.
  with jax.enable_x64(True):
    cases = {0: [1 / 3, 1 / 3, 1 / 3],
             5: [1 / 6 + 0.005, 1 / 6 + 0.005, 1 / 6 + 0.49],
             9: [0.1 / 3 + 0.009, 0.1 / 3 + 0.009, 0.1 / 3 + 0.882],
             10: [0.0, 0.0, 1.0],  # after the window only the final step counts.
             1000: [0.0, 0.0, 1.0]}
    for step, want in cases.items():
      got = msl_importance(jnp.int32(step), 3, 10, jnp.float64)
      np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-15)
      np.testing.assert_allclose(float(got.sum()), 1.0, rtol=1e-14)
    np.testing.assert_allclose(msl_importance(0, 1, 10), [1.0])
    np.testing.assert_allclose(msl_importance(5, 1, 10), [1.0])


def reference_outer(loss_fn, support, query, first_order, weights, params, rates):
  """sum_s v_s L_q(theta_s), a plain Python loop of inner steps with per-leaf per-step rates."""
  p, total = params, 0.0
  for s in range(K):
    g = jax.grad(loss_fn)(p, support)
    if first_order:
      g = jax.lax.stop_gradient(g)
    p = jax.tree_util.tree_map(lambda w, gw, r: w - r[s] * gw, p, g, rates)
    total = total + weights[s] * loss_fn(p, query)
  return total, p


@pytest.mark.parametrize("first_order_steps", [0, 20])  # steps 4 and 10: second, first order.
def test_lslr_and_multi_step_loss_match_a_hand_unrolled_reference(first_order_steps):
  step = 4  # inside the 10-step annealing window: t = 0.4.
  weights = np.array([0.6 / 3 + 0.4 * 0.01, 0.6 / 3 + 0.4 * 0.01, 0.6 / 3 + 0.4 * 0.98])
  with jax.enable_x64(True):
    params, support, query, loss_fn = sinusoid_problem()
    rates = random_rates(params)
    learner = maml_plus_plus(loss_fn, inner_steps=K, inner_lr=LR, lslr=True, multi_step_loss=True,
                             msl_anneal_steps=10, first_order_steps=first_order_steps)
    update = jax.jit(learner.with_aux)
    grads, aux = update(MAMLPlusPlusParams(params, rates), support, query, jnp.int32(step))

    first_order = step < first_order_steps
    ref = jax.jit(jax.value_and_grad(
        functools.partial(reference_outer, loss_fn, support, query, first_order),
        argnums=(1, 2), has_aux=True))
    (_, adapted), (want_params, want_rates) = ref(weights, params, rates)
    assert isinstance(grads, MAMLPlusPlusParams)
    assert_trees_close(grads.params, want_params)
    assert_trees_close(grads.inner_lr, want_rates)
    for leaf in jax.tree_util.tree_leaves(grads.inner_lr):
      assert leaf.shape == (K,) and np.all(np.abs(leaf) > 1e-8)
    np.testing.assert_allclose(aux.query_loss, loss_fn(adapted, query), rtol=1e-12)
    np.testing.assert_allclose(aux.support_loss, loss_fn(params, support), rtol=1e-12)
    np.testing.assert_allclose(aux.adapted_support_loss, loss_fn(adapted, support), rtol=1e-12)
    assert_trees_close(aux.displacement, jax.tree_util.tree_map(jnp.subtract, params, adapted))
    assert_trees_close(jax.jit(learner.adapt)(MAMLPlusPlusParams(params, rates), support), adapted)

    # The weights matter (not vacuous), and after the window only the final query loss counts.
    (_, _), (final_params, final_rates) = ref(np.array([0.0, 0.0, 1.0]), params, rates)
    assert max_abs_diff(want_params, final_params) > 1e-4
    late, _ = update(MAMLPlusPlusParams(params, rates), support, query, jnp.int32(10))
    assert_trees_close(late, MAMLPlusPlusParams(final_params, final_rates))


def test_derivative_order_switches_at_first_order_steps_under_one_jit():
  with jax.enable_x64(True):
    params, support, query, loss_fn = sinusoid_problem()
    update = jax.jit(maml_plus_plus(loss_fn, inner_steps=K, inner_lr=LR, first_order_steps=20))
    first = update(params, support, query, jnp.int32(19))
    second = update(params, support, query, jnp.int32(20))
    assert update._cache_size() == 1  # one compiled program for both phases.
    assert_trees_close(first, maml(loss_fn, inner_steps=K, inner_lr=LR, first_order=True)(
        params, support, query))
    assert_trees_close(second, maml(loss_fn, inner_steps=K, inner_lr=LR)(params, support, query))
    assert max_abs_diff(first, second) > 1e-4


def test_remat_gives_the_same_update():
  with jax.enable_x64(True):
    params, support, query, loss_fn = sinusoid_problem()
    meta = MAMLPlusPlusParams(params, random_rates(params, seed=1))
    kwargs = dict(inner_steps=K, inner_lr=LR, lslr=True, multi_step_loss=True, msl_anneal_steps=10,
                  first_order_steps=3)
    plain = jax.jit(maml_plus_plus(loss_fn, **kwargs).with_aux)
    remat = jax.jit(maml_plus_plus(loss_fn, remat=True, **kwargs).with_aux)
    for step in (2, 5):  # first and second order; K = 3 runs as a block of 2 and a tail of 1.
      assert_trees_close(remat(meta, support, query, step), plain(meta, support, query, step))


def test_per_task_under_jit_with_a_step():
  with jax.enable_x64(True):
    params, supports, queries, loss_fn = sinusoid_problem(num_tasks=3)
    meta = maml_plus_plus_init(params, LR, K)
    learner = maml_plus_plus(loss_fn, inner_steps=K, inner_lr=LR, lslr=True, multi_step_loss=True,
                             msl_anneal_steps=10, first_order_steps=3)
    batched = jax.jit(per_task(functools.partial(learner.with_aux, step=jnp.int32(5))))
    updates, aux = batched(meta, supports, queries)
    one_task = jax.jit(learner.with_aux)
    for i in range(3):
      task = jax.tree_util.tree_map(lambda x: x[i], (supports, queries))
      want = one_task(meta, *task, jnp.int32(5))
      assert_trees_close(jax.tree_util.tree_map(lambda x: x[i], (updates, aux)), want)


def test_init_adapt_and_argument_validation():
  params, support, query, loss_fn = sinusoid_problem(dtype=np.float32)
  meta = maml_plus_plus_init(params, LR, K)
  assert jax.tree_util.tree_structure(meta.inner_lr) == jax.tree_util.tree_structure(params)
  for leaf in jax.tree_util.tree_leaves(meta.inner_lr):
    assert leaf.shape == (K,) and leaf.dtype == np.float32
    np.testing.assert_array_equal(leaf, np.float32(LR))
  # LSLR with every rate at LR adapts as MAML does; without LSLR adapt is MAML's.
  want = maml(loss_fn, inner_steps=K, inner_lr=LR).adapt(params, support)
  assert_trees_close(maml_plus_plus(loss_fn, inner_steps=K, inner_lr=LR, lslr=True).adapt(meta, support),
                     want, rtol=1e-5, atol=1e-6)
  assert_trees_equal(maml_plus_plus(loss_fn, inner_steps=K, inner_lr=LR).adapt(params, support), want)
  learner = maml_plus_plus(loss_fn, inner_steps=K, inner_lr=LR, lslr=True)
  assert learner.name == "maml++" and learner.needs_step

  with pytest.raises(ValueError, match="MAMLPlusPlusParams"):
    learner(params, support, query, 0)
  with pytest.raises(ValueError, match="inner_lr leaf"):
    learner(maml_plus_plus_init(params, LR, K + 1), support, query, 0)
  for kwargs, name in [(dict(inner_steps=-1), "inner_steps"), (dict(inner_lr=-0.1), "inner_lr"),
                       (dict(inner_lr=jnp.ones(3)), "inner_lr"),
                       (dict(first_order_steps=-1), "first_order_steps"),
                       (dict(msl_anneal_steps=1.5), "msl_anneal_steps"),
                       (dict(multi_step_loss=True), "msl_anneal_steps"),
                       (dict(multi_step_loss=True, msl_anneal_steps=5, inner_steps=0), "inner_steps")]:
    with pytest.raises(ValueError, match=name):
      maml_plus_plus(loss_fn, **{"inner_steps": K, "inner_lr": LR, **kwargs})


# ---------------------------------------------------------------------------------------------------
# BNWB: per-step copies of the batch-norm parameters.

def bn_problem():
  """A 1 -> 8 -> BatchStatNorm -> tanh -> 1 regressor in float64 on one sinusoid task."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from gajax.models import BatchStatNorm  # pylint: disable=import-outside-toplevel

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(1)(jnp.tanh(BatchStatNorm()(nn.Dense(8)(x))))

  _, support, query, _ = sinusoid_problem()
  net = Net()
  params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64),
                                  net.init(jax.random.PRNGKey(3), support["x"]))
  # Non-trivial batch-norm parameters, so that scale and bias matter.
  params["params"]["BatchStatNorm_0"] = {
      "scale": np.linspace(0.5, 1.5, 8), "bias": np.linspace(-0.3, 0.3, 8)}

  def loss_fn(p, batch):
    return jnp.mean(jnp.square(net.apply(p, batch["x"]) - batch["y"]))

  return params, support, query, loss_fn


def test_bnwb_with_equal_copies_is_maml_with_batch_norm_frozen_in_the_inner_loop():
  from gajax.algorithms.anil import anil  # pylint: disable=import-outside-toplevel
  from gajax.models import batch_norm_mask  # pylint: disable=import-outside-toplevel
  with jax.enable_x64(True):
    params, support, query, loss_fn = bn_problem()
    mask = batch_norm_mask(params)
    assert sorted(jax.tree_util.keystr(p) for p, m in jax.tree_util.tree_leaves_with_path(mask) if m) \
        == ["['params']['BatchStatNorm_0']['bias']", "['params']['BatchStatNorm_0']['scale']"]
    meta = maml_plus_plus_init(params, LR, K, lslr=False, per_step=batch_norm_mask)
    learner = maml_plus_plus(loss_fn, inner_steps=K, inner_lr=LR, per_step=batch_norm_mask)
    got, aux = jax.jit(learner.with_aux)(meta, support, query, jnp.int32(0))
    # Independent path: ANIL adapting everything but batch norm, which is meta-learned only.
    frozen = anil(loss_fn, inner_steps=K, inner_lr=LR,
                  adapt=jax.tree_util.tree_map(lambda m: not m, mask))
    want, want_aux = jax.jit(frozen.with_aux)(params, support, query)
    for path, m in jax.tree_util.tree_leaves_with_path(mask):
      w = functools.reduce(lambda t, k: t[k.key], path, want)
      if m:  # one shared beta used at every step: its gradient is the sum of the copies'
        g = functools.reduce(lambda t, k: t[k.key], path, got.per_step)
        assert g.shape == (K,) + w.shape
        np.testing.assert_allclose(g.sum(0), w, rtol=1e-10, atol=1e-12)
        assert all(float(np.abs(g[s]).max()) > 1e-6 for s in range(K))  # every copy is used
      else:
        np.testing.assert_allclose(functools.reduce(lambda t, k: t[k.key], path, got.params), w,
                                   rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(aux.query_loss, want_aux.query_loss, rtol=1e-12)
    assert_trees_close(learner.adapt(meta, support), frozen.adapt(params, support), rtol=1e-10)


def test_bnwb_meta_gradient_matches_finite_differences_with_distinct_copies():
  from gajax.models import batch_norm_mask  # pylint: disable=import-outside-toplevel
  with jax.enable_x64(True):
    params, support, query, loss_fn = bn_problem()
    meta = maml_plus_plus_init(params, LR, K, per_step=batch_norm_mask)  # LSLR too
    rng = np.random.default_rng(0)
    meta = meta._replace(  # every step's copy and rate different
        per_step=jax.tree_util.tree_map(lambda c: c + 0.2 * rng.standard_normal(c.shape), meta.per_step),
        inner_lr=random_rates(meta.params))
    learner = maml_plus_plus(loss_fn, inner_steps=K, inner_lr=LR, lslr=True, per_step=batch_norm_mask)
    fn = jax.jit(learner.with_aux)
    grads, _ = fn(meta, support, query, jnp.int32(0))
    direction = jax.tree_util.tree_map(lambda x: rng.standard_normal(np.shape(x)), meta)
    eps = 1e-6
    shifted = lambda sign: jax.tree_util.tree_map(lambda x, d: x + sign * eps * d, meta, direction)
    numeric = (fn(shifted(1), support, query, jnp.int32(0))[1].query_loss
               - fn(shifted(-1), support, query, jnp.int32(0))[1].query_loss) / (2 * eps)
    analytic = sum(float(np.vdot(g, d)) for g, d in zip(jax.tree_util.tree_leaves(grads),
                                                         jax.tree_util.tree_leaves(direction)))
    np.testing.assert_allclose(analytic, float(numeric), rtol=1e-6)


def test_bnwb_argument_validation():
  from gajax.models import batch_norm_mask  # pylint: disable=import-outside-toplevel
  params, support, query, loss_fn = bn_problem()
  learner = maml_plus_plus(loss_fn, inner_steps=K, inner_lr=LR, per_step=batch_norm_mask)
  with pytest.raises(ValueError, match="with per_step the meta-parameters must be MAMLPlusPlusParams"):
    learner(params, support, query, 0)
  with pytest.raises(ValueError, match="hold no per-step copies"):
    learner(maml_plus_plus_init(params, LR, K), support, query, 0)
  with pytest.raises(ValueError, match="expected a leading axis of 3"):
    learner(maml_plus_plus_init(params, LR, K + 1, lslr=False, per_step=batch_norm_mask), support,
            query, 0)
  with pytest.raises(ValueError, match="per_step needs inner_steps >= 1"):
    maml_plus_plus(loss_fn, inner_steps=0, inner_lr=LR, per_step=batch_norm_mask)
  with pytest.raises(ValueError, match="no BatchStatNorm"):
    batch_norm_mask(sinusoid_problem()[0])
