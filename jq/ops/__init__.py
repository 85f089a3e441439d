"""Quantized contractions: ``dot_general`` / ``einsum`` / ``matmul`` with a QArray rhs.

``jq.ops.dispatch`` picks an implementation from a registry keyed by (backend, mode, qtype, shape
predicate); ``jq.ops.reference`` holds the XLA reference twins every kernel is tested against.
"""
from jq.ops.dispatch import (Choice, EinsumPlan, Impl, Mode, PerfNote, Problem, choose,
                             dot_general, einsum, make_problem, matmul, mode_of, parse_einsum,
                             register, registered, route, unregister)
from jq.ops.policy import KernelPolicy, kernel_policy
from jq.ops.reference import (DotLayout, fake_quant_activations, fp8_dot_general,
                              int8_dot_general, quantize_activations, weight_only_dot_general)

__all__ = ["Choice", "DotLayout", "EinsumPlan", "Impl", "KernelPolicy", "kernel_policy", "Mode", "PerfNote", "Problem", "choose",
           "dot_general", "einsum", "fake_quant_activations", "fp8_dot_general", "int8_dot_general", "make_problem",
           "matmul", "mode_of", "parse_einsum", "quantize_activations", "register", "registered",
           "route", "unregister", "weight_only_dot_general"]

from jq.ops import kernels  # noqa: E402,F401  (registers the Pallas GPU kernels; see kernels.py)

from jq.ops.conv import conv_general_dilated  # noqa: E402  (conv with a QArray kernel)
from jq.ops.take import take  # noqa: E402  (rows of a QArray: embedding lookups)

__all__ += ["conv_general_dilated", "take"]
