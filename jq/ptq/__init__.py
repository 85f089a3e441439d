"""Post-training quantization of whole models with calibration data (block by block).

* :func:`quantize_model`: any linen or nnx model, no adapter: layouts from the layers, blocks
  from the module tree calibrated one at a time (:mod:`jq.ptq.sequential`; or all layers in one
  pass), inputs collected by ``jq.calibrate.collect``, AWQ/SmoothQuant groups found and checked,
  GPTQ/AWQ/RTN per rule (see :mod:`jq.ptq.quantize_model`).
* :func:`quantize_blockwise`: the same algorithms through a hand-written :class:`BlockwiseModel`
  (an override; see :mod:`jq.ptq.pipeline`).
* :mod:`jq.ptq.recipes`: named recipes for ``jq-quant --recipe``.
* :func:`capture_dense_inputs`: ``jq.calibrate.capture_inputs`` (every adapted layer's input).
"""
from jq.ptq.blocks import BlockwiseModel, ScaleGroup, swiglu_output
from jq.calibrate.collect import capture_inputs as capture_dense_inputs
from jq.ptq.pipeline import PTQConfig, PTQResult, quantize_blockwise
from jq.ptq.quantize_model import LayerRow, PTQModelResult, quantize_model

__all__ = ["BlockwiseModel", "ScaleGroup", "swiglu_output", "capture_dense_inputs", "PTQConfig",
           "PTQResult", "quantize_blockwise", "quantize_model", "PTQModelResult", "LayerRow"]
