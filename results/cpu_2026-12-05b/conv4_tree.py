"""Compile and run time of three coordinate-wise aggregators' jitted update on Conv-4-shaped updates.

The 14 leaves of gajax's Omniglot Conv-4 (4 x [3x3 conv 64, batch-norm scale and bias], a 256 -> 5
head), stacked for T = 32 tasks. Prints, per aggregator, the time to lower and compile
``jax.jit(tx.update)`` and the median of 5 calls after one warm-up.

    PYTHONPATH=. python results/cpu_2026-12-05b/conv4_tree.py
"""

import time

import jax
import numpy as np

from gajax.aggregators import and_mask, graddrop, trimmed_mean

SHAPES = ([(3, 3, 1, 64), (64,), (64,), (64,)] + [(3, 3, 64, 64), (64,), (64,), (64,)] * 3
          + [(256, 5), (5,)])
T = 32


def main():
  tree = {f"l{i:02d}": jax.random.normal(jax.random.PRNGKey(i), (T,) + s) for i, s in enumerate(SHAPES)}
  for name, tx in [("trimmed_mean(3)", trimmed_mean(3)), ("graddrop", graddrop(jax.random.PRNGKey(0))),
                   ("and_mask", and_mask())]:
    state = tx.init(jax.tree_util.tree_map(lambda x: x[0], tree))
    start = time.perf_counter()
    compiled = jax.jit(tx.update).lower(tree, state).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(tree, state))
    times = []
    for _ in range(5):
      start = time.perf_counter()
      jax.block_until_ready(compiled(tree, state))
      times.append(time.perf_counter() - start)
    print(f"{name:16s} compile {compile_s:5.1f} s   run {1e3 * np.median(times):8.2f} ms")


if __name__ == "__main__":
  main()
