"""Meta-gradients against closed forms (quadratic losses) and finite differences (an MLP), in float64."""


import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from gajax import algorithms
from gajax.adaptation import adapt
from gajax.models import MLP


def quadratic_loss(params, batch):
  """0.5 theta^T A theta - b^T theta: gradient A theta - b, Hessian A."""
  theta = params["theta"]
  return 0.5 * theta @ batch["A"] @ theta - batch["b"] @ theta


def quadratic_problem(seed, dim=4):
  rng = np.random.default_rng(seed)

  def spd():
    m = rng.normal(size=(dim, dim))
    return m @ m.T / dim + np.eye(dim)

  support = {"A": spd(), "b": rng.normal(size=dim)}
  query = {"A": spd(), "b": rng.normal(size=dim)}
  return {"theta": rng.normal(size=dim)}, support, query


def closed_form_maml(theta, support, query, alpha, steps, first_order):
  """theta_k = M^k theta + ..., M = I - alpha A_s; grad = (M^T)^k (A_q theta_k - b_q) (or without M)."""
  m = np.eye(len(theta)) - alpha * support["A"]
  theta_k = theta.copy()
  for _ in range(steps):
    theta_k = theta_k - alpha * (support["A"] @ theta_k - support["b"])
  query_grad = query["A"] @ theta_k - query["b"]
  if first_order:
    return query_grad, theta - theta_k
  return np.linalg.matrix_power(m.T, steps) @ query_grad, theta - theta_k


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
def test_maml_matches_closed_form_on_quadratic(steps, first_order):
  with jax.enable_x64(True):
    params, support, query = quadratic_problem(steps)
    learner = algorithms.maml(quadratic_loss, inner_steps=steps, inner_lr=0.1, first_order=first_order)
    grads, aux = learner.with_aux(params, support, query)
    want, displacement = closed_form_maml(params["theta"], support, query, 0.1, steps, first_order)
    np.testing.assert_allclose(grads["theta"], want, rtol=1e-10)
    np.testing.assert_allclose(aux.displacement["theta"], displacement, rtol=1e-10)
    np.testing.assert_allclose(learner(params, support, query)["theta"], want, rtol=1e-10)


def test_fomaml_drops_exactly_the_second_order_term():
  """Second order minus first order must equal ((M^T)^k - I) query_grad, the Hessian terms alone."""
  with jax.enable_x64(True):
    params, support, query = quadratic_problem(7)
    so = algorithms.maml(quadratic_loss, inner_steps=2, inner_lr=0.2)(params, support, query)
    fo = algorithms.fomaml(quadratic_loss, inner_steps=2, inner_lr=0.2)(params, support, query)
    m = np.eye(4) - 0.2 * support["A"]
    query_grad, _ = closed_form_maml(params["theta"], support, query, 0.2, 2, first_order=True)
    np.testing.assert_allclose(so["theta"] - fo["theta"],
                               (np.linalg.matrix_power(m.T, 2) - np.eye(4)) @ query_grad, rtol=1e-9)


def mlp_problem():
  model = MLP((8, 1))
  key = jax.random.PRNGKey(0)
  params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64),
                                  model.init(key, jnp.zeros((1, 1))))
  rng = np.random.default_rng(0)
  x = rng.uniform(-2, 2, size=(10, 1))
  support = {"x": x[:5], "y": np.sin(x[:5])}
  query = {"x": x[5:], "y": np.sin(x[5:])}

  def loss_fn(p, batch):
    return jnp.mean(jnp.square(model.apply(p, batch["x"]) - batch["y"]))

  return params, support, query, loss_fn


@pytest.mark.parametrize("steps", [1, 3])
def test_maml_second_order_matches_finite_differences_on_mlp(steps):
  with jax.enable_x64(True):
    params, support, query, loss_fn = mlp_problem()
    grads = algorithms.maml(loss_fn, inner_steps=steps, inner_lr=0.05)(params, support, query)

    def objective(flat):
      p = unravel(flat)
      for _ in range(steps):  # a plain Python loop: independent of adapt's lax.scan.
        g = jax.grad(loss_fn)(p, support)
        p = jax.tree_util.tree_map(lambda w, gw: w - 0.05 * gw, p, g)
      return float(loss_fn(p, query))

    flat, unravel = jax.flatten_util.ravel_pytree(params)
    eps = 1e-6
    rng = np.random.default_rng(1)
    flat_grads = jax.flatten_util.ravel_pytree(grads)[0]
    for _ in range(3):  # directional derivatives along random directions
      direction = rng.normal(size=flat.shape)
      fd = (objective(flat + eps * direction) - objective(flat - eps * direction)) / (2 * eps)
      np.testing.assert_allclose(float(flat_grads @ direction), fd, rtol=1e-6, atol=1e-9)


