"""Block fields and ggml's block byte layout (``block_q8_0``, ``block_q4_0``, ... ``block_q6_K``).

:class:`_Fields` holds the decoded blocks of one legacy (32-block) tensor: codes as stored, fp16
``d`` and, for the ``_1`` types, fp16 ``m``.  :func:`_encode` / :func:`_decode` convert them to and
from the bytes ggml stores; :func:`_decode_q6_k` / :func:`_decode_q3_k` unpack K-quant super-blocks
into codes and per-16 scales.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from jq.io.gguf.types import BLOCK, QK_K, GGMLType, GGUFExportError, GGUFFormatError


@dataclasses.dataclass(frozen=True)
class _Fields:
  """Decoded blocks of one tensor: ``codes`` (n, 32) as stored, fp16 ``d`` (n,), fp16 ``m`` (n,)."""
  codes: np.ndarray
  d: np.ndarray
  m: np.ndarray | None = None


def _nibbles(u: np.ndarray) -> np.ndarray:
  """Low nibble = element j, high nibble = element j + 16 (ggml's 32-element block order)."""
  return (u[:, :16] & np.uint8(0x0F)) | (u[:, 16:] << np.uint8(4))


def _high_bits(u: np.ndarray) -> np.ndarray:
  """Bit 4 of each of the 32 codes as a little-endian uint32 (4 bytes)."""
  return np.packbits((u >> np.uint8(4)).astype(np.uint8), axis=-1, bitorder="little")


def _f16_bytes(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x.astype(np.float16).reshape(-1, 1)).view(np.uint8)


def _q6_k_block_bytes(L: np.ndarray, sc: np.ndarray, d: np.ndarray) -> np.ndarray:
  """ggml's Q6_K super-block bytes ``(nb, 210)`` from 6-bit codes ``L`` (biased by 32, shape
  ``(nb, 256)``), int8 sub-block scales ``sc`` ``(nb, 16)`` and fp16-representable ``d`` ``(nb,)``.

  Per 128-value half: ``ql[l] = L[l] | L[l+64] << 4``, ``ql[l+32] = L[l+32] | L[l+96] << 4``,
  ``qh[l] = L[l]>>4 | L[l+32]>>4 << 2 | L[l+64]>>4 << 4 | L[l+96]>>4 << 6``.
  """
  nb = L.shape[0]
  L = L.astype(np.uint8).reshape(nb, 2, 4, 32)
  lo = L & np.uint8(0x0F)
  ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << np.uint8(4)),
                       lo[:, :, 1] | (lo[:, :, 3] << np.uint8(4))], axis=2).reshape(nb, 128)
  hi = L >> np.uint8(4)
  qh = (hi[:, :, 0] | (hi[:, :, 1] << np.uint8(2)) | (hi[:, :, 2] << np.uint8(4))
        | (hi[:, :, 3] << np.uint8(6))).reshape(nb, 64)
  return np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), _f16_bytes(d)], axis=1)


def _encode(f: _Fields, t: GGMLType) -> np.ndarray:
  """Block bytes (n, type_size) of decoded fields."""
  u = f.codes
  if t is GGMLType.Q8_0:
    parts = [_f16_bytes(f.d), np.ascontiguousarray(u.astype(np.int8)).view(np.uint8)]
  elif t is GGMLType.Q4_0:
    parts = [_f16_bytes(f.d), _nibbles(u)]
  elif t is GGMLType.Q4_1:
    parts = [_f16_bytes(f.d), _f16_bytes(f.m), _nibbles(u)]
  elif t is GGMLType.Q5_0:
    parts = [_f16_bytes(f.d), _high_bits(u), _nibbles(u)]
  elif t is GGMLType.Q5_1:
    parts = [_f16_bytes(f.d), _f16_bytes(f.m), _high_bits(u), _nibbles(u)]
  else:
    raise GGUFExportError(f"cannot encode blocks of {t.name}")
  return np.concatenate(parts, axis=-1)


