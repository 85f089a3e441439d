"""numpy twins of QArray operations (pack, unpack, expand per-tile values, dequantize), and the
fused projections' concatenation and split along the output axis.

Same integer / float32 operations as ``jq.numerics`` and :class:`jq.qarray.QArray` (packing is
``jq.numerics``' own, run on numpy), without JAX dispatch or compilation per shape; used by the
GGUF and compressed-tensors codecs.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

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


def _out_tiles(q: QArray, where: str) -> bool:
  """Whether ``q``'s scales are per output column (``tile[-1] == 1``; else it must be one tile
  over the whole tensor, per-tensor); raises naming ``where`` otherwise."""
  if q.tile[-1] == 1:
    return True
  if tuple(q.tile) == tuple(q.shape) or all(t >= s for t, s in zip(q.tile, q.shape)):
    return False
  raise ValueError(f"{where}: QArray(qtype={q.qtype.value}, shape={q.shape}, tile={q.tile}): "
                   "a tile spanning several output columns cannot be cut along them")


def concat_outputs(parts: list[QArray], where: str) -> QArray:
  """Kernels ``(..., N_i)`` of one grid side by side along the output axis, one QArray (a fused
  projection, Phi-3's ``qkv_proj``): the same values, scales and zero points, repacked.

  Raises:
    ValueError (naming ``where``): the parts differ in qtype, leading shape, tile, symmetry or
      activation quantization (a fused layer has one), or per-tensor scales that differ.
  """
  first = parts[0]
  desc = lambda q: (f"QArray(qtype={q.qtype.value}, shape={q.shape}, tile={q.tile}, "
                    f"{'sym' if q.zero_point is None else 'asym'})")
  for q in parts[1:]:
    if (q.qtype, q.shape[:-1], q.tile[:-1], q.zero_point is None) != (
        first.qtype, first.shape[:-1], first.tile[:-1], first.zero_point is None):
      raise ValueError(f"{where}: the fused parts differ: {desc(first)} and {desc(q)}")
    a, b = first.activation, q.activation
    if (a is None) != (b is None) or (a is not None and (a.spec != b.spec or not all(
        (x is None and y is None) or (x is not None and y is not None
                                      and np.array_equal(np.asarray(x), np.asarray(y)))
        for x, y in ((a.scale, b.scale), (a.zero_point, b.zero_point))))):
      raise ValueError(f"{where}: the fused parts quantize their shared input differently "
                       f"({a} and {b}); one fused layer has one activation scale")
  per_column = [_out_tiles(q, where) for q in parts]
  n = sum(q.shape[-1] for q in parts)
  if all(per_column):
    tile = tuple(first.tile)
    cat = lambda xs: np.concatenate([np.asarray(x) for x in xs], axis=-1)
    scale = cat([q.scale for q in parts])
    zp = None if first.zero_point is None else cat([q.zero_point for q in parts])
  elif not any(per_column) and all(
      np.array_equal(np.asarray(q.scale), np.asarray(first.scale))
      and (q.zero_point is None or np.array_equal(np.asarray(q.zero_point),
                                                  np.asarray(first.zero_point)))
      for q in parts):
    tile = (*first.tile[:-1], n)
    scale = np.asarray(first.scale)
    zp = None if first.zero_point is None else np.asarray(first.zero_point)
  else:
    raise ValueError(f"{where}: per-tensor scales that differ between the fused parts "
                     f"({[desc(q) for q in parts]}) have no one-tensor equivalent; quantize "
                     "them per channel")
  values = np.concatenate([_unpacked_np(q) for q in parts], axis=-1)
  return QArray(values=_pack_np(values, first.qtype), scale=scale, zero_point=zp,
                activation=first.activation, qtype=first.qtype,
                shape=(*first.shape[:-1], n), tile=tile)


def fuse_leaves(items: list[tuple[Any, str, Any]], name: Callable[[Any], str]
                ) -> list[tuple[Any, list[str], Any]]:
  """``(TensorName, path, leaf)`` of a decoder's leaves -> ``(TensorName, paths, leaf)``: the
  parts of each fused projection (``TensorName.rows``: Phi-3's ``qkv_proj`` / ``attn_qkv``,
  grouped by ``name(t)``, the Hugging Face or GGUF name) joined into one leaf along the output
  axis in row order (:func:`concat_outputs`, or float arrays concatenated), under the first
  part's TensorName; other leaves pass as they are.

  Raises:
    ValueError (naming the fused tensor and its parts): only some parts quantized, parts that
      :func:`concat_outputs` cannot join, or parts missing.
  """
  out, groups = [], {}
  for t, p, leaf in items:
    if t.rows is None:
      out.append((t, [p], leaf))
      continue
    group = groups.setdefault(name(t), [])
    group.append((t, p, leaf))
    if sum(g[0].rows[1] - g[0].rows[0] for g in group) != t.fused_rows:
      continue
    group.sort(key=lambda g: g[0].rows)
    paths, leaves = [g[1] for g in group], [g[2] for g in group]
    where = f"{name(t)} (params/{', params/'.join(paths)})"
    quantized = [isinstance(x, QArray) for x in leaves]
    if all(quantized):
      leaf = concat_outputs(leaves, where)
    elif not any(quantized):
      leaf = np.concatenate([np.asarray(x) for x in leaves], axis=-1)
    else:
      raise ValueError(f"{where}: the checkpoint stores these as one fused layer, but only "
                       f"{[p for p, q in zip(paths, quantized) if q]} are quantized; quantize "
                       "all or none of them (one rule for the fused layer's parts)")
    out.append((group[0][0], paths, leaf))
    del groups[name(t)]
  if groups:
    fused, parts = next(iter(groups.items()))
    raise ValueError(f"{fused}: some of its fused parts are missing from the params (have "
                     f"{[p for _, p, _ in parts]})")
  return out


def split_outputs(q: QArray, bounds: list[tuple[int, int]], where: str) -> list[QArray]:
  """Inverse of :func:`concat_outputs`: the output columns ``[start, stop)`` of each part."""
  per_column = _out_tiles(q, where)
  values = _unpacked_np(q)
  out = []
  for a, b in bounds:
    cut = lambda x: None if x is None else np.ascontiguousarray(np.asarray(x)[..., a:b])
    scale, zp = (cut(q.scale), cut(q.zero_point)) if per_column else (q.scale, q.zero_point)
    out.append(QArray(values=_pack_np(values[..., a:b], q.qtype), scale=scale, zero_point=zp,
                      activation=q.activation, qtype=q.qtype, shape=(*q.shape[:-1], b - a),
                      tile=tuple(q.tile) if per_column else (*q.tile[:-1], b - a)))
  return out
