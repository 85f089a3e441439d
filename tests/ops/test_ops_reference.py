"""The XLA reference contractions equal their float definitions (invariants, not golden numbers)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jq
from jq import numerics, ops
from jq.qarray import ActivationQuant, QArray
from jq.qtypes import QType
from jq.spec import ActivationSpec, ActMode, Granularity, QuantSpec

K, N = 48, 20  # group size 32 leaves a partial last group along K

WEIGHT_SPECS = [
    QuantSpec(qtype=QType.INT8),
    QuantSpec(qtype=QType.UINT8, symmetric=False),
    QuantSpec(qtype=QType.INT8, granularity=Granularity.TENSOR),
    QuantSpec(qtype=QType.INT4),
    QuantSpec(qtype=QType.UINT4, symmetric=False, granularity=Granularity.GROUP, group_size=32),
    QuantSpec(qtype=QType.INT4, granularity=Granularity.GROUP, group_size=16),
    QuantSpec(qtype=QType.INT3, granularity=Granularity.GROUP, group_size=32),
    QuantSpec(qtype=QType.INT2),
    QuantSpec(qtype=QType.UINT2, symmetric=False, granularity=Granularity.GROUP, group_size=32),
    QuantSpec(qtype=QType.NF4),
    QuantSpec(qtype=QType.NF4, granularity=Granularity.GROUP, group_size=16),
]
ACT_SPECS = [
    ActivationSpec(),
    ActivationSpec(symmetric=False),
    ActivationSpec(qtype=QType.UINT8, symmetric=False),
]
INT8_WEIGHTS = [QuantSpec(qtype=QType.INT8), QuantSpec(qtype=QType.UINT8, symmetric=False),
                QuantSpec(qtype=QType.INT8, symmetric=False)]
DN = (((2,), (0,)), ((), ()))


def fast_jit(fn):
  """``jax.jit`` compiled with XLA's backend optimizations off: same numerics, faster compiles
  for these one-shot test computations."""
  def call(*args):
    return jax.jit(fn).lower(*args).compile(
        compiler_options={"xla_backend_optimization_level": 0})(*args)
  return call


def _data(seed=0, x_shape=(3, 5, K), w_shape=(K, N)):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  w = jnp.asarray(rng.standard_normal(w_shape) / np.sqrt(w_shape[0]), jnp.float32)
  return x, w


def _with_act(q: QArray, spec: ActivationSpec, scale=None, zero_point=None) -> QArray:
  return dataclasses.replace(q, activation=ActivationQuant(scale, zero_point, spec))


def _close(a, b, rtol=1e-5):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * max(1.0, float(np.abs(b).max())))


@pytest.mark.parametrize("spec", WEIGHT_SPECS, ids=lambda s: s.describe())
def test_weight_only_equals_dequantized_dot_and_stays_within_half_a_step(spec):
  """y = x·dequantize(w), and |y − x·w| ≤ Σ_k |x_k|·step_k/2 (NF4: half the widest table gap)."""
  @fast_jit
  def run(x, w):
    q = jq.quantize(w, spec)
    step = jnp.broadcast_to(numerics.expand(q.scale, q.tile, q.shape), q.shape)
    if spec.qtype.is_table:
      step = step * float(np.max(np.diff(jq.NF4_TABLE)))
    y = ops.matmul(x, q)
    return y, x @ q.dequantize(), jnp.abs(y - x @ w), jnp.abs(x) @ (step / 2)

  y, ref, err, bound = run(*_data())
  assert y.shape == (3, 5, N) and y.dtype == jnp.float32
  _close(y, ref)
  assert bool(jnp.all(err <= bound * (1 + 1e-5) + 1e-5))


def test_bfloat16_activations_keep_their_dtype():
  @fast_jit
  def run(x, w):
    q = jq.quantize(w, jq.W4A16_G32)
    xb = x.astype(jnp.bfloat16)
    return (ops.matmul(xb, q), x @ q.dequantize(),
            ops.matmul(xb, q, preferred_element_type=jnp.float32),
            xb.astype(jnp.float32) @ q.dequantize())

  y, ref, y32, ref32 = run(*_data(2))
  assert y.dtype == jnp.bfloat16 and y32.dtype == jnp.float32
  _close(y, ref, rtol=2e-2)
  _close(y32, ref32, rtol=1e-2)


def test_dot_general_batch_and_multiple_contracting_axes():
  rng = np.random.default_rng(3)
  # x (heads=4, tokens=5, head_dim=12) · w (heads=4, head_dim=12, out=20): batch 0, contract 2/1
  x = jnp.asarray(rng.standard_normal((4, 5, 12)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((4, 12, N)), jnp.float32)
  dn = (((2,), (1,)), ((0,), (0,)))
  # two contracting axes (an attention output projection): x (b, t, h, d) · w (h, d, out)
  x2 = jnp.asarray(rng.standard_normal((2, 5, 4, 12)), jnp.float32)
  w2 = jnp.asarray(rng.standard_normal((4, 12, N)), jnp.float32)
  dn2 = (((2, 3), (0, 1)), ((), ()))
  specs = (QuantSpec(qtype=QType.INT8, channel_axes=(0, -1)),
           QuantSpec(qtype=QType.UINT4, symmetric=False, channel_axes=(0, -1),
                     granularity=Granularity.GROUP, group_axis=1, group_size=8))

  @fast_jit
  def run(x, w, x2, w2):
    out = []
    for spec in specs:
      q = jq.quantize(w, spec)
      out.append((ops.dot_general(x, q, dn), jax.lax.dot_general(x, q.dequantize(), dn)))
    q2 = jq.quantize(w2, QuantSpec(qtype=QType.INT8),
                     layout=jq.Layout(contracting=(0, 1), channels=(2,)))
    out.append((ops.dot_general(x2, q2, dn2), jax.lax.dot_general(x2, q2.dequantize(), dn2)))
    q2a = _with_act(q2, ActivationSpec())
    xf = ops.fake_quant_activations(x2, (2, 3), q2a.activation)
    out.append((ops.dot_general(x2, q2a, dn2), jax.lax.dot_general(xf, q2.dequantize(), dn2)))
    return out

  for y, ref in run(x, w, x2, w2):
    _close(y, ref)


@pytest.mark.parametrize("eq,x_shape,w_shape", [
    ("btd,dhk->bthk", (2, 5, K), (K, 4, 5)),
    ("btd,df->fbt", (2, 5, K), (K, N)),
    ("...d,df->...f", (2, 3, 5, K), (K, N)),
    ("bthk,hkd->btd", (2, 5, 4, 12), (4, 12, N)),
    ("btd,hdk->bhtk", (2, 5, K), (4, K, 6)),   # rhs batch-free 'h' lands in the middle
    ("bxd,df->bf", (2, 3, K), (K, N)),         # lhs-only axis x is summed first
])
def test_einsum_matches_jnp_einsum(eq, x_shape, w_shape):
  @fast_jit
  def run(x, w):
    q = jq.quantize(w, QuantSpec(qtype=QType.INT4, channel_axes=(-1,)))
    return ops.einsum(eq, x, q), jnp.einsum(eq, x, q.dequantize())

  _close(*run(*_data(4, x_shape, w_shape)))


@pytest.mark.parametrize("wspec", INT8_WEIGHTS, ids=lambda s: s.describe())
@pytest.mark.parametrize("aspec", ACT_SPECS, ids=lambda s: s.describe())
def test_int8_dynamic_equals_fake_quant_reference(wspec, aspec):
  @fast_jit
  def run(x, w):
    q = _with_act(jq.quantize(w, wspec), aspec)
    ref = ops.fake_quant_activations(x, (2,), q.activation) @ q.dequantize()
    return ops.dot_general(x, q, DN), ref

  x, w = _data(5)
  y, ref = run(x, w)
  _close(y, ref)
  # and close to the float product: per-token activation error is at most half a step
  assert float(jnp.max(jnp.abs(y - x @ w))) < 0.1 * float(jnp.max(jnp.abs(x @ w)))


def test_int8_dynamic_scales_are_per_token():
  x, w = _data(6)
  act = ActivationQuant(None, None, ActivationSpec())
  q, s, z = ops.quantize_activations(x, (2,), act)
  assert s.shape == (3, 5, 1) and z is None and q.dtype == jnp.int32
  np.testing.assert_allclose(np.asarray(s)[..., 0], np.abs(np.asarray(x)).max(-1) / 127, rtol=1e-6)
  assert int(jnp.max(jnp.abs(q))) == 127


@pytest.mark.parametrize("aspec", [ActivationSpec(mode=ActMode.STATIC),
                                   ActivationSpec(mode=ActMode.STATIC, qtype=QType.UINT8,
                                                  symmetric=False)],
                         ids=lambda s: s.describe())
def test_int8_static_uses_calibrated_scale(aspec):
  x, w = _data(7)
  lo, hi = float(jnp.min(x)), float(jnp.max(x))
  if aspec.symmetric:
    scale, zp = jnp.float32(max(-lo, hi) / 127), None
  else:
    scale = jnp.float32((hi - lo) / 255)
    zp = jnp.asarray(round(-lo / float(scale)), jnp.uint8)

  @fast_jit
  def run(x, w, scale, zp):
    q = _with_act(jq.quantize(w, QuantSpec(qtype=QType.INT8)), aspec, scale, zp)
    ref = ops.fake_quant_activations(x, (2,), q.activation) @ q.dequantize()
    return ops.einsum("btd,dn->btn", x, q), ref, ops.quantize_activations(x, (2,), q.activation)[1]

  y, ref, s = run(x, w, scale, zp)
  _close(y, ref)
  assert s.shape == () and float(s) == float(scale)


def test_int8_accumulation_is_exact():
  """With unit scales, y is the exact integer Σ(qx − zx)(qw − zw) (< 2^24, exact in float32)."""
  rng = np.random.default_rng(8)
  zx = 37
  qx = rng.integers(0, 256, (6, K))
  qw = rng.integers(0, 256, (K, N))
  zw = rng.integers(0, 256, (1, N))
  w = QArray(values=jnp.asarray(qw, jnp.uint8), scale=jnp.ones((1, N), jnp.float32),
             zero_point=jnp.asarray(zw, jnp.uint8), activation=None, qtype=QType.UINT8,
             shape=(K, N), tile=(K, 1)).validate("w")
  aspec = ActivationSpec(mode=ActMode.STATIC, qtype=QType.UINT8, symmetric=False)
  w = _with_act(w, aspec, jnp.float32(1.0), jnp.asarray(zx, jnp.uint8))
  x = jnp.asarray(qx - zx, jnp.float32)  # quantizes back to exactly qx
  y = fast_jit(ops.matmul)(x, w)
  exact = (qx - zx).astype(np.int64) @ (qw - zw).astype(np.int64)
  np.testing.assert_array_equal(np.asarray(y, np.float64), exact.astype(np.float64))


def test_fake_quant_activations_round_trip_within_half_step():
  @fast_jit
  def run(x):
    ok = []
    for spec in ACT_SPECS:
      act = ActivationQuant(None, None, spec)
      _, s, _ = ops.quantize_activations(x, (2,), act)
      err = jnp.abs(ops.fake_quant_activations(x, (2,), act) - x)
      ok.append(jnp.all(err <= s / 2 * (1 + 1e-5)))
    return ok

  assert all(bool(o) for o in run(_data(9)[0]))
