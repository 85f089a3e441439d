"""ggml's reference quantizers in numpy (float32 operations in the C order): float -> GGUF blocks.

Legacy 32-blocks (:func:`_reference_fields`): the formulas of ``gguf/quants.py`` (gguf-py 0.19,
bit-exact with ggml-quants.c), returning block fields instead of bytes.

K-quants: gguf-py can only dequantize them, so Q6_K and Q4_K export uses numpy ports of
ggml-quants.c's ``quantize_row_q6_K_ref`` / ``quantize_row_q4_K_ref`` (:func:`_q6_k_bytes`,
:func:`_q4_k_bytes`; float32 operations in the C order, ggml's ``nearest_int``); their bytes were
checked equal to ggml's ``ggml_quantize_chunk`` (libggml from llama-cpp-python 0.3.36 built without
FMA; a build that lets the C compiler contract ``a*b + c`` into FMA may round differently).  They
need rows that are a multiple of 256 (SmolLM2's 576-wide rows are not: llama.cpp itself falls back
to other types for those).
"""
from __future__ import annotations

import numpy as np

from jq.io.gguf.blocks import _f16_bytes, _Fields, _q6_k_block_bytes
from jq.io.gguf.types import _ASYM_QMAX, QK_K, GGMLType, GGUFExportError


def _roundf(n: np.ndarray) -> np.ndarray:
  """Round half away from zero (C ``roundf``), as gguf-py's ``np_roundf``."""
  a = abs(n)
  floored = np.floor(a)
  b = floored + np.floor(2 * (a - floored))
  return np.sign(n) * b


def _reference_fields(blocks: np.ndarray, t: GGMLType) -> _Fields:
  """gguf-py's quantization of float32 ``blocks`` (n, 32) to ``t`` (same float32 operations)."""
  blocks = np.asarray(blocks, np.float32)
  with np.errstate(divide="ignore"):
    if t is GGMLType.Q8_0:
      d = abs(blocks).max(axis=1, keepdims=True) / 127
      inv = np.where(d == 0, 0, 1 / d)
      codes = _roundf(blocks * inv).astype(np.int8)
      return _Fields(codes, d[:, 0].astype(np.float16))
    if t in (GGMLType.Q4_0, GGMLType.Q5_0):
      half = 8 if t is GGMLType.Q4_0 else 16
      imax = abs(blocks).argmax(axis=-1, keepdims=True)
      xmax = np.take_along_axis(blocks, imax, axis=-1)
      d = xmax / -half
      inv = np.where(d == 0, 0, 1 / d)
      codes = np.trunc((blocks * inv) + np.float32(half + 0.5), dtype=np.float32)
      codes = codes.astype(np.uint8).clip(0, 2 * half - 1)
      return _Fields(codes, d[:, 0].astype(np.float16))
    if t in (GGMLType.Q4_1, GGMLType.Q5_1):
      qmax = _ASYM_QMAX[t]
      hi = blocks.max(axis=-1, keepdims=True)
      lo = blocks.min(axis=-1, keepdims=True)
      d = (hi - lo) / qmax
      inv = np.where(d == 0, 0, 1 / d)
      codes = np.trunc((blocks - lo) * inv + np.float32(0.5), dtype=np.float32)
      codes = codes.astype(np.uint8).clip(0, qmax)
      return _Fields(codes, d[:, 0].astype(np.float16), lo[:, 0].astype(np.float16))
  raise GGUFExportError(f"no reference quantizer for {t.name}")


def _nearest_int(v: np.ndarray) -> np.ndarray:
  """ggml's ``nearest_int``: ``fval + 1.5·2^23`` in float32, low mantissa bits (ties to even)."""
  val = (np.asarray(v, np.float32) + np.float32(12582912.0)).view(np.int32)
  return (val & np.int32(0x007FFFFF)) - np.int32(0x00400000)


