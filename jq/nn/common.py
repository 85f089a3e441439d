"""Layer math shared by the linen and nnx adapters, and the route recorder behind ``explain``.

Invariant: each function computes exactly what the float Flax layer computes with
``kernel = dequantize(q)`` (same dtype promotion, bias broadcast and output layout), but through
``jq.ops`` so the weight stays quantized inside the jitted computation.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jq import ops
from jq.layout import Layout
from jq.qarray import QArray, dequantize


# ---- explain: a trace-time recorder -----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Route:
  """How one layer runs.

  Attributes:
    path: the kernel's parameter path.
    layer: the Flax layer type.
    weight: ``"float32"`` or the QArray's description (qtype, tile, asym).
    mode: ``"float"``, ``"weight-only"``, ``"int8 dynamic"``/``"int8 static"`` (or
      ``"fp8_e4m3 ..."``).
    impl: the implementation ``jq.ops`` chose (``"float"`` for float layers).
    m: rows of the contraction (tokens incl. batch), None when unknown.
    note: performance note (``jq.ops.PerfNote``) or None.
    reason: why a layer stays float although it has a kernel (e.g. custom code on its params).
  """
  path: str
  layer: str
  weight: str
  mode: str
  impl: str
  m: int | None = None
  note: ops.PerfNote | None = None
  reason: str = ""

  @property
  def slower_than_float(self) -> bool:
    return self.note is not None and self.note.slower_than_float


@dataclasses.dataclass
class _Recorder:
  backend: str | None
  routes: list[Route]


# Active explain recorders and calibration observers: context variables, so concurrent traces
# (threads, nested calls) never see each other's.
_RECORDERS: contextvars.ContextVar[tuple[_Recorder, ...]] = contextvars.ContextVar(
    "jq_explain_recorders", default=())
_OBSERVERS: contextvars.ContextVar[tuple[Callable[[str, jax.Array], None], ...]] = (
    contextvars.ContextVar("jq_input_observers", default=()))


@contextlib.contextmanager
def _pushed(var: contextvars.ContextVar, item) -> Iterator[None]:
  token = var.set(var.get() + (item,))
  try:
    yield
  finally:
    var.reset(token)


@contextlib.contextmanager
def recording(backend: str | None = None) -> Iterator[list[Route]]:
  """Collects a :class:`Route` for every adapted layer traced inside the block."""
  rec = _Recorder(backend, [])
  with _pushed(_RECORDERS, rec):
    yield rec.routes


@contextlib.contextmanager
def observing(fn: Callable[[str, jax.Array, Any, Any], None]) -> Iterator[None]:
  """Calls ``fn(kernel path, layer input, input axes, kernel)`` for every adapted layer run inside
  the block (float or quantized), before the layer computes; used by calibration."""
  with _pushed(_OBSERVERS, fn):
    yield


_CALIBRATING: contextvars.ContextVar[bool] = contextvars.ContextVar("jq_calibrating",
                                                                   default=False)


def calibration(fn: Callable[..., Any]) -> Callable[..., Any]:
  """Decorates a calibration road (``jq.ptq.quantize_model``, ``quantize_onloaded``): while it
  runs, models with two roads to one function take the reference one (``reference_road``)."""
  @functools.wraps(fn)
  def run(*args, **kwargs):
    token = _CALIBRATING.set(True)
    try:
      return fn(*args, **kwargs)
    finally:
      _CALIBRATING.reset(token)
  return run


def reference_road() -> bool:
  """Whether a model with two roads to one function (a mixture of experts' grouped and dense
  experts) should take its reference road: while an observer watches the layers' inputs (the
  reference road is the one whose inputs it documents) and while a calibration runs, so that
  every calibration road propagates the same bits (``--stream`` writes the in-memory codes)."""
  return bool(_OBSERVERS.get()) or _CALIBRATING.get()


def observe(path: str, x, x_axes: Sequence[int] | None = None, kernel=None) -> None:
  """Reports a layer's input to active observers.  ``x_axes``: the input axes contracted with
  the kernel's contracting axes, in the kernel's order (None where the input does not map onto
  the kernel's contracting axes one to one: convolutions, dot batch dims, summed einsum axes).
  ``kernel``: the layer's kernel as the layer sees it (inside ``vmap``, its mapped slice: an
  input shared by stacked experts, ``in_axes=None``, is still one input per expert)."""
  if not _OBSERVERS.get():
    return
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"{path}: the layer's input is a {type(x).__name__}, not an array (a "
                    "calibration batch of another structure than the model's inputs?)")
  xa = None if x_axes is None else tuple(int(a) % np.ndim(x) for a in x_axes)
  for fn in _OBSERVERS.get():
    fn(path, x, xa, kernel)


def einsum_x_axes(einsum_str: str, x_ndim: int, w_ndim: int, *, path: str) -> tuple[int, ...] | None:
  """Input axes contracted with the kernel's contracting axes (kernel order) of an einsum layer,
  or None when the einsum has batch letters or sums input axes on their own."""
  plan = ops.parse_einsum(einsum_str, x_ndim, w_ndim, name=path)
  (xc, wc), (xb, _) = plan.dimension_numbers
  if xb or plan.lhs_sum_axes:
    return None
  return tuple(a for _, a in sorted(zip(wc, xc)))


def record_float(path: str, layer: str, dtype, m: int | None = None, reason: str = "") -> None:
  for rec in _RECORDERS.get():
    rec.routes.append(Route(path, layer, str(np.dtype(dtype)), "float", "float", m,
                            reason=reason))


def record_quantized(path: str, layer: str, q: QArray, impl: str, m: int | None = None) -> None:
  """A route for a layer computed outside ``jq.ops.dot_general`` (e.g. a quantized conv)."""
  for rec in _RECORDERS.get():
    rec.routes.append(Route(path, layer, describe_qarray(q), mode_label(q), impl, m))


def mode_label(q: QArray) -> str:
  """``weight-only``, or the activations' type and mode (``int8 dynamic``, ``fp8_e4m3 static``)."""
  if q.activation is None:
    return "weight-only"
  return f"{q.activation.spec.qtype.value} {q.activation.spec.mode.value}"


