"""Observers and streaming layer statistics agree with numpy on the concatenated data."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jq.calibrate import (act_params, hessian, init_stats, max_abs, mean_abs, merge_stats,
                          minmax, moving_average_minmax, mse_range, percentile, update_stats)
from jq.calibrate.observers import _hist_init, _hist_update
from jq.qtypes import QType
from jq.spec import A8_STATIC, ActivationSpec

K = 8


@pytest.fixture(autouse=True)
def _strict_promotion():
  with jax.numpy_dtype_promotion("strict"):
    yield


def _batches(seed: int = 0):
  """Heavy-tailed batches whose range grows from batch to batch (forces histogram re-binning)."""
  rng = np.random.default_rng(seed)
  return [(rng.standard_t(3, size=(2, 100, K)) * s).astype(np.float32) for s in (0.3, 1.0, 7.0)]


def _run(obs, batches, k=K):
  update = jax.jit(obs.update)
  state = obs.init(k)
  for x in batches:
    state = update(state, x)
  return state


def test_minmax_matches_numpy():
  b = _batches()
  allx = np.concatenate([x.reshape(-1, K) for x in b])
  lo, hi = minmax().finalize(_run(minmax(), b))
  assert float(lo) == allx.min() and float(hi) == allx.max()
  lo, hi = minmax(per_channel=True).finalize(_run(minmax(per_channel=True), b))
  np.testing.assert_array_equal(lo, allx.min(0))
  np.testing.assert_array_equal(hi, allx.max(0))


def test_moving_average_matches_recurrence():
  b = _batches()
  m = 0.75
  lo, hi = moving_average_minmax(m).finalize(_run(moving_average_minmax(m), b))
  rlo, rhi = b[0].min(), b[0].max()
  for x in b[1:]:
    rlo, rhi = m * rlo + (1 - m) * x.min(), m * rhi + (1 - m) * x.max()
  np.testing.assert_allclose([lo, hi], [rlo, rhi], rtol=1e-6)


@pytest.mark.parametrize("per_channel", [False, True])
def test_percentile_matches_numpy_within_a_bin(per_channel):
  b = _batches(1)
  allx = np.concatenate([x.reshape(-1, K) for x in b])
  axis = 0 if per_channel else None
  bins = 1024
  width = 2 * np.abs(allx).max(axis=axis) / bins
  obs = percentile(99.0, bins=bins, per_channel=per_channel)
  lo, hi = obs.finalize(_run(obs, b))
  want = np.percentile(np.abs(allx), 99.0, axis=axis, method="inverted_cdf")
  assert np.all(np.abs(np.asarray(hi) - want) <= width)
  np.testing.assert_array_equal(lo, -hi)
  obs = percentile(98.0, symmetric=False, bins=bins, per_channel=per_channel)
  lo, hi = obs.finalize(_run(obs, b))
  want_lo, want_hi = np.percentile(allx, [2.0, 98.0], axis=axis, method="inverted_cdf")
  assert np.all(np.abs(np.asarray(lo) - want_lo) <= width)
  assert np.all(np.abs(np.asarray(hi) - want_hi) <= width)


def test_streaming_histogram_equals_one_shot_histogram():
  """Ranges are powers of two, so re-binning after growth is exact (old edges are new edges)."""
  b = _batches(2)
  update = jax.jit(lambda st, x: _hist_update(st, x, True, "t"))
  streamed = _hist_init(K, 64, True)
  for x in b:
    streamed = update(streamed, x)
  once = jax.jit(lambda st, x: _hist_update(st, x, True, "t"))(_hist_init(K, 64, True),
                                                              np.concatenate(b))
  np.testing.assert_array_equal(streamed.exp, once.exp)
  np.testing.assert_array_equal(streamed.pos, once.pos)
  np.testing.assert_array_equal(streamed.neg, once.neg)
  assert float(jnp.sum(streamed.pos) + jnp.sum(streamed.neg)) == sum(x.size for x in b)


def _int_mse(x, lo, hi, bits, symmetric):
  if symmetric:
    step = hi / (2 ** (bits - 1) - 1)
    q = np.clip(np.round(x / step), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * step
  else:
    step = (hi - lo) / (2 ** bits - 1)
    zp = np.round(-lo / step)
    q = (np.clip(np.round(x / step) + zp, 0, 2 ** bits - 1) - zp) * step
  return float(np.mean((x - q) ** 2))


@pytest.mark.parametrize("bits,symmetric", [(8, True), (4, False)])
def test_mse_range_is_near_the_brute_force_optimum(bits, symmetric):
  x = np.random.default_rng(3).standard_t(3, size=(4, 500, K)).astype(np.float32)
  obs = mse_range(bits, symmetric=symmetric)
  lo, hi = obs.finalize(_run(obs, list(x)))
  lo, hi = float(lo), float(hi)
  full = (min(x.min(), 0.0), max(x.max(), 0.0))
  if symmetric:
    full = (-max(-full[0], full[1]), max(-full[0], full[1]))
  assert full[0] <= lo <= 0.0 <= hi <= full[1]
  best = min(_int_mse(x, full[0] * r, full[1] * r, bits, symmetric)
             for r in np.linspace(0.02, 1.0, 200))
  got = _int_mse(x, lo, hi, bits, symmetric)
  assert got <= 1.02 * best
  assert got < (0.95 if bits == 8 else 0.5) * _int_mse(x, *full, bits, symmetric)


def test_observers_work_inside_scan():
  obs = percentile(99.0)
  xs = jnp.asarray(np.stack(_batches(4)))
  state, _ = jax.lax.scan(lambda s, x: (obs.update(s, x), None), obs.init(K), xs)
  lo, hi = jax.jit(obs.finalize)(state)
  assert np.isfinite(float(hi)) and float(lo) == -float(hi)


def test_nan_and_empty_are_clear_errors():
  for obs in (minmax(), moving_average_minmax(), percentile(), mse_range()):
    with pytest.raises(ValueError, match="layers_3/mlp: the observer saw no activations"):
      obs.finalize(obs.init(K), name="layers_3/mlp")
    x = np.ones((4, K), np.float32)
    x[1, 2] = np.nan
    with pytest.raises(ValueError, match="layers_3/mlp: 1 NaN/Inf"):
      obs.finalize(obs.update(obs.init(K), x), name="layers_3/mlp")
  with pytest.raises(ValueError, match="K=8"):
    minmax(per_channel=True).update(minmax(per_channel=True).init(K), np.ones((2, 3), np.float32))
  with pytest.raises(ValueError, match="percentile"):
    percentile(0.0)


def test_act_params():
  s, z = act_params(jnp.float32(-3.0), jnp.float32(5.0), A8_STATIC)
  assert z is None and np.isclose(float(s), 5.0 / 127, rtol=1e-5)
  for qt in (QType.UINT8, QType.INT8):
    spec = ActivationSpec(qtype=qt, symmetric=False)
    s, z = act_params(jnp.float32(-3.0), jnp.float32(5.0), spec)
    assert z.dtype == qt.unpacked_dtype and z.shape == ()
    s, z = float(s), int(z)
    assert np.isclose(s, 8.0 / 255, rtol=1e-5)
    assert qt.qmin <= z <= qt.qmax
    assert abs((qt.qmin - z) * s + 3.0) <= s and abs((qt.qmax - z) * s - 5.0) <= s
  # a range without 0 is extended to contain it; an all-zero range gets scale 1
  s, z = act_params(jnp.float32(2.0), jnp.float32(5.0), ActivationSpec(qtype=QType.UINT8,
                                                                      symmetric=False))
  assert int(z) == 0
  s, _ = act_params(jnp.zeros((3,)), jnp.zeros((3,)), A8_STATIC)
  np.testing.assert_array_equal(s, np.ones(3))


def test_layer_stats_match_numpy_and_merge():
  b = [x.reshape(-1, K) for x in _batches(5)]
  st = init_stats(K)
  for x in b:
    st = update_stats(st, x)
  allx = np.concatenate(b).astype(np.float64)
  np.testing.assert_allclose(hessian(st), 2 * allx.T @ allx / len(allx), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(mean_abs(st), np.abs(allx).mean(0), rtol=1e-5)
  np.testing.assert_array_equal(max_abs(st), np.abs(allx).max(0).astype(np.float32))
  assert int(st.count) == len(allx)
  a = update_stats(init_stats(K), b[0])
  c = update_stats(update_stats(init_stats(K), b[1]), b[2])
  merged = merge_stats(a, c)
  np.testing.assert_allclose(merged.xtx, st.xtx, rtol=1e-5)
  assert int(merged.count) == int(st.count)


def test_layer_stats_errors_name_the_layer():
  with pytest.raises(ValueError, match="blocks_2/attn/q: no calibration tokens"):
    hessian(init_stats(K), "blocks_2/attn/q")
  x = np.ones((3, K), np.float32)
  x[0, 0] = np.inf
  with pytest.raises(ValueError, match="blocks_2/attn/q: 1 NaN/Inf"):
    hessian(update_stats(init_stats(K), x), "blocks_2/attn/q")
  with pytest.raises(ValueError, match="does not end in K=8"):
    update_stats(init_stats(K), np.ones((3, 5), np.float32))
