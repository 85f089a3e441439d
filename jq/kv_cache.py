"""Quantized key/value caches: int8 or float8 (e4m3) values with one scale per token and head.

Keys and values of shape ``(batch, seq, kv_heads, head_dim)`` are stored with one float32 scale
per ``(batch, token, head)``::

  scale = max(amax / qmax, tiny)      amax = max |x[b, t, h, :]|
  int8:  q = clip(round(x / scale), -127, 127)            qmax = 127
  fp8:   q = float8_e4m3fn(clip(x / scale, -448, 448))    qmax = 448 (round to nearest even)
  x ≈ q * scale

A zero row gets a positive scale and dequantizes to exactly 0.  Per token, so a new token's
scale never depends on later tokens: writing token by token stores what one write of the whole
sequence stores, and :func:`fake_quant_kv` of a full sequence is exactly what attention reads back
from the cache.  Int8 errors are at most ``scale / 2`` per element; fp8 (3 mantissa bits) keeps
``2**-4`` relative error above its subnormal range.

The cache itself is one array per layer and per keys/values: a plain float array (kind
``"none"``) or a :class:`QuantizedKV`.  :func:`init`, :func:`update` and :func:`read` take either,
so a Flax decoder writes and reads its cache the same way for every kind, under ``jax.jit`` with
static shapes.

Example:
  >>> k_cache = jq.kv_cache.init(batch=1, max_len=256, kv_heads=3, head_dim=64, kind="int8")
  >>> k_cache = jq.kv_cache.update(k_cache, k_new, index)        # (1, T, 3, 64) at index
  >>> keys = jq.kv_cache.read(k_cache, jnp.bfloat16)            # (1, 256, 3, 64) for attention
  >>> jq.kv_cache.bytes_per_token(30, 3, 64, "int8", jnp.bfloat16)   # 12240 (bf16 cache: 23040)
"""
from __future__ import annotations

import dataclasses
import enum

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

SCALE_DTYPE = np.dtype(np.float32)


class KVKind(enum.Enum):
  """How a KV cache stores keys and values: float (``NONE``), int8 or float8 e4m3 (``FP8``)."""
  NONE = "none"
  INT8 = "int8"
  FP8 = "fp8"


_STORAGE = {KVKind.INT8: (np.dtype(jnp.int8), 127.0),          # (storage dtype, qmax)
            KVKind.FP8: (np.dtype(jnp.float8_e4m3fn), 448.0)}
KINDS = tuple(k.value for k in KVKind)


def as_kind(kind: str | KVKind) -> KVKind:
  """``kind`` as a :class:`KVKind`; ValueError naming a value that is not one."""
  if isinstance(kind, KVKind):
    return kind
  try:
    return KVKind(kind)
  except ValueError:
    raise ValueError(f"KV cache kind must be one of {list(KINDS)}, got {kind!r}") from None


def _quantized(kind: str | KVKind, where: str) -> KVKind:
  kind = as_kind(kind)
  if kind is KVKind.NONE:
    raise ValueError(f"{where}: kind 'none' stores floats; there is nothing to quantize")
  return kind


def _check_kv(x: jax.Array, where: str) -> None:
  if x.ndim != 4:
    raise ValueError(f"{where}: expected (batch, seq, kv_heads, head_dim), got shape {x.shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{where}: expected a float array, got dtype {x.dtype}")


def quantize_kv(x: ArrayLike, kind: str | KVKind) -> tuple[jax.Array, jax.Array]:
  """``(values, scales)`` with ``x ≈ values * scales``; one scale per ``(batch, token, head)``.

  Args:
    x: ``(batch, seq, kv_heads, head_dim)`` float keys or values.
    kind: ``"int8"`` or ``"fp8"``.

  Returns:
    ``values`` of ``x``'s shape (int8 or float8_e4m3fn) and float32 ``scales`` of shape
    ``(batch, seq, kv_heads, 1)``.

  Example:
    >>> values, scales = quantize_kv(k, "int8")
  """
  kind = _quantized(kind, "quantize_kv")
  x = jnp.asarray(x)
  _check_kv(x, "quantize_kv")
  dtype, qmax = _STORAGE[kind]
  x32 = x.astype(jnp.float32)
  amax = jnp.max(jnp.abs(x32), axis=-1, keepdims=True)
  scales = jnp.maximum(amax / qmax, jnp.finfo(jnp.float32).tiny)
  scaled = x32 / scales
  if kind is KVKind.INT8:
    scaled = jnp.round(scaled)
  return jnp.clip(scaled, -qmax, qmax).astype(dtype), scales


def dequantize_kv(values: ArrayLike, scales: ArrayLike,
                  dtype: DTypeLike = jnp.float32) -> jax.Array:
  """``values * scales`` (computed in float32) in ``dtype``.

  Example:
    >>> k_hat = dequantize_kv(*quantize_kv(k, "fp8"), jnp.bfloat16)
  """
  values, scales = jnp.asarray(values), jnp.asarray(scales)
  return (values.astype(jnp.float32) * scales.astype(jnp.float32)).astype(dtype)


