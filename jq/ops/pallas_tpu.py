"""Pallas TPU (Mosaic) kernels: W8A8 int8 × int8 with a fused rescale, and int4 weight-only.

Twins of :func:`jq.ops.reference.int8_dot_general` and
:func:`jq.ops.reference.weight_only_dot_general` (same signature, plus keyword-only ``interpret``
and block sizes) for ``x[..., K] · w[K, N]``, the layout of a Flax ``Dense`` kernel; leading axes
of ``x`` are flattened into ``M`` rows.  :func:`unsupported_reason` says why a problem is refused
(other layouts, shapes that do not tile into TPU blocks, other types); dispatch then runs XLA.

Both kernels tile the output on a grid ``(M / bm, N / bn, K / bk)`` whose K axis is last and
sequential (``"arbitrary"``): Pallas pipelines the ``x`` and ``w`` blocks from HBM into VMEM, each
step adds one block product into a VMEM scratch accumulator (zeroed at ``k == 0``), and the last
K step writes the output tile (the epilogue).  Rows are padded up to a multiple of ``bm`` (itself
a multiple of 32, the int8 VMEM tile) in the wrapper; ``K`` and ``N`` must divide into blocks.

1. :func:`int8_dot_general` (W8A8): the activations are quantized to int8 in XLA by the reference's
   :func:`~jq.ops.reference.quantize_activations` (per token when dynamic, the calibrated scale
   when static), then :func:`int8_matmul_2d`: an ``int8 × int8 -> int32`` ``lax.dot_general`` (the
   MXU) into an int32 scratch, and the epilogue ``y = acc · sx[m] · sw[n]`` in float32, cast to the
   output dtype.  The int32 sum equals the reference's exactly; the epilogue multiplies in the
   reference's order.  Symmetric int8 weights (per column or per tensor) and symmetric int8
   activations only.
2. :func:`weight_only_dot_general` (int4 / uint4): ``w.values`` holds two 4-bit values per byte
   along N, value ``2j`` in the low nibble of byte ``j`` and ``2j + 1`` in the high nibble
   (:func:`jq.numerics.pack`).  :func:`int4_matmul_2d` DMAs the packed ``(bk, bn / 2)`` uint8 block
   (half the bytes of int8), unpacks it in VMEM with shifts and masks (in int32; signed nibbles
   sign-extended as ``(u ^ 8) − 8``) into the even-column and the odd-column weights, subtracts the
   zero point, dequantizes with the group scales (``(q − z) · s`` in float32, cast to ``x``'s dtype:
   the reference's ``dequantize``) or, per channel, leaves the scale to the epilogue, and dots each
   half with the float ``x`` block into its float32 accumulator.  Interleaving the two halves into
   ``(bm, bn)`` would shuffle lanes inside the kernel, so the kernel writes them as two
   ``(M, N / 2)`` outputs and XLA interleaves them (one pass over the output, small next to the
   weight at decode sizes); the scales' and zero points' even/odd columns are split in XLA the same
   way (``1 / 16`` of the int4 bytes at g128 with float32 scales).

Interpret mode (``interpret=None``: unless the default backend is a TPU) runs the kernels on CPU
with Pallas's TPU interpreter (VMEM scratch and grid order included); the tests hold them equal to
the reference there and lower them to Mosaic for TPU on CPU.  They are not yet compiled or timed on
a TPU: dispatch picks them only under ``KernelPolicy(tpu="always")`` (see ``jq.ops.kernels``).
"""
from __future__ import annotations

import functools

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
from jq.spec import ActMode

ROW_ALIGN = 32  # block_m is a multiple of the int8 (32, 128) VMEM tile (bf16: 16, float32: 8)
LANES = 128
BLOCK_M = 256
BLOCK_N_CHOICES = (512, 256, 128)
BLOCK_K_CHOICES = (512, 256, 128)
INT4_QTYPES = (QType.INT4, QType.UINT4)
_X_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(np.float32))
_DN_2D = (((1,), (0,)), ((), ()))
_SEMANTICS = ("parallel", "parallel", "arbitrary")


