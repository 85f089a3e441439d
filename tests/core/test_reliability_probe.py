"""Reliability, second probe: bad input that used to give a raw error from deep inside numpy/jax,
a misleading message, or a silently wrong result; each now a ValueError naming what is wrong.

Groups: tensor inputs and specs, hand-built QArrays and ``dequantize``, configs and rules files,
calibration rules that no layer can run, token ids outside the vocabulary.
"""
from __future__ import annotations

import dataclasses
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jq
from jq import ptq, spec_json
from jq.qarray import QArray, checked, dequantize
from jq.qtypes import QType
from jq.spec import (Algorithm, Clip, ClipMethod, GPTQOptions, Granularity, QuantSpec, Rule,
                     SmoothQuantOptions)

UINT4 = QuantSpec(qtype=QType.UINT4, symmetric=False)


def _x(shape=(4, 4)):
  return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


# ---- tensor inputs and specs -------------------------------------------------------------------
def test_float64_values_beyond_float32_range_are_named_not_zeroed():
  x = _x().astype(np.float64)
  x[1, 2] = 1e39  # finite in float64, inf once jax makes it float32
  for policy in ("raise", "zero"):  # "zero" used to turn it into an exact 0 silently
    with pytest.raises(ValueError, match=r"w: shape \(4, 4\) dtype float64 has 1 values beyond "
                                         r"float32's range \(first at index \(1, 2\): 1e\+39\)"):
      jq.quantize(x, jq.W8A16, name="w", nan_policy=policy)
  with pytest.raises(ValueError, match="beyond float32's range"):
    jq.compute_params(x, UINT4, name="w")
  x[1, 2] = 3e38  # within float32: fine
  assert np.isfinite(np.asarray(jq.quantize(x, jq.W8A16).dequantize())).all()


@pytest.mark.parametrize("spec", ["int8", QType.INT8, None, jq.A8_DYNAMIC])
def test_a_spec_that_is_not_a_quantspec_is_named(spec):
  for fn in (lambda: jq.quantize(_x(), spec, name="w"),
             lambda: jq.compute_params(_x(), spec, name="w"),
             lambda: jq.quantize_with_params(_x(), jnp.ones((1, 4)), None, spec, name="w")):
    with pytest.raises(ValueError, match=r"w: spec must be a jq.QuantSpec, got"):
      fn()
  with pytest.raises(ValueError, match="spec must be a jq.QuantSpec"):
    jq.fake_quant(jnp.asarray(_x()), spec)


def test_a_layout_that_is_not_a_layout_is_named():
  with pytest.raises(ValueError, match=r"w: shape \(4, 4\) dtype float32: layout must be a "
                                       r"jq.Layout .*got tuple"):
    jq.quantize(_x(), jq.W8A16, name="w", layout=(0, 1))


def test_nested_lists_quantize_like_arrays():
  q = jq.quantize([[1.0, -2.0], [0.5, 4.0]], jq.W8A16, name="w")
  np.testing.assert_allclose(np.asarray(q.dequantize()), [[1.0, -2.0], [0.5, 4.0]], rtol=1e-2)
  with pytest.raises(ValueError, match="dtype int64: only floating-point"):
    jq.quantize([[1, 2], [3, 4]], jq.W8A16, name="w")


def test_fake_quant_refuses_scalars_and_empty_tensors():
  with pytest.raises(ValueError, match=r"shape \(\) dtype float32: scalars are not quantized"):
    jq.fake_quant(jnp.float32(2.0), jq.W8A16)
  with pytest.raises(ValueError, match=r"shape \(0, 4\) dtype float32: empty tensors"):
    jq.fake_quant(jnp.zeros((0, 4)), jq.W8A16)


@pytest.mark.parametrize("zp,shown", [(jnp.full((1, 4), 300.0), "300.0"),
                                      (jnp.full((1, 4), -1, jnp.int32), "-1.0"),
                                      (jnp.full((1, 4), jnp.nan), "nan")])
