"""Reliability: invalid values and configs raise a clear ValueError instead of giving wrong numbers.

One test (group) per class: non-finite / extreme inputs, invalid QArrays, static activation
scales, config types, ``act_params`` ranges; plus a property test over hand-built QArrays.
"""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jq
from jq import numerics, spec_json
from jq.calibrate.observers import act_params
from jq.qarray import ActivationQuant, QArray, checked, dequantize
from jq.qtypes import NF4_TABLE, QType
from jq.spec import A8_STATIC, ActivationSpec, Clip, Granularity, QuantSpec, Rule

UINT4 = QuantSpec(qtype=QType.UINT4, symmetric=False)
UINT2 = QuantSpec(qtype=QType.UINT2, symmetric=False)
NF4 = QuantSpec(qtype=QType.NF4)


def _has(err, *parts):
  for p in parts:
    assert p in str(err.value), f"{p!r} not in {err.value}"


# ---- 1. non-finite and extreme values ------------------------------------------------------------
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_raise_everywhere(bad):
  x = np.ones((4, 4), np.float32)
  x[1, 2] = bad
  with pytest.raises(ValueError) as e:
    jq.compute_params(jnp.asarray(x), jq.W8A16, name="params/l0/kernel")
  _has(e, "params/l0/kernel", "(4, 4)", "float32", "first at index (1, 2)")
  with pytest.raises(ValueError) as e:
    jq.quantize(jnp.asarray(x), UINT4, name="params/l0/kernel")
  _has(e, "params/l0/kernel", "(4, 4)", "float32", "first at index (1, 2)")
  with pytest.raises(ValueError) as e:
    jq.quantize_tree({"l0": {"kernel": jnp.asarray(x)}}, (Rule(pattern="kernel", weight=UINT4),))
  _has(e, "l0/kernel", "(4, 4)", "float32", "first at index (1, 2)")


def test_nan_policy_zero_quantizes_non_finite_as_zero():
  x = np.ones((4, 4), np.float32)
  x[1, 2], x[3, 0] = np.nan, np.inf
  for spec in (jq.W8A16, UINT4, NF4):
    q = jq.quantize(jnp.asarray(x), spec, nan_policy="zero")
    deq = np.asarray(q.dequantize())
    assert np.all(np.isfinite(deq)) and deq[1, 2] == 0.0 and deq[3, 0] == 0.0
    np.testing.assert_allclose(deq[0], 1.0, rtol=1e-2)
    scale, _ = jq.compute_params(jnp.asarray(x), spec, nan_policy="zero")
    assert np.all(np.isfinite(np.asarray(scale)))
  qt = jq.quantize_tree({"k": jnp.asarray(x)}, (Rule(pattern="k", weight=jq.W8A16),),
                        nan_policy="zero")
  assert np.all(np.isfinite(np.asarray(qt["k"].dequantize())))
  with pytest.raises(ValueError, match="nan_policy='ignore'"):
    jq.quantize(jnp.asarray(x), jq.W8A16, nan_policy="ignore")


@pytest.mark.parametrize("spec", [UINT4, UINT2, NF4, QuantSpec(qtype=QType.UINT8, symmetric=False),
                                  QuantSpec(qtype=QType.INT8, scale_dtype="float16")],
                         ids=lambda s: s.describe() + " " + s.scale_dtype)
def test_extreme_values_raise_instead_of_zero_reconstruction(spec):
  # one tile spans [-3e38, 3e38] (max - min overflows) or needs a scale whose reciprocal is
  # subnormal (flushed to 0: every code would become 0); float16 scales stop at 65504
  big = 3e38 if spec.scale_dtype == "float32" else 1e7
  x = jnp.asarray([[big, 1.0], [-big, -1.0], [0.5, 2.0]], jnp.float32)
  with pytest.raises(ValueError) as e:
    jq.quantize(x, spec, name="params/big")
  _has(e, "params/big", "(3, 2)", "float32", "first tile (0, 0)", "too large")
  with pytest.raises(ValueError, match="too large"):
    jq.compute_params(x, spec)
  # the second column is fine; quantizing it alone works and round-trips
  q = jq.quantize(x[:, 1:], spec)
  np.testing.assert_allclose(np.asarray(q.dequantize())[:, 0], [1.0, -1.0, 2.0], rtol=0.2)


