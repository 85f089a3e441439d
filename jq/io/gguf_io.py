"""GGUF (llama.cpp) export and import of jq QArrays, byte-exact with gguf-py's / ggml's quantizers.

GGUF stores a linear weight as a row-major ``(out, in)`` matrix (GGUF lists dims innermost first,
``ne = [in, out]``) cut into blocks of 32 consecutive ``in`` values; each block carries an fp16
scale ``d`` (and for the ``_1`` types an fp16 offset ``m``).  jq kernels are ``(in, out)``, so a
GGUF block is a jq group of 32 along the contracting axis (``tile = (32, 1)``).

Per GGUF type, the formulas of ``gguf/quants.py`` (gguf-py 0.19, bit-exact with ggml-quants.c) and
the jq twin (:func:`gguf_spec`, :func:`quantize_for_gguf`)::

  type  gguf quantize (per block x[0:32], float32 math)            gguf dequant      jq QArray twin
  Q8_0  d = amax/127; q = round_half_away(x * (1/d))                x = d*q           int8, zp None
  Q4_0  d = xmax/-8 (xmax: signed value of largest |x|);           x = d*(u-8)       uint4, zp 8|7
        u = clip(trunc(x * (1/d) + 8.5), 0, 15)
  Q5_0  d = xmax/-16; u = clip(trunc(x * (1/d) + 16.5), 0, 31)     x = d*(u-16)      int8 (holds 5 bit)
  Q4_1  d = (max-min)/15; m = min;                                 x = d*u + m       none (float)
        u = clip(trunc((x-min) * (1/d) + 0.5), 0, 15)
  Q5_1  as Q4_1 with 31                                            x = d*u + m       none (float)
  Q6_K  256-blocks; per 16: make_qx_quants (rmse search), int8     x = d*sc*(q-32)   int8, g16, f32 scale
        sub-scales sc = nearest(-128/max_scale * scale), d fp16       (import; export exact-fit)
  Q4_K  256-blocks; per 32: make_qkx2_quants (weighted min/scale    x = d*sc*q - dmin*m   none (float)
        search), 6-bit sc/m, fp16 d/dmin
  Q3_K  (import only) 256-blocks, 16 6-bit sub-scales, 3-bit q     x = d*(sc-32)*q   int4, g16, f32 scale

For the 32-blocks, ``d`` is computed in float32, used unrounded to pick the codes, and only then
stored as fp16; dequantization multiplies by the fp16 value.  The jq twin stores exactly that fp16 value as
its scale (``scale_dtype=float16``), so ``QArray.dequantize()`` equals ``gguf.quants.dequantize``
bit for bit (both are one exact float32 product).  Two details make the twin work:

* ``d`` may be negative (Q4_0/Q5_0 divide by ``-8``/``-16``); jq scales are positive, so the sign
  is folded into the codes: Q4_0 with ``d < 0`` stores ``15 - u`` with zero point 7 (``(u - 8)·d =
  ((15 - u) - 7)·|d|``), ``d > 0`` stores ``u`` with zero point 8.  Q5_0 (no 5-bit jq type) uses an
  int8 container holding ``±(u - 16)`` in ``[-16, 16]``.
* A block whose stored fp16 ``d`` is zero (all-zero block, or ``|x| < ~2.4e-7`` everywhere so that
  ``d`` underflows fp16) dequantizes to 0; the twin stores scale 1 with all codes at the zero point
  (jq scales must be positive).  On export such a block is written exactly as gguf writes an
  all-zero block, so bytes match gguf except in underflowing blocks, where gguf keeps meaningless
  nonzero codes next to ``d = 0`` (dequantized values are identical either way).

Q4_1/Q5_1 are min + scale: ``x = d·u + m``.  jq's asymmetric form ``(v - zp)·s`` needs ``m = -zp·d``
with an integer ``zp``, which gguf's own quantizer essentially never produces, so these tensors are
imported as exact float32 arrays (``gguf.quants.dequantize``).  The other direction works whenever
it is exact: a jq QArray (e.g. int4 symmetric, or uint4 asymmetric whose ``zp·scale`` is an fp16
value) is written as Q4_1 with ``d = scale``, ``m = -c·scale`` for an integer offset ``c``.
Q4_K/Q5_K/Q2_K/IQ* are imported as float32.

K-quants: gguf-py can only dequantize them, so Q6_K and Q4_K export uses numpy ports of
ggml-quants.c's ``quantize_row_q6_K_ref`` / ``quantize_row_q4_K_ref`` (float32 operations in the C
order, ggml's ``nearest_int``); their bytes were checked equal to ggml's ``ggml_quantize_chunk``
(libggml from llama-cpp-python 0.3.36 built without FMA; a build that lets the C compiler contract
``a*b + c`` into FMA may round differently).  They need rows that are a multiple of 256 (SmolLM2's
576-wide rows are not: llama.cpp itself falls back to other types for those).  A QArray is written
as Q6_K when its values fit exactly (e.g. one imported from Q6_K; the bytes may then differ from
the source in sign conventions, the values do not); Q4_K takes QArrays only with ``requantize``.

Export rules (:func:`encode_tensor`): a QArray is written without re-rounding when its grid is
representable in the requested type (blocks of 32 lie inside one jq tile; scales are fp16 values;
codes fit); otherwise it is refused with a ValueError naming the tensor unless ``requantize=True``,
which dequantizes and quantizes with gguf's reference.  Float arrays are quantized with the gguf
reference formulas above (bytes equal ``gguf.quants.quantize``, and ggml's C quantizers).  Int8 activation quantization
(``QArray.activation``) has no GGUF equivalent (llama.cpp quantizes activations itself) and is not
written.

Model level: :func:`export_gguf` writes a Llama-family param tree (``models/decoder.py`` layout,
float and/or QArray leaves) as a llama.cpp ``llama`` GGUF, re-applying llama.cpp's Q/K row
permutation; :func:`load_gguf_qarrays` reads any GGUF into ``{name: QArray | float32 array}``;
:func:`gguf_to_params` turns that back into the jq param tree.

Checked with llama-cpp-python 0.3.36 (optional test): exported SmolLM2 files load and run; the
perplexity of the first 1024 tokens of ``models.text.eval_text()`` is 27.99 in jq vs 28.17 in
llama.cpp for Q8_0 and 39.21 vs 39.36 for Q4_0 (llama.cpp also quantizes activations to 8 bits).

Example:
  >>> meta, _ = load_gguf_qarrays("SmolLM2-135M-Instruct.Q4_1.gguf")
  >>> export_gguf(qparams, config, tokenizer_metadata(meta), "smollm2.q8_0.gguf", "q8_0")
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf
import jax.numpy as jnp
import numpy as np

from jq.qarray import QArray
from jq.qtypes import QType
from jq.spec import Granularity, QuantSpec
from jq.tree import is_qarray, leaves_with_paths

GGMLType = gguf.GGMLQuantizationType
BLOCK = 32          # block length of the legacy types along the input axis
QK_K = gguf.QK_K    # super-block length of the K-quants

#: Types :func:`encode_tensor` and :func:`export_gguf` can write.
EXPORT_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q8_0, GGMLType.Q4_0,
                GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q4_K, GGMLType.Q6_K)
#: Types with an exact jq QArray twin (:func:`quantize_for_gguf`, :func:`gguf_spec`).
TWIN_TYPES = (GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q5_0)
#: Types imported as QArrays (others are imported as float32).
QARRAY_IMPORT_TYPES = TWIN_TYPES + (GGMLType.Q6_K, GGMLType.Q3_K)

_FLOAT_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)
_K_TYPES = (GGMLType.Q4_K, GGMLType.Q6_K)
_K_FALLBACK = {GGMLType.Q4_K: GGMLType.Q5_0, GGMLType.Q6_K: GGMLType.Q8_0}
_SYM = {GGMLType.Q8_0: (-128, 127), GGMLType.Q4_0: (-8, 7), GGMLType.Q5_0: (-16, 15)}
_ASYM_QMAX = {GGMLType.Q4_1: 15, GGMLType.Q5_1: 31}


class GGUFFormatError(ValueError):
  """A file is not a readable GGUF (bad magic, truncated, unknown tensor type, wrong sizes)."""


class GGUFExportError(ValueError):
  """A tensor or model cannot be written as the requested GGUF."""


def to_ggml_type(t: GGMLType | str | int) -> GGMLType:
  """``GGMLQuantizationType`` from an enum, its name (``"q4_0"``, ``"Q8_0"``, ``"f16"``) or value."""
  if isinstance(t, GGMLType):
    return t
  if isinstance(t, str):
    try:
      return GGMLType[t.strip().upper()]
    except KeyError:
      raise ValueError(f"unknown GGUF tensor type {t!r}; writable types are "
                       f"{[x.name.lower() for x in EXPORT_TYPES]}") from None
  try:
    return GGMLType(int(t))
  except (ValueError, TypeError):
    raise ValueError(f"unknown GGUF tensor type {t!r}") from None


# ------------------------------------------------------------------------------------------------
# gguf-py reference formulas (numpy, float32), returning block fields instead of bytes.
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Fields:
  """Decoded blocks of one tensor: ``codes`` (n, 32) as stored, fp16 ``d`` (n,), fp16 ``m`` (n,)."""
  codes: np.ndarray
  d: np.ndarray
  m: np.ndarray | None = None


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


# ------------------------------------------------------------------------------------------------
# Q6_K: port of ggml-quants.c ``quantize_row_q6_K_ref`` (gguf-py has no K-quant quantizer).
# ------------------------------------------------------------------------------------------------

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
  L = np.where((dl != 0)[:, :, None], lq, L).reshape(nb, 2, 4, 32).astype(np.uint8)
  # per 128-value half: ql[l] = L[l] | L[l+64] << 4, ql[l+32] = L[l+32] | L[l+96] << 4,
  # qh[l] = L[l]>>4 | L[l+32]>>4 << 2 | L[l+64]>>4 << 4 | L[l+96]>>4 << 6
  lo = L & np.uint8(0x0F)
  ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << np.uint8(4)),
                       lo[:, :, 1] | (lo[:, :, 3] << np.uint8(4))], axis=2).reshape(nb, 128)
  hi = L >> np.uint8(4)
  qh = (hi[:, :, 0] | (hi[:, :, 1] << np.uint8(2)) | (hi[:, :, 2] << np.uint8(4))
        | (hi[:, :, 3] << np.uint8(6))).reshape(nb, 64)
  out = np.concatenate([ql, qh, sc.view(np.uint8), _f16_bytes(d)], axis=1)
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


# ------------------------------------------------------------------------------------------------
# Block byte layout (ggml's block_q8_0, block_q4_0, ...).
# ------------------------------------------------------------------------------------------------

def _nibbles(u: np.ndarray) -> np.ndarray:
  """Low nibble = element j, high nibble = element j + 16 (ggml's 32-element block order)."""
  return (u[:, :16] & np.uint8(0x0F)) | (u[:, 16:] << np.uint8(4))


def _high_bits(u: np.ndarray) -> np.ndarray:
  """Bit 4 of each of the 32 codes as a little-endian uint32 (4 bytes)."""
  return np.packbits((u >> np.uint8(4)).astype(np.uint8), axis=-1, bitorder="little")


def _f16_bytes(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x.astype(np.float16).reshape(-1, 1)).view(np.uint8)


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


# ------------------------------------------------------------------------------------------------
# QArray <-> per-block (codes, scale) in GGUF orientation (blocks along the last axis).
# ------------------------------------------------------------------------------------------------

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


def _qarray_codes(q: QArray, block_axis: int, name: str) -> tuple[np.ndarray, np.ndarray]:
  """``(k, s)`` of a 2-D QArray with the block axis moved last: integer offsets ``k = v - zp``
  (int32, shape (rows, n)) and per-element float32 scales ``s`` (rows, n) with ``x = k · s``."""
  where = f"{name}: QArray(qtype={q.qtype.value}, shape={q.shape}, tile={q.tile})"
  if q.qtype.is_table:
    raise GGUFExportError(f"{where}: NF4 table values have no GGUF equivalent; pass "
                          "requantize=True to dequantize and quantize with gguf's reference")
  if len(q.shape) != 2:
    raise GGUFExportError(f"{where}: only 2-D tensors are written as quantized GGUF tensors")
  q.validate(name)
  v = _unpacked_np(q).astype(np.int32)
  if q.zero_point is not None:
    v = v - _expand_np(np.asarray(q.zero_point).astype(np.int32), q.tile, q.shape)
  s = _expand_np(np.asarray(q.scale).astype(np.float32), q.tile, q.shape)
  if block_axis % 2 == 0:
    v, s = v.T, s.T
  return np.ascontiguousarray(v), np.ascontiguousarray(s, dtype=np.float32)


def _block_scales(k: np.ndarray, s: np.ndarray, bs: int, name: str) -> tuple[np.ndarray, np.ndarray]:
  """Reshapes to blocks: ``k`` (n_blocks, bs) and one scale per block, checking that it is one."""
  kb = k.reshape(-1, bs)
  sb = s.reshape(-1, bs)
  if not np.array_equal(sb, np.broadcast_to(sb[:, :1], sb.shape)):
    bad = int(np.argmax(np.any(sb != sb[:, :1], axis=1)))
    raise GGUFExportError(
        f"{name}: scales vary inside GGUF block {bad} (each block of {bs} input values needs "
        f"one scale); use groups that are a multiple of {bs} along the input axis, per-channel "
        "scales, or pass requantize=True")
  return kb, sb[:, 0]


def _fp16_exact(s: np.ndarray) -> np.ndarray:
  with np.errstate(over="ignore"):
    h = s.astype(np.float16)
  return np.isfinite(h) & (h.astype(np.float32) == s)


def _fit_fields(kb: np.ndarray, sb: np.ndarray, t: GGMLType, name: str) -> _Fields:
  """GGUF block fields that dequantize exactly to ``kb · sb``; raises if there are none."""
  kmin, kmax = kb.min(axis=1), kb.max(axis=1)
  zero = (kmin == 0) & (kmax == 0)
  exact_s = _fp16_exact(sb) | zero
  d16 = np.where(zero, 0.0, sb).astype(np.float16)
  if t in _SYM:
    lo, hi = _SYM[t]
    pos = (kmin >= lo) & (kmax <= hi)
    neg = (-kmax >= lo) & (-kmin <= hi)
    ok = (pos | neg) & exact_s
    _raise_unrepresentable(ok, kb, sb, t, name, f"codes in [{lo}, {hi}] (or [{-hi}, {-lo}])")
    sign = np.where(pos, 1, -1).astype(np.int32)
    kg = kb * sign[:, None]
    # gguf's own all-zero block: Q8_0 stores d = +0, Q4_0/Q5_0 store d = 0/-8 = -0.
    zero_d = np.float16(0.0) if t is GGMLType.Q8_0 else np.float16(-0.0)
    d = np.where(zero, zero_d, d16 * sign.astype(np.float16))
    codes = kg.astype(np.int8) if t is GGMLType.Q8_0 else (kg - lo).astype(np.uint8)
    return _Fields(codes, d.astype(np.float16))
  qmax = _ASYM_QMAX[t]
  n = kb.shape[0]
  chosen = np.full(n, -1, np.int64)
  m = np.zeros(n, np.float16)
  # offsets c with u = k + c in [0, qmax] and m = -c·s an exact fp16 value; gguf-like c=-kmin first
  cands = [-kmin.astype(np.int64)] + [np.full(n, c, np.int64) for c in range(qmax + 1)]
  for c in cands:
    mc = -c.astype(np.float64) * sb.astype(np.float64) + 0.0
    with np.errstate(over="ignore"):
      mh = mc.astype(np.float16)
    fit = ((chosen < 0) & (kmin + c >= 0) & (kmax + c <= qmax) & np.isfinite(mh)
           & (mh.astype(np.float64) == mc))
    chosen = np.where(fit, c, chosen)
    m = np.where(fit, mh, m)
  ok = ((chosen >= 0) & exact_s) | zero
  _raise_unrepresentable(ok, kb, sb, t, name,
                         f"a code range of at most {qmax} and an fp16 offset -c·scale")
  chosen = np.where(zero, 0, chosen)
  m = np.where(zero, np.float16(0.0), m).astype(np.float16)
  return _Fields((kb + chosen[:, None]).astype(np.uint8), d16, m)


def _fit_q6_k(q: QArray, block_axis: int, name: str) -> np.ndarray | None:
  """Q6_K bytes that dequantize exactly to ``q`` (e.g. a QArray imported from Q6_K), else None.

  Per super-block: ``|d| = max(scale) / n`` for some ``n`` in ``128..1`` (ggml's own files use 128)
  must be an fp16 value, every sub-block scale ``|d·sc|`` with ``sc`` int8, and the codes
  ``32 ± k`` in ``[0, 63]`` for some choice of the signs of ``d`` and ``sc``.
  """
  try:
    k, s = _qarray_codes(q, block_axis, name)
    kb, sb = _block_scales(k, s, 16, name)
  except GGUFExportError:
    return None
  rows = k.shape[0]
  kb = kb.reshape(-1, 16, 16)
  sb = sb.reshape(-1, 16)
  nb = kb.shape[0]
  zero_sub = np.all(kb == 0, axis=2)
  smax = np.where(zero_sub, 0, sb).max(axis=1)
  kmin, kmax = kb.min(axis=2), kb.max(axis=2)
  done = np.zeros(nb, bool)
  d_out = np.zeros(nb, np.float16)
  sc_out = np.zeros((nb, 16), np.int8)
  sign_out = np.ones((nb, 16), np.int64)
  for div in range(128, 0, -1):
    if done.all():
      break
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
      d = (smax / np.float32(div)).astype(np.float16)
      df = d.astype(np.float32)
      r = np.rint(sb / np.where(df == 0, 1, df)[:, None])
      exact = (df[:, None] * r.astype(np.float32) == sb) & (r >= 1) & (r <= 128)
    up = (kmin >= -32) & (kmax <= 31)          # code 32 + k
    down = (kmin >= -31) & (kmax <= 32)        # code 32 - k
    for dsign in (1, -1):
      # dl = d·sc > 0 needs sc = dsign·r (|sc| <= 127 if sc > 0, <= 128 if sc < 0): codes 32 + k
      lim_up = np.where(dsign > 0, 127, 128)
      lim_down = np.where(dsign > 0, 128, 127)
      use_up = exact & up & (r <= lim_up)
      use_down = exact & down & (r <= lim_down)
      ok = (use_up | use_down | zero_sub).all(axis=1) & ((smax == 0) | (df > 0)) & ~done
      sign = np.where(use_up, 1, -1)
      sc = np.where(zero_sub, 0, dsign * sign * r)
      d_out = np.where(ok, d * np.float16(dsign), d_out)
      sc_out = np.where(ok[:, None], sc.astype(np.int8), sc_out)
      sign_out = np.where(ok[:, None], np.where(zero_sub, 1, sign), sign_out)
      done |= ok
  if not done.all():
    return None
  L = (sign_out[:, :, None] * kb + 32).astype(np.uint8).reshape(nb, 2, 4, 32)
  lo = L & np.uint8(0x0F)
  ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << np.uint8(4)),
                       lo[:, :, 1] | (lo[:, :, 3] << np.uint8(4))], axis=2).reshape(nb, 128)
  hi = L >> np.uint8(4)
  qh = (hi[:, :, 0] | (hi[:, :, 1] << np.uint8(2)) | (hi[:, :, 2] << np.uint8(4))
        | (hi[:, :, 3] << np.uint8(6))).reshape(nb, 64)
  out = np.concatenate([ql, qh, sc_out.view(np.uint8), _f16_bytes(d_out)], axis=1)
  return out.reshape(rows, -1)


