"""iMAML against a closed form (quadratic), the unrolled meta-gradient (an MLP), a dense implicit formula."""

import functools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gajax import algorithms
from gajax.algorithms.imaml import imaml
from gajax.tasks import sinusoid


# ---------------------------------------------------------------------------------------------------
# Quadratic inner problem, closed form.
#
#   L_s(phi) = 1/2 (phi - a)^T A (phi - a),   L_q(phi) = 1/2 |phi - b|^2,   A symmetric.
#   G(phi, theta) = L_s(phi) + lam/2 |phi - theta|^2,   grad_phi G = A (phi - a) + lam (phi - theta).
# Setting it to zero: (A + lam I) phi* = A a + lam theta, so phi*(theta) = (A + lam I)^{-1}(A a + lam theta)
# (a minimiser iff A + lam I is positive definite). It is affine in theta with Jacobian
#   d phi* / d theta = lam (A + lam I)^{-1}   (symmetric),
# so by the chain rule the exact meta-gradient is
#   d/dtheta L_q(phi*(theta)) = (d phi*/d theta)^T grad L_q(phi*) = lam (A + lam I)^{-1} (phi* - b),
# which equals (I + A / lam)^{-1} grad L_q(phi*) since lam (A + lam I)^{-1} = (I + A / lam)^{-1}.
# ---------------------------------------------------------------------------------------------------

def quad_support_loss(params, batch):
  d = params["phi"] - batch["a"]
  return 0.5 * d @ batch["A"] @ d


def quad_query_loss(params, batch):
  d = params["phi"] - batch["b"]
  return 0.5 * d @ d


def quad_loss(params, batch):
  """One loss_fn for both sets: the support carries "A" and "a", the query only "b"."""
  return quad_support_loss(params, batch) if "A" in batch else quad_query_loss(params, batch)


def quad_problem(eigs, seed=0):
  rng = np.random.default_rng(seed)
  dim = len(eigs)
  q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
  a_mat = q @ np.diag(eigs) @ q.T
  support = {"A": (a_mat + a_mat.T) / 2, "a": rng.normal(size=dim)}
  query = {"b": rng.normal(size=dim)}
  return {"phi": rng.normal(size=dim)}, support, query


@pytest.mark.parametrize("eigs", [(0.5, 1.0, 2.0, 4.0),     # A positive definite
                                  (-0.5, 0.3, 1.0, 3.0)])   # indefinite A, but A + lam I PD
