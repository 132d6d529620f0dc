"""Checkpointed inner loops (remat=True): the same updates as the plain loop, in less working memory."""

import functools

import chex
import jax
import jax.numpy as jnp
import pytest

from gajax import algorithms
from gajax.adaptation import adapt
from gajax.tasks import sinusoid

TASK = sinusoid.make_task(hidden=(32, 32))
# The equality tests compare two compilations of the same maths and need correct machine code, not fast
# code: skipping LLVM's optimisations about halves XLA:CPU's compile time, which dominates them. The
# memory test keeps the default pipeline: it measures what training gets.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)


def batch(seed, num_tasks=4):
  return TASK.sample(jax.random.PRNGKey(seed), num_tasks, None)


@pytest.mark.parametrize("steps", [1, 7])
def test_remat_maml_equals_plain_maml(steps):
  params = TASK.init_params(jax.random.PRNGKey(0))
  support, query = batch(steps)
  plain = algorithms.per_task(algorithms.maml(TASK.loss_fn, inner_steps=steps, inner_lr=0.01).with_aux)
  remat = algorithms.per_task(
      algorithms.maml(TASK.loss_fn, inner_steps=steps, inner_lr=0.01, remat=True).with_aux)
  chex.assert_trees_all_close(jit(plain)(params, support, query), jit(remat)(params, support, query),
                              rtol=1e-5, atol=1e-7)


def test_remat_meta_sgd_equals_plain_meta_sgd():
  params = algorithms.meta_sgd_init(TASK.init_params(jax.random.PRNGKey(0)), 0.01)
  support, query = batch(3)
  u0 = jit(algorithms.per_task(algorithms.meta_sgd(TASK.loss_fn, inner_steps=5)))(params, support, query)
  u1 = jit(algorithms.per_task(algorithms.meta_sgd(TASK.loss_fn, inner_steps=5, remat=True)))(
      params, support, query)
  chex.assert_trees_all_close(u0, u1, rtol=1e-5, atol=1e-7)


def test_remat_returns_every_inner_loss():
  params = TASK.init_params(jax.random.PRNGKey(0))
  support, _ = batch(1, num_tasks=1)
  one = jax.tree_util.tree_map(lambda x: x[0], support)

  @functools.partial(jit, static_argnums=0)
  def both(steps, params, one):
    return (adapt(TASK.loss_fn, params, one, steps=steps, lr=0.01),
            adapt(TASK.loss_fn, params, one, steps=steps, lr=0.01, remat=True))

  for steps in (1, 2, 5, 9, 10):  # blocks of ceil(sqrt(k)) with and without a shorter last block
    (p0, l0), (p1, l1) = both(steps, params, one)
    chex.assert_shape(l1, (steps,))
    chex.assert_trees_all_close(l0, l1, rtol=1e-6)
    chex.assert_trees_all_close(p0, p1, rtol=1e-6, atol=1e-8)


def test_remat_bounds_the_working_memory_of_many_steps():
  """XLA's compiled memory analysis (deterministic, not a timing): at 64 steps the plain backward keeps
  every step's activations; the checkpointed one keeps sqrt(64) = 8 block boundaries. (The step count
  costs no compile time, both loops being scans; the two compilations are this test's cost.)"""
  params = TASK.init_params(jax.random.PRNGKey(0))
  support, query = batch(0, num_tasks=25)

  def temp_bytes(remat):
    learner = algorithms.maml(TASK.loss_fn, inner_steps=64, inner_lr=0.01, remat=remat)
    fn = jax.jit(lambda p, s, q: jax.tree_util.tree_map(
        lambda u: jnp.mean(u, 0), algorithms.per_task(learner)(p, s, q)))
    analysis = fn.lower(params, support, query).compile().memory_analysis()
    if analysis is None:
      pytest.skip("this backend gives no compiled memory analysis")
    return analysis.temp_size_in_bytes

  assert temp_bytes(True) < 0.35 * temp_bytes(False)