def _raise_unrepresentable(ok: np.ndarray, kb, sb, t: GGMLType, name: str, need: str) -> None:
  if ok.all():
    return
  bad = np.flatnonzero(~ok)
  i = int(bad[0])
  reason = (f"scale {float(sb[i])!r} is not a float16 value" if not _fp16_exact(sb[i:i + 1])[0]
            else f"codes span [{int(kb[i].min())}, {int(kb[i].max())}]")
  raise GGUFExportError(
      f"{name}: {len(bad)} of {len(ok)} blocks cannot be stored exactly as {t.name} (which needs "
      f"fp16 block scales and {need}); first is block {i}: {reason}.  Quantize with "
      f"jq.io.gguf_io.quantize_for_gguf(w, '{t.name.lower()}') (or a jq spec with "
      "scale_dtype='float16' on a matching grid), or pass requantize=True to round again with "
      "gguf's reference quantizer")


# ------------------------------------------------------------------------------------------------
# Public tensor-level API.
# ------------------------------------------------------------------------------------------------

def gguf_spec(t: GGMLType | str, *, block_axis: int = 0) -> QuantSpec:
  """The jq :class:`QuantSpec` describing the QArrays :func:`quantize_for_gguf` returns for ``t``.

  It fixes the layout (qtype, groups of 32 along ``block_axis``, fp16 scales); gguf's rounding
  (truncation, round-half-away, unrounded ``d``) is not expressible in a spec, so use
  :func:`quantize_for_gguf` for gguf's exact grid.  ``jq.quantize(w, gguf_spec("q8_0"))`` still
  gives a grid Q8_0 stores exactly (different rounding, same format); for Q4_0 the exactly
  storable jq spec is ``int4`` symmetric, groups of 32, ``scale_dtype="float16"``.

  ==== =========================================================
  Q8_0 int8 symmetric, group 32, fp16 scale
  Q4_0 uint4 asymmetric (zero point 8, or 7 for negative d), group 32, fp16 scale
  Q5_0 int8 symmetric container holding 5-bit codes in [-16, 16], group 32, fp16 scale
  ==== =========================================================
  """
  t = to_ggml_type(t)
  if t not in TWIN_TYPES:
    raise ValueError(f"GGUF {t.name} has no exact jq QuantSpec twin (twins: "
                     f"{[x.name for x in TWIN_TYPES]}); Q4_1/Q5_1 store a float offset, not an "
                     "integer zero point")
  qtype, sym = {GGMLType.Q8_0: (QType.INT8, True), GGMLType.Q4_0: (QType.UINT4, False),
                GGMLType.Q5_0: (QType.INT8, True)}[t]
  if block_axis not in (0, 1):
    raise ValueError(f"block_axis={block_axis}: GGUF tensors are 2-D; use 0 (kernel (in, out)) or "
                     "1 ((out, in) / embedding)")
  return QuantSpec(qtype=qtype, symmetric=sym, granularity=Granularity.GROUP, group_size=BLOCK,
                   group_axis=block_axis, channel_axes=(1 - block_axis,), scale_dtype="float16")