def test_imaml_matches_closed_form_on_quadratic(eigs):
  lam = 1.0
  with jax.enable_x64(True):
    params, support, query = quad_problem(eigs)
    theta, a_mat = params["phi"], support["A"]
    # GD on G has Hessian A + lam I; step 1 / (eig_max + lam) < 2 / (eig_max + lam) contracts by
    # 1 - (eig_min + lam) / (eig_max + lam) <= 0.875 per step: 500 steps reach machine precision.
    lr = 1.0 / (max(eigs) + lam)
    learner = imaml(quad_loss, inner_steps=500, inner_lr=lr, lam=lam, cg_steps=20)
    update, aux = jax.jit(learner.with_aux)(params, support, query)

    eye = np.eye(len(eigs))
    phi_star = np.linalg.solve(a_mat + lam * eye, a_mat @ support["a"] + lam * theta)
    want = lam * np.linalg.solve(a_mat + lam * eye, phi_star - query["b"])
    np.testing.assert_allclose(update["phi"], want, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(learner(params, support, query)["phi"], want, rtol=1e-9, atol=1e-12)
    # The first-order answer grad L_q(phi*) is measurably different: the test can tell them apart.
    assert np.linalg.norm(want - (phi_star - query["b"])) > 1e-2 * np.linalg.norm(want)

    np.testing.assert_allclose(aux.displacement["phi"], theta - phi_star, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(learner.adapt(params, support)["phi"], phi_star, rtol=1e-9, atol=1e-12)
    d0, d1 = theta - support["a"], phi_star - support["a"]
    np.testing.assert_allclose(aux.support_loss, 0.5 * d0 @ a_mat @ d0, rtol=1e-12)
    np.testing.assert_allclose(aux.adapted_support_loss, 0.5 * d1 @ a_mat @ d1, rtol=1e-9)
    np.testing.assert_allclose(aux.query_loss, 0.5 * np.sum((phi_star - query["b"]) ** 2), rtol=1e-9)


# Damping replaces A by A + mu I in the CG operator only (phi* is the undamped inner solution):
#   u = (I + (A + mu I) / lam)^{-1} grad L_q(phi*) = lam (A + (lam + mu) I)^{-1} (phi* - b).
@pytest.mark.parametrize("mu", [0.5, 3.0])
def test_damped_update_matches_closed_form_on_quadratic(mu):
  lam, eigs = 1.0, (-0.5, 0.3, 1.0, 3.0)
  with jax.enable_x64(True):
    params, support, query = quad_problem(eigs, seed=1)
    theta, a_mat, eye = params["phi"], support["A"], np.eye(len(eigs))
    learner = imaml(quad_loss, inner_steps=500, inner_lr=1.0 / (max(eigs) + lam), lam=lam,
                    cg_steps=20, cg_damping=mu)
    update, aux = jax.jit(learner.with_aux)(params, support, query)
    phi_star = np.linalg.solve(a_mat + lam * eye, a_mat @ support["a"] + lam * theta)
    want = lam * np.linalg.solve(a_mat + (lam + mu) * eye, phi_star - query["b"])
    np.testing.assert_allclose(update["phi"], want, rtol=1e-9, atol=1e-12)
    undamped = lam * np.linalg.solve(a_mat + lam * eye, phi_star - query["b"])
    assert np.linalg.norm(want - undamped) > 1e-2 * np.linalg.norm(undamped)  # damping is visible
    # The inner loop does not see the damping.
    np.testing.assert_allclose(aux.displacement["phi"], theta - phi_star, rtol=1e-9, atol=1e-12)


def test_heavy_damping_tends_to_scaled_first_order():
  """mu -> infinity: (1 + mu / lam) u -> grad L_q(phi), whatever the curvature."""
  lam, mu = 1.0, 1e7
  with jax.enable_x64(True):
    params, support, query = quad_problem((-0.5, 0.3, 1.0, 3.0), seed=2)
    learner = imaml(quad_loss, inner_steps=300, inner_lr=0.25, lam=lam, cg_steps=5, cg_damping=mu)
    update, aux = jax.jit(learner.with_aux)(params, support, query)
    phi = params["phi"] - aux.displacement["phi"]
    np.testing.assert_allclose(update["phi"] * (1 + mu / lam), phi - query["b"], rtol=1e-5)


def test_inner_optimizer_sgd_equals_default_and_momentum_reaches_the_same_gradient():
  """The implicit gradient depends on the inner solution, not on the solver that found it."""
  lam, eigs = 1.0, (0.5, 1.0, 2.0, 4.0)
  lr = 1.0 / (max(eigs) + lam)
  with jax.enable_x64(True):
    params, support, query = quad_problem(eigs, seed=3)
    default = imaml(quad_loss, inner_steps=9, inner_lr=lr, lam=lam, cg_steps=20)
    sgd = imaml(quad_loss, inner_steps=9, inner_lr=123.0, lam=lam, cg_steps=20,
                inner_optimizer=optax.sgd(lr))  # inner_lr is unused with an optimiser
    (u_default, aux_default), (u_sgd, aux_sgd) = (jax.jit(l.with_aux)(params, support, query)
                                                  for l in (default, sgd))
    np.testing.assert_allclose(u_sgd["phi"], u_default["phi"], rtol=1e-12)
    np.testing.assert_allclose(aux_sgd.displacement["phi"], aux_default.displacement["phi"], rtol=1e-12)
    # 9 steps are far from converged, so a different solver would land elsewhere ...
    momentum = imaml(quad_loss, inner_steps=9, inner_lr=lr, lam=lam, cg_steps=20,
                     inner_optimizer=optax.sgd(lr, momentum=0.5))
    assert not np.allclose(jax.jit(momentum)(params, support, query)["phi"], u_default["phi"],
                           rtol=1e-3)
    # ... but run to convergence it gives the closed form, as gradient descent does.
    momentum = imaml(quad_loss, inner_steps=600, inner_lr=lr, lam=lam, cg_steps=20,
                     inner_optimizer=optax.sgd(lr, momentum=0.5))
    theta, a_mat, eye = params["phi"], support["A"], np.eye(len(eigs))
    phi_star = np.linalg.solve(a_mat + lam * eye, a_mat @ support["a"] + lam * theta)
    want = lam * np.linalg.solve(a_mat + lam * eye, phi_star - query["b"])
    np.testing.assert_allclose(jax.jit(momentum)(params, support, query)["phi"], want, rtol=1e-9)
    np.testing.assert_allclose(momentum.adapt(params, support)["phi"], phi_star, rtol=1e-9)


# The authors' inner loop (inner_loop="pull_back"): K plain GD steps on L_s from theta, in closed form
#   phi_K = a + (I - lr A)^K (theta - a),
# then one step on the regulariser alone: phi = phi_K - lr lam (phi_K - theta). The update is the
# damped formula at that phi: u = (I + (A + mu I) / lam)^{-1} (phi - b), a dense solve here.
@pytest.mark.parametrize("mu", [0.0, 22.0])
def test_pull_back_inner_loop_matches_closed_form_on_quadratic(mu):
  lam, lr, steps, eigs = 2.0, 0.1, 7, (-0.5, 0.3, 1.0, 3.0)
  with jax.enable_x64(True):
    params, support, query = quad_problem(eigs, seed=4)
    theta, a_mat, eye = params["phi"], support["A"], np.eye(len(eigs))
    learner = imaml(quad_loss, inner_steps=steps, inner_lr=lr, lam=lam, cg_steps=len(eigs),
                    cg_damping=mu, inner_loop="pull_back")
    update, aux = jax.jit(learner.with_aux)(params, support, query)
    phi_k = support["a"] + np.linalg.matrix_power(eye - lr * a_mat, steps) @ (theta - support["a"])
    phi = phi_k - lr * lam * (phi_k - theta)
    want = np.linalg.solve(eye + (a_mat + mu * eye) / lam, phi - query["b"])
    np.testing.assert_allclose(update["phi"], want, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(aux.displacement["phi"], theta - phi, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(learner.adapt(params, support)["phi"], phi, rtol=1e-9, atol=1e-12)
    # Not the proximal loop's answer after the same number of steps: the test tells them apart.
    proximal = imaml(quad_loss, inner_steps=steps, inner_lr=lr, lam=lam, cg_steps=len(eigs),
                     cg_damping=mu)
    assert not np.allclose(proximal.adapt(params, support)["phi"], phi, rtol=1e-3)


def test_unrolled_gradient_through_the_pull_back_loop_matches_closed_form():
  """phi(theta) = (1 - c)(a + M (theta - a)) + c theta with M = (I - lr A)^K, c = lr lam: its
  Jacobian (1 - c) M + c I is symmetric, so the gradient is ((1 - c) M + c I)(phi - b)."""
  from gajax import diagnostics  # pylint: disable=import-outside-toplevel
  lam, lr, steps = 2.0, 0.1, 5
  with jax.enable_x64(True):
    params, support, query = quad_problem((-0.5, 0.3, 1.0, 3.0), seed=6)
    theta, a_mat, eye = params["phi"], support["A"], np.eye(4)
    m = np.linalg.matrix_power(eye - lr * a_mat, steps)
    c = lr * lam
    phi = (1 - c) * (support["a"] + m @ (theta - support["a"])) + c * theta
    want = ((1 - c) * m + c * eye) @ (phi - query["b"])
    got = jax.jit(functools.partial(diagnostics.unrolled_imaml_gradient, quad_loss, inner_steps=steps,
                                    inner_lr=lr, lam=lam, inner_loop="pull_back"))(
        params, support, query)
    np.testing.assert_allclose(got["phi"], want, rtol=1e-10, atol=1e-12)


def test_pull_back_with_an_inner_optimizer_pulls_back_at_inner_lr():
  """The optimiser runs the plain steps (here SGD at 0.05 with momentum); the pull-back is one step
  of inner_lr * lam whatever the optimiser."""
  lam, lr = 2.0, 0.25
  with jax.enable_x64(True):
    params, support, query = quad_problem((0.5, 1.0, 2.0, 4.0), seed=5)
    theta, a_mat = params["phi"], support["A"]
    opt = optax.sgd(0.05, momentum=0.5)
    learner = imaml(quad_loss, inner_steps=4, inner_lr=lr, lam=lam, inner_optimizer=opt,
                    inner_loop="pull_back")
    phi, velocity = theta.copy(), np.zeros_like(theta)
    for _ in range(4):  # optax's momentum: v <- g + 0.5 v, phi <- phi - 0.05 v
      velocity = a_mat @ (phi - support["a"]) + 0.5 * velocity
      phi = phi - 0.05 * velocity
    phi = phi - lr * lam * (phi - theta)
    np.testing.assert_allclose(learner.adapt(params, support)["phi"], phi, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# A small MLP (sinusoid regression, 1 -> 8 -> 1, 25 parameters), float64.
# ---------------------------------------------------------------------------------------------------

LAM, LR = 5.0, 0.04  # lam outweighs the MLP's most negative curvature (about -3 here); LR < 2 / (24 + lam).


def mlp_problem():
  task = sinusoid.make_task(hidden=(8,))
  params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64),
                                  task.init_params(jax.random.PRNGKey(0)))
  support, query = task.sample(jax.random.PRNGKey(1), 1)
  first = lambda tree: jax.tree_util.tree_map(lambda x: np.asarray(x[0], np.float64), tree)
  return params, first(support), first(query), task.loss_fn


@functools.partial(jax.jit, static_argnums=(0, 4))
def unrolled_meta_gradient(loss_fn, params, support, query, steps):
  """grad_theta L_q(phi_k(theta)), differentiating through every step of GD on G (flat vectors)."""
  flat, unravel = jax.flatten_util.ravel_pytree(params)

  def objective(theta):
    reg = lambda phi: loss_fn(unravel(phi), support) + 0.5 * LAM * jnp.sum((phi - theta) ** 2)
    phi = jax.lax.fori_loop(0, steps, lambda _, phi: phi - LR * jax.grad(reg)(phi), theta)
    return loss_fn(unravel(phi), query)

  return jax.grad(objective)(flat)


def test_implicit_gradient_approaches_unrolled_as_inner_loop_converges():
  with jax.enable_x64(True):
    params, support, query, loss_fn = mlp_problem()
    errors = {}
    for steps in (20, 200):
      learner = imaml(loss_fn, inner_steps=steps, inner_lr=LR, lam=LAM, cg_steps=60)
      got = jax.flatten_util.ravel_pytree(jax.jit(learner)(params, support, query))[0]
      want = unrolled_meta_gradient(loss_fn, params, support, query, steps)
      errors[steps] = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    # Measured: about 1e-2 at 20 steps and 2e-11 at 200 (the inner problem has converged).
    assert errors[200] < 1e-1 * errors[20], errors
    assert errors[200] < 1e-5, errors
    assert errors[20] > 1e-4, errors  # not trivially equal: the unrolled Jacobian differs when unconverged


def learner_phi(params, support, loss_fn):
  """The adapted parameters after 200 regularised steps (the converged inner loop below)."""
  return imaml(loss_fn, inner_steps=200, inner_lr=LR, lam=LAM).adapt(params, support)


def test_implicit_gradient_report_on_a_converged_and_an_unconverged_inner_loop():
  """The diagnostic's cosine is 1 where the implicit formula is exact and lower where it is not."""
  from gajax import diagnostics  # pylint: disable=import-outside-toplevel
  with jax.enable_x64(True):
    params, support, query, loss_fn = mlp_problem()
    batched = lambda tree: jax.tree_util.tree_map(lambda x: x[None], tree)
    report = lambda steps: jax.jit(functools.partial(
        diagnostics.implicit_gradient_report, loss_fn, inner_steps=steps, inner_lr=LR, lam=LAM,
        cg_settings=((60, 0.0), (60, 1e6)), iters=25))(params, batched(support), batched(query),
                                                        jax.random.PRNGKey(0))
    converged, unconverged = report(200), report(20)
    assert converged.cosine.shape == (2, 1) and converged.lambda_min.shape == (1,)
    assert float(converged.cosine[0, 0]) > 1 - 1e-9
    assert abs(float(converged.norm_ratio[0, 0]) - 1) < 1e-6
    # Heavy damping: the update shrinks by about 1 + mu / lam, the reference does not move.
    np.testing.assert_allclose(float(converged.norm_ratio[1, 0]) * (1 + 1e6 / LAM),
                               float(jnp.linalg.norm(jax.flatten_util.ravel_pytree(jax.grad(loss_fn)(
                                   learner_phi(params, support, loss_fn), query))[0]) /
                                     jnp.linalg.norm(unrolled_meta_gradient(
                                         loss_fn, params, support, query, 200))), rtol=1e-4)
    # The unrolled reference is an independent computation (the helper above): same figure.
    want = unrolled_meta_gradient(loss_fn, params, support, query, 20)
    got = jax.flatten_util.ravel_pytree(jax.jit(imaml(loss_fn, inner_steps=20, inner_lr=LR, lam=LAM,
                                                      cg_steps=60))(params, support, query))[0]
    np.testing.assert_allclose(float(unconverged.cosine[0, 0]),
                               float(got @ want / np.linalg.norm(got) / np.linalg.norm(want)),
                               rtol=1e-9)
    assert float(unconverged.cosine[0, 0]) < 1 - 1e-6
    # lambda_min at the adapted parameters, against the dense Hessian there.
    flat, unravel = jax.flatten_util.ravel_pytree(learner_phi(params, support, loss_fn))
    eigs = np.linalg.eigvalsh(np.asarray(jax.hessian(lambda f: loss_fn(unravel(f), support))(flat)))
    np.testing.assert_allclose([float(converged.lambda_min[0]), float(converged.lambda_max[0])],
                               [eigs[0], eigs[-1]], rtol=1e-6, atol=1e-8)
    assert eigs[0] > -LAM  # where the formula holds: the test's premise


def test_update_is_the_implicit_formula_at_the_inner_loops_endpoint():
  """Even with an unconverged inner loop, the update is (I + H/lam)^{-1} grad L_q at phi_k, nothing else."""
  steps = 7
  with jax.enable_x64(True):
    params, support, query, loss_fn = mlp_problem()
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    # An independent, non-differentiated inner loop: plain NumPy steps with jax.grad for gradients.
    grad_s = jax.jit(jax.grad(lambda f: loss_fn(unravel(f), support)))
    phi = np.array(flat)
    for _ in range(steps):
      phi = phi - LR * (np.asarray(grad_s(phi)) + LAM * (phi - flat))
    hess = np.asarray(jax.jit(jax.hessian(lambda f: loss_fn(unravel(f), support)))(phi))
    g_q = np.asarray(jax.jit(jax.grad(lambda f: loss_fn(unravel(f), query)))(phi))
    want = np.linalg.solve(np.eye(len(phi)) + hess / LAM, g_q)

    learner = imaml(loss_fn, inner_steps=steps, inner_lr=LR, lam=LAM, cg_steps=100)
    update, aux = jax.jit(learner.with_aux)(params, support, query)
    np.testing.assert_allclose(jax.flatten_util.ravel_pytree(update)[0], want, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(jax.flatten_util.ravel_pytree(aux.displacement)[0], flat - phi,
                               rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(aux.adapted_support_loss, loss_fn(unravel(phi), support), rtol=1e-10)
    np.testing.assert_allclose(aux.support_loss, loss_fn(params, support), rtol=1e-12)
    np.testing.assert_allclose(aux.query_loss, loss_fn(unravel(phi), query), rtol=1e-10)


def _intermediate_shapes(jaxpr):
  """Shapes of every value an equation produces, through nested jaxprs (jit, scan, while, ...)."""
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      yield tuple(getattr(var.aval, "shape", ()))
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          yield from _intermediate_shapes(sub)


def test_no_per_step_storage_of_the_inner_loop():
  """Memory claim: nothing stacked over the inner steps except the [k] loss trace (MAML stores k steps)."""
  steps = 37  # a length no other dimension of this problem has
  with jax.enable_x64(True):
    params, support, query, loss_fn = mlp_problem()

    def stacked(learner):
      jaxpr = jax.make_jaxpr(learner)(params, support, query).jaxpr
      return [s for s in _intermediate_shapes(jaxpr) if s and s[0] == steps and s != (steps,)]

    assert stacked(imaml(loss_fn, inner_steps=steps, inner_lr=LR, lam=LAM)) == []
    assert stacked(algorithms.maml(loss_fn, inner_steps=steps, inner_lr=LR))  # the check can fail


def test_per_task_under_jit():
  task = sinusoid.make_task(hidden=(8,))
  params = task.init_params(jax.random.PRNGKey(0))
  supports, queries = task.sample(jax.random.PRNGKey(2), 3)
  learner = imaml(task.loss_fn, inner_steps=5, inner_lr=0.02, lam=5.0, cg_steps=5)
  batched, aux = jax.jit(algorithms.per_task(learner.with_aux))(params, supports, queries)
  assert aux.query_loss.shape == (3,) and aux.support_loss.shape == (3,)
  single = jax.jit(learner)
  for i in range(3):
    one = lambda tree: jax.tree_util.tree_map(lambda x: x[i], tree)
    want = single(params, one(supports), one(queries))
    jax.tree_util.tree_map(lambda b, w: np.testing.assert_allclose(b[i], w, rtol=2e-4, atol=1e-6),
                           batched, want)
    assert jax.tree_util.tree_structure(want) == jax.tree_util.tree_structure(params)
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(batched))


@pytest.mark.parametrize("kwargs, name", [
    (dict(lam=0.0), "lam"), (dict(lam=-1.0), "lam"), (dict(lam=float("inf")), "lam"),
    (dict(lam=float("nan")), "lam"), (dict(lam="1"), "lam"),
    (dict(cg_steps=0), "cg_steps"), (dict(cg_steps=2.0), "cg_steps"),
    (dict(inner_steps=0), "inner_steps"), (dict(inner_steps=-1), "inner_steps"),
    (dict(inner_lr=-0.1), "inner_lr"), (dict(cg_tol=-1e-3), "cg_tol"),
    (dict(cg_damping=-1.0), "cg_damping"), (dict(cg_damping=float("nan")), "cg_damping"),
])
def test_rejects_bad_arguments(kwargs, name):
  settings = dict(inner_steps=3, inner_lr=0.1, lam=1.0, cg_steps=5) | kwargs
  with pytest.raises(ValueError, match=f"imaml: {name} must"):
    imaml(quad_loss, **settings)


def test_rejects_an_unknown_inner_loop_and_a_pull_back_past_theta():
  with pytest.raises(ValueError, match="imaml: inner_loop must be one of proximal, pull_back; got 'prox'"):
    imaml(quad_loss, inner_steps=3, inner_lr=0.1, lam=1.0, inner_loop="prox")
  with pytest.raises(ValueError, match="inner_lr \\* lam back towards theta, which must be <= 1; "
                                       "got 0.4 \\* 3.0 = 1.2"):
    imaml(quad_loss, inner_steps=3, inner_lr=0.4, lam=3.0, inner_loop="pull_back")


def test_rejects_an_inner_optimizer_that_is_not_optax():
  with pytest.raises(TypeError, match="imaml: inner_optimizer must be an optax.GradientTransformation"):
    imaml(quad_loss, inner_steps=3, inner_lr=0.1, lam=1.0, inner_optimizer=lambda g: g)
