"""Run an unchanged linen model on a quantized variables tree, and learn its kernels' layouts.

``quantized_apply(model.apply)`` returns an apply function with the same signature.  Inside it,
``flax.linen.intercept_methods`` (a public hook, scoped to the call) intercepts the ``__call__`` of
``nn.Dense``, ``nn.DenseGeneral``, ``nn.Einsum`` and ``nn.Conv``, and ``nn.Embed``'s lookup and
``attend`` (and of subclasses: an override
that calls ``super().__call__`` reaches the adapted base method, which is what is intercepted).
The QArrays travel in the ordinary variables dict (inside ``nn.Partitioned`` boxes too); when a
layer's kernel is a QArray, the layer is computed through ``jq.ops`` and the float ``__call__``
never runs.  Inside ``nn.scan``/``nn.vmap`` each layer sees its slice of a stacked QArray.

``layouts(model, variables, *inputs)`` traces the model abstractly through the same hook and
returns each kernel's :class:`jq.Layout` (contracting / channel / stacked axes, from the layer
that uses it); ``quantize_variables`` quantizes with them.

Invariant: ``quantized_apply(m.apply)(qvars, x) ≈ m.apply(dequantize_tree(qvars), x)``, exactly up
to float reassociation for weight-only layers.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax.core import meta
from flax.linen.module import merge_param

from jq.layout import Layout
from jq.nn import common, conv
from jq.ops.policy import KernelPolicy, maybe_policy
from jq.qarray import QArray
from jq.tree import leaves_with_paths


def _as_tuple(v) -> tuple:
  return tuple(v) if isinstance(v, (tuple, list)) else (v,)


def _path(mod: nn.Module, leaf: str = "kernel") -> str:
  return "/".join(("params",) + tuple(str(p) for p in mod.path) + (leaf,))


def _unbox(v):
  return v.unbox(apply_constraint=False) if isinstance(v, meta.AxisMetadata) else v


def _bias(mod: nn.Module):
  return _unbox(mod.get_variable("params", "bias")) if mod.use_bias else None


# ---- the layers jq runs quantized: layout + quantized call, per class ------------------------

def _dense_layout(mod: nn.Dense, shape, args, kwargs) -> Layout:
  return Layout(contracting=(0,), channels=(1,), layer=f"nn.Dense(features={mod.features})")


def _dense(mod: nn.Dense, q: QArray, inputs, *args, **kwargs):
  if args or kwargs:
    raise ValueError(f"{_path(mod)}: nn.Dense.__call__ takes only the input")
  return common.dense_general(inputs, q, _bias(mod), axis=(-1,), batch_axes=(),
                              features=(mod.features,), dtype=mod.dtype,
                              param_dtype=mod.param_dtype, precision=mod.precision,
                              path=_path(mod), layer=f"nn.Dense(features={mod.features})")


def _dense_general_dims(mod: nn.DenseGeneral):
  return _as_tuple(mod.features), _as_tuple(mod.axis), _as_tuple(mod.batch_dims)


def _dense_general_layout(mod: nn.DenseGeneral, shape, args, kwargs) -> Layout:
  features, axis, batch = _dense_general_dims(mod)
  nb, na = len(batch), len(axis)
  return Layout(batch=tuple(range(nb)), contracting=tuple(range(nb, nb + na)),
                channels=tuple(range(nb + na, len(shape))),
                layer=f"nn.DenseGeneral(features={features}, axis={axis})")


def _dense_general(mod: nn.DenseGeneral, q: QArray, inputs, *args, **kwargs):
  if args or kwargs:
    raise ValueError(f"{_path(mod)}: nn.DenseGeneral.__call__ takes only the input")
  features, axis, batch = _dense_general_dims(mod)
  return common.dense_general(inputs, q, _bias(mod), axis=axis, batch_axes=batch,
                              features=features, dtype=mod.dtype, param_dtype=mod.param_dtype,
                              precision=mod.precision, path=_path(mod),
                              layer=f"nn.DenseGeneral(features={features}, axis={axis})")


def _einsum_str(mod: nn.Einsum, args, kwargs) -> str:
  call = args[1] if len(args) > 1 else kwargs.get("einsum_str")
  return merge_param("einsum_str", mod.einsum_str, call).replace(" ", "")


def einsum_layout(eq: str, shape: Sequence[int], *, layer: str, path: str) -> Layout:
  """The kernel's layout in ``x, kernel -> y`` subscripts ``eq`` (e.g. ``"btd,dkhe->btkhe"``):
  kernel letters also in the input and the output are batch axes, those in the input only are
  contracting, those in the output only are channels (letters in neither are summed: contracting).
  """
  try:
    ins, out = eq.split("->")
    xs, ws = ins.split(",")
  except ValueError as e:
    raise ValueError(f"{path}: einsum_str {eq!r} is not of the form 'x,kernel->out'") from e
  if "." in ws or len(ws) != len(shape) or len(set(ws)) != len(ws):
    raise ValueError(f"{path}: kernel subscripts {ws!r} of {eq!r} do not name the {len(shape)} axes "
                     f"of the kernel of shape {tuple(shape)} once each")
  roles: dict[str, list[int]] = {"contracting": [], "channels": [], "batch": []}
  for i, c in enumerate(ws):
    role = ("batch" if c in xs and c in out else "channels" if c in out else "contracting")
    roles[role].append(i)
  return Layout(contracting=tuple(roles["contracting"]), channels=tuple(roles["channels"]),
                batch=tuple(roles["batch"]), layer=layer)


def _einsum_layout(mod: nn.Einsum, shape, args, kwargs) -> Layout:
  eq = _einsum_str(mod, args, kwargs)
  return einsum_layout(eq, shape, layer=f"nn.Einsum({eq!r}, shape={tuple(mod.shape)})",
                       path=_path(mod))


def _einsum(mod: nn.Einsum, q: QArray, inputs, *args, **kwargs):
  eq = _einsum_str(mod, (inputs,) + args, kwargs)
  return common.einsum_layer(inputs, q, _bias(mod), einsum_str=eq, kernel_shape=tuple(mod.shape),
                             dtype=mod.dtype, param_dtype=mod.param_dtype,
                             precision=mod.precision, path=_path(mod),
                             layer=f"nn.Einsum({eq!r}, shape={tuple(mod.shape)})",
                             preferred_element_type=mod.preferred_element_type)


def conv_layout(shape: Sequence[int], layer: str) -> Layout:
  """Flax's conv kernel ``(*window, in // groups, out)``: window and inputs contract."""
  return Layout(contracting=tuple(range(len(shape) - 1)), channels=(len(shape) - 1,), layer=layer)