def test_large_but_representable_values_still_work():
  x = jnp.asarray([[3e38, 1.0], [-3e38, -1.0]], jnp.float32)  # symmetric int8: scale 2.4e36
  deq = np.asarray(jq.quantize(x, jq.W8A16).dequantize())
  np.testing.assert_allclose(deq[:, 0], [3e38, -3e38], rtol=1e-2)


def test_checked_mode_raises_under_jit_and_default_jit_does_not_check():
  x = np.ones((4, 4), np.float32)
  x[2, 1] = np.nan
  f = jax.jit(lambda w: jq.quantize(w, jq.W8A16, name="w"))
  f(jnp.asarray(x))  # default: no checks under jit (a tracer's values are unknown)
  with pytest.raises(ValueError, match=r"w: shape \(4, 4\) dtype float32 has 1 NaN/Inf values "
                                       r"\(first at index \(2, 1\)"):
    with checked():
      f(jnp.asarray(x))
  big = jnp.asarray([[3e38, -3e38], [1.0, -1.0]], jnp.float32).T
  with pytest.raises(ValueError, match="too large"):
    with checked():
      jax.jit(lambda w: jq.quantize(w, UINT4))(big)
  with checked():  # valid input passes in checked mode
    q = jax.jit(lambda w: jq.quantize(w, UINT4))(jnp.ones((4, 4)))
  # outside the context the trace cached inside it is not reused: no checks, no error
  f(jnp.asarray(x))
  bad = dataclasses.replace(q, scale=-q.scale)
  with pytest.raises(ValueError, match="scales must be finite and positive"):
    with checked():
      jax.jit(dequantize)(bad)


def test_default_jit_has_no_check_callbacks():
  text = str(jax.make_jaxpr(lambda w: jq.quantize(w, UINT4).dequantize())(jnp.ones((8, 4))))
  assert "callback" not in text
  with checked():
    text = str(jax.make_jaxpr(lambda w: jq.quantize(w, UINT4).dequantize())(jnp.ones((8, 4))))
  assert "callback" in text


# ---- 2. invalid QArrays ------------------------------------------------------------------------
def _q(spec, shape=(8, 6)):
  x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
  return jq.quantize(x, spec)


INT3 = QuantSpec(qtype=QType.INT3)
UINT3 = QuantSpec(qtype=QType.UINT3, symmetric=False)


@pytest.mark.parametrize("spec,change,match", [
    (jq.W8A16, lambda q: dict(values=q.values.astype(jnp.int32)), "values have shape .* int32"),
    (UINT4, lambda q: dict(values=q.values.astype(jnp.int32)), "values have shape .* int32"),
    (jq.W8A16, lambda q: dict(scale=-q.scale), r"first at index \(0, 0\)"),
    (jq.W8A16, lambda q: dict(scale=q.scale.at[0, 2].set(0.0)), r"first at index \(0, 2\): 0.0"),
    (jq.W8A16, lambda q: dict(scale=q.scale.at[0, 3].set(jnp.nan)), r"index \(0, 3\): nan"),
    (jq.W8A16, lambda q: dict(scale=q.scale.astype(jnp.int32)), "not floating point"),
    (UINT4, lambda q: dict(zero_point=jnp.full_like(q.zero_point, 200)), r"\[0, 15\]"),
    (NF4, lambda q: dict(zero_point=jnp.zeros(q.scale.shape, jnp.uint8)), "NF4 takes no zero"),
    (INT3, lambda q: dict(values=q.values[:, :2]),   # int3: 3 bytes per 8 values
     r"values have shape \(8, 2\) dtype uint8, expected \(8, 3\)"),
])
def test_invalid_qarrays_rejected_by_validate_and_dequantize(spec, change, match):
  q = _q(spec)
  q.validate("ok")
  bad = dataclasses.replace(q, **change(q))
  with pytest.raises(ValueError, match=match) as e:
    bad.validate("params/l0/kernel")
  _has(e, "params/l0/kernel", f"qtype={spec.qtype.value}", "shape=(8, 6)")
  with pytest.raises(ValueError, match=match):
    dequantize(bad)
  with pytest.raises(ValueError, match=match):
    bad.dequantize()


