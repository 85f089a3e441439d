"""AWQ: the scale and clip searches beat RTN on output error; folding keeps the float model."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jq.algorithms import (awq_search_clip, awq_search_scale, fold_scale_into_linear,
                           fold_scale_into_norm, scale_consumer, subsample_tokens)
from jq.quantize import quantize
from jq.spec import W4A16_G32, Clip, ClipMethod

K, N, T = 64, 32, 256


@pytest.fixture(autouse=True)
def _strict_promotion():
  with jax.numpy_dtype_promotion("strict"):
    yield


def _layer(seed: int = 0):
  rng = np.random.default_rng(seed)
  scale = np.ones(K, np.float32)
  scale[rng.choice(K, 4, replace=False)] = 20.0           # outlier input channels
  x = (rng.standard_normal((T, K)) * scale).astype(np.float32)
  ws = [(rng.standard_normal((K, N)) * 0.05).astype(np.float32) for _ in range(2)]
  return x, ws


def _err(x, w, w_hat):
  return float(np.sum((x @ w - x @ np.asarray(w_hat, np.float32)) ** 2))


def _awq_weights(s, w, spec=W4A16_G32):
  """What the model effectively multiplies x by: Q(diag(s) W) / s."""
  q = quantize(scale_consumer(jnp.asarray(w), s), spec)
  return np.asarray(q.dequantize()) / np.asarray(s)[:, None]


def test_scale_search_beats_rtn_for_shared_consumers():
  x, ws = _layer()
  s, info = awq_search_scale(x, ws, W4A16_G32)
  assert s.shape == (K,) and np.all(np.isfinite(s)) and np.all(np.asarray(s) > 0)
  assert float(info.loss) <= float(info.rtn_loss) and 0.0 < float(info.alpha) < 1.0
  for w in ws:                                             # one shared s helps both consumers
    rtn = _err(x, w, quantize(jnp.asarray(w), W4A16_G32).dequantize())
    assert _err(x, w, _awq_weights(s, w)) < 0.7 * rtn


def test_clip_search_lowers_error_further():
  x, ws = _layer(1)
  w = ws[0]
  s, _ = awq_search_scale(x, w, W4A16_G32)
  ws_scaled = scale_consumer(jnp.asarray(w), s)
  clipped, ratio = awq_search_clip(x / np.asarray(s), ws_scaled, W4A16_G32, chunk=8)
  assert ratio.shape == (2, N) and np.all((ratio > 0.5) & (ratio <= 1.0))
  assert clipped.dtype == ws_scaled.dtype
  err_scaled = _err(x, w, _awq_weights(s, w))
  w_eff = np.asarray(quantize(clipped, W4A16_G32).dequantize()) / np.asarray(s)[:, None]
  assert _err(x, w, w_eff) <= err_scaled
  # chunking over output channels does not change the answer
  _, ratio_one_chunk = awq_search_clip(x / np.asarray(s), ws_scaled, W4A16_G32)
  np.testing.assert_array_equal(ratio, ratio_one_chunk)
  # the spec's own clip is ignored in the search
  clip_spec = dataclasses.replace(W4A16_G32, clip=Clip(method=ClipMethod.MSE))
  _, ratio_mse = awq_search_clip(x / np.asarray(s), ws_scaled, clip_spec)
  np.testing.assert_array_equal(ratio, ratio_mse)


def test_duo_scaling_is_autoawq_formula_and_never_worse_than_rtn():
  """duo: s = mean|x|^a / mean_w^(1-a) (mean_w: |W| relative to its group's max, averaged over
  every consumer's output columns); the chosen s reproduces the reported loss; RTN is a
  candidate, so the loss never exceeds RTN's."""
  x, ws = _layer(3)
  s, info = awq_search_scale(x, ws, W4A16_G32, duo=True)
  a = float(info.alpha)
  wt = np.abs(np.concatenate([w.T for w in ws]))                     # (2N, K)
  g = wt.reshape(-1, 32)
  w_mean = (g / (g.max(1, keepdims=True) + 1e-6)).reshape(wt.shape).mean(0)
  want = np.maximum(np.mean(np.abs(x), 0) ** a / (w_mean ** (1 - a) + 1e-4), 1e-4)
  want = want / np.sqrt(want.max() * want.min())
  np.testing.assert_allclose(np.asarray(s), want, rtol=1e-4)
  assert float(info.loss) < float(info.rtn_loss)
  loss = np.mean(np.concatenate([x @ w - x @ _awq_weights(s, w) for w in ws], 1) ** 2)
  np.testing.assert_allclose(loss, float(info.loss), rtol=1e-3)


def _gated_mlp(x, ws):
  gate, up = ws
  return jax.nn.silu(x @ gate) * (x @ up)


def test_block_fn_measures_the_block_output():
  x, ws = _layer(2)
  s, info = awq_search_scale(x, ws, W4A16_G32, block_fn=_gated_mlp)
  ref = _gated_mlp(x, ws)
  rtn = _gated_mlp(x, [quantize(jnp.asarray(w), W4A16_G32).dequantize() for w in ws])
  awq = _gated_mlp(x, [_awq_weights(s, w) for w in ws])
  assert float(jnp.mean((awq - ref) ** 2)) < float(jnp.mean((rtn - ref) ** 2))


def _rmsnorm(x, g):
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * g


def test_folding_keeps_the_float_model():
  x, ws = _layer(3)
  rng = np.random.default_rng(3)
  s, _ = awq_search_scale(x, ws, W4A16_G32)
  # norm -> linear
  g = jnp.asarray(rng.uniform(0.5, 1.5, K), jnp.float32)
  y = _rmsnorm(x, g) @ ws[0]
  y2 = _rmsnorm(x, fold_scale_into_norm(g, s)) @ scale_consumer(jnp.asarray(ws[0]), s)
  np.testing.assert_allclose(y2, y, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(y))))
  # linear (kernel + bias) -> linear
  wp = jnp.asarray(rng.standard_normal((16, K)), jnp.float32)
  bp = jnp.asarray(rng.standard_normal(K), jnp.float32)
  h = x[:, :16]
  y = (h @ wp + bp) @ ws[1]
  y2 = ((h @ fold_scale_into_linear(wp, s) + fold_scale_into_linear(bp, s))
        @ scale_consumer(jnp.asarray(ws[1]), s))
  np.testing.assert_allclose(y2, y, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(y))))
  # dtypes are kept
  assert fold_scale_into_norm(g.astype(jnp.bfloat16), s).dtype == jnp.bfloat16


