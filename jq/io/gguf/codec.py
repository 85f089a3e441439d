"""One tensor between jq (QArray or float array) and GGUF block data: the tensor-level API.

For the 32-blocks, ``d`` is computed in float32, used unrounded to pick the codes, and only then
stored as fp16; dequantization multiplies by the fp16 value.  The jq twin (:func:`gguf_spec`,
:func:`quantize_for_gguf`) stores exactly that fp16 value as its scale (``scale_dtype=float16``),
so ``QArray.dequantize()`` equals ``gguf.quants.dequantize`` bit for bit (both are one exact
float32 product).  Two details make the twin work:

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
Q4_K/Q5_K/Q2_K/IQ* are imported as float32.  A QArray is written as Q6_K when its values fit
exactly (e.g. one imported from Q6_K; the bytes may then differ from the source in sign
conventions, the values do not); Q4_K takes QArrays only with ``requantize``.

Export rules (:func:`encode_tensor`): a QArray is written without re-rounding when its grid is
representable in the requested type (blocks of 32 lie inside one jq tile; scales are fp16 values;
codes fit); otherwise it is refused with a ValueError naming the tensor unless ``requantize=True``,
which dequantizes and quantizes with gguf's reference.  Float arrays are quantized with the gguf
reference formulas (bytes equal ``gguf.quants.quantize``, and ggml's C quantizers).  Int8 activation quantization
(``QArray.activation``) has no GGUF equivalent (llama.cpp quantizes activations itself) and is not
written.
"""
from __future__ import annotations

import math
from typing import Any

import gguf
import jax.numpy as jnp
import numpy as np

from jq.io.hints import REQUANTIZE_HINT
from jq.io.gguf.blocks import _decode, _decode_q3_k, _decode_q6_k, _encode, _Fields
from jq.io.gguf.fit import _block_scales, _fit_fields, _fit_q6_k, _qarray_codes
from jq.io.gguf.qarray_np import _dequantize_np, _pack_np
from jq.io.gguf.reference import _q4_k_bytes, _q6_k_bytes, _reference_fields
from jq.io.gguf.types import (_ASYM_QMAX, _FLOAT_TYPES, _K_TYPES, BLOCK, EXPORT_TYPES, QK_K,
                              TWIN_TYPES, GGMLType, GGUFExportError, GGUFFormatError,
                              to_ggml_type)
from jq.qarray import QArray
from jq.qtypes import QType
from jq.spec import Granularity, QuantSpec
from jq.tree import is_qarray


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


def encode_tensor(x: Any, t: GGMLType | str, *, block_axis: int = 0, requantize: bool = False,
                  name: str = "<tensor>", notes: list[str] | None = None) -> np.ndarray:
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
    notes: when given, a line is appended for a QArray that was re-rounded (from which grid to
      which type), so a caller can report every change to the model by name.

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
      if t is not GGMLType.F32:
        back = gguf.quants.dequantize(out, t).reshape(out.shape[:-1] + (-1,))
        if not np.array_equal(back, _rows(deq, block_axis) if deq.ndim == 2 else deq):
          if not requantize:
            raise GGUFExportError(f"{name}: QArray(qtype={x.qtype.value}, shape={shape}) "
                                  f"dequantizes to values that {t.name} cannot hold exactly; use "
                                  f"F32, or pass {REQUANTIZE_HINT} to round them")
          _note(notes, name, x, t)
      return out
    xf = np.asarray(x)
    if not (np.issubdtype(xf.dtype, np.floating) or xf.dtype == jnp.bfloat16):
      raise ValueError(f"{name}: shape {shape} dtype {xf.dtype}: expected a float tensor")
    if (t, xf.dtype) in ((GGMLType.BF16, jnp.bfloat16), (GGMLType.F16, np.float16)):
      # the same bits as gguf's rounding of their float32 values, without that detour's copies
      # (a bf16 embedding took ~6x its size there: the largest peak of a streamed export)
      same = _rows(xf, block_axis) if xf.ndim == 2 else np.ascontiguousarray(xf)
      return same if t is GGMLType.F16 else same.view(np.uint8)
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
            f"of one fp16 scale); pass {REQUANTIZE_HINT} to quantize its dequantized values with "
            "ggml's reference")
      _note(notes, name, x, t)
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
        _note(notes, name, x, t)
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


def _note(notes: list[str] | None, name: str, x: QArray, t: GGMLType) -> None:
  if notes is not None:
    notes.append(f"{name}: re-rounded from {x.qtype.value} {'sym' if x.zero_point is None else 'asym'}"
                 f" tile {tuple(x.tile)} to GGUF {t.name} (no exact {t.name} twin)")


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