def describe_qarray(q: QArray) -> str:
  """``int4 tile=32x1 asym`` style label."""
  out = f"{q.qtype.value} tile={'x'.join(map(str, q.tile))}"
  return out + (" asym" if q.zero_point is not None else "")


def quantized_dot(x: jax.Array, q: QArray, dimension_numbers, *, path: str, layer: str,
                  precision=None, preferred_element_type=None, out_sharding=None,
                  policy: ops.KernelPolicy | None = None) -> jax.Array:
  """``jq.ops.dot_general`` (under ``policy``, default the current one) that also reports its
  route to active recorders."""
  for rec in _RECORDERS.get():
    c = ops.route(x, q, dimension_numbers, backend=rec.backend, name=path,
                  out_sharding=out_sharding, policy=policy)
    rec.routes.append(Route(path, layer, describe_qarray(q), mode_label(q), c.name,
                            c.problem.m, c.note))
  return ops.dot_general(x, q, dimension_numbers, precision, preferred_element_type,
                         out_sharding=out_sharding, name=path, policy=policy)


# ---- layer math ------------------------------------------------------------------------------

def compute_dtype(x: jax.Array, param_dtype, bias: jax.Array | None, dtype):
  """Flax's ``promote_dtype`` with the float kernel's ``param_dtype`` standing in for the kernel."""
  if dtype is not None:
    return jnp.dtype(dtype)
  args = [x.dtype, jnp.dtype(param_dtype)] + ([] if bias is None else [bias.dtype])
  return jnp.result_type(*args)


def layer_view(q: QArray, expected: Sequence[int]) -> QArray:
  """``q`` as the kernel of one layer of a stack, when ``nn.scan``/``nn.vmap`` sliced its arrays.

  Flax's lifted transforms slice every array of the stacked QArray along the stack axis but leave
  its static ``shape``/``tile`` as they were; the stack axes are those whose removal gives
  ``expected`` and whose tile is 1 (one scale set per layer).  Returns ``q`` unchanged otherwise.
  """
  expected = tuple(expected)
  full = tuple(q.shape)
  k = len(full) - len(expected)
  if k <= 0 or getattr(q.values, "ndim", None) != len(expected):
    return q
  views = set()
  for drop in itertools.combinations(range(len(full)), k):
    keep = [i for i in range(len(full)) if i not in drop]
    if tuple(full[i] for i in keep) == expected and all(q.tile[i] == 1 for i in drop):
      views.add(tuple(q.tile[i] for i in keep))
  if len(views) != 1:
    return q
  return dataclasses.replace(q, shape=expected, tile=views.pop())


