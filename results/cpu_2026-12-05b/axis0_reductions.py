"""Reductions over the leading axis of a [32, 1e6] float32 array on XLA:CPU (BUILD.md, "Elementwise
aggregators"): jnp.sum/max/sort over axis 0 against the row chain and mean's matrix-vector product.
Median ms. Run: PYTHONPATH=. python results/cpu_2026-12-05b/axis0_reductions.py
"""
import time, jax, jax.numpy as jnp, numpy as np
x = jax.random.normal(jax.random.PRNGKey(0), (32, 1_000_000))
def t(name, f, n=5):
  f = jax.jit(f); r = f(x); jax.block_until_ready(r)
  ts=[]
  for _ in range(n):
    s=time.perf_counter(); jax.block_until_ready(f(x)); ts.append(time.perf_counter()-s)
  print(f"{name:30s} {1e3*np.median(ts):8.2f} ms")
t("matvec ones", lambda x: jnp.ones(32)@x)
t("sum axis0", lambda x: jnp.sum(x, 0))
t("sum rows python", lambda x: sum(x[i] for i in range(32)))
t("max abs axis0", lambda x: jnp.max(jnp.abs(x), 0))
t("sign int sum", lambda x: jnp.sum(jnp.sign(x).astype(jnp.int32), 0))
t("sign f32 matvec", lambda x: jnp.ones(32)@jnp.sign(x))
t("sum axis1", lambda x: jnp.sum(x, 1))
t("uniform 1e6", lambda x: jax.random.uniform(jax.random.PRNGKey(1), x.shape[1:]))
t("sort axis0", lambda x: jnp.sort(x, 0), n=2)
t("sort axis1 of T", lambda x: jnp.sort(x.T, 1), n=2)
