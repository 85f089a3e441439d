"""``jq.kv_cache``: int8 / fp8 keys and values with a scale per token and head."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jq
from jq import kv_cache as kvc

SHAPE = (2, 7, 3, 16)   # (batch, seq, kv_heads, head_dim)


def _kv(seed=0, shape=SHAPE, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  # rows of very different magnitudes, so one scale per (token, head) really matters
  mags = 10.0 ** rng.uniform(-3, 3, size=shape[:3] + (1,))
  return jnp.asarray(rng.standard_normal(shape) * mags, dtype)


def test_exported_and_kinds_validated():
  assert jq.kv_cache is kvc
  assert kvc.as_kind("int8") is kvc.KVKind.INT8 and kvc.as_kind(kvc.KVKind.FP8) is kvc.KVKind.FP8
  with pytest.raises(ValueError, match=r"one of \['none', 'int8', 'fp8'\], got 'int4'"):
    kvc.as_kind("int4")
  with pytest.raises(ValueError, match="nothing to quantize"):
    kvc.quantize_kv(_kv(), "none")
  with pytest.raises(ValueError, match=r"\(batch, seq, kv_heads, head_dim\)"):
    kvc.quantize_kv(jnp.ones((3, 4)), "int8")


def test_int8_round_trip_is_within_half_a_step_per_token_and_head():
  x = _kv()
  values, scales = kvc.quantize_kv(x, "int8")
  assert values.dtype == jnp.int8 and values.shape == SHAPE
  assert scales.dtype == jnp.float32 and scales.shape == SHAPE[:3] + (1,)
  amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
  np.testing.assert_allclose(scales, amax / 127, rtol=1e-6)
  assert int(jnp.max(jnp.abs(values.astype(jnp.int32)))) == 127   # the full range is used
  err = jnp.abs(kvc.dequantize_kv(values, scales) - x)
  assert bool(jnp.all(err <= scales / 2 * (1 + 1e-5)))


def test_fp8_round_trip_relative_error():
  x = _kv(1)
  values, scales = kvc.quantize_kv(x, "fp8")
  assert values.dtype == jnp.float8_e4m3fn
  np.testing.assert_allclose(scales, jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 448, rtol=1e-6)
  err = jnp.abs(kvc.dequantize_kv(values, scales) - x)
  # 3 mantissa bits: 2^-4 relative above the normal range (2^-6 in scaled units), 2^-10 below
  bound = jnp.maximum(2.0 ** -4 * jnp.abs(x), 2.0 ** -10 * scales) * (1 + 1e-5)
  assert bool(jnp.all(err <= bound))
  assert bool(jnp.all(jnp.isfinite(kvc.dequantize_kv(values, scales))))


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_zero_rows_and_bfloat16(kind):
  x = _kv(2, dtype=jnp.bfloat16).at[0, 3].set(0).at[1, :, 2].set(0)
  values, scales = kvc.quantize_kv(x, kind)
  assert bool(jnp.all(scales > 0)) and bool(jnp.all(jnp.isfinite(scales)))
  y = kvc.fake_quant_kv(x, kind)
  assert y.dtype == jnp.bfloat16
  assert bool(jnp.all(y[0, 3] == 0)) and bool(jnp.all(y[1, :, 2] == 0))
  assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))


def test_fake_quant_none_is_the_identity():
  x = _kv()
  assert kvc.fake_quant_kv(x, "none") is x


@pytest.mark.parametrize("kind", ["none", "int8", "fp8"])
def test_cache_written_token_by_token_reads_what_fake_quant_computes(kind):
  x = _kv(3)
  b, t, h, d = SHAPE
  update = jax.jit(kvc.update)
  compiled = update._cache_size()
  cache = kvc.init(b, t + 3, h, d, kind)
  assert kvc.kind_of(cache).value == kind
  cache = update(cache, x[:, :4], jnp.int32(0))           # a prefill
  for i in range(4, t):                                   # then one token at a time
    cache = update(cache, x[:, i:i + 1], jnp.int32(i))
  assert update._cache_size() - compiled == 2             # one compile per write length
  got = jax.jit(kvc.read, static_argnums=1)(cache, jnp.float32)
  assert got.shape == (b, t + 3, h, d)
  np.testing.assert_array_equal(got[:, :t], kvc.fake_quant_kv(x, kind))
  np.testing.assert_array_equal(got[:, t:], 0)            # unwritten positions read as 0


def test_bytes_per_token():
  # SmolLM2-135M: 30 layers, 3 kv heads of 64
  assert kvc.bytes_per_token(30, 3, 64, "none", jnp.bfloat16) == 2 * 30 * 3 * 64 * 2 == 23040
  assert kvc.bytes_per_token(30, 3, 64, "none", jnp.float32) == 46080
  assert kvc.bytes_per_token(30, 3, 64, "int8") == 2 * 30 * 3 * (64 + 4) == 12240
  assert kvc.bytes_per_token(30, 3, 64, "fp8", jnp.float32) == 12240
  # and it is what init really allocates per position
  for kind in ("none", "int8", "fp8"):
    layer = kvc.init(1, 5, 3, 64, kind, jnp.bfloat16)
    nbytes = sum(a.nbytes for a in jax.tree.leaves(layer))
    assert 2 * 30 * nbytes == 5 * kvc.bytes_per_token(30, 3, 64, kind, jnp.bfloat16)
