"""Prints the before/after table of this folder's aggregator benchmarks (median ms, ratio to mean)."""
import json
import sys

before, after = (json.load(open(f))["rows"] for f in sys.argv[1:3])
key = lambda r: (r["aggregator"], r["num_tasks"])
old = {key(r): r for r in before}
print(f"{'aggregator':20s}   T  before ms (x mean)  after ms (x mean)  before/after")
for r in after:
  k = key(r)
  if k in old:
    b = old[k]
    print(f"{k[0]:20s} {k[1]:3d} {b['median_ms']:9.1f} ({b['ratio']:5.1f}x) {r['median_ms']:9.1f} "
          f"({r['ratio']:5.1f}x) {b['median_ms'] / r['median_ms']:6.2f}")
