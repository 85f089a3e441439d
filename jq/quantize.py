"""Quantizing a single tensor: ``compute_params``, ``quantize``, ``fake_quant``.

All three are pure, jittable functions of ``(x, spec)``; ``spec`` is hashable and can be static.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jq import numerics
from jq.qarray import QArray, dequantize
from jq.qtypes import QType
from jq.spec import ClipMethod, QuantSpec


def check_float_input(x, name: str = "<tensor>") -> None:
  """Raises ValueError (naming ``name``, shape and dtype) for non-float or non-finite input."""
  dt = getattr(x, "dtype", None)
  if dt is None or not jnp.issubdtype(dt, jnp.floating):
    raise ValueError(f"{name}: shape {tuple(np.shape(x))} dtype {dt}: only floating-point tensors "
                     "can be quantized")
  if numerics.is_concrete(x):
    bad = int(np.size(x) - np.count_nonzero(np.isfinite(np.asarray(x, np.float32))))
    if bad:
      raise ValueError(f"{name}: shape {tuple(x.shape)} dtype {x.dtype} has {bad} NaN/Inf values; "
                       "refusing to quantize a non-finite tensor")


def _range_to_params(lo, hi, spec: QuantSpec):
  """Scale and zero point for per-tile ranges ``[lo, hi]`` (both include 0)."""
  qt = spec.qtype
  sdt = jnp.dtype(spec.scale_dtype)
  if spec.symmetric:
    absmax = jnp.maximum(-lo, hi)
    scale = absmax / (1.0 if qt.is_table else float(qt.qmax))
    zp = None
  else:
    scale = (hi - lo) / float(qt.qmax - qt.qmin)
  # an all-zero tile gets scale 1 (every value maps to the zero point); tiny ranges stay positive
  scale = jnp.where(scale > 0, scale, 1.0).astype(sdt)
  scale = jnp.maximum(scale, jnp.finfo(sdt).tiny).astype(sdt)
  if not spec.symmetric:
    zp = numerics.round_half_even(qt.qmin - lo / scale.astype(jnp.float32))
    zp = jnp.clip(zp, qt.qmin, qt.qmax).astype(qt.unpacked_dtype)
  return scale, zp


def _quantize_values(x, scale, zp, spec: QuantSpec, tile):
  """Integer values (unpacked) of ``x`` on the grid given by per-tile ``scale``/``zp``."""
  qt = spec.qtype
  s = numerics.expand(scale.astype(jnp.float32), tile, x.shape)
  v = x.astype(jnp.float32) / s
  if qt.is_table:
    return numerics.nf4_encode(v)
  if zp is not None:
    v = v + numerics.expand(zp.astype(jnp.float32), tile, x.shape)
  return jnp.clip(numerics.round_half_even(v), qt.qmin, qt.qmax).astype(qt.unpacked_dtype)


def _dequant_values(q, scale, zp, spec: QuantSpec, tile):
  s = numerics.expand(scale.astype(jnp.float32), tile, q.shape)
  if spec.qtype.is_table:
    return numerics.nf4_table()[q.astype(jnp.int32)] * s
  v = q.astype(jnp.float32)
  if zp is not None:
    v = v - numerics.expand(zp.astype(jnp.float32), tile, q.shape)
  return v * s


def compute_params(x: jax.Array, spec: QuantSpec, *, name: str = "<tensor>"
                   ) -> tuple[jax.Array, jax.Array | None]:
  """Per-tile ``(scale, zero_point)`` of ``x`` under ``spec`` (zero_point None if symmetric).

  The range always contains 0, so 0 is represented exactly; all-zero tiles get scale 1.
  """
  tile = spec.tile(x.shape, name=name, dtype=x.dtype)
  xf = x.astype(jnp.float32)
  blocks = numerics.to_blocks(xf, tile)
  axes = numerics.tile_reduce_axes(x.ndim)

  def stat(fn, b):
    return numerics.from_block_stats(fn(b, axis=axes, keepdims=True))

  clip = spec.clip
  if clip.method is ClipMethod.PERCENTILE:
    if spec.symmetric:
      hi = stat(functools.partial(jnp.nanpercentile, q=clip.percentile), jnp.abs(blocks))
      lo = -hi
    else:
      hi = stat(functools.partial(jnp.nanpercentile, q=clip.percentile), blocks)
      lo = stat(functools.partial(jnp.nanpercentile, q=100.0 - clip.percentile), blocks)
  else:
    lo, hi = stat(jnp.nanmin, blocks), stat(jnp.nanmax, blocks)
  lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
  if spec.symmetric:
    hi = jnp.maximum(-lo, hi)
    lo = -hi
  if clip.method is ClipMethod.FIXED:
    lo, hi = lo * clip.ratio, hi * clip.ratio
  elif clip.method is ClipMethod.MSE:
    lo, hi = _mse_search(xf, lo, hi, spec, tile)
  return _range_to_params(lo, hi, spec)


def _mse_search(x, lo, hi, spec: QuantSpec, tile):
  """Per tile, the shrink ratio of ``[lo, hi]`` with the least squared quantization error."""
  ratios = jnp.linspace(spec.clip.min_ratio, 1.0, spec.clip.grid, dtype=jnp.float32)
  axes = numerics.tile_reduce_axes(x.ndim)

  def err(r):
    scale, zp = _range_to_params(lo * r, hi * r, spec)
    d = _dequant_values(_quantize_values(x, scale, zp, spec, tile), scale, zp, spec, tile) - x
    e = numerics.to_blocks(d * d, tile, fill=0.0)
    return numerics.from_block_stats(jnp.sum(e, axis=axes, keepdims=True))

  def body(carry, r):
    best_err, best_r = carry
    e = err(r)
    better = e < best_err
    return (jnp.where(better, e, best_err), jnp.where(better, r, best_r)), None

  init = (err(jnp.float32(1.0)), jnp.ones_like(lo))
  (_, best), _ = jax.lax.scan(body, init, ratios[:-1])
  return lo * best, hi * best


def quantize(x: jax.Array, spec: QuantSpec, *, name: str = "<tensor>") -> QArray:
  """Quantizes ``x`` to a :class:`QArray` (round to nearest, ties to even).

  Example:
    >>> q = quantize(w, QuantSpec(qtype=QType.INT8))       # per-output-channel int8
    >>> w_hat = q.dequantize(jnp.bfloat16)
  """
  check_float_input(x, name)
  if x.ndim == 0:
    raise ValueError(f"{name}: shape () dtype {x.dtype}: scalars are not quantized")
  scale, zp = compute_params(x, spec, name=name)
  tile = spec.tile(x.shape, name=name, dtype=x.dtype)
  q = _quantize_values(x, scale, zp, spec, tile)
  return QArray(values=numerics.pack(q, spec.qtype), scale=scale, zero_point=zp, activation=None,
                qtype=spec.qtype, shape=tuple(x.shape), tile=tile)


def quantize_with_params(x: jax.Array, scale: jax.Array, zero_point: jax.Array | None,
                         spec: QuantSpec, *, name: str = "<tensor>") -> QArray:
  """Quantizes ``x`` on a given grid (used by GPTQ/AWQ, which choose scales themselves)."""
  tile = spec.tile(x.shape, name=name, dtype=x.dtype)
  q = _quantize_values(x, scale, zero_point, spec, tile)
  return QArray(values=numerics.pack(q, spec.qtype), scale=scale.astype(spec.scale_dtype),
                zero_point=zero_point, activation=None, qtype=spec.qtype, shape=tuple(x.shape),
                tile=tile).validate(name)


def fake_quant(x: jax.Array, spec: QuantSpec) -> jax.Array:
  """``dequantize(quantize(x))`` in ``x.dtype`` with a straight-through gradient (for QAT)."""
  tile = spec.tile(x.shape, dtype=x.dtype)
  scale, zp = compute_params(jax.lax.stop_gradient(x), spec)
  y = _dequant_values(_quantize_values(x, scale, zp, spec, tile), scale, zp, spec, tile)
  return x + jax.lax.stop_gradient(y.astype(x.dtype) - x)


__all__ = ["compute_params", "quantize", "quantize_with_params", "fake_quant", "dequantize",
           "check_float_input", "QType"]
