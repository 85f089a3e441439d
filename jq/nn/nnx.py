"""nnx: layouts read from the modules, and ``quantize_module`` that returns a quantized copy.

Each nnx layer jq runs quantized (``nnx.Linear``, ``LinearGeneral``, ``Einsum``, ``Conv``, ``Embed``
(its ``embedding`` table: lookups and ``attend``)) has a
quantized class that *subclasses* it (:class:`QLinear`, ...).  In the copy, a quantized layer's
class becomes its quantized class — for a user's subclass, a class inserted between the user's
class and the nnx base, so an override that calls ``super().__call__`` keeps its own code and
reaches jq's — and its kernel Variable holds the QArray, keeping the Variable's metadata (e.g.
``out_sharding``).  Layer attributes are untouched.  Inside ``nnx.scan``/``nnx.vmap`` stacks, each
layer sees its slice of a stacked QArray.

Invariant: ``quantize_module(model, qstate)(x) ≈ model_with(dequantize_tree(qstate))(x)``; the
input model is not modified.  ``nnx.state(qmodel, nnx.Param)`` has the same paths as ``qstate``.
"""
from __future__ import annotations

import dataclasses
import functools
import types
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from flax import nnx

from jq.layout import Layout, dense_layout
from jq.nn import common, conv
from jq.nn.linen import conv_layout, einsum_layout
from jq.ops.policy import KernelPolicy
from jq.qarray import QArray
from jq.spec import QuantSpec, Rule
from jq.tree import leaves_with_paths


def _key(path: tuple) -> str:
  return "/".join(str(p) for p in path)


def _bias(layer):
  return None if getattr(layer, "bias", None) is None else layer.bias.get_value()


class _Quantized:
  """Mixin of the quantized layer classes: the kernel path, and the float fallback (each class
  defines ``_jq_layer``, its label).  ``jq_policy``: the kernel policy given to
  :func:`quantize_module` (a static attribute, so part of what ``nnx.jit`` traces), else None:
  the current one."""
  jq_path = "kernel"
  jq_policy = None

  def _jq_float(self, base: type, kernel, inputs, args, kwargs, rows):
    common.record_float(self.jq_path, self._jq_layer(), getattr(kernel, "dtype", "float32"), rows)
    return base.__call__(self, inputs, *args, **kwargs)


class QLinear(nnx.Linear, _Quantized):
  """``nnx.Linear`` that runs a QArray kernel through ``jq.ops`` (a float kernel: as nnx does)."""

  def _jq_layer(self) -> str:
    return f"nnx.Linear({self.in_features}, {self.out_features})"

  def __call__(self, inputs: jax.Array, *args, **kwargs) -> jax.Array:
    kernel = self.kernel.get_value()
    common.observe(self.jq_path, inputs, (-1,), kernel)
    if not isinstance(kernel, QArray):
      rows = common.rows(inputs, (inputs.ndim - 1,)) if getattr(inputs, "ndim", 0) else None
      return self._jq_float(nnx.Linear, kernel, inputs, args, kwargs, rows)
    return common.dense_general(
        inputs, kernel, _bias(self), axis=(-1,), batch_axes=(), features=(self.out_features,),
        dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
        path=self.jq_path, layer=self._jq_layer(),
        preferred_element_type=self.preferred_element_type, policy=self.jq_policy, **kwargs)


class QLinearGeneral(nnx.LinearGeneral, _Quantized):
  """``nnx.LinearGeneral`` that runs a QArray kernel through ``jq.ops``."""

  def _jq_layer(self) -> str:
    return f"nnx.LinearGeneral({self.in_features}, {self.out_features}, axis={self.axis})"

  def __call__(self, inputs: jax.Array, *args, **kwargs) -> jax.Array:
    kernel = self.kernel.get_value()
    common.observe(self.jq_path, inputs, None if self.batch_axis else self.axis, kernel)
    if not isinstance(kernel, QArray):
      return self._jq_float(nnx.LinearGeneral, kernel, inputs, args, kwargs, None)
    return common.dense_general(
        inputs, kernel, _bias(self), axis=self.axis, batch_axes=tuple(self.batch_axis),
        features=self.out_features, dtype=self.dtype, param_dtype=self.param_dtype,
        precision=self.precision, path=self.jq_path, layer=self._jq_layer(),
        preferred_element_type=self.preferred_element_type, policy=self.jq_policy, **kwargs)