def _round_up(a: int, b: int) -> int:
  return -(-a // b) * b


def _k_block_fits(bk: int, group: int | None) -> bool:
  """A K block holds whole groups, or lies inside one."""
  return group is None or bk % group == 0 or group % bk == 0


def _n_align(int4: bool) -> int:
  """``block_n`` multiple: 128 lanes, of packed bytes for int4 (two columns each)."""
  return 2 * LANES if int4 else LANES


def default_blocks(m: int, k: int, n: int, *, int4: bool = False, group: int | None = None
                   ) -> tuple[int, int | None, int | None]:
  """``(block_m, block_n, block_k)`` defaults: ``block_m`` = M rounded up to 32, at most 256; the
  largest ``block_n`` / ``block_k`` in 512, 256, 128 that divides N / K (int4: ``block_n`` >= 256;
  ``block_k`` a multiple or divisor of the K group), None where none does."""
  bm = min(BLOCK_M, _round_up(max(m, 1), ROW_ALIGN))
  bn = next((b for b in BLOCK_N_CHOICES if b % _n_align(int4) == 0 and n % b == 0), None)
  bk = next((b for b in BLOCK_K_CHOICES if k % b == 0 and _k_block_fits(b, group)), None)
  return bm, bn, bk


def _resolve_blocks(m: int, k: int, n: int, *, int4: bool, group: int | None,
                    block_m: int | None, block_n: int | None, block_k: int | None
                    ) -> tuple[int, int, int]:
  dm, dn, dk = default_blocks(m, k, n, int4=int4, group=group)
  bm, bn, bk = block_m or dm, block_n or dn, block_k or dk
  where = f"pallas tpu: (M, K, N) = ({m}, {k}, {n})"
  if bm % ROW_ALIGN:
    raise ValueError(f"{where}: block_m={bm} must be a multiple of {ROW_ALIGN}")
  if bn is None or bn % _n_align(int4) or n % bn:
    raise ValueError(f"{where}: block_n={bn} must be a multiple of {_n_align(int4)} dividing N")
  if bk is None or bk % LANES or k % bk or not _k_block_fits(bk, group):
    raise ValueError(f"{where}: block_k={bk} must be a multiple of {LANES} dividing K"
                     + (f" and a multiple or divisor of the group size {group}" if group else ""))
  return bm, bn, bk


def _interpret(interpret: bool | None):
  if interpret is None:
    interpret = not _compat.on_tpu()
  return _compat.tpu_interpret_params() if interpret else False


# ---- which problems the kernels take ------------------------------------------------------------

def unsupported_reason(x_shape, x_dtype, w: QArray, dimension_numbers) -> str | None:
  """Why the TPU kernel for ``w``'s mode cannot run ``x × w`` (None when it can).

  ``w.activation`` set: :func:`int8_dot_general` (symmetric int8 weights per column or per
  tensor, symmetric int8 activations, dynamic or static); otherwise
  :func:`weight_only_dot_general` (int4 / uint4 weights, per channel or K groups).  Both: a 2-D
  ``(K, N)`` weight, ``x[..., K] · w[K, N]``, bfloat16 or float32 ``x``, K a multiple of 128,
  N a multiple of 128 (int4: 256, two columns per byte).
  """
  where = (f"pallas tpu: x {tuple(x_shape)} {np.dtype(x_dtype)}, w QArray({w.qtype.value}, "
           f"shape={w.shape}, tile={w.tile})")
  if (why := reference.plain_matmul_reason(x_shape, w.shape, dimension_numbers)) is not None:
    return f"{where}: {why}"
  if len(w.shape) != 2:
    return f"{where}: only a 2-D (K, N) weight is supported"
  if np.dtype(x_dtype) not in _X_DTYPES:
    return f"{where}: x dtype must be bfloat16 or float32"
  k, n = w.shape
  if k % LANES:
    return f"{where}: K={k} is not a multiple of {LANES} (the TPU lane tile)"
  if w.scale.shape[1] not in (1, n):
    return f"{where}: scales must be per output column or per tensor along N"
  if w.activation is None:
    return _weight_only_reason(where, w)
  return _int8_reason(where, w)


def _int8_reason(where: str, w: QArray) -> str | None:
  n = w.shape[1]
  a = w.activation
  if w.qtype is not QType.INT8 or w.zero_point is not None:
    return f"{where}: the TPU int8 kernel takes symmetric int8 weights"
  if w.scale.shape[0] != 1:
    return f"{where}: weight scales must be per output column or per tensor"
  if a.spec.qtype is not QType.INT8 or not a.spec.symmetric:
    return (f"{where}: the TPU int8 kernel takes symmetric int8 activations (got "
            f"{a.spec.qtype.value}, symmetric={a.spec.symmetric}): no zero-point corrections")
  if a.spec.mode is ActMode.STATIC and (a.scale is None or np.size(a.scale) != 1):
    return f"{where}: static activation quantization needs one calibrated scale"
  if n % LANES:
    return f"{where}: N={n} is not a multiple of {LANES} (the TPU lane tile)"
  return None


def _weight_only_reason(where: str, w: QArray) -> str | None:
  k, n = w.shape
  if w.qtype not in INT4_QTYPES:
    return (f"{where}: the TPU weight-only kernel takes int4 / uint4 weights (qtype "
            f"{w.qtype.value} runs on XLA)")
  if n % _n_align(True):
    return (f"{where}: N={n} is not a multiple of {_n_align(True)} (128 lanes of packed bytes, "
            "two int4 columns each)")
  g = reference.group_rows(w)
  if g is not None:
    if k % g:
      return f"{where}: K={k} is not a multiple of the group size {g} (a partial last group)"
    if g % ROW_ALIGN:
      return f"{where}: group size {g} is not a multiple of {ROW_ALIGN}"
  if default_blocks(1, k, n, int4=True, group=g)[2] is None:
    return (f"{where}: no K block in {BLOCK_K_CHOICES} divides K={k} and holds whole groups of "
            f"{g} (or lies inside one)")
  return None


# ---- int8 × int8 -> int32, fused rescale ---------------------------------------------------------

def _int8_kernel(x_ref, w_ref, xs_ref, ws_ref, o_ref, acc_ref):
  """One ``(bm, bn)`` tile; K block ``program_id(2)`` of ``num_programs(2)``."""
  kb = pl.program_id(2)

  @pl.when(kb == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.int32)

  acc_ref[...] += lax.dot_general(x_ref[...], w_ref[...], _DN_2D,
                                  preferred_element_type=jnp.int32)

  @pl.when(kb == pl.num_programs(2) - 1)
  def _epilogue():  # the reference's order: (acc · sx) · sw
    y = acc_ref[...].astype(jnp.float32) * xs_ref[...] * ws_ref[...]
    o_ref[...] = y.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_m", "block_n", "block_k",
                                             "interpret"))
