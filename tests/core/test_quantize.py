"""jq.quantize: invariants of round to nearest (error bounds, exact zeros, idempotence), clipping,
bad input, and behaviour under jit / vmap / eval_shape."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, strategies as st
from hypothesis.extra import numpy as hnp

from jq import numerics
from jq.qarray import QArray, dequantize
from jq.qtypes import NF4_TABLE, QType
from jq.quantize import compute_params, fake_quant, quantize, quantize_with_params
from jq.spec import Clip, ClipMethod, Granularity, QuantSpec

# (qtype, symmetric) pairs that make valid specs
KINDS = [(QType.INT8, True), (QType.INT8, False), (QType.UINT8, False), (QType.INT4, True),
         (QType.INT4, False), (QType.UINT4, False), (QType.INT3, True), (QType.UINT3, False),
         (QType.INT2, True), (QType.UINT2, False), (QType.NF4, True)]
# axes not divisible by group sizes, odd last axes (packing), ranks 1-3
SHAPES = [(16, 8), (13, 6), (7, 5, 3), (40, 3), (9,), (33, 4)]
SCALE_BITS = {"float32": numerics.SCALE_BITS, "bfloat16": 8, "float16": 11}


def np_expand(t, tile, shape):
  t = np.asarray(t)
  for axis, (tl, s) in enumerate(zip(tile, shape)):
    if t.shape[axis] != 1 or s == 1:
      t = np.repeat(t, tl, axis=axis).take(np.arange(s), axis=axis)
  return np.broadcast_to(t, shape)


@st.composite
def specs(draw, shape, kinds=KINDS, scale_dtypes=("float32",)):
  qtype, sym = draw(st.sampled_from(kinds))
  nd = len(shape)
  gran = draw(st.sampled_from(list(Granularity)))
  kw = {}
  if gran is Granularity.CHANNEL:
    kw["channel_axes"] = (draw(st.integers(-nd, nd - 1)),)
  elif gran is Granularity.GROUP:
    g = draw(st.integers(0, nd - 1))
    others = [a for a in range(nd) if a != g]
    kw["group_axis"] = g - nd if draw(st.booleans()) else g
    kw["channel_axes"] = tuple(draw(st.lists(st.sampled_from(others), max_size=len(others),
                                             unique=True))) if others else ()
    kw["group_size"] = draw(st.sampled_from([2, 3, 4, 5, 8, 16]))
  return QuantSpec(qtype=qtype, symmetric=sym, granularity=gran,
                   scale_dtype=draw(st.sampled_from(scale_dtypes)), **kw)


EDGE = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-30, -1e-30, 1e-40, 3.0, -7.0, 1e30, -1e30]


@st.composite
def tensors(draw, shape):
  """float32 tensors with edge values: constants, zeros, subnormals, huge and tiny ranges."""
  how = draw(st.sampled_from(["hyp", "normal", "student_t"]))
  if how == "hyp":
    elems = st.one_of(st.sampled_from(EDGE), st.floats(-1e6, 1e6, width=32))
    return draw(hnp.arrays(np.float32, shape, elements=elems))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  mag = draw(st.sampled_from([1e-30, 1e-3, 1.0, 1e4, 1e28]))
  x = rng.standard_normal(shape) if how == "normal" else rng.standard_t(2.0, shape)
  x = (x * mag).astype(np.float32)
  if draw(st.booleans()):  # sprinkle exact zeros
    x[rng.random(shape) < 0.2] = 0.0
  return x


@st.composite
def cases(draw, kinds=KINDS, scale_dtypes=("float32",)):
  shape = draw(st.sampled_from(SHAPES))
  return draw(tensors(shape)), draw(specs(shape, kinds, scale_dtypes))


@functools.lru_cache(maxsize=None)
def jitted_quantize(spec):
  return jax.jit(lambda x: quantize(x, spec))


def step_bound(q: QArray, spec: QuantSpec) -> np.ndarray:
  """Per element: the largest allowed |x - dequantize(q)| (see quantize's docstring)."""
  s = np_expand(np.asarray(q.scale.astype(jnp.float32)), q.tile, q.shape).astype(np.float64)
  p = SCALE_BITS[spec.scale_dtype]
  qt = spec.qtype
  if qt.is_table:
    half = np.max(np.diff(NF4_TABLE)) / 2 + 2.0**-p
  elif spec.symmetric:
    half = 0.5 + qt.qmax * 2.0**-p
  else:
    half = 0.5 + 2 * (qt.qmax - qt.qmin) * 2.0**-p
  return half * s


def check_round_trip(x, spec, q):
  q.validate("x")
  deq = np.asarray(q.dequantize(jnp.float32), np.float64)
  xf = np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)
  err = np.abs(xf - deq)
  bound = step_bound(q, spec) + 1e-6 * np.abs(xf) + 1e-44
  worst = np.argmax(err - bound)
  assert np.all(err <= bound), (
      f"{spec.describe()} tile={q.tile}: |x - deq| = {err.flat[worst]} > {bound.flat[worst]} at "
      f"x={xf.flat[worst]}")
  np.testing.assert_array_equal(deq[xf == 0], 0.0)  # zeros are exact
  return deq


