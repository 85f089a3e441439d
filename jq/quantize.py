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
from jq.qarray import (QArray, check_summary, check_values, checked, dequantize, first_bad,
                       index_str, traced_checks)
from jq.qtypes import QType
from jq.spec import ClipMethod, QuantSpec


NAN_POLICIES = ("raise", "zero")


def check_float_input(x, name: str = "<tensor>", nan_policy: str = "raise"):
  """Checks that ``x`` is a floating-point tensor with finite values; returns it.

  ``nan_policy``: ``"raise"`` (default) raises ValueError (naming ``name``, shape, dtype, the
  number of NaN/Inf values and the first one's index) for a non-finite tensor; ``"zero"`` returns
  ``x`` with every NaN/Inf replaced by 0 (they are then quantized as exact zeros).

  The finiteness check runs on concrete arrays (on device; one bool comes back), and on tracers
  under ``jit`` only inside :func:`jq.qarray.checked` (see there); ``"zero"`` works either way.
  """
  if nan_policy not in NAN_POLICIES:
    raise ValueError(f"{name}: nan_policy={nan_policy!r}; choose one of {list(NAN_POLICIES)}")
  if getattr(x, "dtype", None) is None:  # nested lists, Python numbers
    x = np.asarray(x)
  dt = x.dtype
  if not jnp.issubdtype(dt, jnp.floating):
    raise ValueError(f"{name}: shape {tuple(np.shape(x))} dtype {dt}: only floating-point tensors "
                     "can be quantized; skip this parameter with a rule (weight=None)")
  _check_float32_range(x, name)
  if nan_policy == "zero":
    x = jnp.asarray(x)
    return jnp.where(jnp.isfinite(x), x, jnp.zeros((), x.dtype))
  if np.size(x):
    shape = tuple(np.shape(x))

    def fail(n, i, v):
      raise ValueError(f"{name}: shape {shape} dtype {np.dtype(dt).name} has {int(n)} NaN/Inf "
                       f"values (first at index {index_str(i, shape)}: {float(v)}); refusing to "
                       "quantize a non-finite tensor (nan_policy='zero' quantizes them as 0)")

    check_values(jnp.asarray(x), fail, finite=True)
  return x


def _check_float32_range(x, name: str) -> None:
  """A float64 host array whose finite values jax would turn into inf (float64 arrays become
  float32 unless ``jax_enable_x64`` is on): ValueError naming the first such value."""
  if (np.dtype(x.dtype) != np.float64 or jax.config.jax_enable_x64
      or not isinstance(x, (np.ndarray, np.generic))):
    return
  xa = np.asarray(x)
  big = np.isfinite(xa) & (np.abs(xa) > np.finfo(np.float32).max)
  if big.any():
    i = int(np.argmax(big.ravel()))
    raise ValueError(f"{name}: shape {xa.shape} dtype float64 has {int(big.sum())} values beyond "
                     f"float32's range (first at index {index_str(i, xa.shape)}: "
                     f"{float(xa.ravel()[i]):.6g}); jax computes in float32 (jax_enable_x64 is "
                     "off), where they would become inf; rescale the tensor")


def _check_spec(spec, name: str) -> None:
  if not isinstance(spec, QuantSpec):
    raise ValueError(f"{name}: spec must be a jq.QuantSpec, got {type(spec).__name__} {spec!r}; "
                     "e.g. jq.QuantSpec(qtype=jq.QType.INT8) or a preset such as jq.W8A16")


def _check_shape(x, name: str) -> None:
  if x.ndim == 0:
    raise ValueError(f"{name}: shape () dtype {x.dtype}: scalars are not quantized; skip them "
                     "with a rule (weight=None)")
  if x.size == 0:
    raise ValueError(f"{name}: shape {tuple(x.shape)} dtype {x.dtype}: empty tensors are not "
                     "quantized; skip them with a rule (weight=None)")


def _range_to_params(lo, hi, spec: QuantSpec):
  """Scale and zero point for per-tile ranges ``[lo, hi]`` (``lo <= 0 <= hi``).

  Symmetric: ``scale = absmax / qmax`` (``absmax`` for NF4, ``absmax / 448`` for float8 e4m3), no
  zero point.  Asymmetric:
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
  ``clip(round(x / scale) + zero_point)`` (NF4: nearest table entry of ``x / scale``; float8:
  ``clip(x / scale, ±448)`` cast to e4m3, round to nearest even)."""
  qt = spec.qtype
  r = numerics.tiles_to_split(1.0 / scale.astype(jnp.float32), shape, tile)
  v = xb.astype(jnp.float32) * r
  if qt.is_table:
    return numerics.nf4_encode(v)
  if qt.is_float:
    return numerics.fp8_encode(v)
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


