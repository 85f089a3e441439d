"""Post-training quantization algorithms as pure functions of weights and input statistics.

Kernels are Dense kernels ``W`` of shape ``(K, N)`` = ``(in, out)``; statistics are those of the
kernel's input ``X`` of shape ``(tokens, K)`` (see :mod:`jq.calibrate.stats`).

* :mod:`jq.algorithms.gptq`: GPTQ (Frantar et al., 2022, arXiv:2210.17323).
* :mod:`jq.algorithms.awq`: AWQ (Lin et al., 2023, arXiv:2306.00978).
* :mod:`jq.algorithms.smoothquant`: SmoothQuant (Xiao et al., 2022, arXiv:2211.10438).
* :mod:`jq.algorithms.fold`: folding per-channel scales ``x → x / s`` into the producer of ``x``.
* :mod:`jq.algorithms.rounding`: learned rounding (SignRound/AutoRound, Cheng et al., 2023,
  arXiv:2309.05516): rounding offsets and range factors trained on a block's output error.
"""
from jq.algorithms.awq import AWQInfo, awq_search_clip, awq_search_scale, subsample_tokens
from jq.algorithms.fold import (fold_scale_into_linear, fold_scale_into_norm, scale_consumer)
from jq.algorithms.gptq import GPTQInfo, gptq_quantize
from jq.algorithms.smoothquant import smooth_scales, weight_absmax

__all__ = ["GPTQInfo", "gptq_quantize", "AWQInfo", "awq_search_scale", "awq_search_clip",
           "subsample_tokens", "fold_scale_into_norm", "fold_scale_into_linear", "scale_consumer",
           "smooth_scales", "weight_absmax"]
