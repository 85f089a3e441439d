"""Quantizing a single tensor: ``compute_params``, ``quantize``, ``fake_quant``.

All three are pure, jittable functions of ``(x, spec)``; ``spec`` is hashable and can be static.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jq import numerics
from jq.layout import Layout
from jq.qarray import QArray, dequantize
from jq.qtypes import QType
from jq.spec import ClipMethod, QuantSpec


def check_float_input(x, name: str = "<tensor>") -> None:
  """Raises ValueError (naming ``name``, shape and dtype) for non-float or non-finite input.

  The finiteness check runs on concrete arrays only (on device; one bool comes back), not on
  tracers under ``jit``.
  """
  dt = getattr(x, "dtype", None)
  if dt is None or not jnp.issubdtype(dt, jnp.floating):
    raise ValueError(f"{name}: shape {tuple(np.shape(x))} dtype {dt}: only floating-point tensors "
                     "can be quantized; skip this parameter with a rule (weight=None)")
  if numerics.is_concrete(x) and np.size(x):
    with jax.ensure_compile_time_eval():  # a concrete array closed over by a jit trace
      finite = jnp.isfinite(jnp.asarray(x))
      ok = bool(jnp.all(finite))
    if not ok:
      bad = int(np.size(x)) - int(np.count_nonzero(np.asarray(finite)))
      raise ValueError(f"{name}: shape {tuple(x.shape)} dtype {x.dtype} has {bad} NaN/Inf values; "
                       "refusing to quantize a non-finite tensor")


def _check_shape(x, name: str) -> None:
  if x.ndim == 0:
    raise ValueError(f"{name}: shape () dtype {x.dtype}: scalars are not quantized; skip them "
                     "with a rule (weight=None)")
  if x.size == 0:
    raise ValueError(f"{name}: shape {tuple(x.shape)} dtype {x.dtype}: empty tensors are not "
                     "quantized; skip them with a rule (weight=None)")


def _range_to_params(lo, hi, spec: QuantSpec):
  """Scale and zero point for per-tile ranges ``[lo, hi]`` (``lo <= 0 <= hi``).

  Symmetric: ``scale = absmax / qmax`` (``absmax`` for NF4), no zero point.  Asymmetric:
  ``scale = (hi - lo) / (qmax - qmin)`` and ``zero_point = qmin - round(lo / scale)``, so ``lo``
  maps to ``qmin`` exactly and 0 is on the grid.  An all-zero tile gets scale 1.  When rounding the scale to its stored precision
  made the grid too short for ``hi`` to reach ``qmax``, the scale is lowered by one unit: the grid
  ends are then always used, which is what makes :func:`quantize` idempotent on its own output.
  """
  qt = spec.qtype
  sdt = jnp.dtype(spec.scale_dtype)
  if spec.symmetric:
    scale = numerics.snap_scale(hi * np.float32(1.0 / (1.0 if qt.is_table else qt.qmax)), sdt)
    return jnp.where(hi == 0, jnp.ones((), sdt), scale), None  # all-zero tile: scale 1
  n = float(qt.qmax - qt.qmin)
  # One rounding of the range and one of the product: XLA turns ``/ n`` into ``* (1 / n)`` and
  # would refactor ``hi / n - lo / n`` differently in eager and jitted code.  (A range wider than
  # float32's maximum becomes inf and is clamped to the largest scale.)
  scale = numerics.snap_scale((hi - lo) * np.float32(1.0 / n), sdt)
  scale = jnp.where(hi == lo, jnp.ones((), sdt), scale)  # all-zero tile: scale 1
  r = 1.0 / scale.astype(jnp.float32)
  a, b = jnp.round(lo * r), jnp.round(hi * r)
  short = (b - a < n) & (hi > lo) & (scale > numerics.scale_limits(sdt)[0])
  scale = jnp.where(short, numerics.prev_scale(scale), scale)
  r = 1.0 / scale.astype(jnp.float32)
  zp = jnp.clip(float(qt.qmin) - jnp.round(lo * r), qt.qmin, qt.qmax).astype(qt.unpacked_dtype)
  return scale, zp


def _quantize_split(xb, scale, zp, spec: QuantSpec, shape, tile):
  """Unpacked integer values of ``xb`` (the ``numerics.split`` layout) on the given grid:
  ``clip(round(x / scale) + zero_point)`` (NF4: nearest table entry of ``x / scale``)."""
  qt = spec.qtype
  r = numerics.tiles_to_split(1.0 / scale.astype(jnp.float32), shape, tile)
  v = xb.astype(jnp.float32) * r
  if qt.is_table:
    return numerics.nf4_encode(v)
  v = numerics.round_half_even(v)
  if zp is not None:
    v = v + numerics.tiles_to_split(zp.astype(jnp.float32), shape, tile)
  return jnp.clip(v, qt.qmin, qt.qmax).astype(qt.unpacked_dtype)


def _dequant_split(qb, scale, zp, spec: QuantSpec, shape, tile):
  s = numerics.tiles_to_split(scale.astype(jnp.float32), shape, tile)
  if spec.qtype.is_table:
    return numerics.nf4_decode(qb) * s
  v = qb.astype(jnp.float32)
  if zp is not None:
    v = v - numerics.tiles_to_split(zp.astype(jnp.float32), shape, tile)
  return v * s


def _reduce(fn, xb, shape, tile):
  axes = numerics.tile_axes(shape, tile)
  return numerics.stats_to_tiles(fn(xb, axis=axes, keepdims=True), shape, tile)


def _ranges(x, xb, spec: QuantSpec, tile):
  """Per-tile float32 ``(lo, hi)`` with ``lo <= 0 <= hi`` (``lo == -hi`` if symmetric), clipping
  applied.

  ``x`` is the input tensor, ``xb`` its ``split`` layout (edge padded), both in the input dtype:
  min/max/absmax are exact in any float dtype, so they run on the input (a bfloat16 weight is
  never copied to float32 in full).
  """
  shape = x.shape
  clip = spec.clip
  if clip.method is ClipMethod.PERCENTILE:
    xn = numerics.split(x.astype(jnp.float32), tile, fill=float("nan"))
    pct = lambda q: functools.partial(jnp.nanpercentile, q=q)
    if spec.symmetric:
      hi = _reduce(pct(clip.percentile), jnp.abs(xn), shape, tile)
      lo = -hi
    else:
      hi = _reduce(pct(clip.percentile), xn, shape, tile)
      lo = _reduce(pct(100.0 - clip.percentile), xn, shape, tile)
  elif spec.symmetric:
    hi = _reduce(jnp.max, jnp.abs(xb), shape, tile).astype(jnp.float32)
    lo = -hi
  else:
    lo = _reduce(jnp.min, xb, shape, tile).astype(jnp.float32)
    hi = _reduce(jnp.max, xb, shape, tile).astype(jnp.float32)
  lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
  if spec.symmetric:
    hi = jnp.maximum(-lo, hi)
    lo = -hi
  if clip.method is ClipMethod.FIXED:
    lo, hi = lo * clip.ratio, hi * clip.ratio
  elif clip.method is ClipMethod.MSE:
    lo, hi = _mse_search(xb, lo, hi, spec, shape, tile)
  return lo, hi


def _params(x, spec: QuantSpec, name: str, layout: Layout | None = None):
  """``(tile, split layout of x (input dtype), scale, zero_point)``."""
  tile = spec.tile(x.shape, layout=layout, name=name, dtype=x.dtype)
  xb = numerics.split(x, tile, fill="edge")
  lo, hi = _ranges(x, xb, spec, tile)
  scale, zp = _range_to_params(lo, hi, spec)
  return tile, xb, scale, zp


def compute_params(x: jax.Array, spec: QuantSpec, *, name: str = "<tensor>",
                   layout: Layout | None = None) -> tuple[jax.Array, jax.Array | None]:
  """Per-tile ``(scale, zero_point)`` of ``x`` under ``spec`` (zero_point None if symmetric).

  The range always contains 0, so 0 is represented exactly; all-zero tiles get scale 1.
  ``layout`` gives the roles of ``x``'s axes (see :meth:`QuantSpec.tile`).
  """
  x = jnp.asarray(x)
  _check_shape(x, name)
  _, _, scale, zp = _params(x, spec, name, layout)
  return scale, zp


def _mse_search(xb, lo, hi, spec: QuantSpec, shape, tile):
  """Per tile, the shrink ratio of ``[lo, hi]`` with the least squared quantization error.

  Ratio 1 (no clipping) is the starting point and is only replaced by a strictly better one, so
  the result is never worse than no clipping.  A scan over ratios: memory stays one tensor.
  """
  ratios = jnp.linspace(spec.clip.min_ratio, 1.0, spec.clip.grid, dtype=jnp.float32)
  pad = any(s % t and 1 < t < s for s, t in zip(shape, tile))
  mask = numerics.split(jnp.ones(shape, jnp.bool_), tile, fill=False) if pad else None

  xb = xb.astype(jnp.float32)

  def err(r):
    scale, zp = _range_to_params(lo * r, hi * r, spec)
    d = _dequant_split(_quantize_split(xb, scale, zp, spec, shape, tile), scale, zp, spec, shape,
                       tile) - xb
    e = d * d
    if mask is not None:
      e = jnp.where(mask, e, 0.0)
    return _reduce(jnp.sum, e, shape, tile)

  def body(carry, r):
    best_err, best_r = carry
    e = err(r)
    better = e < best_err
    return (jnp.where(better, e, best_err), jnp.where(better, r, best_r)), None

  init = (err(jnp.float32(1.0)), jnp.ones_like(lo))
  (_, best), _ = jax.lax.scan(body, init, ratios[:-1])
  return lo * best, hi * best


def quantize(x: jax.Array, spec: QuantSpec, *, name: str = "<tensor>",
             layout: Layout | None = None) -> QArray:
  """Quantizes ``x`` to a :class:`QArray`: ``q = clip(round(x / scale) + zero_point)``.

  Rounding is to nearest, ties to even.  Invariants (no clipping configured): every element is
  within half a step of its dequantized value (asymmetric grids: plus at most
  ``(qmax - qmin) * 2**-(p - 1)`` steps at the range ends, ``p`` the scale's significant bits, 20
  for float32 scales), zeros stay exactly zero, and ``quantize(dequantize(q))`` reproduces ``q``.

  ``layout`` gives the roles of ``x``'s axes (contracting / channels / stacked layers, see
  :class:`jq.Layout`); without it a 2-D ``x`` is read as a Dense kernel ``(in, out)``.

  Example:
    >>> q = quantize(w, QuantSpec(qtype=QType.INT8))       # per-output-channel int8
    >>> w_hat = q.dequantize(jnp.bfloat16)
  """
  check_float_input(x, name)
  return _quantize_checked(jnp.asarray(x), spec, name, layout)


def _quantize_checked(x: jax.Array, spec: QuantSpec, name: str,
                      layout: Layout | None = None) -> QArray:
  """:func:`quantize` for an input that already passed :func:`check_float_input`."""
  _check_shape(x, name)
  tile, xb, scale, zp = _params(x, spec, name, layout)
  q = numerics.merge(_quantize_split(xb, scale, zp, spec, x.shape, tile), tile, x.shape)
  return QArray(values=numerics.pack(q, spec.qtype), scale=scale, zero_point=zp, activation=None,
                qtype=spec.qtype, shape=tuple(x.shape), tile=tile)


def quantize_with_params(x: jax.Array, scale: jax.Array, zero_point: jax.Array | None,
                         spec: QuantSpec, *, name: str = "<tensor>",
                         layout: Layout | None = None) -> QArray:
  """Quantizes ``x`` on a given grid (used by GPTQ/AWQ, which choose scales themselves).

  ``scale`` is cast to ``spec.scale_dtype`` first (the grid used is the stored one); a float
  ``zero_point`` is rounded to integers.
  """
  check_float_input(x, name)
  x = jnp.asarray(x)
  _check_shape(x, name)
  tile = spec.tile(x.shape, layout=layout, name=name, dtype=x.dtype)
  scale = jnp.asarray(scale).astype(spec.scale_dtype)
  if zero_point is not None:
    if spec.symmetric:
      raise ValueError(f"{name}: shape {tuple(x.shape)} dtype {x.dtype}: a zero point was given "
                       f"for the symmetric spec {spec.describe()}")
    zero_point = jnp.asarray(zero_point)
    if jnp.issubdtype(zero_point.dtype, jnp.floating):
      zero_point = jnp.round(zero_point)
    zero_point = jnp.clip(zero_point, spec.qtype.qmin, spec.qtype.qmax).astype(
        spec.qtype.unpacked_dtype)
  elif not spec.symmetric:
    raise ValueError(f"{name}: shape {tuple(x.shape)} dtype {x.dtype}: the asymmetric spec "
                     f"{spec.describe()} needs a zero point")
  want = numerics.num_tiles(x.shape, tile)
  if tuple(scale.shape) != want:
    raise ValueError(f"{name}: shape {tuple(x.shape)} dtype {x.dtype}: scale has shape "
                     f"{tuple(scale.shape)}, expected {want} for tile {tile}")
  xb = numerics.split(x.astype(jnp.float32), tile, fill="edge")
  q = numerics.merge(_quantize_split(xb, scale, zero_point, spec, x.shape, tile), tile, x.shape)
  return QArray(values=numerics.pack(q, spec.qtype), scale=scale, zero_point=zero_point,
                activation=None, qtype=spec.qtype, shape=tuple(x.shape), tile=tile).validate(name)


def fake_quant(x: jax.Array, spec: QuantSpec, *, layout: Layout | None = None) -> jax.Array:
  """``dequantize(quantize(x))`` in ``x.dtype`` with a straight-through gradient (for QAT)."""
  check_float_input(x, "<fake_quant>")
  tile, _, scale, zp = _params(jax.lax.stop_gradient(x), spec, "<fake_quant>", layout)
  xb = numerics.split(x.astype(jnp.float32), tile, fill="edge")
  yb = _dequant_split(_quantize_split(xb, scale, zp, spec, x.shape, tile), scale, zp, spec,
                      x.shape, tile)
  y = numerics.merge(yb, tile, x.shape).astype(x.dtype)
  return x + jax.lax.stop_gradient(y - x)


__all__ = ["compute_params", "quantize", "quantize_with_params", "fake_quant", "dequantize",
           "check_float_input", "QType"]