def int8_matmul_2d(qx: jax.Array, x_scale: jax.Array, w_values: jax.Array, w_scale: jax.Array, *,
                   out_dtype=jnp.float32, block_m: int | None = None, block_n: int | None = None,
                   block_k: int | None = None, interpret: bool | None = None) -> jax.Array:
  """``y[m, n] = (Σ_k qx[m, k] · qw[k, n]) · sx[m] · sw[n]``, the sum exact in int32.

  Args:
    qx: int8 ``(M, K)`` quantized activations.
    x_scale: float ``(M,)``, ``(M, 1)`` or a scalar (per token or per tensor).
    w_values: int8 ``(K, N)``.
    w_scale: float, ``N`` values or one (per column or per tensor).
    out_dtype: output dtype (bfloat16 or float32).
    block_m, block_n, block_k: block overrides (multiples of 32, 128, 128 dividing the padded M,
      N, K); defaults from :func:`default_blocks`.
    interpret: Pallas TPU interpret mode (None: unless the default backend is a TPU).

  Returns:
    ``(M, N)`` ``out_dtype``.
  """
  m, k = qx.shape
  kw, n = w_values.shape
  if kw != k or qx.dtype != jnp.int8 or w_values.dtype != jnp.int8:
    raise ValueError(f"pallas tpu int8: qx {qx.shape} {qx.dtype} and w {w_values.shape} "
                     f"{w_values.dtype} must be int8 and contract")
  out_dtype = np.dtype(out_dtype)
  if m == 0:
    return jnp.zeros((0, n), out_dtype)
  bm, bn, bk = _resolve_blocks(m, k, n, int4=False, group=None, block_m=block_m,
                               block_n=block_n, block_k=block_k)
  mp = _round_up(m, bm)
  xs = jnp.broadcast_to(jnp.asarray(x_scale, jnp.float32).reshape(-1, 1), (m, 1))
  ws = jnp.broadcast_to(jnp.asarray(w_scale, jnp.float32).reshape(1, -1), (1, n))
  if mp != m:  # padding rows: zero activations (their outputs are cut off below)
    qx = jnp.pad(qx, ((0, mp - m), (0, 0)))
    xs = jnp.pad(xs, ((0, mp - m), (0, 0)), constant_values=1.0)
  y = pl.pallas_call(
      _int8_kernel,
      out_shape=jax.ShapeDtypeStruct((mp, n), out_dtype),
      grid=(mp // bm, n // bn, k // bk),
      in_specs=[pl.BlockSpec((bm, bk), lambda i, j, kb: (i, kb)),
                pl.BlockSpec((bk, bn), lambda i, j, kb: (kb, j)),
                pl.BlockSpec((bm, 1), lambda i, j, kb: (i, 0)),
                pl.BlockSpec((1, bn), lambda i, j, kb: (0, j))],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j, kb: (i, j)),
      scratch_shapes=[_compat.tpu_vmem((bm, bn), jnp.int32)],
      compiler_params=_compat.tpu_compiler_params(dimension_semantics=_SEMANTICS),
      interpret=_interpret(interpret), name="jq_tpu_int8_matmul",
  )(qx, w_values, xs, ws)
  return y[:m]