def _grid(x, spec: QuantSpec, tile, details: bool):
  """``(split layout of x (input dtype), scale, zero_point, the range check's summary: all
  ranges usable, with details the first unusable one)``."""
  xb = numerics.split(x, tile, fill="edge")
  lo, hi = _ranges(x, xb, spec, tile)
  scale, zp = _range_to_params(lo, hi, spec)
  return xb, scale, zp, _range_summary(lo, hi, spec, details)


@functools.partial(jax.jit, static_argnames=("spec", "tile", "details"))
def _grid_program(x, spec: QuantSpec, tile, details: bool = False):
  return _grid(x, spec, tile, details)[1:]


@functools.partial(jax.jit, static_argnames=("spec", "tile", "details"))
def _quantize_program(x, spec: QuantSpec, tile, details: bool = False):
  """``(packed values, scale, zero_point, range summary)``: quantizing as one compiled program
  per shape and spec (eagerly, each of its operations would compile on its own)."""
  xb, scale, zp, summary = _grid(x, spec, tile, details)
  q = numerics.merge(_quantize_split(xb, scale, zp, spec, x.shape, tile), tile, x.shape)
  return numerics.pack(q, spec.qtype), scale, zp, summary


def _params(x, spec: QuantSpec, name: str, layout: Layout | None = None):
  """``(tile, scale, zero_point)``, the ranges checked."""
  tile = spec.tile(x.shape, layout=layout, name=name, dtype=x.dtype)
  scale, zp, summary = _grid_program(x, spec, tile, traced_checks(x))
  _check_ranges(x, spec, name, tile, tuple(np.shape(scale)), summary)
  return tile, scale, zp


def _max_scale(spec: QuantSpec) -> float:
  """The largest scale quantizing stays exact with: its reciprocal (the ``1 / scale`` the values
  are multiplied by) must be a normal float32 (XLA flushes subnormals to 0), and the stored scale
  must not be clamped (float16: 65504)."""
  return min(2.0 ** 126, numerics.scale_limits(spec.scale_dtype)[1])


def _range_summary(lo, hi, spec: QuantSpec, details: bool):
  """:func:`first_bad` of the tiles whose range needs a scale beyond :func:`_max_scale`, with
  that tile's ``lo`` and ``hi`` (without ``details``: whether there is none)."""
  qt = spec.qtype
  if spec.symmetric:
    ideal = hi * np.float32(1.0 / (1.0 if qt.is_table else qt.qmax))
  else:
    ideal = (hi - lo) * np.float32(1.0 / (qt.qmax - qt.qmin))
  good = jnp.isfinite(ideal) & (ideal <= np.float32(_max_scale(spec)))
  if not details:
    return (jnp.all(good),)
  ok, n, i, v = first_bad(good, ideal)
  return ok, n, i, v, first_bad(good, lo)[3], first_bad(good, hi)[3]


def _check_ranges(x, spec: QuantSpec, name: str, tile, tshape, summary) -> None:
  """Raises ValueError when a tile's range needs a scale beyond :func:`_max_scale` (values near
  float32's maximum: ``hi - lo`` overflowing, or a reciprocal that flushes to 0 and turns every
  code to 0).  Now on concrete input; under ``jit`` only inside :func:`jq.qarray.checked`."""
  limit = _max_scale(spec)

  def fail(n, i, ideal, l, h):
    t = np.unravel_index(int(i), tshape) if tshape else ()
    start = tuple(int(a) * b for a, b in zip(t, tile))
    raise ValueError(
        f"{name}: shape {tuple(x.shape)} dtype {np.dtype(x.dtype).name}: values too large for "
        f"{spec.describe()} with {spec.scale_dtype} scales: {int(n)} tile(s) out of range, first "
        f"tile {tuple(int(a) for a in t)} (elements from index {start}) spans [{float(l):.6g}, "
        f"{float(h):.6g}], which needs a scale of {float(ideal):.6g} > {limit:.6g} (the largest "
        "usable scale); rescale the tensor, or use a symmetric / wider grid or float32 scales")

  check_summary(summary, fail, lambda: _grid_program(x, spec, tile, True)[2])


