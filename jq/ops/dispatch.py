"""Public quantized contractions and the registry that picks their implementation.

``dot_general(x, w, dimension_numbers)`` / ``einsum(subscripts, x, w)`` / ``matmul(x, w)`` mirror
``jax.lax.dot_general`` / ``jnp.einsum`` / ``jnp.matmul`` with a float ``x`` and a :class:`QArray`
``w`` on the right.  The mode is read from ``w``: ``w.activation is None`` -> weight-only,
otherwise int8 activations (dynamic or static).

Gradients: weight-only contractions are differentiated as they compute; with quantized
activations :func:`dot_general` runs the chosen implementation forward and differentiates it with
the straight-through estimator of :mod:`jq.ops.ste` (as the weight-only road on the unquantized
input), so no implementation needs a derivative of its own.

Invariant: every registered implementation computes the same function as its reference in
``jq.ops.reference`` (tests hold them together).  Choice happens at trace time from static facts
only (backend, mode, qtype, shapes, tiles, and the kernel policy: a value, see
:mod:`jq.ops.policy`), so it never causes recompilation, and a new policy is a new trace.

Registering a kernel (the predicate sees a static :class:`Problem`, including ``p.w``)::

  register(Impl(name="pallas_gpu_weight_only", fn=pallas_wo.weight_only_dot_general,
                backends=frozenset({"gpu"}), modes=frozenset({Mode.WEIGHT_ONLY}),
                predicate=lambda p: p.out_sharding is None and pallas_wo.unsupported_reason(
                    p.x_shape, p.x_dtype, p.w, p.layout.dimension_numbers) is None,
                priority=10))
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import re
import string
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jq.ops import reference, ste
from jq.ops.policy import KernelPolicy, current
from jq.qarray import QArray
from jq.qtypes import QType
from jq.spec import ActMode

DotGeneralFn = Callable[..., jax.Array]


class Mode(enum.Enum):
  """How a quantized contraction runs: float activations, or int8 activations (dynamic/static)."""
  WEIGHT_ONLY = "weight_only"
  DYNAMIC = "int8_dynamic"
  STATIC = "int8_static"


def mode_of(w: QArray) -> Mode:
  """The mode a QArray asks for (``w.activation`` None -> weight-only)."""
  if w.activation is None:
    return Mode.WEIGHT_ONLY
  return Mode.STATIC if w.activation.spec.mode is ActMode.STATIC else Mode.DYNAMIC


@dataclasses.dataclass(frozen=True)
class Problem:
  """Static description of one contraction, what predicates and explanations look at.

  Attributes:
    name: the parameter path (for messages).
    backend: ``jax.default_backend()`` or the one asked for ("cpu", "gpu", "tpu").
    mode: see :class:`Mode`.
    qtype: the weight's element type.
    x_dtype: activation dtype.
    layout: normalized dimension numbers.
    x_shape, w_shape, w_tile: operand shapes and the weight's tile.
    m, k, n: rows (tokens, incl. batch axes), contracted length, output columns.
    grouped: more than one scale along some contracting axis (group quantization).
    asymmetric: the weight has a zero point.
    w: the QArray itself (its array fields may be tracers: read only shapes and static fields).
    out_sharding: the ``out_sharding`` the caller asked for (kernels may refuse non-None).
    policy: the :class:`~jq.ops.policy.KernelPolicy` this contraction is traced under (kernel
      predicates read it).
  """
  name: str
  backend: str
  mode: Mode
  qtype: QType
  x_dtype: np.dtype
  layout: reference.DotLayout
  x_shape: tuple[int, ...]
  w_shape: tuple[int, ...]
  w_tile: tuple[int, ...]
  m: int
  k: int
  n: int
  grouped: bool
  asymmetric: bool
  w: QArray = dataclasses.field(compare=False, repr=False, default=None)
  out_sharding: Any = dataclasses.field(compare=False, repr=False, default=None)
  policy: KernelPolicy = KernelPolicy()


@dataclasses.dataclass(frozen=True)
class PerfNote:
  """What to expect from an implementation on a problem, relative to the float matmul."""
  text: str
  slower_than_float: bool = False


@dataclasses.dataclass(frozen=True)
class Impl:
  """One implementation: where it runs and which problems it accepts.

  Attributes:
    name: unique name shown by ``jq.explain``.
    fn: ``fn(x, w, dimension_numbers, precision, preferred_element_type, *, out_sharding)``.
    modes: the modes it implements.
    backends: backends it runs on (None: any).
    qtypes: weight element types it accepts (None: any).
    predicate: further static conditions on the :class:`Problem` (shapes, tiles, dtypes).
    priority: the highest-priority accepting impl wins; later registration wins ties.
    note: optional :class:`PerfNote` for a problem (``jq.explain`` prints it and warns when the
      layer is expected to run slower than float).
    held_back: for kernels the default policy keeps off, why and how to opt in; the route of a
      problem it would accept under an open policy says so in its note.
  """
  name: str
  fn: DotGeneralFn
  modes: frozenset[Mode]
  backends: frozenset[str] | None = None
  qtypes: frozenset[QType] | None = None
  predicate: Callable[[Problem], bool] = lambda p: True
  priority: int = 0
  note: Callable[[Problem], "PerfNote | None"] | None = None
  held_back: str = ""

  def accepts(self, p: Problem) -> bool:
    return (p.mode in self.modes and (self.backends is None or p.backend in self.backends)
            and (self.qtypes is None or p.qtype in self.qtypes) and bool(self.predicate(p)))


@dataclasses.dataclass(frozen=True)
class Choice:
  """The implementation chosen for a problem, with its performance note."""
  name: str
  impl: Impl
  problem: Problem
  note: PerfNote | None


_REGISTRY: list[Impl] = []


def register(impl: Impl) -> Impl:
  """Adds (or replaces, by name) an implementation; returns it."""
  unregister(impl.name)
  _REGISTRY.append(impl)
  return impl


def unregister(name: str) -> None:
  """Removes the implementation called ``name`` (no error if absent)."""
  _REGISTRY[:] = [i for i in _REGISTRY if i.name != name]


def registered() -> tuple[Impl, ...]:
  return tuple(_REGISTRY)


_INT8_TYPES = (QType.INT8, QType.UINT8)


def make_problem(x, w: QArray, dimension_numbers, *, backend: str | None = None,
                 name: str | None = None, out_sharding=None,
                 policy: KernelPolicy | None = None) -> Problem:
  """Validates a contraction and describes it (ValueError naming ``name``, shapes and dtypes);
  ``policy`` defaults to the current one (:func:`jq.ops.policy.current`)."""
  name = name or "<dot_general>"
  if not isinstance(w, QArray):
    raise ValueError(f"{name}: rhs must be a jq.QArray, got {type(w).__name__}; "
                     "use jax.lax.dot_general for float operands")
  x_dtype = np.dtype(getattr(x, "dtype", np.float32))
  if not jnp.issubdtype(x_dtype, jnp.floating):
    raise ValueError(f"{name}: lhs shape {tuple(np.shape(x))} dtype {x_dtype}: activations must be "
                     "floating point")
  w.validate(name)
  lay = reference.DotLayout.make(dimension_numbers, np.shape(x), w.shape, name=name)
  mode = mode_of(w)
  where = (f"{name}: QArray(qtype={w.qtype.value}, shape={w.shape}, tile={w.tile}) with lhs "
           f"shape {tuple(np.shape(x))} dtype {x_dtype}")
  grouped = not reference.scales_factor_out(w, lay.wc)
  if mode is not Mode.WEIGHT_ONLY:
    a_qtype = w.activation.spec.qtype
    if a_qtype.is_float and w.qtype is not a_qtype:
      raise ValueError(f"{where}: {a_qtype.value} activations need {a_qtype.value} weights; "
                       "quantize this layer weight-only (activation=None) or with an fp8 spec")
    if not a_qtype.is_float and w.qtype not in _INT8_TYPES:
      raise ValueError(f"{where}: int8 activations need 8-bit integer weights; quantize this "
                       "layer weight-only (activation=None) or with an 8-bit spec")
    if grouped:
      raise ValueError(f"{where}: {a_qtype.value} activations need one weight scale along the "
                       f"contracting axes {lay.wc} (group scales do not factor out of the dot); "
                       "use per-channel weights or weight-only mode for this layer")
    if mode is Mode.STATIC and not w.activation.spec.symmetric and w.activation.zero_point is None:
      raise ValueError(f"{where}: static asymmetric activations need a calibrated zero point")
    if mode is Mode.STATIC and np.shape(w.activation.scale) != ():
      raise ValueError(f"{where}: static activation scale must be a scalar (per tensor), got "
                       f"shape {np.shape(w.activation.scale)}")
  shape = tuple(np.shape(x))
  m = int(np.prod([shape[a] for a in range(len(shape)) if a not in lay.xc], dtype=np.int64))
  k = int(np.prod([w.shape[a] for a in lay.wc], dtype=np.int64))
  n = int(np.prod([w.shape[a] for a in lay.w_free], dtype=np.int64))
  return Problem(name=name, backend=backend or jax.default_backend(), mode=mode, qtype=w.qtype,
                 x_dtype=x_dtype, layout=lay, x_shape=shape, w_shape=w.shape, w_tile=w.tile,
                 m=m, k=k, n=n, grouped=grouped, asymmetric=w.zero_point is not None, w=w,
                 out_sharding=out_sharding,
                 policy=current() if policy is None else KernelPolicy.parse(policy))


def route(x, w: QArray, dimension_numbers, *, backend: str | None = None,
          name: str | None = None, out_sharding=None,
          policy: KernelPolicy | None = None) -> Choice:
  """The :class:`Choice` for a contraction (highest priority accepting impl) under ``policy``
  (default: the current one)."""
  p = make_problem(x, w, dimension_numbers, backend=backend, name=name, out_sharding=out_sharding,
                   policy=policy)
  best = None
  for impl in _REGISTRY:
    if impl.accepts(p) and (best is None or impl.priority >= best.priority):
      best = impl
  if best is None:
    raise ValueError(f"{p.name}: no implementation for mode {p.mode.value}, qtype "
                     f"{p.qtype.value}, backend {p.backend} (registered: "
                     f"{[i.name for i in _REGISTRY]})")
  note = best.note(p) if best.note else None
  opened = dataclasses.replace(p, policy=KernelPolicy.open())
  for impl in _REGISTRY:
    if impl.held_back and impl.priority > best.priority and impl.accepts(opened):
      text = (f"{impl.name} accepts this problem, but the kernel policy keeps it off: "
              f"{impl.held_back}")
      note = PerfNote(text if note is None else f"{note.text}; {text}",
                      note is not None and note.slower_than_float)
  return Choice(best.name, best, p, note)


def choose(x, w: QArray, dimension_numbers, *, backend: str | None = None,
           name: str | None = None, out_sharding=None,
           policy: KernelPolicy | None = None) -> tuple[str, DotGeneralFn]:
  """``(name, fn)`` of the implementation that :func:`dot_general` would call."""
  c = route(x, w, dimension_numbers, backend=backend, name=name, out_sharding=out_sharding,
            policy=policy)
  return c.name, c.impl.fn


def dot_general(lhs: ArrayLike, rhs: QArray, dimension_numbers, precision=None,
                preferred_element_type=None, *, out_sharding=None,
                name: str | None = None, policy: KernelPolicy | None = None) -> jax.Array:
  """``lax.dot_general(lhs, dequantize(rhs), ...)``, computed quantized (see module docstring).

  With quantized activations (``rhs.activation`` set) the gradient with respect to ``lhs`` is the
  straight-through estimator's (:mod:`jq.ops.ste`): that of ``lax.dot_general(lhs,
  dequantize(rhs))``, zero where a static activation scale clips ``lhs``; ``rhs`` gets none.

  Args:
    lhs: float activations.
    rhs: the quantized weight; ``rhs.activation`` selects int8 dynamic/static activations.
    dimension_numbers: ``((lhs_contract, rhs_contract), (lhs_batch, rhs_batch))``.
    precision: passed to float dots.
    preferred_element_type: output dtype (default ``lhs.dtype``); accumulation is float32/int32.
    out_sharding: passed to the underlying ``lax.dot_general``.
    name: the parameter path used in error messages.
    policy: the :class:`~jq.ops.policy.KernelPolicy` (default: the current one).  It is read
      while tracing; under ``jax.jit`` pass it from outside the traced function (a closure or a
      static argument) or use ``with jq.ops.kernel_policy(p)`` (part of the jit cache key).

  Example:
    >>> y = dot_general(x, qw, (((1,), (0,)), ((), ())))      # x (M, K) @ qw (K, N)
  """
  lhs = jnp.asarray(lhs)
  _, fn = choose(lhs, rhs, dimension_numbers, name=name, out_sharding=out_sharding,
                 policy=policy)
  if mode_of(rhs) is Mode.WEIGHT_ONLY:
    return fn(lhs, rhs, dimension_numbers, precision, preferred_element_type,
              out_sharding=out_sharding)
  # Quantized activations: the chosen impl runs forward; the gradient is the straight-through
  # estimator's, that of the XLA weight-only road (jq.ops.ste).
  def call(impl, x, w):
    return impl(x, w, dimension_numbers, precision, preferred_element_type,
                out_sharding=out_sharding)

  return ste.straight_through(functools.partial(call, fn),
                              functools.partial(call, reference.weight_only_dot_general), lhs, rhs)


def matmul(x: ArrayLike, w: QArray, *, precision=None, preferred_element_type=None,
           name: str | None = None, policy: KernelPolicy | None = None) -> jax.Array:
  """``x[..., K] @ w[K, N]`` for a rank-2 QArray ``w``."""
  x = jnp.asarray(x)
  if not isinstance(w, QArray) or w.ndim != 2:
    raise ValueError(f"{name or '<matmul>'}: matmul needs a rank-2 QArray rhs, got "
                     f"{getattr(w, 'shape', type(w).__name__)}; use dot_general or einsum")
  if x.ndim < 1:
    raise ValueError(f"{name or '<matmul>'}: lhs must have rank >= 1, got shape {x.shape}")
  return dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision, preferred_element_type,
                     name=name, policy=policy)


@dataclasses.dataclass(frozen=True)
class EinsumPlan:
  """An explicit two-operand einsum as ``sum over lhs-only axes -> dot_general -> transpose``."""
  lhs_sum_axes: tuple[int, ...]
  dimension_numbers: tuple
  out_perm: tuple[int, ...]


def parse_einsum(subscripts: str, x_ndim: int, w_ndim: int, *, name: str = "<einsum>"
                 ) -> EinsumPlan:
  """Translates ``'lhs,rhs->out'`` into :class:`EinsumPlan` (``...`` allowed in lhs and out).

  Letters in both operands and the output are batch axes, in both operands only contracting axes;
  lhs letters missing from the output are summed first.  Rhs letters must appear in the output or
  the lhs (a quantized operand is never summed on its own).
  """
  if not isinstance(subscripts, str):
    raise ValueError(f"{name}: einsum subscripts must be a string like 'btd,df->btf', got "
                     f"{type(subscripts).__name__} {subscripts!r}")
  eq = subscripts.replace(" ", "")
  if "->" not in eq or eq.count(",") != 1:
    raise ValueError(f"{name}: einsum {subscripts!r} must be explicit with two operands, "
                     "like 'btd,df->btf'")
  ins, out = eq.split("->")
  xs, ws = ins.split(",")
  if "..." in ws:
    raise ValueError(f"{name}: einsum {subscripts!r}: '...' is not supported on the quantized rhs")
  used = set(c for c in eq if c.isalpha())
  spare = [c for c in string.ascii_letters if c not in used]
  if "..." in xs:
    n_ell = x_ndim - (len(xs) - 3)
    if n_ell < 0:
      raise ValueError(f"{name}: einsum {subscripts!r} does not fit lhs rank {x_ndim}")
    ell = "".join(spare[:n_ell])
    xs = xs.replace("...", ell)
    out = out.replace("...", ell)
  if "..." in out:
    raise ValueError(f"{name}: einsum {subscripts!r}: '...' in the output but not the lhs")
  for s in (xs, ws, out):
    if not re.fullmatch(r"[A-Za-z]*", s) or len(set(s)) != len(s):
      raise ValueError(f"{name}: einsum {subscripts!r}: each operand needs distinct letters "
                       "(traces/diagonals are not supported)")
  if len(xs) != x_ndim or len(ws) != w_ndim:
    raise ValueError(f"{name}: einsum {subscripts!r} does not fit operand ranks ({x_ndim}, "
                     f"{w_ndim})")
  bad = [c for c in ws if c not in out and c not in xs]
  if bad or any(c not in xs and c not in ws for c in out):
    raise ValueError(f"{name}: einsum {subscripts!r}: rhs-only summed axes {bad} or unknown "
                     "output letters are not supported")
  lhs_sum = tuple(i for i, c in enumerate(xs) if c not in ws and c not in out)
  xs2 = "".join(c for c in xs if c in ws or c in out)
  batch = [c for c in xs2 if c in ws and c in out]
  contract = [c for c in xs2 if c in ws and c not in out]
  dims = ((tuple(xs2.index(c) for c in contract), tuple(ws.index(c) for c in contract)),
          (tuple(xs2.index(c) for c in batch), tuple(ws.index(c) for c in batch)))
  dot_out = batch + [c for c in xs2 if c not in ws] + [c for c in ws if c not in xs2]
  return EinsumPlan(lhs_sum, dims, tuple(dot_out.index(c) for c in out))


def einsum(subscripts: str, x: ArrayLike, w: QArray, *, precision=None,
           preferred_element_type=None, name: str | None = None,
           policy: KernelPolicy | None = None) -> jax.Array:
  """``jnp.einsum(subscripts, x, dequantize(w))`` computed quantized via :func:`dot_general`.

  Example:
    >>> y = einsum("btd,dhk->bthk", x, q_proj)
  """
  x = jnp.asarray(x)
  if not isinstance(w, QArray):
    raise ValueError(f"{name or '<einsum>'}: rhs must be a jq.QArray, got {type(w).__name__}; "
                     "use jnp.einsum for float operands")
  plan = parse_einsum(subscripts, x.ndim, len(w.shape), name=name or "<einsum>")
  if plan.lhs_sum_axes:
    x = jnp.sum(x, axis=plan.lhs_sum_axes)
  y = dot_general(x, w, plan.dimension_numbers, precision, preferred_element_type, name=name,
                  policy=policy)
  return jnp.transpose(y, plan.out_perm) if plan.out_perm != tuple(range(y.ndim)) else y


# ---- the XLA reference implementations (lowest priority; accept every valid problem) ----------

_SUB_BYTE = frozenset(q for q in QType if q.bits < 8)


# Measured on this project's 2-core x86 CPU (K = N = 2048, float32, jit): weight-only int8
# 3.7 ms vs 2.0 ms float32 at M=1, 34 vs 31 ms at M=512; dynamic int8 4.3 ms / 33 ms.
_CPU_SMALL_M = 64


def _reference_weight_only_note(p: Problem) -> PerfNote | None:
  if p.backend == "cpu":
    if p.m < _CPU_SMALL_M:
      return PerfNote("CPU/XLA reference: about 0.5x float32 speed at decode sizes (convert + "
                      "dot); the gain is memory only", True)
    return PerfNote("CPU/XLA reference: about float32 speed at large M; the gain is memory only")
  if p.backend == "gpu" and (p.grouped or p.qtype in _SUB_BYTE) and p.m >= 64:
    return PerfNote("XLA dequantizes the sub-byte/group weight before the dot: ~0.4x bf16 at "
                    "large M on GPU; register a Pallas kernel or use int8 per-channel", True)
  if p.grouped:
    return PerfNote("XLA reference dequantizes group scales inside the dot operand (no fused "
                    "kernel registered; speed unmeasured)")
  return None


def _reference_int8_note(p: Problem) -> PerfNote | None:
  if p.backend == "cpu":
    if p.m < _CPU_SMALL_M:
      return PerfNote("CPU/XLA reference: int8 dot about 0.5x float32 speed at decode sizes "
                      "(activation quantization + int dot)", True)
    return PerfNote("CPU/XLA reference: int8 dot about float32 speed at large M")
  return None


REFERENCE_WEIGHT_ONLY = register(Impl(
    name="xla_reference_weight_only", fn=reference.weight_only_dot_general,
    modes=frozenset({Mode.WEIGHT_ONLY}), priority=-100, note=_reference_weight_only_note))
REFERENCE_INT8 = register(Impl(
    name="xla_reference_int8", fn=reference.int8_dot_general,
    modes=frozenset({Mode.DYNAMIC, Mode.STATIC}), qtypes=frozenset(_INT8_TYPES), priority=-100,
    note=_reference_int8_note))


def _reference_fp8_note(p: Problem) -> PerfNote | None:
  if p.backend == "gpu":
    return PerfNote("XLA fp8 x fp8 dot (float32 result; tensor cores on H100-class GPUs) after "
                    "quantizing the activations to fp8")
  return PerfNote("XLA reference: fp8 values upcast to float32 for an exact emulated dot (speed "
                  "unmeasured); the gain is memory only")


REFERENCE_FP8 = register(Impl(
    name="xla_reference_fp8", fn=reference.fp8_dot_general,
    modes=frozenset({Mode.DYNAMIC, Mode.STATIC}), qtypes=frozenset({QType.FP8_E4M3}),
    priority=-100, note=_reference_fp8_note))