def _check_call(kind: str, x: jax.Array, w: QArray, dimension_numbers, out_sharding, *,
                activation: bool) -> None:
  """Raises NotImplementedError for a call the ``kind`` kernel does not take: ``out_sharding``,
  a weight with (int8) or without (weight-only) activation quantization, or what
  :func:`unsupported_reason` refuses."""
  if out_sharding is not None:
    raise NotImplementedError(f"pallas tpu {kind}: out_sharding is not supported")
  if (w.activation is not None) != activation:
    raise NotImplementedError(
        f"pallas tpu {kind}: QArray({w.qtype.value}, shape={w.shape}) carries "
        + ("no activation quantization; use weight_only_dot_general" if activation
           else "activation quantization; use int8_dot_general"))
  reason = unsupported_reason(x.shape, x.dtype, w, dimension_numbers)
  if reason:
    raise NotImplementedError(reason)


def int8_dot_general(x: ArrayLike, w: QArray, dimension_numbers, precision=None,
                     preferred_element_type=None, *, out_sharding=None,
                     interpret: bool | None = None, block_m: int | None = None,
                     block_n: int | None = None, block_k: int | None = None) -> jax.Array:
  """Pallas TPU twin of :func:`jq.ops.reference.int8_dot_general` (see the module docstring).

  ``x`` is quantized by :func:`jq.ops.reference.quantize_activations` in XLA, then
  :func:`int8_matmul_2d` runs.  Raises NotImplementedError for what :func:`unsupported_reason`
  refuses (and for ``out_sharding``).

  Example:
    >>> y = int8_dot_general(x, w8a8_kernel, (((x.ndim - 1,), (0,)), ((), ())))
  """
  del precision  # integer dots are exact
  x = jnp.asarray(x)
  _check_call("int8", x, w, dimension_numbers, out_sharding, activation=True)
  out_dtype = np.dtype(preferred_element_type or x.dtype)
  lead, (k, n) = x.shape[:-1], w.shape
  x2 = x.reshape(-1, k)
  qx, sx, _ = reference.quantize_activations(x2, (1,), w.activation)  # symmetric: no zero point
  kernel_dtype = out_dtype if out_dtype in _X_DTYPES else np.dtype(np.float32)
  y = int8_matmul_2d(qx.astype(jnp.int8), sx, w.values, w.scale, out_dtype=kernel_dtype,
                     block_m=block_m, block_n=block_n, block_k=block_k, interpret=interpret)
  return y.astype(out_dtype).reshape(*lead, n)


