"""QArray: a quantized array as plain pytree data.

``x ≈ (unpack(values) − zero_point) · expand(scale)``, or ``table[unpack(values)] · expand(scale)``
for NF4, or ``float32(values) · expand(scale)`` for float8 e4m3 (one byte per value).  ``values``
holds packed storage (two int4 / four int2 per byte, eight int3 per three bytes, along the last
axis); ``scale`` and ``zero_point`` have the logical rank with ``ceil(shape[i] / tile[i])``
entries per axis.  ``qtype``, ``shape`` and ``tile`` are static (hashable) metadata.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jq import _compat, numerics
from jq.qtypes import QType
from jq.spec import ActivationSpec


# ---- value checks: eager on concrete arrays, opt-in under jit ------------------------------------
# ``jax.make_user_context`` (JAX >= 0.8) is part of the jit cache key, so a function traced inside
# :func:`checked` is retraced (with checks) and one traced outside keeps no checks.  Older JAX: a
# plain flag, read at trace time.
_MAKE_CONTEXT = _compat.make_user_context
_CHECKS = _MAKE_CONTEXT(False) if _MAKE_CONTEXT is not None else None
_LOCAL = threading.local()
_FAILURES: list[str] = []  # messages of failed checks raised inside jax.debug.callback
_FAILURES_LOCK = threading.Lock()


def checks_enabled() -> bool:
  """True inside :func:`checked` (value checks are then also staged into traced code)."""
  if _CHECKS is not None:
    return bool(_CHECKS.value)
  return bool(getattr(_LOCAL, "checks", False))


@contextlib.contextmanager
def checked():
  """Opt-in value checks under ``jax.jit`` (and other transformations).

  Eagerly (concrete arrays) jq always checks values: non-finite or too-large inputs to
  ``quantize``/``compute_params``, invalid scales, zero points and codes of a QArray, static
  activation scales.  Under ``jit`` the inputs are tracers and those checks are skipped (no cost).
  Inside ``with jq.qarray.checked():`` functions traced there get the same checks as
  ``jax.debug.callback`` s; a failing one raises ``ValueError`` (with the eager message) when the
  ``with`` block ends (``jax.effects_barrier`` runs there first).

  Example:
    >>> with jq.qarray.checked():
    ...   q = jax.jit(lambda w: jq.quantize(w, spec))(w)   # ValueError on NaN in w
  """
  with _FAILURES_LOCK:
    _FAILURES.clear()
  if _CHECKS is not None:
    ctx = _CHECKS(True)
  else:
    ctx = contextlib.nullcontext()
    prev, _LOCAL.checks = getattr(_LOCAL, "checks", False), True
  try:
    with ctx:
      try:
        yield
        jax.effects_barrier()
      except ValueError:
        raise
      except Exception as e:  # jax's runtime error around a failed callback
        msg = _pop_failure()
        if msg is None:
          raise
        raise ValueError(msg) from e
    msg = _pop_failure()
    if msg is not None:
      raise ValueError(msg)
  finally:
    if _CHECKS is None:
      _LOCAL.checks = prev


def _pop_failure() -> str | None:
  with _FAILURES_LOCK:
    msg = _FAILURES[0] if _FAILURES else None
    _FAILURES.clear()
  return msg


def _concrete(x) -> bool:
  return x is None or (numerics.is_concrete(x) and getattr(x, "is_fully_addressable", True)
                       and not (hasattr(x, "is_deleted") and x.is_deleted()))


def value_check(inputs: Sequence, summary: Callable[[], Sequence], fail: Callable[..., None],
                *, quick: Callable[[], jax.Array] | None = None) -> None:
  """Runs a value check on ``inputs``: ``summary()`` gives ``(ok, *details)`` as (small) arrays and
  ``fail(*details)`` raises the ValueError; ``quick()``, if given, just ``ok`` (cheaper to
  compile: one reduction).

  Concrete inputs: checked now (one bool comes back; the details only on failure).  Traced
  inputs: inside :func:`checked` a ``jax.debug.callback``, otherwise nothing.
  """
  if all(_concrete(a) for a in inputs):
    if not _compat.tracing():   # (summaries are jitted: one program each, run now)
      check_summary((quick(),) if quick is not None else summary(), fail, again=summary)
      return
    with jax.ensure_compile_time_eval():  # concrete arrays closed over by a jit trace
      check_summary(summary(), fail)
  elif checks_enabled():
    check_summary(summary(), fail)


def traced_checks(x) -> bool:
  """Whether a check computed in the same program as ``x``'s values needs its details there:
  ``x`` is traced inside :func:`checked` (concrete values get them only on failure)."""
  return checks_enabled() and not _concrete(x)


def check_summary(summary: Sequence, fail: Callable[..., None],
                  again: Callable[[], Sequence] | None = None) -> None:
  """:func:`value_check` of a summary ``(ok, *details)`` already computed (in the same compiled
  program as the values it checks): concrete, checked now; traced, a ``jax.debug.callback``
  inside :func:`checked`, otherwise nothing.  A summary of ``ok`` alone that fails gets its
  details from ``again()``."""
  ok, *details = summary
  if all(_concrete(a) for a in summary):
    if not bool(ok):
      if not details and again is not None:
        _, *details = again()
      fail(*[np.asarray(d) for d in details])
    return
  if not checks_enabled():
    return

  def callback(ok, *d):
    if not bool(ok):
      try:
        fail(*(np.asarray(x) for x in d))
      except ValueError as e:
        with _FAILURES_LOCK:
          if not _FAILURES:
            _FAILURES.append(str(e))
        raise

  jax.debug.callback(callback, ok, *details)


def first_bad(good: jax.Array, values: jax.Array | None = None):
  """``(all good, count bad, flat index of the first bad, its value)`` of a boolean mask.

  Reductions over the mask's own shape (no reshape or index into it): arrays split over a mesh's
  devices (explicit sharding) take neither along a split axis."""
  good = jnp.asarray(good)
  flat = jnp.zeros(good.shape, jnp.int32)   # each element's row-major flat index
  stride = 1
  for ax in reversed(range(good.ndim)):
    flat = flat + jax.lax.broadcasted_iota(jnp.int32, good.shape, ax) * np.int32(stride)
    stride *= good.shape[ax]
  ok = jnp.all(good)
  i = jnp.where(ok, 0, jnp.min(jnp.where(good, np.int32(max(good.size, 1)), flat)))
  if values is None:
    return ok, jnp.sum(~good), i, i
  v = jnp.asarray(values)
  v = jnp.sum(jnp.where(flat == i, v, jnp.zeros((), v.dtype)), dtype=v.dtype)
  return ok, jnp.sum(~good), i, v


_CONDITIONS = ("dtype", "finite", "positive", "lo", "hi", "integral", "not_nan")


def _good(x, dtype: str | None = None, finite: bool = False, positive: bool = False,
          lo: float | None = None, hi: float | None = None, integral: bool = False,
          not_nan: bool = False, xp=jnp):
  """``(mask of the values meeting every asked condition, the values cast to dtype)``; ``xp`` is
  ``jnp`` (in a compiled program) or ``np`` (:func:`values_good` on the host)."""
  v = x if dtype is None else x.astype(dtype)
  good = xp.ones(v.shape, bool)
  if finite:
    good &= xp.isfinite(v)
  if not_nan:
    good &= ~xp.isnan(v)
  if positive:
    good &= v > 0
  if lo is not None:
    good &= _within(v, lo, xp, above=True)
  if hi is not None:
    good &= _within(v, hi, xp, above=False)
  if integral:
    good &= v == xp.round(v)
  return good, v


def _within(v, bound: float, xp, *, above: bool):
  """``v >= bound`` (``above``) or ``v <= bound``; on integer ``v`` a bound outside its dtype's
  range holds for every value or for none (compared directly, it would wrap: uint8 ``>= -8``)."""
  if xp.issubdtype(v.dtype, xp.integer):
    info = xp.iinfo(v.dtype)
    if (bound <= info.min) if above else (bound >= info.max):
      return xp.ones(v.shape, bool)
    if (bound > info.max) if above else (bound < info.min):
      return xp.zeros(v.shape, bool)
  return v >= bound if above else v <= bound


@functools.partial(jax.jit, static_argnames=_CONDITIONS)
def all_good(x, **conditions) -> jax.Array:
  """Whether every value of ``x`` meets the conditions (see :func:`bad_values`)."""
  return jnp.all(_good(x, **conditions)[0])


@functools.partial(jax.jit, static_argnames=_CONDITIONS)
def bad_values(x, **conditions):
  """:func:`first_bad` of the values of ``x`` (cast to ``dtype``) that break any of the asked
  conditions (``finite``, ``positive``, in ``[lo, hi]``, ``integral``, ``not_nan``)."""
  return first_bad(*_good(x, **conditions))


# Up to this many values, a concrete array in host memory is checked with numpy: compiling the
# check (one program per shape and dtype, 30-100 ms on a CPU) costs more than reading the values
# (~1 ms per million).  Larger arrays, and arrays on accelerators, take the compiled reduction.
HOST_CHECK_MAX = 1 << 22


def _host_values(x, dtype: str | None) -> np.ndarray | None:
  """``x`` as a numpy array when :func:`values_good` checks it on the host, else None.  A float to
  integer cast is left to the compiled road (numpy and XLA differ on NaN and out-of-range)."""
  if isinstance(x, np.ndarray):
    host = x.size <= HOST_CHECK_MAX
  else:
    host = (isinstance(x, jax.Array) and _concrete(x) and x.size <= HOST_CHECK_MAX
            and x.is_fully_addressable and all(d.platform == "cpu" for d in x.devices()))
  if not host or (dtype is not None and jnp.issubdtype(x.dtype, jnp.inexact)
                  and not jnp.issubdtype(np.dtype(dtype), jnp.inexact)):
    return None
  with np.errstate(over="ignore"):   # (float64 beyond float32: inf, as jnp.asarray makes it)
    return np.asarray(x, dtype=jax.dtypes.canonicalize_dtype(x.dtype))


def values_good(x, **conditions) -> bool:
  """:func:`all_good` of a concrete ``x``, now: small arrays in host memory with numpy (no
  compile), others with the compiled reduction; both from the one mask :func:`_good`."""
  host = _host_values(x, conditions.get("dtype"))
  if host is not None:
    return bool(np.all(_good(host, xp=np, **conditions)[0]))
  return bool(all_good(jnp.asarray(x), **conditions))


def check_values(x, fail: Callable[..., None], **conditions) -> None:
  """:func:`value_check` of ``x`` against the conditions of :func:`bad_values`: on concrete
  arrays :func:`values_good` now, the details (one compiled program) only on failure."""
  value_check([x], lambda: bad_values(x, **conditions), fail,
              quick=lambda: np.bool_(values_good(x, **conditions)))


def index_str(flat_index, shape: Sequence[int]) -> str:
  return str(tuple(int(i) for i in np.unravel_index(int(flat_index), tuple(shape)))) if shape \
      else "()"


def _dtype_of(x) -> np.dtype:
  """dtype of an array; Python floats count as float32 and ints as int32 (as jnp.asarray)."""
  if isinstance(x, bool):
    return np.dtype(np.bool_)
  if isinstance(x, float):
    return np.dtype(np.float32)
  if isinstance(x, int):
    return np.dtype(np.int32)
  dt = getattr(x, "dtype", None)
  return np.dtype(dt) if dt is not None else np.asarray(x).dtype


def check_activation_scale(scale, zero_point, spec: ActivationSpec, name: str) -> None:
  """Static activation ``scale`` (finite, positive, floating) and ``zero_point`` (integral, in the
  qtype's range); raises ValueError naming ``name``, the shape and dtype, and the first bad index.
  Value checks follow :func:`value_check` (eager, or under :func:`checked`)."""
  if scale is None:
    return
  shape, dt = tuple(np.shape(scale)), _dtype_of(scale)
  where = f"{name}: static activation scale shape {shape} dtype {dt}"
  if not jnp.issubdtype(dt, jnp.floating):
    raise ValueError(f"{where}: the scale must be floating point")

  def fail(n, i, v):
    raise ValueError(f"{where}: activation scales must be finite and positive; {int(n)} bad, "
                     f"first at index {index_str(i, shape)}: {float(v)}")

  check_values(jnp.asarray(scale), fail, dtype="float32", finite=True, positive=True)
  if zero_point is None:
    return
  qt = spec.qtype
  if qt.is_float:
    raise ValueError(f"{name}: static activation zero point shape {tuple(np.shape(zero_point))} "
                     f"dtype {_dtype_of(zero_point)}: {qt.value} activations are symmetric and "
                     "take no zero point")
  zshape = tuple(np.shape(zero_point))
  zwhere = f"{name}: static activation zero point shape {zshape} dtype {_dtype_of(zero_point)}"

  def zfail(n, i, v):
    raise ValueError(f"{zwhere}: activation zero points must be integers in [{qt.qmin}, "
                     f"{qt.qmax}] ({qt.value}); {int(n)} bad, first at index "
                     f"{index_str(i, zshape)}: {float(v)}")

  check_values(jnp.asarray(zero_point), zfail, dtype="float32", finite=True, lo=qt.qmin,
               hi=qt.qmax, integral=True)


def _host_value(x) -> bool:
  """A value whose check needs no trace: Python numbers, numpy and concrete jax arrays."""
  return isinstance(x, (int, float, np.ndarray, np.generic, jax.Array)) and _concrete(x)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ActivationQuant:
  """How a layer's *input* is quantized at run time.

  ``scale``/``zero_point`` are the calibrated per-tensor values for static mode (shape ``()``), and
  ``None`` for dynamic mode (per-token scales computed on the fly).
  """
  scale: jax.Array | None
  zero_point: jax.Array | None
  spec: ActivationSpec = dataclasses.field(metadata=dict(static=True))

  def __post_init__(self):
    # Also runs when jax rebuilds the pytree (tracers, abstract values, other leaves): only
    # concrete array values are checked here; QArray.validate checks the rest.
    if isinstance(self.spec, ActivationSpec) and _host_value(self.scale) and (
        self.zero_point is None or _host_value(self.zero_point)):
      check_activation_scale(self.scale, self.zero_point, self.spec, "ActivationQuant")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
  """A quantized tensor (see module docstring).  Call :meth:`validate` at API boundaries.

  Attributes:
    values: packed integer storage (float8 values for ``FP8_E4M3``), shape
      ``numerics.packed_shape(shape, qtype)``.
    scale: per-tile scales, shape ``numerics.num_tiles(shape, tile)``.
    zero_point: per-tile integer zero points (``qtype.unpacked_dtype``), or None if symmetric.
    activation: for int8×int8 (or fp8×fp8) layers, how the input is quantized; None for
      weight-only.
    qtype: element type.
    shape: logical shape.
    tile: the block each scale covers.
  """
  values: jax.Array
  scale: jax.Array
  zero_point: jax.Array | None
  activation: ActivationQuant | None
  qtype: QType = dataclasses.field(metadata=dict(static=True))
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  tile: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def dtype(self):
    """The scale's dtype (``dequantize`` returns float32 unless given a dtype)."""
    return self.scale.dtype

  @property
  def nbytes(self) -> int:
    """Bytes of packed storage: values + scales + zero points (+ activation scales)."""
    leaves = jax.tree_util.tree_leaves(self)
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves))

  @property
  def bits_per_weight(self) -> float:
    return 8.0 * self.nbytes / max(1, int(np.prod(self.shape)))

  def unpacked(self) -> jax.Array:
    """Values in logical shape (int8 for signed types, uint8 for unsigned, float8_e4m3fn for
    ``FP8_E4M3``)."""
    return numerics.unpack(self.values, self.qtype, self.shape[-1] if self.shape else 1).reshape(
        self.shape)

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    return dequantize(self, dtype)

  def validate(self, name: str = "<qarray>", *, values: bool = True) -> "QArray":
    """Checks the QArray; raises ValueError naming ``name``, its qtype, shape and tile.

    Structural checks (always, also under ``jit``): qtype, tile, the shapes and dtypes of
    ``values`` (``qtype.storage_dtype``), ``scale`` (floating point), ``zero_point``
    (``qtype.unpacked_dtype``, none for NF4 and float8), the activation's mode and scale dtype.
    Value checks (``values=True``; on concrete arrays, or under :func:`checked` also on tracers):
    scales finite and positive, zero points in ``[qmin, qmax]``, float8 values not NaN, static
    activation scales finite and positive; each message gives the first bad index (packed integer
    codes always lie in ``[qmin, qmax]``).
    """
    self._validate_structure(name)
    if values:
      self._validate_values(name)
    return self

  def _where(self) -> str:
    return f"QArray(qtype={self.qtype.value}, shape={self.shape}, tile={self.tile})"

  def _validate_structure(self, name: str) -> None:
    if not isinstance(self.qtype, QType):
      raise ValueError(f"{name}: qtype {self.qtype!r} is not a QType")
    where = f"{name}: {self._where()}"
    if (not isinstance(self.shape, tuple) or not isinstance(self.tile, tuple)
        or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                   for v in self.shape + self.tile)):
      raise ValueError(f"{where}: shape and tile must be tuples of ints")
    if len(self.tile) != len(self.shape) or any(t < 1 for t in self.tile):
      raise ValueError(f"{where}: tile must have one positive entry per axis")
    for field in ("values", "scale"):
      if not hasattr(getattr(self, field), "dtype"):
        raise ValueError(f"{where}: {field} is a {type(getattr(self, field)).__name__}, not an "
                         "array")
    want = numerics.packed_shape(self.shape, self.qtype)
    if tuple(self.values.shape) != want or self.values.dtype != self.qtype.storage_dtype:
      raise ValueError(f"{where}: values have shape {tuple(self.values.shape)} dtype "
                       f"{self.values.dtype}, expected {want} {self.qtype.storage_dtype}")
    tiles = numerics.num_tiles(self.shape, self.tile)
    if tuple(self.scale.shape) != tiles:
      raise ValueError(f"{where}: scale has shape {tuple(self.scale.shape)} dtype "
                       f"{self.scale.dtype}, expected {tiles} (one per tile)")
    if not jnp.issubdtype(self.scale.dtype, jnp.floating):
      raise ValueError(f"{where}: scale shape {tuple(self.scale.shape)} dtype "
                       f"{self.scale.dtype} is not floating point")
    if self.zero_point is not None:
      if self.qtype.symmetric_only:
        raise ValueError(f"{where}: {'NF4' if self.qtype.is_table else self.qtype.value} takes "
                         f"no zero point (symmetric only; got shape "
                         f"{tuple(np.shape(self.zero_point))} dtype {_dtype_of(self.zero_point)})")
      if (not hasattr(self.zero_point, "dtype") or tuple(self.zero_point.shape) != tiles
          or self.zero_point.dtype != self.qtype.unpacked_dtype):
        raise ValueError(f"{where}: zero_point has shape {tuple(np.shape(self.zero_point))} dtype "
                         f"{_dtype_of(self.zero_point)}, expected {tiles} "
                         f"{self.qtype.unpacked_dtype}")
    if self.activation is not None:
      a = self.activation
      if not isinstance(a, ActivationQuant) or not isinstance(a.spec, ActivationSpec):
        raise ValueError(f"{where}: activation must be an ActivationQuant, got {a!r}")
      if (a.scale is None) != (a.spec.mode.value == "dynamic"):
        raise ValueError(f"{name}: activation mode {a.spec.mode.value} "
                         f"{'needs' if a.scale is None else 'takes no'} a calibrated scale")
      if a.scale is not None and not jnp.issubdtype(_dtype_of(a.scale), jnp.floating):
        raise ValueError(f"{where}: static activation scale shape {tuple(np.shape(a.scale))} "
                         f"dtype {_dtype_of(a.scale)} is not floating point")

  def _validate_values(self, name: str) -> None:
    where = f"{name}: {self._where()}"
    qt = self.qtype
    sshape = tuple(self.scale.shape)

    def scale_fail(n, i, v):
      raise ValueError(f"{where}: scale shape {sshape} dtype {self.scale.dtype}: scales must be "
                       f"finite and positive; {int(n)} bad, first at index "
                       f"{index_str(i, sshape)}: {float(v)}")

    if self.scale.size:
      check_values(self.scale, scale_fail, dtype="float32", finite=True, positive=True)
    zp = self.zero_point
    if zp is not None and zp.size:
      def zp_fail(n, i, v):
        raise ValueError(f"{where}: zero_point shape {tuple(zp.shape)} dtype {zp.dtype}: zero "
                         f"points must lie in [{qt.qmin}, {qt.qmax}]; {int(n)} outside, first at "
                         f"index {index_str(i, zp.shape)}: {int(v)}")

      check_values(zp, zp_fail, dtype="int32", lo=qt.qmin, hi=qt.qmax)
    # Codes: packed storage holds exactly the qtype's range; float8 bytes can hold NaN.
    if qt.is_float and self.values.size:
      def nan_fail(n, i, _):
        raise ValueError(f"{where}: values dtype {self.values.dtype}: {int(n)} NaN values, first "
                         f"at index {index_str(i, self.shape)}; {qt.value} values must be finite")

      check_values(self.values, nan_fail, dtype="float32", not_nan=True)
    if self.activation is not None and self.activation.scale is not None:
      check_activation_scale(self.activation.scale, self.activation.zero_point,
                             self.activation.spec, f"{where}: activation")