class QEinsum(nnx.Einsum, _Quantized):
  """``nnx.Einsum`` that runs a QArray kernel through ``jq.ops``."""

  def _jq_layer(self) -> str:
    return f"nnx.Einsum({self.einsum_str!r}, {tuple(self.kernel_shape)})"

  def __call__(self, inputs: jax.Array, einsum_str: str | None = None, *args, **kwargs):
    kernel = self.kernel.get_value()
    eq = einsum_str if einsum_str is not None else self.einsum_str
    common.observe(self.jq_path, inputs, None if eq is None else common.einsum_x_axes(
        eq, inputs.ndim, len(self.kernel_shape), path=self.jq_path), kernel)
    if not isinstance(kernel, QArray):
      return self._jq_float(nnx.Einsum, kernel, inputs, (einsum_str,) + args, kwargs, None)
    if kwargs.get("out_sharding") is not None or args:
      raise ValueError(f"{self.jq_path}: a quantized nnx.Einsum takes only inputs and einsum_str")
    if eq is None:
      raise ValueError(f"{self.jq_path}: no einsum_str given to the layer or the call")
    return common.einsum_layer(
        inputs, kernel, _bias(self), einsum_str=eq.replace(" ", ""),
        kernel_shape=tuple(self.kernel_shape), dtype=self.dtype, param_dtype=self.param_dtype,
        precision=self.precision, path=self.jq_path, layer=self._jq_layer(),
        preferred_element_type=self.preferred_element_type, policy=self.jq_policy)


class QConv(nnx.Conv, _Quantized):
  """``nnx.Conv`` that runs a QArray kernel through ``jq.ops``."""

  def _jq_layer(self) -> str:
    return f"nnx.Conv({self.in_features}, {self.out_features}, {tuple(self.kernel_size)})"

  def __call__(self, inputs: jax.Array, *args, **kwargs) -> jax.Array:
    kernel = self.kernel.get_value()
    common.observe(self.jq_path, inputs, None, kernel)
    if not isinstance(kernel, QArray):
      return self._jq_float(nnx.Conv, kernel, inputs, args, kwargs, None)
    if args or kwargs.get("out_sharding") is not None:
      raise ValueError(f"{self.jq_path}: a quantized nnx.Conv takes only the input")
    return conv.conv_layer(inputs, kernel, _bias(self), **conv.nnx_conv_attrs(self),
                           path=self.jq_path, layer=self._jq_layer())


class QEmbed(nnx.Embed, _Quantized):
  """``nnx.Embed`` whose lookups (``__call__``) and tied-head ``attend`` read a QArray table."""
  jq_path = "embedding"

  def _jq_layer(self, method: str = "") -> str:
    return f"nnx.Embed{method}({self.num_embeddings}, {self.features})"

  def _jq_dims(self, method: str = "") -> dict:
    return dict(num_embeddings=self.num_embeddings, features=self.features, dtype=self.dtype,
                param_dtype=self.param_dtype, path=self.jq_path, layer=self._jq_layer(method))

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    table = self.embedding.get_value()
    if not isinstance(table, QArray):
      common.record_float(self.jq_path, self._jq_layer(), table.dtype)
      return nnx.Embed.__call__(self, inputs, out_sharding=out_sharding)
    if out_sharding is not None:
      raise ValueError(f"{self.jq_path}: a quantized nnx.Embed takes no out_sharding")
    return common.embed_lookup(inputs, table, **self._jq_dims())

  def attend(self, query: jax.Array, out_sharding=None) -> jax.Array:
    table = self.embedding.get_value()
    common.observe(self.jq_path, query, (-1,), table)
    if not isinstance(table, QArray):
      rows = common.rows(query, (query.ndim - 1,)) if getattr(query, "ndim", 0) else None
      common.record_float(self.jq_path, self._jq_layer(".attend"), table.dtype, rows)
      return nnx.Embed.attend(self, query, out_sharding=out_sharding)
    return common.embed_attend(query, table, **self._jq_dims(".attend"),
                               precision=None, out_sharding=out_sharding, policy=self.jq_policy)


# ---- which layers, with which layouts -------------------------------------------------------

def _linear_layout(layer: nnx.Linear, shape) -> tuple[int, Layout]:
  return len(shape) - 2, dataclasses.replace(
      dense_layout(2), layer=f"nnx.Linear({layer.in_features}, {layer.out_features})")


def _linear_general_layout(layer: nnx.LinearGeneral, shape) -> tuple[int, Layout]:
  nb, ni, no = len(layer.batch_axis), len(layer.in_features), len(layer.out_features)
  lay = Layout(batch=tuple(range(nb)), contracting=tuple(range(nb, nb + ni)),
               channels=tuple(range(nb + ni, nb + ni + no)),
               layer=f"nnx.LinearGeneral({layer.in_features}, {layer.out_features})")
  return len(shape) - (nb + ni + no), lay


