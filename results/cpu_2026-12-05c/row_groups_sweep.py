"""The blocked Gramian's loop alone: one product per block against products of row groups.

For T tasks and P = 32e6 / T columns (blocks of C columns), times best of 3, three interleaved
rounds, the best of them: `plain` (one [T, C] x [C, T] product per block), `gG` (products of G-row
groups on and below the diagonal, mirrored), `g8 full` (all group pairs, no symmetry).

    PYTHONPATH=. python results/cpu_2026-12-05c/row_groups_sweep.py
"""
import time

import jax
import jax.numpy as jnp


def best(fn, x, n=3):
  jax.block_until_ready(fn(x))
  times = []
  for _ in range(n):
    start = time.perf_counter()
    jax.block_until_ready(fn(x))
    times.append(time.perf_counter() - start)
  return min(times) * 1e3


def product(a, b):
  return jnp.einsum("tp,sp->ts", a, b, preferred_element_type=jnp.float32)


def grouped(block, g, symmetric=True):
  t = block.shape[0]
  groups = [block[a:a + g] for a in range(0, t, g)]
  n = len(groups)
  parts = {}
  for i in range(n):
    for j in range(n if not symmetric else i + 1):
      parts[i, j] = product(groups[i], groups[j])
  return jnp.block([[parts[i, j] if (i, j) in parts else parts[j, i].T for j in range(n)]
                    for i in range(n)])


def loop(x, per_block, c):
  t = x.shape[0]
  body = lambda i, acc: acc + per_block(jax.lax.dynamic_slice_in_dim(x, i * c, c, axis=1))
  return jax.lax.fori_loop(0, x.shape[1] // c, body, jnp.zeros((t, t), jnp.float32))


def main():
  for t in (8, 20, 25, 32, 64, 128):
    p = (32_000_000 // t) // 4096 * 4096
    x = jax.random.normal(jax.random.PRNGKey(0), (t, p))
    fns = {"plain": jax.jit(lambda u: loop(u, lambda b: product(b, b), 4096))}
    for g in (8, 16):
      if g < t:
        fns[f"g{g}"] = jax.jit(lambda u, g=g: loop(u, lambda b: grouped(b, g), 4096))
    if t == 32:
      fns["g8 full"] = jax.jit(lambda u: loop(u, lambda b: grouped(b, 8, False), 4096))
      fns["g11 (3 groups)"] = jax.jit(lambda u: loop(u, lambda b: grouped(b, 11), 4096))
    times = {k: [] for k in fns}
    for _ in range(3):
      for k, fn in fns.items():
        times[k].append(best(fn, x))
    print(f"T = {t:3d}, P = {p}: " + ", ".join(f"{k} {min(v):.1f} ms" for k, v in times.items()),
          flush=True)


if __name__ == "__main__":
  main()
