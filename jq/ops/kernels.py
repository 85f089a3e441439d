"""Registers the Pallas GPU kernels in the ``jq.ops`` dispatch registry.

The kernels (``pallas_wo``, ``pallas_w8a8``) are held equal to their XLA reference twins by tests
in Pallas interpret mode on CPU, and were compiled, checked and timed on an H100
(``benchmarks/gpu_check.py``; results in ``benchmarks/results/gpu_h100.md``).

``JQ_PALLAS`` (environment) or :func:`enable` choose the policy:

* ``auto`` (default): the Pallas weight-only kernel where the H100 runs measured it ahead of both
  bf16 and XLA's dequant path: 4-bit weights with at most ``AUTO_MAX_M_INT4`` (16) rows, 8-bit
  weights with at most ``AUTO_MAX_M_INT8`` (4) rows.  End to end (``benchmarks/decode.py``,
  Llama-3.2-1B shapes, batch 1) that decodes 1.5x (int4) to 1.6x (int8) faster than bf16, while
  XLA's int4 path is 1.4x *slower* than bf16.  Elsewhere XLA's reference paths: at batch 16 XLA's
  int8 path beat the kernel (13.9k vs 11.3k tok/s) and at M >= 64 the kernels are 1.1-6.7x
  slower than bf16.  W8A8 stays on XLA's int8 dot (faster than the kernel in both runs).  The
  int8 threshold (4) lies between the measured M=1 (kernel ahead) and M=16 (XLA ahead).
* ``1``: every problem the kernels accept (what ``benchmarks/gpu_check.py`` tests).
* ``0``: never.
"""
from __future__ import annotations

import os

from jq.ops import pallas_w8a8, pallas_wo
from jq.ops.dispatch import Impl, Mode, PerfNote, Problem, register

AUTO_MAX_M_INT4 = 16
AUTO_MAX_M_INT8 = 4
_POLICIES = ("auto", "1", "0")


def _policy_from_env() -> str:
  v = os.environ.get("JQ_PALLAS", "auto").strip().lower() or "auto"
  if v not in _POLICIES:
    raise ValueError(f"JQ_PALLAS={v!r}: expected one of {_POLICIES}")
  return v


_POLICY = _policy_from_env()


def enabled() -> bool:
  """True unless the policy is ``0`` (``auto`` still limits the kernels to small M)."""
  return _POLICY != "0"


def policy() -> str:
  return _POLICY


def _wo_ok(p: Problem) -> bool:
  if _POLICY == "0":
    return False
  if _POLICY == "auto" and p.m > (AUTO_MAX_M_INT4 if p.qtype.storage_bits == 4 else
                                  AUTO_MAX_M_INT8):
    return False
  return p.out_sharding is None and pallas_wo.unsupported_reason(
      p.x_shape, p.x_dtype, p.w, p.layout.dimension_numbers) is None


def _w8a8_ok(p: Problem) -> bool:
  return _POLICY == "1" and p.out_sharding is None and pallas_w8a8.unsupported_reason(
      p.x_shape, p.x_dtype, p.w, p.layout.dimension_numbers) is None


def _note(p: Problem) -> PerfNote:
  return PerfNote("Pallas GPU kernel (checked and timed on an H100: benchmarks/results/"
                  "gpu_h100.md)")


def _register() -> None:
  register(Impl(name="pallas_gpu_weight_only", fn=pallas_wo.weight_only_dot_general,
                backends=frozenset({"gpu"}), modes=frozenset({Mode.WEIGHT_ONLY}),
                predicate=_wo_ok, priority=10, note=_note))
  register(Impl(name="pallas_gpu_int8", fn=pallas_w8a8.int8_dot_general,
                backends=frozenset({"gpu"}), modes=frozenset({Mode.DYNAMIC, Mode.STATIC}),
                predicate=_w8a8_ok, priority=10, note=_note))


def enable(on: bool | str = True) -> None:
  """Sets the policy: ``True``/``"1"`` (all accepted problems), ``"auto"``, ``False``/``"0"``."""
  global _POLICY
  v = ("1" if on else "0") if isinstance(on, bool) else str(on)
  if v not in _POLICIES:
    raise ValueError(f"enable({on!r}): expected a bool or one of {_POLICIES}")
  _POLICY = v


def disable() -> None:
  enable(False)


_register()

__all__ = ["enable", "disable", "enabled", "policy", "AUTO_MAX_M_INT4", "AUTO_MAX_M_INT8"]
