"""Registers the Pallas GPU kernels (and the Pallas TPU ones, below) in the ``jq.ops`` dispatch
registry.

The kernels (``pallas_wo``, ``pallas_w8a8``) are held equal to their XLA reference twins by tests
in Pallas interpret mode on CPU, and were compiled, checked and timed on an H100
(``benchmarks/gpu_check.py``; results in ``benchmarks/results/gpu_h100.md``).

The policy (:class:`jq.ops.policy.KernelPolicy`, a value passed to ``quantized_apply`` /
``quantize_module`` / ``dot_general`` or set with ``jq.ops.kernel_policy``; the process default
from ``JQ_PALLAS`` or :func:`enable`) chooses:

* ``auto`` (default): the Pallas weight-only kernel where the H100 runs measured it ahead of both
  bf16 and XLA's dequant path: 4-bit weights with at most ``AUTO_MAX_M_INT4`` (16) rows, 8-bit
  weights with at most ``AUTO_MAX_M_INT8`` (4) rows.  End to end (``benchmarks/decode.py``,
  Llama-3.2-1B shapes, batch 1) that decodes 1.5x (int4) to 1.6x (int8) faster than bf16, while
  XLA's int4 path is 1.4x *slower* than bf16.  Elsewhere XLA's reference paths: at batch 16 XLA's
  int8 path beat the kernel (13.9k vs 11.3k tok/s) and at M >= 64 the kernels are 1.1-6.7x
  slower than bf16.  W8A8 stays on XLA's int8 dot (faster than the kernel in both runs).  The
  int8 threshold (4) lies between the measured M=1 (kernel ahead) and M=16 (XLA ahead).
* ``always`` (``JQ_PALLAS=1``): every problem the kernels accept (what ``gpu_check.py`` tests).
* ``never`` (``JQ_PALLAS=0``).
"""
from __future__ import annotations

from jq import _compat
from jq.ops import mosaic_w8a8, mosaic_wo, pallas_tpu, pallas_w8a8, pallas_wo
from jq.ops.dispatch import Impl, Mode, PerfNote, Problem, register
from jq.ops.policy import (AUTO_MAX_M_INT4, AUTO_MAX_M_INT8, PALLAS_CHOICES, KernelPolicy,
                           current, set_default)
from jq.qtypes import QType


def _takes(module, p: Problem) -> bool:
  """Whether the kernel module's ``unsupported_reason`` accepts the problem (and no
  ``out_sharding``, which no kernel takes)."""
  return p.out_sharding is None and module.unsupported_reason(
      p.x_shape, p.x_dtype, p.w, p.layout.dimension_numbers) is None


def _wo_ok(p: Problem) -> bool:
  return p.policy.allows_weight_only(p.m, p.qtype.storage_bits) and _takes(pallas_wo, p)


def _w8a8_ok(p: Problem) -> bool:
  return p.policy.allows_w8a8() and _takes(pallas_w8a8, p)


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


def enable(on: KernelPolicy | bool | str = True) -> KernelPolicy:
  """Sets the process default policy: a :class:`KernelPolicy`, ``True`` (always), ``False``
  (never) or a name (``"auto"``, ``"always"``, ``"never"``, ``"1"``, ``"0"``).  Part of the jit
  cache key: functions jitted before retrace under the new default."""
  try:
    return set_default(on)
  except ValueError as e:
    raise ValueError(f"enable({on!r}): expected a KernelPolicy, a bool or one of "
                     f"{PALLAS_CHOICES}") from e


def disable() -> KernelPolicy:
  return enable(False)


def enabled() -> bool:
  """True unless the current policy is ``never`` (``auto`` still limits the kernels to small M)."""
  return current().pallas != "never"


def policy() -> KernelPolicy:
  """The current :class:`KernelPolicy` (``enable(policy())`` restores it)."""
  return current()


_register()

__all__ = ["enable", "disable", "enabled", "policy", "AUTO_MAX_M_INT4", "AUTO_MAX_M_INT8"]


