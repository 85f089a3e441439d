"""``conv_general_dilated`` with a QArray kernel: ``jax.lax.conv_general_dilated``'s twin.

Invariants (tests hold the implementation to them):

* Weight-only: ``y = lax.conv_general_dilated(x, dequantize(w), ...)``.  When every axis of ``w``
  other than its output-feature axis has a single scale (per-channel or per-tensor), the scale
  factors out of the window sum: ``y = conv(x, q − zp) · s[o]`` (``table[q]`` for NF4), accumulated
  in float32.  Group scales dequantize the kernel inside the computation.
* Int8 activations (``w.activation`` set, 8-bit per-channel or per-tensor ``w``): ``x`` is
  quantized with ONE scale per example (dynamic: over all non-batch axes, since a per-position
  scale would not factor out of a window; static: the calibrated per-tensor scale), and with
  ``x̃ = qx − zx``, ``w̃ = qw − zw``
  (both shifted into int8 when unsigned, which leaves the differences unchanged)::

      y[b, o, p] = sx[b] · sw[o] · Σ_window P(x̃)[b, ·] w̃[o, ·]

  where ``P`` is the convolution's zero padding and input dilation.  The padded positions are real
  zeros, i.e. 0 in the ``x̃`` domain, not the zero point, so expanding the product gives four
  ``int8 × int8 -> int32`` convolutions; the int32 sum is exact whenever the true result fits
  int32 (single terms may wrap mod 2³², the total does not)::

      Σ P(x̃)·w̃ = conv(qx, qw) − zw[o]·conv(qx, 1)
                 − zx[b]·conv(P(1), qw) + zx[b]·zw[o]·conv(P(1), 1)

  ``conv(qx, 1)`` sums ``qx`` over each window (per feature group); ``conv(P(1), ·)`` sums over the
  real (non-padding, non-hole) input positions of each window, the same for every example, so it
  runs on a batch of one.  Without positive padding or input dilation ``P(1) = 1`` and the last
  two terms reduce to ``Σ qw[o]`` and the window size.  Symmetric int8 activations and weights
  need only the first convolution.

Gradients: with int8 activations, the straight-through estimator's (:mod:`jq.ops.ste`): the
gradient with respect to ``lhs`` is that of the weight-only convolution (the dequantized kernel),
zero where a static activation scale clips ``lhs``; the kernel gets none.

Backends: verified on XLA:CPU.  XLA:GPU has historically refused or restricted integer
convolutions (jax-ml/jax#7637); the int8 path there is untested.
"""
from __future__ import annotations

import functools
import operator
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jq.ops import reference, ste
from jq.ops.dispatch import Mode, mode_of
from jq.qarray import QArray, dequantize
from jq.qtypes import QType

_INT8_TYPES = (QType.INT8, QType.UINT8)


def _ints(v, n: int, what: str, where: str) -> tuple[int, ...]:
  try:
    out = tuple(operator.index(a) for a in v)
  except TypeError as e:
    raise ValueError(f"{where}: {what} {v!r} must be a sequence of {n} ints") from e
  if len(out) != n:
    raise ValueError(f"{where}: {what} {v!r} must have one entry per spatial dimension ({n})")
  return out


def resolve_padding(padding, lhs_spatial: Sequence[int], rhs_spatial: Sequence[int],
                    window_strides: Sequence[int], lhs_dilation: Sequence[int],
                    rhs_dilation: Sequence[int], *, where: str = "<conv>"
                    ) -> tuple[tuple[int, int], ...]:
  """Explicit ``(low, high)`` pairs for ``padding``, resolved exactly as
  ``lax.conv_general_dilated`` does (string padding against the dilated kernel; string padding with
  input dilation is an error there too)."""
  n = len(lhs_spatial)
  if isinstance(padding, str):
    if any(d != 1 for d in lhs_dilation):
      raise ValueError(f"{where}: string padding {padding!r} cannot be combined with input "
                       f"(lhs) dilation {tuple(lhs_dilation)}; give explicit (low, high) pairs")
    eff = [0 if k == 0 else (k - 1) * r + 1 for k, r in zip(rhs_spatial, rhs_dilation)]
    try:
      pads = lax.padtype_to_pads(tuple(lhs_spatial), eff, tuple(window_strides), padding)
    except (ValueError, TypeError, RuntimeError) as e:
      raise ValueError(f"{where}: padding {padding!r}: {e}") from e
    return tuple((int(lo), int(hi)) for lo, hi in pads)
  try:
    pads = tuple((operator.index(lo), operator.index(hi)) for lo, hi in padding)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{where}: padding {padding!r} must be a string or a sequence of (low, high) "
                     "int pairs") from e
  if len(pads) != n:
    raise ValueError(f"{where}: padding {padding!r} needs one (low, high) pair per spatial "
                     f"dimension ({n})")
  return pads