def test_meta_sgd_learning_rate_gradient():
  """One inner step: dL_q/dalpha = -grad L_q(theta_1) * grad L_s(theta) (elementwise)."""
  with jax.enable_x64(True):
    params, support, query = quadratic_problem(3)
    alpha = {"theta": np.array([0.1, 0.2, 0.05, 0.3])}
    meta_params = algorithms.MetaSGDParams(params, alpha)
    grads = algorithms.meta_sgd(quadratic_loss, inner_steps=1)(meta_params, support, query)
    theta = params["theta"]
    grad_s = support["A"] @ theta - support["b"]
    theta_1 = theta - alpha["theta"] * grad_s
    grad_q = query["A"] @ theta_1 - query["b"]
    np.testing.assert_allclose(grads.inner_lr["theta"], -grad_q * grad_s, rtol=1e-10)
    # And the theta part: (I - diag(alpha) A_s)^T grad_q.
    np.testing.assert_allclose(grads.params["theta"],
                               (np.eye(4) - np.diag(alpha["theta"]) @ support["A"]).T @ grad_q,
                               rtol=1e-10)


def test_meta_sgd_with_uniform_rates_equals_maml():
  with jax.enable_x64(True):
    params, support, query = quadratic_problem(4)
    mp = algorithms.meta_sgd_init(params, 0.1)
    got = algorithms.meta_sgd(quadratic_loss, inner_steps=2)(mp, support, query)
    want = algorithms.maml(quadratic_loss, inner_steps=2, inner_lr=0.1)(params, support, query)
    np.testing.assert_allclose(got.params["theta"], want["theta"], rtol=1e-10)


def test_reptile_update_is_the_displacement():
  with jax.enable_x64(True):
    params, support, query = quadratic_problem(5)
    update, aux = algorithms.reptile(quadratic_loss, inner_steps=3, inner_lr=0.1).with_aux(
        params, support, query)
    _, displacement = closed_form_maml(params["theta"], support, query, 0.1, 3, first_order=True)
    np.testing.assert_allclose(update["theta"], displacement, rtol=1e-10)
    np.testing.assert_allclose(aux.support_loss, quadratic_loss(params, support), rtol=1e-12)


def test_per_task_vmaps_with_shared_params():
  with jax.enable_x64(True):
    problems = [quadratic_problem(s) for s in range(3)]
    params = problems[0][0]
    stack = lambda trees: jax.tree_util.tree_map(lambda *x: np.stack(x), *trees)
    supports, queries = stack([p[1] for p in problems]), stack([p[2] for p in problems])
    learner = algorithms.maml(quadratic_loss, inner_steps=2, inner_lr=0.1)
    batched = algorithms.per_task(learner)(params, supports, queries)
    for i, (_, s, q) in enumerate(problems):
      np.testing.assert_allclose(batched["theta"][i], learner(params, s, q)["theta"], rtol=1e-12)


def test_per_task_rejects_mismatched_task_counts():
  params, support, query = quadratic_problem(0)
  supports = jax.tree_util.tree_map(lambda x: np.stack([x] * 3), support)
  queries = jax.tree_util.tree_map(lambda x: np.stack([x] * 2), query)
  learner = algorithms.maml(quadratic_loss, inner_steps=1, inner_lr=0.1)
  with pytest.raises(ValueError, match="disagree on the task count"):
    algorithms.per_task(learner)(params, supports, queries)


def test_adapt_rejects_bad_settings():
  params, support, _ = quadratic_problem(0)
  with pytest.raises(ValueError, match="steps"):
    adapt(quadratic_loss, params, support, steps=-1, lr=0.1)
  with pytest.raises(ValueError, match="lr must be a scalar or a pytree"):
    adapt(quadratic_loss, params, support, steps=1, lr={"other": 1.0})
  with pytest.raises(ValueError, match="inner_steps"):
    algorithms.maml(quadratic_loss, inner_steps=-2, inner_lr=0.1)
  with pytest.raises(ValueError, match="inner_lr"):
    algorithms.maml(quadratic_loss, inner_steps=1, inner_lr=-0.1)