def _conv_layout(mod: nn.Conv, shape, args, kwargs) -> Layout:
  return conv_layout(shape, f"nn.Conv(features={mod.features}, kernel_size={mod.kernel_size})")


def _conv(mod: nn.Conv, q: QArray, inputs, *args, **kwargs):
  if args or kwargs:
    raise ValueError(f"{_path(mod)}: nn.Conv.__call__ takes only the input")
  return conv.conv_layer(inputs, q, _bias(mod), **conv.linen_conv_attrs(mod), path=_path(mod),
                         layer=f"nn.Conv(features={mod.features}, kernel_size={mod.kernel_size})")


def _dense_x_axes(mod, args, kwargs):
  return (-1,)


def _dense_general_x_axes(mod, args, kwargs):
  _, axis, batch = _dense_general_dims(mod)
  return None if batch else axis


def _einsum_x_axes(mod, args, kwargs):
  return common.einsum_x_axes(_einsum_str(mod, args, kwargs), np.ndim(args[0]), len(mod.shape),
                              path=_path(mod))


def _no_x_axes(mod, args, kwargs):
  return None


def _embed_layer(mod: nn.Embed, method: str = "") -> str:
  return f"nn.Embed{method}({mod.num_embeddings}, {mod.features})"


def _embed_layout(mod: nn.Embed, shape, args, kwargs) -> Layout:
  return common.embed_layout(shape, _embed_layer(mod))


