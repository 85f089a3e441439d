"""SmoothQuant: the scale formula, W8A8 error with outlier activations, and float invariance."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jq.algorithms import fold_scale_into_norm, scale_consumer, smooth_scales
from jq.calibrate import act_params, init_stats, minmax, update_stats
from jq.quantize import quantize
from jq.spec import A8_STATIC, W8A16

K, N, T = 64, 48, 512


@pytest.fixture(autouse=True)
def _strict_promotion():
  with jax.numpy_dtype_promotion("strict"):
    yield


def _layer(seed: int = 0):
  rng = np.random.default_rng(seed)
  scale = np.ones(K, np.float32)
  scale[rng.choice(K, 3, replace=False)] = 50.0           # LLM-style activation outlier channels
  x = (rng.standard_normal((T, K)) * scale).astype(np.float32)
  ws = [(rng.standard_normal((K, N)) * 0.05).astype(np.float32) for _ in range(3)]
  return x, ws


def _w8a8(x, w):
  """Static per-tensor int8 activations (minmax observer) × per-channel int8 weights."""
  obs = minmax()
  lo, hi = obs.finalize(obs.update(obs.init(x.shape[-1]), x))
  s_a, _ = act_params(lo, hi, A8_STATIC)
  xq = jnp.clip(jnp.round(x / s_a), -127, 127) * s_a
  return xq @ quantize(jnp.asarray(w), W8A16).dequantize()


def test_scale_formula_matches_numpy():
  x, ws = _layer()
  a = np.abs(x).max(0)
  for alpha in (0.5, 0.8):
    s = smooth_scales(a, ws, alpha)
    w_max = np.max([np.abs(w).max(1) for w in ws], axis=0)
    np.testing.assert_allclose(s, a ** alpha / w_max ** (1 - alpha), rtol=1e-5)
  st = update_stats(init_stats(K), x)
  np.testing.assert_array_equal(smooth_scales(st, ws), smooth_scales(a, ws))


def test_smoothing_lowers_w8a8_error_on_outlier_activations():
  x, ws = _layer(1)
  s = smooth_scales(np.abs(x).max(0), ws, 0.5)
  xs = x / np.asarray(s)
  for w in ws:
    ref = x @ w
    plain = float(jnp.mean((_w8a8(x, w) - ref) ** 2))
    smooth = float(jnp.mean((_w8a8(xs, scale_consumer(jnp.asarray(w), s)) - ref) ** 2))
    assert smooth < 0.2 * plain, smooth / plain


def test_folding_keeps_the_float_model():
  x, ws = _layer(2)
  g = jnp.asarray(np.random.default_rng(2).uniform(0.5, 1.5, K), jnp.float32)
  s = smooth_scales(np.abs(x).max(0), ws)
  for w in ws:
    y = (x * g) @ w
    y2 = (x * fold_scale_into_norm(g, s)) @ scale_consumer(jnp.asarray(w), s)
    np.testing.assert_allclose(y2, y, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(y))))


def test_degenerate_channels_are_neutral_and_clamped():
  x, ws = _layer(3)
  a = np.abs(x).max(0)
  a[0] = 0.0                                               # dead activation channel
  ws[0][1] = ws[1][1] = ws[2][1] = 0.0                     # all-zero weight row
  a[2] = 1e30                                              # absurd outlier
  s = np.asarray(smooth_scales(a, ws, 0.5, max_scale=1e4))
  assert s[0] == 1.0 and s[1] == 1.0 and s[2] == 1e4
  assert np.all(np.isfinite(s)) and np.all(s > 0)


def test_errors_are_clear():
  x, ws = _layer(4)
  with pytest.raises(ValueError, match="alpha"):
    smooth_scales(np.abs(x).max(0), ws, 1.5)
  with pytest.raises(ValueError, match="K=64"):
    smooth_scales(np.ones(10, np.float32), ws)
  with pytest.raises(ValueError, match="q_proj: no calibration tokens"):
    smooth_scales(init_stats(K), ws, name="q_proj")
  with pytest.raises(ValueError, match="NaN"):
    smooth_scales(np.full(K, np.nan, np.float32), ws)
