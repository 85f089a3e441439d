"""The one place where jq meets version-dependent JAX APIs (the version guards).

* ``make_user_context``: ``jax.make_user_context`` (JAX >= 0.8), a context whose value is part of
  the jit cache key; None on older JAX (:mod:`jq.qarray`'s checked mode then falls back to a
  thread-local flag read at trace time).  ``user_context``: the same, or a context variable on
  older JAX (the kernel policy, :mod:`jq.ops.policy`).
* Meshes and several processes (``jq.distributed``, data-parallel calibration): ``auto_mesh``,
  ``set_cpu_collectives``/``cpu_collectives``, ``distributed_initialize``, ``distributed_client``
  with ``kv_set``/``kv_get``/``kv_delete`` (the coordinator's key-value store),
  ``process_allgather``: see their section below.

The Pallas GPU kernels target the *Triton* backend (and Hopper's Mosaic GPU: see the section at the
end) on JAX 0.10.x (CPU development, interpret mode) and 0.11.x (the CUDA image).  Everything
that moved, was renamed or is deprecated across those versions is resolved here once, so kernel
modules import only stable names from this file:

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


class _ContextVarConfig:
  """``user_context``'s stand-in on JAX without ``make_user_context``: a context variable with a
  settable global default (NOT part of the jit cache key there)."""

  def __init__(self, default_value):
    import contextvars  # pylint: disable=import-outside-toplevel
    self._global = default_value
    self._var = contextvars.ContextVar("jq_user_context")

  @property
  def value(self):
    return self._var.get(self._global)

  def set_global(self, value) -> None:
    self._global = value

  def __call__(self, value):
    import contextlib  # pylint: disable=import-outside-toplevel

    @contextlib.contextmanager
    def scope():
      token = self._var.set(value)
      try:
        yield
      finally:
        self._var.reset(token)
    return scope()


def user_context(default_value):
  """A value with ``.value``, ``set_global(v)`` and ``with ctx(v):`` scoping, part of the jit
  cache key where JAX has ``make_user_context`` (so functions traced under another value retrace);
  a context variable elsewhere.  Create these at import time (JAX: not thread-safe to create)."""
  if make_user_context is not None:
    return make_user_context(default_value)
  return _ContextVarConfig(default_value)

def tracing() -> bool:
  """Whether a JAX transformation (jit, grad, vmap, ...) is tracing at this point.  JAX has no
  public test for it; its internal one where present, else True (the careful answer: callers then
  evaluate concrete values at trace time, as under a trace)."""
  try:
    from jax._src import core  # pylint: disable=import-outside-toplevel
    return not core.trace_state_clean()
  except (ImportError, AttributeError):
    return True


_CompilerParams = (getattr(_pltriton, "CompilerParams", None)
                   or getattr(_pltriton, "TritonCompilerParams", None))


def is_mapped(x: Any) -> bool:
  """Whether ``x`` is a value inside a ``vmap`` (a batching tracer; JAX exports no public type
  for it, so its class name, unchanged since JAX 0.1)."""
  return type(x).__name__ == "BatchTracer"


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


# ------------------------------------------------------------------------------------------------
# Meshes and multi-process runs (jq.distributed, data-parallel calibration)
#
# * ``auto_mesh`` (``auto_typed`` for a tree's arrays): the same devices and axis names with every
#   axis of type ``Auto``.  Since JAX
#   0.7 ``jax.make_mesh`` makes *Explicit* axes by default (sharding in types), under which a
#   ``dot_general`` contracting a batch-sharded axis (``XᵀX``) is an error instead of an
#   all-reduce that XLA inserts; calibration places its batches on an ``Auto`` twin of the mesh.
# * ``set_cpu_collectives``: the cross-process CPU collectives (``gloo``) must be chosen before the
#   backend starts: ``jax_cpu_collectives_implementation`` (0.4.31+), else the older boolean
#   ``jax_cpu_enable_gloo_collectives``.
# * ``distributed_initialize``: ``jax.distributed.initialize`` with the timeouts this JAX takes.
# * ``distributed_client``: the coordination-service client of ``jax.distributed`` (its key-value
#   store and barriers, which take timeouts; JAX keeps it in ``jax._src.distributed``).
# * ``kv_set`` / ``kv_get``: bytes in that store (``key_value_set_bytes``/``blocking_key_value_get
#   _bytes``; base64 text through the ``str`` methods where a client has no bytes methods).
# * ``process_allgather``: ``jax.experimental.multihost_utils.process_allgather``.
# ------------------------------------------------------------------------------------------------


def auto_mesh(mesh):
  """``mesh`` with every axis of type ``Auto`` (``mesh`` itself where JAX has no axis types or
  the axes are already ``Auto``)."""
  axis_type = getattr(jax.sharding, "AxisType", None)
  types = getattr(mesh, "axis_types", None)
  if axis_type is None or types is None or all(t == axis_type.Auto for t in types):
    return mesh
  return jax.sharding.Mesh(mesh.devices, mesh.axis_names,
                           axis_types=(axis_type.Auto,) * len(mesh.axis_names))


def auto_typed(tree):
  """``tree`` with every array split on a mesh of non-``Auto`` axes moved to the ``Auto`` twin of
  that mesh (same devices, same PartitionSpec): a model traced on *Explicit*-sharded params
  carries the sharding in its types, and a plain ``reshape`` of a split activation is then an
  error (``ShardingTypeError``) where XLA would otherwise choose the layout."""
  def one(x):
    s = getattr(x, "sharding", None)
    if not isinstance(x, jax.Array) or not isinstance(s, jax.sharding.NamedSharding):
      return x
    auto = auto_mesh(s.mesh)
    if auto is s.mesh:
      return x
    return jax.device_put(x, jax.sharding.NamedSharding(auto, s.spec, memory_kind=s.memory_kind))
  return jax.tree_util.tree_map(one, tree)


def set_cpu_collectives(implementation: str) -> None:
  """Chooses the CPU collectives across processes (``"gloo"``, ``"mpi"`` or ``"none"``); call it
  before the first computation.  (JAX 0.10 takes ``None`` for none, and defaults to gloo.)"""
  try:
    jax.config.update("jax_cpu_collectives_implementation",
                      None if implementation == "none" else implementation)
  except AttributeError:  # pragma: no cover - JAX < 0.4.31
    jax.config.update("jax_cpu_enable_gloo_collectives", implementation == "gloo")


def cpu_collectives() -> str:
  """The configured CPU collectives implementation (``"none"`` when unknown)."""
  return str(getattr(jax.config, "jax_cpu_collectives_implementation", None) or "none")


def distributed_initialize(*, coordinator_address: str, num_processes: int, process_id: int,
                           **optional) -> None:
  """``jax.distributed.initialize``; ``optional`` keyword arguments this JAX does not take (the
  timeouts: ``initialization_timeout``, ``heartbeat_timeout_seconds``) are left out."""
  import inspect  # pylint: disable=import-outside-toplevel
  params = inspect.signature(jax.distributed.initialize).parameters
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             **{k: v for k, v in optional.items() if k in params})


def distributed_client():
  """The ``jax.distributed`` coordination client, or None when ``jax.distributed.initialize``
  has not run (or this JAX keeps it elsewhere)."""
  try:
    from jax._src import distributed as _distributed  # pylint: disable=import-outside-toplevel
  except ImportError:  # pragma: no cover
    return None
  state = getattr(_distributed, "global_state", None)
  return getattr(state, "client", None)


def kv_set(client, key: str, value: bytes) -> None:
  """Stores ``value`` under ``key`` (a key is written once)."""
  if hasattr(client, "key_value_set_bytes"):
    client.key_value_set_bytes(key, value)
  else:  # pragma: no cover - older clients store text only
    import base64  # pylint: disable=import-outside-toplevel
    client.key_value_set(key, base64.b64encode(value).decode("ascii"))


def kv_get(client, key: str, timeout_s: float) -> bytes:
  """The value under ``key``, waiting up to ``timeout_s``; raises ``TimeoutError`` after that."""
  ms = max(1, int(timeout_s * 1000))
  try:
    if hasattr(client, "blocking_key_value_get_bytes"):
      return bytes(client.blocking_key_value_get_bytes(key, ms))
    import base64  # pylint: disable=import-outside-toplevel
    return base64.b64decode(client.blocking_key_value_get(key, ms))  # pragma: no cover
  except Exception as e:  # JaxRuntimeError / XlaRuntimeError: DEADLINE_EXCEEDED
    if "DEADLINE_EXCEEDED" in str(e) or "timed out" in str(e).lower():
      raise TimeoutError(str(e)) from e
    raise


def kv_delete(client, key: str) -> None:
  """Removes ``key`` (no error when it is absent or the client cannot delete)."""
  try:
    client.key_value_delete(key)
  except Exception:  # pylint: disable=broad-except
    pass


def process_allgather(tree):
  """``multihost_utils.process_allgather(tree)``: every process's ``tree`` stacked on a new
  leading axis (in process order), as numpy arrays."""
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return multihost_utils.process_allgather(tree)


# ------------------------------------------------------------------------------------------------
# Pallas TPU (Mosaic) — jq.ops.pallas_tpu
#
# * ``tpu_compiler_params``: ``pltpu.CompilerParams`` (``TPUCompilerParams`` before 0.7).
# * ``tpu_interpret_params``: ``pltpu.InterpretParams()``, the TPU interpreter that runs Mosaic
#   kernels (VMEM scratch, grid semantics) on CPU (``TPUInterpretParams`` in 0.6; plain
#   ``interpret=True``, the generic HLO interpreter, before that).
# * ``tpu_vmem``: a VMEM scratch buffer ``pltpu.VMEM(shape, dtype)``.
# ``jax.experimental.pallas.tpu`` is imported on first use, so ``import jq`` does not pay for it.
# ------------------------------------------------------------------------------------------------


def _pltpu():
  from jax.experimental.pallas import tpu  # pylint: disable=import-outside-toplevel
  return tpu


def on_tpu() -> bool:
  """True when the default JAX backend is a TPU."""
  return jax.default_backend() == "tpu"


def tpu_compiler_params(*, dimension_semantics: tuple[str, ...]) -> Any:
  """Mosaic compiler parameters for ``pl.pallas_call(compiler_params=...)``."""
  tpu = _pltpu()
  cls = getattr(tpu, "CompilerParams", None) or tpu.TPUCompilerParams
  return cls(dimension_semantics=dimension_semantics)


def tpu_interpret_params() -> Any:
  """The ``interpret=`` value that runs a Pallas TPU kernel on CPU."""
  tpu = _pltpu()
  cls = getattr(tpu, "InterpretParams", None) or getattr(tpu, "TPUInterpretParams", None)
  return cls() if cls is not None else True


def tpu_vmem(shape: tuple[int, ...], dtype) -> Any:
  """A VMEM scratch buffer of ``shape`` and ``dtype`` (for ``scratch_shapes``)."""
  tpu = _pltpu()
  vmem = getattr(tpu, "VMEM", None) or tpu.TPUMemorySpace.VMEM
  return vmem(shape, dtype)


# ------------------------------------------------------------------------------------------------
# Pallas Mosaic GPU (Hopper: TMA, wgmma) — jq.ops.mosaic_wo, jq.ops.mosaic_w8a8
#
# * ``mosaic_gpu``: ``jax.experimental.pallas.mosaic_gpu`` (plgpu), imported on first use.
# * ``gpu_interpret_params``: the ``interpret=`` value that runs a Mosaic GPU kernel on CPU,
#   simulating shared memory, TMA, barriers and wgmma (``InterpretGPUParams``: private in 0.10,
#   ``jax._src.pallas.mosaic_gpu.interpret.params``; public names are tried first).
# * ``has_mosaic_gpu``: whether this JAX has both (the kernel is not registered otherwise).
# ------------------------------------------------------------------------------------------------


def mosaic_gpu() -> Any:
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=import-outside-toplevel
  return plgpu


def _gpu_interpret_cls() -> Any:
  plgpu = mosaic_gpu()
  for name in ("InterpretParams", "InterpretGPUParams"):
    if (cls := getattr(plgpu, name, None)) is not None:
      return cls
  from jax._src.pallas.mosaic_gpu.interpret import params  # pylint: disable=import-outside-toplevel
  return params.InterpretGPUParams


def gpu_interpret_params() -> Any:
  """The ``interpret=`` value that runs a Mosaic GPU kernel on CPU."""
  return _gpu_interpret_cls()()


@functools.lru_cache(maxsize=None)
def has_mosaic_gpu() -> bool:
  """Whether this JAX has Pallas Mosaic GPU with ``emit_pipeline``, ``wgmma`` and its
  interpreter (JAX >= 0.10)."""
  try:
    plgpu = mosaic_gpu()
    _gpu_interpret_cls()
  except ImportError:
    return False
  return all(hasattr(plgpu, n) for n in ("emit_pipeline", "wgmma", "kernel", "ACC"))