def _check_blockable(shape: tuple[int, ...], block_axis: int, bs: int, name: str, dtype) -> None:
  if len(shape) != 2:
    raise ValueError(f"{name}: shape {tuple(shape)} dtype {dtype}: GGUF quantized tensors are 2-D")
  if shape[block_axis] % bs:
    raise ValueError(f"{name}: shape {tuple(shape)} dtype {dtype}: axis {block_axis} "
                     f"({shape[block_axis]}) is not a multiple of the GGUF block size {bs}")


def _fields_to_qarray(f: _Fields, t: GGMLType, rows: int, n: int, block_axis: int) -> QArray | None:
  """The jq twin of decoded fields (blocks along the last axis of (rows, n)); None if inexact."""
  d = f.d.astype(np.float32)
  if not np.all(np.isfinite(d)):
    return None
  zero = d == 0
  if t is GGMLType.Q4_0:
    neg = d < 0
    u = f.codes.astype(np.int32)
    zp = np.where(neg, 7, 8)
    v = np.where(neg[:, None], 15 - u, u)
    v = np.where(zero[:, None], zp[:, None], v)
    qtype, zp = QType.UINT4, zp.astype(np.uint8)
  else:
    half = {GGMLType.Q8_0: 0, GGMLType.Q5_0: 16}[t]
    k = f.codes.astype(np.int32) - half
    v = np.where((d < 0)[:, None], -k, k)
    v = np.where(zero[:, None], 0, v)
    if v.max(initial=0) > 127:  # Q8_0 code -128 with a negative d
      return None
    qtype, zp = QType.INT8, None
  scale = np.where(zero, np.float16(1.0), np.abs(f.d)).astype(np.float16)
  return _assemble(v.reshape(rows, n), scale.reshape(rows, n // BLOCK),
                   None if zp is None else zp.reshape(rows, n // BLOCK), qtype, BLOCK, block_axis)


def _assemble(v: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, qtype: QType, bs: int,
              block_axis: int) -> QArray:
  """QArray from (rows, n) codes with per-(row, block) scales, block axis placed at ``block_axis``."""
  tile = (1, bs)
  if block_axis == 0:
    v, scale, tile = v.T, scale.T, (bs, 1)
    zp = None if zp is None else zp.T
  v = np.ascontiguousarray(v).astype(qtype.unpacked_dtype)
  return QArray(values=jnp.asarray(_pack_np(v, qtype)), scale=jnp.asarray(np.ascontiguousarray(scale)),
                zero_point=None if zp is None else jnp.asarray(np.ascontiguousarray(zp)),
                activation=None, qtype=qtype, shape=tuple(v.shape), tile=tile)


def _rows(x: np.ndarray, block_axis: int) -> np.ndarray:
  return np.ascontiguousarray(x.T if block_axis == 0 else x)


def quantize_for_gguf(w: Any, t: GGMLType | str, *, block_axis: int = 0,
                      name: str = "<tensor>") -> QArray:
  """Quantizes ``w`` exactly as gguf-py (and llama.cpp) would, returning the jq twin QArray.

  Encoding the result with :func:`encode_tensor` gives the bytes of
  ``gguf.quants.quantize(w_out_in, t)`` and its ``dequantize()`` equals gguf's dequantization.

  Args:
    w: a 2-D float array; a jq Dense kernel ``(in, out)`` by default.
    t: ``Q8_0``, ``Q4_0`` or ``Q5_0`` (see :func:`gguf_spec` for the layouts).
    block_axis: the axis cut into blocks of 32 (GGUF's ``in`` axis): 0 for kernels, 1 for
      ``(out, in)`` matrices and embeddings ``(vocab, d)``.
    name: used in error messages.

  Example:
    >>> q = quantize_for_gguf(params["layers_0"]["mlp"]["up_proj"]["kernel"], "q4_0")
  """
  t = to_ggml_type(t)
  gguf_spec(t, block_axis=block_axis)  # validates t and block_axis
  x = np.asarray(w)
  if not np.issubdtype(x.dtype, np.floating) and x.dtype != jnp.bfloat16:
    raise ValueError(f"{name}: shape {x.shape} dtype {x.dtype}: only float tensors can be quantized")
  _check_blockable(x.shape, block_axis, BLOCK, name, x.dtype)
  rows = _rows(x.astype(np.float32), block_axis)
  if not np.all(np.isfinite(rows)):
    raise ValueError(f"{name}: shape {x.shape} dtype {x.dtype} has NaN/Inf values")
  f = _reference_fields(rows.reshape(-1, BLOCK), t)
  q = _fields_to_qarray(f, t, rows.shape[0], rows.shape[1], block_axis)
  if q is None:
    raise ValueError(f"{name}: shape {x.shape} dtype {x.dtype}: block scale overflows float16 "
                     f"(|w| up to {float(np.max(np.abs(rows)))})")
  return q


def _float_bytes(x: np.ndarray, t: GGMLType) -> np.ndarray:
  x = np.asarray(x, np.float32)
  if t is GGMLType.F32:
    return np.ascontiguousarray(x)
  return np.ascontiguousarray(gguf.quants.quantize(x, t))


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


def encode_tensor(x: Any, t: GGMLType | str, *, block_axis: int = 0, requantize: bool = False,
                  name: str = "<tensor>") -> np.ndarray:
  """GGUF data of one tensor in the orientation GGUF stores (blocks along the last axis).

  Returns a float32 (F32), float16 (F16) or uint8 array (BF16 and block types, one row of block
  bytes per output row) ready for ``GGUFWriter.add_tensor(name, data, raw_dtype=t)``.

  Args:
    x: a float array or a :class:`QArray`; 1-D tensors (norms) only for F32/F16/BF16.
    t: an :data:`EXPORT_TYPES` member or its name.
    block_axis: the input axis of ``x`` (0 for a kernel ``(in, out)``: it is transposed; 1 for an
      ``(out, in)`` matrix or an embedding).
    requantize: for a QArray whose grid ``t`` cannot store exactly, dequantize and quantize with
      gguf's reference instead of raising.
    name: used in error messages.

  Raises:
    GGUFExportError: the QArray's grid is not exactly representable (and ``requantize`` is False),
      or the type cannot be written.
    ValueError: bad shape (the input axis must be a multiple of 32 for block types) or dtype.
  """
  t = to_ggml_type(t)
  if t not in EXPORT_TYPES:
    raise GGUFExportError(f"{name}: writing GGUF {t.name} is not supported; choose one of "
                          f"{[x.name for x in EXPORT_TYPES]}")
  shape = tuple(x.shape)
  dtype = x.qtype.value if is_qarray(x) else getattr(x, "dtype", type(x).__name__)
  if len(shape) not in (1, 2) or (len(shape) == 1 and t not in _FLOAT_TYPES):
    raise GGUFExportError(f"{name}: shape {shape} dtype {dtype}: GGUF {t.name} tensors here are "
                          "2-D (1-D tensors are written as F32/F16/BF16)")
  if len(shape) == 2 and block_axis not in (0, 1):
    raise ValueError(f"{name}: block_axis={block_axis} must be 0 or 1")
  if t in _FLOAT_TYPES:
    if is_qarray(x):
      deq = _dequantize_np(x)
      out = _float_bytes(_rows(deq, block_axis) if deq.ndim == 2 else deq, t)
      if t is not GGMLType.F32 and not requantize:
        back = gguf.quants.dequantize(out, t).reshape(out.shape[:-1] + (-1,))
        if not np.array_equal(back, _rows(deq, block_axis) if deq.ndim == 2 else deq):
          raise GGUFExportError(f"{name}: QArray(qtype={x.qtype.value}, shape={shape}) dequantizes "
                                f"to values that {t.name} cannot hold exactly; use F32, or pass "
                                "requantize=True to round them")
      return out
    xf = np.asarray(x)
    if not (np.issubdtype(xf.dtype, np.floating) or xf.dtype == jnp.bfloat16):
      raise ValueError(f"{name}: shape {shape} dtype {xf.dtype}: expected a float tensor")
    return _float_bytes(_rows(xf.astype(np.float32), block_axis) if xf.ndim == 2 else xf, t)
  if t in _K_TYPES:
    _check_blockable(shape, block_axis, QK_K, name, dtype)
    if is_qarray(x):
      fit = _fit_q6_k(x, block_axis, name) if t is GGMLType.Q6_K else None
      if fit is not None:
        return fit
      if not requantize:
        raise GGUFExportError(
            f"{name}: QArray(qtype={x.qtype.value}, shape={shape}, tile={x.tile}) cannot be stored "
            f"exactly as {t.name} (super-blocks of 256 whose sub-block scales are integer multiples "
            "of one fp16 scale); pass requantize=True to quantize its dequantized values with "
            "ggml's reference")
      xf = _dequantize_np(x)
    else:
      xf = np.asarray(x).astype(np.float32)
    if not np.all(np.isfinite(xf)):
      raise ValueError(f"{name}: shape {shape} dtype {dtype} has NaN/Inf values")
    rows = _rows(xf, block_axis)
    out = _q4_k_bytes(rows) if t is GGMLType.Q4_K else _q6_k_bytes(rows)
    return out.reshape(rows.shape[0], -1)
  _check_blockable(shape, block_axis, BLOCK, name, dtype)
  if is_qarray(x):
    if requantize:
      try:
        k, s = _qarray_codes(x, block_axis, name)
        f = _fit_fields(*_block_scales(k, s, BLOCK, name), t, name)
      except GGUFExportError:
        f = _reference_fields(_rows(_dequantize_np(x), block_axis).reshape(-1, BLOCK), t)
    else:
      k, s = _qarray_codes(x, block_axis, name)
      f = _fit_fields(*_block_scales(k, s, BLOCK, name), t, name)
  else:
    xf = np.asarray(x).astype(np.float32)
    if not np.all(np.isfinite(xf)):
      raise ValueError(f"{name}: shape {shape} dtype {dtype} has NaN/Inf values")
    f = _reference_fields(_rows(xf, block_axis).reshape(-1, BLOCK), t)
  rows = shape[1 - block_axis]
  return _encode(f, t).reshape(rows, -1)


def decode_tensor(data: np.ndarray, t: GGMLType | str, shape: tuple[int, ...], *,
                  name: str = "<tensor>") -> QArray | np.ndarray:
  """Inverse of :func:`encode_tensor` for GGUF data of numpy ``shape`` (``(out, in)``).

  Q8_0/Q4_0/Q5_0/Q6_K/Q3_K give a QArray with blocks along the last axis (tile ``(1, 32)`` or
  ``(1, 16)``) whose ``dequantize()`` equals ``gguf.quants.dequantize``; every other type (and a
  block that has no exact twin, e.g. a non-finite scale) gives that float32 array.
  """
  t = to_ggml_type(t)
  shape = tuple(int(s) for s in shape)
  raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
  if t not in gguf.GGML_QUANT_SIZES:
    raise GGUFFormatError(f"{name}: unknown GGUF tensor type {t!r}")
  bs, ts = gguf.GGML_QUANT_SIZES[t]
  if not shape or shape[-1] % bs:
    raise GGUFFormatError(f"{name}: shape {shape} does not split into {t.name} blocks of {bs}")
  want = math.prod(shape[:-1]) * (shape[-1] // bs) * ts
  if raw.size != want:
    raise GGUFFormatError(f"{name}: {t.name} data of shape {shape} needs {want} bytes, found "
                          f"{raw.size} (truncated or corrupt file?)")
  blocks = raw.reshape(-1, ts)
  if len(shape) == 2 and t in TWIN_TYPES:
    q = _fields_to_qarray(_decode(blocks, t), t, shape[0], shape[1], 1)
    if q is not None:
      return q
  elif t in _ASYM_QMAX:  # gguf's (d * q) + m, vectorized over all blocks (same float32 ops)
    f = _decode(blocks, t)
    x = (f.d.astype(np.float32)[:, None] * f.codes.astype(np.float32)) + f.m.astype(np.float32)[:, None]
    return x.reshape(shape)
  elif len(shape) == 2 and t in (GGMLType.Q6_K, GGMLType.Q3_K):
    q = _k_quant_qarray(blocks, t, shape)
    if q is not None:
      return q
  try:
    out = gguf.quants.dequantize(raw.reshape(*shape[:-1], -1), t)
  except NotImplementedError as e:
    raise GGUFFormatError(f"{name}: cannot dequantize GGUF type {t.name}: {e}") from e
  return np.asarray(out, np.float32).reshape(shape)


def _k_quant_qarray(blocks: np.ndarray, t: GGMLType, shape: tuple[int, int]) -> QArray | None:
  """Symmetric K-quants as jq int8/int4 with groups of 16 and float32 scales ``|d·sc|``."""
  q, dl = _decode_q6_k(blocks) if t is GGMLType.Q6_K else _decode_q3_k(blocks)
  if not np.all(np.isfinite(dl)):
    return None
  q = q.astype(np.int32).reshape(-1, 16)
  dl = dl.reshape(-1)
  v = np.where((dl < 0)[:, None], -q, q)
  v = np.where((dl == 0)[:, None], 0, v)
  scale = np.where(dl == 0, np.float32(1.0), np.abs(dl)).astype(np.float32)
  qtype = QType.INT8 if t is GGMLType.Q6_K else QType.INT4
  return _assemble(v.reshape(shape), scale.reshape(shape[0], shape[1] // 16), None, qtype, 16, 1)


# ------------------------------------------------------------------------------------------------
# Reading files.
# ------------------------------------------------------------------------------------------------

_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                   10: "<Q", 11: "<q", 12: "<d"}
_NP_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<?",
               10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass(frozen=True)
class _TensorInfo:
  name: str
  shape: tuple[int, ...]   # numpy order (GGUF dims reversed)
  type: GGMLType
  offset: int              # absolute byte offset in the file
  nbytes: int


class _GGUFFile:
  """A minimal little-endian GGUF v2/v3 parser (header, metadata, tensor table; data memory-mapped).

  gguf-py's ``GGUFReader`` builds a numpy view per metadata element, which takes ~10 s for a
  50k-token vocabulary; this reads the same fields with ``struct`` in well under a second and
  reports truncation and inconsistencies as :class:`GGUFFormatError`.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    if not self.path.is_file():
      raise FileNotFoundError(f"GGUF file not found: {self.path}")
    size = self.path.stat().st_size
    if size < 24:
      raise GGUFFormatError(f"{self.path}: {size} bytes is too short for a GGUF header")
    self.data = np.memmap(self.path, mode="r", dtype=np.uint8)
    self.buf = memoryview(self.data)
    self.pos = 0
    try:
      self._parse()
    except (struct.error, UnicodeDecodeError, IndexError, OverflowError, ValueError) as e:
      if isinstance(e, GGUFFormatError):
        raise
      raise GGUFFormatError(f"{self.path}: corrupt or truncated GGUF at byte {self.pos} "
                            f"({type(e).__name__}: {e})") from e

  def _unpack(self, fmt: str):
    n = struct.calcsize(fmt)
    if self.pos + n > len(self.buf):
      raise GGUFFormatError(f"{self.path}: truncated GGUF (needs byte {self.pos + n}, file has "
                            f"{len(self.buf)})")
    v = struct.unpack_from(fmt, self.buf, self.pos)
    self.pos += n
    return v[0] if len(v) == 1 else v

  def _string(self) -> str:
    n = self._unpack("<Q")
    if self.pos + n > len(self.buf):
      raise GGUFFormatError(f"{self.path}: truncated GGUF (string of {n} bytes at {self.pos})")
    s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8")
    self.pos += n
    return s

  def _value(self, vtype: int) -> Any:
    if vtype in _SCALAR_FORMATS:
      return self._unpack(_SCALAR_FORMATS[vtype])
    if vtype == _STRING:
      return self._string()
    if vtype == _ARRAY:
      sub, n = self._unpack("<IQ")
      if sub in _NP_SCALARS:
        dt = np.dtype(_NP_SCALARS[sub])
        end = self.pos + n * dt.itemsize
        if end > len(self.buf):
          raise GGUFFormatError(f"{self.path}: truncated GGUF (array of {n} at {self.pos})")
        arr = np.frombuffer(self.buf[self.pos:end], dtype=dt)
        self.pos = end
        return arr.tolist()
      if sub == _STRING:
        out = []
        buf, pos, size = self.buf, self.pos, len(self.buf)
        for _ in range(n):
          if pos + 8 > size:
            raise GGUFFormatError(f"{self.path}: truncated GGUF (string array at {pos})")
          (ln,) = struct.unpack_from("<Q", buf, pos)
          pos += 8
          if pos + ln > size:
            raise GGUFFormatError(f"{self.path}: truncated GGUF (string array at {pos})")
          out.append(bytes(buf[pos:pos + ln]).decode("utf-8"))
          pos += ln
        self.pos = pos
        return out
      return [self._value(sub) for _ in range(n)]
    raise GGUFFormatError(f"{self.path}: unknown metadata value type {vtype} at byte {self.pos}")

  def _parse(self) -> None:
    magic = bytes(self.buf[:4])
    if magic != b"GGUF":
      raise GGUFFormatError(f"{self.path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    self.pos = 4
    version = self._unpack("<I")
    if version & 0xFFFF == 0:
      raise GGUFFormatError(f"{self.path}: big-endian GGUF files are not supported")
    if version not in (2, 3):
      raise GGUFFormatError(f"{self.path}: GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = self._unpack("<QQ")
    if n_tensors > len(self.buf) or n_kv > len(self.buf):
      raise GGUFFormatError(f"{self.path}: corrupt header ({n_tensors} tensors, {n_kv} keys)")
    self.metadata: dict[str, Any] = {}
    for _ in range(n_kv):
      key = self._string()
      self.metadata[key] = self._value(self._unpack("<I"))
    infos = []
    for _ in range(n_tensors):
      name = self._string()
      n_dims = self._unpack("<I")
      if n_dims > 8:
        raise GGUFFormatError(f"{self.path}: tensor {name!r} has {n_dims} dimensions")
      dims = [self._unpack("<Q") for _ in range(n_dims)]
      raw_type, offset = self._unpack("<IQ")
      infos.append((name, tuple(reversed(dims)), raw_type, offset))
    align = self.metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
      raise GGUFFormatError(f"{self.path}: general.alignment={align!r} is not a power of two")
    start = -(-self.pos // align) * align
    self.tensors: list[_TensorInfo] = []
    names = set()
    for name, shape, raw_type, offset in infos:
      try:
        t = GGMLType(raw_type)
      except ValueError:
        raise GGUFFormatError(f"{self.path}: tensor {name!r} has unknown type {raw_type}") from None
      if name in names:
        raise GGUFFormatError(f"{self.path}: duplicate tensor name {name!r}")
      names.add(name)
      bs, ts = gguf.GGML_QUANT_SIZES[t]
      if not shape or shape[-1] % bs:
        raise GGUFFormatError(f"{self.path}: tensor {name!r} shape {shape} does not split into "
                              f"{t.name} blocks of {bs}")
      nbytes = math.prod(shape[:-1]) * (shape[-1] // bs) * ts
      if start + offset + nbytes > len(self.buf):
        raise GGUFFormatError(f"{self.path}: tensor {name!r} ({t.name} {shape}) ends at byte "
                              f"{start + offset + nbytes} but the file has {len(self.buf)} bytes "
                              "(truncated?)")
      self.tensors.append(_TensorInfo(name, shape, t, start + offset, nbytes))

  def tensor_bytes(self, ti: _TensorInfo) -> np.ndarray:
    return self.data[ti.offset:ti.offset + ti.nbytes]


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
  """All key/value metadata of a GGUF as Python values (lists for arrays).

  Raises:
    FileNotFoundError: ``path`` does not exist.
    GGUFFormatError: not a GGUF (v2/v3, little-endian), or truncated/corrupt.
  """
  return _GGUFFile(path).metadata


def load_gguf_qarrays(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, QArray | np.ndarray]]:
  """``(metadata, {tensor name: QArray or float32 array})`` of a GGUF file.

  Arrays have numpy shape = reversed GGUF dims (a linear weight is ``(out, in)``, blocks along the
  last axis).  Q8_0/Q4_0/Q5_0/Q6_K/Q3_K tensors become QArrays (see :func:`decode_tensor`); their
  ``dequantize()`` equals ``gguf.quants.dequantize`` exactly.  Q4_1/Q5_1 (float offset, no integer
  zero point), the other K-quants, IQ types and float types are returned as float32 arrays equal
  to ``gguf.quants.dequantize``.

  Raises:
    FileNotFoundError: ``path`` does not exist.
    GGUFFormatError: not a GGUF, truncated, or a tensor of the wrong size or unknown type.
  """
  f = _GGUFFile(path)
  tensors = {ti.name: decode_tensor(f.tensor_bytes(ti), ti.type, ti.shape, name=f"{path}:{ti.name}")
             for ti in f.tensors}
  return dict(f.metadata), tensors


def tokenizer_metadata(source: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
  """The ``tokenizer.*`` keys of a GGUF's metadata (or of a metadata dict), to carry over."""
  meta = source if isinstance(source, Mapping) else read_gguf_metadata(source)
  return {k: v for k, v in meta.items() if k.startswith("tokenizer.")}


# ------------------------------------------------------------------------------------------------
# Llama-family models.
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaHParams:
  """Hyperparameters of a Llama-family decoder, with ``models.decoder.LlamaConfig``'s names."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-5
  max_seq_len: int = 2048
  tie_embeddings: bool = True

  @classmethod
  def from_config(cls, config: Any) -> "LlamaHParams":
    """From a ``LlamaConfig``-like object or a mapping with the same field names.

    Raises:
      GGUFExportError: missing or non-positive fields, or a declared architecture other than llama.
    """
    get = (lambda k: config.get(k)) if isinstance(config, Mapping) else (
        lambda k: getattr(config, k, None))
    arch = get("architecture") or get("model_type")
    if arch is not None and str(arch).lower() not in ("llama", "smollm2", "llamaforcausallm"):
      raise GGUFExportError(f"config architecture {arch!r} is not supported; the GGUF exporter "
                            "writes Llama-family decoders ('llama') only")
    vals = {}
    for f in dataclasses.fields(cls):
      v = get(f.name)
      if v is None and f.name == "head_dim" and get("hidden_size") and get("num_heads"):
        v = int(get("hidden_size")) // int(get("num_heads"))
      if v is None:
        if f.default is dataclasses.MISSING:
          raise GGUFExportError(f"config has no {f.name!r}; GGUF llama export needs "
                                f"{[x.name for x in dataclasses.fields(cls)]}")
        continue
      vals[f.name] = v
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
              "num_kv_heads", "head_dim", "max_seq_len"):
      if k in vals and (int(vals[k]) != vals[k] or int(vals[k]) <= 0):
        raise GGUFExportError(f"config.{k}={vals[k]!r} must be a positive integer")
    hp = cls(**vals)
    if hp.num_heads % hp.num_kv_heads:
      raise GGUFExportError(f"config num_heads={hp.num_heads} is not a multiple of "
                            f"num_kv_heads={hp.num_kv_heads}")
    return hp

  @classmethod
  def from_metadata(cls, meta: Mapping[str, Any]) -> "LlamaHParams":
    """From GGUF ``llama.*`` metadata (tie_embeddings is decided by the tensors; True here)."""
    arch = meta.get("general.architecture")
    if arch != "llama":
      raise GGUFFormatError(f"GGUF architecture {arch!r} is not supported; only 'llama' is")

    def key(k, default=None):
      v = meta.get(f"llama.{k}", default)
      if v is None:
        raise GGUFFormatError(f"GGUF metadata key 'llama.{k}' is missing")
      if isinstance(v, list):
        raise GGUFFormatError(f"GGUF llama.{k} is per-layer ({v[:4]}...): not supported")
      return v

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", hidden // heads))
    if int(key("rope.dimension_count", head_dim)) != head_dim:
      raise GGUFFormatError("GGUF llama.rope.dimension_count != head_dim (partial rotary) is not "
                            "supported")
    return cls(vocab_size=int(key("vocab_size", 0)) or -1, hidden_size=hidden,
               intermediate_size=int(key("feed_forward_length")),
               num_layers=int(key("block_count")), num_heads=heads,
               num_kv_heads=int(key("attention.head_count_kv", heads)), head_dim=head_dim,
               rope_theta=float(key("rope.freq_base", 10000.0)),
               rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
               max_seq_len=int(key("context_length", 2048)))


_BLOCK_KERNELS = {
    "attn/q_proj/kernel": "attn_q", "attn/k_proj/kernel": "attn_k",
    "attn/v_proj/kernel": "attn_v", "attn/o_proj/kernel": "attn_output",
    "mlp/gate_proj/kernel": "ffn_gate", "mlp/up_proj/kernel": "ffn_up",
    "mlp/down_proj/kernel": "ffn_down",
}
_BLOCK_NORMS = {"input_norm/scale": "attn_norm", "post_attn_norm/scale": "ffn_norm"}
_GLOBALS = {"embed/embedding": "token_embd", "final_norm/scale": "output_norm",
            "lm_head/kernel": "output"}
_LAYER_RE = re.compile(r"layers_(\d+)/(.+)")


def _gguf_name(path: str) -> tuple[str, str]:
  """(GGUF tensor name, kind) of a param path; kind is 'kernel', 'embed', 'norm' or 'head'."""
  if path in _GLOBALS:
    kind = {"token_embd": "embed", "output_norm": "norm", "output": "kernel"}[_GLOBALS[path]]
    return _GLOBALS[path] + ".weight", kind
  m = _LAYER_RE.fullmatch(path)
  if m and m.group(2) in _BLOCK_KERNELS:
    return f"blk.{int(m.group(1))}.{_BLOCK_KERNELS[m.group(2)]}.weight", "kernel"
  if m and m.group(2) in _BLOCK_NORMS:
    return f"blk.{int(m.group(1))}.{_BLOCK_NORMS[m.group(2)]}.weight", "norm"
  raise GGUFExportError(
      f"params/{path}: not part of a Llama-family param tree (expected embed/embedding, "
      "layers_N/{attn/{q,k,v,o}_proj,mlp/{gate,up,down}_proj}/kernel, layers_N/{input_norm,"
      "post_attn_norm}/scale, final_norm/scale, lm_head/kernel); only the 'llama' architecture "
      "is supported")


def _qk_perm(out: int, n_heads: int, name: str) -> np.ndarray:
  """Row order HF -> llama.cpp (interleaved RoPE pairs) of a Q/K weight with ``out`` rows."""
  if out % (2 * n_heads):
    raise GGUFExportError(f"{name}: {out} rows do not split into {n_heads} heads of even size")
  idx = np.arange(out)
  return idx.reshape(n_heads, 2, out // n_heads // 2).swapaxes(1, 2).reshape(out)


def _expected_shapes(hp: LlamaHParams) -> dict[str, tuple[int, ...]]:
  d, f = hp.hidden_size, hp.intermediate_size
  q, kv = hp.num_heads * hp.head_dim, hp.num_kv_heads * hp.head_dim
  return {"attn_q": (d, q), "attn_k": (d, kv), "attn_v": (d, kv), "attn_output": (q, d),
          "ffn_gate": (d, f), "ffn_up": (d, f), "ffn_down": (f, d), "attn_norm": (d,),
          "ffn_norm": (d,), "token_embd": (hp.vocab_size, d), "output_norm": (d,),
          "output": (d, hp.vocab_size)}


def _permute_rows(x: Any, perm: np.ndarray, block_axis: int) -> Any:
  """Applies a row (output-channel) permutation to a float array or QArray of either layout."""
  if not is_qarray(x):
    return np.take(np.asarray(x), perm, axis=1 - block_axis)
  out_axis = 1 - block_axis
  q = x
  if q.tile[out_axis] != 1:  # shared scales across rows: permutation within a tile is harmless
    if q.scale.shape[out_axis] != 1:
      raise GGUFExportError(f"QArray tile {q.tile} shares scales across output rows of the Q/K "
                            "projection; cannot permute rows exactly (use per-channel or group "
                            "scales, or requantize=True)")
  v = np.take(_unpacked_np(q), perm, axis=out_axis)
  scale = q.scale if q.scale.shape[out_axis] == 1 else jnp.take(q.scale, perm, axis=out_axis)
  zp = q.zero_point
  if zp is not None and zp.shape[out_axis] != 1:
    zp = jnp.take(zp, perm, axis=out_axis)
  return dataclasses.replace(q, values=jnp.asarray(_pack_np(v, q.qtype)), scale=scale,
                             zero_point=zp)


_TOKENIZER_TYPES: dict[str, tuple[Any, Any]] = {
    "tokenizer.ggml.tokens": (gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING),
    "tokenizer.ggml.merges": (gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING),
    "tokenizer.ggml.token_type": (gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32),
    "tokenizer.ggml.scores": (gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.FLOAT32),
}


def _value_type(v: Any) -> gguf.GGUFValueType:
  if isinstance(v, (bool, np.bool_)):
    return gguf.GGUFValueType.BOOL
  if isinstance(v, (int, np.integer)):
    return gguf.GGUFValueType.UINT32 if 0 <= v < 2**32 else gguf.GGUFValueType.INT64
  if isinstance(v, (float, np.floating)):
    return gguf.GGUFValueType.FLOAT32
  if isinstance(v, str):
    return gguf.GGUFValueType.STRING
  if isinstance(v, (list, tuple)):
    return gguf.GGUFValueType.ARRAY
  raise GGUFExportError(f"metadata value {v!r} of type {type(v).__name__} has no GGUF type")


def _add_kv(writer: gguf.GGUFWriter, key: str, v: Any) -> None:
  if key in _TOKENIZER_TYPES:
    vt, sub = _TOKENIZER_TYPES[key]
    writer.add_key_value(key, list(v), vt, sub)
    return
  vt = _value_type(v)
  if vt is gguf.GGUFValueType.ARRAY:
    if not len(v):
      return
    sub = _value_type(v[0])
    if sub is gguf.GGUFValueType.UINT32 and any(int(x) < 0 for x in v):
      sub = gguf.GGUFValueType.INT32
    writer.add_key_value(key, list(v), vt, sub)
  else:
    writer.add_key_value(key, v, vt)


def _file_type(t: GGMLType) -> int:
  if t is GGMLType.F32:
    return int(gguf.LlamaFileType.ALL_F32)
  if t is GGMLType.Q4_K:
    return int(gguf.LlamaFileType.MOSTLY_Q4_K_S)   # llama.cpp names K-quant mixes; pure Q4_K ~ S
  return int(gguf.LlamaFileType[f"MOSTLY_{t.name}"])


def export_gguf(params: Any, config: Any, tokenizer_meta: Mapping[str, Any] | None,
                path: str | os.PathLike, ggml_type: GGMLType | str = "q8_0", *,
                embed_type: GGMLType | str | None = None,
                tensor_types: Mapping[str, GGMLType | str] | None = None,
                requantize: bool = False, name: str | None = None,
                extra_metadata: Mapping[str, Any] | None = None) -> dict[str, GGMLType]:
  """Writes a Llama-family param tree (float and/or QArray leaves) as a llama.cpp GGUF.

  Tensor names and hyperparameters are those llama.cpp's ``llama`` architecture reads
  (``token_embd.weight``, ``blk.N.attn_q.weight`` ... ``output_norm.weight``); Q/K rows are put
  back in llama.cpp's interleaved RoPE order; kernels ``(in, out)`` are written as GGUF
  ``[in, out]`` (numpy ``(out, in)``).  Norms are always F32.  QArray leaves are stored without
  re-rounding when exact (see :func:`encode_tensor`); float leaves are quantized with gguf's
  reference.  The file is written to a temporary sibling and renamed into place.

  Args:
    params: ``{"params": {...}}`` or the inner dict, paths as in ``models/decoder.py``.
    config: ``LlamaConfig`` (or a mapping with its field names); see :class:`LlamaHParams`.
    tokenizer_meta: the ``tokenizer.*`` metadata to carry over (:func:`tokenizer_metadata` of the
      source GGUF): tokens, merges, token types, bos/eos ids, pre-tokenizer, chat template.
      ``None`` writes no tokenizer (llama.cpp then cannot tokenize).
    path: output ``.gguf``.
    ggml_type: type of the linear weights (``q8_0``, ``q4_0``, ``q4_1``, ``q5_0``, ``q5_1``,
      ``q4_k``, ``q6_k``, ``f16``, ``bf16``, ``f32``).  Like llama-quantize, a tensor whose rows
      are not a multiple of 256 falls back from Q4_K to Q5_0 and from Q6_K to Q8_0.
    embed_type: type of ``token_embd`` (and ``output``); default ``ggml_type``.
    tensor_types: overrides, ``{regex on the GGUF tensor name: type}``; first match wins.
    requantize: re-round QArrays the chosen type cannot store exactly instead of raising.
    name: ``general.name``.
    extra_metadata: more key/values to write (e.g. ``general.*`` from the source file).

  Returns:
    ``{GGUF tensor name: type written}``.

  Raises:
    GGUFExportError: unknown (non-Llama) parameters, shape mismatch with ``config``, an inexact
      QArray without ``requantize``, an unsupported type.

  Example:
    >>> meta, _ = load_gguf_qarrays(src)
    >>> export_gguf(params, config, tokenizer_metadata(meta), "out.gguf", "q4_0")
  """
  main_type = to_ggml_type(ggml_type)
  to_type = to_ggml_type
  if main_type not in EXPORT_TYPES:
    raise GGUFExportError(f"cannot write GGUF {main_type.name}; choose one of "
                          f"{[x.name.lower() for x in EXPORT_TYPES]}")
  emb_type = main_type if embed_type is None else to_type(embed_type)
  overrides = [(re.compile(p), to_type(v)) for p, v in (tensor_types or {}).items()]
  hp = LlamaHParams.from_config(config)
  tree = params["params"] if isinstance(params, Mapping) and set(params) == {"params"} else params
  leaves = leaves_with_paths(tree)
  if not leaves:
    raise GGUFExportError("params is empty")
  shapes = _expected_shapes(hp)
  entries: list[tuple[str, Any, str, str]] = []
  seen = {}
  for p, leaf in leaves:
    gname, kind = _gguf_name(p)
    base = gname.split(".")[-2]
    want = shapes[base]
    if tuple(leaf.shape) != want:
      raise GGUFExportError(f"params/{p}: shape {tuple(leaf.shape)} does not match the config "
                            f"(expected {want} for {gname})")
    if m := re.match(r"blk\.(\d+)\.", gname):
      if int(m.group(1)) >= hp.num_layers:
        raise GGUFExportError(f"params/{p}: layer {m.group(1)} >= config num_layers="
                              f"{hp.num_layers}")
    seen[gname] = p
    entries.append((gname, leaf, kind, p))
  required = ["token_embd.weight", "output_norm.weight"] + [
      f"blk.{i}.{n}.weight" for i in range(hp.num_layers)
      for n in list(_BLOCK_KERNELS.values()) + list(_BLOCK_NORMS.values())]
  if not hp.tie_embeddings:
    required.append("output.weight")
  missing = [n for n in required if n not in seen]
  if missing:
    raise GGUFExportError(f"params lacks {len(missing)} tensors of a {hp.num_layers}-layer llama "
                          f"model, e.g. {missing[:3]}")
  tok = dict(tokenizer_meta or {})
  bad = [k for k in tok if not k.startswith("tokenizer.")]
  if bad:
    raise GGUFExportError(f"tokenizer_meta keys must start with 'tokenizer.', got {bad[:3]}")
  if "tokenizer.ggml.tokens" in tok and len(tok["tokenizer.ggml.tokens"]) != hp.vocab_size:
    raise GGUFExportError(f"tokenizer has {len(tok['tokenizer.ggml.tokens'])} tokens but "
                          f"vocab_size={hp.vocab_size}")

  # Encode everything before touching the file system.
  encoded: list[tuple[str, np.ndarray, GGMLType]] = []
  written: dict[str, GGMLType] = {}
  for gname, leaf, kind, p in entries:
    if kind == "norm":
      t = GGMLType.F32
    else:
      t = emb_type if kind == "embed" or gname == "output.weight" else main_type
      for rx, ot in overrides:
        if rx.search(gname):
          t = ot
          break
    x, block_axis = leaf, (1 if kind == "embed" else 0)
    if t in _K_FALLBACK and leaf.shape[block_axis] % QK_K:
      t = _K_FALLBACK[t]   # llama-quantize's fallback for rows that are not a multiple of 256
    if ".attn_q." in gname or ".attn_k." in gname:
      heads = hp.num_heads if ".attn_q." in gname else hp.num_kv_heads
      x = _permute_rows(x, _qk_perm(leaf.shape[1], heads, f"params/{p}"), block_axis)
    data = encode_tensor(x, t, block_axis=block_axis if kind != "norm" else 0,
                         requantize=requantize, name=f"params/{p}")
    encoded.append((gname, data, t))
    written[gname] = t

  path = Path(path)
  if not path.parent.is_dir():
    raise FileNotFoundError(f"cannot write {path}: directory {path.parent} does not exist")
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.jq-tmp-", dir=path.parent)
  os.close(fd)
  try:
    writer = gguf.GGUFWriter(tmp, "llama")
    writer.add_name(name or "jq export")
    writer.add_string("general.quantized_by", "jq")
    writer.add_context_length(int(hp.max_seq_len))
    writer.add_embedding_length(int(hp.hidden_size))
    writer.add_block_count(int(hp.num_layers))
    writer.add_feed_forward_length(int(hp.intermediate_size))
    writer.add_head_count(int(hp.num_heads))
    writer.add_head_count_kv(int(hp.num_kv_heads))
    writer.add_rope_dimension_count(int(hp.head_dim))
    writer.add_rope_freq_base(float(hp.rope_theta))
    writer.add_layer_norm_rms_eps(float(hp.rms_norm_eps))
    writer.add_vocab_size(int(hp.vocab_size))
    if hp.head_dim * hp.num_heads != hp.hidden_size:
      writer.add_key_length(int(hp.head_dim))
      writer.add_value_length(int(hp.head_dim))
    writer.add_file_type(_file_type(main_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for k, v in (extra_metadata or {}).items():
      _add_kv(writer, k, v)
    for k, v in tok.items():
      _add_kv(writer, k, v)
    for gname, data, t in encoded:
      writer.add_tensor(gname, data, raw_dtype=None if t in (GGMLType.F32, GGMLType.F16) else t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return written


def export_model(model: Any, params: Any, path: str | os.PathLike, *,
                 ggml_type: GGMLType | str = "q8_0", requantize: bool = False,
                 tokenizer_meta: Mapping[str, Any] | None = None,
                 source_gguf: str | os.PathLike | None = None, **kwargs: Any) -> dict[str, GGMLType]:
  """:func:`export_gguf` for an app-level model object (anything with a ``.config``).

  The tokenizer is carried over from ``tokenizer_meta``, else from the ``tokenizer.*`` metadata of
  ``source_gguf``, else of ``model.gguf_path`` if the model has one.  ``kwargs`` go to
  :func:`export_gguf` (``embed_type``, ``tensor_types``, ``name``, ...).

  Raises:
    GGUFExportError: no tokenizer source was given (a GGUF without one does not run in llama.cpp).
  """
  if tokenizer_meta is None:
    source = source_gguf if source_gguf is not None else getattr(model, "gguf_path", None)
    if source is None:
      raise GGUFExportError(
          "export_model: pass tokenizer_meta=tokenizer_metadata(<source .gguf>) or "
          "source_gguf=<the model's original .gguf> so the tokenizer (tokens, merges, "
          "pre-tokenizer, special ids) can be carried over")
    tokenizer_meta = tokenizer_metadata(source)
  return export_gguf(params, model.config, tokenizer_meta, path, ggml_type,
                     requantize=requantize, **kwargs)


def gguf_to_params(tensors: Mapping[str, QArray | np.ndarray], metadata: Mapping[str, Any]
                   ) -> tuple[LlamaHParams, dict[str, Any]]:
  """``(hparams, params)``: a llama GGUF's tensors as the jq param tree of ``models/decoder.py``.

  Kernels become ``(in, out)`` (QArrays transposed exactly: tile ``(32, 1)``), Q/K rows are put in
  Hugging Face order, ``tie_embeddings`` is False when the file has ``output.weight``.  The
  ``params`` dict is the inner one (wrap as ``{"params": params}`` for ``model.apply``).
  """
  hp = LlamaHParams.from_metadata(metadata)
  if "token_embd.weight" not in tensors:
    raise GGUFFormatError("GGUF has no token_embd.weight tensor")
  vocab = tensors["token_embd.weight"].shape[0]
  hp = dataclasses.replace(hp, vocab_size=vocab if hp.vocab_size < 0 else hp.vocab_size,
                           tie_embeddings="output.weight" not in tensors)
  shapes = _expected_shapes(hp)
  inv_globals = {v: k for k, v in _GLOBALS.items()}
  inv_block = {v: k for k, v in {**_BLOCK_KERNELS, **_BLOCK_NORMS}.items()}
  params: dict[str, Any] = {}
  for gname, x in tensors.items():
    base = gname.removesuffix(".weight")
    if base in inv_globals:
      path, kind = inv_globals[base], base
    elif (m := re.fullmatch(r"blk\.(\d+)\.(\w+)", base)) and m.group(2) in inv_block:
      if int(m.group(1)) >= hp.num_layers:
        raise GGUFFormatError(f"GGUF tensor {gname}: layer >= block_count={hp.num_layers}")
      path, kind = f"layers_{int(m.group(1))}/{inv_block[m.group(2)]}", m.group(2)
    else:
      raise GGUFFormatError(f"GGUF tensor {gname!r} is not part of a llama model")
    if kind in ("attn_q", "attn_k"):
      heads = hp.num_heads if kind == "attn_q" else hp.num_kv_heads
      perm = _qk_perm(x.shape[0], heads, gname)
      x = _permute_rows(x, np.argsort(perm), 1)
    if path.endswith("kernel"):
      x = _transpose(x)
    if tuple(x.shape) != shapes[kind]:
      raise GGUFFormatError(f"GGUF tensor {gname} -> params/{path}: shape {tuple(x.shape)}, "
                            f"expected {shapes[kind]} from the metadata")
    node = params
    parts = path.split("/")
    for k in parts[:-1]:
      node = node.setdefault(k, {})
    node[parts[-1]] = x if is_qarray(x) else jnp.asarray(x)
  return hp, params


def _transpose(x: Any) -> Any:
  if not is_qarray(x):
    return np.ascontiguousarray(np.asarray(x).T)
  v = _unpacked_np(x).T
  return QArray(values=jnp.asarray(_pack_np(v, x.qtype)), scale=x.scale.T,
                zero_point=None if x.zero_point is None else x.zero_point.T,
                activation=x.activation, qtype=x.qtype, shape=tuple(x.shape[::-1]),
                tile=tuple(x.tile[::-1]))


def load_gguf_params(path: str | os.PathLike) -> tuple[LlamaHParams, dict[str, Any], dict[str, Any]]:
  """``(hparams, params, metadata)`` of a llama GGUF, quantized tensors as exact jq QArrays."""
  meta, tensors = load_gguf_qarrays(path)
  hp, params = gguf_to_params(tensors, meta)
  return hp, params, meta


__all__ = ["GGMLType", "EXPORT_TYPES", "TWIN_TYPES", "QARRAY_IMPORT_TYPES", "GGUFFormatError",
           "GGUFExportError", "LlamaHParams", "to_ggml_type", "gguf_spec", "quantize_for_gguf",
           "encode_tensor", "decode_tensor", "load_gguf_qarrays", "read_gguf_metadata",
           "tokenizer_metadata", "export_gguf", "export_model", "gguf_to_params",
           "load_gguf_params"]
