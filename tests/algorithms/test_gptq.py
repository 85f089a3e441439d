"""GPTQ: equals a plain column-by-column reference, beats RTN, survives adversarial Hessians."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jq import numerics
from jq.algorithms import gptq_quantize
from jq.calibrate import init_stats, update_stats
from jq.quantize import compute_params, quantize, quantize_with_params
from jq.spec import W4A16_G32, Clip, ClipMethod, Granularity, QuantSpec
from jq.qtypes import QType

K, N, T = 64, 16, 256
INT4_CH = QuantSpec(qtype=QType.INT4)


@pytest.fixture(autouse=True)
def _strict_promotion():
  with jax.numpy_dtype_promotion("strict"):
    yield


def _layer(seed: int, *, outliers: int = 4, factor: float = 10.0, hetero: bool = False):
  """Correlated inputs with a few outlier channels, and a small random kernel."""
  rng = np.random.default_rng(seed)
  mix = rng.standard_normal((K, K)) * 0.3 + np.eye(K)
  scale = np.ones(K)
  scale[rng.choice(K, outliers, replace=False)] = factor
  if hetero:
    scale = scale * np.exp(rng.standard_normal(K))
  x = (rng.standard_normal((T, K)) @ mix * scale).astype(np.float32)
  w = (rng.standard_normal((K, N)) * 0.05).astype(np.float32)
  return x, w


def _hessian(x):
  x64 = x.astype(np.float64)
  return jnp.asarray(2.0 * x64.T @ x64 / x.shape[0], jnp.float32)


def _out_err(x, w, w_hat):
  return float(np.sum((x @ w - x @ np.asarray(w_hat, np.float32)) ** 2))


def _reference_gptq(w, h, spec, *, damp=0.01, act_order=False):
  """The paper's algorithm row by row in float64 (no lazy batching), on jq's grid."""
  w = np.array(w, np.float64)
  h = np.array(h, np.float64)
  k, n = w.shape
  dead = np.diag(h) == 0
  h[dead, dead] = 1.0
  w[dead] = 0.0
  tile = spec.tile((k, n))
  static = spec.granularity is not Granularity.GROUP or act_order
  if static:
    s, z = compute_params(jnp.asarray(w, jnp.float32), spec)
    def full(t):
      return np.broadcast_to(np.asarray(numerics.expand(t.astype(jnp.float32), tile, (k, n))),
                             (k, n))
    s_el, z_el = full(s), (None if z is None else full(z))
  perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
  w, h = w[perm], h[perm][:, perm]
  if static:
    s_el, z_el = s_el[perm], (None if z_el is None else z_el[perm])
  h += damp * np.mean(np.diag(h)) * np.eye(k)
  u = np.linalg.cholesky(np.linalg.inv(h)).T
  elem = dataclasses.replace(spec, granularity=Granularity.CHANNEL, channel_axes=(0, 1),
                             group_size=None, clip=Clip())
  fq = jax.jit(lambda r, s, z: quantize_with_params(r, s, z, elem).dequantize())
  params = jax.jit(lambda r: compute_params(r, spec))
  q = np.zeros_like(w)
  g = tile[0]
  for i in range(k):
    if static:
      srow, zrow = s_el[i], (None if z_el is None else z_el[i])
    elif i % g == 0:
      s, z = params(jnp.asarray(w[i:i + g], jnp.float32))
      srow = np.broadcast_to(np.asarray(s, np.float32), (1, n))[0]
      zrow = None if z is None else np.broadcast_to(np.asarray(z, np.float32), (1, n))[0]
    q[i] = np.asarray(fq(jnp.asarray(w[i:i + 1], jnp.float32), jnp.asarray(srow[None]),
                         None if zrow is None else jnp.asarray(zrow[None])))[0]
    w[i:] -= np.outer(u[i, i:], (w[i] - q[i]) / u[i, i])
  return q[np.argsort(perm)]


@pytest.mark.parametrize("spec,kw", [
    (W4A16_G32, dict(block_size=64)),                      # several groups per block
    (QuantSpec(qtype=QType.INT4, granularity=Granularity.GROUP, group_size=24),
     dict(block_size=8)),                                  # groups span blocks; partial last group
    (W4A16_G32, dict(act_order=True, block_size=7)),       # static groups, ragged blocks
])
def test_matches_rowwise_reference(spec, kw):
  x, w = _layer(0)
  x[:, 5] = 0.0                                            # a dead input
  h = _hessian(x)
  q, info = gptq_quantize(jnp.asarray(w), h, spec, **kw)
  ref = _reference_gptq(w, h, spec, act_order=kw.get("act_order", False))
  got = np.asarray(q.dequantize())
  assert np.mean(np.isclose(got, ref, rtol=0, atol=1e-6)) > 0.995
  assert int(info.dead) == 1 and int(info.fallback) == 0
  assert np.all(got[5] == 0)


@pytest.mark.parametrize("spec", [W4A16_G32, INT4_CH])
def test_beats_rtn_on_output_error(spec):
  x, w = _layer(1)
  q, info = gptq_quantize(jnp.asarray(w), _hessian(x), spec)
  rtn = _out_err(x, w, quantize(jnp.asarray(w), spec).dequantize())
  gptq = _out_err(x, w, q.dequantize())
  assert gptq < 0.7 * rtn, (gptq / rtn)
  assert float(info.loss) > 0


def test_act_order_beats_natural_order_on_heterogeneous_channels():
  ratios = []
  for seed in range(3):
    x, w = _layer(10 + seed, hetero=True)
    h = _hessian(x)
    plain, _ = gptq_quantize(jnp.asarray(w), h, W4A16_G32)
    ordered, _ = gptq_quantize(jnp.asarray(w), h, W4A16_G32, act_order=True)
    ratios.append(_out_err(x, w, ordered.dequantize()) / _out_err(x, w, plain.dequantize()))
  assert np.mean(ratios) < 0.95, ratios


def test_result_is_an_ordinary_qarray_on_jq_grid():
  x, w = _layer(2)
  q, _ = gptq_quantize(jnp.asarray(w, jnp.bfloat16), _hessian(x), W4A16_G32, act_order=True)
  assert q.shape == (K, N) and q.tile == W4A16_G32.tile((K, N))
  # act-order keeps contiguous groups, with the scales RTN would use for the (same) weights
  # (jitted like GPTQ: eager and jitted compute_params may differ by one scale unit)
  s_rtn, z_rtn = jax.jit(lambda v: compute_params(v, W4A16_G32))(jnp.asarray(w, jnp.bfloat16))
  np.testing.assert_array_equal(np.asarray(q.scale), np.asarray(s_rtn))
  np.testing.assert_array_equal(np.asarray(q.zero_point), np.asarray(z_rtn))
  # re-quantizing the dequantized result on its own grid is the identity
  again = quantize_with_params(q.dequantize(), q.scale, q.zero_point, W4A16_G32)
  np.testing.assert_array_equal(np.asarray(again.values), np.asarray(q.values))


def test_layer_stats_input_equals_hessian_input():
  x, w = _layer(3)
  st = init_stats(K)
  for part in np.split(x, 4):
    st = update_stats(st, part)
  a, _ = gptq_quantize(jnp.asarray(w), st, W4A16_G32)
  b, _ = gptq_quantize(jnp.asarray(w), _hessian(x), W4A16_G32)
  # float32 streaming sums vs a float64 Hessian: rounding flips propagate, the quality does not move
  ea, eb = _out_err(x, w, a.dequantize()), _out_err(x, w, b.dequantize())
  assert abs(ea - eb) < 0.05 * eb


def test_adversarial_inputs_stay_finite():
  x, w = _layer(4)
  wj = jnp.asarray(w)
  # rank-deficient (fewer tokens than channels, duplicated channels): damping handles it
  xs = x[:8].copy()
  xs[:, 1] = xs[:, 0]
  q, info = gptq_quantize(wj, _hessian(xs), W4A16_G32)
  assert np.all(np.isfinite(np.asarray(q.dequantize())))
  assert _out_err(xs, w, q.dequantize()) <= _out_err(xs, w, quantize(wj, W4A16_G32).dequantize())
  # indefinite "Hessian": damping is raised, then the diagonal fallback; never NaN
  bad = jnp.asarray(np.diag(np.linspace(4.0, 5.0, K)) - 3.0 * np.ones((K, K)), jnp.float32)
  q, info = gptq_quantize(wj, bad, W4A16_G32)
  assert np.all(np.isfinite(np.asarray(q.dequantize())))
  assert int(info.retries) > 0
  # all-zero weights quantize to zeros
  q, _ = gptq_quantize(jnp.zeros((K, N), jnp.float32), _hessian(x), W4A16_G32)
  assert np.all(np.asarray(q.dequantize()) == 0)


def test_staged_factorisation_equals_one_program_and_holds_three_k_by_k():
  """Concrete Hessians are factored one jitted stage at a time (the ordered Hessian dropped
  before the inverse); under jax.jit the same stages run as one program.  Both give the same
  bits, retries and fallbacks; no stage holds more than 3 K × K float32 matrices (one program:
  5.5)."""
  from jq.algorithms import gptq
  x, w = _layer(5)
  wj = jnp.asarray(w)
  x[:, 7] = 0.0                                            # a dead input
  st = update_stats(init_stats(K), jnp.asarray(x))
  xs = x[:8].copy()                                        # rank-deficient
  xs[:, 1] = xs[:, 0]
  bad = jnp.asarray(np.diag(np.linspace(4.0, 5.0, K)) - 3.0 * np.ones((K, K)), jnp.float32)
  cases = [(st, {}), (st, {"act_order": True}), (_hessian(xs), {}),
           (bad, {"max_retries": 1}), (bad, {})]           # fails, then the diagonal; damping wins
  for h, kw in cases:
    a, ia = gptq_quantize(wj, h, W4A16_G32, **kw)
    b, ib = jax.jit(lambda w_, h_, kw=kw: gptq_quantize(w_, h_, W4A16_G32, **kw))(wj, h)
    np.testing.assert_array_equal(np.asarray(a.unpacked()), np.asarray(b.unpacked()))
    np.testing.assert_array_equal(np.asarray(a.scale), np.asarray(b.scale))
    assert [int(v) for v in (ia.retries, ia.fallback, ia.dead)] == \
        [int(v) for v in (ib.retries, ib.fallback, ib.dead)]
  assert (int(ia.retries), int(ia.fallback)) == (5, 0)
  k = 512
  kk, one = jax.ShapeDtypeStruct((k, k), jnp.float32), jax.ShapeDtypeStruct((), jnp.float32)

  def held(lowered):
    m = lowered.compile().memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes) / (k * k * 4)

  stages = [gptq._ordered_jit.lower(kk, one, act_order=True),
            gptq._cholesky_jit.lower(kk, one, one), gptq._inverse_jit.lower(kk)]
  assert max(held(s) for s in stages) <= 3.05, [held(s) for s in stages]


def test_percentile_clip_with_partial_group():
  """Group scales come from compute_params on the group's real rows only (padding excluded)."""
  x, w = _layer(5)
  spec = dataclasses.replace(W4A16_G32, clip=Clip(method=ClipMethod.PERCENTILE, percentile=90.0))
  q, _ = gptq_quantize(jnp.asarray(w[:40]), _hessian(x[:, :40]), spec)   # groups of 32 and 8
  assert np.all(np.isfinite(np.asarray(q.dequantize())))
  rtn = jax.jit(lambda v: quantize(v, spec).dequantize())(jnp.asarray(w[:40]))
  assert _out_err(x[:, :40], w[:40], q.dequantize()) < _out_err(x[:, :40], w[:40], rtn)


