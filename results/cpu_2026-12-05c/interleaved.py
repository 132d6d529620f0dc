"""Before/after timing of the Gramian aggregators, interleaved across processes.

Sequential suite runs on this machine drifted by 20-30% between the first and the second run (even
`mean`), so this script alternates fresh processes of two checkouts, ROUNDS times each, and reports
per checkout the median over processes of each aggregator's best-of-9 time at T = 32, P = 1e6.

    PYTHONPATH=. python results/cpu_2026-12-05c/interleaved.py BEFORE_CHECKOUT AFTER_CHECKOUT
"""
import json
import os
import statistics
import subprocess
import sys

ROUNDS = 3
NAMES = ["mean", "gradient_agreement", "mgda", "upgrad", "dualproj", "cagrad", "imtl_g",
         "aligned_mtl", "nash_mtl", "krum", "pcgrad", "gradvac"]

CHILD = r"""
import json, sys, time
import jax, jax.numpy as jnp
import gajax
from gajax.aggregators import _base
x = {"w": jax.random.normal(jax.random.PRNGKey(0), (32, 1_000_000))}
fns = {"gramian (alone)": jax.jit(_base.gramian)}
for name in NAMES:
  agg = getattr(gajax.aggregators, name)(*([32] if name == "gradvac" else []))
  state = agg.init(jax.tree_util.tree_map(lambda l: l[0], x))
  fns[name] = jax.jit(lambda u, agg=agg, state=state: agg.update(u, state)[0])
out = {}
for name, fn in fns.items():
  jax.block_until_ready(fn(x))
  times = []
  for _ in range(9):
    start = time.perf_counter(); jax.block_until_ready(fn(x)); times.append(time.perf_counter() - start)
  out[name] = min(times) * 1e3
print(json.dumps(out))
"""


def run(checkout):
  env = dict(os.environ, PYTHONPATH=checkout)
  code = f"NAMES = {NAMES!r}\n" + CHILD
  # cwd too: `python -c` puts the working directory ahead of PYTHONPATH on sys.path.
  return json.loads(subprocess.run([sys.executable, "-c", code], env=env, cwd=checkout, check=True,
                                   capture_output=True, text=True).stdout.strip().splitlines()[-1])


def main():
  checkouts = sys.argv[1:3]
  results = {c: [] for c in checkouts}
  for _ in range(ROUNDS):
    for c in checkouts:
      results[c].append(run(c))
  med = {c: {k: statistics.median(r[k] for r in results[c]) for k in results[c][0]} for c in checkouts}
  before, after = checkouts
  print(f"{'':20s} {'before ms':>10s} {'x mean':>7s} {'after ms':>10s} {'x mean':>7s} {'before/after':>12s}")
  for k in med[after]:
    b, a = med[before][k], med[after][k]
    print(f"{k:20s} {b:10.1f} {b / med[before]['mean']:6.1f}x {a:10.1f} {a / med[after]['mean']:6.1f}x {b / a:12.2f}")
  for c in checkouts:  # which code each process ran
    print(c, subprocess.run(["git", "-C", c, "describe", "--always", "--dirty"], capture_output=True,
                            text=True).stdout.strip())
  print(json.dumps({"rounds": ROUNDS, "checkouts": checkouts, "raw": results}))


if __name__ == "__main__":
  main()
