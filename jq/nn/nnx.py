"""Quantized twins of nnx layers, and ``quantize_module`` that swaps them into a copy of a model.

Invariant: ``quantize_module(model, qstate)(x) ≈ model_with(dequantize_tree(qstate))(x)``; the
input model is not modified.  ``nnx.state(qmodel, nnx.Param)`` has the same paths as ``qstate``
(the twins keep ``kernel``/``bias`` as ``nnx.Param``; the kernel holds the QArray).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jq.nn import common
from jq.qarray import QArray
from jq.spec import Rule
from jq.tree import leaves_with_paths, quantize_tree


def _bias_param(bias) -> Any:
  return nnx.data(None) if bias is None else nnx.Param(bias)


def _bias_value(layer) -> jax.Array | None:
  return None if layer.bias is None else layer.bias.get_value()


class QLinearGeneral(nnx.Module):
  """``nnx.LinearGeneral`` with a QArray kernel (same call signature and output)."""

  def __init__(self, kernel: QArray, bias: jax.Array | None, *, in_features: Sequence[int],
               out_features: Sequence[int], axis: Sequence[int] = (-1,),
               batch_axis: Mapping[int, int] | None = None, dtype=None, param_dtype=jnp.float32,
               precision=None, preferred_element_type=None, path: str = "kernel"):
    self.in_features = tuple(in_features)
    self.out_features = tuple(out_features)
    self.axis = tuple(axis)
    self.batch_axis = dict(batch_axis or {})
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.precision = precision
    self.preferred_element_type = preferred_element_type
    self.path = path
    expected = (*self.batch_axis.values(), *self.in_features, *self.out_features)
    common.check_kernel(kernel, expected, path=path, layer=self._layer())
    self.kernel = nnx.Param(kernel)
    self.bias = _bias_param(bias)

  def _layer(self) -> str:
    return f"nnx.LinearGeneral({self.in_features}, {self.out_features}, axis={self.axis})"

  @classmethod
  def from_float(cls, layer: nnx.LinearGeneral, kernel: QArray, bias, path: str
                 ) -> "QLinearGeneral":
    return cls(kernel, bias, in_features=layer.in_features, out_features=layer.out_features,
               axis=layer.axis, batch_axis=dict(layer.batch_axis), dtype=layer.dtype,
               param_dtype=layer.param_dtype, precision=layer.precision,
               preferred_element_type=layer.preferred_element_type, path=path)

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    bias = None if self.bias is None else self.bias.get_value()
    return common.dense_general(
        inputs, self.kernel.get_value(), bias, axis=self.axis, batch_axes=tuple(self.batch_axis),
        features=self.out_features, dtype=self.dtype, param_dtype=self.param_dtype,
        precision=self.precision, path=self.path, layer=self._layer(),
        preferred_element_type=self.preferred_element_type, out_sharding=out_sharding)


class QLinear(nnx.Module):
  """``nnx.Linear`` with a QArray kernel (same call signature and output)."""

  def __init__(self, kernel: QArray, bias: jax.Array | None, *, in_features: int,
               out_features: int, dtype=None, param_dtype=jnp.float32, precision=None,
               preferred_element_type=None, path: str = "kernel"):
    self.in_features = in_features
    self.out_features = out_features
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.precision = precision
    self.preferred_element_type = preferred_element_type
    self.path = path
    common.check_kernel(kernel, (in_features, out_features), path=path, layer=self._layer())
    self.kernel = nnx.Param(kernel)
    self.bias = _bias_param(bias)

  def _layer(self) -> str:
    return f"nnx.Linear({self.in_features}, {self.out_features})"

  @classmethod
  def from_float(cls, layer: nnx.Linear, kernel: QArray, bias, path: str) -> "QLinear":
    return cls(kernel, bias, in_features=layer.in_features, out_features=layer.out_features,
               dtype=layer.dtype, param_dtype=layer.param_dtype, precision=layer.precision,
               preferred_element_type=layer.preferred_element_type, path=path)

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    bias = None if self.bias is None else self.bias.get_value()
    return common.dense_general(
        inputs, self.kernel.get_value(), bias, axis=(-1,), batch_axes=(),
        features=(self.out_features,), dtype=self.dtype, param_dtype=self.param_dtype,
        precision=self.precision, path=self.path, layer=self._layer(),
        preferred_element_type=self.preferred_element_type, out_sharding=out_sharding)


class QEinsum(nnx.Module):
  """``nnx.Einsum`` with a QArray kernel (same call signature and output)."""

  def __init__(self, kernel: QArray, bias: jax.Array | None, *, einsum_str: str | None,
               kernel_shape: Sequence[int], dtype=None, param_dtype=jnp.float32, precision=None,
               preferred_element_type=None, path: str = "kernel"):
    self.einsum_str = None if einsum_str is None else einsum_str.replace(" ", "")
    self.kernel_shape = tuple(kernel_shape)
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.precision = precision
    self.preferred_element_type = preferred_element_type
    self.path = path
    common.check_kernel(kernel, self.kernel_shape, path=path, layer=self._layer(self.einsum_str))
    self.kernel = nnx.Param(kernel)
    self.bias = _bias_param(bias)

  def _layer(self, eq) -> str:
    return f"nnx.Einsum({eq!r}, {self.kernel_shape})"

  @classmethod
  def from_float(cls, layer: nnx.Einsum, kernel: QArray, bias, path: str) -> "QEinsum":
    return cls(kernel, bias, einsum_str=layer.einsum_str, kernel_shape=layer.kernel_shape,
               dtype=layer.dtype, param_dtype=layer.param_dtype, precision=layer.precision,
               preferred_element_type=layer.preferred_element_type, path=path)

  def __call__(self, inputs: jax.Array, einsum_str: str | None = None,
               out_sharding=None) -> jax.Array:
    eq = einsum_str if einsum_str is not None else self.einsum_str
    if eq is None:
      raise ValueError(f"{self.path}: no einsum_str given to the layer or the call")
    if out_sharding is not None:
      raise ValueError(f"{self.path}: QEinsum does not take out_sharding")
    bias = None if self.bias is None else self.bias.get_value()
    eq = eq.replace(" ", "")
    return common.einsum_layer(
        inputs, self.kernel.get_value(), bias, einsum_str=eq, kernel_shape=self.kernel_shape,
        dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
        path=self.path, layer=self._layer(eq),
        preferred_element_type=self.preferred_element_type)


# nnx float layer -> its quantized twin.  Exact types: a subclass may change ``__call__``.
TWINS: dict[type, type] = {nnx.Linear: QLinear, nnx.LinearGeneral: QLinearGeneral,
                           nnx.Einsum: QEinsum}
QUANTIZED_LAYERS = tuple(TWINS.values())


def _key(path: tuple) -> str:
  return "/".join(str(p) for p in path)


def _set_child(parent, key, child) -> None:
  if isinstance(key, int) or isinstance(parent, (nnx.List, list)):
    parent[key] = child
  else:
    setattr(parent, key, child)


def quantize_module(module: nnx.Module, qstate_or_rules: Any, *,
                    act_scales: Mapping[str, Any] | None = None) -> nnx.Module:
  """Returns a NEW module where Linear/LinearGeneral/Einsum layers with QArray kernels are twins.

  Args:
    module: an nnx model (not modified).
    qstate_or_rules: either ``jq.quantize_tree(nnx.state(module, nnx.Param), rules)`` (a State or
      nested mapping whose paths are ``nnx.state`` paths, e.g. ``layers/0/attn/query/kernel``),
      or a sequence of :class:`jq.Rule` to quantize the module's params with.
    act_scales: calibrated static activation scales, when ``qstate_or_rules`` are rules.

  Every float leaf of the state is written to the copy as well (so a loaded quantized checkpoint
  takes effect); layers the rules skipped stay float ``nnx`` layers.

  Example:
    >>> qmodel = quantize_module(model, jq.default_rules(jq.W8A16, jq.A8_DYNAMIC))
    >>> y = nnx.jit(lambda m, x: m(x))(qmodel, x)

  Raises:
    ValueError: a QArray for a parameter that is not the kernel of a supported layer, a QArray
      shape that disagrees with its layer, or an invalid QArray; messages name the path.
  """
  if isinstance(qstate_or_rules, Sequence) and all(isinstance(r, Rule) for r in qstate_or_rules):
    qstate = quantize_tree(nnx.state(module, nnx.Param), qstate_or_rules, act_scales=act_scales)
  elif isinstance(qstate_or_rules, (nnx.State, Mapping)):
    if act_scales is not None:
      raise ValueError("quantize_module: act_scales only applies when rules are given")
    qstate = qstate_or_rules
  else:
    raise ValueError("quantize_module: pass a quantized nnx state (from jq.quantize_tree) or a "
                     f"sequence of jq.Rule, got {type(qstate_or_rules).__name__}")
  leaves = dict(leaves_with_paths(qstate))
  new = nnx.clone(module)
  layers = list(nnx.iter_modules(new))
  modules = dict(layers)
  used: set[str] = set()
  root = new
  for path, layer in layers:
    twin_cls = TWINS.get(type(layer))
    kpath = _key(path + ("kernel",))
    if twin_cls is None or not isinstance(leaves.get(kpath), QArray):
      continue
    bpath = _key(path + ("bias",))
    bias = leaves[bpath] if bpath in leaves else _bias_value(layer)
    twin = twin_cls.from_float(layer, leaves[kpath], bias, kpath)
    used.update({kpath, bpath})
    if not path:
      root = twin
    else:
      _set_child(modules[path[:-1]], path[-1], twin)
  unused = [p for p, v in leaves.items() if isinstance(v, QArray) and p not in used]
  if unused:
    by_key = {_key(p): m for p, m in layers}
    owners = ", ".join(f"{p} ({type(by_key.get(p.rpartition('/')[0])).__name__}, shape "
                       f"{leaves[p].shape})" for p in unused)
    raise ValueError(f"quantize_module: {owners}: quantized parameters of layers that "
                     f"jq.nn.nnx does not run quantized (supported: "
                     f"{[c.__name__ for c in TWINS]} kernels); keep them in float with "
                     "Rule(pattern=..., weight=None)")
  rest = {p: v for p, v in leaves.items() if p not in used}
  if rest:
    _write_float_leaves(root, rest)
  return root


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


__all__ = ["QLinear", "QLinearGeneral", "QEinsum", "quantize_module", "TWINS", "QUANTIZED_LAYERS"]
