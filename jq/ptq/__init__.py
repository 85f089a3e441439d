"""Post-training quantization of whole models with calibration data (block by block).

* :func:`quantize_blockwise`: RTN / GPTQ / AWQ / SmoothQuant per rule, static activation scales,
  sequential calibration (see :mod:`jq.ptq.pipeline`).
* :mod:`jq.ptq.recipes`: named recipes for ``jq-quant --recipe``.
* :func:`capture_dense_inputs`: the linen capture hook used for calibration.
"""
from jq.ptq.blocks import BlockwiseModel, ScaleGroup, swiglu_output
from jq.ptq.capture import capture_dense_inputs
from jq.ptq.pipeline import PTQConfig, PTQResult, quantize_blockwise

__all__ = ["BlockwiseModel", "ScaleGroup", "swiglu_output", "capture_dense_inputs", "PTQConfig",
           "PTQResult", "quantize_blockwise"]
