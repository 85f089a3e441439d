"""Conv layers (linen ``nn.Conv``, nnx ``nnx.Conv``) with a QArray kernel.

Invariant: :func:`conv_layer` computes exactly what Flax's ``Conv.__call__`` computes with
``kernel = dequantize(q)``: the same batch-dimension flattening (several leading batch dims, or
none), the same padding (``'SAME'``, ``'VALID'``, ``'CIRCULAR'``, ``'REFLECT'``, ``'CAUSAL'``, ints
and ``(low, high)`` pairs), strides, input and kernel dilation, feature groups, mask, dtype
promotion and bias broadcast, but through :func:`jq.ops.conv_general_dilated`, so the kernel stays
quantized inside the jitted computation.

The kernel layout is Flax's ``(*kernel_size, in_features // feature_group_count, features)``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.linen import dtypes as linen_dtypes
from flax.linen.linear import canonicalize_padding
from flax.nnx.nn import dtypes as nnx_dtypes
from jax import lax

from jq import numerics, ops
from jq.nn import common
from jq.qarray import QArray


def _broadcast(v, n: int, what: str, path: str) -> tuple[int, ...]:
  """Flax's ``maybe_broadcast``: None -> 1, an int -> one per spatial dim."""
  v = 1 if v is None else v
  out = (v,) * n if isinstance(v, (int, np.integer)) else tuple(v)
  if len(out) != n:
    raise ValueError(f"{path}: {what}={v!r} needs one entry per spatial dimension ({n})")
  return tuple(int(a) for a in out)


def _masked(q: QArray, mask, cdt, *, path: str) -> tuple[QArray | None, jax.Array | None]:
  """A mask applied to a quantized kernel: ``(qarray, None)`` or ``(None, float kernel)``.

  Int8 layers need a concrete 0/1 mask: masked-out entries are set to the zero point, so the
  kernel stays an exact 8-bit QArray.  Weight-only layers use ``dequantize(q) * mask`` (any mask).
  """
  if q.activation is None:
    return None, q.dequantize(cdt) * jnp.asarray(mask).astype(cdt)
  if not numerics.is_concrete(mask):
    raise ValueError(f"{path}: a Conv mask must be a concrete array for an int8-activation "
                     "kernel (it is applied to the integer weights); quantize weight-only or "
                     "skip this layer")
  m = np.asarray(mask)
  if not np.all((m == 0) | (m == 1)):
    raise ValueError(f"{path}: a Conv mask of shape {m.shape} with values other than 0 and 1 "
                     "cannot be applied to an int8-activation kernel exactly; quantize this "
                     "layer weight-only or skip it")
  zero = (jnp.zeros((), q.values.dtype) if q.zero_point is None
          else numerics.expand(q.zero_point, q.tile, q.shape).astype(q.values.dtype))
  keep = jnp.asarray(np.broadcast_to(m != 0, q.shape))
  return dataclasses.replace(q, values=jnp.where(keep, q.values, zero)), None


