"""Conv-4 as patch matrix products (the CPU default) against XLA's convolutions, in float64.

The reference is ``lax.conv_general_dilated`` / ``nn.max_pool``, an independent implementation; the
checks cover values, first derivatives (input and kernel) and the second derivatives MAML needs.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from gajax import algorithms
from gajax.models import Conv4, conv_as_matmul, max_pool_2x2, resolve_conv_impl


def reference_conv(x, kernel, bias, stride):
  out = lax.conv_general_dilated(x, kernel, (stride, stride), "SAME",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return out + bias


@pytest.mark.parametrize("size, stride, cin, cout", [(28, 2, 1, 4), (7, 2, 3, 5), (4, 2, 2, 2),
                                                     (9, 1, 2, 3), (6, 1, 1, 2)])
def test_conv_as_matmul_matches_xla_values_and_derivatives(size, stride, cin, cout):
  with jax.enable_x64(True):
    keys = jax.random.split(jax.random.PRNGKey(size * 10 + stride), 4)
    x = jax.random.normal(keys[0], (3, size, size, cin), jnp.float64)
    kernel = jax.random.normal(keys[1], (3, 3, cin, cout), jnp.float64)
    bias = jax.random.normal(keys[2], (cout,), jnp.float64)
    probe = jax.random.normal(keys[3], reference_conv(x, kernel, bias, stride).shape, jnp.float64)

    def scalar(conv):  # A smooth, non-linear scalar of the output, so second derivatives are non-zero.
      return lambda x, k, b: jnp.sum(jnp.tanh(conv(x, k, b, stride)) * probe)

    ours, ref = scalar(conv_as_matmul), scalar(reference_conv)
    np.testing.assert_allclose(conv_as_matmul(x, kernel, bias, stride),
                               reference_conv(x, kernel, bias, stride), rtol=1e-12, atol=1e-12)
    grads = [jax.jit(jax.grad(f, argnums=(0, 1, 2)))(x, kernel, bias) for f in (ours, ref)]
    for got, want in zip(*grads):
      np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)

    def grad_norm(f):  # MAML's second-order term: d/dk of a function of d/dk.
      return jax.jit(jax.grad(lambda k: jnp.sum(jax.grad(f, argnums=1)(x, k, bias) ** 2)))

    np.testing.assert_allclose(grad_norm(ours)(kernel), grad_norm(ref)(kernel), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("size", [28, 7, 3, 2])
def test_max_pool_2x2_matches_reduce_window(size):
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.PRNGKey(size), (2, size, size, 3), jnp.float64)
    ref = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    np.testing.assert_array_equal(max_pool_2x2(x), ref(x))
    probe = jax.random.normal(jax.random.PRNGKey(1), ref(x).shape, jnp.float64)
    # Random normal inputs have no tied maxima, so both gradients route to the same elements.
    np.testing.assert_allclose(jax.grad(lambda x: jnp.sum(max_pool_2x2(x) * probe))(x),
                               jax.grad(lambda x: jnp.sum(ref(x) * probe))(x), rtol=1e-12, atol=0)


@pytest.mark.parametrize("downsample", ["stride", "pool"])
def test_conv4_implementations_share_parameters_and_maml_meta_gradients(downsample):
  """Same parameter tree, same logits, and the same vmapped second-order MAML update either way."""
  with jax.enable_x64(True):
    models = {impl: Conv4(num_classes=3, filters=4, downsample=downsample, conv=impl)
              for impl in ("matmul", "xla")}
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 2, 16, 16, 1), jnp.float64)  # 2 tasks
    y = jnp.broadcast_to(jnp.array([0, 1]), (2, 2))
    params = {impl: m.init(jax.random.PRNGKey(3), x[0]) for impl, m in models.items()}
    assert (jax.tree_util.tree_structure(params["matmul"])
            == jax.tree_util.tree_structure(params["xla"]))
    jax.tree_util.tree_map(np.testing.assert_array_equal, params["matmul"], params["xla"])
    params = jax.tree_util.tree_map(lambda p: p.astype(jnp.float64), params["xla"])
    np.testing.assert_allclose(models["matmul"].apply(params, x[0]), models["xla"].apply(params, x[0]),
                               rtol=1e-10, atol=1e-10)

    updates = {}
    for impl, model in models.items():
      def loss_fn(p, batch, model=model):
        logits = model.apply(p, batch["x"])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]))
      learner = algorithms.maml(loss_fn, inner_steps=1, inner_lr=0.4)
      batch = {"x": x, "y": y}
      updates[impl] = jax.jit(algorithms.per_task(learner))(params, batch, batch)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10),
                           updates["matmul"], updates["xla"])


def test_conv_impl_auto_and_bad_names():
  assert resolve_conv_impl("auto") == "matmul"  # The fastest on every backend we measured.
  assert resolve_conv_impl("xla") == "xla"
  with pytest.raises(ValueError, match="conv must be one of auto, matmul, xla; got 'fft'"):
    resolve_conv_impl("fft")