def assert_same_qarray(a: QArray, b: QArray):
  assert (a.qtype, a.shape, a.tile) == (b.qtype, b.shape, b.tile)
  np.testing.assert_array_equal(np.asarray(a.scale), np.asarray(b.scale))
  np.testing.assert_array_equal(np.asarray(a.values), np.asarray(b.values))
  if a.zero_point is None:
    assert b.zero_point is None
  else:
    np.testing.assert_array_equal(np.asarray(a.zero_point), np.asarray(b.zero_point))


@given(cases())
def test_round_trip_error_at_most_half_step(case):
  x, spec = case
  q = jitted_quantize(spec)(jnp.asarray(x))
  assert q.shape == x.shape and q.tile == spec.tile(x.shape)
  if spec.symmetric:
    assert q.zero_point is None
  else:
    assert q.zero_point.dtype == spec.qtype.unpacked_dtype
  check_round_trip(x, spec, q)


@given(cases(), st.sampled_from(["float32", "bfloat16"]))
def test_quantize_is_idempotent_on_its_grid(case, in_dtype):
  x, spec = case
  x = jnp.asarray(x).astype(in_dtype)
  q = jitted_quantize(spec)(x)
  q2 = jitted_quantize(spec)(q.dequantize(jnp.float32))
  assert_same_qarray(q, q2)


@given(cases(scale_dtypes=("bfloat16",)))
def test_round_trip_and_idempotence_bf16_scales(case):
  x, spec = case
  q = jitted_quantize(spec)(jnp.asarray(x))
  assert q.scale.dtype == jnp.bfloat16
  check_round_trip(x, spec, q)
  assert_same_qarray(q, jitted_quantize(spec)(q.dequantize()))


def test_float16_scales_small_weights():
  """float16 scales go subnormal rather than flushing small weights to a coarse grid."""
  x = jnp.asarray(np.random.default_rng(0).standard_normal((64, 8)) * 1e-3, jnp.float32)
  spec = QuantSpec(qtype=QType.INT8, scale_dtype="float16")
  q = quantize(x, spec)
  assert q.scale.dtype == jnp.float16
  err = np.abs(np.asarray(x) - np.asarray(q.dequantize()))
  assert err.max() <= 0.6 * float(jnp.max(q.scale.astype(jnp.float32)))


def test_eager_matches_jit():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((33, 10)), jnp.float32)
  spec = QuantSpec(qtype=QType.UINT4, symmetric=False, granularity=Granularity.GROUP,
                   group_size=8)
  assert_same_qarray(quantize(x, spec), jax.jit(quantize, static_argnums=1)(x, spec))


