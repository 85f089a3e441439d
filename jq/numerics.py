"""Low-level numerics: sub-byte packing, tiling helpers and scale expansion.

Layout conventions used everywhere in jq:

* A quantized tensor of logical shape ``S`` has a *tile* ``T`` (same rank): one scale (and zero
  point) per tile, so ``scale.shape[i] == ceil(S[i] / T[i])``.  A tile that does not divide its axis
  leaves a partial last group (as in the GPTQ reference implementation).
* Sub-byte values are packed densely along the last axis, little-end first, in units of whole
  bytes (one byte for 2/4 bits, three bytes for eight 3-bit values): value ``j`` of a unit sits in
  bits ``[j*b, (j+1)*b)`` of the unit read as a little-endian integer.  The last axis is
  zero-padded to a whole unit.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jq.qtypes import FP8_E4M3_MAX, NF4_TABLE, QType


def num_tiles(shape: Sequence[int], tile: Sequence[int]) -> tuple[int, ...]:
  """Number of tiles along each axis: ``ceil(shape[i] / tile[i])``."""
  return tuple(-(-s // t) for s, t in zip(shape, tile))


def packed_shape(shape: Sequence[int], qtype: QType) -> tuple[int, ...]:
  """Shape of the packed ``values`` array for a logical ``shape``: the last axis holds
  ``ceil(n / qtype.pack_values)`` units of ``qtype.pack_bytes`` bytes."""
  if not shape:
    return ()
  return (*shape[:-1], -(-shape[-1] // qtype.pack_values) * qtype.pack_bytes)


def pack(q: Any, qtype: QType, *, xp: Any = jnp) -> Any:
  """Packs integer values (in ``[qtype.qmin, qtype.qmax]``) along the last axis.

  8-bit types (float8 included: pass values already encoded, see :func:`fp8_encode`) are returned
  as ``qtype.storage_dtype`` unchanged; sub-byte ones as uint8, ``qtype.pack_values`` values in
  each unit of ``qtype.pack_bytes`` bytes: value ``j`` of a unit in bits ``[j*b, (j+1)*b)`` of the
  unit read as a little-endian integer (so 3-bit values cross byte boundaries).  The last unit is
  zero-padded; a scalar is one byte holding its value in the low bits.  ``xp=np`` does the same
  on host numpy arrays (no JAX dispatch or compilation per shape).
  """
  if qtype.storage_bits == 8:
    return q.astype(qtype.storage_dtype)
  per, nb, bits = qtype.pack_values, qtype.pack_bytes, qtype.storage_bits
  u = q.astype(xp.int32) & ((1 << bits) - 1)
  if u.ndim == 0:
    return u.astype(xp.uint8)
  pad = (-u.shape[-1]) % per
  if pad:
    u = xp.pad(u, [(0, 0)] * (u.ndim - 1) + [(0, pad)])
  u = u.reshape(*u.shape[:-1], u.shape[-1] // per, per)
  word = xp.sum(u << (xp.arange(per, dtype=xp.int32) * bits), axis=-1, dtype=xp.int32)
  if nb > 1:  # the unit's bytes, low byte first
    word = (word[..., None] >> (xp.arange(nb, dtype=xp.int32) * 8)) & 0xFF
    word = word.reshape(*word.shape[:-2], word.shape[-2] * nb)
  return word.astype(xp.uint8)


def unpack(packed: Any, qtype: QType, n: int, *, xp: Any = jnp) -> Any:
  """Inverse of :func:`pack`: returns ``n`` values along the last axis as int8 (signed) or uint8
  (float8 values as they are); ``xp=np`` on host numpy arrays."""
  if qtype.storage_bits == 8:
    return packed
  per, nb, bits = qtype.pack_values, qtype.pack_bytes, qtype.storage_bits
  word = packed.astype(xp.int32)
  if word.ndim == 0:  # a scalar QArray: one value in the low bits of one byte
    per, word = 1, word.reshape(1)
  elif nb > 1:
    word = word.reshape(*word.shape[:-1], word.shape[-1] // nb, nb)
    word = xp.sum(word << (xp.arange(nb, dtype=xp.int32) * 8), axis=-1, dtype=xp.int32)
  v = (word[..., None] >> (xp.arange(per, dtype=xp.int32) * bits)) & ((1 << bits) - 1)
  if qtype.signed:  # sign-extend from the storage width
    v = xp.where(v >= (1 << (bits - 1)), v - (1 << bits), v)
  v = v.reshape(*v.shape[:-2], v.shape[-2] * per)[..., :n].astype(qtype.unpacked_dtype)
  return v.reshape(()) if packed.ndim == 0 else v


def _axis_kind(s: int, t: int) -> str:
  """'g' for a grouped axis (several tiles of length > 1), 'f' for a single full tile, 'e' for
  one tile per element."""
  if t >= s:
    return "f"
  return "e" if t == 1 else "g"


def split_shape(shape: Sequence[int], tile: Sequence[int]) -> tuple[int, ...]:
  """Shape of :func:`split` output: every grouped axis ``s`` becomes ``(ceil(s / t), t)``."""
  out = []
  for s, t in zip(shape, tile):
    out.extend((-(-s // t), t) if _axis_kind(s, t) == "g" else (s,))
  return tuple(out)


def _group_positions(shape: Sequence[int], tile: Sequence[int]) -> list[tuple[int, int]]:
  """``[(axis, position of its group-interior axis in the split layout)]`` for grouped axes."""
  out, pos = [], 0
  for axis, (s, t) in enumerate(zip(shape, tile)):
    if _axis_kind(s, t) == "g":
      out.append((axis, pos + 1))
      pos += 2
    else:
      pos += 1
  return out


def _pad_end(x: jax.Array, axis: int, n: int, fill: float | str) -> jax.Array:
  """Appends ``n`` entries along one axis only (other axes, possibly sharded, are untouched)."""
  if fill == "edge":
    last = jax.lax.slice_in_dim(x, x.shape[axis] - 1, x.shape[axis], axis=axis)
    tail = jnp.broadcast_to(last, (*x.shape[:axis], n, *x.shape[axis + 1:]))
    return jnp.concatenate([x, tail], axis=axis)
  cfg = [(0, n if a == axis else 0, 0) for a in range(x.ndim)]
  return jax.lax.pad(x, jnp.asarray(fill, x.dtype), cfg)


def split(x: jax.Array, tile: Sequence[int], fill: float | str = "edge") -> jax.Array:
  """Splits every grouped axis of ``x`` into ``(groups, group_size)`` (see :func:`split_shape`).

  Axes with one scale per element or one scale overall stay as they are, so per-channel and
  per-tensor tiles cost no reshape at all.  A partial last group is padded: ``fill="edge"``
  repeats the axis' last element (min/max of the group are unchanged), a float pads with it (NaN
  for nan-aware statistics).  Reshapes split one axis at a time, which keeps shardings
  propagating (also on meshes with explicit axis types).
  """
  shape = x.shape
  for axis, _ in _group_positions(shape, tile):
    n = (-shape[axis]) % tile[axis]
    if n:
      x = _pad_end(x, axis, n, fill)
  for axis, _ in reversed(_group_positions(shape, tile)):  # earlier axes are not split yet
    n, t = -(-shape[axis] // tile[axis]), tile[axis]
    x = x.reshape(*x.shape[:axis], n, t, *x.shape[axis + 1:])
  return x


def merge(xb: jax.Array, tile: Sequence[int], shape: Sequence[int]) -> jax.Array:
  """Inverse of :func:`split`: merges group axes back and cuts the padding of partial groups.

  Axes of size 1 in ``xb`` (a single-tile axis left for broadcasting) stay size 1.
  """
  groups = _group_positions(shape, tile)
  for axis, pos in groups:  # after merging earlier groups, this group sits at ``axis``
    xb = xb.reshape(*xb.shape[:axis], xb.shape[axis] * xb.shape[axis + 1], *xb.shape[axis + 2:])
  for axis, _ in groups:
    if xb.shape[axis] != shape[axis]:
      xb = jax.lax.slice_in_dim(xb, 0, shape[axis], axis=axis)
  return xb


def tile_axes(shape: Sequence[int], tile: Sequence[int]) -> tuple[int, ...]:
  """Axes of the :func:`split` layout to reduce over for per-tile statistics (keepdims)."""
  out, pos = [], 0
  for s, t in zip(shape, tile):
    k = _axis_kind(s, t)
    if k == "g":
      out.append(pos + 1)
      pos += 2
    else:
      if k == "f":
        out.append(pos)
      pos += 1
  return tuple(out)


def stats_to_tiles(stat: jax.Array, shape: Sequence[int], tile: Sequence[int]) -> jax.Array:
  """A keepdims reduction over :func:`tile_axes` -> shape ``num_tiles(shape, tile)``."""
  pos = tuple(p for _, p in _group_positions(shape, tile))
  return jnp.squeeze(stat, axis=pos) if pos else stat


def tiles_to_split(t: jax.Array, shape: Sequence[int], tile: Sequence[int]) -> jax.Array:
  """Per-tile values (shape ``num_tiles``) -> broadcastable against the :func:`split` layout."""
  pos = tuple(p for _, p in _group_positions(shape, tile))
  return jnp.expand_dims(t, pos) if pos else t


def expand(t: jax.Array, tile: Sequence[int], shape: Sequence[int]) -> jax.Array:
  """Broadcasts per-tile values ``t`` (shape ``num_tiles(shape, tile)``) to the logical shape.

  Axes with a single tile stay size 1 (broadcasting does the rest), so per-channel and per-tensor
  scales cost nothing; group axes are broadcast as ``(groups, group_size)`` and merged (no
  ``jnp.repeat``, which keeps shardings), then cut to length (partial last group).
  """
  tb = tiles_to_split(t, shape, tile)
  target = list(tb.shape)
  for axis, pos in _group_positions(shape, tile):
    target[pos] = tile[axis]
  tb = jnp.broadcast_to(tb, tuple(target))
  return merge(tb, tile, shape)


def to_blocks(x: jax.Array, tile: Sequence[int], fill: float = float("nan")) -> jax.Array:
  """Reshapes ``x`` to ``(n0, t0, n1, t1, ...)``; a partial last tile is padded with ``fill``.

  Reductions over the odd axes then give per-tile statistics (use nan-aware reductions with the
  default NaN fill).  Prefer :func:`split`, which only splits grouped axes (cheaper, and friendly
  to sharded inputs).
  """
  tiles = num_tiles(x.shape, tile)
  pads = [(0, n * t - s) for n, t, s in zip(tiles, tile, x.shape)]
  if any(p[1] for p in pads):
    x = jnp.pad(x, pads, constant_values=jnp.asarray(fill, x.dtype))
  for axis in reversed(range(x.ndim)):  # one axis at a time (sharding rules handle single splits)
    x = x.reshape(*x.shape[:axis], tiles[axis], x.shape[axis] // tiles[axis], *x.shape[axis + 1:])
  return x


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


def nf4_decode(idx: jax.Array, dtype=jnp.float32) -> jax.Array:
  """``NF4_TABLE[idx]`` as a chain of elementwise selects: no gather, so it fuses and keeps the
  sharding of ``idx`` (a table gather fails on meshes with explicit axis types)."""
  idx = idx.astype(jnp.int32)
  out = jnp.full(idx.shape, NF4_TABLE[0], dtype)
  for k in range(1, len(NF4_TABLE)):
    out = jnp.where(idx == k, jnp.asarray(NF4_TABLE[k], dtype), out)
  return out


def nf4_encode(v: jax.Array) -> jax.Array:
  """Index of the nearest NF4 table entry for values already divided by the scale.

  Counts the table midpoints below ``v`` (15 fused compares; a value exactly on a midpoint takes
  the lower entry).
  """
  v = v.astype(jnp.float32)
  mids = (NF4_TABLE[1:] + NF4_TABLE[:-1]) / 2
  idx = jnp.zeros(v.shape, jnp.uint8)
  for m in mids:
    idx = idx + (v > np.float32(m)).astype(jnp.uint8)
  return idx


def fp8_encode(v: jax.Array) -> jax.Array:
  """float8 e4m3 values of ``v`` (already divided by the scale): ``clip(v, ±448)`` cast to
  ``float8_e4m3fn``, which rounds to nearest, ties to even.  The clip matters: the cast turns
  values beyond 448 into NaN (e4m3fn has no infinity)."""
  v = jnp.clip(v.astype(jnp.float32), -FP8_E4M3_MAX, FP8_E4M3_MAX)
  return v.astype(jnp.float8_e4m3fn)


# ---- scales ----------------------------------------------------------------------------------
# float32 scales are rounded to SCALE_BITS significant bits.  Recomputing a scale from its own
# dequantized tensor then lands back on it exactly (the float noise of ``q * s`` and of the range
# arithmetic is far below half a unit of the 20-bit grid), which makes quantize idempotent.
SCALE_BITS = 20
_F32_DROP = 24 - SCALE_BITS
_F32_MAX_SNAPPED = np.array(0x7F7FFFFF & ~((1 << _F32_DROP) - 1), np.uint32).view(np.float32)


def scale_limits(dtype) -> tuple[float, float]:
  """``(smallest, largest)`` scale jq stores in ``dtype`` (float16 allows subnormal scales)."""
  dt = jnp.dtype(dtype)
  fi = jnp.finfo(dt)
  lo = float(fi.smallest_subnormal if dt == jnp.float16 else fi.smallest_normal)
  hi = float(_F32_MAX_SNAPPED) if dt == jnp.float32 else float(fi.max)
  return lo, hi


def snap_scale(y: jax.Array, dtype) -> jax.Array:
  """The stored scale for an ideal scale ``y >= 0``: clamped to :func:`scale_limits` and rounded
  to nearest in ``dtype`` (float32: to ``SCALE_BITS`` significant bits).  NaN stays NaN, so
  ``QArray.validate`` can flag it.  (Callers give all-zero tiles scale 1 themselves: XLA on CPU
  flushes subnormals, so a tiny nonzero range can arrive here as 0.)"""
  dt = jnp.dtype(dtype)
  lo, hi = scale_limits(dt)
  y = jnp.clip(y.astype(jnp.float32), lo, hi)
  if dt == jnp.float32:
    u = jax.lax.bitcast_convert_type(y, jnp.uint32)
    u = (u + np.uint32(1 << (_F32_DROP - 1))) & np.uint32(~((1 << _F32_DROP) - 1) & 0xFFFFFFFF)
    return jax.lax.bitcast_convert_type(u, jnp.float32)
  return y.astype(dt)


def prev_scale(s: jax.Array) -> jax.Array:
  """The next smaller representable scale (one unit of the grid of :func:`snap_scale`)."""
  if s.dtype == jnp.float32:
    u = jax.lax.bitcast_convert_type(s, jnp.uint32)
    return jax.lax.bitcast_convert_type(u - np.uint32(1 << _F32_DROP), jnp.float32)
  u = jax.lax.bitcast_convert_type(s, jnp.uint16)
  return jax.lax.bitcast_convert_type(u - np.uint16(1), s.dtype)


def is_concrete(x) -> bool:
  """True when ``x`` holds values (not a tracer), so value checks can run eagerly."""
  return not isinstance(x, jax.core.Tracer)
