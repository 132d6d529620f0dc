"""gajax.fast_ops.batchable: a user's convolutions and max-pools rewritten, the function unchanged.

The reference is the original program (``lax.conv_general_dilated``, ``nn.max_pool``, or the user's
whole Flax model through MAML), an independent implementation; comparisons are in float64. The
structural checks (no convolution left in the program) are what makes the rewrite fast under
``per_task``; its speed is measured by ``scripts/benchmark.py --suite=user_model``, not here.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax import lax

import gajax
from gajax.fast_ops import batchable, conv_as_patches

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)


def primitives(fn, *args):
  """Names of every primitive in ``fn``'s jaxpr, nested jaxprs included."""
  names = set()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      names.add(eqn.primitive.name)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return names


CONV_CASES = [
    # (input shape, kernel shape, dimension numbers, strides, padding, lhs dilation, rhs dilation)
    ((2, 9, 11, 3), (3, 3, 3, 4), ("NHWC", "HWIO", "NHWC"), (2, 1), ((1, 0), (2, -1)), (1, 2), (2, 1)),
    ((2, 3, 10, 8), (5, 3, 2, 3), ("NCHW", "OIHW", "NCHW"), (1, 3), "SAME", (1, 1), (1, 1)),
    ((3, 7, 2), (3, 2, 5), ("NWC", "WIO", "NWC"), (2,), "VALID", (1,), (1,)),
    ((1, 6, 5, 4, 2), (2, 3, 2, 2, 3), ("NDHWC", "DHWIO", "NDHWC"), (1, 2, 1), "SAME", (1, 1, 1),
     (1, 1, 2)),
    ((2, 28, 28, 1), (3, 3, 1, 4), ("NHWC", "HWIO", "NHWC"), (2, 2), "SAME", (1, 1), (1, 1)),
]


@pytest.mark.parametrize("case", range(len(CONV_CASES)))
def test_conv_rewrite_matches_xla_values_and_derivatives(case):
  shape, kshape, dn, strides, padding, lhs_dil, rhs_dil = CONV_CASES[case]
  with jax.enable_x64(True):
    keys = jax.random.split(jax.random.PRNGKey(case), 3)
    x = jax.random.normal(keys[0], shape, jnp.float64)
    k = jax.random.normal(keys[1], kshape, jnp.float64)

    def conv(x, k):
      return lax.conv_general_dilated(x, k, strides, padding, lhs_dilation=lhs_dil,
                                      rhs_dilation=rhs_dil, dimension_numbers=dn)

    probe = jax.random.normal(keys[2], jax.eval_shape(conv, x, k).shape, jnp.float64)

    @jit
    def values_and_derivatives(x, k):
      out = []
      for f in (batchable(conv), conv):
        scalar = lambda x, k, f=f: jnp.sum(jnp.tanh(f(x, k)) * probe)
        # MAML's second-order term: d/dk of a function of d/dk.
        curvature = jax.grad(lambda k, scalar=scalar: jnp.sum(jax.grad(scalar, 1)(x, k) ** 2))(k)
        out.append((f(x, k), *jax.grad(scalar, (0, 1))(x, k), curvature))
      return out

    fast, ref = values_and_derivatives(x, k)
    assert "conv_general_dilated" not in primitives(batchable(conv), x, k)
    for a, b in zip(fast, ref):
      assert a.shape == b.shape
      np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("form", ["patches", "shifted"])
def test_both_forms_are_lax_conv_with_its_parameters(form):
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 7, 3), jnp.float64)
    k = jax.random.normal(jax.random.PRNGKey(1), (3, 2, 3, 5), jnp.float64)
    dn = lax.conv_dimension_numbers(x.shape, k.shape, ("NHWC", "HWIO", "NHWC"))
    kw = dict(window_strides=(1, 2), padding=((1, 1), (0, 1)), lhs_dilation=(1, 1),
              rhs_dilation=(2, 1), dimension_numbers=dn)
    ours = lambda x, k: jnp.sum(jnp.sin(conv_as_patches(x, k, form=form, **kw)))
    ref = lambda x, k: jnp.sum(jnp.sin(lax.conv_general_dilated(
        x, k, kw["window_strides"], kw["padding"], rhs_dilation=kw["rhs_dilation"],
        dimension_numbers=dn)))
    got, want = jit(jax.value_and_grad(ours, (0, 1)))(x, k), jit(jax.value_and_grad(ref, (0, 1)))(x, k)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-11)
    names = primitives(lambda x, k: conv_as_patches(x, k, form=form, **kw), x, k)
    assert ("concatenate" in names) == (form == "patches")


def test_auto_form_skips_the_patch_matrix_above_the_limit(monkeypatch):
  from gajax import fast_ops  # pylint: disable=import-outside-toplevel
  conv = lambda x, k: lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                               dimension_numbers=("NHWC", "HWIO", "NHWC"))
  x, k = jnp.ones((2, 6, 6, 3)), jnp.ones((3, 3, 3, 4))
  assert "concatenate" in primitives(batchable(conv), x, k)  # 2*6*6*27 elements: patches
  monkeypatch.setattr(fast_ops, "PATCH_LIMIT", 100)
  assert "concatenate" not in primitives(batchable(conv), x, k)


