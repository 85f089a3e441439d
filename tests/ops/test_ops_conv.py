"""``jq.ops.conv_general_dilated`` equals ``lax.conv_general_dilated`` on its float definition.

Weight-only: the conv of the dequantized kernel.  Int8: the conv (in float64) of the input
fake-quantized with one scale per example and the dequantized kernel, including asymmetric
activations and weights with zero padding and input dilation (exact in integers).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jq
from jq import numerics, ops
from jq.qarray import ActivationQuant, QArray
from jq.qtypes import QType
from jq.spec import ActivationSpec, ActMode, Granularity, QuantSpec


def fast_jit(fn):
  """``jax.jit`` with XLA's backend optimizations off: same numerics, faster compiles."""
  def call(*args):
    return jax.jit(fn).lower(*args).compile(
        compiler_options={"xla_backend_optimization_level": 0})(*args)
  return call


@dataclasses.dataclass(frozen=True)
class Case:
  """One convolution problem: shapes and ``lax.conv_general_dilated`` keyword arguments."""
  id: str
  x_shape: tuple[int, ...]
  w_shape: tuple[int, ...]
  dn: tuple[str, str, str] | None
  strides: tuple[int, ...]
  padding: object
  lhs_dilation: tuple[int, ...] | None = None
  rhs_dilation: tuple[int, ...] | None = None
  groups: int = 1
  batch_groups: int = 1

  def kwargs(self) -> dict:
    return dict(window_strides=self.strides, padding=self.padding,
                lhs_dilation=self.lhs_dilation, rhs_dilation=self.rhs_dilation,
                dimension_numbers=self.dn, feature_group_count=self.groups,
                batch_group_count=self.batch_groups)

  def specs(self):
    """``(lhs_spec, rhs_spec, out_spec)`` of this problem (axis indices)."""
    return lax.conv_dimension_numbers(self.x_shape, self.w_shape, self.dn)

  @property
  def out_axis(self) -> int:
    return self.specs().rhs_spec[0]

  @property
  def in_axis(self) -> int:
    return self.specs().rhs_spec[1]


CASES = [
    Case("1d_same_stride2", (2, 11, 4), (3, 4, 6), ("NWC", "WIO", "NWC"), (2,), "SAME"),
    Case("2d_valid_kernel_dilation", (2, 9, 8, 4), (3, 3, 4, 6), ("NHWC", "HWIO", "NHWC"),
         (1, 2), "VALID", rhs_dilation=(2, 1)),
    Case("2d_same_groups2", (2, 7, 6, 4), (3, 3, 2, 6), ("NHWC", "HWIO", "NHWC"), (2, 1),
         "SAME", groups=2),
    Case("2d_pairs_input_dilation_groups2", (2, 5, 6, 4), (3, 2, 2, 6), ("NHWC", "HWIO", "NHWC"),
         (1, 2), ((2, 1), (0, 3)), lhs_dilation=(2, 1), rhs_dilation=(1, 2), groups=2),
    Case("2d_negative_pad", (2, 8, 7, 3), (2, 3, 3, 5), ("NHWC", "HWIO", "NHWC"), (1, 1),
         ((-1, 1), (0, 0))),
    Case("2d_nchw_default_dimension_numbers", (2, 4, 7, 7), (6, 4, 3, 3), None, (1, 1), "SAME"),
    Case("3d_same", (2, 5, 4, 6, 3), (3, 2, 3, 3, 4), ("NDHWC", "DHWIO", "NDHWC"), (1, 2, 1),
         "SAME"),
]
WO_ONLY = [Case("2d_batch_groups2", (4, 6, 6, 3), (3, 3, 3, 4), ("NHWC", "HWIO", "NHWC"), (1, 1),
                "SAME", batch_groups=2)]


def _data(case: Case, seed=0, offset=0.0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal(case.x_shape) + offset, jnp.float32)
  fan_in = np.prod(case.w_shape) / case.w_shape[case.out_axis]
  w = jnp.asarray(rng.standard_normal(case.w_shape) / np.sqrt(fan_in) + 0.02, jnp.float32)
  return x, w


def multi_axis_tile_qarray(w, tile: tuple[int, ...], qtype=QType.INT4) -> QArray:
  """A symmetric QArray with groups spanning several kernel axes (e.g. spatial x input features),
  built directly (jittable): independent of how ``QuantSpec.tile`` lays out conv kernels."""
  shape = tuple(w.shape)
  absmax = numerics.stats_to_tiles(
      jnp.max(jnp.abs(numerics.split(w, tile)), axis=numerics.tile_axes(shape, tile),
              keepdims=True), shape, tile)
  scale = jnp.maximum(absmax, 1e-6) / qtype.qmax
  q = jnp.clip(jnp.round(w / numerics.expand(scale, tile, shape)), qtype.qmin, qtype.qmax)
  return QArray(values=numerics.pack(q.astype(jnp.int8), qtype), scale=scale, zero_point=None,
                activation=None, qtype=qtype, shape=shape, tile=tile)