def test_dequantize_under_jit_checks_structure_only():
  q = _q(INT3)
  f = jax.jit(dequantize)
  f(dataclasses.replace(q, scale=q.scale.at[0, 0].set(-1.0)))  # values unknown: no check
  with pytest.raises(ValueError, match="values have shape"):
    f(dataclasses.replace(q, values=q.values.astype(jnp.int32)))


# ---- 3. static activation scales ---------------------------------------------------------------
BAD_SCALES = [np.nan, 0.0, -0.5, np.inf]


@pytest.mark.parametrize("s", BAD_SCALES)
def test_bad_static_activation_scales_rejected(s):
  with pytest.raises(ValueError, match="activation scales must be finite and positive"):
    ActivationQuant(scale=jnp.float32(s), zero_point=None, spec=A8_STATIC)
  with pytest.raises(ValueError) as e:
    jq.quantize_tree({"l0": {"kernel": jnp.ones((4, 4))}},
                     (Rule(pattern="kernel", weight=jq.W8A16, activation=A8_STATIC),),
                     act_scales={"l0/kernel": (jnp.float32(s), None)})
  _has(e, "l0/kernel", "(4, 4)", "float32", "finite and positive", str(np.float32(s)))
  # a QArray carrying a bad scale (built around the constructor check) is caught by validate
  # and by the ops, eagerly
  aq = ActivationQuant(scale=jnp.float32(0.1), zero_point=None, spec=A8_STATIC)
  object.__setattr__(aq, "scale", jnp.float32(s))
  w = dataclasses.replace(_q(jq.W8A16, (4, 4)), activation=aq)
  with pytest.raises(ValueError, match="finite and positive"):
    w.validate("w")
  with pytest.raises(ValueError, match="l0/kernel.*finite and positive"):
    jq.ops.matmul(jnp.ones((2, 4)), w, name="l0/kernel")


def test_static_activation_zero_point_range():
  spec = ActivationSpec(mode=jq.ActMode.STATIC, qtype=QType.INT8, symmetric=False)
  ActivationQuant(scale=jnp.float32(0.1), zero_point=jnp.int8(-3), spec=spec)
  with pytest.raises(ValueError, match=r"zero points must be integers in \[-128, 127\]"):
    ActivationQuant(scale=jnp.float32(0.1), zero_point=jnp.float32(300.0), spec=spec)


# ---- 4. config types ---------------------------------------------------------------------------
@pytest.mark.parametrize("make,match", [
    (lambda: QuantSpec(symmetric="no"), "symmetric='no' must be a bool"),
    (lambda: QuantSpec(qtype=QType.UINT4, symmetric=0), "symmetric=0 must be a bool"),
    (lambda: QuantSpec(granularity=Granularity.GROUP, group_size=True), "group_size=True"),
    (lambda: QuantSpec(channel_axes=(True,)), "must be ints"),
    (lambda: QuantSpec(channel_axes="1"), "must be a tuple of ints"),
    (lambda: Clip(grid=2.5), "Clip.grid=2.5 must be an int"),
    (lambda: Clip(ratio="0.5"), "Clip.ratio='0.5' must be a number"),
    (lambda: ActivationSpec(symmetric="false"), "symmetric='false' must be a bool"),
    (lambda: Rule(pattern=5, weight=None), "Rule.pattern=5 must be a string"),
    (lambda: Rule(pattern="k", weight=None, required="yes"), "required='yes' must be a bool"),
])
def test_config_types_are_strict(make, match):
  with pytest.raises(ValueError, match=match):
    make()