def _to_out_axis(t: jax.Array, ndim: int, axis: int) -> jax.Array:
  """A tensor with at most one non-unit axis (or a scalar) -> broadcastable to the output with its
  entries along ``axis``."""
  if t.ndim == 0:
    return t
  shape = [1] * ndim
  shape[axis] = -1
  return t.reshape(shape)


def _check(lhs: jax.Array, rhs: QArray, window_strides, padding, lhs_dilation, rhs_dilation,
           dimension_numbers, feature_group_count: int, batch_group_count: int, name: str):
  """Validates the operands; returns ``(dnums, strides, pads, lhs_dil, rhs_dil, where)``."""
  if not isinstance(rhs, QArray):
    raise ValueError(f"{name}: rhs must be a jq.QArray, got {type(rhs).__name__}; use "
                     "jax.lax.conv_general_dilated for float operands")
  if not jnp.issubdtype(lhs.dtype, jnp.floating):
    raise ValueError(f"{name}: lhs shape {tuple(lhs.shape)} dtype {lhs.dtype}: activations must "
                     "be floating point")
  rhs.validate(name)
  where = (f"{name}: lhs shape {tuple(lhs.shape)} dtype {lhs.dtype}, rhs QArray(qtype="
           f"{rhs.qtype.value}, shape={rhs.shape}, tile={rhs.tile})")
  if lhs.ndim != rhs.ndim or lhs.ndim < 2:
    raise ValueError(f"{where}: lhs and rhs need the same rank (2 + spatial dimensions)")
  try:
    dnums = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{where}: invalid dimension_numbers {dimension_numbers!r}: {e}") from e
  n = lhs.ndim - 2
  strides = _ints(window_strides, n, "window_strides", where)
  lhs_dil = (1,) * n if lhs_dilation is None else _ints(lhs_dilation, n, "lhs_dilation", where)
  rhs_dil = (1,) * n if rhs_dilation is None else _ints(rhs_dilation, n, "rhs_dilation", where)
  if any(s < 1 for s in strides + lhs_dil + rhs_dil):
    raise ValueError(f"{where}: strides {strides} and dilations {lhs_dil}, {rhs_dil} must be >= 1")
  fgc, bgc = operator.index(feature_group_count), operator.index(batch_group_count)
  if fgc < 1 or bgc < 1 or (fgc > 1 and bgc > 1):
    raise ValueError(f"{where}: feature_group_count={fgc} and batch_group_count={bgc} must be "
                     ">= 1 and not both > 1")
  lhs_spec, rhs_spec, _ = dnums
  c_in, c_w, o = lhs.shape[lhs_spec[1]], rhs.shape[rhs_spec[1]], rhs.shape[rhs_spec[0]]
  if c_in != c_w * fgc:
    raise ValueError(f"{where}: lhs has {c_in} input features but the kernel has {c_w} per group "
                     f"x feature_group_count={fgc}")
  if o % fgc or o % bgc or lhs.shape[lhs_spec[0]] % bgc:
    raise ValueError(f"{where}: {o} output features (and batch {lhs.shape[lhs_spec[0]]}) must be "
                     f"divisible by feature_group_count={fgc} and batch_group_count={bgc}")
  pads = resolve_padding(padding, [lhs.shape[a] for a in lhs_spec[2:]],
                         [rhs.shape[a] for a in rhs_spec[2:]], strides, lhs_dil, rhs_dil,
                         where=where)
  return dnums, strides, pads, lhs_dil, rhs_dil, where


def _crop_negative_padding(lhs: jax.Array, pads, lhs_dil, lhs_spec
                           ) -> tuple[jax.Array, tuple[tuple[int, int], ...]]:
  """Negative padding as a slice of ``lhs`` (where there is no input dilation): the same function,
  and it sidesteps an XLA:CPU float32 convolution bug (jax 0.10: padding ``(-1, 1)`` returns
  garbage in the last output row; float64 and integer convolutions are correct).  Used by the
  float (weight-only) path only: the int8 path quantizes the whole input first, and its integer
  convolutions take negative padding correctly."""
  out = []
  for i, ((lo, hi), d) in enumerate(zip(pads, lhs_dil)):
    if d != 1 or (lo >= 0 and hi >= 0):
      out.append((lo, hi))
      continue
    axis = lhs_spec[2 + i]
    size = lhs.shape[axis]
    start, stop = max(-lo, 0), size - max(-hi, 0)
    if stop < start:
      out.append((lo, hi))  # cropped away entirely: leave it to lax (an empty output)
      continue
    lhs = lax.slice_in_dim(lhs, start, stop, axis=axis)
    out.append((max(lo, 0), max(hi, 0)))
  return lhs, tuple(out)


