"""jq.nn.quantized_apply: an unchanged linen transformer runs on QArray params in every mode."""
from __future__ import annotations

import dataclasses
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jq
import jq.nn as jqnn
import tiny_models as tm
from jq.qarray import ActivationQuant
from jq.qtypes import QType
from jq.spec import ActivationSpec, ActMode, Granularity, QuantSpec, Rule


def _g(qtype, size, symmetric=True):
  return QuantSpec(qtype=qtype, symmetric=symmetric, granularity=Granularity.GROUP,
                   group_size=size)


A_ASYM_DYN = ActivationSpec(qtype=QType.UINT8, symmetric=False)
A_ASYM_STATIC = dataclasses.replace(A_ASYM_DYN, mode=ActMode.STATIC)
UINT8_ASYM = QuantSpec(qtype=QType.UINT8, symmetric=False)

# mode x bits (8, 4, 2, NF4) x granularity (channel; group 32 does not divide 48 and 80, 16 does)
CASES = [
    (QuantSpec(qtype=QType.INT8), None),
    (_g(QType.UINT8, 32, symmetric=False), None),
    (QuantSpec(qtype=QType.INT4), None),
    (_g(QType.INT4, 16), None),
    (_g(QType.UINT4, 32, symmetric=False), None),
    (QuantSpec(qtype=QType.UINT2, symmetric=False), None),
    (_g(QType.INT2, 32), None),
    (QuantSpec(qtype=QType.NF4), None),
    (_g(QType.NF4, 16), None),
    (_g(QType.NF4, 32), None),
    (QuantSpec(qtype=QType.INT8), jq.A8_DYNAMIC),
    (UINT8_ASYM, A_ASYM_DYN),
    (QuantSpec(qtype=QType.INT8), jq.A8_STATIC),
    (UINT8_ASYM, A_ASYM_STATIC),
]
IDS = [f"{w.describe()}-{a.describe() if a else 'weight_only'}" for w, a in CASES]


def rms(a) -> float:
  return float(jnp.sqrt(jnp.mean(jnp.square(jnp.asarray(a, jnp.float32)))))


def output_tolerance(eps_w: float, act) -> float:
  """Relative output error allowed: a chain factor times the half-step relative errors of the
  weights (``tm.relative_weight_error``, from their scales) and of int8 activations (half a step
  of 1/127 of the range, times a crest factor of 4)."""
  eps_a = 0.0 if act is None else 4 / 254
  return 4 * (eps_w + eps_a)


@pytest.fixture(scope="module")
def linen():
  return tm.linen_case()


def _layouts(variables):
  model, _, tokens = tm.linen_model()
  return jqnn.layouts(model, variables, tokens)


def _jit_quantize(variables, rules):
  """``quantize_tree`` as one compiled computation (much cheaper than op-by-op on CPU)."""
  lays = _layouts(variables)
  return jax.jit(lambda v: jq.quantize_tree(v, rules, layouts=lays))(variables)


def _quantize(variables, ranges, wspec, act):
  scales = None
  if act is not None and act.mode is ActMode.STATIC:
    scales = tm.scales_from_ranges(ranges, act)
  return jq.quantize_tree(variables, jq.default_rules(wspec, act), act_scales=scales,
                          layouts=_layouts(variables))


@pytest.mark.parametrize("wspec,act", CASES, ids=IDS)
def test_quantized_model_matches_float_and_dequantized_reference(linen, wspec, act):
  model, variables, tokens, y_float, ranges = linen
  qapply = jqnn.quantized_apply(model)

  @tm.fast_jit
  def run(v, t):  # one compile: quantize, quantized model, reference
    qv = _quantize(v, ranges, wspec, act)
    return qapply(qv, t), tm.linen_reference(model, qv, t), tm.relative_weight_error(qv)

  y, ref, eps_w = run(variables, tokens)
  # same function as the float model on dequantized weights (and fake-quantized int8 inputs)
  scale = float(jnp.max(jnp.abs(ref)))
  np.testing.assert_allclose(y, ref, rtol=0, atol=(1e-5 if act is None else 1e-4) * scale)
  # close to the float model, within a tolerance set by the quantization step
  assert rms(y - y_float) / rms(y_float) <= output_tolerance(float(eps_w), act)


