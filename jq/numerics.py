"""Low-level numerics: sub-byte packing, tiling helpers and scale expansion.

Layout conventions used everywhere in jq:

* A quantized tensor of logical shape ``S`` has a *tile* ``T`` (same rank): one scale (and zero
  point) per tile, so ``scale.shape[i] == ceil(S[i] / T[i])``.  A tile that does not divide its axis
  leaves a partial last group (as in the GPTQ reference implementation).
* Sub-byte values are packed along the last axis, little-end first: value ``j`` of a byte sits in
  bits ``[j*b, (j+1)*b)``.  The last axis is zero-padded to a multiple of the values per byte.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jq.qtypes import NF4_TABLE, QType


def num_tiles(shape: Sequence[int], tile: Sequence[int]) -> tuple[int, ...]:
  """Number of tiles along each axis: ``ceil(shape[i] / tile[i])``."""
  return tuple(-(-s // t) for s, t in zip(shape, tile))


def packed_shape(shape: Sequence[int], qtype: QType) -> tuple[int, ...]:
  """Shape of the packed ``values`` array for a logical ``shape``."""
  if not shape:
    return ()
  return (*shape[:-1], -(-shape[-1] // qtype.per_byte))


def pack(q: jax.Array, qtype: QType) -> jax.Array:
  """Packs integer values (in ``[qtype.qmin, qtype.qmax]``) along the last axis.

  8-bit types are returned as ``qtype.storage_dtype`` unchanged; sub-byte ones as uint8 with
  ``qtype.per_byte`` values per byte.
  """
  if qtype.storage_bits == 8:
    return q.astype(qtype.storage_dtype)
  if q.ndim == 0:
    q = q.reshape(1)
  per, bits = qtype.per_byte, qtype.storage_bits
  n = q.shape[-1]
  pad = (-n) % per
  u = q.astype(jnp.int32) & ((1 << bits) - 1)
  if pad:
    u = jnp.pad(u, [(0, 0)] * (q.ndim - 1) + [(0, pad)])
  u = u.reshape(*u.shape[:-1], u.shape[-1] // per, per)
  shifts = jnp.arange(per, dtype=jnp.int32) * bits
  return jnp.sum(u << shifts, axis=-1).astype(jnp.uint8)


def unpack(packed: jax.Array, qtype: QType, n: int) -> jax.Array:
  """Inverse of :func:`pack`: returns ``n`` values along the last axis as int8 (signed) or uint8."""
  if qtype.storage_bits == 8:
    return packed
  per, bits = qtype.per_byte, qtype.storage_bits
  b = packed.astype(jnp.int32)[..., None]
  shifts = jnp.arange(per, dtype=jnp.int32) * bits
  v = (b >> shifts) & ((1 << bits) - 1)
  if qtype.signed:  # sign-extend from the storage width
    half = 1 << (bits - 1)
    v = jnp.where(v >= half, v - (1 << bits), v)
  v = v.reshape(*packed.shape[:-1], packed.shape[-1] * per)[..., :n]
  return v.astype(qtype.unpacked_dtype)


def expand(t: jax.Array, tile: Sequence[int], shape: Sequence[int]) -> jax.Array:
  """Broadcasts per-tile values ``t`` (shape ``num_tiles(shape, tile)``) to the logical shape.

  Axes with a single tile stay size 1 (broadcasting does the rest), so per-channel and per-tensor
  scales cost nothing; group axes are repeated and cut to length (partial last group).
  """
  for axis, (tl, s) in enumerate(zip(tile, shape)):
    if t.shape[axis] != 1 and tl != 1:
      t = jnp.repeat(t, tl, axis=axis, total_repeat_length=t.shape[axis] * tl)
      if t.shape[axis] != s:
        t = jax.lax.slice_in_dim(t, 0, s, axis=axis)
  return t


def to_blocks(x: jax.Array, tile: Sequence[int], fill: float = float("nan")) -> jax.Array:
  """Reshapes ``x`` to ``(n0, t0, n1, t1, ...)``; a partial last tile is padded with ``fill``.

  Reductions over the odd axes then give per-tile statistics (use nan-aware reductions with the
  default NaN fill).
  """
  tiles = num_tiles(x.shape, tile)
  pads = [(0, n * t - s) for n, t, s in zip(tiles, tile, x.shape)]
  if any(p[1] for p in pads):
    x = jnp.pad(x, pads, constant_values=fill)
  return x.reshape([d for nt in zip(tiles, tile) for d in nt])


def tile_reduce_axes(ndim: int) -> tuple[int, ...]:
  """The tile-interior axes of a ``to_blocks`` array of a rank-``ndim`` tensor."""
  return tuple(range(1, 2 * ndim, 2))


def from_block_stats(stat: jax.Array) -> jax.Array:
  """Drops the size-1 tile axes of a keepdims reduction over ``to_blocks`` output."""
  return stat.reshape(stat.shape[0::2])


def round_half_even(x: jax.Array) -> jax.Array:
  """Round to nearest, ties to even (the rounding jq uses everywhere)."""
  return jnp.round(x)


def nf4_table(dtype=jnp.float32) -> jax.Array:
  return jnp.asarray(NF4_TABLE, dtype)


def nf4_encode(v: jax.Array) -> jax.Array:
  """Index of the nearest NF4 table entry for values already divided by the scale."""
  mids = jnp.asarray((NF4_TABLE[1:] + NF4_TABLE[:-1]) / 2, jnp.float32)
  return jnp.searchsorted(mids, v.astype(jnp.float32), side="left").astype(jnp.uint8)


def is_concrete(x) -> bool:
  """True when ``x`` holds values (not a tracer), so value checks can run eagerly."""
  return not isinstance(x, jax.core.Tracer)