def test_quantize_with_params_refuses_zero_points_it_would_clip(zp, shown):
  with pytest.raises(ValueError, match=r"w: shape \(4, 4\) dtype float32: zero_point shape "
                                       r"\(1, 4\) .*must lie in \[0, 15\] \(uint4\); 4 outside, "
                                       rf"first at index \(0, 0\): {shown}"):
    jq.quantize_with_params(_x(), jnp.full((1, 4), 0.1), zp, UINT4, name="w")
  with pytest.raises(ValueError, match="zero points must lie in"):
    with checked():
      jax.jit(lambda z: jq.quantize_with_params(_x(), jnp.full((1, 4), 0.1), z, UINT4))(zp)
  # fractional zero points are rounded (documented); in-range ones work
  q = jq.quantize_with_params(_x(), jnp.full((1, 4), 0.1), jnp.full((1, 4), 7.4), UINT4)
  assert np.all(np.asarray(q.zero_point) == 7)


def test_qtype_errors_name_the_choices():
  with pytest.raises(ValueError, match=r"bits='4' is not supported; choose the int 2, 3, 4 or 8"):
    QType.from_bits("4")
  with pytest.raises(ValueError, match=r"bits=4.0 is not supported"):
    QType.from_bits(4.0)
  assert QType.from_bits(np.int64(4)) is QType.INT4
  with pytest.raises(ValueError, match=r"'fp8' is not a jq QType; choose one of \['int8'"):
    QType("fp8")
  assert QType("uint4") is QType.UINT4


# ---- hand-built QArrays and dequantize ---------------------------------------------------------
def test_dequantize_refuses_integer_and_unknown_dtypes():
  q = jq.quantize(_x(), jq.W8A16)
  with pytest.raises(ValueError, match="dtype int8 is not floating point: dequantized values "
                                       "would be truncated"):
    q.dequantize(jnp.int8)
  with pytest.raises(ValueError, match="dtype 'float33' is not a dtype"):
    dequantize(q, "float33")


def test_dequantize_overflow_is_an_error_not_inf():
  x = jnp.asarray([[1e5, 1.0], [-1e5, 2.0]], jnp.float32)
  q = jq.quantize(x, jq.W8A16, name="w")
  assert np.isfinite(np.asarray(q.dequantize(jnp.bfloat16))).all()
  with pytest.raises(ValueError, match=r"dequantized to float16, 2 values overflow \(first at "
                                       r"index \(0, 0\): 100000 in float32; the largest finite "
                                       r"float16 is 65504\)"):
    q.dequantize(jnp.float16)
  # a valid QArray (finite positive scales) whose scale times code exceeds float32
  big = dataclasses.replace(jq.quantize(_x((8, 6)), jq.W8A16),
                            scale=jnp.full((1, 6), 1e37, jnp.float32))
  big.validate("w")
  with pytest.raises(ValueError, match="values overflow"):
    dequantize(big)
  jax.jit(dequantize)(big)  # under jit: no check (and no cost) ...
  with pytest.raises(ValueError, match="values overflow"):
    with checked():  # ... unless asked for
      jax.block_until_ready(jax.jit(dequantize)(big))


@pytest.mark.parametrize("qt,code,want", [("int4", 0x07, 7 * 0.5), ("nf4", 0x00, -0.5),
                                          ("uint2", 0x03, 1.5)])
def test_scalar_sub_byte_qarrays_dequantize(qt, code, want):
  q = QArray(values=jnp.asarray(code, jnp.uint8), scale=jnp.float32(0.5), zero_point=None,
             activation=None, qtype=QType(qt), shape=(), tile=())
  assert float(dequantize(q)) == want  # was an IndexError from deep inside unpack


def test_einsum_names_bad_operands():
  w = jq.quantize(_x((8, 6)), jq.W8A16)
  with pytest.raises(ValueError, match="e: einsum subscripts must be a string"):
    jq.ops.einsum(5, jnp.ones((2, 8)), w, name="e")
  with pytest.raises(ValueError, match="e: rhs must be a jq.QArray, got list"):
    jq.ops.einsum("ij,jk->ik", jnp.ones((2, 8)), [[1.0]], name="e")


