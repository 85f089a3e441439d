"""Flax adapters: run unchanged linen/nnx models on quantized parameters.

* linen: :func:`quantized_apply` returns a new apply function (``flax.linen.intercept_methods``).
* nnx: :func:`quantize_module` returns a new module with quantized twins of its layers.
* :func:`explain` prints which path every layer takes.
"""
from jq.nn.common import Route
from jq.nn.explain import explain, format_routes, trace_routes
from jq.nn.linen import quantized_apply
from jq.nn.nnx import QEinsum, QLinear, QLinearGeneral, quantize_module

__all__ = ["QEinsum", "QLinear", "QLinearGeneral", "Route", "explain", "format_routes",
           "quantize_module", "quantized_apply", "trace_routes"]