def _weight_only_qarrays(case: Case, w: jax.Array) -> dict[str, QArray]:
  out, inp = case.out_axis, case.in_axis
  chan = dict(channel_axes=(out,))
  group = dict(channel_axes=(out,), granularity=Granularity.GROUP, group_size=2, group_axis=inp)
  tile = [1] * w.ndim
  tile[inp] = w.shape[inp]
  spatial = [a for a in range(w.ndim) if a not in (inp, out)]
  tile[spatial[-1]] = 2  # groups over (last spatial axis in pairs) x (all input features)
  return {
      "int8_channel": jq.quantize(w, QuantSpec(qtype=QType.INT8, **chan)),
      "uint4_asym_channel": jq.quantize(w, QuantSpec(qtype=QType.UINT4, symmetric=False, **chan)),
      "int8_tensor": jq.quantize(w, QuantSpec(qtype=QType.INT8, granularity=Granularity.TENSOR)),
      "nf4_channel": jq.quantize(w, QuantSpec(qtype=QType.NF4, **chan)),
      "uint4_asym_g2_in_features": jq.quantize(w, QuantSpec(qtype=QType.UINT4, symmetric=False,
                                                            **group)),
      "int4_multi_axis_tile": multi_axis_tile_qarray(w, tuple(tile)),
  }


def _close(y, ref, rtol=1e-5):
  y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
  assert y.shape == ref.shape
  np.testing.assert_allclose(y, ref, rtol=rtol, atol=rtol * max(1.0, float(np.abs(ref).max())))


def _conv64(x, w, case: Case) -> np.ndarray:
  """The float64 convolution (XLA:CPU's float32 one mishandles some negative paddings)."""
  with jax.enable_x64(True):
    return np.asarray(lax.conv_general_dilated(jnp.asarray(np.asarray(x), jnp.float64),
                                               jnp.asarray(np.asarray(w), jnp.float64),
                                               **case.kwargs()))


@pytest.mark.parametrize("case", CASES + WO_ONLY, ids=lambda c: c.id)
def test_weight_only_equals_conv_of_dequantized_kernel(case):
  @fast_jit
  def run(x, w):
    qs = _weight_only_qarrays(case, w)
    for k, q in qs.items():
      q.validate(k)
    return {k: (ops.conv_general_dilated(x, q, **case.kwargs()), q.dequantize())
            for k, q in qs.items()}

  x, w = _data(case)
  for k, (y, wq) in run(x, w).items():
    assert y.dtype == jnp.float32, k
    _close(y, _conv64(x, wq, case))