def check_kernel(q: QArray, expected: Sequence[int], *, path: str, layer: str,
                 x: jax.Array | None = None) -> QArray:
  """The layer's QArray kernel (one layer's view of a stacked one), validated.

  Raises:
    ValueError: naming the path, when ``q`` is not a QArray of the layer's kernel shape.
  """
  if not isinstance(q, QArray):
    raise ValueError(f"{path}: expected a jq.QArray kernel, got {type(q).__name__}")
  q = layer_view(q, expected)
  if tuple(q.shape) != tuple(expected):
    inp = "" if x is None else f" for input shape {tuple(x.shape)} dtype {x.dtype}"
    raise ValueError(f"{path}: QArray shape {q.shape} ({q.qtype.value}) does not match {layer}"
                     f"{inp}, which needs a kernel of shape {tuple(expected)}; quantize the "
                     "parameters of this model with jq.nn.quantize_variables / "
                     "jq.nn.quantize_module, or skip this layer")
  return q.validate(path)


def normalize_axes(axes: Sequence[int], ndim: int, *, path: str) -> tuple[int, ...]:
  if any(not -ndim <= a < ndim for a in axes):
    raise ValueError(f"{path}: axes {tuple(axes)} out of range for input rank {ndim}")
  return tuple(a % ndim for a in axes)


def dense_general(x: jax.Array, q: QArray, bias: jax.Array | None, *, axis: Sequence[int],
                  batch_axes: Sequence[int], features: Sequence[int], dtype, param_dtype,
                  precision, path: str, layer: str, preferred_element_type=None,
                  out_sharding=None, policy: ops.KernelPolicy | None = None) -> jax.Array:
  """``nn.DenseGeneral`` / ``nnx.LinearGeneral`` (and ``Dense``/``Linear``) with a QArray kernel.

  Kernel layout ``(batch…, in…, features…)``; output ``(batch…, x free…, features…)`` plus bias.
  """
  x = jnp.asarray(x)
  axis = normalize_axes(axis, x.ndim, path=path)
  batch_axes = normalize_axes(batch_axes, x.ndim, path=path)
  features = tuple(features)
  expected = tuple(x.shape[a] for a in batch_axes) + tuple(x.shape[a] for a in axis) + features
  q = check_kernel(q, expected, path=path, layer=layer, x=x)
  cdt = compute_dtype(x, param_dtype, bias, dtype)
  x = x.astype(cdt)
  nb = len(batch_axes)
  dims = ((axis, tuple(range(nb, nb + len(axis)))), (batch_axes, tuple(range(nb))))
  y = quantized_dot(x, q, dims, path=path, layer=layer, precision=precision,
                    preferred_element_type=preferred_element_type, out_sharding=out_sharding,
                    policy=policy)
  if bias is not None:
    expanded = tuple(x.shape[a] if a in batch_axes else 1 for a in range(x.ndim) if a not in axis)
    y = y + jnp.reshape(bias.astype(cdt), expanded + features).astype(y.dtype)
  return y


def einsum_bias_shape(einsum_str: str, x_ndim: int, w_shape: Sequence[int]) -> tuple[int, ...]:
  """Broadcast shape of an Einsum layer's bias: kernel sizes at output letters from the kernel."""
  ins, out = einsum_str.replace(" ", "").split("->")
  xs, ws = ins.split(",")
  if "..." in out:
    n_ell = x_ndim - (len(xs) - 3) if "..." in xs else 0
    out = out.replace("...", "." * n_ell)
  return tuple(w_shape[ws.index(c)] if c in ws else 1 for c in out)


