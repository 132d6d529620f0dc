"""The floor of the Gramian aggregators on this CPU: how fast the pieces run, on the cores given.

Run it as is and pinned to one core (`taskset -c 0`); the outputs are floor_2cores.txt and
floor_1core.txt beside it:

    PYTHONPATH=. python results/cpu_2026-12-05c/floor.py
    PYTHONPATH=. taskset -c 0 python results/cpu_2026-12-05c/floor.py

Times are the best of 9 after a warm-up, in ms; GFLOP/s counts 2 flops per multiply-add actually
done (the library's grouped Gramian does 10 of the 16 8x8 group products at T = 32).
"""
import time

import jax
import jax.numpy as jnp

from gajax.aggregators import _base


def best(fn, *args):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(9):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return min(times) * 1e3


def main():
  key = jax.random.PRNGKey(0)
  t, p = 32, 1_000_000
  x = jax.random.normal(key, (t, p))
  square = jax.random.normal(key, (2048, 2048))
  rows = [
      ("square 2048^3 product", jax.jit(lambda a: a @ a), (square,), 2 * 2048 ** 3),
      ("mean (one read of [32, 1e6])", jax.jit(lambda u: _base.task_sum({"w": u}, 1 / t)), (x,), 2 * t * p),
      ("task_max_abs", jax.jit(lambda u: _base.task_max_abs({"w": u})), (x,), 0),
      ("max_abs", jax.jit(lambda u: _base.max_abs({"w": u})), (x,), 0),
      ("library Gramian (blocks, 8-row groups)", jax.jit(lambda u: _base.gramian({"w": u})), (x,),
       2 * 10 * 64 * p),
      ("one [32,P]x[P,32] product", jax.jit(lambda u: u @ u.T), (x,), 2 * t * t * p),
      ("one product from a [P, 32] array", jax.jit(lambda v: v.T @ v), (x.T.copy(),), 2 * t * t * p),
      ("transpose to [P, 32], then that product", jax.jit(
          lambda u: (lambda v: v.T @ v)(jax.lax.optimization_barrier(u.T))), (x,), 2 * t * t * p),
      ("weighted_sum", jax.jit(lambda u: _base.weighted_sum({"w": u}, jnp.full((t,), 0.5))), (x,), 2 * t * p),
  ]
  print(f"devices: {jax.devices()}")
  for name, fn, args, flops in rows:
    ms = best(fn, *args)
    rate = f"{flops / ms / 1e6:7.1f} GFLOP/s" if flops else ""
    print(f"{name:42s} {ms:8.2f} ms {rate}", flush=True)


if __name__ == "__main__":
  main()