def compute_params(x: jax.Array, spec: QuantSpec, *, name: str = "<tensor>",
                   layout: Layout | None = None, nan_policy: str = "raise"
                   ) -> tuple[jax.Array, jax.Array | None]:
  """Per-tile ``(scale, zero_point)`` of ``x`` under ``spec`` (zero_point None if symmetric).

  The range always contains 0, so 0 is represented exactly; all-zero tiles get scale 1.
  ``layout`` gives the roles of ``x``'s axes (see :meth:`QuantSpec.tile`).  ``nan_policy`` as in
  :func:`quantize`.

  Raises:
    ValueError: naming ``name``, shape and dtype: NaN/Inf values (``nan_policy="raise"``), or a
      tile whose range needs a scale too large to quantize with (values near float32's maximum).
      Value checks run on concrete input (under ``jit``: inside :func:`jq.qarray.checked`).
  """
  _check_spec(spec, name)
  x = jnp.asarray(check_float_input(x, name, nan_policy))
  _check_shape(x, name)
  _, scale, zp = _params(x, spec, name, layout)
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
             layout: Layout | None = None, nan_policy: str = "raise") -> QArray:
  """Quantizes ``x`` to a :class:`QArray`: ``q = clip(round(x / scale) + zero_point)``.

  Rounding is to nearest, ties to even.  Invariants (no clipping configured): every element is
  within half a step of its dequantized value (asymmetric grids: plus at most
  ``(qmax - qmin) * 2**-(p - 1)`` steps at the range ends, ``p`` the scale's significant bits, 20
  for float32 scales), zeros stay exactly zero, and ``quantize(dequantize(q))`` reproduces ``q``.
  Float8 e4m3 (``QType.FP8_E4M3``): ``q = e4m3(clip(x / scale, ±448))`` with ``scale = absmax /
  448``; the step is relative, so each element above ``2**-6 · scale`` (e4m3's subnormal range)
  is within ``2**-4`` of its magnitude, and those below within ``2**-10 · scale``.

  ``layout`` gives the roles of ``x``'s axes (contracting / channels / stacked layers, see
  :class:`jq.Layout`); without it a 2-D ``x`` is read as a Dense kernel ``(in, out)``.

  ``nan_policy``: ``"raise"`` (default) rejects NaN/Inf in ``x``; ``"zero"`` quantizes them as 0.

  Raises:
    ValueError: naming ``name``, shape and dtype (and the first bad index): a non-float, scalar or
      empty ``x``, NaN/Inf values, or values so large that no usable scale covers their range.
      Value checks run on concrete input; under ``jit`` only inside :func:`jq.qarray.checked`.

  Example:
    >>> q = quantize(w, QuantSpec(qtype=QType.INT8))       # per-output-channel int8
    >>> w_hat = q.dequantize(jnp.bfloat16)
  """
  _check_spec(spec, name)
  x = check_float_input(x, name, nan_policy)
  return _quantize_checked(jnp.asarray(x), spec, name, layout)


def _quantize_checked(x: jax.Array, spec: QuantSpec, name: str,
                      layout: Layout | None = None) -> QArray:
  """:func:`quantize` for an input that already passed :func:`check_float_input`."""
  _check_shape(x, name)
  tile = spec.tile(x.shape, layout=layout, name=name, dtype=x.dtype)
  values, scale, zp, summary = _quantize_program(x, spec, tile, traced_checks(x))
  _check_ranges(x, spec, name, tile, tuple(np.shape(scale)), summary)
  return QArray(values=values, scale=scale, zero_point=zp, activation=None,
                qtype=spec.qtype, shape=tuple(x.shape), tile=tile)