def test_max_pool_rewrite_matches_flax_values_and_gradient():
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 8, 3), jnp.float64)  # continuous: no ties
    pool = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))
    f = lambda x: jnp.sum(jnp.sin(pool(x)))
    got, want = jax.value_and_grad(batchable(f))(x), jax.value_and_grad(f)(x)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-12, atol=1e-12)
    assert "reduce_window_max" not in primitives(batchable(pool), x)


def test_what_it_cannot_rewrite_is_left_as_it_is():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 9, 4))
  depthwise = nn.Conv(4, (3, 3), feature_group_count=4)
  p = depthwise.init(jax.random.PRNGKey(1), x)

  def f(x):  # grouped convolution and an overlapping pool: not rewritten, computed as before
    return nn.max_pool(depthwise.apply(p, x), (3, 3), strides=(2, 2))

  names = primitives(batchable(f), x)
  assert {"conv_general_dilated", "reduce_window_max"} <= names
  np.testing.assert_allclose(batchable(f)(x), f(x), rtol=1e-6)


def test_nothing_to_rewrite_gives_the_same_program():
  f = lambda p, x: jnp.tanh(x @ p["w"]).sum()
  args = ({"w": jnp.ones((3, 2))}, jnp.ones((4, 3)))
  assert str(jax.make_jaxpr(batchable(f))(*args)) == str(jax.make_jaxpr(f)(*args))
  once = batchable(f)
  assert batchable(once) is once


class UserConv4(nn.Module):
  """A Conv-4 as a user writes it: linen.Conv, ReLU, nn.max_pool (MAML's mini-ImageNet shape)."""
  filters: int = 4

  @nn.compact
  def __call__(self, x):
    for _ in range(3):
      x = nn.max_pool(nn.relu(nn.Conv(self.filters, (3, 3))(x)), (2, 2), strides=(2, 2))
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


class UserNNXConv(nnx.Module):
  def __init__(self, rngs):
    self.conv1 = nnx.Conv(1, 3, (3, 3), strides=2, rngs=rngs)
    self.conv2 = nnx.Conv(3, 4, (3, 3), padding="VALID", rngs=rngs)
    self.head = nnx.Linear(4 * 4 * 4, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv2(nnx.relu(self.conv1(x))))
    return self.head(x.reshape(x.shape[0], -1))


def _tasks(key, num_tasks, size):
  kx, kq = jax.random.split(key)
  y = jnp.tile(jnp.arange(3), (num_tasks, 1))
  return ({"x": jax.random.normal(kx, (num_tasks, 3, size, size, 1), jnp.float64), "y": y},
          {"x": jax.random.normal(kq, (num_tasks, 3, size, size, 1), jnp.float64), "y": y})


@pytest.mark.parametrize("flavour", ["linen", "nnx"])
def test_user_models_under_per_task_maml_equal_the_plain_program(flavour):
  with jax.enable_x64(True):
    if flavour == "linen":
      model = UserConv4()
      params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64),
                                      model.init(jax.random.PRNGKey(0), jnp.ones((1, 12, 12, 1))))
      apply = model.apply
      size = 12
    else:
      graphdef, params = nnx.split(UserNNXConv(nnx.Rngs(0)), nnx.Param)
      params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
      apply = lambda p, x: nnx.merge(graphdef, p)(x)
      size = 11

    def loss_fn(p, batch):
      return optax.softmax_cross_entropy_with_integer_labels(apply(p, batch["x"]), batch["y"]).mean()

    supports, queries = _tasks(jax.random.PRNGKey(2), 3, size)
    learners = [gajax.algorithms.maml(loss_fn, inner_steps=1, inner_lr=0.3, fast_ops=fast)
                for fast in (True, False)]
    fast, plain = jit(lambda p: [gajax.per_task(l)(p, supports, queries) for l in learners])(params)
    for a, b in zip(jax.tree_util.tree_leaves(fast), jax.tree_util.tree_leaves(plain)):
      np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11)
    # The mechanism: no convolution (grouped under vmap) and no select-and-scatter left.
    names = primitives(lambda p: gajax.per_task(learners[0])(p, supports, queries), params)
    assert not {"conv_general_dilated", "reduce_window_max", "select_and_scatter_add"} & names
    assert "conv_general_dilated" in primitives(
        lambda p: gajax.per_task(learners[1])(p, supports, queries), params)


def test_resnet12_shape_parameters_and_fast_ops_forward():
  from gajax.models import ResNet12
  # MetaOptNet's count, from the architecture: per block 3x3 convs c->w, w->w, w->w, a 1x1 shortcut,
  # 4 batch norms (scale, bias); then a 640 -> 5 head.
  count, c = 0, 3
  for w in (64, 160, 320, 640):
    count += 9 * c * w + 2 * 9 * w * w + c * w + 4 * 2 * w
    c = w
  count += 640 * 5 + 5
  model = ResNet12(5)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((2, 84, 84, 3)))
  assert sum(int(np.prod(l.shape)) for l in jax.tree_util.tree_leaves(shapes)) == count == 12_427_525
  assert jax.eval_shape(model.apply, shapes, jnp.zeros((2, 84, 84, 3))).shape == (2, 5)
  small = ResNet12(3, widths=(2, 3, 3, 4))
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 16, 3))
  params = jit(small.init)(jax.random.PRNGKey(2), x)
  f = lambda p, x: small.apply(p, x)
  np.testing.assert_allclose(jit(batchable(f))(params, x), jit(f)(params, x), rtol=2e-5, atol=2e-5)
  assert not {"conv_general_dilated", "reduce_window_max"} & primitives(batchable(f), params, x)
