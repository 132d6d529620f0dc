"""Sharding the task axis over 8 (virtual CPU) devices gives the single-device meta-step.

Runs in a subprocess because the device count is fixed when JAX starts.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import functools
    import jax, numpy as np, optax, pytest
    from gajax import aggregators, algorithms, meta
    from gajax.tasks import sinusoid
    assert jax.device_count() == 8, jax.devices()
    # Compiling dominates; skipping LLVM's optimisations about halves it (numerics are IEEE either way).
    jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                       "xla_llvm_disable_expensive_passes": True})
    task = sinusoid.make_task(shots=5, queries=5, hidden=(16,))
    learner = algorithms.maml(task.loss_fn, inner_steps=2, inner_lr=0.01)
    mesh = meta.task_mesh(8)
    # num_tasks sizes the agreement weights in the state from the start: without it they grow from [0]
    # to [16] after the first step, and both steps would compile twice.
    for make, num_tasks in ((aggregators.mean, 8),
                            (functools.partial(aggregators.gradient_agreement, num_tasks=16), 16)):
      tx = optax.chain(make(), optax.adam(1e-2))
      state = meta.init_state(jax.random.PRNGKey(1), task.init_params(jax.random.PRNGKey(0)), tx)
      single = jit(meta.make_meta_step(learner, tx, task.sample, num_tasks))
      sharded = jit(meta.make_meta_step(learner, tx, task.sample, num_tasks, mesh=mesh))
      a, b = state, meta.replicate(state, mesh)
      for _ in range(3):
        a, ma = single(a)
        b, mb = sharded(b)
      for x, y in zip(jax.tree_util.tree_leaves((a.params, ma)), jax.tree_util.tree_leaves((b.params, mb))):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-6)
      text = sharded.lower(b).compile().as_text()
      assert "all-reduce" in text or "all-gather" in text, "no collectives: the tasks were not sharded"
    try:
      meta.make_meta_step(learner, tx, task.sample, 12, mesh=mesh)
    except ValueError as e:
      assert "does not split evenly over 8 devices" in str(e)
    else:
      raise AssertionError("12 tasks on 8 devices must be refused")
    print("SHARDED_OK")
""")


def test_sharded_meta_step_matches_single_device():
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                          timeout=600)
  assert result.returncode == 0 and "SHARDED_OK" in result.stdout, result.stderr[-3000:]