def _lax_conv(strides, pads, lhs_dil, rhs_dil, dnums):
  """``lax.conv_general_dilated`` with the window arguments bound (operands and groups free)."""
  return functools.partial(lax.conv_general_dilated, window_strides=strides, padding=pads,
                           lhs_dilation=lhs_dil, rhs_dilation=rhs_dil, dimension_numbers=dnums)


def conv_general_dilated(lhs: ArrayLike, rhs: QArray, window_strides: Sequence[int], padding,
                         lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None, dimension_numbers=None,
                         feature_group_count: int = 1, batch_group_count: int = 1,
                         precision=None, preferred_element_type=None, *,
                         name: str | None = None) -> jax.Array:
  """``lax.conv_general_dilated(lhs, dequantize(rhs), ...)``, computed quantized (module docstring).

  Args:
    lhs: float activations.
    rhs: the quantized kernel; ``rhs.activation`` selects int8 dynamic/static activations.
    window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
      batch_group_count, precision: as in ``lax.conv_general_dilated`` (``precision`` applies to
      float convolutions only; integer ones are exact).
    preferred_element_type: output dtype (default ``lhs.dtype``); accumulation is float32 (float64
      for float64 inputs) or int32.
    name: the parameter path used in error messages.

  Example:
    >>> dn = ("NHWC", "HWIO", "NHWC")
    >>> y = conv_general_dilated(x, qkernel, (1, 1), "SAME", dimension_numbers=dn)
  """
  name = name or "<conv_general_dilated>"
  lhs = jnp.asarray(lhs)
  dnums, strides, pads, lhs_dil, rhs_dil, where = _check(
      lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
      feature_group_count, batch_group_count, name)
  out_dtype = lhs.dtype if preferred_element_type is None else preferred_element_type
  rhs_spec = dnums.rhs_spec
  factors = reference.scales_factor_out(rhs, [a for a in range(rhs.ndim) if a != rhs_spec[0]])
  float_conv = functools.partial(
      _weight_only_conv, dnums=dnums, strides=strides, pads=pads, lhs_dil=lhs_dil,
      rhs_dil=rhs_dil, feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision, factors=factors,
      out_dtype=out_dtype)
  if mode_of(rhs) is Mode.WEIGHT_ONLY:
    return float_conv(lhs, rhs)
  if rhs.activation.spec.qtype.is_float:
    raise ValueError(f"{where}: {rhs.activation.spec.qtype.value} activations are not supported "
                     "for convolutions (only int8); quantize this kernel weight-only "
                     "(activation=None: fp8 weights work) or with int8 activations")
  if rhs.qtype not in _INT8_TYPES:
    raise ValueError(f"{where}: int8 activations need 8-bit integer weights; quantize this layer "
                     "weight-only (activation=None) or with an 8-bit spec")
  if not factors:
    raise ValueError(f"{where}: int8 activations need one weight scale per output feature (axis "
                     f"{rhs_spec[0]}); group scales do not factor out of the integer convolution; "
                     "use per-channel weights or weight-only mode for this layer")
  if batch_group_count != 1:
    raise ValueError(f"{where}: int8 activations need batch_group_count=1 (per-example scales do "
                     f"not factor out of a batch-grouped convolution), got {batch_group_count}")
  act = rhs.activation
  conv = _lax_conv(strides, pads, lhs_dil, rhs_dil, dnums)
  if mode_of(rhs) is Mode.STATIC:
    if np.shape(act.scale) != ():
      raise ValueError(f"{where}: static activation scale must be a scalar (per tensor), got "
                       f"shape {np.shape(act.scale)}")
    if not act.spec.symmetric and act.zero_point is None:
      raise ValueError(f"{where}: static asymmetric activations need a calibrated zero point")
  int8_conv = lambda x, w: _int8_conv(x, w, conv, dnums, pads, lhs_dil,
                                      feature_group_count).astype(out_dtype)
  # the int8 convolution runs forward; the gradient is the straight-through estimator's, that of
  # the weight-only convolution (jq.ops.ste)
  return ste.straight_through(int8_conv, float_conv, lhs, rhs)


