"""AWQ: activation-aware weight quantization (per-channel scale search and clip search).

Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han, "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration", 2023, arXiv:2306.00978.

Weights feeding from input channels with large activations matter most.  AWQ protects them by a
per-input-channel scale ``s`` (folded into the producer of ``x``, see :mod:`jq.algorithms.fold`):

    y = x W  =  (x / s)(diag(s) W)  ≈  (x / s) Q(diag(s) W),

with ``s = mean|x|^α`` (normalised so that ``max(s)·min(s) = 1``) and ``α`` chosen on a grid to
minimise the output error ``‖x W − x diag(s)⁻¹ Q(diag(s) W)‖²`` on a small token sample.  All
linears that consume the same ``x`` (q/k/v, or gate/up) share one ``s``; an optional
``block_fn`` measures the error at the output of a larger block instead.  ``α = 0`` is on the grid
and gives ``s = 1``, i.e. round-to-nearest, so on the sample AWQ is never worse than RTN.

Then :func:`awq_search_clip` shrinks each quantization tile's range by the ratio minimising that
tile's contribution to the output error (the reference's ``auto_clip``).

Memory stays bounded: only a token sample (``max_tokens`` rows, default 512, taken evenly spaced
from the given activations) is used, and the clip search runs over chunks of output channels.

Example (one decoder layer's attention input):
  >>> s, info = awq_search_scale(x_norm, [wq, wk, wv], W4A16_G128)
  >>> norm_scale = fold_scale_into_norm(norm_scale, s)
  >>> ws = [scale_consumer(w, s) for w in (wq, wk, wv)]
  >>> ws = [awq_search_clip(x_norm / s, w, W4A16_G128)[0] for w in ws]
  >>> qws = [quantize(w, W4A16_G128) for w in ws]
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jq import numerics
from jq.quantize import check_float_input, fake_quant
from jq.spec import Clip, QuantSpec

_HIGHEST = jax.lax.Precision.HIGHEST


class AWQInfo(NamedTuple):
  """Diagnostics of :func:`awq_search_scale`.

  Attributes:
    alpha: the chosen exponent.
    loss: mean squared output error with the chosen scales (on the token sample).
    rtn_loss: the same error for round-to-nearest (``α = 0``).
  """
  alpha: jax.Array
  loss: jax.Array
  rtn_loss: jax.Array


def subsample_tokens(x: jax.Array, max_tokens: int) -> jax.Array:
  """``x`` as ``(tokens, K)``, keeping at most ``max_tokens`` evenly spaced rows."""
  x = jnp.asarray(x)
  x = x.reshape(-1, x.shape[-1])
  t = x.shape[0]
  if t > max_tokens:
    idx = np.linspace(0, t - 1, max_tokens).round().astype(np.int32)
    x = x[idx]
  return x


def _check_x(x, k: int, name: str, max_tokens: int) -> jax.Array:
  check_float_input(x, f"{name} (activations)")
  x = jnp.asarray(x)
  if x.ndim < 1 or x.shape[-1] != k:
    raise ValueError(f"{name}: activations of shape {tuple(x.shape)} do not end in the kernels' "
                     f"K={k} input channels")
  if int(max_tokens) < 1:
    raise ValueError(f"{name}: max_tokens={max_tokens} must be >= 1")
  x = subsample_tokens(x, int(max_tokens))
  if x.shape[0] == 0:
    raise ValueError(f"{name}: no activation tokens were given")
  return x.astype(jnp.float32)


def _check_ws(ws, name: str) -> tuple[jax.Array, ...]:
  ws = tuple(ws) if isinstance(ws, (list, tuple)) else (ws,)
  if not ws:
    raise ValueError(f"{name}: no kernels were given")
  k = None
  for i, w in enumerate(ws):
    check_float_input(w, f"{name}[{i}]")
    w = jnp.asarray(w)
    if w.ndim != 2 or (k is not None and w.shape[0] != k):
      raise ValueError(f"{name}[{i}]: shape {tuple(w.shape)} dtype {w.dtype}: expected (K, N) "
                       f"kernels sharing K{'' if k is None else '=' + str(k)}")
    k = w.shape[0]
  return tuple(jnp.asarray(w) for w in ws)


def _default_block(x: jax.Array, ws: Sequence[jax.Array]) -> jax.Array:
  return jnp.concatenate([jnp.dot(x, w, precision=_HIGHEST) for w in ws], axis=-1)


def weight_mean(ws: Sequence[jax.Array], rows: int) -> jax.Array:
  """Per-input-channel mean of ``|W|`` relative to its quantization group's max (AutoAWQ's
  ``w_mean`` for duo scaling): groups of ``rows`` input channels, over every output column."""
  total, cols = 0.0, 0
  for w in ws:
    k, n = w.shape
    nk = -(-k // rows)
    a = jnp.pad(jnp.abs(w), ((0, nk * rows - k), (0, 0))).reshape(nk, rows, n)
    a = a / (jnp.max(a, axis=1, keepdims=True) + 1e-6)
    total = total + jnp.sum(a.reshape(nk * rows, n)[:k], axis=1)
    cols += n
  return total / cols


@functools.partial(jax.jit, static_argnames=("spec", "grid", "block_fn", "duo"))
def _search_scale(x, ws, x_mean, *, spec: QuantSpec, grid: int, block_fn, duo: bool):
  fn = _default_block if block_fn is None else block_fn
  wsf = tuple(w.astype(jnp.float32) for w in ws)
  ref = fn(x, wsf).astype(jnp.float32)
  w_mean = weight_mean(wsf, spec.tile(ws[0].shape)[0]) if duo else None

  def scales(alpha):
    s = jnp.power(x_mean, alpha)
    if duo:
      s = s / (jnp.power(w_mean, 1.0 - alpha) + 1e-4)
    s = jnp.maximum(s, 1e-4)
    return s / jnp.sqrt(jnp.max(s) * jnp.min(s))

  def loss(s):
    wq = tuple(fake_quant(w * s[:, None], spec) / s[:, None] for w in wsf)
    d = fn(x, wq).astype(jnp.float32) - ref
    return jnp.mean(d * d)

  def body(carry, alpha):
    best_l, best_a, best_s = carry
    s = scales(alpha)
    lv = loss(s)
    better = lv < best_l
    return (jnp.where(better, lv, best_l), jnp.where(better, alpha, best_a),
            jnp.where(better, s, best_s)), None

  ones = jnp.ones_like(x_mean)
  rtn = loss(ones)
  alphas = jnp.arange(grid, dtype=jnp.float32) / grid
  (best_l, best_a, best_s), _ = jax.lax.scan(body, (rtn, jnp.float32(0.0), ones),
                                             alphas if duo else alphas[1:])
  return best_s, AWQInfo(alpha=best_a, loss=best_l, rtn_loss=rtn)


def awq_search_scale(x: jax.Array, ws: jax.Array | Sequence[jax.Array], spec: QuantSpec, *,
                     grid: int = 20, block_fn: Callable | None = None,
                     act_mean: jax.Array | None = None, max_tokens: int = 512,
                     duo: bool = False, name: str = "<layer>") -> tuple[jax.Array, AWQInfo]:
  """AWQ's per-input-channel scale search (Lin et al., 2023, arXiv:2306.00978).

  Returns ``s = mean|x|^α / sqrt(max · min)`` with ``α ∈ {0, 1/grid, …, (grid−1)/grid}``
  minimising the mean squared error between ``block_fn(x, ws)`` and
  ``block_fn(x, [Q(diag(s) W) / s for W in ws])``.

  Args:
    x: activations ``(..., K)`` entering the kernels (a sample: at most ``max_tokens`` evenly
      spaced rows are used).
    ws: one kernel ``(K, N)`` or all kernels ``(K, N_i)`` consuming ``x``; they share ``s``.
    spec: the weight spec used to quantize them.
    grid: number of ``α`` candidates.
    block_fn: ``block_fn(x, ws) -> y``, a hashable (module-level) function computing the block
      output whose error is measured (e.g. a gated MLP ``silu(x @ wg) * (x @ wu)``); default:
      the concatenated outputs ``x @ W_i``.
    act_mean: per-channel ``mean|x|`` over all calibration tokens (e.g.
      :func:`jq.calibrate.stats.mean_abs`); default: from the sample.
    max_tokens: token sample size.
    duo: AutoAWQ's "duo scaling": ``s = mean|x|^α / mean_w^(1−α)``, where ``mean_w`` is each
      input channel's mean ``|W|`` relative to its quantization group's max (then ``s = 1``,
      round-to-nearest, is tried separately).
    name: layer name for error messages.

  Returns:
    ``(s, info)``: float32 scales ``(K,)`` and :class:`AWQInfo`.
  """
  ws = _check_ws(ws, name)
  k = ws[0].shape[0]
  x = _check_x(x, k, name, max_tokens)
  if int(grid) < 1:
    raise ValueError(f"{name}: grid={grid} must be >= 1")
  for w in ws:
    spec.tile(w.shape, name=name, dtype=w.dtype)
  if act_mean is None:
    x_mean = jnp.mean(jnp.abs(x), axis=0)
  else:
    x_mean = jnp.asarray(act_mean, jnp.float32)
    if x_mean.shape != (k,):
      raise ValueError(f"{name}: act_mean has shape {tuple(x_mean.shape)}, expected ({k},)")
    if numerics.is_concrete(x_mean) and not bool(jnp.all(jnp.isfinite(x_mean))):
      raise ValueError(f"{name}: act_mean has NaN/Inf entries")
  return _search_scale(x, ws, jnp.abs(x_mean), spec=spec, grid=int(grid), block_fn=block_fn,
                       duo=bool(duo))


def _tile_ranges(w: jax.Array, tile: tuple[int, int], symmetric: bool):
  """Per-tile ``(lo, hi)`` of ``w`` (K, N) with ``lo <= 0 <= hi``; shapes ``num_tiles``."""
  k, n = w.shape
  (nk, nn) = numerics.num_tiles((k, n), tile)
  wp = jnp.pad(w, ((0, nk * tile[0] - k), (0, nn * tile[1] - n)))
  b = wp.reshape(nk, tile[0], nn, tile[1])
  lo = jnp.minimum(jnp.min(b, axis=(1, 3)), 0.0)
  hi = jnp.maximum(jnp.max(b, axis=(1, 3)), 0.0)
  if symmetric:
    hi = jnp.maximum(-lo, hi)
    lo = -hi
  return lo, hi


def _expand(t: jax.Array, tile: tuple[int, int], shape: tuple[int, int]) -> jax.Array:
  t = jnp.repeat(jnp.repeat(t, tile[0], axis=0), tile[1], axis=1)
  return t[:shape[0], :shape[1]]


@functools.partial(jax.jit, static_argnames=("spec", "grid", "max_shrink", "chunk"))
def _search_clip(x, w, *, spec: QuantSpec, grid: int, max_shrink: float, chunk: int):
  k, n = w.shape
  tile = spec.tile((k, n))
  tk, tn = tile
  nk = -(-k // tk)
  w = w.astype(jnp.float32)
  nc = -(-n // chunk)
  wpad = jnp.pad(w, ((0, 0), (0, nc * chunk - n)))
  xg = jnp.pad(x, ((0, 0), (0, nk * tk - k))).reshape(x.shape[0], nk, tk)
  ratios = 1.0 - jnp.arange(max(1, int(max_shrink * grid)), dtype=jnp.float32) / grid
  ctile = (tk, min(tn, chunk))

  def contrib(wc):                     # (K, c) -> per-group outputs (T, nk, c)
    wg = jnp.pad(wc, ((0, nk * tk - k), (0, 0))).reshape(nk, tk, wc.shape[1])
    return jnp.einsum("tar,arc->tac", xg, wg, precision=_HIGHEST)

  def one_chunk(wc):
    lo, hi = _tile_ranges(wc, ctile, spec.symmetric)
    org = contrib(wc)

    def err(r):
      lo_e, hi_e = _expand(lo * r, ctile, wc.shape), _expand(hi * r, ctile, wc.shape)
      wq = fake_quant(jnp.clip(wc, lo_e, hi_e), spec)
      d = contrib(wq) - org
      e = jnp.mean(d * d, axis=0)                                 # (nk, c)
      if ctile[1] == 1:
        return e
      c = e.shape[1]
      e = jnp.pad(e, ((0, 0), (0, (-c) % ctile[1])))
      return jnp.sum(e.reshape(nk, -1, ctile[1]), axis=-1)

    def body(carry, r):
      best_e, best_r = carry
      e = err(r)
      better = e < best_e
      return (jnp.where(better, e, best_e), jnp.where(better, r, best_r)), None

    (_, best), _ = jax.lax.scan(body, (err(ratios[0]), jnp.ones_like(lo)), ratios[1:])
    lo_e, hi_e = _expand(lo * best, ctile, wc.shape), _expand(hi * best, ctile, wc.shape)
    return jnp.clip(wc, lo_e, hi_e), best

  chunks = wpad.reshape(k, nc, chunk).transpose(1, 0, 2)          # (nc, K, chunk)
  clipped, best = jax.lax.map(one_chunk, chunks)
  clipped = clipped.transpose(1, 0, 2).reshape(k, nc * chunk)[:, :n]
  # best: (nc, nk, chunk // ctile[1]) -> (nk, tiles along N)
  best = best.transpose(1, 0, 2).reshape(nk, -1)[:, :numerics.num_tiles((k, n), tile)[1]]
  return clipped, best


def awq_search_clip(x: jax.Array, w: jax.Array, spec: QuantSpec, *, grid: int = 20,
                    max_shrink: float = 0.5, max_tokens: int = 512, chunk: int = 256,
                    name: str = "<kernel>") -> tuple[jax.Array, jax.Array]:
  """AWQ's clip search (Lin et al., 2023): per quantization tile, the range-shrink ratio
  ``r ∈ {1, 1 − 1/grid, …, 1 − max_shrink}`` minimising the tile's output error.

  For a tile covering input rows ``G`` and output columns ``C``, the error is
  ``mean_t Σ_{c∈C} (x_G · (Q(clip_r(W)) − W)_{G,c})²``.  The candidate range is ``r · [lo, hi]``
  of the tile's range (``r · [−max|w|, max|w|]`` if symmetric, as in the reference; asymmetric
  ranges shrink at both ends).

  Args:
    x: activations ``(..., K)`` entering ``w`` (after any AWQ scaling: ``x / s``).
    w: kernel ``(K, N)`` (after any AWQ scaling: ``diag(s) W``).
    spec: weight spec (its own ``clip`` is ignored during the search).
    grid, max_shrink: candidate ratios ``1 − i/grid`` for ``i < max_shrink · grid``.
    max_tokens: token sample size.
    chunk: output channels searched at once (memory ``max_tokens · K/group · chunk`` floats).
    name: parameter path for error messages.

  Returns:
    ``(w_clipped, ratio)``: ``w`` clamped to each tile's chosen range (in ``w.dtype``), and the
    ratios (shape ``num_tiles``).  ``quantize(w_clipped, spec)`` with ``spec.clip`` of method
    NONE reproduces exactly the grid that was searched.
  """
  (w,) = _check_ws((w,), name)
  k, n = w.shape
  x = _check_x(x, k, name, max_tokens)
  if int(grid) < 1 or not 0.0 <= max_shrink < 1.0:
    raise ValueError(f"{name}: grid={grid} must be >= 1 and max_shrink={max_shrink} in [0, 1)")
  if int(chunk) < 1:
    raise ValueError(f"{name}: chunk={chunk} must be >= 1")
  tile = spec.tile((k, n), name=name, dtype=w.dtype)
  # chunk along N only where tiles are single columns; otherwise search whole tiles at once
  chunk = min(int(chunk), n) if tile[1] == 1 else n
  search_spec = dataclasses.replace(spec, clip=Clip())
  clipped, ratio = _search_clip(x, w, spec=search_spec, grid=int(grid),
                                max_shrink=float(max_shrink), chunk=chunk)
  return clipped.astype(w.dtype), ratio


__all__ = ["awq_search_scale", "awq_search_clip", "AWQInfo", "subsample_tokens"]
