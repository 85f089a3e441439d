"""Pallas GPU (Triton backend) weight-only matmul kernels: ``y = x @ dequantize(w)``.

Twin of :func:`jq.ops.reference.weight_only_dot_general` (same signature, plus keyword-only
``interpret`` and block sizes).  Supported weights: 2-D ``(K, N)`` QArrays of type int8 / uint8
(per-channel or per-tensor scales) and int4 / uint4 (packed two per byte along N; per-channel or
group-wise along K, any group size with a power-of-two factor >= 16, e.g. 32 / 64 / 128), with or
without zero points.  Partial last groups and shapes that no block divides are masked in-kernel
(real models have K=576, N=1536); nothing is padded in HBM.

Math (``K`` blocks of ``bk`` rows, each inside one scale group ``g``)::

  y[m, n] = Σ_blocks s[g, n] · Σ_{k ∈ block} x[m, k] · (q[k, n] − zp[g, n])

``q − zp`` is an integer with ``|q − zp| ≤ 255``, exact in bf16/f16, so each block is one
tensor-core ``jnp.dot`` with float32 accumulation; the group scale multiplies the block's partial
sum (``bm × bn`` multiplies per block instead of ``bk × bn``).  Per-channel scales are applied once
in the epilogue.  int4: a byte ``b`` holds column ``2j`` in its low nibble and ``2j+1`` in its high
nibble, so the kernel keeps two accumulators, ``x @ lo`` (even columns) and ``x @ hi`` (odd
columns), and interleaves them on store (``stack(..., -1).reshape``, a Triton ``join``).
Signed nibbles are sign-extended with ``(u ^ 8) − 8``.

Two launch shapes share one kernel body:

* decode (``M <= 64``): ``block_m`` = M rounded up to a power of two (>= 16, the Triton dot
  minimum), narrow N tiles and split-K so that the ``N / block_n`` programs fill the GPU; split-K
  partials (float32, scales applied) are summed by a tiny XLA epilogue.
* large M: ``128 × 128`` output tiles, K loop pipelined by Triton (``num_stages``).

Block sizes are keyword arguments with shape-based defaults (:func:`default_config`).
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
from jq.qarray import QArray
from jq.qtypes import QType

SUPPORTED_QTYPES = (QType.INT8, QType.UINT8, QType.INT4, QType.UINT4)
_FLOAT_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(np.float16), np.dtype(np.float32))


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockConfig:
  """Launch parameters of a weight-only or int8 matmul kernel.

  Attributes:
    block_m: rows of ``x`` per program (power of two >= 16).
    block_n: logical output columns per program (power of two; >= 32 for int4).
    block_k: contraction rows per loop step (power of two >= 16; divides the scale group).
    split_k: programs sharing one output tile along K (partials summed in XLA).
    num_warps: Triton warps per program.
    num_stages: Triton software-pipelining depth of the K loop.
  """
  block_m: int
  block_n: int
  block_k: int
  split_k: int = 1
  num_warps: int = 4
  num_stages: int = 3


def _pow2_factor(n: int) -> int:
  """Largest power of two dividing ``n``."""
  return n & -n


def unsupported_reason(x_shape, x_dtype, w: QArray, dimension_numbers) -> str | None:
  """Why :func:`weight_only_dot_general` cannot run ``x × w`` (None when it can).

  The dispatch registry calls this to fall back to the XLA reference.
  """
  where = f"pallas weight-only: x {tuple(x_shape)} {np.dtype(x_dtype)}, w QArray(" \
          f"{w.qtype.value}, shape={w.shape}, tile={w.tile})"
  if w.qtype not in SUPPORTED_QTYPES:
    return f"{where}: qtype {w.qtype.value} is not one of int8/uint8/int4/uint4"
  if (why := reference.plain_matmul_reason(x_shape, w.shape, dimension_numbers)) is not None:
    return f"{where}: {why}"
  if np.dtype(x_dtype) not in _FLOAT_DTYPES:
    return f"{where}: x dtype must be bfloat16, float16 or float32"
  c = len(tuple(dimension_numbers[0][0]))
  if (w.ndim > 2 or c > 1) and reference.matrix_tile(w, c) is None:
    return (f"{where}: the scales do not flatten to (K, N) (each output axis must be per "
            "channel, or all per tensor; groups only inside the last contracting axis) or the "
            "last axis is not a whole number of bytes")
  if w.ndim == 2 and w.scale.shape[1] not in (1, w.shape[1]):
    return f"{where}: scales must be per output channel or per tensor along N"
  g = reference.group_rows(w if c == 1 else reference.as_matrix(w, c))
  if g is not None and _pow2_factor(g) < 16:
    return f"{where}: K group size {g} needs a power-of-two factor >= 16"
  return None


def default_config(m: int, k: int, n: int, *, packed: bool, group: int | None,
                   x_bytes: int = 2) -> BlockConfig:
  """Shape-based launch parameters (tuned by reasoning for an H100; see benchmarks/matmul.py)."""
  bk_cap = 1 << 30 if group is None else _pow2_factor(group)
  kp = max(16, _compat.next_pow2(k))
  if m <= 64:  # decode / small batch: memory bound, maximise bytes in flight
    # block_n=128 with block_k=128 (int8) / 64 (int4) were the fastest of the configurations
    # benchmarks/matmul.py --sweep tried on an H100 at M=1 (benchmarks/results/gpu_h100.md)
    bm = min(64, max(16, _compat.next_pow2(m)))
    bn = 128
    bk = min(64 if packed else 128, bk_cap, kp)
    nb = max(1, _compat.cdiv(n, bn) * _compat.cdiv(m, bm))
    nkb = _compat.cdiv(k, bk)
    split = 1
    target = 2 * _compat.num_sms()
    if nb < target:
      split = max(1, min(_compat.cdiv(target, nb), nkb // 4))
    stages = _fit_stages(bm, bn, bk, packed, x_bytes, 4)
    return BlockConfig(block_m=bm, block_n=bn, block_k=bk, split_k=split, num_warps=4,
                       num_stages=stages)
  bm = 64 if m <= 128 else 128
  bn = 128
  bk = min(64 if not packed else 128, bk_cap, kp)
  stages = _fit_stages(bm, bn, bk, packed, x_bytes, 3)
  return BlockConfig(block_m=bm, block_n=bn, block_k=bk, split_k=1,
                     num_warps=8 if bm * bn >= 128 * 128 else 4, num_stages=stages)


def smem_bytes(bm: int, bn: int, bk: int, packed: bool, x_bytes: int, stages: int) -> int:
  """Shared-memory estimate of a launch: per pipeline stage the x tile and the weight tile (int8,
  or two int4 per byte), plus the dequantized bf16 weight tile once."""
  return stages * (bm * bk * x_bytes + bk * bn // (2 if packed else 1)) + bk * bn * 2


def _fit_stages(bm: int, bn: int, bk: int, packed: bool, x_bytes: int, stages: int) -> int:
  per_stage = smem_bytes(bm, bn, bk, packed, x_bytes, 1) - smem_bytes(bm, bn, bk, packed,
                                                                       x_bytes, 0)
  return _compat.fit_stages(per_stage, smem_bytes(bm, bn, bk, packed, x_bytes, 0), stages)


def _resolve_config(m, k, n, *, packed, group, block_m, block_n, block_k, split_k, num_warps,
                    num_stages, x_bytes: int = 2) -> BlockConfig:
  cfg = default_config(m, k, n, packed=packed, group=group, x_bytes=x_bytes)
  cfg = dataclasses.replace(
      cfg, **{f: v for f, v in dict(block_m=block_m, block_n=block_n, block_k=block_k,
                                    split_k=split_k, num_warps=num_warps,
                                    num_stages=num_stages).items() if v is not None})
  for f in ("block_m", "block_n", "block_k"):
    v = getattr(cfg, f)
    if v < 16 or v & (v - 1):
      raise ValueError(f"{f}={v} must be a power of two >= 16 (Triton tensor and dot shapes)")
  if packed and cfg.block_n < 32:
    raise ValueError(f"block_n={cfg.block_n}: int4 kernels need block_n >= 32 (16 packed bytes)")
  if group is not None and group % cfg.block_k:
    raise ValueError(f"block_k={cfg.block_k} must divide the K group size {group}")
  if cfg.split_k < 1:
    raise ValueError(f"split_k={cfg.split_k} must be >= 1")
  return cfg


def _wo_kernel(x_ref, w_ref, s_ref, *refs, m: int, k: int, n: int, bm: int, bn: int, bk: int,
               k_steps: int, group_blocks: int | None, n_groups: int, packed: bool, signed: bool,
               has_zp: bool, split: bool, precision):
  """One ``(bm, bn)`` output tile (or its split-K partial) of ``x @ dequant(w)``."""
  zp_ref = refs[0] if has_zp else None
  o_ref = refs[-1]
  i, j, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  xdt = x_ref.dtype
  m0 = i * bm
  rows = m0 + jnp.arange(bm)
  rmask = rows < m
  bn2 = bn // 2 if packed else bn
  # Logical output columns handled by the (even, odd) accumulators (one accumulator if 8-bit).
  if packed:
    ecols = j * bn + 2 * jnp.arange(bn2)
    col_sets = (ecols, ecols + 1)
  else:
    col_sets = (j * bn + jnp.arange(bn),)
  col_masks = tuple(c < n for c in col_sets)

  def per_col(ref, g, dtype):
    """Row ``g`` of a per-(group, column) tensor at this tile's column sets."""
    g = jnp.asarray(g, jnp.int32)  # a Python int index is not a valid interpret-mode indexer
    if packed:
      return tuple(_compat.load(ref.at[g, c], mask=cm, other=0).astype(dtype)
                   for c, cm in zip(col_sets, col_masks))
    return (_compat.load(ref.at[g, pl.ds(j * bn, bn)], mask=col_masks[0], other=0).astype(dtype),)

  if group_blocks is None and has_zp:
    zps0 = per_col(zp_ref, 0, xdt)

  def body(t, accs):
    kb = s * k_steps + t
    k0 = kb * bk
    kmask = (k0 + jnp.arange(bk)) < k
    xb = _compat.load(x_ref.at[pl.ds(m0, bm), pl.ds(k0, bk)],
                      mask=rmask[:, None] & kmask[None, :], other=0)
    if packed:
      c0 = j * bn2
      cmask = (c0 + jnp.arange(bn2)) < w_ref.shape[1]
      b = _compat.load(w_ref.at[pl.ds(k0, bk), pl.ds(c0, bn2)],
                       mask=kmask[:, None] & cmask[None, :], other=0)  # uint8
      ws = [b & 0xF, b >> 4]  # low nibble: even column, high nibble: odd column
      if signed:  # sign-extend 4 -> 8 bits
        ws = [(v ^ 8).astype(jnp.int8) - 8 for v in ws]
    else:
      ws = [_compat.load(w_ref.at[pl.ds(k0, bk), pl.ds(j * bn, bn)],
                         mask=kmask[:, None] & col_masks[0][None, :], other=0)]
    # 8-bit integers convert exactly to bf16/f16/f32, and so does q − zp (|q − zp| <= 255)
    ws = [v.astype(xdt) for v in ws]
    if group_blocks is None:
      g = None
      zps = zps0 if has_zp else None
    else:  # K blocks past the end (last split) clamp to the last group; their x is all zero
      g = jnp.minimum(lax.div(kb, group_blocks), n_groups - 1)
      zps = per_col(zp_ref, g, xdt) if has_zp else None
    if zps is not None:
      ws = [v - z[None, :] for v, z in zip(ws, zps)]
    parts = [jnp.dot(xb, v, precision=precision, preferred_element_type=jnp.float32) for v in ws]
    if g is not None:
      parts = [p * sc[None, :] for p, sc in zip(parts, per_col(s_ref, g, jnp.float32))]
    return tuple(a + p for a, p in zip(accs, parts))

  init = tuple(jnp.zeros((bm, bn2), jnp.float32) for _ in col_sets)
  accs = lax.fori_loop(0, k_steps, body, init)
  if group_blocks is None:
    accs = tuple(a * sc[None, :] for a, sc in zip(accs, per_col(s_ref, 0, jnp.float32)))
  out = jnp.stack(accs, axis=-1).reshape(bm, bn) if packed else accs[0]
  cols = j * bn + jnp.arange(bn)
  omask = rmask[:, None] & (cols < n)[None, :]
  if split:
    _compat.store(o_ref.at[s, pl.ds(m0, bm), pl.ds(j * bn, bn)], out, mask=omask)
  else:
    _compat.store(o_ref.at[pl.ds(m0, bm), pl.ds(j * bn, bn)], out.astype(o_ref.dtype), mask=omask)