def quantize_with_params(x: jax.Array, scale: jax.Array, zero_point: jax.Array | None,
                         spec: QuantSpec, *, name: str = "<tensor>",
                         layout: Layout | None = None) -> QArray:
  """Quantizes ``x`` on a given grid (used by GPTQ/AWQ, which choose scales themselves).

  ``scale`` is cast to ``spec.scale_dtype`` first (the grid used is the stored one); a float
  ``zero_point`` is rounded to integers, and one outside ``[qmin, qmax]`` (or NaN) is a
  ValueError (checked on concrete input; under ``jit`` inside :func:`jq.qarray.checked`).
  """
  _check_spec(spec, name)
  x = jnp.asarray(check_float_input(x, name))
  _check_shape(x, name)
  tile = spec.tile(x.shape, layout=layout, name=name, dtype=x.dtype)
  scale = jnp.asarray(scale).astype(spec.scale_dtype)
  if zero_point is not None:
    if spec.symmetric:
      raise ValueError(f"{name}: shape {tuple(x.shape)} dtype {x.dtype}: a zero point was given "
                       f"for the symmetric spec {spec.describe()}")
    zero_point = jnp.asarray(zero_point)
    given, zero_point = _given_zero_point(zero_point, spec)
    _check_zero_point_range(given, spec, name, x)
  elif not spec.symmetric:
    raise ValueError(f"{name}: shape {tuple(x.shape)} dtype {x.dtype}: the asymmetric spec "
                     f"{spec.describe()} needs a zero point")
  want = numerics.num_tiles(x.shape, tile)
  if tuple(scale.shape) != want:
    raise ValueError(f"{name}: shape {tuple(x.shape)} dtype {x.dtype}: scale has shape "
                     f"{tuple(scale.shape)}, expected {want} for tile {tile}")
  return QArray(values=_on_grid(x, scale, zero_point, spec, tile), scale=scale,
                zero_point=zero_point, activation=None, qtype=spec.qtype, shape=tuple(x.shape),
                tile=tile).validate(name)


@functools.partial(jax.jit, static_argnames=("spec", "tile"))
def _on_grid(x, scale, zero_point, spec: QuantSpec, tile):
  """Packed values of ``x`` on a given grid (one compiled program per shape and spec)."""
  xb = numerics.split(x.astype(jnp.float32), tile, fill="edge")
  q = numerics.merge(_quantize_split(xb, scale, zero_point, spec, x.shape, tile), tile, x.shape)
  return numerics.pack(q, spec.qtype)


@functools.partial(jax.jit, static_argnames=("spec",))
def _given_zero_point(zp, spec: QuantSpec):
  """``(zp rounded, zp clipped to the qtype in its dtype)``."""
  qt = spec.qtype
  z = jnp.round(zp) if jnp.issubdtype(zp.dtype, jnp.floating) else zp
  return z, jnp.clip(z, qt.qmin, qt.qmax).astype(qt.unpacked_dtype)


def _check_zero_point_range(zp: jax.Array, spec: QuantSpec, name: str, x) -> None:
  """Given (rounded) zero points must be finite and in ``[qmin, qmax]``: clipping them would
  quantize on another grid than the one asked for.  Now, or under :func:`checked`."""
  qt, zshape = spec.qtype, tuple(zp.shape)

  def fail(n, i, v):
    raise ValueError(f"{name}: shape {tuple(x.shape)} dtype {x.dtype}: zero_point shape {zshape} "
                     f"dtype {zp.dtype}: zero points must lie in [{qt.qmin}, {qt.qmax}] "
                     f"({qt.value}); {int(n)} outside, first at index {index_str(i, zshape)}: "
                     f"{float(v)}")

  if zp.size:
    check_values(zp, fail, dtype="float32", finite=True, lo=qt.qmin, hi=qt.qmax)


def fake_quant(x: jax.Array, spec: QuantSpec, *, layout: Layout | None = None) -> jax.Array:
  """``dequantize(quantize(x))`` in ``x.dtype`` with a straight-through gradient (for QAT)."""
  _check_spec(spec, "<fake_quant>")
  x = check_float_input(x, "<fake_quant>")
  _check_shape(x, "<fake_quant>")
  tile, scale, zp = _params(jax.lax.stop_gradient(x), spec, "<fake_quant>", layout)
  xb = numerics.split(x.astype(jnp.float32), tile, fill="edge")
  yb = _dequant_split(_quantize_split(xb, scale, zp, spec, x.shape, tile), scale, zp, spec,
                      x.shape, tile)
  y = numerics.merge(yb, tile, x.shape).astype(x.dtype)
  return x + jax.lax.stop_gradient(y - x)


__all__ = ["compute_params", "quantize", "quantize_with_params", "fake_quant", "dequantize",
           "check_float_input", "checked", "QType", "NAN_POLICIES"]
