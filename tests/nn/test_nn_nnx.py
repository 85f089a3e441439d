"""jq.nn.quantize_module: a new nnx module with quantized twins; the input model is untouched."""
from __future__ import annotations

import dataclasses
import io
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jq
import jq.nn as jqnn
import tiny_models as tm
from jq.qarray import ActivationQuant
from jq.qtypes import QType
from jq.spec import ActivationSpec, ActMode, Granularity, QuantSpec, Rule

A_ASYM_STATIC = ActivationSpec(mode=ActMode.STATIC, qtype=QType.UINT8, symmetric=False)

# One case per bit width, both granularities (incl. a group that does not divide 48/80), both
# activation modes; the linen suite runs the full matrix through the same layer math.
CASES = [
    (QuantSpec(qtype=QType.INT8), None),
    (QuantSpec(qtype=QType.UINT4, symmetric=False, granularity=Granularity.GROUP,
               group_size=32), None),
    (QuantSpec(qtype=QType.INT2, granularity=Granularity.GROUP, group_size=16), None),
    (QuantSpec(qtype=QType.NF4), None),
    (QuantSpec(qtype=QType.UINT8, symmetric=False), ActivationSpec(qtype=QType.UINT8,
                                                                   symmetric=False)),
    (QuantSpec(qtype=QType.INT8), jq.A8_STATIC),
    (QuantSpec(qtype=QType.INT8), A_ASYM_STATIC),
]
IDS = [f"{w.describe()}-{a.describe() if a else 'weight_only'}" for w, a in CASES]


def rms(a) -> float:
  return float(jnp.sqrt(jnp.mean(jnp.square(jnp.asarray(a, jnp.float32)))))


@pytest.fixture(scope="module")
def nnx_setup():
  model, tokens = tm.nnx_model()
  graphdef, state = nnx.split(model)
  y_float = jax.jit(lambda st, t: nnx.merge(graphdef, st)(t))(state, tokens)
  ranges = tm.nnx_ranges(model, tokens)
  return model, tokens, y_float, ranges


def _rules(ranges, wspec, act):
  scales = None
  if act is not None and act.mode is ActMode.STATIC:
    scales = tm.scales_from_ranges(ranges, act)
  return jq.default_rules(wspec, act), scales


@pytest.mark.parametrize("wspec,act", CASES, ids=IDS)
def test_quantized_module_matches_float_and_dequantized_reference(nnx_setup, wspec, act):
  model, tokens, y_float, ranges = nnx_setup
  rules, scales = _rules(ranges, wspec, act)

  @tm.fast_jit
  def run(t):  # one compile: quantize, swap layers, run, reference
    qstate = jq.quantize_tree(nnx.state(model, nnx.Param), rules, act_scales=scales,
                              layouts=jqnn.layouts(model))
    qmodel = jqnn.quantize_module(model, qstate)
    return qmodel(t), tm.nnx_reference(model, qstate, t), tm.relative_weight_error(qstate)

  y, ref, eps_w = run(tokens)
  scale = float(jnp.max(jnp.abs(ref)))
  np.testing.assert_allclose(y, ref, rtol=0, atol=(1e-5 if act is None else 1e-4) * scale)
  eps_a = 0.0 if act is None else 4 / 254
  assert rms(y - y_float) / rms(y_float) <= 4 * (float(eps_w) + eps_a)


@pytest.fixture(scope="module")
def quantized(nnx_setup):
  model, tokens, _, _ = nnx_setup
  rules = (Rule(pattern=r"mlp/down_proj", weight=None),) + jq.default_rules(jq.W4A16_G32)
  lays = jqnn.layouts(model)
  qstate = jax.jit(lambda st: jq.quantize_tree(st, rules, layouts=lays))(nnx.state(model, nnx.Param))
  return model, tokens, qstate, jqnn.quantize_module(model, qstate)


def test_returns_new_module_and_leaves_input_unchanged(quantized):
  model, _, qstate, qmodel = quantized
  before = nnx.state(model, nnx.Param)
  assert qmodel is not model
  blk, qblk = model.blocks[0], qmodel.blocks[0]
  assert type(blk.attn.q_proj) is nnx.LinearGeneral and type(blk.mlp.up_proj) is nnx.Linear
  assert type(qblk.attn.q_proj) is jqnn.QLinearGeneral
  assert type(qblk.mlp.up_proj) is jqnn.QLinear and type(qblk.mlp.gate_proj) is jqnn.QEinsum
  assert type(qblk.mlp.down_proj) is nnx.Linear  # skipped by a rule: stays float
  assert type(qmodel.lm_head) is nnx.Linear and type(qmodel.ln_f) is nnx.LayerNorm
  for _, leaf in jq.leaves_with_paths(nnx.state(model, nnx.Param)):
    assert not isinstance(leaf, jq.QArray)
  jax.tree_util.tree_map(np.testing.assert_array_equal, before, nnx.state(model, nnx.Param))


