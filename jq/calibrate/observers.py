"""Activation-range observers: ``Observer(init, update, finalize)`` of pure, jittable functions.

Like optax's ``GradientTransformation``, an observer is a NamedTuple of functions over an explicit
state, so it composes with ``jax.jit``/``lax.scan`` and keeps nothing between calls::

  obs = percentile(99.99)
  state = obs.init(K)                  # K = size of the activations' last axis
  for x in batches:                    # x: (..., K)
    state = jax.jit(obs.update)(state, x)
  lo, hi = obs.finalize(state, name="layers_0/mlp/up/kernel")
  scale, zp = act_params(lo, hi, A8_STATIC)

``finalize`` returns the observed range ``(lo, hi)``: scalars for a per-tensor observer, shape
``(K,)`` with ``per_channel=True``.  The range is not forced to contain 0; :func:`act_params` does
that.  Non-finite activations are left out of every statistic but counted: ``finalize`` on
concrete state raises a ValueError naming the layer if any were seen, or if no data was seen.

Histogram observers (:func:`percentile`, :func:`mse_range`) keep, per channel, two fixed-size
histograms (of the positive values and of the magnitudes of the negative ones) over ``[0, R]``,
where ``R = 2^e`` is the smallest power of two covering every ``|x|`` seen so far.  When a batch
exceeds ``R``, the range doubles (``e`` grows) and the old counts are merged pairwise into the new
bins: the bin edges of the old histogram are also edges of the new one, so re-binning loses
nothing beyond the coarser resolution (unlike re-binning to an arbitrary new range, as in
PyTorch's ``HistogramObserver``).  The resolution is at least ``max|x| / bins`` and at most
``2 max|x| / bins``.  Memory is ``2 · bins`` float32 per channel.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jq import numerics
from jq.quantize import compute_params
from jq.spec import ActivationSpec, Granularity, QuantSpec

Range = tuple[jax.Array, jax.Array]


class Observer(NamedTuple):
  """A streaming range estimator.

  Attributes:
    init: ``init(num_channels) -> state``.
    update: ``update(state, x) -> state`` for activations ``x`` of shape ``(..., K)``; jittable.
    finalize: ``finalize(state, name="<activation>") -> (lo, hi)``; jittable (the data checks run
      only when ``state`` is concrete).
  """
  init: Callable[[int], Any]
  update: Callable[[Any, jax.Array], Any]
  finalize: Callable[..., Range]


_EMPTY_EXP = -100  # exponent of the range of a histogram that has only seen zeros


class MinMaxState(NamedTuple):
  lo: jax.Array         # (C,) running min (or moving average of batch mins)
  hi: jax.Array         # (C,)
  count: jax.Array      # () int32 values seen
  nonfinite: jax.Array  # () int32


class HistogramState(NamedTuple):
  pos: jax.Array        # (C, bins) counts of x >= 0 in [0, 2^exp]
  neg: jax.Array        # (C, bins) counts of -x for x < 0 in [0, 2^exp]
  exp: jax.Array        # (C,) int32 range exponent
  lo: jax.Array         # (C,) exact running min (the estimates never leave [lo, hi])
  hi: jax.Array         # (C,)
  count: jax.Array      # () int32 values seen
  nonfinite: jax.Array  # () int32


def _channels(x: jax.Array, num: int, per_channel: bool, where: str) -> tuple[jax.Array, jax.Array]:
  """``x`` as float32 ``(rows, C)`` with non-finite values zeroed, and the finite mask."""
  if per_channel:
    if x.ndim < 1 or x.shape[-1] != num:
      raise ValueError(f"{where}: activations of shape {tuple(x.shape)} do not end in the "
                       f"K={num} channels the observer was initialized with")
    x = x.reshape(-1, num)
  else:
    x = x.reshape(-1, 1)
  x = x.astype(jnp.float32)
  finite = jnp.isfinite(x)
  return jnp.where(finite, x, 0.0), finite


def _check(count, nonfinite, name: str) -> None:
  if not (numerics.is_concrete(count) and numerics.is_concrete(nonfinite)):
    return
  if int(count) <= 0:
    raise ValueError(f"{name}: the observer saw no activations; check that calibration data "
                     "reaches this layer")
  if int(nonfinite) > 0:
    raise ValueError(f"{name}: {int(nonfinite)} NaN/Inf activation values were observed; fix the "
                     "model or calibration data before calibrating static activation scales")


def _squeeze(v: jax.Array, per_channel: bool) -> jax.Array:
  return v if per_channel else v[0]


# --- min / max ------------------------------------------------------------------------------------

def _minmax_init(num_channels: int, per_channel: bool) -> MinMaxState:
  c = int(num_channels) if per_channel else 1
  if c < 1:
    raise ValueError(f"observer init: num_channels={num_channels} must be >= 1")
  return MinMaxState(lo=jnp.full((c,), jnp.inf, jnp.float32), hi=jnp.full((c,), -jnp.inf,
                     jnp.float32), count=jnp.zeros((), jnp.int32),
                     nonfinite=jnp.zeros((), jnp.int32))


def _batch_minmax(x, finite):
  lo = jnp.min(jnp.where(finite, x, jnp.inf), axis=0, initial=jnp.inf)
  hi = jnp.max(jnp.where(finite, x, -jnp.inf), axis=0, initial=-jnp.inf)
  return lo, hi


@functools.partial(jax.jit, static_argnames=("per_channel",))
def _minmax_update(state: MinMaxState, x: jax.Array, per_channel: bool) -> MinMaxState:
  xf, finite = _channels(x, state.lo.shape[0], per_channel, "minmax observer")
  lo, hi = _batch_minmax(xf, finite)
  return MinMaxState(lo=jnp.minimum(state.lo, lo), hi=jnp.maximum(state.hi, hi),
                     count=state.count + jnp.int32(x.size),
                     nonfinite=state.nonfinite + jnp.sum(~finite, dtype=jnp.int32))


@functools.partial(jax.jit, static_argnames=("per_channel",))
def _ema_update(state: MinMaxState, x: jax.Array, momentum: jax.Array, per_channel: bool
                ) -> MinMaxState:
  xf, finite = _channels(x, state.lo.shape[0], per_channel, "moving_average_minmax observer")
  lo, hi = _batch_minmax(xf, finite)
  first = ~jnp.isfinite(state.lo)
  lo = jnp.where(jnp.isfinite(lo), lo, state.lo)   # a batch of only non-finite values: skipped
  hi = jnp.where(jnp.isfinite(hi), hi, state.hi)
  new_lo = jnp.where(first, lo, momentum * state.lo + (1.0 - momentum) * lo)
  new_hi = jnp.where(first, hi, momentum * state.hi + (1.0 - momentum) * hi)
  return MinMaxState(lo=new_lo, hi=new_hi, count=state.count + jnp.int32(x.size),
                     nonfinite=state.nonfinite + jnp.sum(~finite, dtype=jnp.int32))


def _minmax_finalize(state: MinMaxState, name: str, per_channel: bool) -> Range:
  _check(state.count, state.nonfinite, name)
  lo = jnp.where(jnp.isfinite(state.lo), state.lo, 0.0)
  hi = jnp.where(jnp.isfinite(state.hi), state.hi, 0.0)
  return _squeeze(lo, per_channel), _squeeze(hi, per_channel)


def minmax(*, per_channel: bool = False) -> Observer:
  """Running minimum and maximum of all activations (per tensor, or per channel).

  Example:
    >>> obs = minmax()
    >>> lo, hi = obs.finalize(obs.update(obs.init(4), jnp.ones((2, 4))))
  """
  def init(num_channels: int) -> MinMaxState:
    return _minmax_init(num_channels, per_channel)

  def update(state: MinMaxState, x: jax.Array) -> MinMaxState:
    return _minmax_update(state, jnp.asarray(x), per_channel)

  def finalize(state: MinMaxState, name: str = "<activation>") -> Range:
    return _minmax_finalize(state, name, per_channel)

  return Observer(init, update, finalize)


def moving_average_minmax(momentum: float = 0.9, *, per_channel: bool = False) -> Observer:
  """Exponential moving average of per-batch minima and maxima.

  ``lo ← momentum · lo + (1 − momentum) · min(batch)`` (likewise ``hi``); the first batch sets
  the range.  Less sensitive than :func:`minmax` to a single outlier batch (as in TensorFlow's and
  PyTorch's ``MovingAverageMinMaxObserver``).  Empty batches are skipped.
  """
  if not 0.0 <= momentum < 1.0:
    raise ValueError(f"moving_average_minmax: momentum={momentum} must be in [0, 1)")

  def init(num_channels: int) -> MinMaxState:
    return _minmax_init(num_channels, per_channel)

  def update(state: MinMaxState, x: jax.Array) -> MinMaxState:
    x = jnp.asarray(x)
    if x.size == 0:
      return state
    return _ema_update(state, x, jnp.float32(momentum), per_channel)

  def finalize(state: MinMaxState, name: str = "<activation>") -> Range:
    return _minmax_finalize(state, name, per_channel)

  return Observer(init, update, finalize)


# --- histograms -----------------------------------------------------------------------------------

def _hist_init(num_channels: int, bins: int, per_channel: bool) -> HistogramState:
  c = int(num_channels) if per_channel else 1
  if c < 1:
    raise ValueError(f"observer init: num_channels={num_channels} must be >= 1")
  z = jnp.zeros((c, bins), jnp.float32)
  return HistogramState(pos=z, neg=z, exp=jnp.full((c,), _EMPTY_EXP, jnp.int32),
                        lo=jnp.full((c,), jnp.inf, jnp.float32),
                        hi=jnp.full((c,), -jnp.inf, jnp.float32),
                        count=jnp.zeros((), jnp.int32), nonfinite=jnp.zeros((), jnp.int32))


def _pow2_exponent(m: jax.Array) -> jax.Array:
  """Smallest ``e`` with ``2^e >= m`` (``_EMPTY_EXP`` where ``m == 0``)."""
  mant, ex = jnp.frexp(m)
  e = ex - (mant == 0.5).astype(ex.dtype)
  return jnp.where(m > 0, e, _EMPTY_EXP).astype(jnp.int32)


def _rebin(h: jax.Array, shift: jax.Array) -> jax.Array:
  """Merges bins: old bin ``i`` of channel ``c`` goes to ``i >> shift[c]`` (range grew 2^shift)."""
  c, bins = h.shape
  idx = jnp.arange(bins, dtype=jnp.int32)[None, :] >> jnp.clip(shift, 0, 30)[:, None]
  rows = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32)[:, None], (c, bins))
  return jnp.zeros_like(h).at[rows, idx].add(h)


@functools.partial(jax.jit, static_argnames=("per_channel", "where"))
def _hist_update(state: HistogramState, x: jax.Array, per_channel: bool, where: str
                 ) -> HistogramState:
  c, bins = state.pos.shape
  xf, finite = _channels(x, c, per_channel, where)
  ax = jnp.abs(xf)
  exp = jnp.maximum(state.exp, _pow2_exponent(jnp.max(ax, axis=0, initial=0.0)))
  pos, neg = _rebin(state.pos, exp - state.exp), _rebin(state.neg, exp - state.exp)
  r = jnp.ldexp(jnp.ones_like(ax[:1]), exp[None, :])            # (1, C) exact powers of two
  idx = jnp.clip(jnp.floor(ax / r * bins), 0, bins - 1).astype(jnp.int32)
  rows = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32)[None, :], idx.shape)
  f = finite.astype(jnp.float32)
  nonneg = (xf >= 0).astype(jnp.float32)
  pos = pos.at[rows, idx].add(f * nonneg)
  neg = neg.at[rows, idx].add(f * (1.0 - nonneg))
  lo, hi = _batch_minmax(xf, finite)
  return HistogramState(pos=pos, neg=neg, exp=exp, lo=jnp.minimum(state.lo, lo),
                        hi=jnp.maximum(state.hi, hi),
                        count=state.count + jnp.int32(x.size),
                        nonfinite=state.nonfinite + jnp.sum(~finite, dtype=jnp.int32))


def _quantile(h: jax.Array, q: jax.Array) -> jax.Array:
  """Per row of histogram ``h`` (C, B) over ``[0, B)``: the ``q``-quantile position, linearly
  interpolated inside the bin."""
  cdf = jnp.cumsum(h, axis=-1)
  total = cdf[:, -1:]
  target = q * total
  j = jnp.sum(cdf < target, axis=-1, keepdims=True)               # first bin with cdf >= target
  j = jnp.minimum(j, h.shape[-1] - 1)
  before = jnp.take_along_axis(cdf, j, axis=-1) - jnp.take_along_axis(h, j, axis=-1)
  inbin = jnp.take_along_axis(h, j, axis=-1)
  frac = jnp.clip((target - before) / jnp.where(inbin > 0, inbin, 1.0), 0.0, 1.0)
  return (j.astype(jnp.float32) + frac)[:, 0]


def percentile(p: float = 99.99, *, symmetric: bool = True, bins: int = 2048,
               per_channel: bool = False) -> Observer:
  """Streaming percentile of the activations, from a fixed-size histogram (see module docstring).

  With ``symmetric=True`` the range is ``±`` the ``p``-th percentile of ``|x|``; otherwise
  ``lo``/``hi`` are the ``(100 − p)``-th and ``p``-th percentiles of ``x``.  Accuracy: within one
  histogram bin (``≤ 2 max|x| / bins``) of the exact percentile.  ``lo``/``hi`` never leave the
  observed ``[min, max]``.

  Args:
    p: percentile in ``(0, 100]``; 100 gives (nearly) the absolute maximum.
    symmetric: one magnitude threshold, or a two-sided range.
    bins: histogram bins per sign and channel.
    per_channel: one range per input channel (last axis) instead of per tensor.
  """
  if not 0.0 < p <= 100.0:
    raise ValueError(f"percentile: p={p} must be in (0, 100]")
  if int(bins) < 2:
    raise ValueError(f"percentile: bins={bins} must be >= 2")
  bins = int(bins)

  def init(num_channels: int) -> HistogramState:
    return _hist_init(num_channels, bins, per_channel)

  def update(state: HistogramState, x: jax.Array) -> HistogramState:
    return _hist_update(state, jnp.asarray(x), per_channel, "percentile observer")

  def finalize(state: HistogramState, name: str = "<activation>") -> Range:
    _check(state.count, state.nonfinite, name)
    lo, hi = _percentile_range(state, jnp.float32(p / 100.0), symmetric)
    return _squeeze(lo, per_channel), _squeeze(hi, per_channel)

  return Observer(init, update, finalize)


@functools.partial(jax.jit, static_argnames=("symmetric",))
def _percentile_range(state: HistogramState, q: jax.Array, symmetric: bool) -> Range:
  bins = state.pos.shape[1]
  width = jnp.ldexp(jnp.ones_like(state.lo), state.exp) / bins     # (C,)
  lo_obs = jnp.where(jnp.isfinite(state.lo), state.lo, 0.0)
  hi_obs = jnp.where(jnp.isfinite(state.hi), state.hi, 0.0)
  if symmetric:
    t = _quantile(state.pos + state.neg, q) * width
    t = jnp.minimum(t, jnp.maximum(-lo_obs, hi_obs))
    return -t, t
  signed = jnp.concatenate([state.neg[:, ::-1], state.pos], axis=-1)   # over [-R, R]
  edge = -bins * width
  hi = edge + _quantile(signed, q) * width
  lo = edge + _quantile(signed, 1.0 - q) * width
  return jnp.clip(lo, lo_obs, hi_obs), jnp.clip(hi, lo_obs, hi_obs)


def mse_range(bits: int = 8, *, symmetric: bool = True, bins: int = 2048, grid: int = 128,
              min_ratio: float = 0.05, per_channel: bool = False) -> Observer:
  """The range minimising the int-``bits`` quantization MSE of the observed activations.

  The error of a candidate range ``[lo, hi]`` is computed from the histogram, taking the values
  in each bin as uniformly spread over the bin: a bin inside the range contributes the exact mean
  squared rounding error of that uniform distribution on the grid ``Δ·ℤ`` (``Δ = (hi − lo) /
  (2^bits − 1)``, or ``hi / (2^(bits−1) − 1)`` if symmetric), which tends to ``Δ²/12`` for wide
  bins and to the centre's rounding error for narrow ones; a bin whose centre is outside
  contributes its squared clipping distance.  (PyTorch's ``HistogramObserver`` uses ``Δ²/12``
  throughout, which overestimates the error of coarse grids over concentrated data and so clips
  far too much at 4 bits.)  Candidates shrink the observed range
  ``[min(x, 0), max(x, 0)]`` (or ``±max|x|``) by ``grid`` ratios in ``[min_ratio, 1]``; the search
  is a ``lax.scan`` over candidates.

  Args:
    bits: bit width of the activation grid (8 for int8/uint8).
    symmetric: search ``±t`` (symmetric int grid) or a shrunk asymmetric ``[lo, hi]``.
    bins: histogram bins per sign and channel.
    grid: number of candidate ratios.
    min_ratio: smallest candidate ratio of the observed range.
    per_channel: one range per input channel instead of per tensor.
  """
  if not 2 <= int(bits) <= 16:
    raise ValueError(f"mse_range: bits={bits} must be in [2, 16]")
  if int(bins) < 2 or int(grid) < 1 or not 0.0 < min_ratio <= 1.0:
    raise ValueError(f"mse_range: bins={bins} >= 2, grid={grid} >= 1 and min_ratio={min_ratio} in "
                     "(0, 1] are required")
  bins, grid = int(bins), int(grid)
  levels = float((1 << (bits - 1)) - 1) if symmetric else float((1 << bits) - 1)

  def init(num_channels: int) -> HistogramState:
    return _hist_init(num_channels, bins, per_channel)

  def update(state: HistogramState, x: jax.Array) -> HistogramState:
    return _hist_update(state, jnp.asarray(x), per_channel, "mse_range observer")

  def finalize(state: HistogramState, name: str = "<activation>") -> Range:
    _check(state.count, state.nonfinite, name)
    lo, hi = _mse_search_range(state, levels=levels, symmetric=symmetric, grid=grid,
                               min_ratio=float(min_ratio))
    return _squeeze(lo, per_channel), _squeeze(hi, per_channel)

  return Observer(init, update, finalize)


@functools.partial(jax.jit, static_argnames=("levels", "symmetric", "grid", "min_ratio"))
def _mse_search_range(state: HistogramState, *, levels: float, symmetric: bool, grid: int,
                      min_ratio: float) -> Range:
  bins = state.pos.shape[1]
  width = jnp.ldexp(jnp.ones_like(state.lo), state.exp) / bins          # (C,)
  lo_obs = jnp.minimum(jnp.where(jnp.isfinite(state.lo), state.lo, 0.0), 0.0)
  hi_obs = jnp.maximum(jnp.where(jnp.isfinite(state.hi), state.hi, 0.0), 0.0)
  centers = (jnp.arange(bins, dtype=jnp.float32) + 0.5)[None, :] * width[:, None]  # (C, B)
  if symmetric:
    counts, values = (state.pos + state.neg,), (centers,)
    lo0, hi0 = -jnp.maximum(-lo_obs, hi_obs), jnp.maximum(-lo_obs, hi_obs)
  else:
    counts, values = (state.pos, state.neg), (centers, -centers)
    lo0, hi0 = lo_obs, hi_obs
  half_w = (0.5 * width)[:, None]

  def err(r):
    lo, hi = lo0 * r, hi0 * r
    step = (hi / levels) if symmetric else (hi - lo) / levels
    step = jnp.maximum(step, jnp.finfo(jnp.float32).tiny)[:, None]
    total = jnp.zeros_like(lo)
    for h, v in zip(counts, values):
      low, high = (-hi if symmetric else lo)[:, None], hi[:, None]
      clipped = jnp.where(v > high, v - high, 0.0) + jnp.where(v < low, low - v, 0.0)
      e_clip = clipped * clipped + half_w * half_w / 3.0
      e_round = _mean_rounding_error(v - half_w, v + half_w, step)
      total = total + jnp.sum(h * jnp.where(clipped > 0, e_clip, e_round), axis=-1)
    return total

  def body(carry, r):
    best_e, best_r = carry
    e = err(r)
    better = e < best_e
    return (jnp.where(better, e, best_e), jnp.where(better, r, best_r)), None

  ratios = jnp.linspace(min_ratio, 1.0, grid, dtype=jnp.float32)
  init_c = (err(jnp.float32(1.0)), jnp.ones_like(lo0))
  (_, best), _ = jax.lax.scan(body, init_c, ratios[:-1])
  return lo0 * best, hi0 * best


def _mean_rounding_error(a: jax.Array, b: jax.Array, step: jax.Array) -> jax.Array:
  """Mean of ``(u − step·round(u/step))²`` for ``u`` uniform on ``[a, b]`` (closed form).

  With ``F(u) = ∫_{−Δ/2}^{u} r(s)² ds = k Δ³/12 + (r³ + Δ³/8)/3`` (``k = round(u/Δ)``,
  ``r = u − kΔ``), the mean is ``(F(b) − F(a)) / (b − a)``.
  """
  ka, kb = jnp.round(a / step), jnp.round(b / step)
  ra, rb = a - ka * step, b - kb * step
  integral = (kb - ka) * step ** 3 / 12.0 + (rb ** 3 - ra ** 3) / 3.0
  return jnp.maximum(integral / jnp.maximum(b - a, jnp.finfo(jnp.float32).tiny), 0.0)


# --- activation quantization parameters -----------------------------------------------------------

def act_params(lo: jax.Array, hi: jax.Array, activation_spec: ActivationSpec
               ) -> tuple[jax.Array, jax.Array | None]:
  """Static activation ``(scale, zero_point)`` for the range ``[lo, hi]`` (extended to contain 0).

  Symmetric: ``scale = max(−lo, hi) / 127`` (fp8 e4m3: ``/ 448``), zero point ``None``.
  Asymmetric (int8 or uint8):
  ``scale = (hi − lo) / 255`` and the integer ``zero_point = round(qmin − lo / scale)`` (dtype
  int8/uint8), so 0 is exactly representable.  An all-zero range gets scale 1.  The math is
  ``jq.quantize``'s, so weights and activations share one grid convention.

  Example:
    >>> scale, zp = act_params(jnp.float32(-3.0), jnp.float32(5.0), A8_STATIC)   # 5/127, None
  """
  if not isinstance(activation_spec, ActivationSpec):
    raise ValueError(f"act_params: activation_spec must be an ActivationSpec, got "
                     f"{activation_spec!r}")
  lo, hi = jnp.asarray(lo, jnp.float32), jnp.asarray(hi, jnp.float32)
  if numerics.is_concrete(lo) and numerics.is_concrete(hi):
    if not (bool(jnp.all(jnp.isfinite(lo))) and bool(jnp.all(jnp.isfinite(hi)))):
      raise ValueError(f"act_params: the range [{lo}, {hi}] is not finite")
    lo_b, hi_b = jnp.broadcast_arrays(lo, hi)
    inverted = np.asarray(lo_b > hi_b)
    if inverted.any():
      i = tuple(int(a) for a in np.argwhere(inverted)[0])
      raise ValueError(f"act_params: range shape {tuple(lo_b.shape)} dtype float32 has lo > hi "
                       f"at {int(inverted.sum())} entries, first at index {i}: "
                       f"[{float(lo_b[i])}, {float(hi_b[i])}]")
  lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
  lo, hi = jnp.broadcast_arrays(lo, hi)
  spec = QuantSpec(qtype=activation_spec.qtype, symmetric=activation_spec.symmetric,
                   granularity=Granularity.CHANNEL, channel_axes=(-1,))
  return _act_params(lo, hi, spec)


@functools.partial(jax.jit, static_argnames=("spec",))
def _act_params(lo: jax.Array, hi: jax.Array, spec: QuantSpec):
  # the range as a 2-row tensor: compute_params' per-column range is then exactly [lo, hi]
  scale, zp = compute_params(jnp.stack([lo.reshape(-1), hi.reshape(-1)]), spec,
                             name="act_params")
  return scale.reshape(lo.shape), None if zp is None else zp.reshape(lo.shape)


__all__ = ["Observer", "MinMaxState", "HistogramState", "minmax", "moving_average_minmax",
           "percentile", "mse_range", "act_params"]
