"""jq.sharding: a QArray's field specs follow its float kernel's PartitionSpec.

Spec arithmetic runs on one device (an AbstractMesh stands for the 2x4 mesh); the end-to-end check
(``quantize_tree`` under jit with ``out_shardings=shardings(...)``) runs in a subprocess with
``--xla_force_host_platform_device_count=8``, so the rest of the suite keeps one device.
"""
from __future__ import annotations

import dataclasses
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding

import jq
from jq import sharding as S
from jq.layout import Layout
from jq.qarray import ActivationQuant, QArray

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import spawn  # noqa: E402  pylint: disable=wrong-import-position

ROOT = pathlib.Path(__file__).resolve().parents[2]
MESH = AbstractMesh((2, 4), ("data", "model"))
STACKED = Layout(contracting=(1,), channels=(2,), batch=(0,))


def _w(*shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _quant(w, spec, layout=None):
  return jq.quantize(w, spec, layout=layout)


def _specs(q: QArray):
  act = q.activation
  return (q.values, q.scale, q.zero_point, None if act is None else (act.scale, act.zero_point))


def test_int4_groups_scale_replicated_on_grouped_axis():
  q = _quant(_w(256, 512), jq.W4A16_G128)
  assert q.tile == (128, 1) and q.zero_point is not None
  s = S.qarray_partition_spec(q, P("data", "model"))
  assert _specs(s) == (P("data", "model"), P(None, "model"), P(None, "model"), None)
  assert (s.qtype, s.shape, s.tile) == (q.qtype, q.shape, q.tile)
  # the mesh divides every dimension here: nothing changes
  assert S.qarray_partition_spec(q, P("data", "model"), mesh=MESH) == s


def test_packed_last_axis_that_no_longer_divides_is_replicated():
  q = _quant(_w(256, 12), jq.W4A16_G128)  # 12 int4 -> 6 bytes; 6 % 4 != 0
  assert q.values.shape == (256, 6)
  free = S.qarray_partition_spec(q, P("data", "model"))
  assert free.values == P("data", "model")
  fit = S.qarray_partition_spec(q, P("data", "model"), mesh=MESH)
  assert fit.values == P("data", None)
  assert fit.scale == fit.zero_point == P(None, "model")  # scale keeps 12 channels: 12 % 4 == 0


def test_int2_packs_four_per_byte():
  q = _quant(_w(64, 8), jq.W2A16_G32)  # 8 int2 -> 2 bytes: "model" (4) no longer divides
  assert q.values.shape == (64, 2)
  s = S.qarray_partition_spec(q, P("data", "model"), mesh=MESH)
  assert (s.values, s.scale) == (P("data", None), P(None, "model"))


def test_int3_splits_only_on_whole_units_of_three_bytes():
  """12 int3 -> 2 units of 3 bytes: 6 bytes would split over 3 devices, but a byte boundary inside
  a unit is not a value boundary; 24 -> 3 units split over 3 and 64 -> 8 units over 4."""
  mesh = AbstractMesh((3, 4), ("three", "model"))
  q = _quant(_w(64, 12), jq.W3A16_G128)
  assert q.values.shape == (64, 6)
  assert S.qarray_partition_spec(q, P(None, "three"), mesh=mesh).values == P(None, None)
  q = _quant(_w(64, 24), jq.W3A16_G128)
  assert S.qarray_partition_spec(q, P(None, "three"), mesh=mesh).values == P(None, "three")
  q = _quant(_w(64, 64), jq.W3A16_G128)
  assert q.values.shape == (64, 24)
  assert S.qarray_partition_spec(q, P(None, "model"), mesh=mesh).values == P(None, "model")


def test_per_channel_tuple_entries_and_short_specs():
  q = _quant(_w(256, 64), jq.W8A16)
  assert q.tile == (256, 1) and q.zero_point is None
  s = S.qarray_partition_spec(q, P(("data", "model"), None), mesh=MESH)
  assert _specs(s) == (P(("data", "model"), None), P(None, None), None, None)
  s = S.qarray_partition_spec(q, P("data"))  # shorter specs stay short (trailing Nones)
  assert (s.values, s.scale) == (P("data"), P(None))
  s = S.qarray_partition_spec(q, P(None, ("data", "model")), mesh=MESH)
  assert (s.values, s.scale) == (P(None, ("data", "model")), P(None, ("data", "model")))
  assert S.qarray_partition_spec(q, P()).values == P()


def test_stacked_kernel_keeps_layer_axis_on_scales():
  q = _quant(_w(4, 256, 128), jq.W4A16_G128, STACKED)
  assert q.tile == (1, 128, 1) and q.scale.shape == (4, 2, 128)
  s = S.qarray_partition_spec(q, P("stage", "data", "model"))
  assert _specs(s) == (P("stage", "data", "model"), P("stage", None, "model"),
                       P("stage", None, "model"), None)
  s = S.qarray_partition_spec(q, P(None, "data", "model"), mesh=MESH)
  assert (s.values, s.scale) == (P(None, "data", "model"), P(None, None, "model"))


def test_activation_scales_are_replicated():
  q = _quant(_w(64, 32), jq.W8A16)
  spec = jq.ActivationSpec(mode=jq.ActMode.STATIC)
  static = dataclasses.replace(q, activation=ActivationQuant(
      jnp.ones((), jnp.float32), jnp.zeros((), jnp.int8), spec))
  s = S.qarray_partition_spec(static, P(None, "model"))
  assert s.activation.scale == s.activation.zero_point == P()
  assert s.activation.spec == static.activation.spec
  dynamic = dataclasses.replace(q, activation=ActivationQuant(None, None, jq.A8_DYNAMIC))
  s = S.qarray_partition_spec(dynamic, P(None, "model"))
  assert s.activation.scale is None and s.activation.zero_point is None


def test_bad_specs_raise():
  q = _quant(_w(64, 32), jq.W8A16)
  with pytest.raises(ValueError, match="3 entries for 2 axes"):
    S.qarray_partition_spec(q, P("a", "b", "c"))
  with pytest.raises(ValueError, match="'expert'"):
    S.qarray_partition_spec(q, P("expert"), mesh=MESH)


def _tree():
  return {"dense": {"kernel": _quant(_w(256, 64), jq.W4A16_G128), "bias": _w(64)},
          "norm": {"scale": _w(64)}, "extra": None}


def test_partition_specs_maps_a_tree_and_keeps_other_specs():
  float_specs = {"dense": {"kernel": P("data", "model"), "bias": P("model")},
                 "norm": {"scale": P()}, "extra": None}
  specs = S.partition_specs(_tree(), float_specs, mesh=MESH)
  k = specs["dense"]["kernel"]
  assert isinstance(k, QArray) and _specs(k) == (P("data", "model"), P(None, "model"),
                                                 P(None, "model"), None)
  assert specs["dense"]["bias"] == P("model") and specs["norm"]["scale"] == P()
  assert specs["extra"] is None
  # jax.eval_shape output works the same (only static metadata is read)
  abstract = jax.eval_shape(_tree)
  assert S.partition_specs(abstract, float_specs, mesh=MESH) == specs
  with pytest.raises(TypeError, match="dense/kernel"):
    S.partition_specs(_tree(), {**float_specs, "dense": {"kernel": "data", "bias": P()}})


def test_named_shardings_in_named_shardings_out():
  mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
  ns = lambda *spec: NamedSharding(mesh, P(*spec))
  float_sh = {"dense": {"kernel": ns("data", "model"), "bias": ns("model")},
              "norm": {"scale": ns()}, "extra": None}
  for fn in (S.shardings, S.partition_specs):
    out = fn(_tree(), float_sh)
    k = out["dense"]["kernel"]
    assert k.values == ns("data", "model") and k.scale == k.zero_point == ns(None, "model")
    assert out["dense"]["bias"] == ns("model")
  # a fully replicated sharding (one device) is used for every field
  one = SingleDeviceSharding(jax.devices()[0])
  out = S.shardings(_tree(), jax.tree.map(lambda _: one, float_sh))
  assert out["dense"]["kernel"].values == out["dense"]["kernel"].zero_point == one
  with pytest.raises(TypeError, match="partition_specs"):
    S.shardings(_tree(), {**float_sh, "norm": {"scale": P()}})
  # the spec tree drives jit directly
  f = jax.jit(lambda t: t, out_shardings=S.shardings(_tree(), float_sh))
  got = f(_tree())["dense"]["kernel"]
  assert got.scale.sharding.spec == P(None, "model")


def test_unbox_specs_reads_partitioned_boxes():
  nn = pytest.importorskip("flax.linen")
  q = _quant(_w(4, 256, 128), jq.W4A16_G128, STACKED)
  boxed = {"params": {
      "stack": {"kernel": nn.Partitioned(q, names=("layers", "embed", "mlp"))},
      "dense": {"kernel": nn.LogicallyPartitioned(_w(8, 16), names=("embed", "mlp")),
                "bias": _w(16)}}}
  unboxed, specs = S.unbox_specs(boxed)
  assert unboxed["params"]["stack"]["kernel"] is q
  assert isinstance(unboxed["params"]["dense"]["kernel"], jax.Array)
  s = specs["params"]["stack"]["kernel"]
  assert _specs(s) == (P("layers", "embed", "mlp"), P("layers", None, "mlp"),
                       P("layers", None, "mlp"), None)
  assert specs["params"]["dense"]["kernel"] == P("embed", "mlp")
  assert specs["params"]["dense"]["bias"] == P()
  # the unboxed tree and the spec tree line up leaf for leaf
  is_p = lambda x: isinstance(x, P)
  assert (jax.tree.structure(unboxed) ==
          jax.tree.structure(jax.tree.map(lambda _: 0, specs, is_leaf=is_p)))
  # logical names map to mesh axes with flax's own helper, QArray specs included
  mesh_specs = nn.logical_to_mesh(specs, (("layers", None), ("embed", "data"), ("mlp", "model")))
  assert mesh_specs["params"]["stack"]["kernel"].scale == P(None, None, "model")


SCRIPT = textwrap.dedent(r'''
import os
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jq
from jq import sharding as S
from jq.layout import Layout
from jq.qarray import QArray

assert jax.device_count() == 8, jax.devices()
jax.config.update("jax_numpy_dtype_promotion", "strict")
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
rng = np.random.default_rng(0)
w = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
params = {"params": {
    "dense": {"kernel": w(256, 512), "bias": w(512)},   # int4, groups of 128, zero points
    "proj": {"kernel": w(256, 128)},                     # int8 per-channel, static activations
    "stack": {"kernel": w(4, 256, 128)},                 # stacked layers: tile (1, 128, 1)
    "small": {"kernel": w(256, 12)},                     # int4: 6 packed bytes do not split 4 ways
}}
rules = (jq.Rule(pattern="proj/kernel$", weight=jq.W8A16, activation=jq.A8_STATIC),
         *jq.default_rules(jq.W4A16_G128))
layouts = {"params/dense/kernel": Layout(contracting=(0,), channels=(1,)),
           "params/proj/kernel": Layout(contracting=(0,), channels=(1,)),
           "params/small/kernel": Layout(contracting=(0,), channels=(1,)),
           "params/stack/kernel": Layout(contracting=(1,), channels=(2,), batch=(0,))}
quantize = lambda p: jq.quantize_tree(p, rules, layouts=layouts,
                                      act_scales={"params/proj/kernel": (0.05, None)})
ns = lambda *spec: NamedSharding(mesh, P(*spec))
float_sh = {"params": {"dense": {"kernel": ns("data", "model"), "bias": ns("model")},
                       "proj": {"kernel": ns("data", "model")},
                       "stack": {"kernel": ns(None, "data", "model")},
                       "small": {"kernel": ns("data", "model")}}}
out_sh = S.shardings(jax.eval_shape(quantize, params), float_sh)
sharded = jax.device_put(params, float_sh)
got = jax.jit(quantize, in_shardings=(float_sh,), out_shardings=out_sh)(sharded)
ref = jax.jit(quantize)(params)  # one device

expect = {  # (values, scale, zero_point, activation scale)
    "dense": (P("data", "model"), P(None, "model"), P(None, "model"), None),
    "proj": (P("data", "model"), P(None, "model"), None, P()),
    "stack": (P(None, "data", "model"), P(None, None, "model"), P(None, None, "model"), None),
    "small": (P("data", None), P(None, "model"), P(None, "model"), None),
}
checked = 0
for name, want in expect.items():
  q, r = got["params"][name]["kernel"], ref["params"][name]["kernel"]
  assert isinstance(q, QArray), (name, q)
  fields = (q.values, q.scale, q.zero_point, None if q.activation is None else q.activation.scale)
  refs = (r.values, r.scale, r.zero_point, None if r.activation is None else r.activation.scale)
  for field, rfield, spec in zip(fields, refs, want):
    assert (field is None) == (spec is None), (name, spec)
    if field is None:
      continue
    assert field.sharding.mesh == mesh and field.sharding.spec == spec, (name, field.sharding, spec)
    np.testing.assert_array_equal(np.asarray(field), np.asarray(rfield))
    checked += 1
# each device holds only its block of the packed values
v = got["params"]["dense"]["kernel"].values
assert v.shape == (256, 256) and {s.data.shape for s in v.addressable_shards} == {(128, 64)}
assert got["params"]["dense"]["bias"].sharding.spec == P("model")
print("SPECS-OK", checked)
''')


def test_quantize_tree_under_jit_with_derived_out_shardings():
  proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=spawn.env(8),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and "SPECS-OK 12" in proc.stdout, (
      f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}")
