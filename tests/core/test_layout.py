"""Layouts: scales follow the layer's axes (per head, per feature, per stacked layer)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jq
from jq import Granularity, Layout, QuantSpec
from jq.layout import group_tile
from jq.nn.common import layer_view

QKV = Layout(contracting=(0,), channels=(1, 2), layer="nn.DenseGeneral(features=(4, 64))")
O = Layout(contracting=(0, 1), channels=(2,), layer="nn.DenseGeneral(features=256, axis=(-2,-1))")
STACK = Layout(contracting=(1,), channels=(2,), batch=(0,), layer="scan of nn.Dense")


@pytest.mark.parametrize("sizes,g,tile", [
    ((576,), 128, (128,)), ((64,), 128, (64,)), ((4, 64), 128, (2, 64)), ((4, 64), 32, (1, 32)),
    ((4, 48), 128, (2, 48)), ((3, 3, 64), 128, (1, 2, 64)), ((7, 7, 3), 128, (6, 7, 3)),
    ((4, 64), 256, (4, 64)), ((4, 64), 1024, (4, 64))])
def test_group_tile_never_straddles_an_axis_it_cannot_fill(sizes, g, tile):
  got = group_tile(sizes, g)
  assert got == tile
  assert int(np.prod(got)) <= g  # at most g elements per group


@pytest.mark.parametrize("spec,layout,shape,tile", [
    (jq.W8A16, QKV, (256, 4, 64), (256, 1, 1)),
    (jq.W4A16_G128, QKV, (256, 4, 64), (128, 1, 1)),
    (jq.W8A16, O, (4, 64, 256), (4, 64, 1)),
    (jq.W4A16_G128, O, (4, 64, 256), (2, 64, 1)),
    (jq.W4A16_G128, STACK, (3, 576, 64), (1, 128, 1)),
    (QuantSpec(granularity=Granularity.TENSOR), STACK, (3, 8, 8), (1, 8, 8)),
    (jq.W4A16_G128, None, (576, 64), (128, 1)),
])
def test_tiles_follow_the_layout(spec, layout, shape, tile):
  assert spec.tile(shape, layout=layout) == tile
  assert spec.admits_tile(shape, tile)


def test_heads_of_different_scale_get_equal_sqnr():
  w = np.asarray(jax.random.normal(jax.random.key(0), (256, 4, 64)))
  w = w * np.array([1.0, 10.0, 100.0, 0.01])[None, :, None]
  for spec in (jq.W8A16, jq.W4A16_G128):
    q = jq.quantize(jnp.asarray(w), spec, layout=QKV)
    d = np.asarray(q.dequantize())
    sq = [float(jq.sqnr(w[:, h], d[:, h])) for h in range(4)]
    assert max(sq) - min(sq) < 1.0, sq


def test_rank3_kernel_without_layout_is_an_error_naming_path_and_shape():
  with pytest.raises(ValueError, match=r"h_0/attn/q/kernel: shape \(256, 4, 64\).*layout"):
    jq.quantize_tree({"h_0": {"attn": {"q": {"kernel": jnp.ones((256, 4, 64))}}}},
                     jq.default_rules(jq.W8A16))


@pytest.mark.parametrize("spec,match", [
    (QuantSpec(channel_axes=(0,)), "contracting axis"),
    (QuantSpec(channel_axes=(-1,)), r"share one scale across output/stacked axes \[1\]"),
    (dataclasses.replace(jq.W4A16_G128, group_axis=1), "also a channel axis"),
])
def test_spec_axes_that_disagree_with_the_layer_are_refused(spec, match):
  with pytest.raises(ValueError, match=r"k: shape \(256, 4, 64\).*" + match):
    spec.tile((256, 4, 64), layout=QKV, name="k")


def test_a_missing_layout_entry_is_an_error_when_layouts_are_given():
  tree = {"a": {"kernel": jnp.ones((8, 4))}, "b": {"kernel": jnp.ones((8, 4))}}
  lays = {"a/kernel": jq.layout.dense_layout()}
  with pytest.raises(ValueError, match="b/kernel.*no layer that jq runs quantized"):
    jq.quantize_tree(tree, jq.default_rules(jq.W8A16), layouts=lays)


def test_layer_view_of_a_scan_slice():
  w = jax.random.normal(jax.random.key(1), (3, 256, 64))
  q = jq.quantize(w, jq.W4A16_G128, layout=STACK)
  sliced = jax.tree_util.tree_map(lambda a: a[1], q)   # what nn.scan hands one layer
  view = layer_view(sliced, (256, 64))
  assert view.shape == (256, 64) and view.tile == (128, 1)
  np.testing.assert_array_equal(view.dequantize(), q.dequantize()[1])


def test_layout_json_roundtrip_of_specs_without_axes():
  from jq import spec_json
  spec = jq.W4A16_G128
  assert spec.channel_axes is None and spec.group_axis is None
  back = spec_json.spec_from_json(spec_json.spec_to_json(spec))
  assert back == spec