def einsum_layer(x: jax.Array, q: QArray, bias: jax.Array | None, *, einsum_str: str,
                 kernel_shape: Sequence[int], dtype, param_dtype, precision, path: str,
                 layer: str, preferred_element_type=None,
                 policy: ops.KernelPolicy | None = None) -> jax.Array:
  """``nn.Einsum`` / ``nnx.Einsum`` with a QArray kernel."""
  x = jnp.asarray(x)
  q = check_kernel(q, kernel_shape, path=path, layer=layer, x=x)
  cdt = compute_dtype(x, param_dtype, bias, dtype)
  x = x.astype(cdt)
  plan = ops.parse_einsum(einsum_str, x.ndim, q.ndim, name=path)
  if plan.lhs_sum_axes:
    x = jnp.sum(x, axis=plan.lhs_sum_axes)
  y = quantized_dot(x, q, plan.dimension_numbers, path=path, layer=layer, precision=precision,
                    preferred_element_type=preferred_element_type, policy=policy)
  if plan.out_perm != tuple(range(y.ndim)):
    y = jnp.transpose(y, plan.out_perm)
  if bias is not None:
    shape = einsum_bias_shape(einsum_str, x.ndim + len(plan.lhs_sum_axes), q.shape)
    y = y + jnp.reshape(bias.astype(cdt), shape).astype(y.dtype)
  return y


def embed_layout(shape: Sequence[int], layer: str) -> Layout:
  """An embedding table ``(num_embeddings, features)``: one scale per row (per token; the output
  channel of ``attend``), groups along the features (``attend`` contracts them)."""
  return Layout(contracting=(len(shape) - 1,), channels=tuple(range(len(shape) - 1)), layer=layer)


def embed_lookup(ids: jax.Array, q: QArray, *, num_embeddings: int, features: int, dtype,
                 param_dtype, path: str, layer: str) -> jax.Array:
  """``nn.Embed.__call__`` / ``nnx.Embed.__call__`` with a QArray table: the rows it reads,
  dequantized to ``dtype`` (Flax's: the layer's ``dtype``, else the table's, ``param_dtype``)."""
  ids = jnp.asarray(ids)
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"{path}: {layer} takes integer ids, got dtype {ids.dtype}")
  q = check_kernel(q, (num_embeddings, features), path=path, layer=layer)
  out = jnp.dtype(dtype if dtype is not None else param_dtype)
  record_quantized(path, layer, q, "take (rows)", rows(ids, ()))
  if num_embeddings == 1:
    return jnp.broadcast_to(dequantize(q, out, name=path), ids.shape + (features,))
  return ops.take(q, ids, dtype=out, name=path)


def embed_attend(query: jax.Array, q: QArray, *, num_embeddings: int, features: int, dtype,
                 param_dtype, path: str, layer: str, precision=None, out_sharding=None,
                 policy: ops.KernelPolicy | None = None) -> jax.Array:
  """``nn.Embed.attend`` / ``nnx.Embed.attend`` (a tied output head) with a QArray table:
  ``query · tableᵀ`` through ``jq.ops`` (per-row scales factor out of the contraction)."""
  query = jnp.asarray(query)
  q = check_kernel(q, (num_embeddings, features), path=path, layer=layer, x=query)
  if query.shape[-1:] != (features,):
    raise ValueError(f"{path}: {layer}.attend: query shape {tuple(query.shape)} dtype "
                     f"{query.dtype} does not end in the {features} features")
  query = query.astype(compute_dtype(query, param_dtype, None, dtype))
  return quantized_dot(query, q, (((query.ndim - 1,), (1,)), ((), ())), path=path, layer=layer,
                       precision=precision, out_sharding=out_sharding, policy=policy)


def rows(x: jax.Array, contracting: Sequence[int]) -> int:
  """Number of output rows (tokens) of a contraction of ``x`` over ``contracting``."""
  sizes = [d for i, d in enumerate(np.shape(x)) if i not in contracting]
  return int(np.prod(sizes, dtype=np.int64))


__all__ = ["Route", "recording", "observing", "observe", "einsum_x_axes", "record_float", "record_quantized",
           "layer_view", "quantized_dot", "dense_general", "einsum_layer", "embed_layout",
           "embed_lookup", "embed_attend",
           "check_kernel", "describe_qarray", "compute_dtype", "einsum_bias_shape", "rows"]
