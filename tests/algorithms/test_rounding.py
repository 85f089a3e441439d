"""Learned rounding (``jq.algorithms.rounding``): the learned grid's algebra, its gradients, and
``tune`` on a least-squares problem where the answer is known to beat round-to-nearest."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jq
from jq import W2A16_G32, W4A16_G32, W8A16, QType, QuantSpec
from jq.algorithms import rounding
from jq.spec import AutoRoundOptions, Granularity

SPECS = [W4A16_G32, W2A16_G32, W8A16,
         QuantSpec(qtype=QType.INT4, symmetric=True, granularity=Granularity.GROUP, group_size=32),
         QuantSpec(qtype=QType.UINT3, symmetric=False, granularity=Granularity.GROUP,
                   group_size=16, scale_dtype="bfloat16")]


def _w(shape=(64, 24), seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_the_identity_reproduces_the_start_exactly(spec):
  w = _w()
  q0 = jq.quantize(w, spec)
  start = rounding.Start.from_qarray(q0, w)
  r = start.identity()
  np.testing.assert_array_equal(rounding.dequantized(start, r), q0.dequantize())
  q = rounding.to_qarray(start, r, spec)
  np.testing.assert_array_equal(q.unpacked(), q0.unpacked())
  np.testing.assert_array_equal(q.scale, q0.scale)
  if q0.zero_point is not None:
    np.testing.assert_array_equal(q.zero_point, q0.zero_point)
  # GPTQ's start: its own values (on the grid) are rounded; the identity keeps them
  g = rounding.Start.from_qarray(q0, q0.dequantize())
  np.testing.assert_array_equal(rounding.to_qarray(g, g.identity(), spec).unpacked(),
                                q0.unpacked())


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_any_learned_point_is_an_ordinary_qarray_that_dequantizes_to_the_trained_weights(spec):
  w = _w(seed=1)
  q0 = jq.quantize(w, spec)
  start = rounding.Start.from_qarray(q0, w)
  rng = np.random.default_rng(2)
  r = rounding.project(rounding.Rounding(
      jnp.asarray(rng.uniform(-0.6, 0.6, w.shape), jnp.float32),
      jnp.asarray(rng.uniform(0.4, 1.1, q0.scale.shape), jnp.float32),
      jnp.asarray(rng.uniform(0.4, 1.1, q0.scale.shape), jnp.float32)), 0.5)
  q = rounding.to_qarray(start, r, spec).validate("learned")
  assert q.qtype is q0.qtype and q.tile == q0.tile and q.scale.dtype == q0.scale.dtype
  # the same values, up to XLA contracting a multiply and an add of the grid's arithmetic into
  # one rounding in one program and not in the other (a code one step off would be ~1e-2 off)
  np.testing.assert_allclose(q.dequantize(), rounding.dequantized(start, r), rtol=2.5e-7, atol=0)
  # offsets move each code by at most one step from round-to-nearest on the same grid
  scale, zp = rounding.grid(start, r)
  same = jq.quantize_with_params(w, scale, zp, spec)
  assert int(jnp.max(jnp.abs(q.unpacked().astype(jnp.int32) - same.unpacked().astype(jnp.int32)))) <= 1


def test_gradients_are_straight_through_inside_the_range_and_zero_outside():
  spec = W4A16_G32
  w = _w((32, 4), seed=3)
  q0 = jq.quantize(w, spec)
  start = rounding.Start.from_qarray(q0, w)
  r = start.identity()
  s = jnp.broadcast_to(jq.numerics.expand(q0.scale, q0.tile, w.shape), w.shape)
  g = jax.grad(lambda v: jnp.sum(rounding.dequantized(start, r._replace(v=v))))(r.v)
  # d ŵ / d v = scale where the rounded code lies inside [qmin, qmax] (STE), else 0.  The range
  # ends are on the grid, so push one weight far outside with a large offset instead:
  np.testing.assert_allclose(g, s, rtol=1e-6)
  big = r.v.at[0, 0].set(40.0)
  g2 = jax.grad(lambda v: jnp.sum(rounding.dequantized(start, r._replace(v=v))))(big)
  assert float(g2[0, 0]) == 0.0 and float(g2[1, 0]) == float(s[1, 0])
  # the range factors get gradients (they move the scale), offsets do not need a finite step
  ga = jax.grad(lambda a: jnp.sum(rounding.dequantized(start, r._replace(a=a)) ** 2))(r.a)
  assert np.all(np.isfinite(ga)) and float(jnp.max(jnp.abs(ga))) > 0


def _least_squares(seed=0, k=64, n=16, t=500):
  """``min ||X ŵ − X w||²`` with correlated inputs: the rounding that minimises it is not the
  nearest one (what GPTQ exploits in closed form)."""
  rng = np.random.default_rng(seed)
  mix = rng.standard_normal((k, k)) * 0.3 + np.eye(k)
  x = jnp.asarray(rng.standard_normal((t, k)) @ mix, jnp.float32)
  w = _w((k, n), seed + 1)
  return x, w, x @ w


def _loss(ws, operands, d, idx):
  x, y = d
  return jnp.mean(jnp.square(x[idx] @ ws["w"] - y[idx]), axis=1)


@pytest.mark.parametrize("optimizer", ["signsgd", "adam"])
def test_tune_lowers_the_output_error_below_round_to_nearest(optimizer):
  x, w, y = _least_squares()
  spec = W2A16_G32
  q0 = jq.quantize(w, spec)
  opts = AutoRoundOptions(steps=150, optimizer=optimizer, batch_tokens=128,
                          lr=None if optimizer == "signsgd" else 5e-3)
  got, info = rounding.tune(_loss, {"w": rounding.Start.from_qarray(q0, w)}, None, (x, y), opts,
                            rows_per_step=128)
  assert not info.fell_back and len(info.losses) == 150
  rtn = float(jnp.mean(_loss({"w": q0.dequantize()}, None, (x, y), jnp.arange(len(x)))))
  assert info.start_loss == pytest.approx(rtn, rel=1e-5)
  q = rounding.to_qarray(rounding.Start.from_qarray(q0, w), got["w"], spec)
  learned = float(jnp.mean(_loss({"w": q.dequantize()}, None, (x, y), jnp.arange(len(x)))))
  assert learned == pytest.approx(info.end_loss, rel=1e-4)
  assert learned < 0.7 * rtn, (learned, rtn)


def test_a_diverging_optimizer_falls_back_to_the_start_and_says_so():
  x, w, y = _least_squares(seed=4)
  q0 = jq.quantize(w, W4A16_G32)
  start = rounding.Start.from_qarray(q0, w)
  opts = AutoRoundOptions(steps=5)
  got, info = rounding.tune(_loss, {"w": start}, None, (x, y), opts, rows_per_step=64,
                            opt=optax.scale(float("nan")))
  assert "loss became nan" in info.fell_back and "fell back" in info.describe()
  np.testing.assert_array_equal(got["w"].v, 0.0)
  # a rate so large every offset jumps to its bound: the loss rises, the start is kept
  got, info = rounding.tune(_loss, {"w": start}, None, (x, y),
                            AutoRoundOptions(steps=3, optimizer="adam", lr=1e6),
                            rows_per_step=64)
  assert "did not go down" in info.fell_back, info
  np.testing.assert_array_equal(got["w"].a, 1.0)


def test_minibatches_cover_every_row_each_epoch():
  groups = rounding.minibatches(10, 3, 7, seed=0)
  assert len(groups) == 7 and all(len(g) == 3 for g in groups)
  assert len(set(np.concatenate(groups[:3]))) == 9    # one epoch: 3 whole minibatches
  assert [len(g) for g in rounding.minibatches(2, 8, 3, seed=0)] == [2, 2, 2]


def test_options_are_checked_and_serialised():
  from jq import spec_json
  with pytest.raises(ValueError, match="init"):
    AutoRoundOptions(init="smoothquant")
  with pytest.raises(ValueError, match="optimizer"):
    AutoRoundOptions(optimizer="sgd")
  with pytest.raises(ValueError, match="steps"):
    AutoRoundOptions(steps=0)
  with pytest.raises(ValueError, match="lookup table"):
    jq.Rule(pattern="kernel", weight=jq.NF4_G64, algorithm=jq.Algorithm.AUTOROUND)
  rules = jq.recipe_rules("autoround-w4a16-g128")
  assert rules[-1].algorithm is jq.Algorithm.AUTOROUND
  assert spec_json.rules_from_json(spec_json.rules_to_json(rules)) == rules
  with pytest.raises(ValueError, match=r"rules\[0\].options.steps"):
    spec_json.rules_from_json('[{"pattern": "kernel", "weight": {"qtype": "uint4", '
                              '"symmetric": false}, "algorithm": "autoround", '
                              '"options": {"steps": -1}}]')
  assert rules[-1].initial.algorithm is jq.Algorithm(rules[-1].options.init)