def test_state_paths_match_the_quantized_state(quantized):
  _, _, qstate, qmodel = quantized
  want = {p: type(v) for p, v in jq.leaves_with_paths(qstate)}
  got = {p: type(v) for p, v in jq.leaves_with_paths(nnx.state(qmodel, nnx.Param))}
  assert got == want
  assert want["blocks/0/attn/q_proj/kernel"] is jq.QArray
  assert "blocks/1/mlp/gate_proj/kernel" in want


def test_rules_and_quantized_state_give_the_same_module(quantized):
  model, tokens, qstate, qmodel = quantized
  rules = (Rule(pattern=r"mlp/down_proj", weight=None),) + jq.default_rules(jq.W4A16_G32)

  @jax.jit
  def both(t):
    return qmodel(t), jqnn.quantize_module(model, rules)(t)

  a, b = both(tokens)
  np.testing.assert_array_equal(a, b)


def test_nnx_jit_traces_once(quantized):
  _, tokens, _, qmodel = quantized
  traces = []

  @nnx.jit
  def forward(m, t):
    traces.append(t.shape)
    return m(t)

  y1 = forward(qmodel, tokens)
  y2 = forward(qmodel, tokens + 1)
  assert traces == [tokens.shape] and y1.shape == y2.shape


def test_explain_nnx(quantized):
  _, tokens, _, qmodel = quantized
  out = io.StringIO()
  routes = jqnn.explain(qmodel, tokens, file=out)
  by_path = {r.path: r for r in routes}
  assert len(routes) == 2 * 7 + 2     # (+ the embedding's lookup, float)
  assert by_path["blocks/0/attn/o_proj/kernel"].impl == "xla_reference_weight_only"
  assert by_path["blocks/0/attn/o_proj/kernel"].m == 16
  assert by_path["blocks/0/mlp/down_proj/kernel"].mode == "float"
  assert by_path["lm_head/kernel"].mode == "float"
  assert "12 quantized / 4 float layers" in out.getvalue()


def _edit(qstate, path, fn):
  flat = dict(jq.leaves_with_paths(qstate))
  keys = path.split("/")
  out = jax.tree_util.tree_map(lambda x: x, qstate, is_leaf=jq.tree.is_qarray)
  node = out
  for k in keys[:-1]:
    node = node[int(k) if k.isdigit() else k]
  node[keys[-1]] = fn(flat[path])
  return out


def _quantize(x, spec, layout=None):
  return jax.jit(lambda x: jq.quantize(x, spec, layout=layout))(x)


def test_bad_inputs_name_the_layer(quantized):
  model, tokens, qstate, _ = quantized
  raw = dict(jq.leaves_with_paths(nnx.state(model, nnx.Param)))
  # a QArray whose shape disagrees with the layer
  bad = _edit(qstate, "blocks/0/mlp/up_proj/kernel",
              lambda q: _quantize(raw["blocks/0/mlp/up_proj/kernel"][:40], jq.W8A16))
  with pytest.raises(ValueError, match=r"blocks/0/mlp/up_proj/kernel.*\(40, 80\).*\(48, 80\)"):
    jqnn.quantize_module(model, bad)
  # a quantized parameter of a layer jq does not run quantized
  bad = _edit(qstate, "blocks/0/ln_1/scale",
              lambda _: _quantize(raw["blocks/0/ln_1/scale"],
                                  QuantSpec(granularity=Granularity.TENSOR)))
  with pytest.raises(ValueError, match=r"blocks/0/ln_1/scale.*LayerNorm.*not a layer's kernel"):
    jqnn.quantize_module(model, bad)
  # int8 activations on an Einsum with group scales; static mode without a calibrated scale
  for path, q, match in [
      ("blocks/0/mlp/gate_proj/kernel",
       _quantize(raw["blocks/0/mlp/gate_proj/kernel"], QuantSpec(
           granularity=Granularity.GROUP, group_size=16)), "group scales"),
      ("blocks/1/attn/v_proj/kernel", _quantize(raw["blocks/1/attn/v_proj/kernel"], jq.W8A16,
                                                jqnn.layouts(model)["blocks/1/attn/v_proj/kernel"]),
       "needs a calibrated scale")]:
    spec = jq.A8_DYNAMIC if match == "group scales" else jq.A8_STATIC
    bad = _edit(qstate, path, lambda _: dataclasses.replace(
        q, activation=ActivationQuant(None, None, spec)))
    with pytest.raises(ValueError, match=match) as e:
      qm = jqnn.quantize_module(model, bad)
      jax.eval_shape(lambda t: qm(t), tokens)
    assert path in str(e.value)