def _decode(blocks: np.ndarray, t: GGMLType) -> _Fields:
  """Inverse of :func:`_encode` for (n, type_size) uint8 blocks."""
  n = blocks.shape[0]

  def f16(b):
    return np.ascontiguousarray(b).view(np.float16)[:, 0]

  def low_high(qs):
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)

  def bit4(qh):
    return np.unpackbits(qh, axis=-1, bitorder="little")[:, :BLOCK] << np.uint8(4)

  if t is GGMLType.Q8_0:
    return _Fields(np.ascontiguousarray(blocks[:, 2:]).view(np.int8), f16(blocks[:, :2]))
  if t is GGMLType.Q4_0:
    return _Fields(low_high(blocks[:, 2:]), f16(blocks[:, :2]))
  if t is GGMLType.Q4_1:
    return _Fields(low_high(blocks[:, 4:]), f16(blocks[:, :2]), f16(blocks[:, 2:4]))
  if t is GGMLType.Q5_0:
    return _Fields(low_high(blocks[:, 6:]) | bit4(blocks[:, 2:6]), f16(blocks[:, :2]))
  if t is GGMLType.Q5_1:
    return _Fields(low_high(blocks[:, 8:]) | bit4(blocks[:, 4:8]), f16(blocks[:, :2]),
                   f16(blocks[:, 2:4]))
  raise GGUFFormatError(f"cannot decode blocks of {t.name} (n={n})")


def _decode_q6_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Q6_K super-blocks -> (codes q-32 int8 (n, 256), per-16 scales d*sc float32 (n, 16))."""
  n = blocks.shape[0]
  ql, rest = np.hsplit(blocks, [QK_K // 2])
  qh, rest = np.hsplit(rest, [QK_K // 4])
  scales, d = np.hsplit(rest, [QK_K // 16])
  scales = np.ascontiguousarray(scales).view(np.int8).astype(np.float32)
  d = np.ascontiguousarray(d).view(np.float16).astype(np.float32)
  dl = (d * scales).reshape(n, QK_K // 16)
  ql = ql.reshape((n, -1, 1, 64)) >> np.array([0, 4], dtype=np.uint8).reshape((1, 1, 2, 1))
  ql = (ql & np.uint8(0x0F)).reshape((n, -1, 32))
  qh = qh.reshape((n, -1, 1, 32)) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape((1, 1, 4, 1))
  qh = (qh & np.uint8(0x03)).reshape((n, -1, 32))
  q = (ql | (qh << np.uint8(4))).astype(np.int8) - np.int8(32)
  return q.reshape(n, QK_K), dl


def _decode_q3_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Q3_K super-blocks -> (codes in [-4, 3] int8 (n, 256), per-16 scales float32 (n, 16))."""
  n = blocks.shape[0]
  hmask, rest = np.hsplit(blocks, [QK_K // 8])
  qs, rest = np.hsplit(rest, [QK_K // 4])
  scales, d = np.hsplit(rest, [12])
  d = np.ascontiguousarray(d).view(np.float16).astype(np.float32)
  lscales, hscales = np.hsplit(scales, [8])
  lscales = lscales.reshape((n, 1, 8)) >> np.array([0, 4], dtype=np.uint8).reshape((1, 2, 1))
  lscales = lscales.reshape((n, 16))
  hscales = hscales.reshape((n, 1, 4)) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape((1, 4, 1))
  hscales = hscales.reshape((n, 16))
  sc = (lscales & np.uint8(0x0F)) | ((hscales & np.uint8(0x03)) << np.uint8(4))
  sc = (sc.astype(np.int8) - np.int8(32)).astype(np.float32)
  dl = (d * sc).reshape(n, 16)
  ql = qs.reshape((n, -1, 1, 32)) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape((1, 1, 4, 1))
  qh = hmask.reshape(n, -1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape((1, 1, 8, 1))
  ql = ql.reshape((n, 16, QK_K // 16)) & np.uint8(3)
  qh = (qh.reshape((n, 16, QK_K // 16)) & np.uint8(1)) ^ np.uint8(1)
  q = ql.astype(np.int8) - (qh << np.uint8(2)).astype(np.int8)
  return q.reshape(n, QK_K), dl
