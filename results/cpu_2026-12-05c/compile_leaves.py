"""Compile time of the Gramian and UPGrad for a model with many blocked leaves (10 leaves of 9,000
columns), T = 32 and 64: the cost of the row-group products per leaf and of their budget.

    PYTHONPATH=. python results/cpu_2026-12-05c/compile_leaves.py
"""
import time

import jax
import jax.numpy as jnp

import gajax
from gajax.aggregators import _base


def compile_seconds(fn, tree):
  start = time.perf_counter()
  jax.jit(fn).lower(tree).compile()
  return time.perf_counter() - start


def main():
  for t in (32, 64):
    tree = {f"w{i}": jax.ShapeDtypeStruct((t, 9000), jnp.float32) for i in range(10)}
    agg = gajax.aggregators.upgrad()
    dots = jax.jit(_base.gramian).lower(tree).as_text().count("dot_general")
    print(f"T = {t}: gramian {compile_seconds(_base.gramian, tree):.2f} s ({dots} products), "
          f"upgrad {compile_seconds(lambda u: agg.update(u, agg.init(None))[0], tree):.2f} s", flush=True)


if __name__ == "__main__":
  main()