# ---- int4 weight-only, unpacked in VMEM ----------------------------------------------------------

def _int4_kernel(x_ref, w_ref, se_ref, so_ref, *refs, signed: bool, has_zp: bool, grouped: bool,
                 precision):
  """One ``(bm, bn)`` tile as its even and odd columns; K block ``program_id(2)``."""
  refs = list(refs)
  zps = (refs.pop(0), refs.pop(0)) if has_zp else (None, None)
  oe_ref, oo_ref, ae_ref, ao_ref = refs
  kb = pl.program_id(2)

  @pl.when(kb == 0)
  def _init():
    ae_ref[...] = jnp.zeros(ae_ref.shape, jnp.float32)
    ao_ref[...] = jnp.zeros(ao_ref.shape, jnp.float32)

  x = x_ref[...]
  b = w_ref[...].astype(jnp.int32)  # (bk, bn / 2) packed bytes
  nibbles = (b & 0xF, (b >> 4) & 0xF)  # low nibble: column 2j, high nibble: column 2j + 1
  for v, s_ref, z_ref, acc_ref in zip(nibbles, (se_ref, so_ref), zps, (ae_ref, ao_ref)):
    if signed:  # sign-extend 4 -> 32 bits
      v = (v ^ 8) - 8
    if grouped:  # s_ref / z_ref: (groups in this block, bn / 2), one row per `g` rows of w
      gpb, (bk, h) = s_ref.shape[0], v.shape
      v = v.reshape(gpb, bk // gpb, h)
      if z_ref is not None:
        v = v - z_ref[...][:, None, :]
      wv = (v.astype(jnp.float32) * s_ref[...][:, None, :]).reshape(bk, h)
    else:  # per channel: the scale waits for the epilogue
      if z_ref is not None:
        v = v - z_ref[...]
      wv = v.astype(jnp.float32)
    acc_ref[...] += lax.dot_general(x, wv.astype(x.dtype), _DN_2D, precision=precision,
                                    preferred_element_type=jnp.float32)

  @pl.when(kb == pl.num_programs(2) - 1)
  def _epilogue():
    for acc_ref, s_ref, o_ref in ((ae_ref, se_ref, oe_ref), (ao_ref, so_ref, oo_ref)):
      y = acc_ref[...]
      if not grouped:
        y = y * s_ref[...]
      o_ref[...] = y.astype(o_ref.dtype)


def _even_odd(t: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
  """A per-column ``(R, N)`` (or ``(R, 1)``) tensor -> its even and odd columns, ``(R, N / 2)``."""
  t = jnp.broadcast_to(t, (t.shape[0], n))
  return t[:, 0::2], t[:, 1::2]


@functools.partial(jax.jit, static_argnames=("out_dtype", "precision", "block_m", "block_n",
                                             "block_k", "interpret"))
def int4_matmul_2d(x: jax.Array, w: QArray, *, out_dtype=None, precision=None,
                   block_m: int | None = None, block_n: int | None = None,
                   block_k: int | None = None, interpret: bool | None = None) -> jax.Array:
  """``x (M, K) @ dequantize(w) (K, N) -> (M, N)``, ``w`` int4 / uint4 unpacked in VMEM.

  Args:
    x: bfloat16 or float32 activations ``(M, K)``.
    w: an int4 / uint4 QArray ``(K, N)`` that :func:`unsupported_reason` accepts.
    out_dtype: output dtype (default ``x.dtype``).
    precision: precision of the block dots (float32 ``x``).
    block_m, block_n, block_k: block overrides (multiples of 32, 256, 128; ``block_k`` a
      multiple or divisor of the K group); defaults from :func:`default_blocks`.
    interpret: Pallas TPU interpret mode (None: unless the default backend is a TPU).

  Returns:
    ``(M, N)`` ``out_dtype``.
  """
  m, k = x.shape
  kw, n = w.shape
  if kw != k:
    raise ValueError(f"pallas tpu int4: x {x.shape} and w {w.shape} do not contract")
  out_dtype = np.dtype(out_dtype or x.dtype)
  if m == 0:
    return jnp.zeros((0, n), out_dtype)
  g = reference.group_rows(w)
  bm, bn, bk = _resolve_blocks(m, k, n, int4=True, group=g, block_m=block_m, block_n=block_n,
                               block_k=block_k)
  mp, h, bh = _round_up(m, bm), n // 2, bn // 2
  if mp != m:
    x = jnp.pad(x, ((0, mp - m), (0, 0)))
  cols = [*_even_odd(w.scale.astype(jnp.float32), n)]
  if w.zero_point is not None:
    cols += _even_odd(w.zero_point.astype(jnp.int32), n)
  if g is None:
    col_spec = pl.BlockSpec((1, bh), lambda i, j, kb: (0, j))
  else:  # (K / g, N / 2) -> (K-blocks of groups, groups per K block, N / 2)
    gpb, bpg = max(1, bk // g), max(1, g // bk)
    cols = [c.reshape(-1, gpb, h) for c in cols]
    # lax.div, not //: floor division of a traced index lowers through `sign`, which Mosaic
    # lowers only knowing the TPU generation (and kb >= 0, so they agree)
    col_spec = pl.BlockSpec((None, gpb, bh), lambda i, j, kb: (lax.div(kb, bpg), 0, j))
  kernel = functools.partial(_int4_kernel, signed=w.qtype.signed,
                             has_zp=w.zero_point is not None, grouped=g is not None,
                             precision=precision)
  half = jax.ShapeDtypeStruct((mp, h), out_dtype)
  out_spec = pl.BlockSpec((bm, bh), lambda i, j, kb: (i, j))
  ye, yo = pl.pallas_call(
      kernel,
      out_shape=(half, half),
      grid=(mp // bm, n // bn, k // bk),
      in_specs=[pl.BlockSpec((bm, bk), lambda i, j, kb: (i, kb)),
                pl.BlockSpec((bk, bh), lambda i, j, kb: (kb, j))] + [col_spec] * len(cols),
      out_specs=(out_spec, out_spec),
      scratch_shapes=[_compat.tpu_vmem((bm, bh), jnp.float32)] * 2,
      compiler_params=_compat.tpu_compiler_params(dimension_semantics=_SEMANTICS),
      interpret=_interpret(interpret), name=f"jq_tpu_{w.qtype.value}_{'g' if g else 'c'}",
  )(x, w.values, *cols)
  return jnp.stack([ye[:m], yo[:m]], axis=-1).reshape(m, n)


def weight_only_dot_general(x: ArrayLike, w: QArray, dimension_numbers, precision=None,
                            preferred_element_type=None, *, out_sharding=None,
                            interpret: bool | None = None, block_m: int | None = None,
                            block_n: int | None = None, block_k: int | None = None
                            ) -> jax.Array:
  """Pallas TPU twin of :func:`jq.ops.reference.weight_only_dot_general` for int4 / uint4 ``w``.

  Raises NotImplementedError for what :func:`unsupported_reason` refuses (and for
  ``out_sharding``).

  Example:
    >>> w = jq.quantize(kernel, jq.QuantSpec(qtype=jq.QType.INT4, granularity=jq.Granularity.GROUP,
    ...                                      group_size=128))
    >>> y = weight_only_dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))
  """
  x = jnp.asarray(x)
  _check_call("weight-only", x, w, dimension_numbers, out_sharding, activation=False)
  out_dtype = np.dtype(preferred_element_type or x.dtype)
  kernel_dtype = out_dtype if out_dtype in _X_DTYPES else np.dtype(np.float32)
  y = int4_matmul_2d(x.reshape(-1, x.shape[-1]), w, out_dtype=kernel_dtype, precision=precision,
                     block_m=block_m, block_n=block_n, block_k=block_k, interpret=interpret)
  return y.astype(out_dtype).reshape(*x.shape[:-1], w.shape[1])


__all__ = ["unsupported_reason", "default_blocks", "int8_matmul_2d", "int8_dot_general",
           "int4_matmul_2d", "weight_only_dot_general", "INT4_QTYPES"]
