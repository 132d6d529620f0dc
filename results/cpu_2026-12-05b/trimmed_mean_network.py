"""Compile time, XLA temporaries and run time of trimmed_mean_leaf (trim 2) at T tasks, P columns, with the
error against NumPy. Run: PYTHONPATH=. python results/cpu_2026-12-05b/trimmed_mean_network.py 64 5e5
BUILD's T = 64 figures were taken while gajax.aggregators._rows.MAX_NETWORK_TASKS was 128, so that 64
tasks went through the network; with the shipped 32, T > 32 takes jnp.sort.
"""
import sys, time, resource, jax, jax.numpy as jnp, numpy as np
from gajax.aggregators.trimmed_mean import trimmed_mean_leaf
T = int(sys.argv[1]); P = int(float(sys.argv[2]))
x = jax.random.normal(jax.random.PRNGKey(0), (T, P))
f = jax.jit(lambda x: trimmed_mean_leaf(x, 2))
s = time.perf_counter(); c = f.lower(x).compile(); print("compile", time.perf_counter()-s)
ma = c.memory_analysis(); print("temp MB", ma.temp_size_in_bytes/1e6)
r = c(x); jax.block_until_ready(r)
ts=[]
for _ in range(3):
  s=time.perf_counter(); jax.block_until_ready(c(x)); ts.append(time.perf_counter()-s)
print(T, P, "ms", 1e3*np.median(ts), "maxrss GB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1e6)
ref = np.sort(np.asarray(x), 0)[2:T-2].mean(0); print("err", np.abs(np.asarray(r)-ref).max())
