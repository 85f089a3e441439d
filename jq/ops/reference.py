"""XLA reference implementations of ``float x × QArray w`` contractions.

Invariants (every registered kernel must agree with these within float rounding):

* Weight-only: ``y = dot_general(x, dequantize(w))``.  When every contracting axis of ``w`` has a
  single scale (per-channel/per-tensor), the scale factors out of the sum and is applied to the
  output: ``y = dot_general(x, q − zp) · s`` (``table[q]`` for NF4), accumulated in float32.
* Int8 activations: ``x`` is quantized to 8 bits (per token for dynamic mode, one calibrated scale
  for static mode), ``acc = Σ (qx − zx)(qw − zw)`` is computed exactly in int32 as
  ``Σ qx·qw − zw·Σqx − zx·Σqw + K·zx·zw`` from an ``int8 × int8 -> int32`` ``lax.dot_general``,
  and ``y = acc · sx ⊗ sw``.  Unsigned operands are shifted by −128 into int8 (with their zero
  points), which leaves ``(q − z)`` unchanged.
* Float8 (e4m3) activations with float8 weights: ``x`` becomes ``qx = e4m3(clip(x / sx, ±448))``
  (``sx = absmax / 448`` per token, or the calibrated per-tensor scale), ``acc = Σ qx·qw`` in
  float32 and ``y = acc · sx ⊗ sw``.  Each product of two e4m3 values is exact in float32 (4
  significant bits each), so the upcast emulation differs from a native fp8 dot only in the
  float32 summation order.

All functions share ``lax.dot_general``'s signature with the QArray on the right-hand side; the
output has ``lax.dot_general``'s layout ``(batch…, lhs free…, rhs free…)``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jq import numerics
from jq.qarray import ActivationQuant, QArray, dequantize
from jq.qtypes import FP8_E4M3_MAX, QType
from jq.spec import ActMode

DimensionNumbers = tuple[tuple[Sequence[int], Sequence[int]], tuple[Sequence[int], Sequence[int]]]


@dataclasses.dataclass(frozen=True)
class DotLayout:
  """Normalized ``dot_general`` dimension numbers and helpers to move per-operand tensors into the
  output layout ``(batch…, lhs free…, rhs free…)``.

  Attributes:
    x_ndim, w_ndim: operand ranks.
    xc, wc: contracting axes of lhs / rhs (paired).
    xb, wb: batch axes of lhs / rhs (paired).
    x_free, w_free: the remaining axes, in order.
  """
  x_ndim: int
  w_ndim: int
  xc: tuple[int, ...]
  wc: tuple[int, ...]
  xb: tuple[int, ...]
  wb: tuple[int, ...]

  @property
  def x_free(self) -> tuple[int, ...]:
    return tuple(a for a in range(self.x_ndim) if a not in self.xc and a not in self.xb)

  @property
  def w_free(self) -> tuple[int, ...]:
    return tuple(a for a in range(self.w_ndim) if a not in self.wc and a not in self.wb)

  @property
  def dimension_numbers(self) -> DimensionNumbers:
    return ((self.xc, self.wc), (self.xb, self.wb))

  @classmethod
  def make(cls, dimension_numbers, x_shape: Sequence[int], w_shape: Sequence[int], *,
           name: str = "<dot_general>") -> "DotLayout":
    """Validates ``dimension_numbers`` against the operand shapes (ValueError naming ``name``)."""
    try:
      (xc, wc), (xb, wb) = dimension_numbers
      xc, wc, xb, wb = (tuple(int(a) for a in axes) for axes in (xc, wc, xb, wb))
    except (TypeError, ValueError) as e:
      raise ValueError(f"{name}: dimension_numbers {dimension_numbers!r} must be "
                       "((lhs_contract, rhs_contract), (lhs_batch, rhs_batch))") from e
    where = f"{name}: lhs shape {tuple(x_shape)}, rhs QArray shape {tuple(w_shape)}"
    nx, nw = len(x_shape), len(w_shape)

    def norm(axes, nd, side):
      if any(not -nd <= a < nd for a in axes):
        raise ValueError(f"{where}: {side} axes {axes} out of range for rank {nd}")
      return tuple(a % nd for a in axes)

    xc, xb = norm(xc, nx, "lhs"), norm(xb, nx, "lhs")
    wc, wb = norm(wc, nw, "rhs"), norm(wb, nw, "rhs")
    if len(xc) != len(wc) or len(xb) != len(wb):
      raise ValueError(f"{where}: contracting/batch axis lists must pair up, got "
                       f"{dimension_numbers!r}")
    if len(set(xc + xb)) != len(xc + xb) or len(set(wc + wb)) != len(wc + wb):
      raise ValueError(f"{where}: an axis appears twice in {dimension_numbers!r}")
    for a, b in zip(xc + xb, wc + wb):
      if x_shape[a] != w_shape[b]:
        raise ValueError(f"{where}: lhs axis {a} (size {x_shape[a]}) does not match rhs axis {b} "
                         f"(size {w_shape[b]})")
    return cls(nx, nw, xc, wc, xb, wb)

  def lhs_to_out(self, t: jax.Array) -> jax.Array:
    """A keepdims reduction over the lhs contracting axes -> broadcastable to the output."""
    if t.ndim == 0:
      return t
    t = jnp.transpose(t, self.xb + self.x_free + self.xc)
    keep = t.shape[:len(self.xb) + len(self.x_free)]
    return t.reshape(keep + (1,) * len(self.w_free))

  def rhs_to_out(self, t: jax.Array) -> jax.Array:
    """A per-tile rhs tensor (size 1 on every contracting axis) -> broadcastable to the output."""
    t = jnp.transpose(t, self.wb + self.w_free + self.wc)
    nb, nf = len(self.wb), len(self.w_free)
    return t.reshape(t.shape[:nb] + (1,) * len(self.x_free) + t.shape[nb:nb + nf])


def plain_matmul_reason(x_shape: Sequence[int], w_shape: Sequence[int], dimension_numbers
                        ) -> str | None:
  """Why a contraction is not the plain ``x[..., K] · w[K, N...]`` the matmul kernels take (None
  if it is): ``x``'s last ``c >= 1`` axes contracted, in order, with the weight's first ``c``
  (one axis, or the ``(heads, head_dim)`` of a ``DenseGeneral`` output projection), no batch
  axes, at least one free weight axis.  Weights of rank > 2 run as :func:`as_matrix`; kernels
  that cannot flatten them say so."""
  if len(w_shape) < 2 or len(x_shape) < 1:
    return "only a (K, N...) weight and x (..., K) are supported"
  (xc, wc), (xb, wb) = dimension_numbers
  c = len(tuple(xc))
  if (tuple(xb) or tuple(wb) or not 1 <= c < len(w_shape) or c > len(x_shape)
      or tuple(int(a) % len(x_shape) for a in xc) != tuple(range(len(x_shape) - c, len(x_shape)))
      or tuple(int(a) % len(w_shape) for a in wc) != tuple(range(c))):
    return f"dimension_numbers {dimension_numbers} are not x[..., K] · w[K, N]"
  return None


def _merged_tile(sizes: Sequence[int], tiles: Sequence[int]) -> int | None:
  """The tile of axes ``sizes`` merged into one (row-major), or None when the tiles are not
  contiguous runs of it: every axis before some axis ``j`` has tile 1, every axis after it is
  whole."""
  for j in range(len(sizes)):
    if all(t == 1 for t in tiles[:j]) and tuple(tiles[j + 1:]) == tuple(sizes[j + 1:]):
      return int(tiles[j] * np.prod(sizes[j + 1:], dtype=np.int64))
  return None


def matrix_tile(w: QArray, contracting: int = 1) -> tuple[int, int] | None:
  """The ``(K, N)`` tile of :func:`as_matrix` (from static fields only), or None."""
  c = int(contracting)
  if not 1 <= c < w.ndim or w.shape[-1] % w.qtype.pack_values:
    return None
  tk = _merged_tile(w.shape[:c], w.tile[:c])
  free = tuple(w.shape[c:])
  if tk is None:
    return None
  if all(t == 1 for t in w.tile[c:]):
    return tk, 1
  if tuple(w.tile[c:]) == free:
    return tk, int(np.prod(free))
  return None


def as_matrix(w: QArray, contracting: int = 1) -> QArray | None:
  """``w (k1, .., kc, n1, .., nr)`` (the first ``contracting`` axes contracted) as the 2-D
  ``(k1·…·kc, n1·…·nr)`` QArray a matmul kernel takes (``w`` itself when 2-D), or None when its
  scales cannot follow the reshape: every output axis must be per channel (tile 1) or every one
  per tensor, and the contracting axes' tiles must be runs of the merged axis (groups inside the
  last contracting axis, or whole trailing axes).  Sub-byte values are packed along the last
  axis within each row, so the packed bytes reshape in the same row-major order (``nr`` is a
  whole number of packing units: checked).  A ``DenseGeneral`` head's ``(d, heads, head_dim)``
  kernel is one, and so is its output projection's ``(heads, head_dim, d)`` with ``contracting=2``.
  ``as_matrix(w) is None`` reads only static fields (cheap on abstract values)."""
  if w.ndim == 2 and contracting == 1:
    return w
  tile = matrix_tile(w, contracting)
  if tile is None:
    return None
  c = int(contracting)
  k, n = int(np.prod(w.shape[:c])), int(np.prod(w.shape[c:]))
  flat = lambda a: None if a is None else a.reshape(int(np.prod(a.shape[:c])), -1)
  return dataclasses.replace(w, values=flat(w.values), scale=flat(w.scale),
                             zero_point=flat(w.zero_point), shape=(k, n), tile=tile)


def matrix_matmul(matmul_2d, x: jax.Array, w: QArray, dimension_numbers: DimensionNumbers,
                  **kwargs) -> jax.Array:
  """``x``'s last ``c`` axes contracted with ``w``'s first ``c`` (``c`` from
  ``dimension_numbers``) as one 2-D kernel call ``matmul_2d(x2, as_matrix(w, c), **kwargs)``,
  reshaped back to ``(x's leading axes…, w's free axes…)``."""
  c = len(tuple(dimension_numbers[0][0]))
  lead, free = x.shape[:x.ndim - c], w.shape[c:]
  y = matmul_2d(x.reshape(-1, int(np.prod(x.shape[x.ndim - c:]))), as_matrix(w, c), **kwargs)
  return y.reshape(*lead, *free)


def group_rows(w: QArray) -> int | None:
  """Rows of a 2-D ``w`` per K scale group, or None when one scale covers all of K (per channel
  or per tensor: the scale factors out of the contraction)."""
  return None if w.scale.shape[0] == 1 else int(w.tile[0])


def scales_factor_out(w: QArray, contracting: Sequence[int]) -> bool:
  """True when ``w`` has a single scale along every contracting axis (per-channel or per-tensor),
  so ``Σ_k x_k·(q_k − z)·s = s·Σ_k x_k·(q_k − z)``."""
  return all(w.scale.shape[a] == 1 for a in contracting)


def accumulation_dtype(dtype) -> np.dtype:
  """float32 for 16/32-bit floats, float64 for float64."""
  return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def integer_valued_weight(w: QArray, dtype) -> jax.Array:
  """``q − zero_point`` (or ``NF4_TABLE[q]``, or the float8 values) in ``dtype``, without the scale.

  Exact for uniform types in any float dtype (``|q − z| ≤ 255``), and for float8 e4m3 values in
  float32/bfloat16/float16 (4 significant bits, exponents 2^-9..2^8).
  """
  v = w.unpacked()
  if w.qtype.is_table:
    return numerics.nf4_decode(v, jnp.float32).astype(dtype)
  if w.zero_point is None:
    return v.astype(dtype)
  z = numerics.expand(w.zero_point.astype(jnp.int32), w.tile, w.shape)
  return (v.astype(jnp.int32) - z).astype(dtype)


def weight_only_dot_general(x: jax.Array, w: QArray, dimension_numbers: DimensionNumbers,
                            precision=None, preferred_element_type=None, *,
                            out_sharding=None) -> jax.Array:
  """``dot_general(x, dequantize(w))`` computed with the scale on the output where it factors.

  Per-channel: ``dot_general(x, q − zp) · s`` in float32 accumulation.  Group scales: the weight is
  dequantized to ``x.dtype`` inside the computation (XLA fuses it into the dot operand).
  Output dtype: ``preferred_element_type`` or ``x.dtype``.
  """
  lay = DotLayout.make(dimension_numbers, x.shape, w.shape)
  out_dtype = preferred_element_type or x.dtype
  acc = accumulation_dtype(x.dtype)
  if scales_factor_out(w, lay.wc):
    wv = integer_valued_weight(w, x.dtype)
    y = lax.dot_general(x, wv, lay.dimension_numbers, precision=precision,
                        preferred_element_type=acc, out_sharding=out_sharding)
    y = y * lay.rhs_to_out(w.scale.astype(acc))
  else:
    y = lax.dot_general(x, dequantize(w, x.dtype), lay.dimension_numbers, precision=precision,
                        preferred_element_type=acc, out_sharding=out_sharding)
  return y.astype(out_dtype)


def static_activation_params(act: ActivationQuant) -> tuple[jax.Array, jax.Array | None]:
  """The calibrated per-tensor ``(scale, zero_point)`` of static activations: float32 scale,
  int32 zero point (rounded) or None when symmetric."""
  if act.scale is None:
    raise ValueError("static activation quantization needs a calibrated scale "
                     "(ActivationQuant.scale is None); run calibration first")
  s = jnp.asarray(act.scale, jnp.float32)
  z = None
  if act.zero_point is not None:
    z = jnp.asarray(act.zero_point).astype(jnp.float32)
    z = numerics.round_half_even(z).astype(jnp.int32)
  elif not act.spec.symmetric:
    raise ValueError("static asymmetric activation quantization needs a calibrated zero point "
                     "(ActivationQuant.zero_point is None)")
  return s, z


def quantize_activations(x: jax.Array, contracting: Sequence[int], act: ActivationQuant
                         ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """Quantizes ``x`` to ``act.spec.qtype`` (int8, uint8 or fp8 e4m3).

  Dynamic mode: one scale per token, i.e. per index of the non-contracting axes (a keepdims
  reduction over ``contracting``); symmetric ``s = absmax/127`` (fp8: ``absmax/448``), asymmetric
  ``s = (max − min)/255`` with the range widened to contain 0 and an integer zero point.  Static
  mode: the calibrated per-tensor ``act.scale`` / ``act.zero_point``.  An all-zero token gets
  scale 1.

  Returns:
    ``(q, scale, zero_point)``: ``q`` int32 values in ``[qmin, qmax]`` (fp8: float8_e4m3fn values
    ``e4m3(clip(x / s, ±448))``); ``scale`` float32 (keepdims shape or scalar); ``zero_point``
    int32 of the same shape, or None when symmetric (always for fp8).
  """
  spec = act.spec
  qt = spec.qtype
  xf = x.astype(jnp.float32)
  if spec.mode is ActMode.DYNAMIC:
    axes = tuple(contracting)
    if spec.symmetric:
      amax = jnp.max(jnp.abs(xf), axis=axes, keepdims=True)
      # fp8: the product XLA makes of ``/ 448`` anyway, written out so eager and jit agree
      s = amax * np.float32(1.0 / qt.qmax) if qt.is_float else amax / float(qt.qmax)
      z = None
    else:
      lo = jnp.minimum(jnp.min(xf, axis=axes, keepdims=True), 0.0)
      hi = jnp.maximum(jnp.max(xf, axis=axes, keepdims=True), 0.0)
      s = (hi - lo) / float(qt.qmax - qt.qmin)
    s = jnp.where(s > 0, s, 1.0)
    if not spec.symmetric:
      z = jnp.clip(numerics.round_half_even(qt.qmin - lo / s), qt.qmin, qt.qmax).astype(jnp.int32)
  else:
    s, z = static_activation_params(act)
  if qt.is_float:
    return numerics.fp8_encode(xf / s), s, None
  v = numerics.round_half_even(xf / s)
  if z is not None:
    v = v + z.astype(jnp.float32)
  q = jnp.clip(v, qt.qmin, qt.qmax).astype(jnp.int32)
  return q, s, z


# e4m3's largest value 448 = 1.75·2^8 and the spacing there (32): unclipped, x/s up to 464 would
# round to 448 anyway (464 is a tie, to even 448), beyond it past 448.
_FP8_ROUNDS_TO_MAX = FP8_E4M3_MAX + 16.0


def activation_clip_mask(x: jax.Array, act: ActivationQuant) -> jax.Array | None:
  """Where the clip of :func:`quantize_activations` leaves the quantized ``x`` as it would be
  without it (bool, ``x``'s shape), for the clipped straight-through estimator of static scales
  (:mod:`jq.ops.ste`): ``qmin ≤ round(x / s) + z ≤ qmax``; fp8, which clips before rounding:
  ``|x / s| ≤ 464`` (``e4m3(x / s)`` would not exceed 448).  None for dynamic scales, which cover
  each token's range (identity STE)."""
  if act.spec.mode is ActMode.DYNAMIC:
    return None
  qt = act.spec.qtype
  s, z = static_activation_params(act)
  u = x.astype(jnp.float32) / s
  if qt.is_float:
    return jnp.abs(u) <= _FP8_ROUNDS_TO_MAX
  v = numerics.round_half_even(u)
  if z is not None:
    v = v + z.astype(jnp.float32)
  return (v >= qt.qmin) & (v <= qt.qmax)


def fake_quant_activations(x: jax.Array, contracting: Sequence[int], act: ActivationQuant
                           ) -> jax.Array:
  """``(q − zero_point) · scale`` of :func:`quantize_activations`, in ``x.dtype`` (a reference)."""
  q, s, z = quantize_activations(x, contracting, act)
  if z is not None:
    q = q - z
  return (q.astype(jnp.float32) * s).astype(x.dtype)


def _to_int8(q: jax.Array, z: jax.Array | None, qtype: QType
             ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """Values (and zero point) of a uint8/int8 operand -> (int8 values, int32 values, int32 zp),
  shifting unsigned ones by −128 so ``q − z`` is unchanged."""
  q32 = q.astype(jnp.int32)
  z = None if z is None else z.astype(jnp.int32)
  if not qtype.signed:
    q32 = q32 - 128
    z = (jnp.int32(0) if z is None else z) - 128
  q8 = q if q.dtype == jnp.int8 else q32.astype(jnp.int8)
  return q8, q32, z


def int8_dot_general(x: jax.Array, w: QArray, dimension_numbers: DimensionNumbers,
                     precision=None, preferred_element_type=None, *,
                     out_sharding=None) -> jax.Array:
  """Int8 × int8 -> int32 ``dot_general`` with exact zero-point corrections, rescaled to float.

  ``w`` must be an 8-bit QArray whose scale (and zero point) is constant along the contracting
  axes, carrying ``w.activation`` (dynamic or static).  ``precision`` is unused (integer dots are
  exact).  Output dtype: ``preferred_element_type`` or ``x.dtype``.
  """
  del precision
  lay = DotLayout.make(dimension_numbers, x.shape, w.shape)
  out_dtype = preferred_element_type or x.dtype
  act = w.activation
  qx, sx, zx = quantize_activations(x, lay.xc, act)
  qx8, qx, zx = _to_int8(qx, zx, act.spec.qtype)
  qw8, qw, zw = _to_int8(w.unpacked(), w.zero_point, w.qtype)
  acc = lax.dot_general(qx8, qw8, lay.dimension_numbers, preferred_element_type=jnp.int32,
                        out_sharding=out_sharding)
  zw_out = None if zw is None else lay.rhs_to_out(jnp.broadcast_to(zw, w.scale.shape))
  zx_out = None if zx is None else lay.lhs_to_out(zx)
  if zw_out is not None:
    acc = acc - zw_out * lay.lhs_to_out(jnp.sum(qx, axis=lay.xc, keepdims=True, dtype=jnp.int32))
  if zx_out is not None:
    acc = acc - zx_out * lay.rhs_to_out(jnp.sum(qw, axis=lay.wc, keepdims=True, dtype=jnp.int32))
    if zw_out is not None:
      k = int(np.prod([w.shape[a] for a in lay.wc], dtype=np.int64))
      acc = acc + jnp.int32(k) * zx_out * zw_out  # wraps mod 2^32 exactly like the sums above
  y = acc.astype(jnp.float32) * lay.lhs_to_out(sx) * lay.rhs_to_out(w.scale.astype(jnp.float32))
  return y.astype(out_dtype)


def fp8_dot_general(x: jax.Array, w: QArray, dimension_numbers: DimensionNumbers,
                    precision=None, preferred_element_type=None, *, out_sharding=None,
                    native: bool | None = None) -> jax.Array:
  """Fp8 × fp8 ``dot_general``: ``y = (Σ e4m3(x / sx) · qw) · sx ⊗ sw`` (see the module docstring).

  ``w`` must be an ``FP8_E4M3`` QArray whose scale is constant along the contracting axes,
  carrying ``w.activation`` (fp8 dynamic: ``sx = absmax / 448`` per token; static: the calibrated
  per-tensor scale).  ``native``: XLA's float8 dot (``lax.dot_general`` on float8_e4m3fn operands,
  float32 result; tensor cores on H100-class GPUs); False: the exact emulation (e4m3 values upcast
  to float32, products exact, float32 sums); None: native on GPU, emulation elsewhere.
  ``precision`` is unused (the emulation always runs at full float32 precision).  Output dtype:
  ``preferred_element_type`` or ``x.dtype``.

  Example:
    >>> qw = jq.tree.with_activation(jq.quantize(w, jq.FP8_CHANNEL), jq.A_FP8_DYNAMIC, None,
    ...                              path="w", leaf=w)
    >>> y = fp8_dot_general(x, qw, (((1,), (0,)), ((), ())))
  """
  del precision
  lay = DotLayout.make(dimension_numbers, x.shape, w.shape)
  out_dtype = preferred_element_type or x.dtype
  qx, sx, _ = quantize_activations(x, lay.xc, w.activation)
  qw = w.unpacked()
  if native is None:
    native = jax.default_backend() == "gpu"
  if native:
    acc = lax.dot_general(qx, qw, lay.dimension_numbers, preferred_element_type=jnp.float32,
                          out_sharding=out_sharding)
  else:
    acc = lax.dot_general(qx.astype(jnp.float32), qw.astype(jnp.float32), lay.dimension_numbers,
                          precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32,
                          out_sharding=out_sharding)
  y = acc * lay.lhs_to_out(sx) * lay.rhs_to_out(w.scale.astype(jnp.float32))
  return y.astype(out_dtype)


__all__ = ["DotLayout", "weight_only_dot_general", "int8_dot_general", "fp8_dot_general",
           "quantize_activations", "static_activation_params", "activation_clip_mask",
           "fake_quant_activations", "integer_valued_weight", "scales_factor_out",
           "accumulation_dtype"]
