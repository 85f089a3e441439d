"""jq.numerics and jq.qtypes: packing, tiling layouts, scale rounding, NF4 encoding."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from jq import numerics
from jq.qtypes import NF4_TABLE, QType

# Integer-coded types (float8 stores values, not codes: tests/core/test_fp8.py).
ALL_QTYPES = [q for q in QType if not q.is_float]


def np_expand(t, tile, shape):
  """Reference: repeat each tile value over its block, cut to shape (numpy only)."""
  t = np.asarray(t)
  for axis, (tl, s) in enumerate(zip(tile, shape)):
    if t.shape[axis] != 1 or s == 1:
      t = np.repeat(t, tl, axis=axis).take(np.arange(s), axis=axis)
  return t


# A fixed menu of shapes (odd and even last axes, ranks 1-3) keeps compilations bounded; the
# values are what hypothesis explores.
PACK_SHAPES = [(1,), (7,), (2, 8), (3, 5), (2, 3, 9), (4, 1), (2, 17)]


@functools.lru_cache(maxsize=None)
def _round_trip_fn(qtype):
  return jax.jit(lambda v: numerics.unpack(numerics.pack(v, qtype), qtype, v.shape[-1]))


@st.composite
def ints_in_range(draw, qtype):
  shape = draw(st.sampled_from(PACK_SHAPES))
  seed = draw(st.integers(0, 2**31 - 1))
  rng = np.random.default_rng(seed)
  v = rng.integers(qtype.qmin, qtype.qmax + 1, size=shape)
  # hit the extremes for sure
  v.flat[0] = qtype.qmin
  v.flat[-1] = qtype.qmax
  return v.astype(qtype.unpacked_dtype)


@pytest.mark.parametrize("qtype", ALL_QTYPES, ids=lambda q: q.value)
@given(data=st.data())
def test_pack_unpack_round_trip(qtype, data):
  v = data.draw(ints_in_range(qtype))
  packed = numerics.pack(jnp.asarray(v), qtype)
  assert packed.shape == numerics.packed_shape(v.shape, qtype)
  assert packed.dtype == qtype.storage_dtype
  out = numerics.unpack(packed, qtype, v.shape[-1])
  assert out.dtype == qtype.unpacked_dtype
  np.testing.assert_array_equal(np.asarray(out), v)
  host = numerics.pack(v, qtype, xp=np)   # the numpy road (GGUF / compressed-tensors codecs)
  assert host.dtype == qtype.storage_dtype
  np.testing.assert_array_equal(host, np.asarray(packed))
  np.testing.assert_array_equal(numerics.unpack(host, qtype, v.shape[-1], xp=np), v)
  v2 = data.draw(ints_in_range(qtype))  # more values through the jitted round trip
  np.testing.assert_array_equal(np.asarray(_round_trip_fn(qtype)(jnp.asarray(v2))), v2)


def test_pack_bit_layout_little_end_first():
  p = numerics.pack(jnp.array([1, 2, 3], jnp.uint8), QType.UINT4)
  np.testing.assert_array_equal(np.asarray(p), [0x21, 0x03])  # odd length zero-padded
  p = numerics.pack(jnp.array([-1, 0, 1, -2], jnp.int8), QType.INT2)
  assert int(p[0]) == 0b10_01_00_11
  # 3-bit: eight values in three bytes, read as one little-endian 24-bit word (crossing bytes)
  p = numerics.pack(jnp.array([-4, 3, -1, 0, 0, 0, 0, 0, 1], jnp.int8), QType.INT3)
  np.testing.assert_array_equal(np.asarray(p), [0xDC, 0x01, 0x00, 0x01, 0x00, 0x00])
  p = numerics.pack(jnp.array([0, 0, 0, 0, 0, 0, 0, 7], jnp.uint8), QType.UINT3)
  np.testing.assert_array_equal(np.asarray(p), [0x00, 0x00, 0xE0])
  assert numerics.packed_shape((4, 129), QType.INT3) == (4, 17 * 3)
  # a scalar is one byte, its value in the low bits
  assert int(numerics.pack(jnp.array(-1, jnp.int8), QType.INT3)) == 0b111
  assert int(numerics.unpack(jnp.array(0b111, jnp.uint8), QType.INT3, 1)) == -1
  assert numerics.pack(jnp.array([-128, 127], jnp.int8), QType.INT8).dtype == jnp.int8


@pytest.mark.parametrize("qtype", ALL_QTYPES, ids=lambda q: q.value)
def test_qtype_properties(qtype):
  assert qtype.qmax - qtype.qmin + 1 == 2 ** qtype.bits
  assert qtype.storage_bits * qtype.pack_values == 8 * qtype.pack_bytes
  assert qtype.storage_bits == qtype.bits   # densely packed: no padding bits inside a unit
  assert np.iinfo(qtype.unpacked_dtype).min <= qtype.qmin
  assert np.iinfo(qtype.unpacked_dtype).max >= qtype.qmax
  if qtype is not QType.NF4:
    assert QType.from_bits(qtype.bits, signed=qtype.signed) is qtype


@pytest.mark.parametrize("bits", [0, 1, 5, 6, 7, 16, -4])
def test_from_bits_rejects_unsupported(bits):
  with pytest.raises(ValueError, match=f"bits={bits}"):
    QType.from_bits(bits)


SHAPE_TILES = [
    ((7, 10), (3, 1)), ((8, 12), (4, 1)), ((5, 9), (5, 1)), ((4, 6, 10), (1, 4, 6)),
    ((10, 3), (1, 3)), ((9,), (4,)), ((6, 7), (6, 7)), ((3, 20, 5), (3, 8, 1)),
    ((12, 10), (5, 4)),  # two grouped axes, both partial
]


@pytest.mark.parametrize("shape,tile", SHAPE_TILES)
def test_split_merge_expand(shape, tile):
  rng = np.random.default_rng(0)
  x = rng.standard_normal(shape).astype(np.float32)
  xb = numerics.split(jnp.asarray(x), tile)
  assert xb.shape == numerics.split_shape(shape, tile)
  np.testing.assert_array_equal(np.asarray(numerics.merge(xb, tile, shape)), x)
  # per-tile max via the split layout equals the reference block max
  stat = numerics.stats_to_tiles(
      jnp.max(xb, axis=numerics.tile_axes(shape, tile), keepdims=True), shape, tile)
  tiles = numerics.num_tiles(shape, tile)
  assert stat.shape == tiles
  ref = numerics.from_block_stats(jnp.nanmax(
      numerics.to_blocks(jnp.asarray(x), tile), axis=numerics.tile_reduce_axes(len(shape)),
      keepdims=True))
  np.testing.assert_array_equal(np.asarray(stat), np.asarray(ref))
  # expand agrees with a numpy repeat reference
  t = rng.standard_normal(tiles).astype(np.float32)
  full = jnp.broadcast_to(numerics.expand(jnp.asarray(t), tile, shape), shape)
  np.testing.assert_array_equal(np.asarray(full), np.broadcast_to(np_expand(t, tile, shape), shape))


def test_split_nan_fill_marks_padding():
  xb = numerics.split(jnp.ones((5, 2)), (2, 1), fill=float("nan"))
  assert xb.shape == (3, 2, 2)
  assert int(jnp.sum(jnp.isnan(xb))) == 2


@given(st.floats(min_value=0, max_value=float(np.float32(3e38)), width=32, allow_subnormal=True))
def test_snap_scale_float32(y):
  s = numerics.snap_scale(jnp.float32(y), jnp.float32)
  sv = float(s)
  assert np.isfinite(sv) and sv > 0
  lo, hi = numerics.scale_limits(jnp.float32)
  assert lo <= sv <= hi
  if y < lo:
    assert sv == lo
  elif y <= hi:
    assert abs(sv - y) <= y * 2.0 ** -numerics.SCALE_BITS
  bits = np.asarray(s).view(np.uint32)
  assert bits % (1 << (24 - numerics.SCALE_BITS)) == 0  # on the 20-bit grid
  assert float(numerics.snap_scale(s, jnp.float32)) == sv  # idempotent
  # tiny perturbations (float noise) land back on the same scale
  assert float(numerics.snap_scale(s * np.float32(1 + 2**-22), jnp.float32)) == sv
  assert float(numerics.snap_scale(s * np.float32(1 - 2**-22), jnp.float32)) == sv
  p = numerics.prev_scale(s)
  assert float(p) < sv
  if sv > lo:  # the core never steps below the smallest scale
    assert float(numerics.snap_scale(p, jnp.float32)) == float(p)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_snap_scale_low_precision(dtype):
  y = jnp.array([0.0, 1e-30, 1e-3, 0.1, 3.0, 1e30], jnp.float32)
  s = numerics.snap_scale(y, dtype)
  assert s.dtype == dtype
  sf = np.asarray(s.astype(jnp.float32))
  assert np.all(np.isfinite(sf)) and np.all(sf > 0)
  assert sf[0] == numerics.scale_limits(dtype)[0]
  np.testing.assert_array_equal(np.asarray(numerics.snap_scale(s.astype(jnp.float32), dtype)),
                                np.asarray(s))
  assert np.all(np.asarray(numerics.prev_scale(s).astype(jnp.float32)) < sf)


def test_snap_scale_keeps_nan():
  assert np.isnan(float(numerics.snap_scale(jnp.float32(np.nan), jnp.float32)))


@given(st.lists(st.floats(-1.5, 1.5, width=32), min_size=1, max_size=50))
def test_nf4_encode_nearest(vals):
  v = np.asarray(vals, np.float32)
  idx = np.asarray(numerics.nf4_encode(jnp.asarray(v)))
  d = np.abs(v[:, None] - NF4_TABLE[None, :])
  best = d.min(axis=1)
  np.testing.assert_allclose(d[np.arange(len(v)), idx], best, rtol=0, atol=1e-7)


def test_nf4_table_shape():
  assert NF4_TABLE.shape == (16,) and NF4_TABLE[0] == -1 and NF4_TABLE[-1] == 1
  assert 0.0 in NF4_TABLE and np.all(np.diff(NF4_TABLE) > 0)


def test_is_concrete():
  assert numerics.is_concrete(jnp.ones(2))
  seen = []
  jax.jit(lambda x: seen.append(numerics.is_concrete(x)) or x)(jnp.ones(2))
  assert seen == [False]
