"""The one place where jq meets version-dependent JAX APIs (the version guards).

* ``make_user_context``: ``jax.make_user_context`` (JAX >= 0.8), a context whose value is part of
  the jit cache key; None on older JAX (:mod:`jq.qarray`'s checked mode then falls back to a
  thread-local flag read at trace time).

The Pallas kernels target the Pallas GPU *Triton* backend on JAX 0.10.x (CPU development, interpret mode)
and 0.11.x (the CUDA image).  Everything that moved, was renamed or is deprecated across those
versions is resolved here once, so kernel modules import only stable names from this file:

* ``triton_params``: ``jax.experimental.pallas.triton.CompilerParams`` (``TritonCompilerParams``
  before 0.7).  Passing it explicitly also pins the Triton backend, whatever the default GPU
  backend of the installed JAX is (``jax_pallas_use_mosaic_gpu``).
* ``load`` / ``store``: masked loads and stores (``plgpu.load``; ``pl.load`` in old releases).
* ``cdiv`` / ``next_pow2``: small integer helpers (``pl.cdiv`` exists everywhere; we keep local
  copies so a removal upstream cannot break us).
* ``on_gpu`` / ``num_sms``: device queries used for default block sizes and test skipping.

``pl.dot`` is deprecated in 0.10 and not used: kernels call ``jnp.dot``.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
from jax.experimental import pallas as pl

try:  # the Triton-specific Pallas module (present in 0.4.31+)
  from jax.experimental.pallas import triton as _pltriton
except ImportError:  # pragma: no cover - very old JAX
  _pltriton = None

JAX_VERSION: tuple[int, ...] = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())

make_user_context = getattr(jax, "make_user_context", None)

_CompilerParams = (getattr(_pltriton, "CompilerParams", None)
                   or getattr(_pltriton, "TritonCompilerParams", None))


def triton_params(*, num_warps: int | None = None, num_stages: int | None = None) -> Any:
  """Triton compiler parameters for ``pl.pallas_call(compiler_params=...)``."""
  if _CompilerParams is None:  # pragma: no cover - very old JAX took a dict
    return dict(triton=dict(num_warps=num_warps, num_stages=num_stages))
  return _CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _resolve(name: str):
  """``plgpu.<name>``, else the old ``pl.<name>``; a stub that raises on use if neither exists
  (so importing jq never fails because a kernel helper moved)."""
  fn = getattr(_pltriton, name, None) if _pltriton is not None else None
  fn = fn if fn is not None else getattr(pl, name, None)
  if fn is None:
    def missing(*args, **kwargs):
      raise NotImplementedError(f"jax {jax.__version__} has neither "
                                f"jax.experimental.pallas.triton.{name} nor pallas.{name}; "
                                "update jq/_compat.py")
    return missing
  return fn


_load = _resolve("load")
_store = _resolve("store")


def load(ref, *, mask=None, other=None):
  """Masked load of ``ref`` (a ``ref.at[...]`` view); lanes with ``mask`` False read ``other``.

  Always pass ``other`` with a mask: interpret mode fills out-of-bounds lanes with garbage (NaN /
  int min) and only replaces them when ``other`` is given; on GPU, masked lanes are undefined.
  """
  if mask is None:
    return _load(ref)
  return _load(ref, mask=mask, other=other)


def store(ref, value, *, mask=None) -> None:
  """Masked store of ``value`` into ``ref`` (a ``ref.at[...]`` view)."""
  if mask is None:
    _store(ref, value)
  else:
    _store(ref, value, mask=mask)


def cdiv(a: int, b: int) -> int:
  """``ceil(a / b)`` for non-negative Python ints."""
  return -(-a // b)


def next_pow2(n: int) -> int:
  """Smallest power of two ``>= n`` (1 for ``n <= 1``)."""
  return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


# Shared memory a Triton program may use on sm_90 is 227 KiB (232448 bytes); keep headroom for
# the layout-conversion buffers Triton adds and for the scale tiles.
SMEM_BUDGET = 192 * 1024


def fit_stages(per_stage: int, fixed: int, stages: int, budget: int = SMEM_BUDGET) -> int:
  """The largest software-pipelining depth ``<= stages`` (and >= 1) whose shared-memory estimate
  ``stages * per_stage + fixed`` fits ``budget`` (a GPU run hit the 227 KiB limit with
  ``block_m=64, block_k=256`` and 4 stages)."""
  while stages > 1 and stages * per_stage + fixed > budget:
    stages -= 1
  return stages


def on_gpu() -> bool:
  """True when the default JAX backend is an (NVIDIA or AMD) GPU."""
  try:
    return jax.devices()[0].platform == "gpu"
  except RuntimeError:  # pragma: no cover
    return False


@functools.lru_cache(maxsize=None)
def num_sms(default: int = 132) -> int:
  """Streaming-multiprocessor count of GPU 0 (``default``, an H100's, when unknown)."""
  if not on_gpu():
    return default
  return int(getattr(jax.devices()[0], "core_count", None) or default)


def default_interpret() -> bool:
  """Interpret mode is the only way to run Pallas on CPU: the default off a GPU."""
  return not on_gpu()