# ---- configs and rules files -------------------------------------------------------------------
def test_options_accept_numpy_numbers_and_specs_serialise():
  assert GPTQOptions(damp=np.float32(0.01)).damp == pytest.approx(0.01)
  assert GPTQOptions(first_token_weight=np.float64(4)).first_token_weight == 4.0
  assert SmoothQuantOptions(alpha=np.float32(0.5)).alpha == 0.5
  spec = QuantSpec(granularity=Granularity.GROUP, group_size=np.int64(32),
                   clip=Clip(method=ClipMethod.FIXED, ratio=np.float32(0.5)))
  assert spec == QuantSpec(granularity=Granularity.GROUP, group_size=32,
                           clip=Clip(method=ClipMethod.FIXED, ratio=0.5))
  rule = Rule(pattern="k", weight=spec, algorithm=Algorithm.GPTQ,
              options=GPTQOptions(damp=np.float32(0.5), block_size=np.int64(64)))
  assert spec_json.rules_from_json(spec_json.rules_to_json([rule])) == (rule,)  # was TypeError


def test_empty_rule_pattern_is_refused():
  with pytest.raises(ValueError, match="Rule.pattern is empty, which matches every parameter "
                                       "path; write '.\\*'"):
    Rule(pattern="", weight=None)
  with pytest.raises(ValueError, match=r"rules\[0\]: Rule.pattern is empty"):
    spec_json.rules_from_json('[{"pattern": "", "weight": {"qtype": "int8"}}]')


@pytest.mark.parametrize("text,match", [
    ("[]", "rules: the list is empty, so nothing would be quantized"),
    ('[{"pattern": "kernel$"}]', r"rules\[0\]: a rule needs at least 'pattern' and 'weight' "
                                 r"\(null keeps .*\), got \['pattern'\]"),
    ('[{"pattern": "kernel$", "weight": {"qtype": "int8"}, "weight": null}]',
     r"rules: key 'weight' appears twice in one object \(\{\"qtype\": \"int8\"\} and null\)"),
    ('[{"pattern": "k", "weight": {"qtype": "int4", "qtype": "int8"}}]', "key 'qtype' appears twice"),
    ("[" * 100_000 + "]" * 100_000, "rules: the JSON nests too deeply"),
])
def test_rules_file_mistakes_are_errors(text, match):
  with pytest.raises(ValueError, match=match):
    spec_json.rules_from_json(text)


def test_a_binary_rules_file_is_named(tmp_path):
  p = tmp_path / "rules.json"
  p.write_bytes(b"\xff\xfe\x00\x89PNG")
  with pytest.raises(ValueError, match=r"rules file .*rules.json: not UTF-8 text"):
    spec_json.load_rules(p)


# ---- calibration rules no layer can run --------------------------------------------------------
class _Tiny(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    h = nn.Embed(16, 8, name="embed")(tokens)
    h = nn.LayerNorm(name="norm")(nn.Dense(8, name="fc")(h))
    return nn.Dense(16, name="head")(h)


def _tiny():
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 16, (2, 6)), jnp.int32)
  return _Tiny(), _Tiny().init(jax.random.key(0), tokens), tokens


class _OwnTable(nn.Module):
  """An embedding table the model reads itself (jq cannot run it quantized)."""
  @nn.compact
  def __call__(self, tokens):
    table = self.param("table", nn.initializers.normal(1.0), (16, 8))
    return nn.Dense(16, name="fc")(jnp.take(table, tokens, axis=0))