@functools.partial(jax.jit, static_argnames=("qtype", "shape", "tile", "dtype", "details"))
def _dequantized(values, scale, zero_point, qtype: QType, shape, tile, dtype, details=False):
  """``(dequantized values in dtype, (all finite,) or with details the first_bad of their
  finiteness (float32 values))``: one compiled program per shape and grid."""
  v = numerics.unpack(values, qtype, shape[-1] if shape else 1).reshape(shape)
  s = numerics.expand(scale.astype(jnp.float32), tile, shape)
  if qtype.is_table:
    x = numerics.nf4_decode(v, jnp.float32)
  else:
    x = v.astype(jnp.float32)
    if zero_point is not None:
      x = x - numerics.expand(zero_point.astype(jnp.float32), tile, shape)
  y32 = x * s
  y = y32.astype(dtype)
  return y, first_bad(jnp.isfinite(y), y32) if details else (jnp.all(jnp.isfinite(y)),)


def dequantize(q: QArray, dtype=jnp.float32, *, name: str = "<dequantize>") -> jax.Array:
  """``(unpack(values) − zero_point) · scale`` (or ``table[...] · scale``) in ``dtype``.

  Runs :meth:`QArray.validate` first: the structural checks always, the value checks on concrete
  arrays (and under :func:`checked`), so an invalid QArray raises ValueError rather than giving
  wrong numbers.  ``dtype`` must be floating point; values that overflow it (float16 above
  65504, or scales near float32's maximum) raise ValueError the same way, never come back inf.
  """
  if not isinstance(q, QArray):
    raise ValueError(f"dequantize: expected a jq.QArray, got {type(q).__name__}")
  try:
    out_dt = jnp.dtype(dtype)
  except TypeError as e:
    raise ValueError(f"{name}: dtype {dtype!r} is not a dtype; dequantize to a floating-point "
                     "dtype such as jnp.float32 or jnp.bfloat16") from e
  if not jnp.issubdtype(out_dt, jnp.floating):
    raise ValueError(f"{name}: dtype {out_dt.name} is not floating point: dequantized values "
                     "would be truncated; dequantize to float32/bfloat16/float16 (use "
                     "QArray.unpacked() for the integer codes)")
  q.validate(name)
  args = (q.values, q.scale, q.zero_point, q.qtype, tuple(q.shape), tuple(q.tile), out_dt.name)
  y, summary = _dequantized(*args, details=traced_checks(q.values))
  if y.size:
    _check_dequantized(q, y, summary, name, again=lambda: _dequantized(*args, details=True)[1])
  return y


def _check_dequantized(q: QArray, y: jax.Array, summary, name: str, again) -> None:
  """Dequantized values of a valid QArray (finite scales, in-range codes) that overflow ``y``'s
  dtype (a scale near float32's maximum, or float16's 65504): ValueError naming the first one.
  Checked now on concrete arrays, or under :func:`checked`."""
  shape = tuple(q.shape)

  def fail(n, i, v):
    dt = np.dtype(y.dtype)
    fix = ("the scales are too large for float32 arithmetic" if dt == np.float32 else
           "dequantize to float32")
    raise ValueError(f"{name}: {q._where()}: dequantized to {dt.name}, {int(n)} values overflow "
                     f"(first at index {index_str(i, shape)}: {float(v):.6g} in float32; the "
                     f"largest finite {dt.name} is {float(jnp.finfo(dt).max):.6g}); {fix}")

  check_summary(summary, fail, again)
