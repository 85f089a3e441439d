"""numpy twins of QArray operations (pack, unpack, expand per-tile values, dequantize).

Same integer / float32 operations as ``jq.numerics`` and :class:`jq.qarray.QArray` (packing is
``jq.numerics``' own, run on numpy), without JAX dispatch or compilation per shape; used by the
GGUF and compressed-tensors codecs.
"""
from __future__ import annotations

import numpy as np

from jq import numerics
from jq.qarray import QArray
from jq.qtypes import QType


def _expand_np(t: np.ndarray, tile: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
  """numpy twin of ``numerics.expand`` (per-tile values -> logical shape, partial last tile)."""
  for axis, (tl, s) in enumerate(zip(tile, shape)):
    if t.shape[axis] != 1:
      t = np.repeat(t, tl, axis=axis)[(slice(None),) * axis + (slice(0, s),)]
  return np.broadcast_to(t, shape)


def _pack_np(v: np.ndarray, qtype: QType) -> np.ndarray:
  """``numerics.pack`` on the host (no JAX dispatch or compilation per shape)."""
  return np.ascontiguousarray(numerics.pack(np.asarray(v), qtype, xp=np))


def _unpacked_np(q: QArray) -> np.ndarray:
  """numpy twin of ``QArray.unpacked()``: integer values in logical shape."""
  v = numerics.unpack(np.asarray(q.values), q.qtype, q.shape[-1] if q.shape else 1, xp=np)
  return v.reshape(q.shape)


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
