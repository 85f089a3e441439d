"""jq.io.load / load_orbax with ``shardings=``: arrays land in their shardings, bit for bit.

The mesh checks run in a subprocess with ``--xla_force_host_platform_device_count=8`` (a 2x4
``("data", "model")`` mesh), so the rest of the suite keeps one device; error paths and the
single-device forms run here.
"""
from __future__ import annotations

import dataclasses
import pathlib
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding

import jq
from jq import sharding as S
from jq.io import CheckpointError

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import spawn  # noqa: E402  pylint: disable=wrong-import-position

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _params():
  rng = np.random.default_rng(0)
  w = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  params = {"params": {"dense": {"kernel": w(256, 64), "bias": w(64)},
                       "proj": {"kernel": w(128, 32)}, "norms": [w(8), w(8)]},
            "meta": {"step": 3, "ids": np.arange(4, dtype=np.int32)}}
  rules = (jq.Rule(pattern="proj/kernel$", weight=jq.W8A16), *jq.default_rules(jq.W4A16_G128))
  return jq.quantize_tree(params, rules)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  d = tmp_path_factory.mktemp("sharded")
  q = _params()
  jq.io.save(d / "q.safetensors", q)
  jq.io.save_orbax(d / "orbax", q)
  return q, d / "q.safetensors", d / "orbax"


def _same(a, b):
  """Same tree, same leaf kinds (jax / numpy / python), bit-identical values."""
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    assert isinstance(x, jax.Array) == isinstance(y, jax.Array) and type(x) is type(y) or (
        isinstance(x, jax.Array) and isinstance(y, jax.Array))
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


ONE = SingleDeviceSharding(jax.devices()[0])


@pytest.mark.parametrize("fmt", ["safetensors", "orbax"])
def test_single_device_shardings_load_the_same_tree(saved, fmt):
  q, path, directory = saved
  load = (lambda **kw: jq.io.load(path, **kw)) if fmt == "safetensors" else (
      lambda **kw: jq.io.load_orbax(directory, **kw))
  plain = load()
  _same(plain, q)
  mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
  float_sh = {"params": {"dense": {"kernel": NamedSharding(mesh, P("data", "model")),
                                   "bias": ONE},
                         "proj": {"kernel": ONE}, "norms": [ONE, ONE]},
              "meta": {"step": ONE, "ids": ONE}}
  for shardings in (ONE, {"params": ONE, "meta": ONE}, float_sh, S.shardings(q, float_sh)):
    got = load(shardings=shardings)
    _same(got, q)
    assert isinstance(got["meta"]["ids"], np.ndarray) and got["meta"]["step"] == 3
  k = load(shardings=float_sh)["params"]["dense"]["kernel"]
  assert k.values.sharding.spec == P("data", "model") and k.scale.sharding.spec == P(None, "model")


@pytest.mark.parametrize("fmt", ["safetensors", "orbax"])
def test_shardings_tree_that_differs_names_the_path(saved, fmt):
  q, path, directory = saved
  load = (lambda s: jq.io.load(path, shardings=s)) if fmt == "safetensors" else (
      lambda s: jq.io.load_orbax(directory, shardings=s))
  full = jax.tree.map(lambda _: ONE, q)
  kernel = full["params"]["dense"]["kernel"]
  cases = {
      "params/proj/kernel: the checkpoint has a leaf here": {
          "params": {"dense": ONE, "norms": ONE}, "meta": ONE},
      "params/extra: the shardings tree has an entry here": {
          "params": {**full["params"], "extra": ONE}, "meta": ONE},
      "params/dense/bias: the shardings tree has a QArray here": {
          "params": {**full["params"], "dense": {**full["params"]["dense"],
                                                 "bias": full["params"]["proj"]["kernel"]}},
          "meta": ONE},
      "params/dense/kernel: the shardings tree has a QArray(qtype=int8": {
          "params": {**full["params"], "dense": {**full["params"]["dense"],
                                                 "kernel": full["params"]["proj"]["kernel"]}},
          "meta": ONE},
      "params/dense/kernel: the shardings tree gives QArray fields": {
          "params": {**full["params"], "dense": {**full["params"]["dense"], "kernel":
                                                 dataclasses.replace(kernel, zero_point=None)}},
          "meta": ONE},
      "params/dense/bias: the abstract tree says shape (63,)": {
          "params": {**full["params"], "dense": {**full["params"]["dense"], "bias":
                                                 jax.ShapeDtypeStruct((63,), jnp.float32,
                                                                      sharding=ONE)}},
          "meta": ONE},
      "meta: the checkpoint has a subtree here": {
          "params": ONE, "meta": jax.ShapeDtypeStruct((), jnp.int32, sharding=ONE)},
      "params/norms: the shardings tree has PyTreeDef((*, *)) here": {  # a tuple for a list
          "params": {**full["params"], "norms": (ONE, ONE)}, "meta": ONE},
  }
  for match, shardings in cases.items():
    with pytest.raises(CheckpointError, match=re.escape(match)):
      load(shardings)