def _embed_dims(mod: nn.Embed) -> dict:
  return dict(num_embeddings=mod.num_embeddings, features=mod.features, dtype=mod.dtype,
              param_dtype=mod.param_dtype, path=_path(mod, "embedding"), layer=_embed_layer(mod))


def _embed(mod: nn.Embed, q: QArray, inputs, *args, **kwargs):
  if args or kwargs:
    raise ValueError(f"{_path(mod, 'embedding')}: nn.Embed.__call__ takes only the ids")
  return common.embed_lookup(inputs, q, **_embed_dims(mod))


def _attend(mod: nn.Embed, q: QArray, query, *args, **kwargs):
  if args or kwargs:
    raise ValueError(f"{_path(mod, 'embedding')}: nn.Embed.attend takes only the query")
  return common.embed_attend(query, q, **dict(_embed_dims(mod),
                                               layer=_embed_layer(mod, ".attend")))


@dataclasses.dataclass(frozen=True)
class _Kind:
  """One adapted method of a layer class: ``cls.method`` computing on the param ``param``."""
  cls: type
  layout: Callable[..., Layout]
  run: Callable[..., Any]
  x_axes: Callable[..., tuple[int, ...] | None]
  param: str = "kernel"
  method: str = "__call__"
  observed: bool = True      # its input is a float activation (an embedding lookup's is not)

  @functools.cached_property
  def raw_call(self):
    return inspect.unwrap(getattr(self.cls, self.method))


# Layer methods the adapter computes (their subclasses too, through the base method).
_KINDS: tuple[_Kind, ...] = (
    _Kind(nn.Dense, _dense_layout, _dense, _dense_x_axes),
    _Kind(nn.DenseGeneral, _dense_general_layout, _dense_general, _dense_general_x_axes),
    _Kind(nn.Einsum, _einsum_layout, _einsum, _einsum_x_axes),
    _Kind(nn.Conv, _conv_layout, _conv, _no_x_axes),
    _Kind(nn.Embed, _embed_layout, _embed, _no_x_axes, param="embedding", observed=False),
    _Kind(nn.Embed, _embed_layout, _attend, _dense_x_axes, param="embedding", method="attend"))
ADAPTED = tuple(dict.fromkeys(k.cls for k in _KINDS))
LAYER_NAMES = ", ".join(f"nn.{c.__name__}" for c in ADAPTED)


def _kind(mod: nn.Module, next_fun, method_name: str) -> _Kind | None:
  """The adapted layer method about to run (the base class's own, not a subclass override)."""
  func = getattr(next_fun, "func", None)
  for kind in _KINDS:
    if kind.method == method_name and isinstance(mod, kind.cls):
      if func is not None:
        return kind if inspect.unwrap(func) is kind.raw_call else None
      return kind if getattr(type(mod), method_name) is getattr(kind.cls, method_name) else None
  return None


def _kernel(mod: nn.Module, name: str = "kernel"):
  if mod.scope is None or not mod.has_variable("params", name):
    return None
  return _unbox(mod.get_variable("params", name))


def _contracted_rows(kind: _Kind, mod: nn.Module, inputs) -> int | None:
  """Tokens of a float Dense/DenseGeneral call (for ``explain``)."""
  ndim = getattr(inputs, "ndim", None)
  if not ndim or kind.cls in (nn.Einsum, nn.Conv) or not kind.observed:
    return None
  axes = _as_tuple(mod.axis) if kind.cls is nn.DenseGeneral else (-1,)
  return common.rows(inputs, tuple(a % ndim for a in axes))


