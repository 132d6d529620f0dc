"""ANIL against MAML (all leaves; body rate 0), finite differences (float64) and its contract."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from gajax.algorithms.anil import anil, combine, partition
from gajax.algorithms.core import per_task
from gajax.algorithms.maml import maml
from helpers import sinusoid_problem

LR = 0.05


def is_head(path):
  return "Dense_1" in jax.tree_util.keystr(path)


def head_mask(params):
  return jax.tree_util.tree_map_with_path(lambda path, _: is_head(path), params)


def assert_trees_close(got, want, rtol=1e-12, atol=1e-14):
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


def test_all_leaves_selected_is_maml(first_order=False):  # first order: the head-mask test below.
  with jax.enable_x64(True):
    params, support, query, loss_fn = sinusoid_problem()
    everything = jax.tree_util.tree_map(lambda _: True, params)
    got, got_aux = jax.jit(anil(loss_fn, inner_steps=3, inner_lr=LR, adapt=everything,
                                first_order=first_order).with_aux)(params, support, query)
    want, want_aux = jax.jit(maml(loss_fn, inner_steps=3, inner_lr=LR,
                                  first_order=first_order).with_aux)(params, support, query)
    assert_trees_close(got, want)
    assert_trees_close(got_aux, want_aux)


@pytest.mark.parametrize("first_order", [False, True])
def test_head_mask_is_maml_with_zero_body_rate(first_order):
  """Head-only ANIL == MAML with per-leaf inner rates (0 on the body): head and body updates."""
  with jax.enable_x64(True):
    params, support, query, loss_fn = sinusoid_problem()
    rates = jax.tree_util.tree_map_with_path(lambda path, _: LR if is_head(path) else 0.0, params)
    got, got_aux = jax.jit(anil(loss_fn, inner_steps=3, inner_lr=LR, adapt=head_mask,
                                first_order=first_order).with_aux)(params, support, query)
    want, want_aux = jax.jit(maml(loss_fn, inner_steps=3, inner_lr=rates,
                                  first_order=first_order).with_aux)(params, support, query)
    body_want = want["params"]["Dense_0"]
    assert all(np.abs(x).max() > 1e-6 for x in jax.tree_util.tree_leaves(body_want))  # not vacuous
    assert_trees_close(got, want)
    assert_trees_close(got_aux, want_aux)
    # The same per-leaf rates handed to ANIL (the body's entries unused) give the same update.
    if not first_order:
        assert_trees_close(jax.jit(anil(loss_fn, inner_steps=3, inner_lr=rates, adapt=head_mask))(
          params, support, query), want)


def test_body_meta_gradient_matches_finite_differences():
  steps = 3
  with jax.enable_x64(True):
    params, support, query, loss_fn = sinusoid_problem()
    grads = jax.jit(anil(loss_fn, inner_steps=steps, inner_lr=LR, adapt=head_mask))(
        params, support, query)

    @jax.jit
    def objective(flat):
      p = unravel(flat)
      for _ in range(steps):  # a plain Python loop on the head alone, independent of adapt's scan.
        g = jax.grad(loss_fn)(p, support)["params"]["Dense_1"]
        head = jax.tree_util.tree_map(lambda w, gw: w - LR * gw, p["params"]["Dense_1"], g)
        p = {"params": {"Dense_0": p["params"]["Dense_0"], "Dense_1": head}}
      return loss_fn(p, query)

    flat, unravel = jax.flatten_util.ravel_pytree(params)
    body_only = jax.flatten_util.ravel_pytree(jax.tree_util.tree_map_with_path(
        lambda path, x: np.zeros_like(x) if is_head(path) else np.ones_like(x), params))[0]
    flat_grads = jax.flatten_util.ravel_pytree(grads)[0]
    rng = np.random.default_rng(1)
    eps = 1e-6
    for direction in [rng.normal(size=flat.shape) * body_only for _ in range(3)] + [
        rng.normal(size=flat.shape)]:
      fd = (float(objective(flat + eps * direction)) - float(objective(flat - eps * direction))) / (2 * eps)
      np.testing.assert_allclose(float(flat_grads @ direction), fd, rtol=1e-6, atol=1e-9)

    # The body's gradient through the inner loop is not the direct (first-order) term alone.
    fo = jax.jit(anil(loss_fn, inner_steps=steps, inner_lr=LR, adapt=head_mask, first_order=True))(
        params, support, query)
    diff = jax.flatten_util.ravel_pytree(grads["params"]["Dense_0"])[0] - \
        jax.flatten_util.ravel_pytree(fo["params"]["Dense_0"])[0]
    assert np.abs(diff).max() > 1e-4


def test_adapt_moves_only_the_head():
  with jax.enable_x64(True):
    params, support, query, loss_fn = sinusoid_problem()
    learner = anil(loss_fn, inner_steps=2, inner_lr=LR, adapt=head_mask)
    adapted = jax.jit(learner.adapt)(params, support)
    assert jax.tree_util.tree_structure(adapted) == jax.tree_util.tree_structure(params)
    for name in ("kernel", "bias"):
      np.testing.assert_array_equal(adapted["params"]["Dense_0"][name], params["params"]["Dense_0"][name])
      assert np.abs(adapted["params"]["Dense_1"][name] - params["params"]["Dense_1"][name]).max() > 1e-4
    assert loss_fn(adapted, support) < loss_fn(params, support)
    _, aux = jax.jit(learner.with_aux)(params, support, query)
    for name in ("kernel", "bias"):
      np.testing.assert_array_equal(aux.displacement["params"]["Dense_0"][name], 0.0)
      np.testing.assert_allclose(aux.displacement["params"]["Dense_1"][name],
                                 params["params"]["Dense_1"][name] - adapted["params"]["Dense_1"][name],
                                 rtol=1e-12)
    np.testing.assert_allclose(aux.support_loss, loss_fn(params, support), rtol=1e-12)
    np.testing.assert_allclose(aux.adapted_support_loss, loss_fn(adapted, support), rtol=1e-12)
    np.testing.assert_allclose(aux.query_loss, loss_fn(adapted, query), rtol=1e-12)


def test_inner_loop_never_differentiates_the_body():
  """A body whose backward pass raises: MAML's adaptation needs it, ANIL's must not."""

  @jax.custom_vjp
  def features(w, x):
    return jnp.tanh(x @ w)

  def bwd(res, g):
    raise AssertionError("the inner loop differentiated the body")

  features.defvjp(lambda w, x: (features(w, x), None), bwd)

  def loss_fn(p, batch):
    return jnp.mean(jnp.square(features(p["body"], batch["x"]) @ p["head"] - batch["y"]))

  rng = np.random.default_rng(0)
  params = {"body": jnp.asarray(rng.normal(size=(2, 4)), jnp.float32),
            "head": jnp.asarray(rng.normal(size=(4, 1)), jnp.float32)}
  support = {"x": jnp.asarray(rng.normal(size=(6, 2)), jnp.float32),
             "y": jnp.asarray(rng.normal(size=(6, 1)), jnp.float32)}
  with pytest.raises(AssertionError, match="differentiated the body"):
    maml(loss_fn, inner_steps=2, inner_lr=0.1).adapt(params, support)
  learner = anil(loss_fn, inner_steps=2, inner_lr=0.1, adapt={"body": False, "head": True})
  adapted = jax.jit(learner.adapt)(params, support)
  np.testing.assert_array_equal(adapted["body"], params["body"])
  assert np.abs(adapted["head"] - params["head"]).max() > 1e-4


def test_callable_mask_equals_pytree_mask_and_bad_masks_raise():
  params, support, query, loss_fn = sinusoid_problem(dtype=np.float32)
  by_callable = jax.jit(anil(loss_fn, inner_steps=2, inner_lr=LR, adapt=head_mask))(
      params, support, query)
  by_tree = jax.jit(anil(loss_fn, inner_steps=2, inner_lr=LR, adapt=head_mask(params)))(
      params, support, query)
  assert_trees_close(by_callable, by_tree, rtol=0, atol=0)

  wrong = {"params": {"Dense_1": {"bias": True, "kernel": True}}}  # Dense_0 missing.
  with pytest.raises(ValueError, match="adapt must have the structure of params"):
    anil(loss_fn, inner_steps=2, inner_lr=LR, adapt=wrong)(params, support, query)
  with pytest.raises(ValueError, match="adapt must have the structure of params"):
    anil(loss_fn, inner_steps=2, inner_lr=LR, adapt=lambda p: wrong).adapt(params, support)
  with pytest.raises(ValueError, match="adapt selects no parameter"):
    anil(loss_fn, inner_steps=2, inner_lr=LR, adapt=jax.tree_util.tree_map(lambda _: False, params))
  with pytest.raises(ValueError, match="adapt selects no parameter"):
    anil(loss_fn, inner_steps=2, inner_lr=LR,
         adapt=lambda p: jax.tree_util.tree_map(lambda _: False, p)).adapt(params, support)
  with pytest.raises(ValueError, match="adapt must be a pytree of Python bools"):
    anil(loss_fn, inner_steps=2, inner_lr=LR, adapt=jax.tree_util.tree_map(lambda _: 1.0, params))
  with pytest.raises(ValueError, match="inner_lr must be a scalar or a pytree"):
    anil(loss_fn, inner_steps=2, inner_lr={"head": 0.1}, adapt=head_mask)(params, support, query)
  with pytest.raises(ValueError, match="inner_steps"):
    anil(loss_fn, inner_steps=-1, inner_lr=LR, adapt=head_mask)
  with pytest.raises(ValueError, match="inner_lr"):
    anil(loss_fn, inner_steps=1, inner_lr=-0.1, adapt=head_mask)


def test_partition_and_combine_round_trip():
  tree = {"a": 1.0, "b": {"c": 2.0, "d": 3.0}}
  selected, rest = partition(tree, {"a": True, "b": {"c": False, "d": True}})
  assert selected == {"a": 1.0, "b": {"c": None, "d": 3.0}}
  assert rest == {"a": None, "b": {"c": 2.0, "d": None}}
  assert combine(selected, rest) == tree


def test_per_task_under_jit():
  with jax.enable_x64(True):
    params, supports, queries, loss_fn = sinusoid_problem(num_tasks=3)
    learner = anil(loss_fn, inner_steps=2, inner_lr=LR, adapt=head_mask)
    batched = jax.jit(per_task(learner))(params, supports, queries)
    one_task = jax.jit(learner)
    for i in range(3):
      one = one_task(params, *jax.tree_util.tree_map(lambda x: x[i], (supports, queries)))
      assert_trees_close(jax.tree_util.tree_map(lambda x: x[i], batched), one, rtol=1e-10, atol=1e-12)
      assert np.abs(batched["params"]["Dense_0"]["kernel"][i]).max() > 1e-6
