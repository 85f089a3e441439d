"""RoPE frequencies of the decoder families, computed in one place for the model
(``jq_models.decoder``) and for the GGUF writer (llama.cpp's ``rope_freqs`` tensor is the ratio
of the unscaled to the scaled frequencies)."""
from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np


def rope_inv_freq(head_dim: int, theta: float, scaling: Any = None, *,
                  long: bool = False) -> np.ndarray:
  """RoPE inverse frequencies ``(head_dim / 2,)`` float32, as Hugging Face computes them.

  ``head_dim``: the rotated width (``DecoderConfig.rotary_dim`` where only part of a head
  rotates). ``scaling``: None or a ``jq_models.decoder.RopeScaling`` (``kind`` linear / llama3 /
  yarn / longrope / factors and its fields; the query/key scale of YaRN and LongRoPE is
  :func:`rope_attention_factor`). ``long``: LongRoPE's long-context frequencies (else its short
  ones; the model picks per call, :func:`longrope_is_long`).
  """
  powers = (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32)
                                  / np.float32(head_dim))).astype(np.float32)
  inv = (1.0 / powers).astype(np.float32)
  if scaling is None:
    return inv
  if scaling.kind == "longrope":
    factors = scaling.long_factors if long else scaling.short_factors
    if len(factors) != inv.shape[0]:
      raise ValueError(f"RopeScaling(longrope): {len(factors)} {'long' if long else 'short'} "
                       f"factors for a rotated width of {head_dim} (need {inv.shape[0]})")
    return (1.0 / (np.asarray(factors, np.float32) * powers)).astype(np.float32)
  if scaling.kind == "linear":
    return (inv / np.float32(scaling.factor)).astype(np.float32)
  if scaling.kind == "factors":
    if len(scaling.factors) != inv.shape[0]:
      raise ValueError(f"RopeScaling: {len(scaling.factors)} factors for head_dim {head_dim} "
                       f"(need {inv.shape[0]})")
    return (inv / np.asarray(scaling.factors, np.float32)).astype(np.float32)
  if scaling.kind == "yarn":
    return _yarn_inv_freq(head_dim, float(theta), scaling)
  # llama3: long wavelengths divided by factor, short ones kept, a smooth blend in between
  old = scaling.original_max_position_embeddings
  low_wavelen = old / scaling.low_freq_factor
  high_wavelen = old / scaling.high_freq_factor
  wavelen = 2 * math.pi / inv
  scaled = np.where(wavelen > low_wavelen, inv / scaling.factor, inv)
  smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor
                                                       - scaling.low_freq_factor)
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn_inv_freq(head_dim: int, theta: float, scaling: Any) -> np.ndarray:
  """YaRN: frequencies that turn fewer than ``beta_slow`` times over the original context are
  divided by ``factor``, those turning more than ``beta_fast`` times kept, a linear ramp over the
  frequency index in between (Hugging Face's float32 arithmetic)."""
  def dim_of(rotations: float) -> float:   # the frequency index turning `rotations` times
    old = scaling.original_max_position_embeddings
    return head_dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(theta))
  low, high = dim_of(scaling.beta_fast), dim_of(scaling.beta_slow)
  if scaling.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, head_dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - np.float32(low))
                 / np.float32(high - low), 0, 1).astype(np.float32)
  keep = np.float32(1) - ramp
  pos = (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32)
                               / np.float32(head_dim))).astype(np.float32)
  extrapolated = (np.float32(1) / pos).astype(np.float32)
  interpolated = (np.float32(1) / (np.float32(scaling.factor) * pos)).astype(np.float32)
  return (interpolated * (1 - keep) + extrapolated * keep).astype(np.float32)


def rope_attention_factor(scaling: Any) -> float:
  """The factor YaRN and LongRoPE scale the rotated queries and keys by (Hugging Face multiplies
  cos and sin by it; LongRoPE at every length); 1.0 for every other scaling."""
  scaled = scaling is not None and scaling.kind in ("yarn", "longrope")
  return float(scaling.attention_factor) if scaled else 1.0


def longrope_is_long(scaling: Any, positions: Any) -> Any:
  """Whether a call at ``positions`` takes LongRoPE's long factors: as Hugging Face decides, when
  its largest position reaches past the original context (``max + 1 >
  original_max_position_embeddings``); a boolean array (traceable)."""
  return jnp.max(positions) + 1 > scaling.original_max_position_embeddings
