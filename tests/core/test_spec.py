"""jq.spec: config validation, tiles, rules, presets."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from jq import spec as S
from jq.qtypes import QType
from jq.spec import (A8_DYNAMIC, ActivationSpec, Algorithm, Clip, ClipMethod, Granularity,
                     QuantSpec, Rule)


@pytest.mark.parametrize("kw,match", [
    (dict(qtype=QType.UINT4, symmetric=True), "unsigned uint4 needs symmetric=False"),
    (dict(qtype=QType.UINT8), "unsigned uint8"),
    (dict(qtype=QType.NF4, symmetric=False), "NF4 is a symmetric"),
    (dict(group_size=128), "group_size=128 needs granularity=GROUP"),
    (dict(granularity=Granularity.GROUP), "needs group_size >= 1"),
    (dict(granularity=Granularity.GROUP, group_size=0), "needs group_size >= 1"),
    (dict(granularity=Granularity.GROUP, group_size=12.5), "must be an int"),
    (dict(scale_dtype="float64"), "scale_dtype"),
    (dict(qtype="int4"), "must be a QType"),
    (dict(granularity="group"), "must be a Granularity"),
    (dict(channel_axes=("x",)), "must be ints"),
])
def test_invalid_specs(kw, match):
  with pytest.raises(ValueError, match=match):
    QuantSpec(**kw)


@pytest.mark.parametrize("kw", [dict(ratio=0.0), dict(ratio=1.5), dict(percentile=0.0),
                                dict(percentile=101.0), dict(grid=0), dict(min_ratio=0.0)])
def test_invalid_clip(kw):
  with pytest.raises(ValueError, match="Clip"):
    Clip(**kw)


def test_specs_are_frozen_hashable_static():
  a = QuantSpec(qtype=QType.INT4, granularity=Granularity.GROUP, group_size=128,
                channel_axes=[-1])  # a list becomes a tuple
  b = dataclasses.replace(a)
  assert a == b and hash(a) == hash(b) and a.channel_axes == (-1,)
  assert QuantSpec(channel_axes=1).channel_axes == (1,)
  with pytest.raises(dataclasses.FrozenInstanceError):
    a.group_size = 64
  with pytest.raises(TypeError):
    QuantSpec(QType.INT8)  # keyword-only
  seen = []

  @jax.jit
  def f(x):
    return x
  g = jax.jit(lambda x, s: seen.append(s) or x, static_argnums=1)
  g(jnp.ones(2), a)
  g(jnp.ones(2), b)
  assert len(seen) == 1


@pytest.mark.parametrize("spec,shape,tile", [
    (QuantSpec(granularity=Granularity.TENSOR), (8, 6), (8, 6)),
    (QuantSpec(), (8, 6), (8, 1)),
    (QuantSpec(channel_axes=(0,)), (8, 6), (1, 6)),
    (QuantSpec(channel_axes=(0, -1)), (4, 8, 6), (1, 8, 1)),
    (QuantSpec(granularity=Granularity.GROUP, group_size=3), (8, 6), (3, 1)),
    (QuantSpec(granularity=Granularity.GROUP, group_size=16), (8, 6), (8, 1)),  # > axis: 1 group
    (QuantSpec(granularity=Granularity.GROUP, group_size=4, group_axis=-1, channel_axes=(0,)),
     (8, 6), (1, 4)),
    (QuantSpec(granularity=Granularity.GROUP, group_size=4, group_axis=1, channel_axes=()),
     (3, 10, 2), (3, 4, 2)),
])
def test_tiles(spec, shape, tile):
  assert spec.tile(shape) == tile


def test_tile_errors_name_path_shape_dtype():
  with pytest.raises(ValueError, match=r"layers_3/mlp/kernel: shape \(2, 3\) dtype bfloat16: "
                                       r"channel axis 2 is out of range for rank 2"):
    QuantSpec(channel_axes=(2,)).tile((2, 3), name="layers_3/mlp/kernel", dtype=jnp.bfloat16)


def test_describe():
  assert S.W4A16_G128.describe() == "uint4 asym g128"
  assert S.W8A16.describe() == "int8 sym channel"
  assert "clip=mse" in QuantSpec(clip=Clip(method=ClipMethod.MSE)).describe()
  assert A8_DYNAMIC.describe() == "a8 dynamic sym"


def test_activation_spec():
  with pytest.raises(ValueError, match="8 bits"):
    ActivationSpec(qtype=QType.INT4)
  with pytest.raises(ValueError, match="uint8 activations need symmetric=False"):
    ActivationSpec(qtype=QType.UINT8)
  ActivationSpec(qtype=QType.UINT8, symmetric=False)


def test_rule_validation():
  with pytest.raises(ValueError, match="not a valid regex"):
    Rule(pattern="(kernel", weight=S.W8A16)
  with pytest.raises(ValueError, match="needs a weight spec"):
    Rule(pattern="kernel", weight=None, activation=A8_DYNAMIC)
  with pytest.raises(ValueError, match="8-bit weight"):
    Rule(pattern="kernel", weight=QuantSpec(qtype=QType.INT4), activation=A8_DYNAMIC)
  with pytest.raises(ValueError, match="per-channel or per-tensor"):
    Rule(pattern="kernel", weight=QuantSpec(granularity=Granularity.GROUP, group_size=32),
         activation=A8_DYNAMIC)
  r = Rule(pattern=r"(^|/)kernel$", weight=S.W8A16)
  assert r.matches("a/kernel") and not r.matches("a/kernel_x") and r.required
  assert "rtn w:int8 sym channel" in r.describe()
  assert Rule(pattern="x", weight=None).describe() == "float (skipped)"


def test_default_rules_and_recipes():
  rules = S.default_rules(S.W8A16, algorithm=Algorithm.GPTQ)
  assert all(r.weight is None and not r.required for r in rules[:-1])
  assert rules[-1].weight == S.W8A16 and rules[-1].algorithm is Algorithm.GPTQ
  for name in S.RECIPES:
    assert S.recipe_rules(name)[-1].weight is not None
  assert S.recipe_rules("w8a8-dynamic")[-1].activation == S.A8_DYNAMIC_ASYM
  assert not S.A8_DYNAMIC_ASYM.symmetric and S.A8_DYNAMIC_ASYM.qtype is S.QType.INT8
  with pytest.raises(ValueError, match="unknown recipe 'w5'"):
    S.recipe_rules("w5")


# ---- algorithm options in the rules; one recipe vocabulary -----------------------------------

ALGORITHM_RECIPE_NAMES = ("gptq-w4a16-g128", "gptq-w4a16-g128-actorder", "gptq-w4a16-g32",
                          "gptq-w3a16-g128", "awq-w4a16-g128", "awq-w4a16-g32", "awq-w3a16-g128",
                          "smoothquant-w8a8", "smoothquant-w8a8-static", "autoround-w4a16-g128",
                          "autoround-w3a16-g128", "autoround-w2a16-g32")


def test_algorithm_options_validation():
  for cls, kw, match in ((S.GPTQOptions, dict(act_order=1), "act_order"),
                         (S.GPTQOptions, dict(damp=0.0), "damp"),
                         (S.GPTQOptions, dict(block_size=0), "block_size"),
                         (S.GPTQOptions, dict(first_token_weight=-1.0), "first_token_weight"),
                         (S.AWQOptions, dict(grid=0), "grid"),
                         (S.AWQOptions, dict(clip="yes"), "clip"),
                         (S.SmoothQuantOptions, dict(alpha=1.5), "alpha")):
    with pytest.raises(ValueError, match=match):
      cls(**kw)
  with pytest.raises(ValueError, match="do not belong to algorithm rtn"):
    Rule(pattern="kernel", weight=S.W8A16, options=S.GPTQOptions())
  with pytest.raises(ValueError, match="AWQOptions do not belong to algorithm gptq"):
    Rule(pattern="kernel", weight=S.W8A16, algorithm=Algorithm.GPTQ, options=S.AWQOptions())
  r = Rule(pattern="kernel", weight=S.W8A16, algorithm=Algorithm.AWQ)
  assert r.options is None and r.algorithm_options == S.AWQOptions()
  assert Rule(pattern="kernel", weight=S.W8A16).algorithm_options is None


def test_default_rules_carry_options():
  opts = S.GPTQOptions(act_order=True, damp=0.05)
  rules = S.default_rules(S.W4A16_G128, algorithm=Algorithm.GPTQ, options=opts)
  assert rules[-1].options == opts and rules[-1].algorithm_options.act_order
  assert all(r.options is None for r in rules[:-1])
  hash(rules)


def test_every_recipe_is_known_to_spec():
  from jq.ptq import recipes
  names = S.recipe_names()
  assert names == recipes.names() and len(set(names)) == len(names)
  assert set(names) == set(S.RECIPES) | set(ALGORITHM_RECIPE_NAMES)
  for name in names:
    assert S.recipe_rules(name) == recipes.rules(name)
    assert S.recipe_rules(name)[-1].weight is not None
  actorder, plain = S.recipe_rules("gptq-w4a16-g128-actorder"), S.recipe_rules("gptq-w4a16-g128")
  assert actorder != plain
  assert actorder[-1].algorithm_options.act_order and not plain[-1].algorithm_options.act_order
  assert actorder[:-1] == plain[:-1] and actorder[-1].weight == plain[-1].weight == S.W4A16_G128
  sq = S.recipe_rules("smoothquant-w8a8-static")[-1]
  assert sq.algorithm is Algorithm.SMOOTHQUANT and sq.activation == S.A8_STATIC
  assert S.recipe_rules("awq-w3a16-g128")[-1].weight == S.W3A16_G128
  assert recipes.needs_calibration(S.recipe_rules("w8a8-static"))
  assert not recipes.needs_calibration(S.recipe_rules("w8a8-dynamic"))
  assert all(recipes.needs_calibration(S.recipe_rules(n)) for n in ALGORITHM_RECIPE_NAMES)
  with pytest.raises(ValueError, match=r"unknown recipe 'gptq-w5'.*gptq-w4a16-g128-actorder"):
    recipes.rules("gptq-w5")


def test_recipe_rules_with_options():
  got = S.recipe_rules("gptq-w4a16-g128", options=S.GPTQOptions(act_order=True))
  assert got == S.recipe_rules("gptq-w4a16-g128-actorder")
  assert S.recipe_rules("smoothquant-w8a8", options=S.SmoothQuantOptions(alpha=0.8))[-1] \
      .algorithm_options.alpha == 0.8
  with pytest.raises(ValueError, match="recipe 'awq-w4a16-g128' uses awq; options GPTQOptions"):
    S.recipe_rules("awq-w4a16-g128", options=S.GPTQOptions())
  with pytest.raises(ValueError, match="recipe 'w8a16' uses rtn"):
    S.recipe_rules("w8a16", options=S.AWQOptions())


def test_rules_json_round_trip_with_options():
  from jq import spec_json
  for name in S.recipe_names():
    rules = S.recipe_rules(name)
    assert spec_json.rules_from_json(spec_json.rules_to_json(rules)) == rules, name
  rules = (Rule(pattern="q_proj", weight=S.W4A16_G32, algorithm=Algorithm.GPTQ,
                options=S.GPTQOptions(act_order=True, damp=0.02, block_size=64,
                                      first_token_weight=1.0)),
           Rule(pattern="up", weight=S.W4A16_G32, algorithm=Algorithm.AWQ,
                options=S.AWQOptions(grid=7, clip=False)),
           Rule(pattern="down", weight=S.W8A16, activation=S.A8_STATIC,
                algorithm=Algorithm.SMOOTHQUANT, options=S.SmoothQuantOptions(alpha=0.75)))
  text = spec_json.rules_to_json(rules)
  assert '"act_order": true' in text and '"alpha": 0.75' in text
  assert spec_json.rules_from_json(text) == rules
  # fields left out keep their defaults; ints are fine where a float is asked for
  got = spec_json.rule_from_json({"pattern": "k", "weight": None, "algorithm": "gptq",
                                  "options": {"act_order": True, "first_token_weight": 4}})
  assert got.options == S.GPTQOptions(act_order=True, first_token_weight=4.0)


@pytest.mark.parametrize("options,match", [
    ({"act_order": "yes"}, r"rules\[2\]\.options\.act_order: 'yes': .*must be a bool"),
    ({"damp": "0.01"}, r"rules\[2\]\.options\.damp: '0.01'"),
    ({"block_size": 2.5}, r"rules\[2\]\.options\.block_size: 2.5"),
    ({"act_ordr": True}, r"rules\[2\]\.options\.act_ordr: unknown gptq option; known: "
                         r"\['act_order'"),
    ({"grid": 10}, r"rules\[2\]\.options\.grid: unknown gptq option"),
    ([True], r"rules\[2\]\.options: expected an object of gptq options, got list"),
])
def test_rules_json_option_errors_name_the_location(options, match):
  from jq import spec_json
  import json
  rules = [{"pattern": "embed", "weight": None}, {"pattern": "norm", "weight": None},
           {"pattern": "kernel$", "weight": {"qtype": "uint4", "symmetric": False,
                                             "granularity": "group", "group_size": 128},
            "algorithm": "gptq", "options": options}]
  with pytest.raises(ValueError, match=match):
    spec_json.rules_from_json(json.dumps(rules))


def test_rules_json_options_need_an_algorithm_that_takes_them():
  from jq import spec_json
  with pytest.raises(ValueError, match=r"rules\[0\]\.options: algorithm 'rtn' takes no options"):
    spec_json.rules_from_json('[{"pattern": "k", "weight": null, "options": {"alpha": 0.5}}]')
  with pytest.raises(ValueError, match=r"rules\[0\]\.options\.alpha: unknown awq option"):
    spec_json.rules_from_json('[{"pattern": "k", "weight": null, "algorithm": "awq", '
                              '"options": {"alpha": 0.5}}]')
  # null options: the algorithm's defaults; checkpoint headers without "options" still load
  r = spec_json.rules_from_json('[{"pattern": "k", "weight": null, "algorithm": "awq", '
                                '"options": null}, {"pattern": "j", "weight": null}]')
  assert r[0].algorithm_options == S.AWQOptions() and r[1].options is None
