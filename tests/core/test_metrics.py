"""jq.metrics: invariants of the error metrics."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jq import metrics


def _x(seed=0, shape=(32, 16)):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_exact_approximation():
  x = _x()
  assert float(metrics.mse(x, x)) == 0.0
  assert float(metrics.sqnr(x, x)) == np.inf
  assert float(metrics.cosine(x, x)) == pytest.approx(1.0, abs=1e-6)
  assert float(metrics.max_abs_error(x, x)) == 0.0
  z = jnp.zeros((4, 4))
  assert float(metrics.sqnr(z, z)) == np.inf  # not NaN
  assert float(metrics.cosine(z, z)) == 1.0


def test_values_against_numpy():
  a, b = _x(0), _x(1)
  an, bn = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert float(metrics.mse(a, b)) == pytest.approx(np.mean((an - bn) ** 2), rel=1e-5)
  assert float(metrics.sqnr(a, b)) == pytest.approx(
      10 * np.log10(np.sum(an**2) / np.sum((an - bn) ** 2)), rel=1e-5)
  assert float(metrics.cosine(a, b)) == pytest.approx(
      an.ravel() @ bn.ravel() / np.linalg.norm(an) / np.linalg.norm(bn), abs=1e-6)
  assert float(metrics.max_abs_error(a, b)) == pytest.approx(np.max(np.abs(an - bn)))
  assert float(metrics.cosine(a, -a)) == pytest.approx(-1.0, abs=1e-6)


def test_sqnr_grows_with_smaller_noise():
  x = _x()
  noise = _x(5)
  s = [float(metrics.sqnr(x, x + e * noise)) for e in (1e-1, 1e-2, 1e-3)]
  assert s[0] < s[1] < s[2]
  assert s[1] - s[0] == pytest.approx(20.0, abs=0.01)


def test_cosine_no_overflow_for_large_tensors():
  x = jnp.full((1000,), 1e20, jnp.float32)
  assert float(metrics.cosine(x, x)) == pytest.approx(1.0, abs=1e-6)


def test_kl_divergence():
  p = _x(0, (4, 10))
  q = _x(1, (4, 10))
  kl = metrics.kl_divergence(p, q)
  assert kl.shape == (4,) and np.all(np.asarray(kl) >= -1e-6)
  np.testing.assert_allclose(np.asarray(metrics.kl_divergence(p, p)), 0.0, atol=1e-6)
  # masked (-inf) logits contribute nothing instead of NaN
  pm = p.at[:, 0].set(-jnp.inf)
  assert np.all(np.isfinite(np.asarray(metrics.kl_divergence(pm, q))))
  np.testing.assert_allclose(np.asarray(metrics.kl_divergence(pm, pm)), 0.0, atol=1e-6)
  # axis argument
  np.testing.assert_allclose(np.asarray(metrics.kl_divergence(p.T, q.T, axis=0)),
                             np.asarray(kl), rtol=1e-5)


def test_mixed_dtypes_and_shape_mismatch():
  x = _x()
  assert float(metrics.mse(x, x.astype(jnp.bfloat16))) < 1e-4
  with pytest.raises(ValueError, match="shapes differ"):
    metrics.mse(x, x[:3])


def test_error_stats_and_jit():
  a, b = _x(0), _x(1)
  st = metrics.error_stats(a, b)
  assert set(st) == {"mse", "sqnr_db", "cosine", "max_abs"}
  assert all(isinstance(v, float) for v in st.values())
  assert float(jax.jit(metrics.sqnr)(a, b)) == pytest.approx(st["sqnr_db"], rel=1e-5)