def test_jit_once_with_kv_cache_collection(linen, compiles):
  """Prefill + decode with mutable=["cache"]: one trace per shape; decode equals full forward."""
  model, variables, _, _, _ = linen
  qvars = _jit_quantize(variables, jq.default_rules(jq.W8A16, jq.A8_DYNAMIC))
  traces = []

  def counted(v, t):
    traces.append(t.shape)
    return jqnn.quantized_apply(model.apply)(v, t, mutable=["cache"])

  step = jax.jit(counted)
  tokens = tm.tokens(5, (2, 9))
  full = jax.jit(jqnn.quantized_apply(model))(qvars, tokens)
  logits, state = step(qvars, tokens[:, :6])
  decoded = [logits]
  for i in range(6, 9):
    logits, state = step({"params": qvars["params"], "cache": state["cache"]}, tokens[:, i:i + 1])
    decoded.append(logits)
  assert traces == [(2, 6), (2, 1)], "the decode step traced once for three calls"
  assert compiles["jit(counted)"] == 2
  assert set(state) == {"cache"} and int(state["cache"]["block_0"]["attn"]["index"]) == 9
  np.testing.assert_allclose(jnp.concatenate(decoded, axis=1), full, rtol=0,
                             atol=1e-4 * float(jnp.max(jnp.abs(full))))


def test_module_and_apply_fn_give_the_same_function(linen):
  model, variables, tokens, _, _ = linen
  qvars = _jit_quantize(variables, jq.default_rules(jq.W4A16_G32))
  from_module, from_apply = jqnn.quantized_apply(model), jqnn.quantized_apply(model.apply)
  a, b = jax.jit(lambda v, t: (from_module(v, t), from_apply(v, t)))(qvars, tokens)
  np.testing.assert_array_equal(a, b)


def test_skipped_layers_run_in_float_and_explain_says_so(linen):
  model, variables, tokens, _, _ = linen
  rules = (Rule(pattern=r"mlp/down_proj", weight=None),) + jq.default_rules(jq.W4A16_G32)
  lays = _layouts(variables)
  qvars = jax.eval_shape(lambda v: jq.quantize_tree(v, rules, layouts=lays), variables)
  out = io.StringIO()
  routes = jqnn.explain(model, qvars, tokens, file=out)
  by_path = {r.path: r for r in routes}
  assert len(routes) == 2 * 7 + 2     # (+ the embedding's lookup, float)
  assert by_path["params/lm_head/kernel"].mode == "float"
  assert by_path["params/block_1/mlp/down_proj/kernel"].impl == "float"
  q = by_path["params/block_0/attn/q_proj/kernel"]
  assert (q.mode, q.impl, q.m) == ("weight-only", "xla_reference_weight_only", 16)
  assert q.layer.startswith("nn.DenseGeneral")
  assert by_path["params/block_0/mlp/gate_proj/kernel"].layer.startswith("nn.Einsum")
  text = out.getvalue()
  assert "params/block_0/attn/o_proj/kernel" in text and "WARNING slower than float" in text
  assert "12 quantized / 4 float layers" in text


def test_explain_int8_modes_and_gpu_warnings(linen):
  model, variables, tokens, _, ranges = linen
  lays = _layouts(variables)
  quantize = lambda v, rules, scales=None: jax.eval_shape(
      lambda v: jq.quantize_tree(v, rules, act_scales=scales, layouts=lays), v)
  dyn = quantize(variables, jq.default_rules(jq.W8A16, jq.A8_DYNAMIC))
  modes = {r.mode for r in jqnn.explain(model, dyn, tokens, file=None)}
  assert modes == {"int8 dynamic", "float"}
  static = quantize(variables, jq.default_rules(jq.W8A16, jq.A8_STATIC),
                    tm.scales_from_ranges(ranges, jq.A8_STATIC))
  routes = jqnn.explain(model, static, tokens, file=None)
  assert {r.impl for r in routes if r.mode == "int8 static"} == {"xla_reference_int8"}
  g4 = quantize(variables, jq.default_rules(jq.W4A16_G32))
  big = tm.tokens(3, (8, 16))  # M = 128 rows
  gpu = jqnn.explain(model, g4, big, backend="gpu", file=None)
  assert all(r.slower_than_float for r in gpu if r.mode != "float")