def test_a_rule_whose_only_matches_cannot_run_quantized_says_so():
  _, _, tokens = _tiny()
  model = _OwnTable()
  variables = model.init(jax.random.key(0), tokens)
  rules = (Rule(pattern="table", weight=jq.W8A16),) + jq.default_rules(jq.W8A16)
  # was: "rule pattern(s) ['table'] matched no parameter; paths look like: params/..."
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    with pytest.raises(ValueError, match=r"rule 'table' \(rtn w:int8 sym channel\) matches only "
                                         r"parameters whose layer jq cannot run quantized: "
                                         r"params/table"):
      jq.nn.quantize_variables(model, variables, rules, tokens)
    with pytest.raises(ValueError, match="rule 'table' .* matches only parameters"):
      ptq.quantize_model(model, variables, rules, [tokens])
  # an nn.Embed table runs quantized (lookups and a tied head): the same rule on it works
  model, variables, tokens = _tiny()
  qvars = jq.nn.quantize_variables(model, variables, (Rule(pattern="embed", weight=jq.W8A16),)
                                   + jq.default_rules(jq.W8A16), tokens)
  assert isinstance(qvars["params"]["embed"]["embedding"], jq.QArray)


def test_a_rule_quantizing_a_rank1_parameter_is_named_in_quantize_model():
  model, variables, tokens = _tiny()
  tensor = QuantSpec(granularity=Granularity.TENSOR)
  for algorithm in (Algorithm.RTN, Algorithm.GPTQ):
    rules = (Rule(pattern="norm/scale", weight=tensor, algorithm=algorithm),
             Rule(pattern="embed|bias|head", weight=None, required=False),
             Rule(pattern="kernel$", weight=jq.W8A16))
    with pytest.raises(ValueError, match=r"params/norm/scale: shape \(8,\) dtype float32: rule "
                                         r"'norm/scale' quantizes this rank-1 parameter, but no "
                                         r"layer that jq runs quantized uses it"):  # was KeyError
      ptq.quantize_model(model, variables, rules, [tokens])


# ---- token ids outside the vocabulary ----------------------------------------------------------
def test_decoder_token_ids_outside_the_vocabulary_are_named():
  from jq_models.decoder import Decoder, DecoderConfig, greedy_generate
  cfg = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=16, max_seq_len=32)
  model = Decoder(cfg)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  bad = jnp.asarray([[1, 2, 999]], jnp.int32)  # used to give NaN logits
  with pytest.raises(ValueError, match=r"Decoder: tokens shape \(1, 3\): 1 token id\(s\) outside "
                                       r"\[0, 64\) \(vocab_size 64\), first at index \(0, 2\): 999"):
    model.apply(variables, bad)
  jax.jit(model.apply)(variables, bad)  # the jitted forward does not check (no cost) ...
  with pytest.raises(ValueError, match="outside \\[0, 64\\)"):
    with checked():  # ... unless asked for
      jax.block_until_ready(jax.jit(model.apply)(variables, bad))
  for prompt, shown in (([1, 2, 999], "999"), ([1, -2, 3], "-2")):  # -2 wrapped to token 62
    with pytest.raises(ValueError, match=rf"greedy_generate: prompt_ids: tokens shape \(3,\): .*"
                                         rf"first at index \(\d,\): {shown}"):
      greedy_generate(model.apply, variables, np.asarray(prompt), 2, config=cfg)
  assert model.apply(variables, jnp.asarray([[0, 63]])).shape == (1, 2, 64)


def test_rules_must_be_a_sequence_of_rules():
  params = {"k": jnp.ones((4, 4))}
  with pytest.raises(ValueError, match=r"wrap one rule"):
    jq.quantize_tree(params, jq.Rule(pattern="k", weight=jq.W8A16))
  with pytest.raises(ValueError, match=r"jq.Rule objects; got a QuantSpec"):
    jq.quantize_tree(params, (jq.W8A16,))


def test_dequantize_tree_names_the_path_of_an_invalid_leaf():
  q = jq.quantize(jnp.ones((4, 8)), jq.W8A16)
  bad = dataclasses.replace(q, scale=-q.scale)
  with pytest.raises(ValueError, match=r"^a/b"):
    jq.dequantize_tree({"a": {"b": bad}})
