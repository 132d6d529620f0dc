"""Conv-4 as patch matrix products (the CPU default) against XLA's convolutions, in float64.

The reference is ``lax.conv_general_dilated`` / ``nn.max_pool``, an independent implementation; the
checks cover values, first derivatives (input and kernel) and the second derivatives MAML needs.

Everything runs under ``jax.jit`` with few or no LLVM optimisations: compiling dominates this file (run
eagerly, Conv-4's init alone compiles dozens of small float64 kernels), and the tests need correct
machine code, not fast code. The comparisons stay in float64 at the same tolerances.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from gajax import algorithms
from gajax.models import Conv4, conv_as_matmul, max_pool_2x2, resolve_conv_impl


# Skipping LLVM's optimisations cuts XLA:CPU compile time (which dominates here) several-fold.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)
# Except where a gradient goes through a max: at optimisation level 0, XLA:CPU (jax 0.10.2) returned NaN
# for the float64 gradient of the pooled Conv-4 at some parameters where the default level gives finite
# values that match the XLA reference. Those compilations keep LLVM's default pipeline and only skip its
# expensive passes.
MAX_SAFE_COMPILE = {"xla_llvm_disable_expensive_passes": True}
jit_through_max = functools.partial(jax.jit, compiler_options=MAX_SAFE_COMPILE)


def reference_conv(x, kernel, bias, stride):
  out = lax.conv_general_dilated(x, kernel, (stride, stride), "SAME",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return out + bias


# conv_as_matmul is conv_as_patches (gajax.fast_ops) with "SAME" padding; tests/test_fast_ops.py checks
# that against XLA for general layouts, strides, paddings and dilations. Here: the padding it derives,
# odd and even sizes at stride 2 (asymmetric "SAME") and stride 1.
@pytest.mark.parametrize("size, stride, cin, cout", [(7, 2, 3, 5), (4, 2, 2, 2), (9, 1, 2, 3)])
def test_conv_as_matmul_matches_xla_values_and_derivatives(size, stride, cin, cout):
  with jax.enable_x64(True):
    keys = jax.random.split(jax.random.PRNGKey(size * 10 + stride), 4)
    x = jax.random.normal(keys[0], (3, size, size, cin), jnp.float64)
    kernel = jax.random.normal(keys[1], (3, 3, cin, cout), jnp.float64)
    bias = jax.random.normal(keys[2], (cout,), jnp.float64)
    out_shape = jax.eval_shape(functools.partial(reference_conv, stride=stride), x, kernel, bias).shape
    probe = jax.random.normal(keys[3], out_shape, jnp.float64)

    @jit
    def values_and_derivatives(x, k, b):  # both implementations in one compilation
      results = []
      for conv in (conv_as_matmul, reference_conv):
        # A smooth, non-linear scalar of the output, so second derivatives are non-zero.
        scalar = lambda x, k, b, conv=conv: jnp.sum(jnp.tanh(conv(x, k, b, stride)) * probe)
        # MAML's second-order term: d/dk of a function of d/dk.
        grad_norm = jax.grad(lambda k, scalar=scalar: jnp.sum(jax.grad(scalar, argnums=1)(x, k, b) ** 2))
        results.append((conv(x, k, b, stride), jax.grad(scalar, argnums=(0, 1, 2))(x, k, b),
                        grad_norm(k)))
      return results

    (value, grads, second), (want_value, want_grads, want_second) = values_and_derivatives(x, kernel, bias)
    assert value.shape == want_value.shape == out_shape
    np.testing.assert_allclose(value, want_value, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, want_grads):
      np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(second, want_second, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("size", [28, 7, 3, 2])
def test_max_pool_2x2_matches_reduce_window(size):
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.PRNGKey(size), (2, size, size, 3), jnp.float64)
    ref = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    probe = jax.random.normal(jax.random.PRNGKey(1), (2, size // 2, size // 2, 3), jnp.float64)

    @jit_through_max
    def values_and_grads(x):  # both implementations in one compilation
      return [(pool(x), jax.grad(lambda x: jnp.sum(pool(x) * probe))(x)) for pool in (max_pool_2x2, ref)]

    (ours, ours_grad), (want, want_grad) = values_and_grads(x)
    assert ours.shape == want.shape == probe.shape
    np.testing.assert_array_equal(ours, want)
    # Random normal inputs have no tied maxima, so both gradients route to the same elements.
    np.testing.assert_allclose(ours_grad, want_grad, rtol=1e-12, atol=0)


@pytest.mark.parametrize("downsample", ["stride", "pool"])
def test_conv4_implementations_share_parameters_and_maml_meta_gradients(downsample):
  """Same parameter tree, same logits, and the same vmapped second-order MAML update either way."""
  with jax.enable_x64(True):
    models = {impl: Conv4(num_classes=3, filters=4, downsample=downsample, conv=impl)
              for impl in ("matmul", "xla")}
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 2, 16, 16, 1), jnp.float64)  # 2 tasks
    y = jnp.broadcast_to(jnp.array([0, 1]), (2, 2))
    params = {impl: jit(m.init)(jax.random.PRNGKey(3), x[0]) for impl, m in models.items()}
    assert (jax.tree_util.tree_structure(params["matmul"])
            == jax.tree_util.tree_structure(params["xla"]))
    jax.tree_util.tree_map(np.testing.assert_array_equal, params["matmul"], params["xla"])
    params = jax.tree_util.tree_map(lambda p: p.astype(jnp.float64), params["xla"])
    np.testing.assert_allclose(jit(models["matmul"].apply)(params, x[0]),
                               jit(models["xla"].apply)(params, x[0]), rtol=1e-10, atol=1e-10)

    updates = {}
    for impl, model in models.items():
      def loss_fn(p, batch, model=model):
        logits = model.apply(p, batch["x"])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]))
      # fast_ops=False: the XLA model stays the independent reference (not rewritten by
      # gajax.fast_ops.batchable into the very products it is compared with).
      learner = algorithms.maml(loss_fn, inner_steps=1, inner_lr=0.4, fast_ops=impl == "matmul")
      batch = {"x": x, "y": y}
      through_max = downsample == "pool" and impl == "matmul"  # max_pool_2x2's gradient is a max's
      updates[impl] = (jit_through_max if through_max else jit)(algorithms.per_task(learner))(
          params, batch, batch)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10),
                           updates["matmul"], updates["xla"])


def test_conv_impl_auto_and_bad_names():
  assert resolve_conv_impl("auto") == "matmul"  # The fastest on every backend we measured.
  assert resolve_conv_impl("xla") == "xla"
  with pytest.raises(ValueError, match="conv must be one of auto, matmul, xla; got 'fft'"):
    resolve_conv_impl("fft")
