"""Exact fit of a QArray's grid into GGUF blocks (export without re-rounding).

A 2-D QArray, blocks moved to the last axis, becomes integer offsets ``k = v - zp`` and per-element
scales (:func:`_qarray_codes`); :func:`_fit_fields` finds legacy block fields (fp16 ``d``, codes in
range, for Q4_1/Q5_1 an fp16 offset ``m = -c·d``) that dequantize exactly to ``k · s``, and
:func:`_fit_q6_k` finds Q6_K super-blocks that do.  Whatever cannot be stored exactly raises a
:class:`GGUFExportError` that names the tensor and the first offending block.
"""
from __future__ import annotations

import numpy as np

from jq.io.hints import REQUANTIZE_HINT
from jq.io.gguf.blocks import _Fields, _q6_k_block_bytes
from jq.io.gguf.qarray_np import _expand_np, _unpacked_np
from jq.io.gguf.types import _ASYM_QMAX, _SYM, QK_K, GGMLType, GGUFExportError
from jq.qarray import QArray


def _qarray_codes(q: QArray, block_axis: int, name: str) -> tuple[np.ndarray, np.ndarray]:
  """``(k, s)`` of a 2-D QArray with the block axis moved last: integer offsets ``k = v - zp``
  (int32, shape (rows, n)) and per-element float32 scales ``s`` (rows, n) with ``x = k · s``."""
  where = f"{name}: QArray(qtype={q.qtype.value}, shape={q.shape}, tile={q.tile})"
  if q.qtype.is_table:
    raise GGUFExportError(f"{where}: NF4 table values have no GGUF equivalent; pass "
                          f"{REQUANTIZE_HINT} to dequantize and quantize with gguf's reference")
  if q.qtype.is_float:
    raise GGUFExportError(f"{where}: {q.qtype.value} (float8) values are not integer codes and "
                          "GGUF has no float8 type; write this tensor as F16/BF16/F32, or pass "
                          f"{REQUANTIZE_HINT} to dequantize and quantize with gguf's reference")
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
        f"scales, or pass {REQUANTIZE_HINT}")
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
  L = (sign_out[:, :, None] * kb + 32).reshape(nb, QK_K)
  return _q6_k_block_bytes(L, sc_out, d_out).reshape(rows, -1)


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
      f"jq.io.gguf.quantize_for_gguf(w, '{t.name.lower()}') (or a jq spec with "
      f"scale_dtype='float16' on a matching grid), or pass {REQUANTIZE_HINT} to round again with "
      "gguf's reference quantizer")
