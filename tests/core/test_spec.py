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
  assert S.recipe_rules("w8a8-dynamic")[-1].activation == A8_DYNAMIC
  with pytest.raises(ValueError, match="unknown recipe 'w5'"):
    S.recipe_rules("w5")
