"""``take``: rows of a QArray, dequantized: ``jnp.take(dequantize(w), indices, axis=0)``'s twin.

An embedding lookup reads one row per token, so only those rows (their packed values, scales and
zero points) are gathered and dequantized; the table stays quantized.  Indices follow
``jnp.take``'s default: negative ones count from the end, out-of-range ones give NaN rows (Flax's
``nn.Embed`` behaviour for float tables).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jq.qarray import QArray, dequantize


def take(w: QArray, indices, *, dtype=jnp.float32, name: str = "<take>") -> jax.Array:
  """``jnp.take(dequantize(w, dtype), indices, axis=0)``, gathering only the rows it returns.

  Args:
    w: a weight-only QArray of rank >= 2 (packed along its last axis), e.g. an embedding table
      ``(vocab, features)`` quantized per row or in groups along the features.
    indices: integer array of any shape.
    dtype: floating dtype of the result.
    name: the parameter path, for messages.

  Returns:
    ``indices.shape + w.shape[1:]`` in ``dtype``.

  Example:
    >>> table = jq.quantize(embedding, jq.W8A16, layout=jq.Layout(contracting=(1,), channels=(0,)))
    >>> rows = jq.ops.take(table, tokens, dtype=jnp.bfloat16)
  """
  if not isinstance(w, QArray):
    raise ValueError(f"{name}: expected a jq.QArray, got {type(w).__name__}")
  if w.ndim < 2:
    raise ValueError(f"{name}: take needs a QArray of rank >= 2 (rows along axis 0), got shape "
                     f"{w.shape}")
  if w.activation is not None:
    raise ValueError(f"{name}: shape {w.shape} ({w.qtype.value}) quantizes its activations "
                     "(int8/fp8); a table whose rows are looked up must be weight-only")
  idx = jnp.asarray(indices)
  if not jnp.issubdtype(idx.dtype, jnp.integer):
    raise ValueError(f"{name}: indices must be integers, got dtype {idx.dtype}")
  n = w.shape[0]
  flat = idx.reshape(-1).astype(jnp.int32)
  flat = jnp.where(flat < 0, flat + n, flat)
  valid = (flat >= 0) & (flat < n)
  flat = jnp.clip(flat, 0, n - 1)
  group = flat // w.tile[0]
  pick = lambda a, i: None if a is None else jnp.take(a, i, axis=0)
  rows = dataclasses.replace(w, values=pick(w.values, flat), scale=pick(w.scale, group),
                             zero_point=pick(w.zero_point, group),
                             shape=(int(flat.shape[0]),) + tuple(w.shape[1:]),
                             tile=(1,) + tuple(w.tile[1:]))
  y = dequantize(rows, dtype, name=name)
  y = jnp.where(valid.reshape((-1,) + (1,) * (w.ndim - 1)), y, jnp.asarray(jnp.nan, y.dtype))
  return y.reshape(idx.shape + tuple(w.shape[1:]))


__all__ = ["take"]
