"""numpy twins of QArray operations (pack, unpack, expand per-tile values, dequantize).

Same integer / float32 operations as ``jq.numerics`` and :class:`jq.qarray.QArray`, without JAX
dispatch or compilation per shape; used by the GGUF and compressed-tensors codecs.
"""
from __future__ import annotations

import numpy as np

from jq.qarray import QArray
from jq.qtypes import QType


def _expand_np(t: np.ndarray, tile: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
  """numpy twin of ``numerics.expand`` (per-tile values -> logical shape, partial last tile)."""
  for axis, (tl, s) in enumerate(zip(tile, shape)):
    if t.shape[axis] != 1:
      t = np.repeat(t, tl, axis=axis)[(slice(None),) * axis + (slice(0, s),)]
  return np.broadcast_to(t, shape)


def _pack_np(v: np.ndarray, qtype: QType) -> np.ndarray:
  """numpy twin of ``numerics.pack`` (no JAX dispatch or compilation per shape)."""
  v = np.asarray(v)
  if qtype.storage_bits == 8:
    return np.ascontiguousarray(v.astype(qtype.storage_dtype))
  per, bits = qtype.per_byte, qtype.storage_bits
  u = v.astype(np.int32) & ((1 << bits) - 1)
  pad = (-u.shape[-1]) % per
  if pad:
    u = np.pad(u, [(0, 0)] * (u.ndim - 1) + [(0, pad)])
  u = u.reshape(*u.shape[:-1], u.shape[-1] // per, per)
  return np.ascontiguousarray((u << (np.arange(per, dtype=np.int32) * bits)).sum(-1)
                              .astype(np.uint8))


def _unpacked_np(q: QArray) -> np.ndarray:
  """numpy twin of ``QArray.unpacked()``: integer values in logical shape."""
  packed = np.asarray(q.values)
  qt = q.qtype
  if qt.storage_bits == 8:
    return packed.reshape(q.shape)
  per, bits = qt.per_byte, qt.storage_bits
  v = (packed.astype(np.int32)[..., None] >> (np.arange(per, dtype=np.int32) * bits)) & (
      (1 << bits) - 1)
  if qt.signed:
    v = np.where(v >= (1 << (bits - 1)), v - (1 << bits), v)
  v = v.reshape(*packed.shape[:-1], packed.shape[-1] * per)[..., :q.shape[-1]]
  return v.astype(qt.unpacked_dtype).reshape(q.shape)


def _dequantize_np(q: QArray) -> np.ndarray:
  """numpy twin of ``QArray.dequantize(float32)`` (same float32 operations, no JAX compilation)."""
  v = _unpacked_np(q)
  s = _expand_np(np.asarray(q.scale).astype(np.float32), q.tile, q.shape)
  if q.qtype.is_table:
    from jq.qtypes import NF4_TABLE
    return NF4_TABLE[v.astype(np.int32)] * s
  x = v.astype(np.float32)
  if q.zero_point is not None:
    x = x - _expand_np(np.asarray(q.zero_point).astype(np.float32), q.tile, q.shape)
  return x * s
