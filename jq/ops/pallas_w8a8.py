"""Pallas GPU (Triton backend) int8 × int8 kernels: activation quantization and the W8A8 GEMM.

Twin of :func:`jq.ops.reference.int8_dot_general` (same signature, plus keyword-only ``bias``,
``interpret`` and block sizes), in two kernels:

1. :func:`quantize_per_token` (dynamic mode only): one pass over each row block, row absmax (or
   min/max when asymmetric) -> scale (and zero point) -> int8 values, exactly the formulas of
   :func:`jq.ops.reference.quantize_activations`.  Rows longer than one block are read twice
   (max, then quantize); the second read mostly hits L2.
2. :func:`int8_matmul_2d`: ``acc = Σ (qx − zx)(qw − zw)`` accumulated exactly in int32 as
   ``Σ qx·qw − zw·Σqx − zx·Σqw + K·zx·zw`` from ``int8 × int8 -> int32`` tensor-core dots, then
   the fused epilogue ``y = acc · sx[m] · sw[n] (+ bias[n])``.  Static mode quantizes the float
   activations *inside* this kernel (one calibrated scale), so static W8A8 is a single kernel.
   Unsigned operands (uint8 weights or activations) are shifted by −128 into int8 in-kernel, with
   their zero points, which leaves ``q − z`` unchanged (as in the reference).

With ``split_k > 1`` (decode), each split writes its exact int32 partial (corrections included) and
a small XLA epilogue sums the partials and rescales, so the int32 result stays exact.

fp8 (e4m3): XLA's native fp8 dot (:func:`jq.ops.reference.fp8_dot_general`) or the Mosaic GPU
kernel (:mod:`jq.ops.mosaic_w8a8`); not in this Triton kernel.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.typing import ArrayLike

from jq import _compat
from jq.ops import reference
from jq.ops.pallas_wo import BlockConfig
from jq.qarray import ActivationQuant, QArray
from jq.qtypes import QType
from jq.spec import ActivationSpec, ActMode

_FLOAT_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(np.float16), np.dtype(np.float32))


def _round_half_even(v: jax.Array) -> jax.Array:
  """``jnp.round`` (ties to even) from floor/compare/select only: Triton has no ``round`` rule."""
  f = jnp.floor(v)
  d = v - f
  odd = f - 2.0 * jnp.floor(f * 0.5)  # 1.0 when f is odd, else 0.0
  return jnp.where(d > 0.5, f + 1.0, jnp.where(d < 0.5, f, f + odd))


# ---- activation quantization ------------------------------------------------------------------

def _act_quant_kernel(x_ref, q_ref, s_ref, *z_ref, m: int, k: int, bm: int, bk: int, nk: int,
                      symmetric: bool, qmin: int, qmax: int, shift: int):
  """Per-row scale (and zero point) and int8 values of a ``(bm, K)`` block of rows."""
  i = pl.program_id(0)
  m0 = i * bm
  rmask = (m0 + jnp.arange(bm)) < m

  def load(c):
    kmask = (c * bk + jnp.arange(bk)) < k
    mask = rmask[:, None] & kmask[None, :]
    xb = _compat.load(x_ref.at[pl.ds(m0, bm), pl.ds(c * bk, bk)], mask=mask, other=0)
    return xb.astype(jnp.float32), mask

  def stats(xb):
    if symmetric:
      return (jnp.max(jnp.abs(xb), axis=1),)
    return jnp.min(xb, axis=1), jnp.max(xb, axis=1)

  if nk == 1:
    x0, mask0 = load(0)
    st = stats(x0)
  else:
    def merge(c, acc):
      new = stats(load(c)[0])
      if symmetric:
        return (jnp.maximum(acc[0], new[0]),)
      return jnp.minimum(acc[0], new[0]), jnp.maximum(acc[1], new[1])
    # zeros are neutral: |x| >= 0, and the asymmetric range is widened to contain 0 below
    st = lax.fori_loop(0, nk, merge,
                       tuple(jnp.zeros((bm,), jnp.float32) for _ in range(1 if symmetric else 2)))
  # ``a / c`` for a constant ``c`` is ``a * (1 / c)``: the rewrite XLA applies to the reference
  # under jit, so both round identically.
  if symmetric:
    s = st[0] * np.float32(1.0 / qmax)
  else:  # masked lanes load 0, and the range is widened to contain 0 anyway
    lo, hi = jnp.minimum(st[0], 0.0), jnp.maximum(st[1], 0.0)
    s = (hi - lo) * np.float32(1.0 / (qmax - qmin))
  s = jnp.where(s > 0, s, 1.0)
  z = None
  if not symmetric:
    z = jnp.clip(_round_half_even(qmin - lo / s), qmin, qmax)

  def quant(xb):
    v = _round_half_even(xb / s[:, None])
    if z is not None:
      v = v + z[:, None]
    return (jnp.clip(v, qmin, qmax).astype(jnp.int32) - shift).astype(jnp.int8)

  def put(c, xb, mask):
    _compat.store(q_ref.at[pl.ds(m0, bm), pl.ds(c * bk, bk)], quant(xb), mask=mask)

  if nk == 1:
    put(0, x0, mask0)
  else:
    lax.fori_loop(0, nk, lambda c, carry: put(c, *load(c)), None)
  _compat.store(s_ref.at[pl.ds(m0, bm)], s, mask=rmask)
  if z_ref:
    _compat.store(z_ref[0].at[pl.ds(m0, bm)], z.astype(jnp.int32) - shift, mask=rmask)


@functools.partial(jax.jit, static_argnames=("spec", "block_m", "block_k", "num_warps",
                                             "interpret"))
def quantize_per_token(x: jax.Array, spec: ActivationSpec = ActivationSpec(), *,
                       block_m: int | None = None, block_k: int | None = None,
                       num_warps: int | None = None, interpret: bool = False
                       ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """Dynamic per-row quantization of ``x (M, K)`` to int8 storage.

  Formulas of :func:`jq.ops.reference.quantize_activations` (dynamic mode, contracting axis -1):
  symmetric ``s = absmax / qmax``; asymmetric ``s = (max − min) / (qmax − qmin)`` over the range
  widened to contain 0, ``z = clip(round(qmin − min / s))``; ``q = clip(round(x / s) + z)``;
  all-zero rows get ``s = 1``.

  Returns:
    ``(q8, s, z8)``: ``q8`` int8 ``(M, K)`` holding ``q − 128`` for uint8 specs (else ``q``);
    ``s`` float32 ``(M,)``; ``z8`` int32 ``(M,)`` (shifted like ``q8``), or None if symmetric.
  """
  m, k = x.shape
  qt = spec.qtype
  if m == 0 or k == 0:
    return (jnp.zeros((m, k), jnp.int8), jnp.ones((m,), jnp.float32),
            None if spec.symmetric else jnp.zeros((m,), jnp.int32))
  bk = block_k or min(_compat.next_pow2(k), 4096)
  bm = block_m or max(1, min(_compat.next_pow2(m), 8192 // bk, 16))
  nk = _compat.cdiv(k, bk)
  shift = 0 if qt.signed else 128
  kernel = functools.partial(_act_quant_kernel, m=m, k=k, bm=bm, bk=bk, nk=nk,
                             symmetric=spec.symmetric, qmin=qt.qmin, qmax=qt.qmax, shift=shift)
  out_shape = [jax.ShapeDtypeStruct((m, k), jnp.int8), jax.ShapeDtypeStruct((m,), jnp.float32)]
  if not spec.symmetric:
    out_shape.append(jax.ShapeDtypeStruct((m,), jnp.int32))
  outs = pl.pallas_call(
      kernel, out_shape=out_shape, grid=(_compat.cdiv(m, bm),), interpret=interpret,
      compiler_params=_compat.triton_params(num_warps=num_warps or (8 if bm * bk >= 4096 else 4),
                                            num_stages=1),
      name="jq_quantize_per_token")(x)
  return outs[0], outs[1], (outs[2] if not spec.symmetric else None)


def quantize_activations(x: ArrayLike, contracting, act: ActivationQuant, *,
                         interpret: bool = False, **block_kwargs: Any
                         ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """Pallas twin of :func:`jq.ops.reference.quantize_activations` (dynamic mode, last axis).

  Same outputs (int32 ``q`` in ``[qmin, qmax]``, keepdims float32 scale, int32 zero point); the
  fast path inside :func:`int8_dot_general` keeps :func:`quantize_per_token`'s int8 storage.
  """
  x = jnp.asarray(x)
  if act.spec.mode is not ActMode.DYNAMIC or tuple(a % x.ndim for a in contracting) != (
      x.ndim - 1,):
    raise NotImplementedError("pallas quantize_activations: dynamic mode over the last axis only")
  lead = x.shape[:-1]
  q8, s, z8 = quantize_per_token(x.reshape(-1, x.shape[-1]), act.spec, interpret=interpret,
                                 **block_kwargs)
  shift = 0 if act.spec.qtype.signed else 128
  q = (q8.astype(jnp.int32) + shift).reshape(x.shape)
  s = s.reshape(*lead, 1)
  z = None if z8 is None else (z8 + shift).reshape(*lead, 1)
  return q, s, z


# ---- int8 GEMM --------------------------------------------------------------------------------

def unsupported_reason(x_shape, x_dtype, w: QArray, dimension_numbers) -> str | None:
  """Why :func:`int8_dot_general` cannot run ``x × w`` (None when it can)."""
  where = f"pallas int8: x {tuple(x_shape)} {np.dtype(x_dtype)}, w QArray(" \
          f"{w.qtype.value}, shape={w.shape}, tile={w.tile})"
  if w.activation is None:
    return f"{where}: the weight carries no activation quantization (use the weight-only kernel)"
  if w.qtype not in (QType.INT8, QType.UINT8):
    return f"{where}: int8 x int8 needs an 8-bit weight"
  if (why := reference.plain_matmul_reason(x_shape, w.shape, dimension_numbers)) is not None:
    return f"{where}: {why}"
  if len(w.shape) != 2:
    return f"{where}: only a 2-D (K, N) weight is supported"
  if np.dtype(x_dtype) not in _FLOAT_DTYPES:
    return f"{where}: x dtype must be bfloat16, float16 or float32"
  if w.scale.shape[0] != 1 or w.scale.shape[1] not in (1, w.shape[1]):
    return f"{where}: weight scales must be per output channel or per tensor"
  a = w.activation
  if a.spec.mode is ActMode.STATIC and (a.scale is None or np.size(a.scale) != 1):
    return f"{where}: static activation quantization needs one calibrated scale"
  return None


def default_config(m: int, k: int, n: int) -> BlockConfig:
  """Shape-based launch parameters of the int8 GEMM (int8 dots want block_k >= 32)."""
  kp = max(32, _compat.next_pow2(k))
  if m <= 64:
    bm = min(64, max(16, _compat.next_pow2(m)))
    bn, bk = 64, min(256, kp)
    nb = max(1, _compat.cdiv(n, bn) * _compat.cdiv(m, bm))
    nkb = _compat.cdiv(k, bk)
    split = 1
    target = 2 * _compat.num_sms()
    if nb < target:
      split = max(1, min(_compat.cdiv(target, nb), nkb // 4))
    stages = _compat.fit_stages(bm * bk + bk * bn, 0, 4)
    return BlockConfig(block_m=bm, block_n=bn, block_k=bk, split_k=split, num_warps=4,
                       num_stages=stages)
  bm = 64 if m <= 128 else 128
  bk = min(128, kp)
  return BlockConfig(block_m=bm, block_n=128, block_k=bk, split_k=1,
                     num_warps=8 if bm >= 128 else 4,
                     num_stages=_compat.fit_stages(bm * bk + bk * 128, 0, 3))


def _int8_kernel(x_ref, w_ref, xs_ref, ws_ref, *refs, m: int, k: int, n: int, bm: int, bn: int,
                 bk: int, k_steps: int, split: bool, x_float: bool, x_qmin: int, x_qmax: int,
                 x_shift: int, w_shift: int, has_xz: bool, has_wz: bool, has_bias: bool):
  """One ``(bm, bn)`` tile of the W8A8 GEMM (or its exact int32 split-K partial)."""
  refs = list(refs)
  xz_ref = refs.pop(0) if has_xz else None
  wz_ref = refs.pop(0) if has_wz else None
  b_ref = refs.pop(0) if has_bias else None
  o_ref = refs.pop(0)
  i, j, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  m0, n0 = i * bm, j * bn
  rows, cols = m0 + jnp.arange(bm), n0 + jnp.arange(bn)
  rmask, cmask = rows < m, cols < n
  if x_float or not split:
    xs = _compat.load(xs_ref.at[pl.ds(m0, bm)], mask=rmask, other=1.0)
  xz = _compat.load(xz_ref.at[pl.ds(m0, bm)], mask=rmask, other=0) if has_xz else None

  def body(t, carry):
    acc, rs, cs = carry
    k0 = (s * k_steps + t) * bk
    kmask = (k0 + jnp.arange(bk)) < k
    xmask = rmask[:, None] & kmask[None, :]
    xb = _compat.load(x_ref.at[pl.ds(m0, bm), pl.ds(k0, bk)], mask=xmask, other=0)
    if x_float:  # static mode: quantize in-kernel with the calibrated per-tensor scale
      v = _round_half_even(xb.astype(jnp.float32) / xs[:, None])
      if has_xz:
        v = v + (xz + x_shift)[:, None].astype(jnp.float32)
      v = jnp.clip(v, x_qmin, x_qmax).astype(jnp.int32) - x_shift
      xb = jnp.where(xmask, v, 0).astype(jnp.int8)  # padding lanes must stay 0
    wb = _compat.load(w_ref.at[pl.ds(k0, bk), pl.ds(n0, bn)],
                      mask=kmask[:, None] & cmask[None, :], other=w_shift)
    if w_shift:  # uint8 weights: q − 128 in int8 (padding lanes loaded as 128 -> 0)
      wb = (wb.astype(jnp.int32) - w_shift).astype(jnp.int8)
    acc = acc + jnp.dot(xb, wb, preferred_element_type=jnp.int32)
    if has_wz:
      rs = rs + jnp.sum(xb.astype(jnp.int32), axis=1)
    if has_xz:
      cs = cs + jnp.sum(wb.astype(jnp.int32), axis=0)
    return acc, rs, cs

  init = (jnp.zeros((bm, bn), jnp.int32), jnp.zeros((bm,), jnp.int32), jnp.zeros((bn,), jnp.int32))
  acc, rs, cs = lax.fori_loop(0, k_steps, body, init)
  wz = None
  if has_wz:
    wz = _compat.load(wz_ref.at[pl.ds(n0, bn)], mask=cmask, other=0)
    acc = acc - wz[None, :] * rs[:, None]
  if has_xz:
    acc = acc - xz[:, None] * cs[None, :]
    if has_wz:  # the constant term once per output (in split 0 when split-K)
      kterm = jnp.int32(k) * xz[:, None] * wz[None, :]
      acc = acc + (jnp.where(s == 0, kterm, 0) if split else kterm)
  omask = rmask[:, None] & cmask[None, :]
  if split:
    _compat.store(o_ref.at[s, pl.ds(m0, bm), pl.ds(n0, bn)], acc, mask=omask)
    return
  ws = _compat.load(ws_ref.at[pl.ds(n0, bn)], mask=cmask, other=0.0)
  y = acc.astype(jnp.float32) * xs[:, None] * ws[None, :]
  if has_bias:
    y = y + _compat.load(b_ref.at[pl.ds(n0, bn)], mask=cmask, other=0).astype(jnp.float32)[None, :]
  _compat.store(o_ref.at[pl.ds(m0, bm), pl.ds(n0, bn)], y.astype(o_ref.dtype), mask=omask)


@functools.partial(jax.jit, static_argnames=(
    "x_qtype", "out_dtype", "block_m", "block_n", "block_k", "split_k", "num_warps", "num_stages",
    "interpret"))
def int8_matmul_2d(x: jax.Array, x_scale: jax.Array, w_values: jax.Array, w_scale: jax.Array, *,
                   x_zero_point: jax.Array | None = None, w_zero_point: jax.Array | None = None,
                   bias: jax.Array | None = None, x_qtype: QType = QType.INT8,
                   out_dtype=jnp.bfloat16, block_m: int | None = None,
                   block_n: int | None = None, block_k: int | None = None,
                   split_k: int | None = None, num_warps: int | None = None,
                   num_stages: int | None = None, interpret: bool = False) -> jax.Array:
  """``y = (Σ_k (qx − zx)(qw − zw)) · sx[m] · sw[n] + bias[n]`` with int32 accumulation.

  Args:
    x: either int8 ``(M, K)`` already-quantized activations (``q − 128`` for uint8 specs; from
      :func:`quantize_per_token`) or float ``(M, K)`` activations, quantized in-kernel to
      ``x_qtype`` with the (per-row, usually broadcast per-tensor) ``x_scale`` / ``x_zero_point``.
    x_scale: float32 ``(M,)``.
    w_values: int8 or uint8 ``(K, N)`` weight values.
    w_scale: float ``(N,)``.
    x_zero_point: int32 ``(M,)`` activation zero point in ``x``'s int8 storage convention
      (shifted by −128 for uint8 specs), or None.
    w_zero_point: int ``(N,)`` weight zero point (unshifted, in ``w_values``' convention), or None.
    bias: optional ``(N,)`` added in the epilogue.
    x_qtype: activation type when ``x`` is float (INT8 or UINT8).
    out_dtype: output dtype.
    block_m, block_n, block_k, split_k, num_warps, num_stages: launch overrides.
    interpret: Pallas interpret mode (CPU).

  Returns:
    ``(M, N)`` ``out_dtype``.
  """
  m, k = x.shape
  kw, n = w_values.shape
  if kw != k:
    raise ValueError(f"pallas int8: x {x.shape} and w {w_values.shape} do not contract")
  cfg = default_config(m, k, n)
  cfg = dataclasses.replace(
      cfg, **{f: v for f, v in dict(block_m=block_m, block_n=block_n, block_k=block_k,
                                    split_k=split_k, num_warps=num_warps,
                                    num_stages=num_stages).items() if v is not None})
  for f in ("block_m", "block_n", "block_k"):
    v = getattr(cfg, f)
    if v < 16 or v & (v - 1):
      raise ValueError(f"{f}={v} must be a power of two >= 16 (Triton tensor and dot shapes)")
  if cfg.block_k < 32:
    raise ValueError(f"block_k={cfg.block_k}: int8 tensor-core dots need block_k >= 32")
  if m == 0 or n == 0 or k == 0:  # empty sums
    y = jnp.zeros((m, n), jnp.float32)
    return (y if bias is None else y + bias.astype(jnp.float32)[None, :]).astype(out_dtype)
  bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
  nkb = _compat.cdiv(k, bk)
  k_steps = _compat.cdiv(nkb, max(1, min(cfg.split_k, nkb)))
  nsplit = _compat.cdiv(nkb, k_steps)
  x_float = jnp.issubdtype(x.dtype, jnp.floating)
  w_shift = 128 if w_values.dtype == jnp.uint8 else 0
  wz = None
  if w_zero_point is not None:
    wz = w_zero_point.astype(jnp.int32).reshape(-1) - w_shift
    wz = jnp.broadcast_to(wz, (n,))
  elif w_shift:
    wz = jnp.full((n,), -w_shift, jnp.int32)  # uint8 with no zero point: q − 0 = (q−128) + 128
  args = [x, w_values, jnp.broadcast_to(x_scale.astype(jnp.float32).reshape(-1), (m,)),
          jnp.broadcast_to(w_scale.astype(jnp.float32).reshape(-1), (n,))]
  if x_zero_point is not None:
    args.append(jnp.broadcast_to(x_zero_point.astype(jnp.int32).reshape(-1), (m,)))
  if wz is not None:
    args.append(wz)
  if bias is not None and nsplit == 1:
    args.append(bias.reshape(n))
  x_shift = 0 if x_qtype.signed else 128
  kernel = functools.partial(
      _int8_kernel, m=m, k=k, n=n, bm=bm, bn=bn, bk=bk, k_steps=k_steps, split=nsplit > 1,
      x_float=bool(x_float), x_qmin=x_qtype.qmin, x_qmax=x_qtype.qmax, x_shift=x_shift,
      w_shift=w_shift, has_xz=x_zero_point is not None, has_wz=wz is not None,
      has_bias=bias is not None and nsplit == 1)
  out_shape = jax.ShapeDtypeStruct((nsplit, m, n) if nsplit > 1 else (m, n),
                                   jnp.int32 if nsplit > 1 else out_dtype)
  y = pl.pallas_call(
      kernel, out_shape=out_shape, grid=(_compat.cdiv(m, bm), _compat.cdiv(n, bn), nsplit),
      interpret=interpret, name="jq_int8_matmul",
      compiler_params=_compat.triton_params(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
  )(*args)
  if nsplit > 1:  # exact int32 sum of the partials, then the same epilogue in XLA
    acc = jnp.sum(y, axis=0, dtype=jnp.int32)
    y = acc.astype(jnp.float32) * args[2][:, None] * args[3][None, :]
    if bias is not None:
      y = y + bias.astype(jnp.float32)[None, :]
    y = y.astype(out_dtype)
  return y


def int8_dot_general(x: ArrayLike, w: QArray, dimension_numbers, precision=None,
                     preferred_element_type=None, *, out_sharding=None,
                     bias: ArrayLike | None = None, interpret: bool = False,
                     **block_kwargs: Any) -> jax.Array:
  """Pallas twin of :func:`jq.ops.reference.int8_dot_general` (optionally ``+ bias``).

  Dynamic mode runs :func:`quantize_per_token` then :func:`int8_matmul_2d`; static mode is one
  kernel.  Supports ``x[..., K] · w[K, N]`` only (see :func:`unsupported_reason`).

  Example:
    >>> y = int8_dot_general(x, w8a8_kernel, (((x.ndim - 1,), (0,)), ((), ())))
  """
  del precision  # integer dots are exact
  x = jnp.asarray(x)
  if out_sharding is not None:
    raise NotImplementedError("pallas int8: out_sharding is not supported")
  reason = unsupported_reason(x.shape, x.dtype, w, dimension_numbers)
  if reason:
    raise NotImplementedError(reason)
  out_dtype = preferred_element_type or x.dtype
  lead, k, n = x.shape[:-1], w.shape[0], w.shape[1]
  x2 = x.reshape(-1, k)
  act = w.activation
  qt = act.spec.qtype
  shift = 0 if qt.signed else 128
  if act.spec.mode is ActMode.DYNAMIC:
    qblock = {f: block_kwargs.pop(f) for f in ("quant_block_m", "quant_block_k")
              if f in block_kwargs}
    xin, xs, xz = quantize_per_token(x2, act.spec, interpret=interpret,
                                     block_m=qblock.get("quant_block_m"),
                                     block_k=qblock.get("quant_block_k"))
  else:
    xin = x2
    xs = jnp.asarray(act.scale, jnp.float32).reshape(1)
    xz = None
    if act.zero_point is not None:
      xz = jnp.asarray(act.zero_point).astype(jnp.float32).reshape(1)
      xz = _round_half_even(xz).astype(jnp.int32) - shift
    elif not act.spec.symmetric:
      raise ValueError("static asymmetric activation quantization needs a calibrated zero point")
  y = int8_matmul_2d(xin, xs, w.values, w.scale.reshape(-1), x_zero_point=xz,
                     w_zero_point=None if w.zero_point is None else w.zero_point.reshape(-1),
                     bias=None if bias is None else jnp.asarray(bias), x_qtype=qt,
                     out_dtype=np.dtype(out_dtype), interpret=interpret, **block_kwargs)
  return y.reshape(*lead, n)


__all__ = ["quantize_per_token", "quantize_activations", "int8_matmul_2d", "int8_dot_general",
           "unsupported_reason", "default_config"]
