"""jq.tree: rules over parameter pytrees, quantize/dequantize trees, reports."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jq import spec as S
from jq import tree as T
from jq.qarray import ActivationQuant, QArray
from jq.qtypes import QType
from jq.spec import Granularity, QuantSpec, Rule


def linen_params(seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  w = lambda *shape: jnp.asarray(rng.standard_normal(shape) * 0.05, dtype)
  return {"params": {
      "embed": {"embedding": w(50, 16)},
      "layers_0": {
          "attn": {"q_proj": {"kernel": w(16, 16)}, "o_proj": {"kernel": w(16, 16),
                                                              "bias": w(16)}},
          "mlp": {"up": {"kernel": w(16, 40)}, "down": {"kernel": w(40, 16)}},
          "input_norm": {"scale": w(16)},
          "post_attention_layernorm": {"scale": w(16)},
      },
      "final_norm": {"scale": w(16)},
      "lm_head": {"kernel": w(16, 50)},
  }}


QUANTIZED = {"params/layers_0/attn/q_proj/kernel", "params/layers_0/attn/o_proj/kernel",
             "params/layers_0/mlp/up/kernel", "params/layers_0/mlp/down/kernel"}


def test_paths():
  paths = [p for p, _ in T.leaves_with_paths(linen_params())]
  assert "params/layers_0/attn/q_proj/kernel" in paths
  assert "params/embed/embedding" in paths and len(paths) == 10


def test_default_rules_skip_embeddings_norms_biases_head():
  plan = T.plan(linen_params(), S.default_rules(S.W8A16))
  quantized = {p.path for p in plan if p.quantized}
  assert quantized == QUANTIZED
  by_path = {p.path: p for p in plan}
  for skipped in ("params/embed/embedding", "params/layers_0/input_norm/scale",
                  "params/layers_0/attn/o_proj/bias", "params/lm_head/kernel",
                  "params/final_norm/scale", "params/layers_0/post_attention_layernorm/scale"):
    assert by_path[skipped].rule is not None and by_path[skipped].rule.weight is None
  assert by_path["params/lm_head/kernel"].shape == (16, 50)


def test_first_match_wins():
  w4 = QuantSpec(qtype=QType.INT4)
  rules = [Rule(pattern=r"mlp/.*kernel$", weight=w4), Rule(pattern=r"kernel$", weight=S.W8A16),
           Rule(pattern=r"mlp/up/kernel$", weight=None, required=False)]  # shadowed: never used
  by_path = {p.path: p for p in T.plan(linen_params(), rules)}
  assert by_path["params/layers_0/mlp/up/kernel"].rule.weight == w4
  assert by_path["params/layers_0/attn/q_proj/kernel"].rule.weight == S.W8A16
  assert by_path["params/lm_head/kernel"].rule.weight == S.W8A16  # no skip rule here
  assert by_path["params/embed/embedding"].rule is None  # matched by nothing: left in float
  q = T.quantize_tree(linen_params(), rules)
  assert q["params"]["layers_0"]["mlp"]["up"]["kernel"].qtype is QType.INT4
  assert isinstance(q["params"]["embed"]["embedding"], jax.Array)


def test_required_rule_matching_nothing_raises():
  rules = [Rule(pattern=r"q_porj/kernel", weight=S.W8A16)]  # typo
  with pytest.raises(ValueError, match=r"q_porj/kernel.*matched no parameter.*paths look like"):
    T.plan(linen_params(), rules)
  with pytest.raises(ValueError, match="q_porj"):
    T.quantize_tree(linen_params(), rules)
  T.plan(linen_params(), [Rule(pattern="q_porj", weight=S.W8A16, required=False)])


@pytest.mark.parametrize("spec", [S.W8A16, S.W4A16_G128, S.NF4_G64, S.W2A16_G32],
                         ids=lambda s: s.describe())
def test_quantize_dequantize_tree_round_trip(spec):
  params = linen_params()
  q = T.quantize_tree(params, S.default_rules(spec))
  assert jax.tree_util.tree_structure(T.dequantize_tree(q)) == jax.tree_util.tree_structure(params)
  ref = dict(T.leaves_with_paths(params))
  for path, leaf in T.leaves_with_paths(q):
    if path in QUANTIZED:
      assert isinstance(leaf, QArray)
      leaf.validate(path)
      err = np.abs(np.asarray(leaf.dequantize()) - np.asarray(ref[path]))
      step = np.asarray(T.dequantize_tree({"a": leaf})["a"])  # just exercising
      assert err.max() <= float(jnp.max(leaf.scale)) * 0.6
    else:
      assert leaf is ref[path]  # skipped leaves are passed through untouched
  deq = T.dequantize_tree(q, jnp.bfloat16)
  assert deq["params"]["layers_0"]["mlp"]["up"]["kernel"].dtype == jnp.bfloat16
  assert deq["params"]["embed"]["embedding"].dtype == jnp.float32  # untouched
  # quantizing an already quantized tree is a no-op
  again = T.quantize_tree(q, S.default_rules(spec))
  assert again["params"]["layers_0"]["mlp"]["up"]["kernel"] is q["params"]["layers_0"]["mlp"]["up"]["kernel"]


def test_quantize_tree_under_jit_matches_eager():
  params = linen_params(dtype=jnp.bfloat16)
  rules = S.default_rules(S.W4A16_G128)
  eager = T.quantize_tree(params, rules)
  jitted = jax.jit(lambda p: T.quantize_tree(p, rules))(params)
  for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("mutate,rules,what", [
    (lambda p: p["params"]["layers_0"]["mlp"]["up"].update(kernel=p["params"]["layers_0"]["mlp"]["up"]["kernel"].at[0, 0].set(jnp.nan)),
     S.default_rules(S.W8A16), "NaN/Inf"),
    (lambda p: p["params"]["layers_0"]["mlp"]["up"].update(kernel=jnp.ones((16, 40), jnp.int8)),
     S.default_rules(S.W8A16), "only floating-point"),
    (lambda p: None, S.default_rules(QuantSpec(channel_axes=(3,))), "channel axis 3"),
    (lambda p: None, S.default_rules(QuantSpec(granularity=Granularity.GROUP, group_size=8,
                                               group_axis=4)), "group_axis 4"),
])
def test_errors_name_the_parameter_path(mutate, rules, what):
  params = linen_params()
  mutate(params)
  with pytest.raises(ValueError) as e:
    T.quantize_tree(params, rules)
  msg = str(e.value)
  assert "params/layers_0/" in msg and "/kernel" in msg and what in msg
  assert "shape (16, " in msg and "dtype" in msg


def test_rank1_channel_and_static_activation_errors():
  params = linen_params()
  with pytest.raises(ValueError, match=r"params/layers_0/input_norm/scale: shape \(16,\) dtype "
                                       r"float32: per-channel/group quantization of a rank-1"):
    T.quantize_tree(params, [Rule(pattern="input_norm", weight=S.W8A16)])
  q = T.quantize_tree(params, [Rule(pattern="input_norm",
                                    weight=QuantSpec(granularity=Granularity.TENSOR))])
  assert q["params"]["layers_0"]["input_norm"]["scale"].scale.shape == (1,)
  with pytest.raises(ValueError, match=r"params/layers_0/.*/kernel: shape \(\d+, \d+\) dtype "
                                       r"float32: static .*calibrated input scale"):
    T.quantize_tree(params, S.default_rules(S.W8A16, S.A8_STATIC))
  with pytest.raises(ValueError, match=r"needs calibration data; use jq\.ptq\.quantize_model\("
                                       r"model, variables, rules, batches\).*--recipe"):
    T.quantize_tree(params, S.default_rules(S.W8A16, algorithm=S.Algorithm.GPTQ))


def test_activation_rules():
  params = linen_params()
  q = T.quantize_tree(params, S.default_rules(S.W8A16, S.A8_DYNAMIC))
  up = q["params"]["layers_0"]["mlp"]["up"]["kernel"]
  assert isinstance(up.activation, ActivationQuant) and up.activation.scale is None
  up.validate()
  scales = {p: (jnp.float32(0.1), None) for p in QUANTIZED}
  q = T.quantize_tree(params, S.default_rules(S.W8A16, S.A8_STATIC), act_scales=scales)
  up = q["params"]["layers_0"]["mlp"]["up"]["kernel"].validate()
  assert float(up.activation.scale) == pytest.approx(0.1)


def test_report_and_format():
  params = linen_params()
  q = T.quantize_tree(params, S.default_rules(S.W4A16_G128))
  rows = T.report(params, q)
  assert {r.path for r in rows} == QUANTIZED
  for r in rows:
    assert r.mse > 0 and np.isfinite(r.sqnr_db) and r.bytes_after < r.bytes_before
    assert r.bytes_before == int(np.prod(r.shape)) * 4
    assert "uint4" in r.spec and "asym" in r.spec
  table = T.format_report(rows)
  lines = table.splitlines()
  assert lines[0].split()[:3] == ["path", "shape", "spec"] and set(lines[1]) <= {"-", " "}
  assert len(lines) == 2 + len(rows) + 1
  assert "4 quantized tensors" in lines[-1]
  worst = T.format_report(rows, limit=1).splitlines()
  assert len(worst) == 4 and min(rows, key=lambda r: r.sqnr_db).path in worst[2]
  assert T.format_report([]).splitlines()[0].startswith("path")
  with pytest.raises(ValueError, match="missing from the float tree"):
    T.report({"params": {}}, q)
  # swapped arguments gave an empty table; the quantized tree twice a raw error
  with pytest.raises(ValueError, match=r"the float tree holds quantized leaves .* swapped "
                                       r"arguments\? jq.report\(float_params, quantized_params\)"):
    T.report(q, params)
  with pytest.raises(ValueError, match=r"is quantized in the float tree too"):
    T.report(q, q)
  # sizes of the model as stored (a bfloat16 checkpoint whose AWQ-folded copy is float32)
  stored = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  halves = T.report(params, q, stored=stored)
  assert [r.bytes_before * 2 for r in halves] == [r.bytes_before for r in rows]
  assert [r.sqnr_db for r in halves] == [r.sqnr_db for r in rows]


def test_tree_error_and_nbytes():
  params = linen_params()
  q = T.quantize_tree(params, S.default_rules(S.W8A16))
  err = T.tree_error(params, q)
  assert set(err) == {"mse", "sqnr_db", "cosine", "max_abs"}
  assert err["sqnr_db"] > 30 and err["cosine"] > 0.999
  assert T.tree_error(params, params) == {}
  assert T.nbytes(params) == sum(x.size * 4 for x in jax.tree_util.tree_leaves(params))
  assert T.nbytes(q) < T.nbytes(params)
  q4 = T.quantize_tree(params, S.default_rules(S.W4A16_G128))
  assert T.tree_error(params, q4)["sqnr_db"] < err["sqnr_db"]


def test_all_zero_kernel_reports_inf_sqnr():
  params = {"l": {"kernel": jnp.zeros((8, 4))}}
  q = T.quantize_tree(params, S.default_rules(S.W8A16))
  [row] = T.report(params, q)
  assert row.mse == 0.0 and row.sqnr_db == np.inf
  assert "inf" in T.format_report([row])


def test_nnx_state_paths_match_linen():
  nnx = pytest.importorskip("flax.nnx")

  class Block(nnx.Module):
    def __init__(self, rngs):
      self.q_proj = nnx.Linear(8, 8, rngs=rngs)
      self.input_norm = nnx.RMSNorm(8, rngs=rngs)

  state = nnx.state(Block(nnx.Rngs(0)), nnx.Param)
  paths = {p for p, _ in T.leaves_with_paths(state)}
  assert paths == {"q_proj/kernel", "q_proj/bias", "input_norm/scale"}
  q = T.quantize_tree(state, S.default_rules(S.W8A16))
  quantized = {p for p, leaf in T.leaves_with_paths(q) if isinstance(leaf, QArray)}
  assert quantized == {"q_proj/kernel"}
