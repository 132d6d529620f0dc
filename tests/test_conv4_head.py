"""Conv-4's head input: the flattened last feature map, or its spatial mean as MAML's Omniglot code."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gajax import models


@pytest.mark.parametrize("head_input, features", [("flatten", 2 * 2 * 8), ("mean", 8)])
def test_head_sees_what_it_says(head_input, features):
  model = models.Conv4(num_classes=3, filters=8, head_input=head_input)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 28, 28, 1))
  params = model.init(jax.random.PRNGKey(1), x)
  head = params["params"]["Dense_0"]
  assert head["kernel"].shape == (features, 3)
  logits, state = model.apply(params, x, capture_intermediates=True)
  last = jax.nn.relu(state["intermediates"]["BatchStatNorm_3"]["__call__"][0])  # [4, 2, 2, 8]
  h = jnp.mean(last, axis=(1, 2)) if head_input == "mean" else jnp.reshape(last, (4, -1))
  want = np.asarray(h, np.float64) @ np.asarray(head["kernel"], np.float64) + np.asarray(head["bias"])
  np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)


def test_unknown_head_input_is_refused():
  with pytest.raises(ValueError, match="head_input must be one of flatten, mean"):
    models.Conv4(num_classes=3, head_input="max").init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
