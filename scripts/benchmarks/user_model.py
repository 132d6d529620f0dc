"""Suite ``user_model``: a Conv-4 written by a user in plain Flax, through gajax's public API.

The model is what a researcher writes first (issue #14): ``flax.linen`` only, 4 x [``nn.Conv(64,
(3, 3))`` ("SAME"), ReLU, ``nn.max_pool`` 2x2] and a ``Dense`` head (``pool``), or the same with
stride-2 convolutions and no pooling (``stride``); 28x28x1, 5-way 1-shot, 1 query per class, 32 tasks,
1 inner step at 0.4, second order. One meta-step is ``gajax.per_task(gajax.algorithms.maml(...))``,
``optax.chain(gajax.aggregators.mean(), optax.adam(1e-3))`` and ``optax.apply_updates`` in one
``jax.jit``, on fixed random images. Contenders, interleaved in one process:

* ``fast_ops``: the algorithms' default (``gajax.fast_ops.batchable`` rewrites the user's convolutions into
  patch products and the max-pools into reshapes);
* ``plain``: ``fast_ops=False`` (XLA's convolutions, grouped under ``vmap``; pool variant only, as it is
  slow: seconds a step on a CPU);
* ``gajax Conv4``: gajax's own ``models.Conv4`` of the same shape (``downsample`` as the variant; it
  also normalises with batch statistics, so it does a little more work);
* ``torch loop``: the user model in PyTorch, a Python loop over tasks with
  ``autograd.grad(create_graph=True)`` (learn2learn's pattern), when torch is installed.

Rows carry the ratio to ``fast_ops`` (``--quick``: the pool variant, 2-way, 8 filters, 4 tasks).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import gajax
from benchmarks import timing
from benchmarks.common import FLAGS, log, row, timed
from gajax import models

IMAGE = 28


class UserConv4(nn.Module):
  """The user's model: only ``flax.linen`` layers, nothing from gajax."""
  ways: int
  filters: int
  downsample: str

  @nn.compact
  def __call__(self, x):
    for _ in range(4):
      if self.downsample == "pool":
        x = nn.max_pool(nn.relu(nn.Conv(self.filters, (3, 3))(x)), (2, 2), strides=(2, 2))
      else:
        x = nn.relu(nn.Conv(self.filters, (3, 3), strides=(2, 2))(x))
    return nn.Dense(self.ways)(x.reshape(x.shape[0], -1))


def sizes():
  return (2, 8, 4) if FLAGS.quick else (5, 64, 32)


def data(ways, tasks):
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  y = jnp.tile(jnp.arange(ways), (tasks, 1))
  return tuple({"x": jax.random.uniform(k, (tasks, ways, IMAGE, IMAGE, 1)), "y": y} for k in keys)


def jax_step(model, fast_ops, supports, queries):
  """``(step, args)``: one jitted meta-step of ``model`` through the public API."""
  params = model.init(jax.random.PRNGKey(1), supports["x"][0])

  def loss_fn(p, batch):
    logits = model.apply(p, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

  learner = gajax.algorithms.maml(loss_fn, inner_steps=1, inner_lr=0.4, fast_ops=fast_ops)
  tx = optax.chain(gajax.aggregators.mean(), optax.adam(1e-3))

  @jax.jit
  def step(params, opt_state):
    updates = gajax.per_task(learner)(params, supports, queries)
    updates, opt_state = tx.update(updates, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step, (params, tx.init(params))


def torch_step(torch, ways, filters, downsample, supports, queries):
  """The same model and meta-step in PyTorch: a loop over tasks, second order, Adam, on
  ``--torch_device`` (cpu or cuda)."""
  F = torch.nn.functional
  gen = torch.Generator().manual_seed(0)
  params, channels, size = [], 1, IMAGE
  for _ in range(4):
    params += [torch.randn(filters, channels, 3, 3, generator=gen) / (9 * channels) ** 0.5,
               torch.zeros(filters)]
    channels, size = filters, (size // 2 if downsample == "pool" else -(-size // 2))
  params += [torch.randn(filters * size * size, ways, generator=gen) * 0.01, torch.zeros(ways)]
  dev = torch.device(FLAGS.torch_device)
  params = [p.to(dev).requires_grad_() for p in params]
  opt = torch.optim.Adam(params, lr=1e-3)
  to_torch = lambda b: (torch.from_numpy(np.asarray(b["x"]).transpose(0, 1, 4, 2, 3).copy()).to(dev),
                        torch.from_numpy(np.asarray(b["y"]).astype(np.int64)).to(dev))
  (xs, ys), (xq, yq) = to_torch(supports), to_torch(queries)

  def forward(p, x):
    for i in range(4):
      if downsample == "pool":
        x = F.max_pool2d(torch.relu(F.conv2d(x, p[2 * i], p[2 * i + 1], padding=1)), 2)
      else:
        x = torch.relu(F.conv2d(x, p[2 * i], p[2 * i + 1], stride=2, padding=1))
    return x.flatten(1) @ p[8] + p[9]

  def step():
    torch.set_num_threads(int(FLAGS.torch_threads[0]))
    opt.zero_grad()
    for i in range(xs.shape[0]):
      grads = torch.autograd.grad(F.cross_entropy(forward(params, xs[i]), ys[i]), params,
                                  create_graph=True)
      fast = [w - 0.4 * g for w, g in zip(params, grads)]
      (F.cross_entropy(forward(fast, xq[i]), yq[i]) / xs.shape[0]).backward()
    opt.step()
    if dev.type == "cuda":  # timed to completion, as block_until_ready does for JAX
      torch.cuda.synchronize()

  return step


def run(rows):
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    torch = None
    log("user_model: no PyTorch row (optional; pip install -r requirements-bench.txt).")
  ways, filters, tasks = sizes()
  supports, queries = data(ways, tasks)
  for downsample in ("pool",) if FLAGS.quick else ("pool", "stride"):
    describe = (f"user linen Conv-4/{downsample} ({filters} filters) {ways}-way 1-shot, 1 query per "
                f"class, {tasks} tasks, 1 inner step, second order")
    user = UserConv4(ways, filters, downsample)
    contenders = {"fast_ops": jax_step(user, True, supports, queries)}
    if downsample == "pool":
      contenders["plain"] = jax_step(user, False, supports, queries)
    own = models.Conv4(num_classes=ways, filters=filters, downsample=downsample)
    contenders["gajax Conv4"] = jax_step(own, True, supports, queries)
    if torch is not None:
      contenders["torch loop"] = (torch_step(torch, ways, filters, downsample, supports, queries), ())
    log(f"user_model: {describe}: {', '.join(contenders)}, interleaved")
    timings = timed(contenders)
    for name, t in timings.items():
      extra = {} if name == "fast_ops" else dict(baseline="fast_ops",
                                                 **timing.paired_ratio(t, timings["fast_ops"]))
      device = None
      if name == "torch loop":
        device = (f"{FLAGS.torch_device}: {torch.cuda.get_device_name()}, torch {torch.__version__}"
                  if FLAGS.torch_device.startswith("cuda") else
                  f"cpu: {timing.cpu_name()}, torch {torch.__version__}, {FLAGS.torch_threads[0]} "
                  "thread(s)")
      rows.append(row("user_model", f"conv4_{downsample} {name}", t, device=device,
                      workload=describe, its_per_s=1.0 / t.median, **extra))
