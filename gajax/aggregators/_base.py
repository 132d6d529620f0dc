"""Shared pieces of every aggregator: input validation and float32 reductions over stacked pytrees.

A *stacked* pytree holds one update per task: every leaf has shape ``[T, *param_shape]`` with the same
task count ``T >= 1``. Aggregators reduce it to a parameter-shaped pytree. All reductions over the
parameter axis accumulate in float32 (``preferred_element_type``), so bfloat16 and float16 leaves give
the same weights as their float32 copies would, up to the rounding of the inputs themselves.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

PyTree = Any


def _leaf_name(path) -> str:
  return jax.tree_util.keystr(path) or "<root>"


def num_tasks(updates: PyTree, *, what: str = "task updates") -> int:
  """Validates a stacked pytree and returns its task count ``T``.

  Raises:
    ValueError: with a one-line message naming the offending leaf when the tree is empty, a leaf is a
      scalar, a leaf is not floating point, the leading sizes differ, or ``T == 0``.
  """
  leaves = jax.tree_util.tree_flatten_with_path(updates)[0]
  if not leaves:
    raise ValueError(f"{what}: the pytree has no array leaves.")
  sizes = {}
  for path, leaf in leaves:
    name = _leaf_name(path)
    shape = jnp.shape(leaf)
    if len(shape) == 0:
      raise ValueError(
          f"{what}: leaf {name} is a scalar; every leaf needs a leading task axis [T, ...].")
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      raise ValueError(
          f"{what}: leaf {name} has dtype {jnp.result_type(leaf)}; updates must be floating point.")
    sizes.setdefault(shape[0], name)
  if len(sizes) > 1:
    detail = ", ".join(f"{name} has {size}" for size, name in sizes.items())
    raise ValueError(f"{what}: leaves disagree on the leading task axis ({detail}).")
  (t,) = sizes
  if t == 0:
    raise ValueError(f"{what}: the task axis is empty (T = 0); need at least one task.")
  return t


def _flat(leaf: jax.Array) -> jax.Array:
  return jnp.reshape(leaf, (leaf.shape[0], -1))


def max_abs(updates: PyTree) -> jax.Array:
  """Largest absolute entry over the whole stacked pytree, as a float32 scalar."""
  return jnp.max(jnp.stack([jnp.max(jnp.abs(leaf)).astype(jnp.float32)
                            for leaf in jax.tree_util.tree_leaves(updates)]))


def task_sum(updates: PyTree, scale: jax.Array | float = 1.0) -> PyTree:
  """``G = scale * sum_i g_i`` per leaf, in float32. Shapes: ``[T, *s] -> [*s]``.

  Written as a product with a vector of ones: XLA's CPU backend runs ``jnp.sum(x, axis=0)`` over a
  ``[32, 1e6]`` array about 50x slower than the equivalent matrix-vector product (BUILD.md).
  """
  t = jax.tree_util.tree_leaves(updates)[0].shape[0]
  # The scale rides in the weight vector, so scale * g_i is formed before the sum can overflow.
  weights = jnp.full((t,), 1.0, jnp.float32) * scale
  return jax.tree_util.tree_map(
      lambda leaf: jnp.tensordot(weights, leaf, axes=1, preferred_element_type=jnp.float32), updates)


def inner_products(updates: PyTree, direction: PyTree) -> jax.Array:
  """``<g_i, d>`` for every task, summed over all leaves, in float32. Returns shape ``[T]``."""
  parts = [
      jnp.einsum("tp,p->t", _flat(g), jnp.ravel(d), preferred_element_type=jnp.float32)
      for g, d in zip(jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(direction))
  ]
  return sum(parts[1:], parts[0])


# Columns per block of the CPU reductions below (_leaf_gramian, _leaf_combination): a [32, 4096]
# float32 block is 512 KiB.
CPU_GRAMIAN_BLOCK = 4096
# Rows per group of a block's Gramian on CPU (_symmetric_gramian): one AVX2 register of float32.
CPU_GRAMIAN_ROW_GROUP = 8
# From 9 up to this many tasks a block's Gramian is built from its groups' products on and below the
# diagonal; above it the one product was as fast (T = 128) and the unrolled products many.
CPU_GRAMIAN_SYMMETRIC_MAX_TASKS = 64
# At most this many group products per Gramian, over all leaves (the largest leaves first; the others
# keep one product per block): each product in the program added ~4 ms of compile time, and a model
# with many leaves at T = 64 (36 products a leaf) would otherwise compile for seconds longer.
CPU_GRAMIAN_MAX_GROUP_PRODUCTS = 256


def _on_cpu_in_blocks(flat: jax.Array, whole, blocked):
  """``whole(flat)`` on one product, or, on CPU when ``flat`` ``[T, p]`` spans at least two blocks
  of :data:`CPU_GRAMIAN_BLOCK` columns, ``blocked(flat, blocks, tail)``."""
  blocks, tail = divmod(flat.shape[1], CPU_GRAMIAN_BLOCK)
  if blocks < 2:
    return whole(flat)
  return jax.lax.platform_dependent(flat, cpu=lambda f: blocked(f, blocks, tail), default=whole)


def _column_block(flat: jax.Array, i) -> jax.Array:
  return jax.lax.dynamic_slice_in_dim(flat, i * CPU_GRAMIAN_BLOCK, CPU_GRAMIAN_BLOCK, axis=1)


def _group_products(t: int) -> int:
  """Products per block of :func:`_symmetric_gramian` for ``t`` tasks; 0 where it is not used."""
  if t <= CPU_GRAMIAN_ROW_GROUP or t > CPU_GRAMIAN_SYMMETRIC_MAX_TASKS:
    return 0
  n = -(-t // CPU_GRAMIAN_ROW_GROUP)
  return n * (n + 1) // 2


def _symmetric_gramian(block: jax.Array) -> jax.Array:
  """``B B^T`` (float32 ``[T, T]``) from the products of the row groups of ``B`` (``T x c``) on or
  below the diagonal, mirrored above it: groups of :data:`CPU_GRAMIAN_ROW_GROUP` rows (the last one
  shorter), so ``n (n + 1) / 2`` products of ``n = ceil(T / 8)`` groups instead of ``n^2`` worth.

  XLA:CPU runs each block's ``[T, c] x [c, T]`` product on one core (the same time pinned to one
  core as on two); at T = 32 the 10 group products take 0.70x its time, at T = 25 0.61x, T = 64
  0.55x, T = 128 0.97x (BUILD.md, "Gramian aggregators: symmetric blocks"). Every entry is the same
  sum over the block's columns as in the one product, so the two agree to float32 rounding. (The
  diagonal groups' own products need not come out bit-symmetric; :func:`_leaf_gramian` mirrors the
  accumulated lower triangle.)
  """
  size = CPU_GRAMIAN_ROW_GROUP
  groups = [block[a:a + size] for a in range(0, block.shape[0], size)]
  below = {(i, j): jnp.einsum("tp,sp->ts", groups[i], groups[j], preferred_element_type=jnp.float32)
           for i in range(len(groups)) for j in range(i + 1)}
  return jnp.block([[below[i, j] if j <= i else below[j, i].T for j in range(len(groups))]
                    for i in range(len(groups))])


def _leaf_gramian(flat: jax.Array, prepare=None, row_groups: bool = False) -> jax.Array:
  """``[T, T]`` float32 Gramian ``B B^T`` of ``B = prepare(flat)`` (``prepare`` acts on columns
  independently, e.g. a per-row scale; ``None``: ``B = flat``), accumulated in float32.

  On CPU, a leaf of at least two blocks of :data:`CPU_GRAMIAN_BLOCK` columns is contracted block by
  block in a ``fori_loop``, each block prepared and multiplied while it is in cache: XLA:CPU runs the
  single ``[T, p] x [p, T]`` product (a 32 x 32 result over a contraction of a million) at 7-8
  GFLOP/s, the blocked loop at about 28 on the same loaded 2-core machine, 3.5-4x faster (BUILD.md,
  "Gramian aggregators"), and ``prepare`` never writes a ``[T, p]`` copy (on this machine writing a
  fresh 128 MB array costs about 13x ``mean``). With ``row_groups`` each whole block's Gramian is
  built from 8-row groups on and below the diagonal (:func:`_symmetric_gramian`; the tail block takes
  one product) and the result's lower triangle is mirrored, so it is exactly symmetric. Smaller
  leaves, and other platforms (GPU, TPU), take the one product. All sum the same terms in different
  orders: they agree to float32 rounding.
  """
  prepare = prepare or (lambda block: block)

  def product(block):
    block = prepare(block)
    return jnp.einsum("tp,sp->ts", block, block, preferred_element_type=jnp.float32)

  def blocked(flat, blocks, tail):
    t = flat.shape[0]
    block_gramian = (lambda block: _symmetric_gramian(prepare(block))) if row_groups else product
    acc = jax.lax.fori_loop(0, blocks, lambda i, acc: acc + block_gramian(_column_block(flat, i)),
                            jnp.zeros((t, t), jnp.float32))
    if tail:
      acc = acc + product(flat[:, blocks * CPU_GRAMIAN_BLOCK:])
    return jnp.tril(acc) + jnp.tril(acc, -1).T if row_groups else acc

  return _on_cpu_in_blocks(flat, product, blocked)


def _leaf_combination(flat: jax.Array, weights: jax.Array, prepare) -> jax.Array:
  """``sum_i weights[i] prepare(flat)[i]``, float32 ``[p]``, accumulated in float32; like
  :func:`_leaf_gramian`, block by block on CPU so that ``prepare`` never writes a ``[T, p]`` copy."""
  def product(block):
    return jnp.tensordot(weights, prepare(block), axes=1, preferred_element_type=jnp.float32)

  def blocked(flat, blocks, tail):
    def body(i, out):
      return jax.lax.dynamic_update_slice_in_dim(out, product(_column_block(flat, i)),
                                                 i * CPU_GRAMIAN_BLOCK, axis=0)
    out = jax.lax.fori_loop(0, blocks, body, jnp.zeros((flat.shape[1],), jnp.float32))
    if tail:
      out = out.at[blocks * CPU_GRAMIAN_BLOCK:].set(product(flat[:, blocks * CPU_GRAMIAN_BLOCK:]))
    return out

  return _on_cpu_in_blocks(flat, product, blocked)


def _row_group_leaves(flats: list[jax.Array]) -> list[bool]:
  """Which leaves' blocks take :func:`_symmetric_gramian`: the blocked ones (at least two blocks of
  columns), largest first, while the program stays within :data:`CPU_GRAMIAN_MAX_GROUP_PRODUCTS`."""
  chosen = [False] * len(flats)
  per_leaf = _group_products(flats[0].shape[0])
  if not per_leaf:
    return chosen
  budget = CPU_GRAMIAN_MAX_GROUP_PRODUCTS
  for i in sorted(range(len(flats)), key=lambda i: -flats[i].shape[1]):
    if flats[i].shape[1] >= 2 * CPU_GRAMIAN_BLOCK and per_leaf <= budget:
      chosen[i], budget = True, budget - per_leaf
  return chosen


def _gramian(updates: PyTree, prepare=None) -> jax.Array:
  flats = [_flat(leaf) for leaf in jax.tree_util.tree_leaves(updates)]
  parts = [_leaf_gramian(flat, prepare, grouped)
           for flat, grouped in zip(flats, _row_group_leaves(flats))]
  return sum(parts[1:], parts[0])


def gramian(updates: PyTree) -> jax.Array:
  """The ``[T, T]`` Gramian ``sum over leaves of g g^T``, accumulated in float32."""
  return _gramian(updates)


def weighted_sum(updates: PyTree, weights: jax.Array) -> PyTree:
  """``sum_i w_i g_i`` per leaf, accumulated in float32 and cast back to the leaf's dtype.

  Shapes: ``updates`` leaves ``[T, *s]``, ``weights`` ``[T]`` -> leaves ``[*s]``.
  """
  weights = weights.astype(jnp.float32)
  return jax.tree_util.tree_map(
      lambda leaf: jnp.tensordot(weights, leaf, axes=1,
                                 preferred_element_type=jnp.float32).astype(leaf.dtype),
      updates)


def renormalize_masked(weights: jax.Array, task_mask: jax.Array) -> jax.Array:
  """Zeroes the weights of masked-out tasks and rescales the rest to keep ``sum_i |w_i|``.

  With no task left the weights are all zero (a zero update), never NaN.
  """
  kept = jnp.where(task_mask, weights, 0.0)
  mass, kept_mass = jnp.sum(jnp.abs(weights)), jnp.sum(jnp.abs(kept))
  return jnp.where(kept_mass > 0, kept * (mass / jnp.where(kept_mass > 0, kept_mass, 1.0)), 0.0)


def from_weights_fn(weights_fn) -> optax.GradientTransformationExtraArgs:
  """Builds a stateless aggregator ``sum_i w_i g_i`` from ``weights_fn(updates) -> w`` of shape ``[T]``.

  Extra keyword arguments of ``update`` are accepted and ignored, so that scripts can pass the same
  arguments (such as ``agreement_signal``) whichever aggregator they hold, except ``task_mask``
  (bool ``[T]``, see :func:`gajax.aggregators.skip_nonfinite_tasks`): masked-out tasks get weight 0
  and the others are rescaled to keep ``sum_i |w_i|`` (the mean over the kept tasks, for ``mean``).
  """

  def update_fn(updates, state, params=None, *, task_mask=None, **extra_args):
    del params, extra_args
    num_tasks(updates)
    weights = weights_fn(updates)
    if task_mask is not None:
      weights = renormalize_masked(weights, task_mask)
    return weighted_sum(updates, weights), state

  return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)


def normalized_gramian(updates: PyTree, scale: jax.Array | None = None) -> jax.Array:
  """The float32 ``[T, T]`` Gramian of ``g_i / s`` for the power of two ``s = power_of_two_scale(m)``,
  ``m = max_abs(updates)`` (``s = 1`` if ``m`` is 0 or not finite), or for the given ``scale``.

  For weights that are invariant to a common positive scale of all ``g_i`` (projections, cosines),
  this is the Gramian to use: the entries of ``g_i / s`` lie in ``(-1, 1)`` (``(-4, 4)`` for peaks
  above ``2^126``, where ``s`` is capped) and those of the Gramian in ``[-P, P]`` (``16 P``), so
  inputs of size 1e+30 do not overflow float32 and inputs of size 1e-30 do not underflow to zero.
  ``s`` is a power of two so that the division is an exact multiplication by ``1 / s`` as each block
  is read (a division per entry cost about a fifth of the Gramian's time on CPU; BUILD.md, "Gramian
  aggregators: symmetric blocks").
  """
  if scale is None:
    scale = power_of_two_scale(max_abs(updates))
  inverse = 1.0 / jnp.asarray(scale, jnp.float32)
  return _gramian(updates, lambda block: block.astype(jnp.float32) * inverse)


def power_of_two_scale(peak: jax.Array) -> jax.Array:
  """Elementwise power of two ``s = 2^e`` with ``peak / s`` in ``[0.5, 1)`` (``s = 1`` where ``peak`` is
  zero or not finite), float32.

  Dividing by such an ``s`` is exact in every binary float format (no rounding), so weights computed
  from rescaled inputs are bit-for-bit those of ``2^k`` times the inputs. ``e`` is clipped to
  ``[-125, 126]`` so that both ``s`` and ``1/s`` are normal float32 numbers (no flush-to-zero).
  """
  peak = jnp.asarray(peak, jnp.float32)
  _, exponent = jnp.frexp(peak)
  exponent = jnp.clip(exponent, -125, 126)
  ok = (peak > 0) & jnp.isfinite(peak)
  return jnp.where(ok, jnp.ldexp(jnp.ones_like(peak), exponent), 1.0)


def task_max_abs(updates: PyTree) -> jax.Array:
  """Largest absolute entry of each task's update over the whole pytree: float32 ``[T]``."""
  per_leaf = [jnp.max(jnp.abs(_flat(leaf)), axis=1).astype(jnp.float32)
              for leaf in jax.tree_util.tree_leaves(updates)]
  return jnp.max(jnp.stack(per_leaf), axis=0)


def _scale_rows(leaf: jax.Array, factors: jax.Array) -> jax.Array:
  dtype = leaf.dtype if jnp.finfo(leaf.dtype).maxexp >= 128 else jnp.float32
  shape = (leaf.shape[0],) + (1,) * (leaf.ndim - 1)
  return leaf.astype(dtype) * jnp.reshape(factors, shape).astype(dtype)


def scale_tasks(updates: PyTree, factors: jax.Array) -> PyTree:
  """``factors[i] * g_i`` per leaf, for powers of two ``factors`` of shape ``[T]`` (exact, no rounding).

  Leaves keep their dtype when it has float32's exponent range (float32, bfloat16, float64); narrower
  ones (float16) are promoted to float32 so that the factor itself is representable.
  """
  return jax.tree_util.tree_map(lambda leaf: _scale_rows(leaf, factors), updates)


def scaled_gramian(updates: PyTree, factors: jax.Array) -> jax.Array:
  """``gramian(scale_tasks(updates, factors))`` without writing the scaled copy on CPU: each block of
  columns is scaled as the Gramian reads it (:func:`_leaf_gramian`)."""
  return _gramian(updates, lambda block: _scale_rows(block, factors))


def _leaf_row_sums(flat: jax.Array, row_sums, vector: jax.Array | None = None) -> jax.Array:
  """``row_sums(flat, vector)`` (``[T, p], [p] or None -> [T]``, a sum over columns), on CPU block by
  block over columns with the matching slice of ``vector``, so that nothing ``[T, p]``-sized is written."""
  def part(start, size):  # the slice of vector matching columns [start, start + size)
    return None if vector is None else jax.lax.dynamic_slice_in_dim(vector, start, size)

  def blocked(flat, blocks, tail):
    def body(i, acc):
      return acc + row_sums(_column_block(flat, i), part(i * CPU_GRAMIAN_BLOCK, CPU_GRAMIAN_BLOCK))
    acc = jax.lax.fori_loop(0, blocks, body, jnp.zeros((flat.shape[0],), jnp.float32))
    start = blocks * CPU_GRAMIAN_BLOCK
    return acc + row_sums(flat[:, start:], part(start, tail)) if tail else acc

  return _on_cpu_in_blocks(flat, lambda f: row_sums(f, vector), blocked)


def scaled_inner_products(updates: PyTree, direction: PyTree, factors: jax.Array) -> jax.Array:
  """``inner_products(scale_tasks(updates, factors), direction)`` without writing the scaled copy on
  CPU: each block of columns is scaled as it is read. Float32 ``[T]``."""
  def dots(block, d):
    return jnp.einsum("tp,p->t", _scale_rows(block, factors), d, preferred_element_type=jnp.float32)

  parts = [_leaf_row_sums(_flat(g), dots, jnp.ravel(d))
           for g, d in zip(jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(direction))]
  return sum(parts[1:], parts[0])


def scaled_sq_norms(updates: PyTree, factors: jax.Array) -> jax.Array:
  """``|factors[i] g_i|^2`` over the whole pytree, float32 ``[T]``, block by block on CPU (as one
  fused reduction XLA wrote the broadcast factors out as a ``[T, p]`` array)."""
  def sq_norms(block, _):
    return jnp.sum(jnp.square(_scale_rows(block, factors).astype(jnp.float32)), axis=1)

  parts = [_leaf_row_sums(_flat(leaf), sq_norms) for leaf in jax.tree_util.tree_leaves(updates)]
  return sum(parts[1:], parts[0])


def scaled_weighted_sum(updates: PyTree, weights: jax.Array, factors: jax.Array) -> PyTree:
  """``cast_like(weighted_sum(scale_tasks(updates, factors), weights), updates)`` without writing
  the scaled copy on CPU (:func:`_leaf_combination`). Not ``weighted_sum(updates, weights *
  factors)``: with tasks 2^127 apart in size that coefficient overflows (UPGrad) or underflows (MGDA),
  where ``weights[i] * (factors[i] g_i)`` keeps every factor in range."""
  weights = weights.astype(jnp.float32)
  return jax.tree_util.tree_map(
      lambda leaf: jnp.reshape(_leaf_combination(_flat(leaf), weights,
                                                 lambda block: _scale_rows(block, factors)),
                               leaf.shape[1:]).astype(leaf.dtype),
      updates)


def cast_like(tree: PyTree, like: PyTree) -> PyTree:
  """Casts every leaf of ``tree`` to the dtype of the matching leaf of ``like``."""
  return jax.tree_util.tree_map(lambda x, y: x.astype(y.dtype), tree, like)


def trace_normalized(gramian: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(K / tr K, tr K)`` for a PSD ``[T, T]`` Gramian ``K`` (divided by 1 if ``tr K`` is 0 or inf).

  ``tr K = sum_i |g_i|^2`` is the squared Frobenius norm of the Jacobian, so ``K / tr K`` has
  eigenvalues in ``[0, 1]`` summing to 1 whatever the scale of the updates.
  """
  k = jnp.asarray(gramian, jnp.float32)
  tr = jnp.trace(k)
  safe = jnp.where((tr > 0) & jnp.isfinite(tr), tr, 1.0)
  return k / safe, tr


def from_gramian_weighting(weighting) -> optax.GradientTransformationExtraArgs:
  """Builds a stateless aggregator ``sum_i w_i g_i`` with ``w = weighting(K)``, ``K`` the Gramian.

  For weightings that are invariant to a common positive scale of the ``g_i``: ``K`` is taken from
  :func:`normalized_gramian` (inputs divided by the power of two just above their largest entry, so
  that 1e+30 does not overflow and 1e-30 does not underflow float32), and the weights are applied to
  the original updates. Extra keyword arguments of ``update`` are accepted and ignored.
  """

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    num_tasks(updates)
    return weighted_sum(updates, weighting(normalized_gramian(updates))), state

  return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)


def from_scaled_gramian_weighting(weighting) -> optax.GradientTransformationExtraArgs:
  """Like :func:`from_gramian_weighting`, with each task rescaled by its own power of two first.

  ``g_i = s_i h_i`` with ``s_i`` from :func:`power_of_two_scale` of the task's largest entry, so every
  ``h_i`` has its largest entry in ``[0.5, 1)``. ``weighting(K_h, s)`` gets the Gramian of the ``h_i``
  and the scales ``s`` (float32 ``[T]``) and returns weights for the ``h_i``; the output
  ``sum_i w_i h_i`` is returned in the input dtypes. Tasks whose sizes differ by many orders of
  magnitude then keep full relative precision in ``K_h``, which sign conditions such as
  ``<g_i, d> >= 0`` need.

  The extra argument ``task_mask`` (bool ``[T]``, from :func:`gajax.aggregators.skip_nonfinite_tasks`)
  is passed on as ``weighting(K_h, s, task_mask)`` (``None`` when absent); other extra keyword
  arguments are ignored.
  """

  def update_fn(updates, state, params=None, *, task_mask=None, **extra_args):
    del params, extra_args
    num_tasks(updates)
    peaks = task_max_abs(updates)
    scales = power_of_two_scale(peaks)
    # A zero task keeps scale 1 from power_of_two_scale; give it the largest scale of the others so
    # that it never sets max_i s_i or min_i s_i by itself.
    top = jnp.max(jnp.where(peaks > 0, scales, 0.0))
    scales = jnp.where(peaks > 0, scales, jnp.where(top > 0, top, 1.0))
    weights = weighting(scaled_gramian(updates, 1.0 / scales), scales, task_mask)
    return scaled_weighted_sum(updates, weights, 1.0 / scales), state

  return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)


def preference_vector(pref_vector, t: int, what: str) -> jax.Array:
  """A float32 ``[T]`` preference vector: ``1/T`` everywhere for ``None``, else ``pref_vector``.

  Raises:
    ValueError: when ``pref_vector`` does not have shape ``[T]``.
  """
  if pref_vector is None:
    return jnp.full((t,), 1.0 / t, jnp.float32)
  pref = jnp.asarray(pref_vector, jnp.float32)
  if pref.shape != (t,):
    raise ValueError(f"{what}: pref_vector has shape {pref.shape} but the updates have T={t} tasks.")
  return pref