@pytest.mark.parametrize("qtype,sym", KINDS, ids=lambda v: getattr(v, "value", str(v)))
def test_exact_zeros_and_constants(qtype, sym):
  spec = QuantSpec(qtype=qtype, symmetric=sym, granularity=Granularity.GROUP, group_size=4,
                   channel_axes=(-1,))
  x = np.zeros((12, 5), np.float32)
  x[4:8, 0] = 2.5        # a positive constant group
  x[8:12, 1] = -0.375    # a negative constant group
  x[:, 2] = 1e-3         # constant channel
  x[0:4, 3] = [0.0, 3.0, 0.0, -1.0]
  q = quantize(jnp.asarray(x), spec)
  assert np.all(np.isfinite(np.asarray(q.scale))) and np.all(np.asarray(q.scale) > 0)
  deq = np.asarray(q.dequantize())
  np.testing.assert_array_equal(deq[x == 0], 0.0)
  const = (x != 0) & (np.arange(5)[None, :] < 3)
  np.testing.assert_allclose(deq[const], x[const], rtol=1e-5)  # constant c recovers c
  z = quantize(jnp.zeros((8, 4)), spec)
  np.testing.assert_array_equal(np.asarray(z.scale), 1.0)
  np.testing.assert_array_equal(np.asarray(z.dequantize()), 0.0)


def test_asymmetric_grid_uses_both_ends_and_zero_point():
  x = jnp.asarray([[-1.0, 0.0, 3.0, 0.25]]).T  # one channel, range [-1, 3]
  q = quantize(x, QuantSpec(qtype=QType.UINT4, symmetric=False))
  v = np.asarray(q.unpacked())[:, 0]
  assert v.min() == 0 and v.max() == 15
  zp = int(q.zero_point[0, 0])
  assert v[1] == zp  # 0 maps onto the zero point
  assert float(q.dequantize()[1, 0]) == 0.0


def test_symmetric_scale_formula():
  x = jnp.asarray([[-2.0, 1.0], [0.5, -0.25]])
  q = quantize(x, QuantSpec(qtype=QType.INT8))
  np.testing.assert_allclose(np.asarray(q.scale), [[2.0 / 127, 1.0 / 127]], rtol=2**-20)
  assert int(q.unpacked()[0, 0]) == -127


# ---- bad input ------------------------------------------------------------------------------
def _msg_names(err, *parts):
  for p in parts:
    assert p in str(err.value), f"{p!r} not in {err.value}"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_rejected(bad):
  x = np.ones((4, 4), np.float32)
  x[1, 2] = bad
  with pytest.raises(ValueError) as e:
    quantize(jnp.asarray(x), QuantSpec(), name="params/l0/kernel")
  _msg_names(e, "params/l0/kernel", "(4, 4)", "float32", "NaN/Inf")


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.int32, jnp.uint8, jnp.bool_])
def test_integer_and_bool_rejected(dtype):
  with pytest.raises(ValueError) as e:
    quantize(jnp.ones((4, 4), dtype), QuantSpec(), name="w")
  _msg_names(e, "w", "(4, 4)", jnp.dtype(dtype).name)


def test_scalar_and_empty_rejected():
  with pytest.raises(ValueError, match="w: shape \\(\\) dtype float32"):
    quantize(jnp.float32(1.0), QuantSpec(granularity=Granularity.TENSOR), name="w")
  with pytest.raises(ValueError, match="w: shape \\(0, 4\\) dtype float32"):
    quantize(jnp.ones((0, 4)), QuantSpec(), name="w")


@pytest.mark.parametrize("kw,what", [
    (dict(channel_axes=(2,)), "channel axis 2"),
    (dict(channel_axes=(-3,)), "channel axis -3"),
    (dict(granularity=Granularity.GROUP, group_size=4, group_axis=5), "group_axis 5"),
    (dict(granularity=Granularity.GROUP, group_size=4, group_axis=1), "also a channel axis"),
])
def test_axes_out_of_range(kw, what):
  with pytest.raises(ValueError) as e:
    quantize(jnp.ones((8, 6), jnp.bfloat16), QuantSpec(**kw), name="params/l0/kernel")
  _msg_names(e, "params/l0/kernel", "(8, 6)", "bfloat16", what)