def test_sample_is_bounded_and_adversarial_inputs_stay_finite():
  assert subsample_tokens(jnp.ones((3, 1000, K)), 512).shape == (512, K)
  x, ws = _layer(4)
  x[:, :8] = 0.0                                           # dead channels: mean|x| = 0
  zero_w = np.zeros((K, N), np.float32)
  s, info = awq_search_scale(x, [ws[0], zero_w], W4A16_G32)
  assert np.all(np.isfinite(s)) and np.all(np.asarray(s) > 0)
  clipped, ratio = awq_search_clip(x, zero_w, W4A16_G32)
  assert np.all(np.asarray(clipped) == 0) and np.all(np.isfinite(ratio))
  s, info = awq_search_scale(np.zeros((T, K), np.float32), ws[0], W4A16_G32)
  assert np.all(np.asarray(s) == 1.0) and float(info.loss) == 0.0


def test_errors_are_clear():
  x, ws = _layer(5)
  with pytest.raises(ValueError, match="attn: activations of shape"):
    awq_search_scale(x[:, :10], ws, W4A16_G32, name="attn")
  with pytest.raises(ValueError, match="sharing K"):
    awq_search_scale(x, [ws[0], ws[1][:10]], W4A16_G32)
  with pytest.raises(ValueError, match="NaN"):
    awq_search_scale(np.full((T, K), np.nan, np.float32), ws, W4A16_G32)
  with pytest.raises(ValueError, match="expected \\(64,\\)"):
    scale_consumer(jnp.asarray(ws[0]), jnp.ones((3,)))
  with pytest.raises(ValueError, match="finite and positive"):
    fold_scale_into_norm(jnp.ones((K,)), jnp.zeros((K,)))