def test_errors_are_clear():
  x, w = _layer(6)
  wj = jnp.asarray(w)
  with pytest.raises(ValueError, match="mlp/up: no calibration tokens"):
    gptq_quantize(wj, init_stats(K), W4A16_G32, name="mlp/up")
  with pytest.raises(ValueError, match="Hessian is zero"):
    gptq_quantize(wj, jnp.zeros((K, K), jnp.float32), W4A16_G32)
  with pytest.raises(ValueError, match=r"expected \(64, 64\)"):
    gptq_quantize(wj, jnp.eye(N, dtype=jnp.float32), W4A16_G32)
  with pytest.raises(ValueError, match="NaN"):
    gptq_quantize(wj, jnp.full((K, K), jnp.nan, jnp.float32), W4A16_G32)
  with pytest.raises(ValueError, match="2-D"):
    gptq_quantize(wj.reshape(K, 4, 4), _hessian(x), W4A16_G32)
  with pytest.raises(ValueError, match="damp"):
    gptq_quantize(wj, _hessian(x), W4A16_G32, damp=0.0)


def test_token_weights_enter_the_hessian_only():
  x, _ = _layer(20)
  wts = np.linspace(0.5, 3.0, T).astype(np.float32)
  st = update_stats(init_stats(K), jnp.asarray(x), jnp.asarray(wts))
  np.testing.assert_allclose(np.asarray(st.xtx), (x * wts[:, None]).T @ x, rtol=2e-5, atol=1e-3)
  assert int(st.count) == T   # count stays the number of tokens
  np.testing.assert_allclose(np.asarray(st.abssum), np.abs(x).sum(0), rtol=1e-5)
  with pytest.raises(ValueError, match="token_weight of shape"):
    update_stats(init_stats(K), jnp.asarray(x), jnp.ones((T + 1,), jnp.float32))


