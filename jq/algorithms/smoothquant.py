"""SmoothQuant: migrating activation outliers into the weights before W8A8 quantization.

Xiao, Lin, Seznec, Wu, Demouth, Han, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models", 2022, arXiv:2211.10438.

Activations of LLMs have a few input channels with very large magnitude, which ruin a per-tensor
int8 activation scale; weights are easy to quantize.  With a per-input-channel factor

    s_j = max|X_j|^α / max|W_j|^(1−α)

(``max|W_j|`` over row ``j`` of every consumer of ``X``), the layer ``y = (X / s)(diag(s) W)``
has balanced ranges: activation channel ``j`` and weight row ``j`` both end up with magnitude
``max|X_j|^(1−α) · max|W_j|^α``.  ``X / s`` is folded into the producer and ``diag(s) W`` replaces
the kernel (see :mod:`jq.algorithms.fold`), so the float model is unchanged.

Example:
  >>> s = smooth_scales(stats, [wq, wk, wv], alpha=0.5)     # stats: LayerStats of the norm output
  >>> norm_scale = fold_scale_into_norm(norm_scale, s)
  >>> wq, wk, wv = (scale_consumer(w, s) for w in (wq, wk, wv))
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jq import numerics
from jq.algorithms.fold import fold_scale_into_linear, fold_scale_into_norm, scale_consumer
from jq.calibrate.stats import LayerStats, max_abs


def _as_list(ws) -> list[jax.Array]:
  if isinstance(ws, (list, tuple)):
    return [jnp.asarray(w) for w in ws]
  return [jnp.asarray(ws)]


def weight_absmax(ws: jax.Array | Sequence[jax.Array], *, name: str = "<kernels>") -> jax.Array:
  """Per-input-channel ``max|W_j|`` over the rows of all consumer kernels ``(K, N_i)``."""
  ws = _as_list(ws)
  if not ws:
    raise ValueError(f"{name}: no consumer kernels were given")
  k = ws[0].shape[0] if ws[0].ndim == 2 else None
  for w in ws:
    if w.ndim != 2 or w.shape[0] != k or not jnp.issubdtype(w.dtype, jnp.floating):
      raise ValueError(f"{name}: consumer kernels must be float (K, N_i) with one K; got "
                       f"{[(tuple(v.shape), str(v.dtype)) for v in ws]}")
  return jnp.max(jnp.stack([jnp.max(jnp.abs(w.astype(jnp.float32)), axis=1) for w in ws]), axis=0)


def smooth_scales(act_absmax: jax.Array | LayerStats, ws: jax.Array | Sequence[jax.Array],
                  alpha: float = 0.5, *, min_scale: float = 1e-5, max_scale: float = 1e5,
                  name: str = "<layer>") -> jax.Array:
  """SmoothQuant's migration scales ``s_j = max|X_j|^α / max|W_j|^(1−α)`` (Xiao et al., 2022).

  Channels whose activation or weight row is entirely zero get ``s_j = 1`` (nothing to migrate);
  the rest are clamped to ``[min_scale, max_scale]`` so that folding never creates 0 or Inf.

  Args:
    act_absmax: per-channel ``max|x|`` ``(K,)`` of the layer input, or its
      :class:`~jq.calibrate.stats.LayerStats`.
    ws: the kernel ``(K, N)``, or all kernels ``(K, N_i)`` that consume the same input.
    alpha: migration strength in ``[0, 1]`` (0.5 for most models; up to 0.75–0.85 for models with
      stronger outliers).
    min_scale, max_scale: clamp range of ``s``.
    name: layer name for error messages.

  Returns:
    ``s``, float32 ``(K,)``.
  """
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"{name}: alpha={alpha} must be in [0, 1]")
  if not 0.0 < min_scale <= 1.0 <= max_scale:
    raise ValueError(f"{name}: need 0 < min_scale={min_scale} <= 1 <= max_scale={max_scale}")
  if isinstance(act_absmax, LayerStats):
    act_absmax = max_abs(act_absmax, name)
  a = jnp.asarray(act_absmax)
  w_max = weight_absmax(ws, name=name)
  if a.shape != w_max.shape:
    raise ValueError(f"{name}: act_absmax has shape {tuple(a.shape)}, the kernels have "
                     f"K={w_max.shape[0]} input channels")
  a = jnp.abs(a.astype(jnp.float32))
  if numerics.is_concrete(a) and not bool(jnp.all(jnp.isfinite(a))):
    raise ValueError(f"{name}: act_absmax has NaN/Inf entries; check the calibration inputs")
  return _smooth(a, w_max, jnp.float32(alpha), min_scale, max_scale)


@jax.jit
def _smooth_impl(a, w, alpha, lo, hi):
  live = (a > 0) & (w > 0)
  a1 = jnp.where(live, a, 1.0)
  w1 = jnp.where(live, w, 1.0)
  s = jnp.exp(alpha * jnp.log(a1) - (1.0 - alpha) * jnp.log(w1))
  return jnp.where(live, jnp.clip(s, lo, hi), 1.0)


def _smooth(a, w, alpha, lo, hi):
  return _smooth_impl(a, w, alpha, jnp.float32(lo), jnp.float32(hi))


__all__ = ["smooth_scales", "weight_absmax", "fold_scale_into_norm", "fold_scale_into_linear",
           "scale_consumer"]