# ---- Pallas TPU kernels (jq.ops.pallas_tpu) ------------------------------------------------------
# Held equal to their XLA twins in Pallas TPU interpret mode on CPU and lowered to Mosaic there,
# but not yet compiled or timed on a TPU: dispatch picks them on TPU only under
# ``KernelPolicy(tpu="always")`` (the default ``tpu="never"`` keeps XLA's paths until they are
# measured), and ``jq.explain`` says so (``Impl.held_back``).

_TPU_INT8, _TPU_WEIGHT_ONLY = "pallas_tpu_int8", "pallas_tpu_weight_only"


def _tpu_ok(p: Problem) -> bool:
  return p.policy.allows_tpu() and _takes(pallas_tpu, p)


def _tpu_note(p: Problem) -> PerfNote:
  return PerfNote("Pallas TPU kernel (tested in interpret mode against the XLA reference; not yet "
                  "timed on a TPU)")


_TPU_HELD_BACK = "not yet measured on a TPU; KernelPolicy(tpu='always') opts in"


register(Impl(name=_TPU_INT8, fn=pallas_tpu.int8_dot_general, backends=frozenset({"tpu"}),
              modes=frozenset({Mode.DYNAMIC, Mode.STATIC}), qtypes=frozenset({QType.INT8}),
              predicate=_tpu_ok, priority=10, note=_tpu_note, held_back=_TPU_HELD_BACK))
register(Impl(name=_TPU_WEIGHT_ONLY, fn=pallas_tpu.weight_only_dot_general,
              backends=frozenset({"tpu"}), modes=frozenset({Mode.WEIGHT_ONLY}),
              qtypes=frozenset(pallas_tpu.INT4_QTYPES), predicate=_tpu_ok, priority=10,
              note=_tpu_note, held_back=_TPU_HELD_BACK))


# ---- Pallas Mosaic GPU kernels (jq.ops.mosaic_wo, jq.ops.mosaic_w8a8) ----------------------------
# Hopper's TMA + wgmma weight-only matmul (prefill tiles, split-K decode) and W8A8 matmul (int8 x
# int8 -> int32 or fp8 x fp8 -> float32, per-token x per-channel rescale in the epilogue), held
# equal to their XLA twins in Mosaic GPU interpret mode on CPU and lowered for CUDA there, but not
# yet compiled or timed on a GPU: dispatch picks them (ahead of the Triton kernels and XLA) only
# under ``KernelPolicy(mosaic="always")`` until benchmarks/gpu_check.py has measured them.

_MOSAIC_HELD_BACK = "not yet measured on a GPU; KernelPolicy(mosaic='always') opts in"


def _mosaic_ok(module):
  def ok(p: Problem) -> bool:
    # (the policy first: Mosaic GPU is imported only when a policy lets the kernel in)
    return p.policy.allows_mosaic() and _compat.has_mosaic_gpu() and _takes(module, p)
  return ok


def _mosaic_note(p: Problem) -> PerfNote:
  return PerfNote("Pallas Mosaic GPU kernel (tested in interpret mode against the XLA reference; "
                  "not yet timed on a GPU)")


register(Impl(name="mosaic_gpu_weight_only", fn=mosaic_wo.weight_only_dot_general,
              backends=frozenset({"gpu"}), modes=frozenset({Mode.WEIGHT_ONLY}),
              qtypes=frozenset(mosaic_wo.SUPPORTED_QTYPES), predicate=_mosaic_ok(mosaic_wo),
              priority=20, note=_mosaic_note, held_back=_MOSAIC_HELD_BACK))
register(Impl(name="mosaic_gpu_w8a8", fn=mosaic_w8a8.w8a8_dot_general,
              backends=frozenset({"gpu"}), modes=frozenset({Mode.DYNAMIC, Mode.STATIC}),
              qtypes=frozenset(mosaic_w8a8.SUPPORTED_QTYPES), predicate=_mosaic_ok(mosaic_w8a8),
              priority=20, note=_mosaic_note, held_back=_MOSAIC_HELD_BACK))
