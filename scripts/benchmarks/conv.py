"""Suite ``conv``: which convolution implementation ``Conv4(conv="auto")`` should pick on this device.

Conv-4 MAML (stride-2, random Omniglot-shaped images) run as ``scripts/train.py`` runs it: jitted
``lax.scan`` blocks of ``BLOCK`` meta-steps (``jax.jit(meta.make_block(exp.step, BLOCK))``), timed per
step, with each implementation (``matmul``: patch matrix products; ``xla``: library convolutions,
grouped under ``vmap``) x mean / gradient agreement, all four interleaved. Mean rows carry the ratio
to ``matmul+mean`` (the implementation's cost), agreement rows the ratio to the same implementation's
mean (the aggregator's overhead). The ``xla`` rows also give the relative difference of the blocks'
query losses from ``matmul``'s, from the same state and keys: the two compute the same function, so
it is rounding (float32 on a CPU; TF32 on recent NVIDIA GPUs).

Workloads: 5-way 1-shot (32 tasks, 1 inner step); with ``--big`` or on an accelerator also 20-way
1-shot (16 tasks, 5 inner steps: on a CPU a block of its XLA-convolution steps takes minutes);
``--quick``: 2-way, 4 filters.
"""

import jax
import numpy as np

from benchmarks import timing
from benchmarks.common import FLAGS, log, row, timed
from benchmarks.workloads import BLOCK, meta_configs, scan_block, selected


def configs():
  """Conv-4 workloads of this suite: the stride-2 nets (MAML's Omniglot architecture)."""
  if FLAGS.quick:
    names = ("omni2w_stride",)
  elif FLAGS.big or jax.default_backend() != "cpu":
    names = ("omni5w_stride", "omni20w_stride")
  else:
    names = ("omni5w_stride",)
  return selected([w for w in meta_configs() if w.name in names])


def run(rows):
  for w in configs():
    log(f"conv: {w.describe()}: matmul vs XLA convolutions x mean vs agreement, scan blocks of "
        f"{BLOCK}, interleaved")
    contenders, blocks = {}, {}
    for conv in ("matmul", "xla"):
      for aggregator in ("mean", "gradient_agreement"):
        block, (state, data) = scan_block(w.replace(conv_impl=conv), "maml", aggregator)
        contenders[(conv, aggregator)] = (lambda s, block=block, data=data: block(s, data)[0],
                                          (state,))
        blocks[(conv, aggregator)] = (block, state, data)
    timings = {name: timing.per_call(t, BLOCK) for name, t in timed(contenders).items()}
    # Same function? Both implementations from the same state and keys: the query losses of the
    # block's steps should agree to float32 (or TF32, on GPUs) rounding.
    losses = {k: np.asarray(block(state, data)[1]["query_loss"], np.float64)
              for k, (block, state, data) in blocks.items()}
    for (conv, aggregator), t in timings.items():
      baseline = ("matmul", "mean") if aggregator == "mean" else (conv, "mean")
      rows.append(row("conv", f"{w.name} maml+{aggregator} conv={conv} (per step, blocks of "
                      f"{BLOCK})", t, workload=w.describe(), conv=conv, aggregator=aggregator,
                      its_per_s=1.0 / t.median, baseline="+".join(baseline),
                      **timing.paired_ratio(t, timings[baseline])))
      if conv != "matmul":
        # Step 1 starts from the same parameters, so only rounding separates the two (float32;
        # TF32 in both on recent NVIDIA GPUs); later steps add Adam's amplification of it.
        rel = np.abs(losses[(conv, aggregator)] - losses[("matmul", aggregator)]) / np.abs(
            losses[("matmul", aggregator)])
        rows[-1]["rel_loss_diff_vs_matmul"] = {"step_1": float(rel[0]), "max": float(np.max(rel))}
        rows[-1]["notes"] = (f"query loss vs matmul's: {rel[0]:.1e} at step 1, {np.max(rel):.1e} "
                             f"at most over {BLOCK} steps")
