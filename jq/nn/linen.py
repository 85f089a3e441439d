"""Run an unchanged linen model on a quantized variables tree.

``quantized_apply(model.apply)`` returns an apply function with the same signature.  Inside it,
``flax.linen.intercept_methods`` (a public hook, scoped to the call) intercepts ``__call__`` of
``nn.Dense``, ``nn.DenseGeneral`` and ``nn.Einsum``.  The QArrays travel in the ordinary
variables dict: flax stores any pytree leaf, and the interceptor reads the layer's kernel with
``module.get_variable("params", "kernel")``.  When it is a QArray, the interceptor computes the
layer through ``jq.ops`` and never calls the float ``__call__`` (so ``self.param`` never sees the
QArray); otherwise the float layer runs as written.  Nothing global is patched, no parameter map is
captured, so the function is structure-independent, jits once, and passes ``mutable=[...]``
collections (e.g. a KV cache) through untouched.

Invariant: ``quantized_apply(m.apply)(qvars, x) ≈ m.apply(dequantize_tree(qvars), x)``, exactly up
to float reassociation for weight-only layers.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
from flax.linen.module import merge_param

from jq.nn import common
from jq.qarray import QArray


def _as_tuple(v) -> tuple:
  return tuple(v) if isinstance(v, (tuple, list)) else (v,)


def _path(mod: nn.Module, leaf: str = "kernel") -> str:
  return "/".join(("params",) + tuple(str(p) for p in mod.path) + (leaf,))


def _bias(mod: nn.Module):
  return mod.get_variable("params", "bias") if mod.use_bias else None


def _dense(mod: nn.Dense, q: QArray, inputs, *args, **kwargs):
  if args or kwargs:
    raise ValueError(f"{_path(mod)}: nn.Dense.__call__ takes only the input")
  return common.dense_general(inputs, q, _bias(mod), axis=(-1,), batch_axes=(),
                              features=(mod.features,), dtype=mod.dtype,
                              param_dtype=mod.param_dtype, precision=mod.precision,
                              path=_path(mod), layer=f"nn.Dense(features={mod.features})")


def _dense_general(mod: nn.DenseGeneral, q: QArray, inputs, *args, **kwargs):
  if args or kwargs:
    raise ValueError(f"{_path(mod)}: nn.DenseGeneral.__call__ takes only the input")
  features, axis, batch = _as_tuple(mod.features), _as_tuple(mod.axis), _as_tuple(mod.batch_dims)
  return common.dense_general(inputs, q, _bias(mod), axis=axis, batch_axes=batch,
                              features=features, dtype=mod.dtype, param_dtype=mod.param_dtype,
                              precision=mod.precision, path=_path(mod),
                              layer=f"nn.DenseGeneral(features={features}, axis={axis})")


def _einsum(mod: nn.Einsum, q: QArray, inputs, einsum_str: str | None = None):
  eq = merge_param("einsum_str", mod.einsum_str, einsum_str).replace(" ", "")
  return common.einsum_layer(inputs, q, _bias(mod), einsum_str=eq, kernel_shape=tuple(mod.shape),
                             dtype=mod.dtype, param_dtype=mod.param_dtype,
                             precision=mod.precision, path=_path(mod),
                             layer=f"nn.Einsum({eq!r}, shape={tuple(mod.shape)})",
                             preferred_element_type=mod.preferred_element_type)


# Exact layer classes (and subclasses that keep their ``__call__``) the adapter computes.
_HANDLERS: tuple[tuple[type, Callable], ...] = (
    (nn.Dense, _dense), (nn.DenseGeneral, _dense_general), (nn.Einsum, _einsum))


_ADAPTED = tuple(cls for cls, _ in _HANDLERS)


def _handler(mod: nn.Module):
  for cls, fn in _HANDLERS:
    if isinstance(mod, cls) and type(mod).__call__ is cls.__call__:
      return fn
  return None


def _contracted_rows(mod: nn.Module, inputs) -> int | None:
  """Tokens of a float Dense/DenseGeneral call (for ``explain``)."""
  ndim = getattr(inputs, "ndim", None)
  if not ndim:
    return None
  if isinstance(mod, nn.Dense):
    axes = (-1,)
  elif isinstance(mod, nn.DenseGeneral):
    axes = _as_tuple(mod.axis)
  else:
    return None
  return common.rows(inputs, tuple(a % ndim for a in axes))


def _refuse_quantized_params(mod: nn.Module) -> None:
  """A module jq does not adapt must not receive a QArray through ``self.param``."""
  if mod.scope is None:
    return
  params = mod.variables.get("params", {})
  for name, value in params.items():
    if isinstance(value, QArray):
      raise ValueError(
          f"{_path(mod, name)}: {type(mod).__name__} has a quantized parameter of shape "
          f"{value.shape} ({value.qtype.value}), but jq.nn.linen only runs nn.Dense, "
          "nn.DenseGeneral and nn.Einsum quantized; keep it in float with "
          f"Rule(pattern={_path(mod, name)!r}, weight=None)")


def _interceptor(next_fun, args, kwargs, context):
  """Routes Dense/DenseGeneral/Einsum ``__call__`` with a QArray kernel to ``jq.ops``."""
  mod = context.module
  handler = _handler(mod) if context.method_name == "__call__" else None
  if handler is None:
    if not isinstance(mod, _ADAPTED):  # (lifted wrappers of adapted layers reach them inside)
      _refuse_quantized_params(mod)
    return next_fun(*args, **kwargs)
  if mod.scope is None or not mod.has_variable("params", "kernel"):
    return next_fun(*args, **kwargs)  # initialization: the float layer creates its params
  kernel = mod.get_variable("params", "kernel")
  if not isinstance(kernel, QArray):
    if args:
      common.record_float(_path(mod), type(mod).__name__, getattr(kernel, "dtype", "float32"),
                          _contracted_rows(mod, args[0]))
    return next_fun(*args, **kwargs)
  if not args:
    raise ValueError(f"{_path(mod)}: {type(mod).__name__} called without an input")
  return handler(mod, kernel, *args, **kwargs)


def quantized_apply(apply_fn_or_module: nn.Module | Callable[..., Any]) -> Callable[..., Any]:
  """Returns ``apply(variables, *args, **kwargs)`` that runs the model on QArray parameters.

  ``variables`` is the model's variables dict with some kernels replaced by QArrays (the output of
  ``jq.quantize_tree``); layers whose kernel is a plain array run in float.  The returned function
  has ``model.apply``'s signature (``rngs``, ``method``, ``mutable`` pass through), is pure, and
  can be jitted once and called many times.

  Args:
    apply_fn_or_module: a linen module, or its ``apply`` (or any function that calls it).

  Example:
    >>> qvars = jq.quantize_tree(variables, jq.default_rules(jq.W4A16_G128))
    >>> qapply = jax.jit(quantized_apply(model))
    >>> logits = qapply(qvars, tokens)

  Raises:
    ValueError: (at trace time) a QArray that does not fit its layer, a mode the layer cannot run,
      or a quantized parameter of a layer type jq does not adapt; messages name the parameter path.
  """
  fn = apply_fn_or_module.apply if isinstance(apply_fn_or_module, nn.Module) else apply_fn_or_module
  if not callable(fn):
    raise ValueError(f"quantized_apply: expected a linen Module or its apply function, got "
                     f"{type(apply_fn_or_module).__name__}")

  @functools.wraps(fn)
  def apply(variables, *args, **kwargs):
    with nn.intercept_methods(_interceptor):
      return fn(variables, *args, **kwargs)

  return apply


__all__ = ["quantized_apply"]