def test_compute_params_and_fake_quant_name_errors():
  with pytest.raises(ValueError, match="channel axis 3"):
    compute_params(jnp.ones((2, 2)), QuantSpec(channel_axes=(3,)))
  with pytest.raises(ValueError, match="channel axis 3"):
    fake_quant(jnp.ones((2, 2)), QuantSpec(channel_axes=(3,)))


# ---- clipping -------------------------------------------------------------------------------
def _heavy(shape=(256, 16), seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_t(2.0, shape), jnp.float32)


def _per_tile_sq_err(x, q):
  d = (np.asarray(x) - np.asarray(q.dequantize())) ** 2
  return np.asarray(numerics.stats_to_tiles(
      jnp.sum(numerics.split(jnp.asarray(d), q.tile, fill=0.0),
              axis=numerics.tile_axes(q.shape, q.tile), keepdims=True), q.shape, q.tile))


def test_fixed_clip_scales_range():
  x = _heavy()
  base = QuantSpec(qtype=QType.INT4)
  q0 = quantize(x, base)
  q1 = quantize(x, dataclasses.replace(base, clip=Clip(method=ClipMethod.FIXED, ratio=0.5)))
  np.testing.assert_allclose(np.asarray(q1.scale), np.asarray(q0.scale) * 0.5, rtol=2**-18)


@pytest.mark.parametrize("sym", [True, False])
def test_percentile_clip_shrinks_range(sym):
  x = _heavy()
  qt = QType.INT4 if sym else QType.UINT4
  base = QuantSpec(qtype=qt, symmetric=sym)
  q0 = quantize(x, base)
  q1 = quantize(x, dataclasses.replace(base, clip=Clip(method=ClipMethod.PERCENTILE,
                                                       percentile=99.0)))
  s0, s1 = np.asarray(q0.scale), np.asarray(q1.scale)
  assert np.all(s1 <= s0) and np.any(s1 < 0.8 * s0)
  if sym:  # the 99th percentile of |x| per channel, over qmax
    ref = np.percentile(np.abs(np.asarray(x)), 99.0, axis=0) / 7
    np.testing.assert_allclose(s1[0], ref, rtol=1e-5)


@pytest.mark.parametrize("spec", [
    QuantSpec(qtype=QType.INT4),
    QuantSpec(qtype=QType.UINT4, symmetric=False),
    QuantSpec(qtype=QType.INT3, granularity=Granularity.GROUP, group_size=48),
    QuantSpec(qtype=QType.UINT2, symmetric=False, granularity=Granularity.GROUP, group_size=32),
    QuantSpec(qtype=QType.NF4, granularity=Granularity.GROUP, group_size=64),
    QuantSpec(qtype=QType.INT8, granularity=Granularity.TENSOR),
], ids=lambda s: s.describe())
def test_mse_clip_never_worse_than_no_clip(spec):
  x = _heavy((200, 12), seed=3)  # 200 rows: group 48/32/64 leave partial groups
  q0 = quantize(x, spec)
  mse_spec = dataclasses.replace(spec, clip=Clip(method=ClipMethod.MSE, grid=16))
  q1 = jax.jit(quantize, static_argnums=1)(x, mse_spec)  # jittable
  e0, e1 = _per_tile_sq_err(x, q0), _per_tile_sq_err(x, q1)
  assert np.all(e1 <= e0 * (1 + 1e-5) + 1e-12), "MSE clipping made a tile worse"
  if spec.qtype.bits <= 4:  # and on heavy-tailed data it helps coarse grids
    assert e1.sum() < e0.sum()
  # eagerly too (sums may associate differently from the jitted ones, so compare the invariant)
  assert np.all(_per_tile_sq_err(x, quantize(x, mse_spec)) <= e0 * (1 + 1e-5) + 1e-12)


def test_mse_clip_under_vmap_and_grad_free():
  xs = jnp.stack([_heavy((64, 4), seed=i) for i in range(3)])
  spec = QuantSpec(qtype=QType.INT4, clip=Clip(method=ClipMethod.MSE))
  qs = jax.vmap(lambda x: quantize(x, spec))(xs)
  for i in range(3):
    np.testing.assert_array_equal(np.asarray(qs.scale[i]), np.asarray(quantize(xs[i], spec).scale))


