"""The fp8 recipes on an unchanged Flax model (linen and nnx): calibration of the static scales,
the quantized model equals the dequantized reference, and stays close to the float model."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jq
import jq.nn as jqnn
import tiny_models as tm
from jq.qtypes import QType

FP8_RECIPES = ["fp8-dynamic", "fp8-static", "fp8-weight-only"]


def rms(a) -> float:
  return float(jnp.sqrt(jnp.mean(jnp.square(jnp.asarray(a, jnp.float32)))))


@pytest.fixture(scope="module")
def linen():
  return tm.linen_case()


@pytest.mark.parametrize("recipe", FP8_RECIPES)
def test_linen_recipe(linen, recipe):
  model, variables, tokens, y_float, ranges = linen
  rules = jq.recipe_rules(recipe)
  if recipe == "fp8-static":   # calibrates its per-tensor input scales, as w8a8-static does
    qvars = jqnn.quantize_variables(model, variables, rules, tokens, calibration_batches=[tokens])
  else:                        # one compiled computation (op-by-op dispatch is slow on CPU)
    lays = jqnn.layouts(model, variables, tokens)
    qvars = jax.jit(lambda v: jq.quantize_tree(v, rules, layouts=lays))(variables)
  kernels = {p: q for p, q in jq.leaves_with_paths(qvars) if isinstance(q, jq.QArray)}
  assert kernels and set(kernels) == {p for p in ranges if "lm_head" not in p}   # head: float
  for p, q in kernels.items():
    assert q.qtype is QType.FP8_E4M3 and q.zero_point is None, p
    assert q.activation is None if recipe == "fp8-weight-only" else (
        q.activation.spec == rules[-1].activation), p
    if recipe == "fp8-static":           # scale = the input range's absmax / 448
      lo, hi = ranges[p]
      want = max(-float(lo), float(hi)) / 448
      assert float(q.activation.scale) == pytest.approx(want, rel=2.0 ** -18), p

  @tm.fast_jit
  def run(v, t):
    return jqnn.quantized_apply(model)(v, t), tm.linen_reference(model, v, t)

  y, ref = run(qvars, tokens)
  scale = float(jnp.max(jnp.abs(ref)))
  np.testing.assert_allclose(y, ref, rtol=0, atol=1e-4 * scale)
  # e4m3 keeps each weight (and input) within 2^-4 of itself: the output stays close to float
  eps = 2.0 ** -4 * (1 if recipe == "fp8-weight-only" else 2)
  err = rms(y - y_float) / rms(y_float)
  assert 0 < err <= 2 * eps, err
  want = {"fp8-dynamic": "fp8_e4m3 dynamic", "fp8-static": "fp8_e4m3 static",
          "fp8-weight-only": "weight-only"}[recipe]
  routes = jq.explain(model, qvars, tokens, file=None)
  assert {r.mode for r in routes if r.path in kernels} == {want}, routes


def test_nnx_fp8_dynamic():
  model, tokens = tm.nnx_model()
  graphdef, state = nnx.split(model)
  y_float = jax.jit(lambda st, t: nnx.merge(graphdef, st)(t))(state, tokens)
  qmodel = jqnn.quantize_module(model, jq.recipe_rules("fp8-dynamic"))
  qstate = nnx.state(qmodel, nnx.Param)
  kinds = {(q.qtype, q.activation.spec) for _, q in jq.leaves_with_paths(qstate)
           if isinstance(q, jq.QArray)}
  assert kinds == {(QType.FP8_E4M3, jq.A_FP8_DYNAMIC)}
  qg, qs = nnx.split(qmodel)
  y = jax.jit(lambda st, t: nnx.merge(qg, st)(t))(qs, tokens)
  ref = tm.nnx_reference(model, qstate, tokens)
  np.testing.assert_allclose(y, ref, rtol=0, atol=1e-4 * float(jnp.max(jnp.abs(ref))))
  assert 0 < rms(y - y_float) / rms(y_float) <= 2 * 2 * 2.0 ** -4


@pytest.mark.parametrize("recipe", ["fp8-dynamic", "fp8-static"])
def test_fp8_activations_on_a_convolution_are_refused_when_quantizing(recipe):
  """Convolutions quantize inputs to int8 only: an fp8-activation rule matching a conv kernel is
  refused when quantizing (naming the kernel and the rule that would quantize it weight-only),
  not when the checkpoint first runs; with that rule in front, the kernel is fp8 weight-only."""
  import flax.linen as nn

  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(10, name="fc")(nn.Conv(8, (3, 3), name="conv")(x).mean((1, 2)))

  m, x = M(), jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  v = m.init(jax.random.key(1), x)
  calib = [x] if recipe.endswith("static") else None
  rules = jq.recipe_rules(recipe)
  with pytest.raises(ValueError, match=r"params/conv/kernel: shape \(3, 3, 4, 8\).*nn.Conv.*"
                     r"fp8_e4m3 activations are not supported for convolutions.*"
                     r"activation=None\) before it"):
    jqnn.quantize_variables(m, v, rules, x, calibration_batches=calib)
  wo = jq.Rule(pattern="^params/conv/kernel$", weight=rules[-1].weight, activation=None)
  qv = jqnn.quantize_variables(m, v, (wo, *rules), x, calibration_batches=calib)
  conv = qv["params"]["conv"]["kernel"]
  assert conv.qtype is QType.FP8_E4M3 and conv.activation is None
  assert qv["params"]["fc"]["kernel"].activation is not None
  y = jqnn.quantized_apply(m)(qv, x)
  ref = m.apply(v, x)
  assert float(jnp.abs(y - ref).max() / jnp.abs(ref).max()) < 0.1