def test_quantized_class_keeps_a_subclass_override():
  from jq.nn.nnx import QLinear, quantized_class

  class Twice(nnx.Linear):
    def __call__(self, x):
      return super().__call__(x) * 2.0

  q = quantized_class(Twice)
  assert issubclass(q, Twice) and issubclass(q, QLinear) and q.__mro__[1] is Twice
  assert quantized_class(q) is q            # swapping again (explain, calibration) keeps it
  assert quantized_class(nnx.Linear) is QLinear


class _BnNet(nnx.Module):
  def __init__(self, n, *, rngs):
    self.layers = nnx.List([nnx.Linear(16, 16, rngs=rngs) for _ in range(n)])
    self.bn = nnx.BatchNorm(16, use_running_average=True, rngs=rngs)

  def __call__(self, x):
    for layer in self.layers:
      x = nnx.relu(layer(x))
    return self.bn(x)


def test_a_state_that_does_not_cover_the_module_is_refused_or_reported(tmp_path):
  """A checkpoint of fewer layers left the skeleton's extra layer at its random initial values,
  and a Param-only save its BatchNorm statistics, both silently."""
  m = _BnNet(2, rngs=nnx.Rngs(0))
  m.bn.mean.set_value(jnp.full((16,), 0.5))
  rules = jq.default_rules(jq.W8A16)
  with warnings.catch_warnings():
    warnings.simplefilter("error")   # (rules: the state is the module's own)
    qm = jqnn.quantize_module(m, rules)
  jq.io.save(tmp_path / "p.safetensors", nnx.state(qm, nnx.Param), rules=rules)
  jq.io.save(tmp_path / "f.safetensors", nnx.state(qm), rules=rules)
  with pytest.raises(ValueError, match=r"no value for 2 parameter\(s\) of the module: "
                                       r"layers/2/bias, layers/2/kernel"):
    jqnn.quantize_module(_BnNet(3, rngs=nnx.Rngs(7)), jq.io.load(tmp_path / "f.safetensors"))
  with pytest.warns(UserWarning, match=r"no value for bn/mean, bn/var \(BatchStat\)"):
    jqnn.quantize_module(_BnNet(2, rngs=nnx.Rngs(7)), jq.io.load(tmp_path / "p.safetensors"))
  x = jax.random.normal(jax.random.key(1), (4, 16))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    back = jqnn.quantize_module(_BnNet(2, rngs=nnx.Rngs(7)), jq.io.load(tmp_path / "f.safetensors"))
  np.testing.assert_array_equal(np.asarray(back(x)), np.asarray(qm(x)))


class _PatchNet(nnx.Module):
  def __init__(self, *, rngs):
    self.patch_embed = nnx.Conv(3, 16, (4, 4), strides=(4, 4), rngs=rngs)
    self.mlp = nnx.Linear(16, 16, rngs=rngs)
    self.head = nnx.Linear(16, 10, rngs=rngs)

  def __call__(self, x):
    return self.head(self.mlp(self.patch_embed(x)).mean(axis=(1, 2)))


def test_explain_with_the_rules_says_why_each_float_layer_is_float():
  rules = jq.default_rules(jq.W8A16)
  qm = jqnn.quantize_module(_PatchNet(rngs=nnx.Rngs(0)), rules)
  routes = {r.path: r for r in jqnn.explain(qm, jnp.ones((1, 16, 16, 3)), rules=rules, file=None)}
  assert routes["patch_embed/kernel"].reason == "kept float by rule 'embed'"
  assert routes["head/kernel"].reason.startswith("kept float by rule 'lm_head|")
  assert routes["mlp/kernel"].mode == "weight-only" and not routes["mlp/kernel"].reason
  only_mlp = [jq.Rule(pattern="mlp", weight=jq.W8A16)]
  routes = jqnn.explain(qm, jnp.ones((1, 16, 16, 3)), rules=only_mlp, file=None)
  assert {r.path: r.reason for r in routes}["head/kernel"] == "no rule matches it"