def _refuse_quantized_params(mod: nn.Module) -> None:
  """A module jq does not adapt must not receive a QArray through ``self.param``."""
  if mod.scope is None:
    return
  params = mod.variables.get("params", {})
  for name, value in params.items():
    value = _unbox(value)
    if isinstance(value, QArray):
      raise ValueError(
          f"{_path(mod, name)}: {type(mod).__name__} has a quantized parameter of shape "
          f"{value.shape} ({value.qtype.value}), but jq.nn.linen only runs {LAYER_NAMES} "
          f"quantized; keep it in float with Rule(pattern={_path(mod, name)!r}, weight=None)")


def _setup_of_a_quantized_table(mod: nn.Module) -> bool:
  """``nn.Embed.setup`` declares its table with ``self.param``, whose shape check would compare
  the QArray's packed values with the table (int4: half the columns).  With a QArray table the
  adapted methods read the variable themselves, so its ``setup`` (Flax's own) is skipped."""
  return (type(mod).setup is nn.Embed.setup and isinstance(mod, nn.Embed)
          and isinstance(_kernel(mod, "embedding"), QArray))


def adapter_interceptor(next_fun, args, kwargs, context):
  """The ``nn.intercept_methods`` hook: routes adapted layers with a QArray kernel to ``jq.ops``;
  reports every adapted layer (explain, calibration observers)."""
  mod = context.module
  if context.method_name == "setup" and _setup_of_a_quantized_table(mod):
    return None
  kind = _kind(mod, next_fun, context.method_name)
  if kind is None:
    if not isinstance(mod, ADAPTED):  # (overrides of adapted layers reach the base call inside)
      _refuse_quantized_params(mod)
    return next_fun(*args, **kwargs)
  kernel = _kernel(mod, kind.param)
  if kernel is None:
    return next_fun(*args, **kwargs)  # initialization: the float layer creates its params
  path = _path(mod, kind.param)
  if not args:
    raise ValueError(f"{path}: {type(mod).__name__} called without an input")
  if kind.observed:
    common.observe(path, args[0], kind.x_axes(mod, args, kwargs), kernel)
  if not isinstance(kernel, QArray):
    method = "" if kind.method == "__call__" else f".{kind.method}"
    common.record_float(path, type(mod).__name__ + method, getattr(kernel, "dtype", "float32"),
                        _contracted_rows(kind, mod, args[0]))
    return next_fun(*args, **kwargs)
  return kind.run(mod, kernel, *args, **kwargs)


def quantized_apply(apply_fn_or_module: nn.Module | Callable[..., Any], *,
                    policy: "KernelPolicy | bool | str | None" = None) -> Callable[..., Any]:
  """Returns ``apply(variables, *args, **kwargs)`` that runs the model on QArray parameters.

  ``variables`` is the model's variables dict with some kernels replaced by QArrays (the output of
  :func:`quantize_variables`); layers whose kernel is a plain array run in float.  The returned
  function has ``model.apply``'s signature (``rngs``, ``method``, ``mutable`` pass through), is
  pure, and can be jitted once and called many times.

  Args:
    apply_fn_or_module: a linen module, or its ``apply`` (or any function that calls it).
    policy: the :class:`jq.KernelPolicy` its contractions dispatch under (default None: the
      current policy where the function is traced, see :mod:`jq.ops.policy`).

  Example:
    >>> qvars = jq.nn.quantize_variables(model, variables, jq.default_rules(jq.W4A16_G128), x)
    >>> qapply = jax.jit(quantized_apply(model))
    >>> logits = qapply(qvars, tokens)

  Raises:
    ValueError: (at trace time) a QArray that does not fit its layer, a mode the layer cannot run,
      or a quantized parameter of a layer type jq does not adapt; messages name the parameter path.
  """
  fn = _apply_fn(apply_fn_or_module)
  policy = None if policy is None else KernelPolicy.parse(policy)

  @functools.wraps(fn)
  def apply(variables, *args, **kwargs):
    with maybe_policy(policy), nn.intercept_methods(adapter_interceptor):
      try:
        return fn(variables, *args, **kwargs)
      except (AttributeError, TypeError) as e:
        direct = _direct_use(e, variables)
        if direct is None:
          raise
        raise direct from e

  return apply


