"""The same as axis0_reductions.py at T = 8, 32, 128, 512 (T x P fixed) and for a conv kernel leaf:
matvec, jnp.sum(axis=0), the row chain, folding in halves. Run: PYTHONPATH=. python results/cpu_2026-12-05b/axis0_by_tasks.py
"""
import time, jax, jax.numpy as jnp, numpy as np, functools
def t(name, f, x, n=5):
  f = jax.jit(f); s=time.perf_counter(); r = f(x); jax.block_until_ready(r); c=time.perf_counter()-s
  ts=[]
  for _ in range(n):
    s=time.perf_counter(); jax.block_until_ready(f(x)); ts.append(time.perf_counter()-s)
  print(f"{name:30s} {1e3*np.median(ts):8.2f} ms  (first call {c:.2f}s)")
def chain(x, op=jnp.add):
  return functools.reduce(op, [x[i] for i in range(x.shape[0])])
def halving(x, op=jnp.add):
  while x.shape[0] > 1:
    h = x.shape[0] // 2
    y = op(x[:h], x[h:2*h])
    x = jnp.concatenate([y, x[2*h:]]) if x.shape[0] % 2 else y
  return x[0]
for T in (8, 32, 128, 512):
  x = jax.random.normal(jax.random.PRNGKey(0), (T, 1_000_000 * 32 // T))
  print("T", T, x.shape)
  t("matvec", lambda x: jnp.ones(x.shape[0])@x, x)
  t("sum axis0", lambda x: jnp.sum(x, 0), x, n=2)
  t("chain", chain, x)
  t("halving", halving, x)
x = jax.random.normal(jax.random.PRNGKey(0), (32, 3, 3, 64, 64))
t("5d sum axis0", lambda x: jnp.sum(x, 0), x)
t("5d chain", chain, x)
