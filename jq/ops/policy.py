"""The kernel policy: which registered kernels dispatch may pick, as a frozen value.

Dispatch reads the policy while it traces, so the policy must be part of what a jitted function
was traced with.  It is, in two ways:

* passed explicitly: ``jq.nn.quantized_apply(model, policy=...)``,
  ``jq.nn.quantize_module(model, q, policy=...)``, ``jq.ops.dot_general(..., policy=...)``,
  ``jq.explain(..., policy=...)``;
* or the *current* policy: ``with jq.ops.kernel_policy(p):`` for a block, and
  ``jq.ops.kernels.enable(...)`` for the process default (``JQ_PALLAS`` at import).  The current
  policy is a ``jax.make_user_context`` value (a version guard in ``jq._compat``), which JAX adds
  to the jit cache key: a function jitted under one policy is retraced under another, instead of
  silently keeping the kernel it chose first.

Example:
  >>> fast = jq.nn.quantized_apply(model, policy=jq.KernelPolicy(pallas="always"))
  >>> ref = jq.nn.quantized_apply(model, policy=jq.KernelPolicy(pallas="never"))
  >>> with jq.ops.kernel_policy(jq.KernelPolicy(pallas="never")):
  ...   y = jax.jit(qapply)(qvars, tokens)          # XLA reference paths only
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator

from jq import _compat

# Measured on an H100 (benchmarks/results/gpu_h100.md): the Pallas weight-only kernel is ahead of
# both bf16 and XLA's dequant path for 4-bit weights up to 16 rows and 8-bit weights up to 4.
AUTO_MAX_M_INT4 = 16
AUTO_MAX_M_INT8 = 4

PALLAS_CHOICES = ("auto", "always", "never")
TPU_CHOICES = ("never", "always")
MOSAIC_CHOICES = ("never", "always")
_ENV_ALIASES = {"1": "always", "0": "never", "true": "always", "false": "never", "on": "always",
                "off": "never"}


@dataclasses.dataclass(frozen=True)
class KernelPolicy:
  """Which kernels dispatch may choose (hashable: part of a trace's identity).

  Attributes:
    pallas: ``"auto"`` (the Pallas GPU kernels only where they were measured faster: weight-only
      4-bit at ``<= max_m_int4`` rows, 8-bit at ``<= max_m_int8``; W8A8 stays on XLA's int8 dot),
      ``"always"`` (every problem a kernel accepts; what ``benchmarks/gpu_check.py`` tests) or
      ``"never"`` (XLA reference paths only).
    max_m_int4, max_m_int8: the ``auto`` row limits.
    tpu: the Pallas TPU kernels: ``"never"`` (the default: they are tested in interpret mode but
      not yet measured on a TPU, so XLA's paths run there) or ``"always"`` (every problem they
      accept; for measuring them).
    mosaic: the Pallas Mosaic GPU (Hopper) kernels: ``"never"`` (the default until
      ``benchmarks/gpu_check.py`` has measured them on a GPU) or ``"always"`` (every problem they
      accept, ahead of the Triton kernels).
  """
  pallas: str = "auto"
  max_m_int4: int = AUTO_MAX_M_INT4
  max_m_int8: int = AUTO_MAX_M_INT8
  tpu: str = "never"
  mosaic: str = "never"

  def __post_init__(self):
    if self.pallas not in PALLAS_CHOICES:
      raise ValueError(f"KernelPolicy(pallas={self.pallas!r}): expected one of {PALLAS_CHOICES}")
    if self.tpu not in TPU_CHOICES:
      raise ValueError(f"KernelPolicy(tpu={self.tpu!r}): expected one of {TPU_CHOICES}")
    if self.mosaic not in MOSAIC_CHOICES:
      raise ValueError(f"KernelPolicy(mosaic={self.mosaic!r}): expected one of {MOSAIC_CHOICES}")
    for f in ("max_m_int4", "max_m_int8"):
      v = getattr(self, f)
      if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"KernelPolicy({f}={v!r}): expected an int >= 0")

  @classmethod
  def parse(cls, value: "KernelPolicy | bool | str") -> "KernelPolicy":
    """A policy from a policy, a bool (always/never) or a name (also ``JQ_PALLAS``'s 1/0)."""
    if isinstance(value, KernelPolicy):
      return value
    if isinstance(value, bool):
      return cls("always" if value else "never")
    if isinstance(value, str):
      v = value.strip().lower() or "auto"
      return cls(_ENV_ALIASES.get(v, v))
    raise ValueError(f"kernel policy {value!r}: expected a jq.KernelPolicy, a bool or one of "
                     f"{PALLAS_CHOICES}")

  @classmethod
  def from_env(cls) -> "KernelPolicy":
    """The policy ``JQ_PALLAS`` asks for (``auto`` when unset)."""
    raw = os.environ.get("JQ_PALLAS", "auto")
    try:
      return cls.parse(raw)
    except ValueError as e:
      raise ValueError(f"JQ_PALLAS={raw!r}: expected one of {PALLAS_CHOICES} (or 1/0)") from e

  @classmethod
  def open(cls) -> "KernelPolicy":
    """Every kernel allowed (what dispatch compares against to say which ones a policy keeps
    off)."""
    return cls(pallas="always", tpu="always", mosaic="always")

  def allows_weight_only(self, m: int, storage_bits: int) -> bool:
    """May a Pallas weight-only kernel run a problem of ``m`` rows?"""
    if self.pallas == "auto":
      return m <= (self.max_m_int4 if storage_bits == 4 else self.max_m_int8)
    return self.pallas == "always"

  def allows_tpu(self) -> bool:
    """May a Pallas TPU kernel run?"""
    return self.tpu == "always"

  def allows_mosaic(self) -> bool:
    """May a Pallas Mosaic GPU kernel run?"""
    return self.mosaic == "always"

  def allows_w8a8(self) -> bool:
    """May a Pallas int8-activation kernel run?  (``auto``: no, XLA's int8 dot was faster.)"""
    return self.pallas == "always"


_CURRENT = _compat.user_context(KernelPolicy.from_env())


def current() -> KernelPolicy:
  """The policy in effect here: the innermost :func:`kernel_policy`, else the process default."""
  return _CURRENT.value


@contextlib.contextmanager
def kernel_policy(policy: "KernelPolicy | bool | str") -> Iterator[KernelPolicy]:
  """Runs (and traces) the block under ``policy``; jitted functions retrace for it."""
  p = KernelPolicy.parse(policy)
  with _CURRENT(p):
    yield p


def maybe_policy(policy: "KernelPolicy | bool | str | None"):
  """:func:`kernel_policy` for a given policy, a no-op context for None."""
  return contextlib.nullcontext() if policy is None else kernel_policy(policy)


def set_default(policy: "KernelPolicy | bool | str") -> KernelPolicy:
  """Sets the process default (what :func:`current` returns outside any :func:`kernel_policy`)."""
  p = KernelPolicy.parse(policy)
  _CURRENT.set_global(p)
  return p


__all__ = ["KernelPolicy", "current", "kernel_policy", "maybe_policy", "set_default",
           "AUTO_MAX_M_INT4", "AUTO_MAX_M_INT8", "PALLAS_CHOICES", "TPU_CHOICES",
           "MOSAIC_CHOICES"]