def conv_layer(x: jax.Array, q: QArray, bias: jax.Array | None, *,
               kernel_size: int | Sequence[int], strides, padding, input_dilation,
               kernel_dilation, feature_group_count: int, dtype, param_dtype, precision,
               path: str, layer: str, preferred_element_type=None, features: int | None = None,
               mask: jax.Array | None = None) -> jax.Array:
  """``nn.Conv`` / ``nnx.Conv`` ``__call__`` with a QArray kernel (see the module docstring).

  Args:
    x: input ``(*batch_dims, *spatial, in_features)`` (channels last; zero, one or more batch
      dims).
    q: the kernel ``(*kernel_size, in_features // feature_group_count, features)``.
    bias: ``(features,)`` or None.
    kernel_size, strides, padding, input_dilation, kernel_dilation, feature_group_count, dtype,
      param_dtype, precision, preferred_element_type, mask: the layer's attributes (see
      :func:`linen_conv_attrs` / :func:`nnx_conv_attrs`).
    path: the kernel's parameter path (for errors and ``explain``).
    layer: the Flax layer's description (for errors and ``explain``).
    features: the layer's output features, checked against ``q`` when given.

  Example:
    >>> y = conv_layer(x, qkernel, bias, **nnx_conv_attrs(layer), path="conv/kernel",
    ...                layer="nnx.Conv")
  """
  x = jnp.asarray(x)
  kernel_size = (kernel_size,) if isinstance(kernel_size, (int, np.integer)) else tuple(kernel_size)
  n = len(kernel_size)
  if x.ndim < n + 1:
    raise ValueError(f"{path}: input shape {tuple(x.shape)} dtype {x.dtype} has rank {x.ndim}, "
                     f"but {layer} with kernel_size {kernel_size} needs (*batch, {n} spatial "
                     "dims, features)")
  in_features = x.shape[-1]
  if feature_group_count < 1 or in_features % feature_group_count:
    raise ValueError(f"{path}: input features {in_features} (input shape {tuple(x.shape)}) are "
                     f"not divisible by feature_group_count={feature_group_count} of {layer}")
  out_features = features if features is not None else (
      q.shape[-1] if isinstance(q, QArray) and q.shape else -1)
  expected = kernel_size + (in_features // feature_group_count, out_features)
  q = common.check_kernel(q, expected, path=path, layer=layer, x=x)
  if bias is not None and tuple(bias.shape) != (out_features,):
    raise ValueError(f"{path}: bias shape {tuple(bias.shape)} does not match {layer}'s "
                     f"{out_features} output features")

  num_batch = x.ndim - (n + 1)
  batch_shape = x.shape[:num_batch]
  if num_batch != 1:
    x = jnp.reshape(x, (-1,) + x.shape[num_batch:])
  strides = _broadcast(strides, n, "strides", path)
  input_dilation = _broadcast(input_dilation, n, "input_dilation", path)
  kernel_dilation = _broadcast(kernel_dilation, n, "kernel_dilation", path)
  try:
    padding_lax = canonicalize_padding(padding, n)
  except ValueError as e:
    raise ValueError(f"{path}: {layer}: {e}") from e
  if padding_lax in ("CIRCULAR", "REFLECT"):
    dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation)]
    pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
    x = jnp.pad(x, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding_lax])
    padding_lax = "VALID"
  elif padding_lax == "CAUSAL":
    if n != 1:
      raise ValueError(f"{path}: {layer}: 'CAUSAL' padding is only implemented for 1D "
                       f"convolutions (kernel_size {kernel_size})")
    x = jnp.pad(x, [(0, 0), (kernel_dilation[0] * (kernel_size[0] - 1), 0), (0, 0)])
    padding_lax = "VALID"

  cdt = common.compute_dtype(x, param_dtype, bias, dtype)
  x = x.astype(cdt)
  dims = lax.ConvDimensionNumbers(lhs_spec=(0, x.ndim - 1) + tuple(range(1, x.ndim - 1)),
                                  rhs_spec=(x.ndim - 1, x.ndim - 2) + tuple(range(x.ndim - 2)),
                                  out_spec=(0, x.ndim - 1) + tuple(range(1, x.ndim - 1)))
  conv_args = (strides, padding_lax)
  conv_kwargs = dict(lhs_dilation=input_dilation, rhs_dilation=kernel_dilation,
                     dimension_numbers=dims, feature_group_count=feature_group_count,
                     precision=precision, preferred_element_type=preferred_element_type)
  float_kernel = None
  if mask is not None:
    q_masked, float_kernel = _masked(q, mask, cdt, path=path)
    q = q if q_masked is None else q_masked
  if float_kernel is not None:
    y = lax.conv_general_dilated(x, float_kernel, *conv_args, **conv_kwargs)
  else:
    y = ops.conv_general_dilated(x, q, *conv_args, **conv_kwargs, name=path)
  common.record_quantized(path, layer, q, "xla" if float_kernel is None else
                          "xla (masked: dequantized)", int(np.prod(y.shape[:-1], dtype=np.int64)))
  if bias is not None:
    y = y + bias.astype(cdt).reshape((1,) * (y.ndim - 1) + (out_features,)).astype(y.dtype)
  if num_batch != 1:
    y = jnp.reshape(y, batch_shape + y.shape[1:])
  return y


# ---- reading the attributes of the Flax layers ------------------------------------------------

def _check_plain(layer: str, where: str, custom: Sequence[tuple[str, bool]]) -> None:
  for attr, is_custom in custom:
    if is_custom:
      raise ValueError(f"{where}: {layer} has a custom {attr}; jq computes the standard "
                       "lax.conv_general_dilated / promote_dtype with a quantized kernel and would "
                       "change this layer's function, so keep it in float (a skip rule)")


def linen_conv_attrs(mod: nn.Conv, *, path: str | None = None) -> dict[str, Any]:
  """The keyword arguments of :func:`conv_layer` for a linen ``nn.Conv`` (not ``ConvLocal`` /
  ``ConvTranspose``, whose math differs); ``path`` only names the layer in errors."""
  where = path or getattr(mod, "name", None) or type(mod).__name__
  if not isinstance(mod, nn.Conv):
    raise ValueError(f"{where}: expected a flax.linen.Conv, got {type(mod).__name__}")
  _check_plain("nn.Conv", where, [
      ("conv_general_dilated", mod.conv_general_dilated is not None
       or mod.conv_general_dilated_cls is not None),
      ("promote_dtype", mod.promote_dtype is not linen_dtypes.promote_dtype)])
  return dict(kernel_size=mod.kernel_size, strides=mod.strides, padding=mod.padding,
              input_dilation=mod.input_dilation, kernel_dilation=mod.kernel_dilation,
              feature_group_count=mod.feature_group_count, dtype=mod.dtype,
              param_dtype=mod.param_dtype, precision=mod.precision, features=mod.features,
              mask=mod.mask)


def nnx_conv_attrs(layer: nnx.Conv, *, path: str | None = None) -> dict[str, Any]:
  """The keyword arguments of :func:`conv_layer` for an ``nnx.Conv``; ``path`` only names the layer
  in errors."""
  where = path or type(layer).__name__
  if not isinstance(layer, nnx.Conv):
    raise ValueError(f"{where}: expected a flax.nnx.Conv, got {type(layer).__name__}")
  _check_plain("nnx.Conv", where, [
      ("conv_general_dilated", layer.conv_general_dilated is not lax.conv_general_dilated),
      ("promote_dtype", layer.promote_dtype is not nnx_dtypes.promote_dtype)])
  mask = layer.mask
  if isinstance(mask, nnx.Variable):
    mask = mask[...]
  return dict(kernel_size=layer.kernel_size, strides=layer.strides, padding=layer.padding,
              input_dilation=layer.input_dilation, kernel_dilation=layer.kernel_dilation,
              feature_group_count=layer.feature_group_count, dtype=layer.dtype,
              param_dtype=layer.param_dtype, precision=layer.precision,
              preferred_element_type=layer.preferred_element_type,
              features=layer.out_features, mask=mask)


__all__ = ["conv_layer", "linen_conv_attrs", "nnx_conv_attrs"]