def test_sharded_load_still_checks_crc(saved, tmp_path):
  _, path, _ = saved
  data = bytearray(path.read_bytes())
  data[-1] ^= 0xFF  # the last tensor's last byte
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(bytes(data))
  with pytest.raises(CheckpointError, match="CRC-32"):
    jq.io.load(bad, shardings=ONE)
  jq.io.load(bad, shardings=ONE, verify=False)  # the layout itself is intact


SCRIPT = textwrap.dedent(r'''
import os, sys
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding

import jq
from jq import sharding as S
from jq.layout import Layout

assert jax.device_count() == 8, jax.devices()
jax.config.update("jax_numpy_dtype_promotion", "strict")
tmp = sys.argv[1]
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
rng = np.random.default_rng(0)
w = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
params = {"params": {
    "dense": {"kernel": w(256, 512), "bias": w(512)},   # int4, groups of 128, zero points
    "proj": {"kernel": w(256, 128)},                     # int8 per-channel, static activations
    "stack": {"kernel": w(4, 256, 128)},                 # stacked layers: tile (1, 128, 1)
}, "meta": {"step": 3}}
rules = (jq.Rule(pattern="proj/kernel$", weight=jq.W8A16, activation=jq.A8_STATIC),
         *jq.default_rules(jq.W4A16_G128))
layouts = {"params/dense/kernel": Layout(contracting=(0,), channels=(1,)),
           "params/proj/kernel": Layout(contracting=(0,), channels=(1,)),
           "params/stack/kernel": Layout(contracting=(1,), channels=(2,), batch=(0,))}
q = jq.quantize_tree(params, rules, layouts=layouts,
                     act_scales={"params/proj/kernel": (0.05, None)})
assert q["params"]["stack"]["kernel"].tile == (1, 128, 1)
jq.io.save(f"{tmp}/q.safetensors", q)
jq.io.save_orbax(f"{tmp}/orbax", q)

ns = lambda *spec: NamedSharding(mesh, P(*spec))
float_sh = {"params": {"dense": {"kernel": ns("data", "model"), "bias": ns("model")},
                       "proj": {"kernel": ns("data", "model")},
                       "stack": {"kernel": ns(None, "data", "model")}},
            "meta": {"step": ns()}}
expanded = S.shardings(q, float_sh)
abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        jax.eval_shape(lambda: q), expanded)
expect = {  # (values, scale, zero_point, activation scale)
    "dense": (P("data", "model"), P(None, "model"), P(None, "model"), None),
    "proj": (P("data", "model"), P(None, "model"), None, P()),
    "stack": (P(None, "data", "model"), P(None, None, "model"), P(None, None, "model"), None),
}
fields = lambda k: (k.values, k.scale, k.zero_point,
                    None if k.activation is None else k.activation.scale)

def check(got, how):
  assert jax.tree.structure(got) == jax.tree.structure(q), how
  assert got["meta"]["step"] == 3
  bias = got["params"]["dense"]["bias"]
  assert bias.sharding == ns("model"), (how, bias.sharding)
  np.testing.assert_array_equal(np.asarray(bias), np.asarray(q["params"]["dense"]["bias"]))
  n = 1
  for name, want in expect.items():
    k, ref = got["params"][name]["kernel"], q["params"][name]["kernel"]
    for field, rfield, spec in zip(fields(k), fields(ref), want):
      assert (field is None) == (spec is None), (how, name, spec)
      if field is not None:
        assert field.sharding == ns(*spec), (how, name, field.sharding, spec)
        np.testing.assert_array_equal(np.asarray(field), np.asarray(rfield))
        n += 1
  # each device holds only its block
  shards = {s.data.shape for s in got["params"]["dense"]["kernel"].values.addressable_shards}
  assert shards == {(128, 64)}, (how, shards)
  shards = {s.data.shape for s in got["params"]["stack"]["kernel"].scale.addressable_shards}
  assert shards == {(4, 2, 32)}, (how, shards)
  return n

checked = 0
for how, shardings in (("expanded", expanded), ("prefix", float_sh), ("abstract", abstract)):
  checked += check(jq.io.load(f"{tmp}/q.safetensors", shardings=shardings), "safetensors " + how)
for how, shardings in (("expanded", expanded), ("prefix", float_sh)):
  checked += check(jq.io.load_orbax(f"{tmp}/orbax", shardings=shardings), "orbax " + how)

# without shardings: unchanged, every array on the default device
one = SingleDeviceSharding(jax.devices()[0])
for got in (jq.io.load(f"{tmp}/q.safetensors"), jq.io.load_orbax(f"{tmp}/orbax")):
  la, lb = jax.tree.leaves(got), jax.tree.leaves(q)
  assert jax.tree.structure(got) == jax.tree.structure(q) and len(la) == len(lb)
  for a, b in zip(la, lb):
    if isinstance(a, jax.Array):
      assert a.sharding == one, a.sharding
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
print("LOAD-OK", checked)
''')


def test_sharded_load_on_a_2x4_mesh(tmp_path):
  proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, env=spawn.env(8),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and "LOAD-OK 50" in proc.stdout, (
      f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}")