def _direct_use(e: Exception, variables: Any) -> ValueError | None:
  """The model's own code used a QArray as an array, outside the layers jq adapts (a tied
  decoder reading ``enc.variables["params"]["kernel"]``): named, with the way out, instead of a
  bare ``'QArray' object has no attribute 'T'``."""
  obj = getattr(e, "obj", None)
  if not isinstance(obj, QArray) and "QArray" not in str(e):
    return None
  found = [(p, x) for p, x in leaves_with_paths(variables) if isinstance(x, QArray)]
  if isinstance(obj, QArray):
    found = [(p, x) for p, x in found if (x.shape, x.qtype, x.tile) == (obj.shape, obj.qtype,
                                                                         obj.tile)]
  which = ", ".join(f"{p} {tuple(x.shape)} {x.qtype.value}" for p, x in found[:4])
  return ValueError(
      f"the model's own code uses a quantized parameter as an array, outside the layers jq "
      f"adapts ({type(e).__name__}: {e}); it is {'one of ' if len(found) > 1 else ''}{which}. "
      "A kernel a layer uses and the model also reads directly (a tied decoder, a weight the "
      "model transforms) must stay float: put Rule(pattern=<its path>, weight=None) first")


def _apply_fn(model) -> Callable[..., Any]:
  fn = model.apply if isinstance(model, nn.Module) else model
  if not callable(fn):
    raise ValueError(f"expected a linen Module or its apply function, got {type(model).__name__}")
  return fn


# ---- layouts --------------------------------------------------------------------------------

def abstract_call(fn: Callable[..., Any], *args, **kwargs) -> Any:
  """``fn(*args, **kwargs)`` under ``jax.eval_shape``; array (and ``ShapeDtypeStruct``) leaves are
  abstracted, other leaves (flags, strings) stay static.  Nothing is computed."""
  leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
  mask = [isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)) for x in leaves]

  def run(*arrays):
    it = iter(arrays)
    full = [next(it) if a else x for x, a in zip(leaves, mask)]
    a, k = jax.tree_util.tree_unflatten(treedef, full)
    return fn(*a, **k)

  return jax.eval_shape(run, *[x for x, a in zip(leaves, mask) if a])


@dataclasses.dataclass(frozen=True)
class LayerCall:
  """One adapted layer seen while tracing: its kernel path, one layer's kernel shape, layout."""
  path: str
  shape: tuple[int, ...]
  layout: Layout
  module: str


def trace_layers(model, variables, *args, **kwargs) -> tuple[list[LayerCall], list[tuple[str, str]]]:
  """Traces ``model.apply(variables, *args, **kwargs)`` abstractly.

  Returns:
    ``(layer calls, module calls)``: every adapted layer with a kernel, in call order (first call
    of each kernel), and ``(module path, class name)`` of every module called, in call order.
  """
  calls: dict[str, LayerCall] = {}
  modules: list[tuple[str, str]] = []

  def icpt(next_fun, a, kw, context):
    mod = context.module
    if context.method_name == "__call__":
      modules.append(("/".join(("params",) + tuple(map(str, mod.path))), type(mod).__name__))
    kind = _kind(mod, next_fun, context.method_name)
    kernel = _kernel(mod, kind.param) if kind is not None else None
    if kernel is not None:
      shape = tuple(kernel.shape)
      path = _path(mod, kind.param)
      if isinstance(kernel, QArray) and a:
        raise ValueError(f"{path}: the variables are already quantized; pass the float "
                         "variables to learn the layouts")
      lay = kind.layout(mod, shape, a, kw)
      prev = calls.get(path)
      if prev is not None and (prev.shape, prev.layout) != (shape, lay):
        raise ValueError(f"{path}: the kernel is used by two layers with different layouts "
                         f"({prev.layout.describe()} and {lay.describe()}); keep it in float "
                         f"with Rule(pattern={path!r}, weight=None)")
      lay.check(shape, name=path)
      calls.setdefault(path, LayerCall(path, shape, lay, type(mod).__name__))
    return next_fun(*a, **kw)

  fn = _apply_fn(model)
  with nn.intercept_methods(icpt):
    abstract_call(fn, variables, *args, **kwargs)
  return list(calls.values()), modules