def fake_quant_kv(x: ArrayLike, kind: str | KVKind) -> jax.Array:
  """What attention reads back from a cache of ``kind`` holding ``x``, in ``x``'s dtype (``x``
  itself for ``"none"``).  For full-sequence forwards without a cache (perplexity).

  Example:
    >>> k_read = fake_quant_kv(k, "int8")    # == read(update(init(..., "int8"), k, 0), k.dtype)
  """
  kind = as_kind(kind)
  if kind is KVKind.NONE:
    return x
  x = jnp.asarray(x)
  return dequantize_kv(*quantize_kv(x, kind), x.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedKV:
  """One layer's keys (or values) in a fixed-size quantized cache.

  ``x[b, t, h, :] ≈ values[b, t, h, :] * scales[b, t, h, 0]``; the kind is read from the values'
  dtype (int8 or float8_e4m3fn), so no metadata can drift from the data.

  Attributes:
    values: ``(batch, max_len, kv_heads, head_dim)`` int8 or float8_e4m3fn.
    scales: ``(batch, max_len, kv_heads, 1)`` float32.
  """
  values: jax.Array
  scales: jax.Array

  @property
  def kind(self) -> KVKind:
    for kind, (dtype, _) in _STORAGE.items():
      if self.values.dtype == dtype:
        return kind
    raise ValueError(f"QuantizedKV: values of dtype {self.values.dtype} are neither int8 nor "
                     "float8_e4m3fn")

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.values.shape)


Cache = jax.Array | QuantizedKV


def kind_of(cache: Cache) -> KVKind:
  """The kind of a cache array made by :func:`init`."""
  return cache.kind if isinstance(cache, QuantizedKV) else KVKind.NONE


def init(batch: int, max_len: int, kv_heads: int, head_dim: int, kind: str | KVKind = "none",
         dtype: DTypeLike = jnp.float32) -> Cache:
  """An empty cache for ``max_len`` positions: a zero float array of ``dtype`` for ``"none"``,
  else a :class:`QuantizedKV` (zero values, unit scales; ``dtype`` is not used).

  Example:
    >>> v_cache = init(2, 128, 4, 64, kind="fp8")
  """
  kind = as_kind(kind)
  for name, n in (("batch", batch), ("max_len", max_len), ("kv_heads", kv_heads),
                  ("head_dim", head_dim)):
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
      raise ValueError(f"kv_cache.init: {name} must be a positive int, got {n!r}")
  shape = (batch, max_len, kv_heads, head_dim)
  if kind is KVKind.NONE:
    return jnp.zeros(shape, dtype)
  return QuantizedKV(values=jnp.zeros(shape, _STORAGE[kind][0]),
                     scales=jnp.ones(shape[:3] + (1,), SCALE_DTYPE))


def update(cache: Cache, x: ArrayLike, index: ArrayLike) -> Cache:
  """``cache`` with the new tokens ``x`` ``(batch, T, kv_heads, head_dim)`` written at positions
  ``index .. index + T - 1`` (``lax.dynamic_update_slice``; quantized first for a quantized
  cache).  Writing past the end is not detected inside jit (the slice is clamped).

  Example:
    >>> cache = update(cache, k_new, cache_index)
  """
  x = jnp.asarray(x)
  start = (0, index, 0, 0)
  if not isinstance(cache, QuantizedKV):
    return jax.lax.dynamic_update_slice(cache, x.astype(cache.dtype), start)
  values, scales = quantize_kv(x, cache.kind)
  return QuantizedKV(values=jax.lax.dynamic_update_slice(cache.values, values, start),
                     scales=jax.lax.dynamic_update_slice(cache.scales, scales, start))


def read(cache: Cache, dtype: DTypeLike) -> jax.Array:
  """The whole cache as ``(batch, max_len, kv_heads, head_dim)`` in ``dtype``, for attention
  (dequantized for a quantized cache; inside a jitted step XLA fuses this into the read).

  Example:
    >>> keys = read(k_cache, q.dtype)
  """
  if isinstance(cache, QuantizedKV):
    return dequantize_kv(cache.values, cache.scales, dtype)
  return cache.astype(dtype)


def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, kind: str | KVKind,
                    float_dtype: DTypeLike = jnp.bfloat16) -> int:
  """Bytes one token occupies in the cache of a whole model: keys and values of every layer,
  ``2 * num_layers * kv_heads * (head_dim * itemsize + scale bytes)``; a float cache
  (``"none"``) stores ``float_dtype`` and no scales.

  Example:
    >>> bytes_per_token(30, 3, 64, "none", jnp.bfloat16), bytes_per_token(30, 3, 64, "int8")
    (23040, 12240)
  """
  kind = as_kind(kind)
  if kind is KVKind.NONE:
    per_head = head_dim * np.dtype(float_dtype).itemsize
  else:
    per_head = head_dim * _STORAGE[kind][0].itemsize + SCALE_DTYPE.itemsize
  return int(2 * num_layers * kv_heads * per_head)


__all__ = ["KINDS", "KVKind", "QuantizedKV", "as_kind", "bytes_per_token", "dequantize_kv",
           "fake_quant_kv", "init", "kind_of", "quantize_kv", "read", "update"]