def _weight_only_conv(lhs: jax.Array, rhs: QArray, *, dnums, strides, pads, lhs_dil, rhs_dil,
                      feature_group_count: int, batch_group_count: int, precision,
                      factors: bool, out_dtype) -> jax.Array:
  """The weight-only path of :func:`conv_general_dilated` (float convolution; ``rhs.activation``
  is not read): the conv of the integer-valued kernel scaled per output feature where the scales
  factor out, else of the dequantized kernel."""
  lhs, pads = _crop_negative_padding(lhs, pads, lhs_dil, dnums.lhs_spec)
  conv = _lax_conv(strides, pads, lhs_dil, rhs_dil, dnums)
  acc = reference.accumulation_dtype(lhs.dtype)
  wv = (reference.integer_valued_weight(rhs, lhs.dtype) if factors
        else dequantize(rhs, lhs.dtype))
  y = conv(lhs, wv, feature_group_count=feature_group_count,
           batch_group_count=batch_group_count, precision=precision,
           preferred_element_type=acc)
  if factors:
    y = y * _to_out_axis(rhs.scale.astype(acc).reshape(-1), y.ndim, dnums.out_spec[1])
  return y.astype(out_dtype)


def _ones(shape: Sequence[int], resize: dict[int, int]) -> jax.Array:
  """int8 ones of ``shape`` with the axes in ``resize`` given new sizes."""
  shape = list(shape)
  for axis, size in resize.items():
    shape[axis] = size
  return jnp.ones(shape, jnp.int8)


def _int8_conv(lhs: jax.Array, rhs: QArray, conv, dnums, pads, lhs_dil,
               groups: int) -> jax.Array:
  """The int8 path of :func:`conv_general_dilated` (see the module docstring for the algebra)."""
  lhs_spec, rhs_spec, out_spec = dnums
  nd = lhs.ndim
  to_batch = functools.partial(_to_out_axis, ndim=nd, axis=out_spec[0])
  to_feature = functools.partial(_to_out_axis, ndim=nd, axis=out_spec[1])
  act = rhs.activation
  per_example = tuple(a for a in range(nd) if a != lhs_spec[0])
  qx, sx, zx = reference.quantize_activations(lhs, per_example, act)
  qx8, _, zx = reference._to_int8(qx, zx, act.spec.qtype)
  qw8, qw, zw = reference._to_int8(rhs.unpacked(), rhs.zero_point, rhs.qtype)
  iconv = functools.partial(conv, feature_group_count=groups, preferred_element_type=jnp.int32)
  acc = iconv(qx8, qw8)
  out_features = rhs.shape[rhs_spec[0]]
  w_reduce = tuple(a for a in range(nd) if a != rhs_spec[0])
  # P(1) = 1 everywhere when nothing is padded in and no holes are inserted between inputs.
  all_real = all(lo <= 0 and hi <= 0 for lo, hi in pads) and all(d == 1 for d in lhs_dil)
  zw_out = None
  if zw is not None:
    zw_out = to_feature(jnp.broadcast_to(zw, rhs.scale.shape).reshape(-1))
    # Window sums of qx per feature group: a ones kernel with one output feature per group.
    sums = iconv(qx8, _ones(rhs.shape, {rhs_spec[0]: groups}))
    if groups > 1:
      sums = jnp.repeat(sums, out_features // groups, axis=out_spec[1])
    acc = acc - zw_out * sums
  if zx is not None:
    zx_out = to_batch(zx.reshape(-1))
    if all_real:
      wsum = to_feature(jnp.sum(qw, axis=w_reduce, dtype=jnp.int32))
    else:  # Σ of qw over the real input positions of each window: the same for every example
      wsum = iconv(_ones(lhs.shape, {lhs_spec[0]: 1}), qw8)
    acc = acc - zx_out * wsum
    if zw_out is not None:
      if all_real:
        count = jnp.int32(int(np.prod([rhs.shape[a] for a in w_reduce], dtype=np.int64)))
      else:  # real positions per window (one channel) x input features per group
        count = conv(_ones(lhs.shape, {lhs_spec[0]: 1, lhs_spec[1]: 1}),
                     _ones(rhs.shape, {rhs_spec[0]: 1, rhs_spec[1]: 1}),
                     preferred_element_type=jnp.int32)
        count = count * jnp.int32(rhs.shape[rhs_spec[1]])
      acc = acc + zx_out * zw_out * count  # wraps mod 2^32 exactly like the terms above
  sw = to_feature(rhs.scale.astype(jnp.float32).reshape(-1))
  return acc.astype(jnp.float32) * to_batch(sx.reshape(-1)) * sw


__all__ = ["conv_general_dilated", "resolve_padding"]
