"""Streaming per-layer input statistics for PTQ, accumulated batch by batch.

A Dense kernel ``W`` of shape ``(K, N)`` sees inputs ``X`` of shape ``(tokens, K)``.  Everything
GPTQ, AWQ and SmoothQuant need from ``X`` is a sum over tokens, so it can be accumulated without
keeping activations:

* ``xtx = Σ_batches XᵀX`` (float32, ``K × K``), giving GPTQ's Hessian ``H = 2 XᵀX / n``
  (Frantar et al., 2022, arXiv:2210.17323);
* ``absmax = max |x_k|`` per input channel (SmoothQuant, Xiao et al., 2022, arXiv:2211.10438);
* ``abssum = Σ |x_k|`` per input channel, giving ``mean |x_k|`` (AWQ, Lin et al., 2023,
  arXiv:2306.00978).

Non-finite activations are not summed (they are replaced by 0) but counted, so that
:func:`check_stats` can refuse them with an error naming the layer.

Example:
  >>> st = init_stats(512)
  >>> for x in batches:            # x: (..., 512)
  ...   st = update_stats(st, x)
  >>> H = hessian(st, name="layers_0/attn/q_proj/kernel")
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jq import numerics


class LayerStats(NamedTuple):
  """Sufficient statistics of a layer's input, summed over tokens.

  Attributes:
    xtx: ``Σ xᵀx`` over tokens, float32 ``(K, K)``.
    count: number of tokens seen, int32 ``()`` (wraps after 2³¹ tokens).
    absmax: per-channel ``max |x|``, float32 ``(K,)``.
    abssum: per-channel ``Σ |x|``, float32 ``(K,)``.
    nonfinite: number of NaN/Inf activation values seen, int32 ``()``.
  """
  xtx: jax.Array
  count: jax.Array
  absmax: jax.Array
  abssum: jax.Array
  nonfinite: jax.Array


def init_stats(num_channels: int) -> LayerStats:
  """Empty statistics for a layer with ``num_channels`` (= K) input features."""
  if int(num_channels) < 1:
    raise ValueError(f"init_stats: num_channels={num_channels} must be >= 1")
  k = int(num_channels)
  return LayerStats(xtx=jnp.zeros((k, k), jnp.float32), count=jnp.zeros((), jnp.int32),
                    absmax=jnp.zeros((k,), jnp.float32), abssum=jnp.zeros((k,), jnp.float32),
                    nonfinite=jnp.zeros((), jnp.int32))


@jax.jit
def _update(stats: LayerStats, x: jax.Array, token_weight: jax.Array | None) -> LayerStats:
  k = stats.absmax.shape[0]
  x = x.reshape(-1, k).astype(jnp.float32)
  finite = jnp.isfinite(x)
  x = jnp.where(finite, x, 0.0)
  ax = jnp.abs(x)
  xw = x if token_weight is None else x * token_weight.reshape(-1, 1).astype(jnp.float32)
  # HIGHEST: on TPU/GPU the default f32 matmul precision may round inputs to bf16/tf32
  xtx = jax.lax.dot_general(xw, x, (((0,), (0,)), ((), ())),
                            precision=jax.lax.Precision.HIGHEST,
                            preferred_element_type=jnp.float32)
  return LayerStats(
      xtx=stats.xtx + xtx,
      count=stats.count + jnp.int32(x.shape[0]),
      absmax=jnp.maximum(stats.absmax, jnp.max(ax, axis=0, initial=0.0)),
      abssum=stats.abssum + jnp.sum(ax, axis=0),
      nonfinite=stats.nonfinite + jnp.sum(~finite, dtype=jnp.int32))


def update_stats(stats: LayerStats, x: jax.Array, token_weight: jax.Array | None = None
                 ) -> LayerStats:
  """Adds a batch of inputs ``x`` of shape ``(..., K)`` (any float dtype) to ``stats`` (jitted).

  Args:
    stats: the statistics so far.
    x: inputs ``(..., K)``.
    token_weight: optional non-negative weights of shape ``x.shape[:-1]`` applied to the
      ``XᵀX`` sum only (``Σ w_t x_tᵀx_t``; ``count`` stays the number of tokens).  Used to give
      rare but influential tokens (a sequence's first, attention-sink token) more say in GPTQ's
      Hessian; see ``jq.spec.GPTQOptions.first_token_weight``.

  Raises:
    ValueError: if the last axis of ``x`` is not K, ``x`` is not floating point, or
      ``token_weight`` has the wrong shape.
  """
  k = stats.absmax.shape[0]
  if np.ndim(x) < 1 or np.shape(x)[-1] != k:
    raise ValueError(f"update_stats: input of shape {tuple(np.shape(x))} does not end in K={k}")
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    raise ValueError(f"update_stats: input dtype {jnp.result_type(x)} is not floating point")
  if token_weight is not None:
    token_weight = jnp.asarray(token_weight)
    if tuple(token_weight.shape) != tuple(np.shape(x))[:-1]:
      raise ValueError(f"update_stats: token_weight of shape {tuple(token_weight.shape)} does not "
                       f"match the input's token axes {tuple(np.shape(x))[:-1]}")
  return _update(stats, jnp.asarray(x), token_weight)


def merge_stats(a: LayerStats, b: LayerStats) -> LayerStats:
  """Statistics of the union of two token sets (e.g. from two hosts or data-parallel shards)."""
  return LayerStats(xtx=a.xtx + b.xtx, count=a.count + b.count,
                    absmax=jnp.maximum(a.absmax, b.absmax), abssum=a.abssum + b.abssum,
                    nonfinite=a.nonfinite + b.nonfinite)


def scale_stats(stats: LayerStats, s: jax.Array) -> LayerStats:
  """Statistics of ``x / s`` (per-channel ``s > 0``) from those of ``x``: exact, so smoothing
  (AWQ/SmoothQuant) never needs a second capture.  Leading axes (stacked layers) broadcast:
  ``s`` of shape ``(L, K)`` scales statistics of shape ``(L, K, K)`` / ``(L, K)``."""
  inv = 1.0 / jnp.asarray(s, jnp.float32)
  return stats._replace(xtx=stats.xtx * inv[..., :, None] * inv[..., None, :],
                        absmax=stats.absmax * inv, abssum=stats.abssum * inv)


def check_stats(stats: LayerStats, name: str = "<layer>") -> None:
  """Raises ValueError (naming the layer) for empty or non-finite statistics.

  Runs only on concrete values (it is a no-op under ``jax.jit``).
  """
  if not all(numerics.is_concrete(v) for v in (stats.count, stats.nonfinite, stats.xtx)):
    return
  k = stats.absmax.shape[0]
  if int(stats.count) <= 0:
    raise ValueError(f"{name}: no calibration tokens were recorded for this layer (K={k}); "
                     "check that calibration data reaches it")
  if int(stats.nonfinite) > 0:
    raise ValueError(f"{name}: {int(stats.nonfinite)} NaN/Inf input activation values in "
                     f"{int(stats.count)} tokens (K={k}); fix the model or calibration data "
                     "(e.g. overflow in float16) before quantizing")
  xp = np if isinstance(stats.xtx, np.ndarray) else jnp   # (host sums stay on the host)
  if not bool(xp.all(xp.isfinite(stats.xtx))):
    raise ValueError(f"{name}: XᵀX overflowed float32 (K={k}, {int(stats.count)} tokens); "
                     "rescale the inputs or use fewer tokens")


def hessian_scale(stats: LayerStats, name: str = "<layer>") -> jax.Array:
  """The factor ``2 / n`` of GPTQ's ``H = 2 XᵀX / n`` (a float32 scalar); checks ``stats`` first.
  ``hessian(stats)`` is ``stats.xtx * hessian_scale(stats)``, bit for bit: a solve can scale
  ``XᵀX`` where it uses it instead of holding a second ``K × K`` matrix."""
  check_stats(stats, name)
  return 2.0 / jnp.maximum(stats.count, 1).astype(jnp.float32)


def hessian(stats: LayerStats, name: str = "<layer>") -> jax.Array:
  """GPTQ's proxy Hessian ``H = 2 XᵀX / n`` (float32, ``K × K``); checks ``stats`` first."""
  return jnp.asarray(stats.xtx) * hessian_scale(stats, name)


def mean_abs(stats: LayerStats, name: str = "<layer>") -> jax.Array:
  """Per-channel ``mean |x|`` (AWQ's activation salience); checks ``stats`` first."""
  check_stats(stats, name)
  return stats.abssum / jnp.maximum(stats.count, 1).astype(jnp.float32)


def max_abs(stats: LayerStats, name: str = "<layer>") -> jax.Array:
  """Per-channel ``max |x|`` (SmoothQuant's activation range); checks ``stats`` first."""
  check_stats(stats, name)
  return stats.absmax


__all__ = ["LayerStats", "init_stats", "update_stats", "merge_stats", "scale_stats", "check_stats",
           "hessian", "hessian_scale", "mean_abs", "max_abs"]
