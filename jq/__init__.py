"""jq: functional quantization for JAX/Flax models.

Pure functions over parameter pytrees: ``params -> quantized params`` and ``(x, qweight) -> y``.
"""
from jq.layout import Layout
from jq.metrics import cosine, error_stats, kl_divergence, max_abs_error, mse, sqnr
from jq.qarray import ActivationQuant, QArray, checked, dequantize
from jq.qtypes import NF4_TABLE, QType
from jq.quantize import compute_params, fake_quant, quantize, quantize_with_params
from jq.spec import (A8_DYNAMIC, A8_DYNAMIC_ASYM, A8_STATIC, A_FP8_DYNAMIC, A_FP8_STATIC,
                     FP8_CHANNEL, NF4_G64, RECIPES, W2A16_G32,
                     W3A16_G128, W4A16_G32, W4A16_G128, W8A16, ActivationSpec, ActMode, Algorithm, AutoRoundOptions,
                     AWQOptions, Clip,
                     ClipMethod, GPTQOptions, Granularity, QuantSpec, Rule, SmoothQuantOptions,
                     default_rules, head_rule, recipe_names, recipe_rules)
from jq.tree import (dequantize_tree, format_report, leaves_with_paths, nbytes, plan,
                     quantize_tree, report, tree_error)

__version__ = "0.1.0"

from jq import distributed, io, nn, ops, sharding, stream  # noqa: E402  (checkpoints, adapters, ops, sharding, streamed road, processes)
from jq.nn import explain  # noqa: E402
from jq.ops.policy import KernelPolicy  # noqa: E402  (which kernels dispatch may pick: a value)
from jq import qat  # noqa: E402  (quantization-aware training)
from jq import kv_cache  # noqa: E402  (quantized KV caches: int8 / fp8 keys and values)
from jq import ptq  # noqa: E402  (calibrated quantization: jq.ptq.quantize_model)