@pytest.mark.parametrize("rule,match", [
    ({"weight": {"qtype": "uint4", "symmetric": "false"}},
     r'rules\[2\]\.weight\.symmetric: expected a bool \(true or false\), got "false"'),
    ({"weight": {"channel_axes": 1}}, r"rules\[2\]\.weight\.channel_axes: expected a list of "
                                      r"ints or null, got 1"),
    ({"weight": {"channel_axes": [True]}}, r"rules\[2\]\.weight\.channel_axes: .* got \[true\]"),
    ({"pattern": 5}, r"rules\[2\]\.pattern: expected a string, got 5"),
    ({"weight": {"clip": {"method": "mse", "grid": 2.5}}},
     r"rules\[2\]\.weight\.clip\.grid: expected an int, got 2.5"),
    ({"weight": {"clip": {"ratio": "1"}}}, r'rules\[2\]\.weight\.clip\.ratio: expected a number'),
    ({"weight": {"granularity": "group", "group_size": 12.0}},
     r"rules\[2\]\.weight\.group_size: expected an int or null, got 12.0"),
    ({"weight": {"qtype": 4}}, r"rules\[2\]\.weight\.qtype: expected one of \['int8'"),
    ({"weight": {"scale_dtype": 32}}, r"rules\[2\]\.weight\.scale_dtype: expected a string"),
    ({"weight": {}, "activation": {"symmetric": 1}},
     r"rules\[2\]\.activation\.symmetric: expected a bool"),
    ({"required": "false"}, r'rules\[2\]\.required: expected a bool \(true or false\), got '
                            r'"false"'),
])
def test_rules_json_type_errors_name_the_location(rule, match):
  rules = [{"pattern": "embed", "weight": None}, {"pattern": "norm", "weight": None},
           {"pattern": "kernel$", "weight": None, **rule}]
  with pytest.raises(ValueError, match=match):
    spec_json.rules_from_json(json.dumps(rules))


# ---- 5. act_params ranges ----------------------------------------------------------------------
def test_act_params_rejects_inverted_range():
  with pytest.raises(ValueError, match=r"lo > hi .*first at index \(\): \[2.0, 1.0\]"):
    act_params(jnp.float32(2.0), jnp.float32(1.0), A8_STATIC)
  with pytest.raises(ValueError, match=r"first at index \(1,\)"):
    act_params(jnp.asarray([-1.0, 3.0]), jnp.asarray([1.0, -2.0]), A8_STATIC)
  s, _ = act_params(jnp.float32(-1.0), jnp.float32(2.0), A8_STATIC)  # a valid range still works
  assert float(s) == pytest.approx(2.0 / 127, rel=1e-5)


# ---- property: hand-built QArrays --------------------------------------------------------------
SCALES = [1.0, 0.02, 3e-3, 0.0, -0.5, np.nan, np.inf, -np.inf]


@st.composite
def hand_built(draw):
  qt = draw(st.sampled_from(list(QType)))
  shape = draw(st.sampled_from([(4, 6), (8, 3), (2, 5)]))
  rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
  if qt.storage_bits == 8:   # any byte (float8: NaN too)
    values = rng.integers(0, 256, shape).astype(np.uint8).view(qt.storage_dtype)
  else:   # any bit pattern is a code; the last unit's padding stays zero, as pack leaves it
    values = numerics.pack(rng.integers(0, 1 << qt.bits, shape), qt, xp=np)
  tile = (shape[0], 1)
  tiles = numerics.num_tiles(shape, tile)
  scale = np.asarray(rng.choice(SCALES, tiles) if draw(st.booleans())
                     else rng.uniform(1e-3, 2.0, tiles), np.float32)
  zp = None
  if not qt.is_table and draw(st.booleans()):
    lo, hi = (-128, 127) if qt.signed else (0, 255)
    z = rng.integers(lo, hi + 1, tiles) if draw(st.booleans()) else \
        rng.integers(qt.qmin, qt.qmax + 1, tiles)
    zp = np.asarray(z).astype(qt.unpacked_dtype)
  return QArray(values=jnp.asarray(values), scale=jnp.asarray(scale),
                zero_point=None if zp is None else jnp.asarray(zp), activation=None, qtype=qt,
                shape=shape, tile=tile)


