"""Registers the Pallas GPU kernels in the ``jq.ops`` dispatch registry.

The kernels (``pallas_wo``, ``pallas_w8a8``) are held equal to their XLA reference twins by tests
in Pallas interpret mode on CPU.  They have **not yet been compiled or timed on a GPU** by this
project (no GPU run so far), so dispatch only chooses them when ``JQ_PALLAS=1`` is set in the
environment (or :func:`enable` is called); ``benchmarks/gpu_check.py`` sets it.  Once a GPU run
has shown them faster than bf16 where the predicates below accept them, the default flips.

Shape policy (from the measurements quoted in the kernel issue: XLA's dequant path reaches ~0.43x
bf16 for int4 g128 at any M and ~1.1-1.2x for int8 per-channel at M <= 16; XLA int8 x int8 reaches
~1.45x at M <= 16 but ~0.45x at M = 256):

* weight-only int4/uint4 (any M) and int8/uint8 (any M): Pallas kernel;
* W8A8 dynamic/static: Pallas kernel.
"""
from __future__ import annotations

import os

from jq.ops import pallas_w8a8, pallas_wo
from jq.ops.dispatch import Impl, Mode, PerfNote, Problem, register

_ENABLED = os.environ.get("JQ_PALLAS", "0") == "1"


def enabled() -> bool:
  return _ENABLED


def _wo_ok(p: Problem) -> bool:
  return _ENABLED and p.out_sharding is None and pallas_wo.unsupported_reason(
      p.x_shape, p.x_dtype, p.w, p.layout.dimension_numbers) is None


def _w8a8_ok(p: Problem) -> bool:
  return _ENABLED and p.out_sharding is None and pallas_w8a8.unsupported_reason(
      p.x_shape, p.x_dtype, p.w, p.layout.dimension_numbers) is None


def _note(p: Problem) -> PerfNote:
  return PerfNote("Pallas GPU kernel (interpret-mode verified; GPU speed not yet measured by jq)")


def _register() -> None:
  register(Impl(name="pallas_gpu_weight_only", fn=pallas_wo.weight_only_dot_general,
                backends=frozenset({"gpu"}), modes=frozenset({Mode.WEIGHT_ONLY}),
                predicate=_wo_ok, priority=10, note=_note))
  register(Impl(name="pallas_gpu_int8", fn=pallas_w8a8.int8_dot_general,
                backends=frozenset({"gpu"}), modes=frozenset({Mode.DYNAMIC, Mode.STATIC}),
                predicate=_w8a8_ok, priority=10, note=_note))


def enable(on: bool = True) -> None:
  """Lets dispatch choose the Pallas GPU kernels (default: ``JQ_PALLAS`` environment variable)."""
  global _ENABLED
  _ENABLED = bool(on)


def disable() -> None:
  enable(False)


_register()

__all__ = ["enable", "disable", "enabled"]
