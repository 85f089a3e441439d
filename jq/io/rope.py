"""RoPE frequencies of the decoder families, computed in one place for the model
(``jq_models.decoder``) and for the GGUF writer (llama.cpp's ``rope_freqs`` tensor is the ratio
of the unscaled to the scaled frequencies)."""
from __future__ import annotations

import math
from typing import Any

import numpy as np


def rope_inv_freq(head_dim: int, theta: float, scaling: Any = None) -> np.ndarray:
  """RoPE inverse frequencies ``(head_dim / 2,)`` float32, as Hugging Face computes them.

  ``scaling``: None or a ``jq_models.decoder.RopeScaling`` (``kind`` linear / llama3 / factors
  and its fields).
  """
  inv = (1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32)
                                      / np.float32(head_dim)))).astype(np.float32)
  if scaling is None:
    return inv
  if scaling.kind == "linear":
    return (inv / np.float32(scaling.factor)).astype(np.float32)
  if scaling.kind == "factors":
    if len(scaling.factors) != inv.shape[0]:
      raise ValueError(f"RopeScaling: {len(scaling.factors)} factors for head_dim {head_dim} "
                       f"(need {inv.shape[0]})")
    return (inv / np.asarray(scaling.factors, np.float32)).astype(np.float32)
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