def _make_qx_quants_6(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``make_qx_quants(16, 32, x, L, rmse_type=1, NULL)`` for every row of ``x`` (S, 16) at once.

  Returns ``(scale (S,), L (S, 16) in [0, 63])``; float32 throughout, sums in element order.
  """
  f32 = np.float32
  nmax = 32
  ax = np.abs(x)
  amax = ax.max(axis=1)
  xmax = np.take_along_axis(x, ax.argmax(axis=1)[:, None], axis=1)[:, 0]
  zero = amax < f32(1e-15)
  xmax = np.where(zero, f32(1.0), xmax)
  w = x * x

  def sums(iscale):
    lq = np.clip(_nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
    lf = lq.astype(f32)
    sumlx = np.zeros(len(x), f32)
    suml2 = np.zeros(len(x), f32)
    for i in range(x.shape[1]):
      sumlx = sumlx + w[:, i] * x[:, i] * lf[:, i]
      suml2 = suml2 + w[:, i] * lf[:, i] * lf[:, i]
    return lq, sumlx, suml2

  with np.errstate(divide="ignore", invalid="ignore"):
    lq, sumlx, suml2 = sums(f32(-nmax) / xmax)
    L = lq + nmax
    scale = np.where(suml2 != 0, sumlx / suml2, f32(0.0)).astype(f32)
    best = scale * sumlx
    for step in range(-9, 10):
      if step == 0:
        continue
      iscale = -(f32(nmax) + f32(0.1) * f32(step)) / xmax
      lq, sumlx, suml2 = sums(iscale)
      better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
      L = np.where(better[:, None], lq + nmax, L)
      scale = np.where(better, sumlx / suml2, scale).astype(f32)
      best = np.where(better, scale * sumlx, best).astype(f32)
  return np.where(zero, f32(0.0), scale), np.where(zero[:, None], 0, L)


def _q6_k_bytes(rows: np.ndarray) -> np.ndarray:
  """Q6_K blocks (n, 210) of float32 rows whose length is a multiple of 256 (ggml's reference)."""
  f32 = np.float32
  x = np.asarray(rows, f32).reshape(-1, QK_K)
  nb = x.shape[0]
  scales, L = _make_qx_quants_6(x.reshape(-1, 16))
  scales, L = scales.reshape(nb, 16), L.reshape(nb, 16, 16)
  abs_s = np.abs(scales)
  max_scale = np.take_along_axis(scales, abs_s.argmax(axis=1)[:, None], axis=1)[:, 0]
  zero = abs_s.max(axis=1) < f32(1e-15)
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    iscale = f32(-128.0) / np.where(zero, f32(1.0), max_scale)
    d = (f32(1.0) / iscale).astype(np.float16)
    sc = np.minimum(127, _nearest_int(iscale[:, None] * scales)).astype(np.int8)
    dl = d.astype(f32)[:, None] * sc.astype(f32)                          # (nb, 16)
    lq = np.clip(_nearest_int(x.reshape(nb, 16, 16) / dl[:, :, None]), -32, 31) + 32
  L = np.where((dl != 0)[:, :, None], lq, L).reshape(nb, QK_K)
  out = _q6_k_block_bytes(L, sc, d)
  out[zero] = 0
  return out


def _make_qkx2_quants_4(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``make_qkx2_quants(32, 15, x, w, L, &min, Laux, -1, 0.1, 20, false)`` over rows (S, 32).

  Returns ``(scale (S,), the_min (S,) = -min, L (S, 32) in [0, 15])``.  Like the C code, the
  running ``min`` (and so ``max - min``) changes when a better candidate is found.
  """
  f32 = np.float32
  n, nmax = x.shape[1], 15
  xmin, xmax = x[:, 0].copy(), x[:, 0].copy()
  sum_w = w[:, 0].copy()
  sum_x = sum_w * x[:, 0]
  for i in range(1, n):
    xmin = np.where(x[:, i] < xmin, x[:, i], xmin)
    xmax = np.where(x[:, i] > xmax, x[:, i], xmax)
    sum_w = sum_w + w[:, i]
    sum_x = sum_x + w[:, i] * x[:, i]
  xmin = np.where(xmin > 0, f32(0.0), xmin)
  flat = xmax == xmin
  rng_ = np.where(flat, f32(1.0), xmax - xmin)
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    iscale = f32(nmax) / rng_
    scale = f32(1.0) / iscale
    L = np.clip(_nearest_int(iscale[:, None] * (x - xmin[:, None])), 0, nmax)
    best = np.zeros(len(x), f32)
    for i in range(n):
      diff = scale * L[:, i].astype(f32) + xmin - x[:, i]
      best = best + w[:, i] * (diff * diff)
    for step in range(21):
      iscale = (f32(-1.0) + f32(0.1) * f32(step) + f32(nmax)) / (xmax - xmin)
      laux = np.clip(_nearest_int(iscale[:, None] * (x - xmin[:, None])), 0, nmax)
      lf = laux.astype(f32)
      sum_l = np.zeros(len(x), f32)
      sum_l2 = np.zeros(len(x), f32)
      sum_xl = np.zeros(len(x), f32)
      for i in range(n):
        sum_l = sum_l + w[:, i] * lf[:, i]
        sum_l2 = sum_l2 + w[:, i] * lf[:, i] * lf[:, i]
        sum_xl = sum_xl + w[:, i] * lf[:, i] * x[:, i]
      D = sum_w * sum_l2 - sum_l * sum_l
      ok = D > 0
      this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
      this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
      pos = this_min > 0
      this_min = np.where(pos, f32(0.0), this_min)
      this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
      cur = np.zeros(len(x), f32)
      for i in range(n):
        diff = this_scale * lf[:, i] + this_min - x[:, i]
        cur = cur + w[:, i] * (diff * diff)
      better = ok & (cur < best) & ~flat
      L = np.where(better[:, None], laux, L)
      best = np.where(better, cur, best)
      scale = np.where(better, this_scale, scale)
      xmin = np.where(better, this_min, xmin)
  return (np.where(flat, f32(0.0), scale).astype(f32), (-xmin).astype(f32),
          np.where(flat[:, None], 0, L))


def _q4_k_bytes(rows: np.ndarray) -> np.ndarray:
  """Q4_K blocks (n, 144) of float32 rows whose length is a multiple of 256 (ggml's reference)."""
  f32 = np.float32
  x = np.asarray(rows, f32).reshape(-1, QK_K)
  nb = x.shape[0]
  xs = x.reshape(-1, 32)
  sum_x2 = np.zeros(len(xs), f32)
  for i in range(32):
    sum_x2 = sum_x2 + xs[:, i] * xs[:, i]
  av_x = np.sqrt(sum_x2 / f32(32))
  weights = av_x[:, None] + np.abs(xs)
  scales, mins, L = _make_qkx2_quants_4(xs, weights)
  scales, mins, L = scales.reshape(nb, 8), mins.reshape(nb, 8), L.reshape(nb, 8, 32)
  max_scale = np.maximum(scales.max(axis=1), f32(0.0))
  max_min = np.maximum(mins.max(axis=1), f32(0.0))
  with np.errstate(divide="ignore", invalid="ignore"):
    inv_scale = np.where(max_scale > 0, f32(63.0) / max_scale, f32(0.0))
    inv_min = np.where(max_min > 0, f32(63.0) / max_min, f32(0.0))
  ls = np.minimum(_nearest_int(inv_scale[:, None] * scales) & 0xFF, 63).astype(np.uint8)
  lm = np.minimum(_nearest_int(inv_min[:, None] * mins) & 0xFF, 63).astype(np.uint8)
  packed = np.zeros((nb, 12), np.uint8)
  packed[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
  packed[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
  packed[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
  d = (max_scale / f32(63.0)).astype(np.float16)
  dmin = (max_min / f32(63.0)).astype(np.float16)
  dl = d.astype(f32)[:, None] * ls.astype(f32)                 # sc/m read back from ``packed``
  dm = dmin.astype(f32)[:, None] * lm.astype(f32)              # equal ls/lm (both < 64)
  with np.errstate(divide="ignore", invalid="ignore"):
    lq = np.clip(_nearest_int((x.reshape(nb, 8, 32) + dm[:, :, None]) / dl[:, :, None]), 0, 15)
  L = np.where((dl != 0)[:, :, None], lq, L).astype(np.uint8).reshape(nb, 4, 2, 32)
  qs = (L[:, :, 0] | (L[:, :, 1] << np.uint8(4))).reshape(nb, 128)
  return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), packed, qs], axis=1)