@functools.partial(jax.jit, static_argnames=(
    "out_dtype", "precision", "block_m", "block_n", "block_k", "split_k", "num_warps",
    "num_stages", "interpret"))
def wo_matmul_2d(x: jax.Array, w: QArray, *, out_dtype=None, precision=None,
                 block_m: int | None = None, block_n: int | None = None,
                 block_k: int | None = None, split_k: int | None = None,
                 num_warps: int | None = None, num_stages: int | None = None,
                 interpret: bool = False) -> jax.Array:
  """``x (M, K) @ dequantize(w) (K, N) -> (M, N)`` with a Pallas kernel (see module docstring).

  Args:
    x: float activations, shape ``(M, K)``.
    w: a supported QArray of shape ``(K, N)`` (see :func:`unsupported_reason`).
    out_dtype: output dtype (default ``x.dtype``).
    precision: ``jnp.dot`` precision of the per-block dots (matters for float32 ``x`` only:
      ``HIGHEST`` is IEEE fp32, the default TF32 on GPU).
    block_m, block_n, block_k, split_k, num_warps, num_stages: launch overrides
      (:class:`BlockConfig`); defaults from :func:`default_config`.
    interpret: run the kernel in Pallas interpret mode (CPU, tests).

  Returns:
    ``(M, N)`` array of ``out_dtype``.
  """
  m, k = x.shape
  kw, n = w.shape
  if kw != k:
    raise ValueError(f"pallas weight-only: x {x.shape} and w {w.shape} do not contract")
  packed = w.qtype.storage_bits == 4
  group = reference.group_rows(w)
  cfg = _resolve_config(m, k, n, packed=packed, group=group, block_m=block_m, block_n=block_n,
                        block_k=block_k, split_k=split_k, num_warps=num_warps,
                        num_stages=num_stages, x_bytes=np.dtype(x.dtype).itemsize)
  out_dtype = np.dtype(out_dtype or x.dtype)
  if m == 0 or n == 0 or k == 0:
    return jnp.zeros((m, n), out_dtype)
  bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
  nkb = _compat.cdiv(k, bk)
  k_steps = _compat.cdiv(nkb, min(cfg.split_k, nkb))
  split = _compat.cdiv(nkb, k_steps)
  n_groups = int(w.scale.shape[0])
  scale = w.scale
  zp = w.zero_point
  if scale.shape[1] != n:  # per-tensor along N: a few bytes, broadcast once
    scale = jnp.broadcast_to(scale, (n_groups, n))
    zp = None if zp is None else jnp.broadcast_to(zp, (n_groups, n))
  args = [x, w.values, scale] + ([zp] if zp is not None else [])
  grid = (_compat.cdiv(m, bm), _compat.cdiv(n, bn), split)
  kernel = functools.partial(
      _wo_kernel, m=m, k=k, n=n, bm=bm, bn=bn, bk=bk, k_steps=k_steps,
      group_blocks=None if group is None else group // bk, n_groups=n_groups, packed=packed,
      signed=w.qtype.signed, has_zp=zp is not None, split=split > 1, precision=precision)
  out_shape = jax.ShapeDtypeStruct((split, m, n) if split > 1 else (m, n),
                                   np.float32 if split > 1 else out_dtype)
  y = pl.pallas_call(
      kernel, out_shape=out_shape, grid=grid, interpret=interpret,
      compiler_params=_compat.triton_params(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      name=f"jq_wo_{w.qtype.value}_{'g' if group else 'c'}",
  )(*args)
  if split > 1:
    y = jnp.sum(y, axis=0).astype(out_dtype)
  return y


def weight_only_dot_general(x: ArrayLike, w: QArray, dimension_numbers, precision=None,
                            preferred_element_type=None, *, out_sharding=None,
                            interpret: bool = False, **block_kwargs: Any) -> jax.Array:
  """Pallas twin of :func:`jq.ops.reference.weight_only_dot_general`.

  Supports ``dimension_numbers == (((x.ndim - 1,), (0,)), ((), ()))`` (``x[..., K] · w[K, N]``,
  or ``w[K, n1, ..]`` of a ``DenseGeneral`` head) and ``x``'s last ``c`` axes with ``w``'s first
  ``c`` (the ``(heads, head_dim, d)`` output projection), run as :func:`reference.as_matrix`;
  other layouts raise NotImplementedError (check :func:`unsupported_reason` first).

  Example:
    >>> w = jq.quantize(kernel, jq.W4A16_G128)
    >>> y = weight_only_dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))
  """
  x = jnp.asarray(x)
  if out_sharding is not None:
    raise NotImplementedError("pallas weight-only: out_sharding is not supported")
  reason = unsupported_reason(x.shape, x.dtype, w, dimension_numbers)
  if reason:
    raise NotImplementedError(reason)
  out_dtype = None if preferred_element_type is None else np.dtype(preferred_element_type)
  return reference.matrix_matmul(wo_matmul_2d, x, w, dimension_numbers, out_dtype=out_dtype,
                                 precision=precision, interpret=interpret, **block_kwargs)


__all__ = ["BlockConfig", "default_config", "unsupported_reason", "wo_matmul_2d",
           "weight_only_dot_general", "SUPPORTED_QTYPES"]