def test_upweighting_a_rare_token_protects_it():
  """The attention-sink failure seen on SmolLM2, in miniature: one token per sequence points in
  a direction the others never visit.  Plain XᵀX lets GPTQ push error there (sink error >> RTN's);
  weighting that token in the Hessian (``GPTQOptions.first_token_weight``) brings it back
  while keeping most of GPTQ's gain on the ordinary tokens."""
  rng = np.random.default_rng(7)
  seqs, length = 32, 64
  basis = np.linalg.qr(rng.standard_normal((K, K)))[0]
  common, rare = basis[:, :K - 8], basis[:, K - 8:]
  x = (rng.standard_normal((seqs, length, K - 8)) * np.linspace(3, 0.3, K - 8)) @ common.T
  sink = 0.3 * rng.standard_normal((K - 8,)) @ common.T + 4.0 * rare @ rng.standard_normal(8)
  x[:, 0] = sink + 0.05 * rng.standard_normal((seqs, K))
  x = x.astype(np.float32)
  w = (rng.standard_normal((K, N)) * 0.05).astype(np.float32)
  flat = x.reshape(-1, K)

  def errs(wq):
    e = ((flat @ w - flat @ wq) ** 2).sum(-1) / ((flat @ w) ** 2).sum(-1)
    e = e.reshape(seqs, length)
    return float(e[:, 0].mean()), float(e[:, 1:].mean())

  rtn = errs(np.asarray(quantize(jnp.asarray(w), W4A16_G32).dequantize()))
  out = {}
  for w0 in (1.0, 16.0):
    tw = np.ones((seqs, length), np.float32)
    tw[:, 0] = w0
    st = update_stats(init_stats(K), jnp.asarray(flat), jnp.asarray(tw.reshape(-1)))
    q, _ = gptq_quantize(jnp.asarray(w), st, W4A16_G32)
    out[w0] = errs(np.asarray(q.dequantize()))
  assert out[1.0][0] > 1.2 * rtn[0], (out, rtn)         # textbook GPTQ sacrifices the rare token
  assert out[16.0][0] < 0.25 * out[1.0][0], (out, rtn)  # the weight protects it
  assert out[16.0][1] < 0.7 * rtn[1], (out, rtn)        # ordinary tokens still beat RTN