# ---- transformations ------------------------------------------------------------------------
W4G = QuantSpec(qtype=QType.UINT4, symmetric=False, granularity=Granularity.GROUP, group_size=16)


def test_vmap_quantize_over_batch_of_matrices():
  rng = np.random.default_rng(0)
  xs = jnp.asarray(rng.standard_normal((3, 40, 6)), jnp.float32)  # axes of each (40, 6) matrix
  qs = jax.vmap(lambda x: quantize(x, W4G))(xs)
  assert qs.shape == (40, 6) and qs.scale.shape == (3, 3, 6) and qs.values.shape == (3, 40, 3)
  deqs = jax.vmap(dequantize)(qs)
  for i in range(3):
    qi = quantize(xs[i], W4G)
    np.testing.assert_array_equal(np.asarray(qs.values[i]), np.asarray(qi.values))
    np.testing.assert_array_equal(np.asarray(deqs[i]), np.asarray(qi.dequantize()))


def test_eval_shape():
  out = jax.eval_shape(functools.partial(quantize, spec=W4G),
                       jax.ShapeDtypeStruct((40, 6), jnp.bfloat16))
  assert isinstance(out, QArray)
  assert out.values.shape == (40, 3) and out.values.dtype == jnp.uint8
  assert out.scale.shape == (3, 6) and out.zero_point.shape == (3, 6)


def test_no_recompilation_on_second_call():
  traces = []

  @functools.partial(jax.jit, static_argnums=1)
  def f(x, spec):
    traces.append(1)
    return quantize(x, spec).dequantize()

  rng = np.random.default_rng(0)
  for _ in range(3):
    f(jnp.asarray(rng.standard_normal((40, 6)), jnp.float32), W4G)
  assert len(traces) == 1
  if hasattr(f, "_cache_size"):
    assert f._cache_size() == 1
  f(jnp.ones((40, 6)), dataclasses.replace(W4G))  # equal spec -> same cache entry
  assert len(traces) == 1


def test_fake_quant_matches_and_straight_through():
  x = _heavy((40, 6))
  for spec in (W4G, QuantSpec(qtype=QType.NF4, granularity=Granularity.GROUP, group_size=8)):
    y = fake_quant(x, spec)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(quantize(x, spec).dequantize()))
    g = jax.grad(lambda v: jnp.sum(fake_quant(v, spec) * 3.0))(x)
    np.testing.assert_array_equal(np.asarray(g), 3.0)
  xb = x.astype(jnp.bfloat16)
  assert fake_quant(xb, W4G).dtype == jnp.bfloat16


def test_quantize_with_params_reproduces_quantize():
  x = _heavy((40, 6))
  q = quantize(x, W4G)
  q2 = quantize_with_params(x, q.scale, q.zero_point, W4G)
  assert_same_qarray(q, q2)
  # a float32 scale for a bfloat16 spec is cast first, and the stored grid is the one used
  spec = dataclasses.replace(W4G, scale_dtype="bfloat16")
  q3 = quantize_with_params(x, q.scale, q.zero_point.astype(jnp.float32), spec)
  assert q3.scale.dtype == jnp.bfloat16 and q3.zero_point.dtype == jnp.uint8
  ref = np.clip(np.round(np.asarray(x) / np_expand(np.asarray(q3.scale.astype(jnp.float32)),
                                                     q3.tile, x.shape))
                + np_expand(np.asarray(q3.zero_point), q3.tile, x.shape), 0, 15)
  np.testing.assert_array_equal(np.asarray(q3.unpacked()), ref)
  with pytest.raises(ValueError, match="scale has shape"):
    quantize_with_params(x, q.scale[:1], q.zero_point[:1], W4G, name="w")
  with pytest.raises(ValueError, match="needs a zero point"):
    quantize_with_params(x, q.scale, None, W4G, name="w")
  with pytest.raises(ValueError, match="symmetric"):
    quantize_with_params(x, q.scale, q.zero_point, QuantSpec(qtype=QType.INT4,
                         granularity=Granularity.GROUP, group_size=16), name="w")
