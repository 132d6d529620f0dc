"""Suite ``peers``: gajax's MAML meta-step against the same configs written in plain PyTorch.

The sinusoid MLP and 5-way 1-shot Conv-4 (stride-2 and max-pool) second-order MAML configs (mean over
tasks, then Adam; ``--configs`` picks others, ``--quick`` the two quick workloads), timed interleaved
in one process:

* gajax: ``jax.jit(exp.step)`` called per step, and jitted ``lax.scan`` blocks of ``BLOCK`` steps as
  ``scripts/train.py`` runs them (per step, with the ratio to the per-step call);
* PyTorch: a Python loop over tasks (``torch.autograd.grad(create_graph=True)``) and
  ``torch.func.vmap`` over tasks, at each ``--torch_threads``, on ``--torch_device``; each row has
  its ratio torch_ms / jax_ms to gajax's per-step call, and ``vs_scan`` to the scan blocks.

PyTorch is optional (requirements-bench.txt): without it the suite is skipped with a message.
"""

import numpy as np

from benchmarks import timing
from benchmarks.common import FLAGS, log, row, timed
from benchmarks.workloads import (BLOCK, IMAGE_SIZE, SINUSOID_HIDDEN, meta_configs, meta_step,
                                  scan_block, selected)


def configs():
  workloads = meta_configs()
  if FLAGS.quick or FLAGS.configs:
    return selected(workloads)
  return [w for w in workloads if w.name in ("sinusoid", "omni5w_stride", "omni5w_pool")]