@pytest.mark.parametrize("spec,kw", [
    (W4A16_G32, dict(block_size=16)),                      # dynamic groups, several per block
    (W4A16_G32, dict(act_order=True, block_size=7)),       # processing order, ragged blocks
    (QuantSpec(qtype=QType.UINT4, symmetric=False), dict(block_size=128)),   # asymmetric, 1 block
])
def test_split_factor_road_matches_the_dense_road(spec, kw):
  """``devices=``: the Hessian placed by rows, factored blockwise (UL factorisation, triangular
  inverse) and read one row panel at a time gives the dense road's factor and codes (one device
  here; 8 devices in tests/distributed)."""
  from jq.algorithms import factor_split
  from jq.algorithms.gptq import _prepare
  x, w = _layer(7)
  x[:, 5] = 0.0                                            # a dead input
  h = _hessian(x)
  a, ia = gptq_quantize(jnp.asarray(w), h, spec, **kw)
  b, ib = gptq_quantize(jnp.asarray(w), h, spec, devices=jax.devices()[:1], **kw)
  np.testing.assert_array_equal(np.asarray(b.unpacked()), np.asarray(a.unpacked()))
  np.testing.assert_allclose(np.asarray(b.scale, np.float32), np.asarray(a.scale, np.float32),
                             rtol=1e-5)   # group scales of weights updated in another order
  assert int(ib.dead) == int(ia.dead) == 1 and int(ib.retries) == int(ia.retries) == 0
  np.testing.assert_allclose(float(ib.loss), float(ia.loss), rtol=1e-4)
  # the factor itself, against the dense road's (processing order, damped)
  mesh = factor_split.mesh_of(jax.devices()[:1])
  diag = np.where(np.diag(np.asarray(h)) > 0, np.diag(np.asarray(h)), 1.0).astype(np.float32)
  hp = factor_split.place_hessian(h, 1.0, np.arange(K), ~(np.diag(np.asarray(h)) > 0), 96, mesh)
  u, _, _, failed = factor_split.upper_chol_inverse(hp, float(np.mean(diag)), 0.01, 6, mesh=mesh,
                                                    k=K, block=16)
  u0 = _prepare(h, jnp.float32(1.0), jnp.float32(0.01), act_order=False, max_retries=6)[0]
  assert not bool(failed)
  np.testing.assert_allclose(np.asarray(u)[:K, :K], np.asarray(u0), atol=2e-6 * float(
      np.max(np.abs(np.asarray(u0)))))
  np.testing.assert_array_equal(np.asarray(u)[K:, K:], np.eye(96 - K, dtype=np.float32))
  assert not np.any(np.asarray(u)[:K, K:]) and not np.any(np.asarray(u)[K:, :K])