def _replace(tree, path, value):
  keys = path.split("/")
  out = jax.tree_util.tree_map(lambda x: x, tree, is_leaf=jq.tree.is_qarray)
  node = out
  for k in keys[:-1]:
    node = node[k]
  node[keys[-1]] = value
  return out


@pytest.mark.parametrize("path,make,match", [
    ("params/block_0/attn/q_proj/kernel",
     lambda w: jq.quantize(w[:40], jq.W8A16, layout=jq.Layout(contracting=(0,), channels=(1, 2))),
     r"shape \(40, 4, 12\).*\(48, 4, 12\)"),
    ("params/block_0/mlp/gate_proj/kernel",
     lambda w: dataclasses.replace(jq.quantize(w, _g(QType.INT8, 16)),
                                   activation=ActivationQuant(None, None, jq.A8_DYNAMIC)),
     "group scales"),
    ("params/block_1/mlp/up_proj/kernel",
     lambda w: dataclasses.replace(jq.quantize(w, jq.W8A16),
                                   activation=ActivationQuant(None, None, jq.A8_STATIC)),
     "needs a calibrated scale"),
    ("params/block_0/ln_2/scale",
     lambda w: jq.quantize(w, QuantSpec(granularity=Granularity.TENSOR)),
     "LayerNorm has a quantized parameter"),
])
def test_bad_input_errors_name_the_layer(linen, path, make, match):
  model, variables, tokens, _, _ = linen
  leaf = dict(jq.leaves_with_paths(variables))[path]
  qvars = _replace(variables, path, jax.jit(make)(leaf))
  with pytest.raises(ValueError, match=match) as e:
    jax.eval_shape(jqnn.quantized_apply(model), qvars, tokens)
  assert path in str(e.value)


def test_static_rules_without_calibration_are_refused(linen):
  _, variables, _, _, _ = linen
  with pytest.raises(ValueError, match="calibrated input scale"):
    jq.quantize_tree(variables, jq.default_rules(jq.W8A16, jq.A8_STATIC),
                     layouts=_layouts(variables))


def test_a_kernel_the_model_reads_directly_is_named():
  """A tied autoencoder reads its encoder's kernel beside the layer (``h @ w.T``): quantized, the
  model's own code met a QArray (a bare AttributeError); the error names the parameter and the
  rule that keeps it float, with which the model runs."""
  import flax.linen as nn

  class AE(nn.Module):
    @nn.compact
    def __call__(self, x):
      enc = nn.Dense(32, name="enc")
      h = nn.relu(enc(x))
      return nn.Dense(16, name="out")(h @ enc.variables["params"]["kernel"].T)

  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 64)), jnp.float32)
  model = AE()
  variables = model.init(jax.random.key(0), x)
  q = jqnn.quantize_variables(model, variables, jq.recipe_rules("w8a16"), x)
  with pytest.raises(ValueError, match=r"uses a quantized parameter as an array.*it is "
                                       r"params/enc/kernel \(64, 32\) int8.*weight=None"):
    jqnn.quantized_apply(model)(q, x)
  rules = (Rule(pattern="enc/kernel$", weight=None), *jq.recipe_rules("w8a16"))
  q = jqnn.quantize_variables(model, variables, rules, x)
  assert isinstance(q["params"]["out"]["kernel"], jq.QArray)
  y, ref = jqnn.quantized_apply(model)(q, x), model.apply(variables, x)
  assert float(jq.metrics.sqnr(ref, y)) > 30