def _einsum_layout(layer: nnx.Einsum, shape) -> tuple[int, Layout]:
  one = tuple(layer.kernel_shape)
  if layer.einsum_str is None:
    raise _NotRunnable("its einsum_str is given only at call time")
  eq = layer.einsum_str.replace(" ", "")
  return len(shape) - len(one), einsum_layout(eq, one, layer=f"nnx.Einsum({eq!r}, {one})",
                                              path="kernel")


def _conv_layout(layer: nnx.Conv, shape) -> tuple[int, Layout]:
  n = len(layer.kernel_size) + 2
  return len(shape) - n, conv_layout(shape[len(shape) - n:],
                                     f"nnx.Conv(kernel_size={tuple(layer.kernel_size)})")


def _embed_layout(layer: nnx.Embed, shape) -> tuple[int, Layout]:
  return len(shape) - 2, common.embed_layout(
      (layer.num_embeddings, layer.features),
      f"nnx.Embed({layer.num_embeddings}, {layer.features})")


@dataclasses.dataclass(frozen=True)
class _Kind:
  base: type
  quantized: type
  layout: Callable[[Any, tuple[int, ...]], tuple[int, Layout]]
  param: str = "kernel"
  methods: tuple[str, ...] = ("__call__",)


_KINDS = (_Kind(nnx.Linear, QLinear, _linear_layout),
          _Kind(nnx.LinearGeneral, QLinearGeneral, _linear_general_layout),
          _Kind(nnx.Einsum, QEinsum, _einsum_layout), _Kind(nnx.Conv, QConv, _conv_layout),
          _Kind(nnx.Embed, QEmbed, _embed_layout, param="embedding",
                methods=("__call__", "attend")))
QUANTIZED_LAYERS = tuple(k.quantized for k in _KINDS)
LAYER_NAMES = ", ".join(f"nnx.{k.base.__name__}" for k in _KINDS)


class _NotRunnable(Exception):
  pass


def _names(code: types.CodeType, name: str) -> bool:
  if name in code.co_names:
    return True
  return any(isinstance(c, types.CodeType) and _names(c, name) for c in code.co_consts)


def _kind_of(cls: type) -> _Kind:
  """The adapted base of ``cls``; raises _NotRunnable with the reason when jq cannot run it."""
  kind = next((k for k in _KINDS if issubclass(cls, k.base)), None)
  if kind is None:
    raise _NotRunnable(f"{cls.__name__} runs its own code on its params (jq runs {LAYER_NAMES})")
  for c in cls.__mro__:
    if c is kind.base or c is kind.quantized:
      break
    for method in kind.methods:
      code = getattr(c.__dict__.get(method), "__code__", None)
      if code is not None and _names(code, kind.param):
        raise _NotRunnable(f"{c.__name__}.{method} reads self.{kind.param} itself")
  return kind


def _param_name(cls: type) -> str:
  return next((k.param for k in _KINDS if issubclass(cls, k.base)), "kernel")


@functools.lru_cache(maxsize=None)
def quantized_class(cls: type) -> type:
  """The class a layer of type ``cls`` takes in a quantized module (cached)."""
  kind = _kind_of(cls)
  if issubclass(cls, kind.quantized):
    return cls            # already quantized (e.g. explain on a quantized module)
  if cls is kind.base:
    return kind.quantized
  return type(f"Q{cls.__name__}", (cls, kind.quantized), {"__module__": cls.__module__})


@dataclasses.dataclass(frozen=True)
class ModuleLayer:
  """A layer of an nnx module that owns a ``kernel`` parameter (an ``nnx.Embed``: its
  ``embedding``)."""
  path: str
  layer: Any
  layout: Layout | None
  stack: int        # number of stacked layers (1 if not stacked)
  reason: str       # why jq cannot run it quantized ("" if it can)

  @property
  def variable(self) -> nnx.Variable:
    return getattr(self.layer, self.path.rpartition("/")[2])