def test_split_factor_road_retries_and_falls_back_like_the_dense_road():
  x, w = _layer(4)
  wj = jnp.asarray(w)
  one = jax.devices()[:1]
  xs = x[:8].copy()                                        # rank-deficient: damping handles it
  xs[:, 1] = xs[:, 0]
  a, ia = gptq_quantize(wj, _hessian(xs), W4A16_G32)
  b, ib = gptq_quantize(wj, _hessian(xs), W4A16_G32, devices=one)
  assert int(ib.retries) == int(ia.retries)
  assert np.mean(np.asarray(a.unpacked()) != np.asarray(b.unpacked())) <= 0.01
  bad = jnp.asarray(np.diag(np.linspace(4.0, 5.0, K)) - 3.0 * np.ones((K, K)), jnp.float32)
  a, ia = gptq_quantize(wj, bad, W4A16_G32, max_retries=1)       # fails, then the diagonal
  b, ib = gptq_quantize(wj, bad, W4A16_G32, max_retries=1, devices=one)
  assert (int(ia.fallback), int(ia.retries)) == (int(ib.fallback), int(ib.retries)) == (1, 1)
  np.testing.assert_array_equal(np.asarray(b.unpacked()), np.asarray(a.unpacked()))
  with pytest.raises(ValueError, match="concrete Hessian"):
    jax.jit(lambda h: gptq_quantize(wj, h, W4A16_G32, devices=one)[0].scale)(bad)