def test_weight_only_per_channel_convolves_integer_weights_and_scales_the_output():
  """Per-channel: the conv's kernel operand is ``q − zp`` (integers), the scale comes after."""
  case = CASES[2]
  x, w = _data(case)
  q = jq.quantize(w, QuantSpec(qtype=QType.UINT8, symmetric=False, channel_axes=(-1,)))
  jaxpr = jax.make_jaxpr(lambda x, q: ops.conv_general_dilated(x, q, **case.kwargs()))(x, q)
  convs = [e for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
  assert len(convs) == 1 and convs[0].invars[1].aval.dtype == jnp.float32
  assert any(e.primitive.name == "mul" for e in jaxpr.eqns[jaxpr.eqns.index(convs[0]):])


def test_bfloat16_input_keeps_its_dtype_and_preferred_element_type_is_honoured():
  case = CASES[1]
  x, w = _data(case)
  q = jq.quantize(w, QuantSpec(qtype=QType.INT4, channel_axes=(-1,)))

  @fast_jit
  def run(x, q):
    xb = x.astype(jnp.bfloat16)
    return (ops.conv_general_dilated(xb, q, **case.kwargs()),
            ops.conv_general_dilated(xb, q, **case.kwargs(), preferred_element_type=jnp.float32),
            xb.astype(jnp.float32), q.dequantize())

  yb, y32, xb, wq = run(x, q)
  ref = _conv64(xb, wq, case)
  assert yb.dtype == jnp.bfloat16 and y32.dtype == jnp.float32
  _close(y32, ref, rtol=1e-5)
  _close(yb, ref, rtol=2e-2)


# ---- int8 activations ----------------------------------------------------------------------------

ACT_SPECS = [
    ActivationSpec(),
    ActivationSpec(symmetric=False),
    ActivationSpec(qtype=QType.UINT8, symmetric=False),
    ActivationSpec(mode=ActMode.STATIC),
    ActivationSpec(mode=ActMode.STATIC, qtype=QType.UINT8, symmetric=False),
]
INT8_WEIGHTS = [QuantSpec(qtype=QType.INT8, channel_axes=(-1,)),
                QuantSpec(qtype=QType.UINT8, symmetric=False, channel_axes=(-1,))]


def _act(spec: ActivationSpec, x) -> ActivationQuant:
  """Int8 activations; static specs get a per-tensor scale calibrated on ``x`` (numpy)."""
  scale = zp = None
  if spec.mode is ActMode.STATIC:
    lo, hi = min(float(np.min(x)), 0.0), max(float(np.max(x)), 0.0)
    if spec.symmetric:
      scale = jnp.float32(max(-lo, hi) / 127)
    else:
      scale = jnp.float32((hi - lo) / 255)
      zp = jnp.asarray(round(-lo / float(scale)), jnp.uint8)
  return ActivationQuant(scale, zp, spec)


def _int8_qarray(case: Case, w: jax.Array, wspec: QuantSpec, act: ActivationQuant) -> QArray:
  wspec = dataclasses.replace(wspec, channel_axes=(case.out_axis,))
  return dataclasses.replace(jq.quantize(w, wspec), activation=act)


def _int8_data(case: Case, seed=0):
  # inputs offset from 0, so that asymmetric zero points are far from the int8 midpoint
  return _data(case, seed, offset=0.8)


def _act_id(s: ActivationSpec) -> str:
  return f"{s.describe()} {s.qtype.value}"


# every activation spec with symmetric int8 weights; asymmetric uint8 weights with the asymmetric
# activations (all four zero-point terms)
INT8_PAIRS = ([(a, INT8_WEIGHTS[0]) for a in ACT_SPECS]
              + [(a, INT8_WEIGHTS[1]) for a in ACT_SPECS if not a.symmetric])


@pytest.mark.parametrize("aspec,wspec", INT8_PAIRS,
                         ids=[f"{_act_id(a)}-{w.describe()}" for a, w in INT8_PAIRS])
def test_int8_equals_float64_conv_of_per_example_fake_quant_input(aspec, wspec):
  """Every case (1/2/3-D, SAME/VALID/pairs/negative padding, input and kernel dilation, groups)."""
  data = [_int8_data(c, seed=i) for i, c in enumerate(CASES)]
  acts = [_act(aspec, np.asarray(x)) for x, _ in data]

  @fast_jit
  def run(data, acts):
    out = []
    for case, (x, w), act in zip(CASES, data, acts):
      q = _int8_qarray(case, w, wspec, act)
      batch = case.specs().lhs_spec[0]
      per_example = tuple(a for a in range(x.ndim) if a != batch)
      out.append((ops.conv_general_dilated(x, q, **case.kwargs()),
                  ops.fake_quant_activations(x, per_example, act), q.dequantize()))
    return out

  for case, (x, _), (y, xf, wq) in zip(CASES, data, run(data, acts)):
    _close(y, _conv64(xf, wq, case), rtol=2e-6)
    # and close to the float conv: the per-example quantization error stays small
    yf = _conv64(x, wq, case)
    assert np.max(np.abs(np.asarray(y) - yf)) < 0.05 * np.max(np.abs(yf)), case.id


@pytest.mark.parametrize("case", [CASES[2], CASES[3], CASES[5]], ids=lambda c: c.id)
def test_int8_asymmetric_accumulation_is_exact_with_padding(case):
  """Unit scales and integer inputs: y is exactly Σ P(qx − zx)·(qw − zw) (zero padding and
  input-dilation holes are real zeros, not the zero point), and exact in float64."""
  rng = np.random.default_rng(1)
  out = case.out_axis
  zx = 201
  qx = rng.integers(0, 256, case.x_shape)
  qw = rng.integers(0, 256, case.w_shape)
  zshape = [1] * len(case.w_shape)
  zshape[out] = case.w_shape[out]
  zw = rng.integers(0, 256, zshape)
  tile = list(case.w_shape)
  tile[out] = 1
  w = QArray(values=jnp.asarray(qw, jnp.uint8), scale=jnp.ones(zshape, jnp.float32),
             zero_point=jnp.asarray(zw, jnp.uint8), activation=None, qtype=QType.UINT8,
             shape=case.w_shape, tile=tuple(tile)).validate("w")
  aspec = ActivationSpec(mode=ActMode.STATIC, qtype=QType.UINT8, symmetric=False)
  w = dataclasses.replace(w, activation=ActivationQuant(jnp.float32(1.0),
                                                        jnp.asarray(zx, jnp.uint8), aspec))
  x = jnp.asarray(qx - zx, jnp.float32)  # quantizes back to exactly qx
  y = fast_jit(lambda x, w: ops.conv_general_dilated(x, w, **case.kwargs()))(x, w)
  exact = _conv64(qx - zx, qw - zw, case)
  assert np.all(exact == np.round(exact)) and np.abs(exact).max() < 2 ** 24
  np.testing.assert_array_equal(np.asarray(y, np.float64), exact)


@pytest.mark.parametrize("aspec", [ActivationSpec(), ActivationSpec(qtype=QType.UINT8,
                                                                    symmetric=False)],
                         ids=_act_id)
def test_int8_jaxpr_is_int8_by_int8_to_int32_conv(aspec):
  """Every convolution of the int8 path (the main one and the zero-point corrections) takes int8
  operands and produces int32."""
  case = CASES[2]
  x, w = _int8_data(case)
  q = _int8_qarray(case, w, INT8_WEIGHTS[1], _act(aspec, x))
  jaxpr = jax.make_jaxpr(lambda x, q: ops.conv_general_dilated(x, q, **case.kwargs()))(x, q)
  convs = [e for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
  assert convs
  for e in convs:
    assert [v.aval.dtype for v in e.invars] == [jnp.int8, jnp.int8], e
    assert e.outvars[0].aval.dtype == jnp.int32, e


def test_int8_dynamic_scale_is_per_example():
  """Scaling one example by 1000 leaves the others' outputs bit-identical."""
  case = CASES[0]
  x, w = _int8_data(case)
  q = _int8_qarray(case, w, INT8_WEIGHTS[0], _act(ActivationSpec(), x))
  f = fast_jit(lambda x, q: ops.conv_general_dilated(x, q, **case.kwargs()))
  y = f(x, q)
  y2 = f(x.at[0].multiply(1000.0), q)
  np.testing.assert_array_equal(np.asarray(y[1]), np.asarray(y2[1]))
  assert not np.allclose(np.asarray(y[0]), np.asarray(y2[0]))


# ---- errors --------------------------------------------------------------------------------------

def _error(fn, *parts):
  with pytest.raises(ValueError) as e:
    fn()
  for p in parts:
    assert p in str(e.value), str(e.value)


def test_invalid_inputs_raise_value_errors_naming_the_parameter():
  case = CASES[2]
  x, w = _data(case)
  q = jq.quantize(w, QuantSpec(qtype=QType.INT8, channel_axes=(-1,)))
  conv = lambda x, q, **kw: ops.conv_general_dilated(
      x, q, **{**case.kwargs(), **kw}, name="net/conv/kernel")
  _error(lambda: conv(x, w), "net/conv/kernel", "jq.QArray")
  _error(lambda: conv(x.astype(jnp.int32), q), "net/conv/kernel", "floating point")
  _error(lambda: conv(x[..., :3], q), "net/conv/kernel", "input features")
  _error(lambda: conv(x, q, feature_group_count=4), "net/conv/kernel")
  _error(lambda: conv(x[0], q), "net/conv/kernel", "rank")
  _error(lambda: conv(x, q, window_strides=(1,)), "net/conv/kernel", "window_strides")
  _error(lambda: conv(x, q, lhs_dilation=(2, 1)), "net/conv/kernel", "lhs) dilation")
  _error(lambda: conv(x, q, padding=((1, 1),)), "net/conv/kernel", "padding")
  _error(lambda: conv(x, q, dimension_numbers=("NCHW", "HWIO")), "net/conv/kernel",
         "dimension_numbers")
  grouped = jq.quantize(w, QuantSpec(qtype=QType.INT8, channel_axes=(-1,),
                                     granularity=Granularity.GROUP, group_size=1, group_axis=-2))
  act = ActivationQuant(None, None, ActivationSpec())
  _error(lambda: conv(x, dataclasses.replace(grouped, activation=act)), "net/conv/kernel",
         "per output feature")
  q4 = jq.quantize(w, QuantSpec(qtype=QType.INT4, channel_axes=(-1,)))
  _error(lambda: conv(x, dataclasses.replace(q4, activation=act)), "net/conv/kernel", "8-bit")
  bg = WO_ONLY[0]
  xb, wb = _data(bg)
  qb = dataclasses.replace(jq.quantize(wb, QuantSpec(qtype=QType.INT8, channel_axes=(-1,))),
                           activation=act)
  _error(lambda: ops.conv_general_dilated(xb, qb, **bg.kwargs(), name="net/bg/kernel"),
         "net/bg/kernel", "batch_group_count")
  static = ActivationQuant(jnp.ones((2,), jnp.float32), None,
                           ActivationSpec(mode=ActMode.STATIC))
  _error(lambda: conv(x, dataclasses.replace(q, activation=static)), "net/conv/kernel", "scalar")