def module_layers(module: nnx.Module) -> list[ModuleLayer]:
  """Every sub-module owning a ``kernel`` Param (``embedding`` for ``nnx.Embed``), with its
  layout read from the module."""
  out = []
  for path, layer in nnx.iter_modules(module):
    name = _param_name(type(layer))
    var = getattr(layer, name, None)
    if not isinstance(var, nnx.Variable):
      continue
    kpath = _key(path + (name,))
    value = var.get_value()
    shape = tuple(value.shape)
    try:
      kind = _kind_of(type(layer))
      lead, lay = kind.layout(layer, shape)
      if lead < 0:
        raise _NotRunnable(f"its kernel of shape {shape} is smaller than the layer's")
      lay = lay.stacked(lead)
      lay.check(shape, name=kpath)
      stack = 1
      for a in range(lead):
        stack *= shape[a]
      out.append(ModuleLayer(kpath, layer, lay, stack, ""))
    except _NotRunnable as e:
      out.append(ModuleLayer(kpath, layer, None, 1, str(e)))
  return out


def layouts(module: nnx.Module) -> dict[str, Layout]:
  """``{kernel path: Layout}`` (nnx.state paths) of every layer jq can run quantized."""
  return {m.path: m.layout for m in module_layers(module) if m.layout is not None}


def with_quantized_classes(module: nnx.Module, paths: Sequence[str] | None = None) -> nnx.Module:
  """A clone of ``module`` whose runnable layers (those at ``paths``, default all) have their
  quantized classes (they run float kernels as before, and report to explain and calibration)."""
  new = nnx.clone(module)
  for m in module_layers(new):
    if m.layout is not None and (paths is None or m.path in paths):
      m.layer.__class__ = quantized_class(type(m.layer))
      m.layer.jq_path = m.path
  return new


def quantize_module(module: nnx.Module, qstate_or_rules: Any, *,
                    act_scales: Mapping[str, Any] | None = None,
                    calibration_batches: Any = None,
                    policy: "KernelPolicy | bool | str | None" = None) -> nnx.Module:
  """Returns a NEW module whose layers with QArray kernels run quantized.

  Args:
    module: an nnx model (not modified).
    qstate_or_rules: a sequence of :class:`jq.Rule` (layouts are read from the layers, see
      :func:`layouts`; kernels of layers jq cannot run stay float and are reported by name), or a
      quantized state, e.g. ``jq.quantize_tree(nnx.state(module, nnx.Param), rules,
      layouts=jq.nn.layouts(module))`` or a loaded checkpoint.
    act_scales: calibrated static activation scales ``{kernel path: (scale, zero_point)}``.
    calibration_batches: inputs to calibrate static int8 activations when rules ask for them and
      ``act_scales`` is not given: an iterable of arrays (or of argument tuples).
    policy: the :class:`jq.KernelPolicy` the quantized layers dispatch under (kept on the layers
      as a static attribute; default None: the current policy where the module is traced).

  Every float leaf of a given state is written to the copy as well (so a loaded quantized
  checkpoint takes effect); kernel Variables keep their metadata (sharding annotations).

  Example:
    >>> qmodel = quantize_module(model, jq.default_rules(jq.W8A16, jq.A8_DYNAMIC))
    >>> y = nnx.jit(lambda m, x: m(x))(qmodel, x)

  Raises:
    ValueError: a QArray for a parameter that is not the kernel of a layer jq runs, a QArray
      shape that disagrees with its layer, or an invalid QArray; messages name the path.
  """
  rules_given = isinstance(qstate_or_rules, Sequence) and all(
      isinstance(r, Rule) for r in qstate_or_rules)
  if rules_given:
    from jq.nn import quantize as _quantize  # pylint: disable=import-outside-toplevel
    if calibration_batches is not None and act_scales is None:
      check_eval_mode(module, "quantize_module")
    qstate = _quantize.quantize_nnx_state(module, tuple(qstate_or_rules), act_scales=act_scales,
                                          calibration_batches=calibration_batches)
  elif isinstance(qstate_or_rules, (nnx.State, Mapping)):
    if act_scales is not None or calibration_batches is not None:
      raise ValueError("quantize_module: act_scales / calibration_batches only apply when rules "
                       "are given")
    qstate = qstate_or_rules
  else:
    hint = (f" ({qstate_or_rules.describe()}): pass jq.default_rules(spec) for one spec"
            if isinstance(qstate_or_rules, QuantSpec) else "")
    raise ValueError("quantize_module: pass a quantized nnx state (from jq.quantize_tree) or a "
                     f"sequence of jq.Rule, got {type(qstate_or_rules).__name__}{hint}")
  policy = None if policy is None else KernelPolicy.parse(policy)
  leaves = dict(leaves_with_paths(qstate))
  new = nnx.clone(module)
  layers = {m.path: m for m in module_layers(new)}
  owners = {_key(p): mod for p, mod in nnx.iter_modules(new)}
  used = set()
  for path, q in leaves.items():
    if not isinstance(q, QArray):
      continue
    m = layers.get(path)
    if m is None or m.layout is None:
      owner = type(m.layer if m is not None else owners.get(path.rpartition("/")[0])).__name__
      why = m.reason if m is not None else "it is not a layer's kernel"
      raise ValueError(f"quantize_module: {path} (shape {q.shape}, {q.qtype.value}) is quantized, "
                       f"but its layer ({owner}) cannot run it: {why}; keep it in float with "
                       f"Rule(pattern={path!r}, weight=None)")
    old = tuple(m.variable.get_value().shape)
    if tuple(q.shape) != old:
      raise ValueError(f"quantize_module: {path}: QArray shape {q.shape} ({q.qtype.value}) does "
                       f"not match the kernel of shape {old} of {m.layout.layer}")
    q.validate(path)
    m.layer.__class__ = quantized_class(type(m.layer))
    m.layer.jq_path = path
    m.layer.jq_policy = policy
    m.variable.set_value(q)
    used.add(path)
  rest = {p: v for p, v in leaves.items() if p not in used}
  if rest:
    _write_float_leaves(new, rest)
  if not rules_given:   # (a state quantized here from the module's own Params covers them)
    _check_covered(new, leaves)
  return new


