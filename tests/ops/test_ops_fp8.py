"""Fp8 (e4m3) contractions: fp8 dynamic/static W8A8 and fp8 weight-only, held to a numpy
emulation, to the dequantize-then-float dot, and to XLA's native fp8 dot."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jq
from jq import ops
from jq.ops import reference
from jq.qarray import ActivationQuant, QArray
from jq.qtypes import QType
from jq.spec import A_FP8_DYNAMIC, A_FP8_STATIC, FP8_CHANNEL, Granularity, QuantSpec

F8 = ml_dtypes.float8_e4m3fn
K, N = 48, 20
DN = (((2,), (0,)), ((), ()))          # x (B, T, K) @ w (K, N)


def _data(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((3, 5, K)).astype(np.float32)
  x[..., 7] *= 30.0                     # an outlier channel, as after a norm in a real model
  x[1, 2] = 0.0                         # an all-zero token: scale 1, output 0
  w = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)
  return x, w


def _with_act(q: QArray, spec, scale=None) -> QArray:
  return dataclasses.replace(q, activation=ActivationQuant(scale, None, spec))


def _np_quantize(x, s):
  """numpy twin of the activation quantization: e4m3(clip(x / s, ±448)), round half to even."""
  return np.clip(x / s, -448, 448).astype(F8)


def _np_emulation(x, q: QArray, sx):
  """``(Σ qx·qw) · sx · sw`` with every product exact (float64 sums), and the sum of |terms|."""
  qx = _np_quantize(x, sx).astype(np.float64)
  qw = np.asarray(q.unpacked()).astype(np.float64)
  sw = np.asarray(q.scale, np.float64)
  y = (qx @ qw) * sx * sw
  bound = (np.abs(qx) @ np.abs(qw)) * sx * sw
  return y, bound


@pytest.mark.parametrize("native", [False, True], ids=["emulated", "native"])
def test_dynamic_equals_numpy_emulation_and_float_dot(native):
  x, w = _data()
  q = _with_act(jq.quantize(jnp.asarray(w), FP8_CHANNEL), A_FP8_DYNAMIC)
  y = np.asarray(jax.jit(lambda a, b: reference.fp8_dot_general(a, b, DN, native=native))(
      jnp.asarray(x), q))
  sx = np.max(np.abs(x), axis=-1, keepdims=True).astype(np.float32) * np.float32(1 / 448)
  sx = np.where(sx > 0, sx, np.float32(1))
  # the activation bytes are exactly numpy's round-half-even e4m3 of x / sx
  qx, s, z = ops.quantize_activations(jnp.asarray(x), (2,), q.activation)
  assert z is None and qx.dtype == F8
  np.testing.assert_array_equal(np.asarray(s), sx)
  assert np.array_equal(np.asarray(qx).view(np.uint8), _np_quantize(x, sx).view(np.uint8))
  # the output is the emulation up to float32 summation (products of e4m3 values are exact)
  want, bound = _np_emulation(x, q, sx)
  assert np.all(np.abs(y - want) <= 1e-6 * bound + 1e-30)
  assert np.all(y[1, 2] == 0)
  # and the float dot on the dequantized weight, within e4m3's relative step on each input
  wd = np.asarray(q.dequantize(), np.float64)
  err_bound = (2.0 ** -4 * np.abs(x) + 2.0 ** -10 * sx) @ np.abs(wd)
  assert np.all(np.abs(y - x @ wd) <= err_bound * (1 + 1e-5) + 1e-6 * bound)
  assert np.max(np.abs(y - x @ wd)) > 0     # the activations really were quantized


def test_static_uses_the_calibrated_scale_and_clips_beyond_it():
  x, w = _data(1)
  amax = float(np.max(np.abs(x[:2])))                      # calibrated on the first two batches
  s, _ = jq.calibrate.act_params(jnp.float32(-amax), jnp.float32(amax), A_FP8_STATIC)
  q = _with_act(jq.quantize(jnp.asarray(w), FP8_CHANNEL), A_FP8_STATIC, s)
  assert ops.choose(jnp.asarray(x), q, DN)[0] == "xla_reference_fp8"
  y = np.asarray(jax.jit(lambda a, b: ops.dot_general(a, b, DN))(jnp.asarray(x), q))
  sx = np.float32(s)
  want, bound = _np_emulation(x, q, sx)
  assert np.all(np.abs(y - want) <= 1e-6 * bound + 1e-30)
  qx = _np_quantize(x, sx).astype(np.float32)
  assert np.any(np.abs(x) > 448 * sx) and np.max(np.abs(qx)) == 448   # the third batch clips
  inside = np.all(np.abs(x) <= 448 * sx, axis=-1)[..., None]
  wd = np.asarray(q.dequantize(), np.float64)
  err_bound = (2.0 ** -4 * np.abs(x) + 2.0 ** -10 * sx) @ np.abs(wd)
  assert np.all(np.where(inside, np.abs(y - x @ wd) <= err_bound * (1 + 1e-5) + 1e-6 * bound,
                         True))


def test_einsum_with_heads_and_bf16_output():
  """A DenseGeneral-like kernel (d, heads, head_dim): per-token scales over d, per-(head,
  feature) weight scales, bfloat16 activations in and out."""
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 4, 16)).astype(np.float32)
  w = rng.standard_normal((16, 3, 8)).astype(np.float32)
  lay = jq.Layout(contracting=(0,), channels=(1, 2))
  q = _with_act(jq.quantize(jnp.asarray(w), FP8_CHANNEL, layout=lay), A_FP8_DYNAMIC)
  assert q.scale.shape == (1, 3, 8)
  xb = jnp.asarray(x, jnp.bfloat16)
  y = ops.einsum("btd,dhk->bthk", xb, q)
  assert y.dtype == jnp.bfloat16 and y.shape == (2, 4, 3, 8)
  xf = np.asarray(xb.astype(jnp.float32))
  sx = np.max(np.abs(xf), axis=-1, keepdims=True) * np.float32(1 / 448)
  qx = _np_quantize(xf, sx).astype(np.float64)
  qw = np.asarray(q.unpacked()).astype(np.float64)
  want = np.einsum("btd,dhk->bthk", qx, qw) * sx[..., None] * np.asarray(q.scale, np.float64)
  np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=2.0 ** -7, atol=1e-6)


def test_weight_only_fp8_runs_on_the_weight_only_reference():
  x, w = _data(3)
  for spec in (FP8_CHANNEL, QuantSpec(qtype=QType.FP8_E4M3, granularity=Granularity.GROUP,
                                      group_size=32)):
    q = jq.quantize(jnp.asarray(w), spec)
    assert ops.choose(jnp.asarray(x), q, DN)[0] == "xla_reference_weight_only"
    y = np.asarray(ops.dot_general(jnp.asarray(x), q, DN))
    want = x.astype(np.float64) @ np.asarray(q.dequantize(), np.float64)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * np.max(np.abs(want)))
  y16 = ops.matmul(jnp.asarray(x[0], jnp.bfloat16), jq.quantize(jnp.asarray(w), FP8_CHANNEL))
  assert y16.dtype == jnp.bfloat16


def test_jaxpr_native_is_an_fp8_dot_and_emulation_an_f32_dot():
  x, w = _data()
  q = _with_act(jq.quantize(jnp.asarray(w), FP8_CHANNEL), A_FP8_DYNAMIC)

  def dots(native):
    jpr = jax.make_jaxpr(lambda a, b: reference.fp8_dot_general(a, b, DN, native=native))(
        jnp.asarray(x), q)
    return [tuple(str(v.aval.dtype) for v in e.invars) + (str(e.outvars[0].aval.dtype),)
            for e in jpr.eqns if e.primitive.name == "dot_general"]

  assert dots(True) == [("float8_e4m3fn", "float8_e4m3fn", "float32")]
  assert dots(False) == [("float32", "float32", "float32")]


def test_no_recompilation_on_second_call():
  x, w = _data()
  q = _with_act(jq.quantize(jnp.asarray(w), FP8_CHANNEL), A_FP8_DYNAMIC)
  traces = []

  @jax.jit
  def f(a, b):
    traces.append(1)
    return ops.dot_general(a, b, DN)

  f(jnp.asarray(x), q)
  f(jnp.asarray(x) * 2, dataclasses.replace(q, scale=q.scale * 2))
  assert len(traces) == 1


def test_mismatched_operands_are_refused_with_the_layer_named():
  x, w = _data()
  xj, wj = jnp.asarray(x), jnp.asarray(w)
  int8_w_fp8_a = _with_act(jq.quantize(wj, jq.W8A16), A_FP8_DYNAMIC)
  with pytest.raises(ValueError, match=r"mlp/kernel: .*fp8_e4m3 activations need fp8_e4m3 "
                                       "weights"):
    ops.dot_general(xj, int8_w_fp8_a, DN, name="mlp/kernel")
  fp8_w_int8_a = _with_act(jq.quantize(wj, FP8_CHANNEL), jq.A8_DYNAMIC)
  with pytest.raises(ValueError, match="int8 activations need 8-bit integer weights"):
    ops.dot_general(xj, fp8_w_int8_a, DN)
  grouped = _with_act(jq.quantize(wj, QuantSpec(qtype=QType.FP8_E4M3,
                                                granularity=Granularity.GROUP, group_size=16)),
                      A_FP8_DYNAMIC)
  with pytest.raises(ValueError, match="fp8_e4m3 activations need one weight scale along"):
    ops.dot_general(xj, grouped, DN)


def test_conv_runs_fp8_weight_only_and_refuses_fp8_activations():
  conv_w = jq.quantize(jnp.ones((3, 3, 4, 8)), QuantSpec(qtype=QType.FP8_E4M3,
                                                         channel_axes=(3,)))
  lhs = jnp.ones((1, 6, 6, 4))
  y = ops.conv_general_dilated(lhs, conv_w, (1, 1), "SAME",
                               dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert y.shape == (1, 6, 6, 8) and float(y[0, 3, 3, 0]) == pytest.approx(36.0)
  with pytest.raises(ValueError, match="fp8_e4m3 activations are not supported for convolutions"):
    ops.conv_general_dilated(lhs, _with_act(conv_w, A_FP8_DYNAMIC), (1, 1), "SAME",
                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
