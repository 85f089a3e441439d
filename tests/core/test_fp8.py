"""Float8 e4m3 (``QType.FP8_E4M3``): the type, quantize/dequantize bounds, validation, specs and
rules, calibration's static scale, GPTQ on the fp8 grid, and what refuses it."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jq
from jq import numerics, spec_json
from jq.calibrate import act_params
from jq.qarray import ActivationQuant, QArray, check_activation_scale
from jq.qtypes import FP8_E4M3_MAX, QType
from jq.spec import (A_FP8_DYNAMIC, A_FP8_STATIC, FP8_CHANNEL, ActivationSpec, ActMode, Algorithm,
                     Granularity, QuantSpec, Rule)

FP8 = QType.FP8_E4M3
F8 = ml_dtypes.float8_e4m3fn
MIN_NORMAL = 2.0 ** -6       # e4m3's smallest normal value; below it the step is 2^-9
FINITE = np.sort(np.arange(256, dtype=np.uint8).view(F8).astype(np.float32)[
    ~np.isnan(np.arange(256, dtype=np.uint8).view(F8).astype(np.float32))])


def test_qtype_properties():
  assert QType("fp8_e4m3") is FP8 and FP8.value == "fp8_e4m3"
  assert (FP8.bits, FP8.storage_bits, FP8.pack_values, FP8.pack_bytes) == (8, 8, 1, 1)
  assert FP8.is_float and FP8.symmetric_only and FP8.signed and not FP8.is_table
  assert (FP8.qmin, FP8.qmax) == (-448, 448) == (-FP8_E4M3_MAX, FP8_E4M3_MAX)
  assert float(ml_dtypes.finfo(F8).max) == FP8_E4M3_MAX
  assert FP8.unpacked_dtype == FP8.storage_dtype == np.dtype(F8)
  assert numerics.packed_shape((3, 5), FP8) == (3, 5)          # one byte per value, not packed
  assert not any(q.is_float for q in QType if q is not FP8)
  with pytest.raises(ValueError, match="e5m2 is not supported"):
    QType("fp8_e5m2")


def test_fp8_encode_rounds_to_nearest_even_and_saturates():
  mids = (FINITE[1:] + FINITE[:-1]) / 2                        # exact ties between neighbours
  v = np.concatenate([FINITE, mids, [500.0, -1e6, 448.5, 3e-4]]).astype(np.float32)
  got = np.asarray(numerics.fp8_encode(jnp.asarray(v)))
  assert got.dtype == F8
  want = np.clip(v, -448, 448).astype(F8)                     # ml_dtypes: round half to even
  assert np.array_equal(got.view(np.uint8), want.view(np.uint8))
  assert np.asarray(got[-4:]).astype(np.float32).tolist() == [448.0, -448.0, 448.0, 0.0]
  # a tie goes to the even mantissa: 1.0625 lies between 1.0 and 1.125 -> 1.0; 1.1875 -> 1.25
  ties = np.asarray(numerics.fp8_encode(jnp.asarray([1.0625, 1.1875, -1.1875], jnp.float32)))
  assert ties.astype(np.float32).tolist() == [1.0, 1.25, -1.25]


def _wide(rng, shape):
  """Magnitudes over ~10 binades (into e4m3's subnormal range after scaling), random signs."""
  return (rng.choice([-1.0, 1.0], shape) * np.exp(rng.uniform(-12, 1, shape))).astype(np.float32)


@pytest.mark.parametrize("spec", [
    FP8_CHANNEL,
    QuantSpec(qtype=FP8, granularity=Granularity.TENSOR),
    QuantSpec(qtype=FP8, granularity=Granularity.GROUP, group_size=32),   # 80 % 32: partial group
    dataclasses.replace(FP8_CHANNEL, scale_dtype="bfloat16"),
], ids=lambda s: f"{s.describe()}-{s.scale_dtype}")
def test_quantize_error_bound(spec):
  """Each element above the subnormal range is within 2^-4 of its magnitude (3 mantissa bits,
  round to nearest), the others within half the subnormal step 2^-9 (times the scale)."""
  rng = np.random.default_rng(0)
  x = _wide(rng, (80, 24))
  x[:, 5] = 0.0                                                   # an all-zero channel
  q = jq.quantize(jnp.asarray(x), spec)
  assert q.qtype is FP8 and q.values.dtype == F8 and q.zero_point is None
  d = np.asarray(q.dequantize())
  s = np.broadcast_to(np.asarray(numerics.expand(q.scale.astype(jnp.float32), q.tile, q.shape)),
                      x.shape)
  err = np.abs(d - x)
  normal = np.abs(x) >= MIN_NORMAL * s
  assert normal.mean() > 0.5 and (~normal).any()
  assert np.all(err[normal] <= 2.0 ** -4 * np.abs(x[normal]) * (1 + 1e-5))
  assert np.all(err[~normal] <= 2.0 ** -10 * s[~normal] * (1 + 1e-5))
  assert np.all(d[:, 5] == 0)
  if spec.granularity is not Granularity.TENSOR:
    assert np.all(np.asarray(q.scale)[..., 5] == 1)                # all-zero tiles: scale 1
  # scale = absmax / 448 of each tile (stored rounded to its dtype)
  tile_max = np.asarray(jnp.max(jnp.abs(numerics.split(jnp.asarray(x), q.tile)),
                                axis=numerics.tile_axes(x.shape, q.tile), keepdims=True))
  amax = np.asarray(numerics.stats_to_tiles(jnp.asarray(tile_max), x.shape, q.tile))
  nz = amax > 0
  rel = 2.0 ** -8 if spec.scale_dtype == "bfloat16" else 2.0 ** -19
  np.testing.assert_allclose(np.asarray(q.scale, np.float32)[nz], amax[nz] / 448, rtol=rel)
  # quantize is idempotent on its own output
  q2 = jq.quantize(q.dequantize(), spec)
  assert np.array_equal(np.asarray(q2.values).view(np.uint8), np.asarray(q.values).view(np.uint8))
  assert np.array_equal(np.asarray(q2.scale), np.asarray(q.scale))


def test_exact_on_representable_values():
  """Columns of e4m3 values times a power of two, each reaching ±448: scale is that power of two
  and every value comes back exactly (subnormals included)."""
  rng = np.random.default_rng(1)
  v = rng.choice(FINITE, (64, 12))
  v[0] = 448.0
  v[1] = -448.0
  p2 = 2.0 ** rng.integers(-20, 10, 12)
  x = (v * p2).astype(np.float32)
  q = jq.quantize(jnp.asarray(x), FP8_CHANNEL)
  np.testing.assert_array_equal(np.asarray(q.scale), p2[None].astype(np.float32))
  np.testing.assert_array_equal(np.asarray(q.unpacked()).astype(np.float32), v)
  np.testing.assert_array_equal(np.asarray(q.dequantize()), x)
  np.testing.assert_array_equal(np.asarray(q.dequantize(jnp.bfloat16)).astype(np.float32),
                                x.astype(jnp.bfloat16).astype(np.float32))


def _fp8_qarray(values, scale, zero_point=None):
  v = np.asarray(values, np.float32)
  return QArray(values=jnp.asarray(v.astype(F8)), scale=jnp.asarray(scale, jnp.float32),
                zero_point=zero_point, activation=None, qtype=FP8, shape=v.shape,
                tile=(v.shape[0], 1))


def test_validate_refuses_zero_points_nan_and_wrong_storage():
  good = _fp8_qarray(np.ones((4, 3)), np.ones((1, 3)))
  good.validate("w")
  with pytest.raises(ValueError, match=r"w: QArray\(qtype=fp8_e4m3.*takes no zero point"):
    dataclasses.replace(good, zero_point=jnp.zeros((1, 3), F8)).validate("w")
  bad = np.ones((4, 3), np.float32)
  bad[2, 1] = np.nan
  with pytest.raises(ValueError, match=r"1 NaN values, first at index \(2, 1\)"):
    _fp8_qarray(bad, np.ones((1, 3))).validate("w")
  with pytest.raises(ValueError, match="NaN"):
    jq.dequantize(_fp8_qarray(bad, np.ones((1, 3))))
  with pytest.raises(ValueError, match="expected .*float8_e4m3fn"):
    dataclasses.replace(good, values=jnp.ones((4, 3), jnp.int8)).validate("w")
  with pytest.raises(ValueError, match="zero point was given"):
    jq.quantize_with_params(jnp.ones((4, 3)), jnp.ones((1, 3)), jnp.zeros((1, 3)), FP8_CHANNEL)
  q = jq.quantize_with_params(jnp.asarray([[1.0, 2.0], [3.0, -500.0]]), jnp.ones((1, 2)), None,
                              FP8_CHANNEL)
  assert np.asarray(q.dequantize()).tolist() == [[1.0, 2.0], [3.0, -448.0]]   # clipped, no NaN


def test_specs_and_rules_refuse_what_fp8_cannot_do():
  with pytest.raises(ValueError, match="fp8_e4m3 is symmetric only"):
    QuantSpec(qtype=FP8, symmetric=False)
  with pytest.raises(ValueError, match="fp8_e4m3 activations are symmetric only"):
    ActivationSpec(qtype=FP8, symmetric=False)
  with pytest.raises(ValueError, match="fp8_e4m3 activations need fp8_e4m3 weights"):
    Rule(pattern="kernel", weight=jq.W8A16, activation=A_FP8_DYNAMIC)
  with pytest.raises(ValueError, match="int8 activations need an 8-bit weight of an integer type"):
    Rule(pattern="kernel", weight=FP8_CHANNEL, activation=jq.A8_DYNAMIC)
  g32 = QuantSpec(qtype=FP8, granularity=Granularity.GROUP, group_size=32)
  with pytest.raises(ValueError, match="per-channel or per-tensor weight scales"):
    Rule(pattern="kernel", weight=g32, activation=A_FP8_STATIC)
  Rule(pattern="kernel", weight=g32)                         # weight-only groups are fine
  with pytest.raises(ValueError, match="autoround.*fp8_e4m3 is a float format"):
    Rule(pattern="kernel", weight=FP8_CHANNEL, algorithm=Algorithm.AUTOROUND)
  assert A_FP8_DYNAMIC.describe() == "a8 dynamic fp8_e4m3"
  assert FP8_CHANNEL.describe() == "fp8_e4m3 sym channel"


def test_recipes_and_their_json_round_trip():
  from jq.ptq import recipes
  for name, act in (("fp8-dynamic", A_FP8_DYNAMIC), ("fp8-static", A_FP8_STATIC),
                    ("fp8-weight-only", None)):
    assert name in jq.recipe_names()
    rules = jq.recipe_rules(name)
    assert rules[-1].weight == FP8_CHANNEL and rules[-1].activation == act
    assert spec_json.rules_from_json(spec_json.rules_to_json(rules)) == rules
    assert recipes.needs_calibration(rules) == (name == "fp8-static")
  d = spec_json.rule_to_json(jq.recipe_rules("fp8-static")[-1])
  assert d["weight"]["qtype"] == "fp8_e4m3" and d["activation"] == {
      "mode": "static", "qtype": "fp8_e4m3", "symmetric": True}
  with pytest.raises(ValueError, match="symmetric only"):
    spec_json.rule_from_json({"pattern": "k", "weight": {"qtype": "fp8_e4m3", "symmetric": False}})


def test_static_activation_scale_is_range_over_448():
  s, z = act_params(jnp.float32(-3.0), jnp.float32(5.0), A_FP8_STATIC)
  assert z is None and float(s) == pytest.approx(5.0 / 448, rel=2.0 ** -19)
  s0, _ = act_params(jnp.float32(0.0), jnp.float32(0.0), A_FP8_STATIC)
  assert float(s0) == 1.0
  with pytest.raises(ValueError, match="take no zero point"):
    check_activation_scale(jnp.float32(0.1), jnp.int8(0), A_FP8_STATIC, "layer")
  with pytest.raises(ValueError, match="take no zero point"):
    ActivationQuant(scale=jnp.float32(0.1), zero_point=jnp.int8(0), spec=A_FP8_STATIC)
  w = jnp.ones((8, 4))
  q = jq.tree.with_activation(jq.quantize(w, FP8_CHANNEL), A_FP8_STATIC, (jnp.float32(0.5), None),
                              path="k", leaf=w)
  assert q.activation.spec.mode is ActMode.STATIC and float(q.activation.scale) == 0.5
  with pytest.raises(ValueError, match="needs a calibrated input scale"):
    jq.tree.with_activation(jq.quantize(w, FP8_CHANNEL), A_FP8_STATIC, None, path="k", leaf=w)


def test_gptq_on_the_fp8_grid_beats_round_to_nearest():
  """GPTQ quantizes column by column on jq's fp8 grid and lowers the layer's output error."""
  from jq.algorithms.gptq import gptq_quantize
  rng = np.random.default_rng(2)
  k, n = 64, 32
  mix = rng.standard_normal((k, k)) * 0.3 + np.eye(k)
  x = jnp.asarray((rng.standard_normal((512, k)) @ mix).astype(np.float32))
  w = jnp.asarray(rng.standard_normal((k, n)).astype(np.float32))
  h = 2 * x.T @ x / x.shape[0]
  q, _ = gptq_quantize(w, h, FP8_CHANNEL)
  q.validate("gptq")
  rtn = jq.quantize(w, FP8_CHANNEL)
  assert q.qtype is FP8 and np.array_equal(np.asarray(q.scale), np.asarray(rtn.scale))

  def out_err(qa):
    return float(jnp.sum(jnp.square(x @ (qa.dequantize() - w))))

  assert out_err(q) < 0.9 * out_err(rtn)


def test_integer_only_paths_refuse_fp8():
  params = {"dense": {"kernel": jnp.ones((16, 8))}}
  with pytest.raises(ValueError, match="a float8 type; LSQ learns the step"):
    jq.qat.init(params, [Rule(pattern="kernel$", weight=FP8_CHANNEL)])
  with pytest.raises(ValueError, match="LSQ learns the step of an integer grid"):
    jq.qat.fake_quant_activation(jnp.ones((2, 16)), A_FP8_STATIC, step=jnp.float32(0.1))
  y = jq.qat.fake_quant_activation(jnp.ones((2, 16)), A_FP8_DYNAMIC)   # dynamic: nothing learned
  np.testing.assert_array_equal(np.asarray(y), np.ones((2, 16), np.float32))
  from jq.algorithms.rounding import Start
  with pytest.raises(ValueError, match="learned rounding needs an integer grid, got fp8_e4m3"):
    Start.from_qarray(jq.quantize(jnp.ones((16, 8)), FP8_CHANNEL), jnp.ones((16, 8)))


def test_quantize_tree_under_jit():
  w = jax.random.normal(jax.random.key(0), (32, 16))
  rules = jq.recipe_rules("fp8-dynamic")
  qt = jax.jit(lambda p: jq.quantize_tree(p, rules))({"mlp": {"kernel": w}})
  q = qt["mlp"]["kernel"]
  assert q.qtype is FP8 and q.activation.spec == A_FP8_DYNAMIC and q.activation.scale is None
  assert q.nbytes == 32 * 16 + 16 * 4                         # one byte per weight + f32 scales