def stack_positions(full: Sequence[int], one: Sequence[int], *, path: str) -> tuple[int, ...]:
  """Axes of a stacked kernel of shape ``full`` that ``nn.scan``/``nn.vmap`` added to one layer's
  kernel of shape ``one``.  Where several placements fit (equal adjacent sizes), the leading one
  is taken (Flax's default ``variable_axes={"params": 0}``)."""
  full, one = tuple(full), tuple(one)
  k = len(full) - len(one)
  if k >= 0:
    for drop in itertools.combinations(range(len(full)), k):
      if tuple(s for i, s in enumerate(full) if i not in drop) == one:
        return drop
  raise ValueError(f"{path}: the variables hold a kernel of shape {full}, but its layer uses one "
                   f"of shape {one}; the variables do not belong to this model")


def layouts_and_stacks(model, variables, *args, **kwargs
                       ) -> tuple[dict[str, Layout], dict[str, int], dict[str, str]]:
  """:func:`layouts`, ``{path: number of stacked layers}`` for stacked kernels, and
  ``{param path: why jq cannot run it quantized}`` for params of called modules jq does not
  adapt."""
  calls, modules = trace_layers(model, variables, *args, **kwargs)
  stored = {p: tuple(getattr(v, "shape", ())) for p, v in leaves_with_paths(variables)}
  lays, stacks = {}, {}
  for c in calls:
    full = stored.get(c.path, c.shape)
    if full == c.shape:
      lays[c.path] = c.layout
      continue
    drop = stack_positions(full, c.shape, path=c.path)
    lays[c.path] = c.layout.inserted(drop)
    n = 1
    for a in drop:
      n *= full[a]
    stacks[c.path] = n
  owners = dict(modules)
  reasons = {}
  for path in stored:
    owner = owners.get(path.rpartition("/")[0])
    if owner is not None and path not in lays:
      reasons[path] = f"{owner} runs its own code on it (jq runs {LAYER_NAMES})"
  return lays, stacks, reasons


def layouts(model: nn.Module | Callable[..., Any], variables: Any, *args, **kwargs
            ) -> dict[str, Layout]:
  """``{kernel path: Layout}`` of every kernel an adapted layer uses, read from the layer.

  The model is traced abstractly (``jax.eval_shape``: nothing is computed) with ``variables`` and
  example inputs; stacked kernels (``nn.scan``/``nn.vmap``) get their stack axes as batch axes.
  Kernels of layers jq does not run quantized (custom code on its params, ``nn.ConvTranspose``,
  ...) have no entry.

  Example:
    >>> lays = jq.nn.layouts(model, variables, tokens)
    >>> lays["params/h_0/attn/q/kernel"]     # DenseGeneral(features=(4, 64)): per head, per feature
    Layout(contracting=(0,), channels=(1, 2), batch=(), layer='nn.DenseGeneral(...)')
  """
  return layouts_and_stacks(model, variables, *args, **kwargs)[0]


__all__ = ["quantized_apply", "adapter_interceptor", "layouts", "layouts_and_stacks", "trace_layers", "einsum_layout",
           "conv_layout", "stack_positions", "abstract_call", "LayerCall", "ADAPTED"]
