"""jq.qarray: QArray as pytree data, validate(), nbytes, dequantize."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jq import numerics
from jq.qarray import ActivationQuant, QArray, dequantize
from jq.qtypes import QType
from jq.quantize import quantize
from jq.spec import A8_DYNAMIC, A8_STATIC, Granularity, QuantSpec

INT4_G = QuantSpec(qtype=QType.INT4, granularity=Granularity.GROUP, group_size=64)
UINT4_G = QuantSpec(qtype=QType.UINT4, symmetric=False, granularity=Granularity.GROUP,
                    group_size=64)


def _w(shape=(128, 256), seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.fixture(scope="module")
def q4():
  return quantize(_w(), UINT4_G)


def test_valid_qarray_passes(q4):
  assert q4.validate("w") is q4
  assert q4.values.shape == (128, 128) and q4.values.dtype == jnp.uint8
  assert q4.scale.shape == (2, 256) and q4.zero_point.shape == (2, 256)
  assert q4.ndim == 2 and q4.dtype == jnp.float32


@pytest.mark.parametrize("change,match", [
    (lambda q: dict(values=q.values[:, :-1]), "values have shape"),
    (lambda q: dict(values=q.values.astype(jnp.int8)), "values have shape .* dtype int8"),
    (lambda q: dict(scale=q.scale[:1]), "scale has shape \\(1, 256\\)"),
    (lambda q: dict(scale=q.scale.astype(jnp.int32)), "not floating point"),
    (lambda q: dict(scale=q.scale.at[0, 3].set(jnp.nan)), "finite and positive"),
    (lambda q: dict(scale=q.scale.at[1, 0].set(jnp.inf)), "finite and positive"),
    (lambda q: dict(scale=q.scale.at[1, 0].set(0.0)), "finite and positive"),
    (lambda q: dict(scale=-q.scale), "finite and positive"),
    (lambda q: dict(zero_point=q.zero_point.astype(jnp.int8)), "zero_point has shape"),
    (lambda q: dict(zero_point=q.zero_point[:, :5]), "zero_point has shape"),
    (lambda q: dict(zero_point=q.zero_point.at[0, 0].set(16)), "zero points must lie in"),
    (lambda q: dict(tile=(64,)), "tile must have one positive entry per axis"),
    (lambda q: dict(tile=(0, 1)), "tile must have one positive entry per axis"),
    (lambda q: dict(shape=(128, 255)), "scale has shape"),  # same packed bytes as 256
    (lambda q: dict(shape=(128, 258)), "values have shape"),
    (lambda q: dict(qtype="int4"), "is not a QType"),
    (lambda q: dict(activation=ActivationQuant(scale=None, zero_point=None, spec=A8_STATIC)),
     "needs a calibrated scale"),
    (lambda q: dict(activation=ActivationQuant(scale=jnp.float32(1), zero_point=None,
                                               spec=A8_DYNAMIC)), "takes no"),
])
def test_validate_catches(q4, change, match):
  bad = dataclasses.replace(q4, **change(q4))
  with pytest.raises(ValueError, match=match) as e:
    bad.validate("params/l0/kernel")
  assert "params/l0/kernel" in str(e.value)


def test_validate_signed_zero_point_range_and_nf4():
  q = quantize(_w((64, 8)), QuantSpec(qtype=QType.INT4, symmetric=False))
  q.validate()
  with pytest.raises(ValueError, match="zero points must lie in \\[-8, 7\\]"):
    dataclasses.replace(q, zero_point=q.zero_point.at[0, 0].set(9)).validate()
  nf = quantize(_w((64, 8)), QuantSpec(qtype=QType.NF4))
  with pytest.raises(ValueError, match="NF4 takes no zero point"):
    dataclasses.replace(nf, zero_point=jnp.zeros((1, 8), jnp.uint8)).validate()


def test_validate_under_jit_checks_shapes_only(q4):
  @jax.jit
  def f(q):
    return q.validate("w").dequantize()
  f(q4)
  bad = dataclasses.replace(q4, scale=q4.scale[:1])
  with pytest.raises(ValueError, match="scale has shape"):
    f(bad)


def test_nbytes_counts_packed_storage():
  q = quantize(_w((128, 256)), QuantSpec(qtype=QType.INT4))  # per channel, symmetric
  assert q.nbytes == 128 * 128 + 256 * 4
  q = quantize(_w((128, 256)), INT4_G)
  assert q.nbytes == 128 * 128 + 2 * 256 * 4
  assert q.bits_per_weight == pytest.approx(8 * (128 * 128 + 2 * 256 * 4) / (128 * 256))
  q = quantize(_w((128, 256)), UINT4_G)
  assert q.nbytes == 128 * 128 + 2 * 256 * 4 + 2 * 256
  q = quantize(_w((128, 255)), QuantSpec(qtype=QType.INT2, scale_dtype="bfloat16"))
  assert q.nbytes == 128 * 64 + 255 * 2
  q8 = quantize(_w((16, 8)), QuantSpec())
  q8a = dataclasses.replace(q8, activation=ActivationQuant(scale=jnp.float32(1.0),
                                                          zero_point=None, spec=A8_STATIC))
  assert q8a.nbytes == q8.nbytes + 4


def test_pytree_round_trip_and_static_metadata(q4):
  leaves, treedef = jax.tree_util.tree_flatten(q4)
  assert len(leaves) == 3  # values, scale, zero_point
  q = jax.tree_util.tree_unflatten(treedef, leaves)
  assert (q.qtype, q.shape, q.tile) == (q4.qtype, q4.shape, q4.tile)
  sym = quantize(_w((8, 4)), QuantSpec())
  assert len(jax.tree_util.tree_leaves(sym)) == 2  # zero_point None is no leaf
  # metadata is static: jit passes QArrays through and retraces only on metadata change
  out = jax.jit(lambda q: q)(q4)
  assert isinstance(out, QArray) and out.tile == q4.tile


def test_dequantize_formula_and_dtype(q4):
  v = np.asarray(q4.unpacked()).astype(np.float32)
  s = np.repeat(np.asarray(q4.scale), 64, axis=0)
  z = np.repeat(np.asarray(q4.zero_point), 64, axis=0).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(q4.dequantize()), (v - z) * s)
  assert dequantize(q4, jnp.bfloat16).dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(dequantize(q4, jnp.bfloat16)),
                                np.asarray(jnp.asarray((v - z) * s).astype(jnp.bfloat16)))


def test_unpacked_shape_partial_group_and_odd_axis():
  q = quantize(_w((70, 9)), QuantSpec(qtype=QType.INT3, granularity=Granularity.GROUP,
                                       group_size=32))
  assert q.values.shape == (70, 6) and q.scale.shape == (3, 9)   # 9 int3 values: 2 units of 3 bytes
  assert q.unpacked().shape == (70, 9) and q.unpacked().dtype == jnp.int8
  assert int(jnp.max(q.unpacked())) <= 3 and int(jnp.min(q.unpacked())) >= -4


def test_vmap_dequantize_over_stacked_qarrays():
  ws = jnp.stack([_w((64, 6), seed=i) for i in range(4)])
  qs = jax.vmap(lambda w: quantize(w, UINT4_G))(ws)  # a stacked QArray (e.g. scanned layers)
  deq = jax.vmap(lambda q: q.dequantize())(qs)
  for i in range(4):
    np.testing.assert_array_equal(np.asarray(deq[i]),
                                  np.asarray(quantize(ws[i], UINT4_G).dequantize()))


def test_expand_used_by_dequantize_matches_split_layout():
  q = quantize(_w((70, 9)), UINT4_G)
  s = numerics.expand(q.scale, q.tile, q.shape)
  assert s.shape == (70, 9)
  np.testing.assert_array_equal(np.asarray(s[64:]), np.broadcast_to(np.asarray(q.scale[1:]), (6, 9)))
