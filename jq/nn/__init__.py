"""Flax adapters: quantize and run unchanged linen/nnx models.

* :func:`quantize_variables` (linen) / :func:`quantize_module` (nnx): rules + each kernel's layout
  read from the layer that uses it (per head, per feature, per stacked layer).
* :func:`layouts`: that mapping, for :func:`jq.quantize_tree`.
* linen: :func:`quantized_apply` returns a new apply function (``flax.linen.intercept_methods``).
* nnx: :func:`quantize_module` returns a new module whose layers run their QArray kernels.
* :func:`explain` prints which path every layer takes, in call order.
"""
from typing import Any

from jq.nn import linen as _linen
from jq.nn import nnx as _nnx
from jq.nn.common import Route
from jq.nn.explain import explain, format_routes, trace_routes
from jq.nn.linen import quantized_apply
from jq.nn.nnx import QConv, QEinsum, QLinear, QLinearGeneral, quantize_module
from jq.nn.quantize import quantize_variables


def layouts(model: Any, *args, **kwargs):
  """``{kernel path: jq.Layout}`` for every kernel a layer jq runs quantized uses.

  linen: ``layouts(model, variables, *example_inputs)`` traces the model abstractly; nnx:
  ``layouts(module)`` reads the layers.  Pass the result to ``jq.quantize_tree(..., layouts=)``.
  """
  from flax import nnx  # pylint: disable=import-outside-toplevel
  if isinstance(model, nnx.Module):
    if args or kwargs:
      raise ValueError("layouts: an nnx module takes no other arguments")
    return _nnx.layouts(model)
  if not args:
    raise ValueError("layouts: a linen model needs its variables and an example input")
  return _linen.layouts(model, *args, **kwargs)


__all__ = ["QConv", "QEinsum", "QLinear", "QLinearGeneral", "Route", "explain", "format_routes",
           "layouts", "quantize_module", "quantize_variables", "quantized_apply", "trace_routes"]