def check_eval_mode(module: nnx.Module, what: str) -> None:
  """Calibration runs the model as it will infer: refuses a module with layers in training mode
  (``nnx.BatchNorm`` normalizing by the batch's statistics and updating its running ones,
  ``nnx.Dropout`` dropping; nnx builds both so until ``module.eval()``), naming them."""
  training = [f"{'/'.join(map(str, p)) or '<root>'} ({type(m).__name__})"
              for p, m in nnx.iter_modules(module)
              if getattr(m, "use_running_average", None) is False
              or (isinstance(m, nnx.Dropout) and m.deterministic is False and m.rate > 0)]
  if training:
    raise ValueError(f"{what}: layers of the module are in training mode: "
                     f"{', '.join(training[:4])}{', ...' if training[4:] else ''}; calibration "
                     "runs the model as it will infer: call module.eval() first")


def _check_covered(root: nnx.Module, leaves: Mapping[str, Any]) -> None:
  """A given state must hold every parameter of the module (a checkpoint of another model, or of
  fewer layers, left the rest at the skeleton's initial values, silently); other variables it
  lacks (BatchNorm statistics of a Param-only save) keep the module's values, with a warning."""
  missing: dict[str, list[str]] = {}
  for path, var in nnx.to_flat_state(nnx.state(root)):
    key = _key(path)
    if key not in leaves and not isinstance(var, (nnx.RngState, nnx.Cache, nnx.Intermediate,
                                                  nnx.Perturbation)):
      missing.setdefault(type(var).__name__, []).append(key)
  params = missing.pop("Param", [])
  if params:
    raise ValueError(f"quantize_module: the state holds no value for {len(params)} parameter(s) "
                     f"of the module: {', '.join(params[:4])}{', ...' if params[4:] else ''}; "
                     "it was saved from another model (or one with fewer layers)")
  if missing:
    listing = "; ".join(f"{', '.join(v[:4])}{', ...' if v[4:] else ''} ({k})"
                        for k, v in missing.items())
    warnings.warn(f"jq: quantize_module: the state holds no value for {listing}: they keep this "
                  "module's values (a fresh module's are its initial ones); save "
                  "nnx.state(qmodel), not only its nnx.Param, to keep them", stacklevel=3)


def _write_float_leaves(root: nnx.Module, values: Mapping[str, Any]) -> None:
  """Sets each Variable of ``root`` at a '/'-path (nnx.state paths) to the given array."""
  flat = {_key(p): v for p, v in nnx.to_flat_state(nnx.state(root))}
  for path, value in values.items():
    var = flat.get(path)
    if var is None:
      raise ValueError(f"quantize_module: {path} (shape {getattr(value, 'shape', None)}) is in "
                       "the quantized state but not in the module")
    old = var.get_value()
    if getattr(old, "shape", None) != getattr(value, "shape", None):
      raise ValueError(f"quantize_module: {path}: state value shape {getattr(value, 'shape', None)}"
                       f" does not match the module's {getattr(old, 'shape', None)}")
    var.set_value(value)


__all__ = ["QLinear", "QLinearGeneral", "QEinsum", "QConv", "QEmbed", "quantize_module", "layouts",
           "module_layers", "quantized_class", "with_quantized_classes", "QUANTIZED_LAYERS"]