@given(hand_built())
def test_property_validate_raises_or_dequantize_is_finite_and_exact(q):
  codes = np.asarray(q.unpacked()).astype(np.float64)
  scale = np.asarray(q.scale, np.float64)
  zp = None if q.zero_point is None else np.asarray(q.zero_point).astype(np.float64)
  codes_ok = bool(np.all((codes >= q.qtype.qmin) & (codes <= q.qtype.qmax)))
  zp_ok = zp is None or (not q.qtype.symmetric_only
                         and bool(np.all((zp >= q.qtype.qmin) & (zp <= q.qtype.qmax))))
  scale_ok = bool(np.all(np.isfinite(scale) & (scale > 0)))
  try:
    q.validate("q")
  except ValueError:
    assert not (codes_ok and zp_ok and scale_ok)
    with pytest.raises(ValueError):
      dequantize(q)
    return
  assert codes_ok and zp_ok and scale_ok
  deq = np.asarray(dequantize(q))
  assert np.all(np.isfinite(deq))
  x = NF4_TABLE[codes.astype(np.int64)].astype(np.float64) if q.qtype.is_table else codes
  if zp is not None:
    x = x - zp
  np.testing.assert_allclose(deq, (x * scale).astype(np.float32), rtol=1e-6, atol=0)


# ---- the host road of value checks -----------------------------------------------------------
_CHECK_DTYPES = ["float32", "bfloat16", "float16", "float64", "float8_e4m3fn", "int32", "int8",
                 "uint8"]


@st.composite
def checked_arrays(draw):
  """An array (numpy or jax, any of the dtypes checks meet) with special values here and there,
  and a set of conditions."""
  dtype = np.dtype(jnp.dtype(draw(st.sampled_from(_CHECK_DTYPES))))
  shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
  rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
  x = rng.normal(0, draw(st.sampled_from([1.0, 200.0])), shape)
  if jnp.issubdtype(dtype, jnp.floating):
    specials = [np.nan, np.inf, -np.inf, 0.0, 1e39, 2.5, -0.5]
    mask = rng.random(shape) < draw(st.sampled_from([0.0, 0.1, 0.5]))
    x = np.where(mask, rng.choice(specials, shape), x)
    x = x.astype(dtype)
  else:
    info = np.iinfo(dtype)
    x = np.clip(np.round(x), info.min, info.max).astype(dtype)
  if draw(st.booleans()):
    x = jnp.asarray(x)
  cond = dict(finite=draw(st.booleans()), positive=draw(st.booleans()),
              integral=draw(st.booleans()), not_nan=draw(st.booleans()))
  if draw(st.booleans()):
    cond["lo"] = draw(st.sampled_from([-8, 0, 1]))
  if draw(st.booleans()):
    cond["hi"] = draw(st.sampled_from([7, 15, 255]))
  cond["dtype"] = draw(st.sampled_from([None, "float32", "int32"]))
  return x, cond


@given(checked_arrays())
def test_property_host_checks_equal_the_compiled_reduction(case):
  """jq.qarray.values_good (numpy on the host for small concrete arrays) agrees with the compiled
  reduction it stands in for, on every dtype, special value and condition."""
  from jq import qarray
  x, cond = case
  want = bool(qarray.all_good(jnp.asarray(x), **cond))
  host = qarray._host_values(x, cond["dtype"])     # pylint: disable=protected-access
  if host is not None:
    assert bool(np.all(qarray._good(host, xp=np, **cond)[0])) == want, (x, cond)
  assert qarray.values_good(x, **cond) == want, (x, cond)


def test_large_arrays_and_float_to_int_casts_take_the_compiled_check(monkeypatch):
  from jq import qarray
  x = np.ones((8, 8), np.float32)
  # pylint: disable=protected-access
  assert qarray._host_values(x, "float32") is not None
  assert qarray._host_values(x, "int32") is None                      # float -> int: compiled
  monkeypatch.setattr(qarray, "HOST_CHECK_MAX", 63)
  assert qarray._host_values(x, None) is None and qarray._host_values(jnp.asarray(x), None) is None
  x[3, 4] = np.nan
  assert not qarray.values_good(x, finite=True)