def torch_maml(torch, w, vectorised, threads):
  """A plain PyTorch second-order MAML meta-step for workload ``w`` (mean over tasks, then Adam).

  ``vectorised=False``: a Python loop over tasks; each inner step is
  ``torch.autograd.grad(loss, fast_weights, create_graph=True)``, and each task's query loss is
  back-propagated on its own (the pattern of learn2learn's MAML examples).
  ``vectorised=True``: ``torch.func.vmap`` over tasks of ``torch.func.grad`` of the query loss after an
  inner loop of ``torch.func.grad`` steps (the closest PyTorch analogue of gajax's ``vmap``).
  Data are drawn inside the step with torch's RNG, as gajax draws them inside its jitted step. Each
  call first sets ``torch.set_num_threads(threads)``.
  """
  F = torch.nn.functional
  c = w.config
  dev = torch.device(FLAGS.torch_device)
  gen = torch.Generator(device=dev).manual_seed(0)
  on = {"device": dev}

  def sync():
    if dev.type == "cuda":
      torch.cuda.synchronize()

  if c.task == "sinusoid":
    widths = (1,) + SINUSOID_HIDDEN + (1,)
    sizes = list(zip(widths[:-1], widths[1:]))
    params = []
    for fan_in, fan_out in sizes:
      params += [torch.randn(fan_in, fan_out, generator=gen, **on) / fan_in ** 0.5, torch.zeros(fan_out, **on)]

    def forward(p, x):
      for i in range(len(sizes) - 1):
        x = torch.relu(x @ p[2 * i] + p[2 * i + 1])
      return x @ p[-2] + p[-1]

    def loss_fn(p, x, y):
      return torch.mean((forward(p, x) - y) ** 2)

    def sample():
      t = c.meta_batch_size
      amp = torch.empty(t, 1, 1, **on).uniform_(0.1, 5.0, generator=gen)
      phase = torch.empty(t, 1, 1, **on).uniform_(0.0, 2 * np.pi, generator=gen)
      x = torch.empty(t, c.shots + c.queries, 1, **on).uniform_(-5.0, 5.0, generator=gen)
      y = amp * torch.sin(x + phase)
      return x[:, :c.shots], y[:, :c.shots], x[:, c.shots:], y[:, c.shots:]
  else:
    stride = 2 if c.conv_downsample == "stride" else 1
    params, channels, size = [], 1, IMAGE_SIZE
    for _ in range(4):
      params += [torch.randn(w.filters, channels, 3, 3, generator=gen, **on) / (9 * channels) ** 0.5,
                 torch.zeros(w.filters, **on), torch.ones(w.filters, **on), torch.zeros(w.filters, **on)]
      channels = w.filters
      size = -(-size // 2) if stride == 2 else size // 2
    params += [torch.randn(w.filters * size * size, c.ways, generator=gen, **on) * 0.01,
               torch.zeros(c.ways, **on)]

    def forward(p, x):  # x: [N, 1, H, W] (NCHW, PyTorch's native layout).
      for i in range(4):
        kernel, bias, scale, shift = p[4 * i:4 * i + 4]
        x = F.conv2d(x, kernel, bias, stride=stride, padding=1)
        # Batch statistics always (MAML's transductive batch norm), as gajax's BatchStatNorm.
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        x = (x - mean) / torch.sqrt(var + 1e-5) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        x = torch.relu(x)
        if stride == 1:
          x = F.max_pool2d(x, 2)
      return x.flatten(1) @ p[16] + p[17]

    def loss_fn(p, x, y):
      return F.cross_entropy(forward(p, x), y)

    def draw(per_class):
      n = c.ways * per_class
      x = torch.rand(c.meta_batch_size, n, 1, IMAGE_SIZE, IMAGE_SIZE, generator=gen, **on)
      y = torch.arange(c.ways, **on).repeat_interleave(per_class).expand(c.meta_batch_size, n)
      return x, y

    def sample():
      return (*draw(c.shots), *draw(c.queries))

  params = [p.requires_grad_() for p in params]
  opt = torch.optim.Adam(params, lr=1e-3)
  steps, lr, t = c.inner_steps, c.inner_lr, c.meta_batch_size

  def looped():
    torch.set_num_threads(threads)
    xs, ys, xq, yq = sample()
    opt.zero_grad()
    for i in range(t):
      fast = list(params)
      for _ in range(steps):
        grads = torch.autograd.grad(loss_fn(fast, xs[i], ys[i]), fast, create_graph=True)
        fast = [w - lr * g for w, g in zip(fast, grads)]
      (loss_fn(fast, xq[i], yq[i]) / t).backward()
    opt.step()
    sync()

  from torch.func import grad, vmap  # pylint: disable=import-outside-toplevel

  def query_loss(p, xs, ys, xq, yq):
    for _ in range(steps):
      g = grad(loss_fn)(p, xs, ys)
      p = tuple(w - lr * gi for w, gi in zip(p, g))
    return loss_fn(p, xq, yq)

  per_task = vmap(grad(query_loss), in_dims=(None, 0, 0, 0, 0))

  def vectorised_step():
    torch.set_num_threads(threads)
    xs, ys, xq, yq = sample()
    meta_grads = per_task(tuple(p.detach() for p in params), xs, ys, xq, yq)
    for p, g in zip(params, meta_grads):
      p.grad = g.mean(0)
    opt.step()
    sync()

  return vectorised_step if vectorised else looped


def run(rows):
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    log("peers: skipped: PyTorch is not installed (optional; pip install -r requirements-bench.txt).")
    return [{"suite": "peers", "reason": "torch not installed"}]
  skipped = []
  flavours = {"loop": (False, "Python loop over tasks, torch.autograd.grad(create_graph=True)"),
              "vmap": (True, "torch.func.vmap over tasks of nested torch.func.grad")}
  for w in configs():
    _, jitted, args = meta_step(w, "maml", "mean")
    block, _ = scan_block(w, "maml", "mean")
    state, data = args
    contenders = {"jax": (jitted, args),
                  # As scripts/train.py runs it: lax.scan blocks of steps.
                  "jax_scan": (lambda s, block=block, data=data: block(s, data)[0], (state,))}
    for threads in FLAGS.torch_threads:
      for flavour, (vectorised, _) in flavours.items():
        name = (flavour, threads)
        fn = torch_maml(torch, w, vectorised, threads)
        try:
          fn()
        except Exception as e:  # pylint: disable=broad-except
          msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
          log(f"peers: {w.name} torch {flavour} failed, skipped: {msg}")
          skipped.append({"suite": "peers", "config": f"{w.name} torch {flavour}", "reason": msg})
          continue
        contenders[name] = (fn, ())
    log(f"peers: {w.describe()}: gajax vs PyTorch MAML (second order, Adam), interleaved")
    timings = timed(contenders)
    jax_timing = timings.pop("jax")
    rows.append(row("peers", f"{w.name} maml gajax (vmap, jit per step)", jax_timing,
                    workload=w.describe(), its_per_s=1.0 / jax_timing.median))
    scan_timing = timing.per_call(timings.pop("jax_scan"), BLOCK)
    rows.append(row("peers", f"{w.name} maml gajax (vmap, scan blocks of {BLOCK}, per step)",
                    scan_timing, workload=w.describe(), its_per_s=1.0 / scan_timing.median,
                    baseline="gajax jit per step", **timing.paired_ratio(scan_timing, jax_timing)))
    for (flavour, threads), t in timings.items():
      if FLAGS.torch_device.startswith("cuda"):
        device = f"{FLAGS.torch_device}: {torch.cuda.get_device_name()}, torch {torch.__version__}"
      else:
        device = f"cpu: {timing.cpu_name()}, torch {torch.__version__}, {threads} thread(s)"
      rows.append(row("peers", f"{w.name} maml torch {flavour} {threads}t", t, device=device,
                      workload=w.describe(), baseline="gajax", implementation=flavours[flavour][1],
                      torch_threads=threads, its_per_s=1.0 / t.median,
                      **timing.paired_ratio(t, jax_timing)))
      rows[-1]["vs_scan"] = timing.paired_ratio(t, scan_timing)
      rows[-1]["notes"] = f"{rows[-1]['vs_scan']['ratio']:.1f}x the gajax scan step"
  return skipped
