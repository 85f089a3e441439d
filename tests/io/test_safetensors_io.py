"""jq's native safetensors checkpoints: exact round trips, header schema, corruption, atomicity."""
from __future__ import annotations

import dataclasses
import json
import os
import struct

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jq
import jq.io
from jq.io import CheckpointError, safetensors_io
from jq.qarray import ActivationQuant, QArray
from jq.qtypes import QType
from jq.spec import (A8_DYNAMIC, A8_STATIC, ActivationSpec, ActMode, Granularity, QuantSpec, Rule,
                     default_rules)
from jq.tree import is_qarray, leaves_with_paths


@pytest.fixture(autouse=True)
def _strict_promotion():
  with jax.numpy_dtype_promotion("strict"):
    yield


def _w(seed: int, shape, dtype=np.float32) -> jax.Array:
  """A random float array, made in numpy (no per-shape XLA compiles: tests stay fast)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(dtype))


def _q(seed: int, shape, spec: QuantSpec) -> QArray:
  """A valid QArray with random packed values, scales and zero points (checkpoints do not care
  how the numbers were chosen; building them in numpy keeps the tests fast)."""
  rng = np.random.default_rng(seed)
  qt, tile = spec.qtype, spec.tile(shape)
  codes = rng.integers(qt.qmin, qt.qmax, tuple(shape), endpoint=True).astype(qt.unpacked_dtype)
  values = np.asarray(jq.numerics.pack(jnp.asarray(codes), qt))   # codes within the qtype's range
  tiles = jq.numerics.num_tiles(shape, tile)
  scale = rng.uniform(0.01, 1.0, tiles).astype(jnp.dtype(spec.scale_dtype))
  zp = None if spec.symmetric else rng.integers(qt.qmin, qt.qmax, tiles, endpoint=True).astype(
      qt.unpacked_dtype)
  return QArray(values=jnp.asarray(values), scale=jnp.asarray(scale),
                zero_point=None if zp is None else jnp.asarray(zp), activation=None, qtype=qt,
                shape=tuple(shape), tile=tile).validate()


SPECS = [  # (name, spec): every qtype, sym and asym, all granularities, bf16 scales
    ("int8_sym_channel", QuantSpec(qtype=QType.INT8)),
    ("int8_asym_tensor", QuantSpec(qtype=QType.INT8, symmetric=False,
                                   granularity=Granularity.TENSOR)),
    ("uint8_asym_channel", QuantSpec(qtype=QType.UINT8, symmetric=False)),
    ("int4_sym_g16", QuantSpec(qtype=QType.INT4, granularity=Granularity.GROUP, group_size=16)),
    ("uint4_asym_g24", QuantSpec(qtype=QType.UINT4, symmetric=False, granularity=Granularity.GROUP,
                                 group_size=24)),  # partial last group
    ("int3_sym_g16", QuantSpec(qtype=QType.INT3, granularity=Granularity.GROUP, group_size=16)),
    ("uint3_asym_channel", QuantSpec(qtype=QType.UINT3, symmetric=False)),
    ("int2_sym_channel", QuantSpec(qtype=QType.INT2)),
    ("uint2_asym_g8", QuantSpec(qtype=QType.UINT2, symmetric=False, granularity=Granularity.GROUP,
                                group_size=8)),
    ("nf4_g16_bf16", QuantSpec(qtype=QType.NF4, granularity=Granularity.GROUP, group_size=16,
                               scale_dtype="bfloat16")),
]


def mixed_tree() -> dict:
  """Every qtype, static/dynamic activations, bf16/f16/int/bool leaves, numpy and python leaves,
  lists, tuples, None and int dict keys."""
  layers = {}
  for i, (name, spec) in enumerate(SPECS):
    layers[name] = {"kernel": _q(i, (40, 13), spec), "bias": _w(100 + i, (13,))}
  q8 = _q(50, (24, 16), QuantSpec(qtype=QType.INT8))
  layers["a8_static"] = {"kernel": dataclasses.replace(q8, activation=ActivationQuant(
      scale=jnp.float32(0.02), zero_point=None, spec=A8_STATIC))}
  layers["a8_static_asym"] = {"kernel": dataclasses.replace(q8, activation=ActivationQuant(
      scale=jnp.float32(0.03), zero_point=jnp.uint8(128),
      spec=ActivationSpec(mode=ActMode.STATIC, qtype=QType.UINT8, symmetric=False)))}
  layers["a8_dynamic"] = {"kernel": dataclasses.replace(q8, activation=ActivationQuant(
      scale=None, zero_point=None, spec=A8_DYNAMIC))}
  return {"params": {
      "embed": {"embedding": _w(7, (11, 16), ml_dtypes.bfloat16)},
      "norm": {"scale": _w(8, (16,), np.float16)},
      "layers": layers,
      "stack": [_w(9, (3,)), (jnp.arange(5, dtype=jnp.int32), None)],
      "by_index": {0: jnp.array([True, False]), 1: np.arange(4, dtype=np.int64)},
      "fp8": jnp.arange(4, dtype=jnp.float32).astype(jnp.float8_e4m3fn),
  }, "step": 12, "lr": 0.5, "name": "toy", "flag": True, "np_scalar": np.float32(1.5)}


def assert_identical(a, b) -> None:
  """Same treedef (incl. QArray static fields), same leaf types, dtypes and bits."""
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    assert type(x) is type(y) or (isinstance(x, jax.Array) and isinstance(y, jax.Array))
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
      assert x.dtype == y.dtype and x.shape == y.shape
      assert np.array_equal(np.asarray(x).reshape(-1).view(np.uint8),
                            np.asarray(y).reshape(-1).view(np.uint8))
    else:
      assert x == y


def _read_raw(path):
  data = open(path, "rb").read()
  (n,) = struct.unpack("<Q", data[:8])
  return json.loads(data[8:8 + n]), data[8 + n:]


def _write_raw(path, header: dict, body: bytes) -> None:
  raw = json.dumps(header).encode()
  raw += b" " * (-(8 + len(raw)) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)) + raw + body)


def _edit_jq(path, fn) -> None:
  """Applies ``fn`` to the jq header of the file in place (tensor bytes unchanged)."""
  st_header, body = _read_raw(path)
  h = json.loads(st_header["__metadata__"]["jq"])
  fn(h)
  st_header["__metadata__"]["jq"] = json.dumps(h)
  _write_raw(path, st_header, body)


# ---- round trips --------------------------------------------------------------------------------


def test_roundtrip_mixed_tree_bit_exact(tmp_path):
  tree = mixed_tree()
  path = tmp_path / "m.safetensors"
  jq.io.save(path, tree, metadata={"model": "toy", "recipe": "mixed"})
  out = jq.io.load(path)
  assert_identical(tree, out)
  assert isinstance(out["params"]["by_index"][1], np.ndarray)
  assert isinstance(out["np_scalar"], np.float32)
  assert isinstance(out["params"]["stack"][1], tuple)
  for path_, leaf in leaves_with_paths(out):
    if is_qarray(leaf):
      leaf.validate(path_)


@pytest.mark.parametrize("name,spec", SPECS, ids=[s[0] for s in SPECS])
def test_each_qtype_names_and_header(tmp_path, name, spec):
  q = _q(3, (40, 13), spec)
  tree = {"params": {"proj": {"kernel": q}}}
  path = tmp_path / f"{name}.safetensors"
  rules = [Rule(pattern=r"kernel$", weight=spec)]
  jq.io.save(path, tree, rules=rules)
  assert_identical(tree, jq.io.load(path))
  infos, _ = safetensors_io.read_safetensors_header(path)
  base = "params/proj/kernel"
  want = {f"{base}.values", f"{base}.scale"}
  want |= set() if spec.symmetric else {f"{base}.zero_point"}
  assert set(infos) == want
  qt = spec.qtype   # 13 values: 13 bytes (8-bit), 7 (4-bit), 4 (2-bit), 2 units of 3 (3-bit)
  assert infos[f"{base}.values"].shape == (40, {8: 13, 4: 7, 2: 4, 3: 6}[qt.bits])
  header = jq.io.load_header(path)
  assert header["version"] == (2 if qt.bits == 3 else 1)   # 1: older jq releases read it too
  leaf = header["leaves"][base]
  assert leaf["qtype"] == spec.qtype.value
  assert leaf["shape"] == [40, 13] and tuple(leaf["tile"]) == q.tile
  assert leaf["symmetric"] == spec.symmetric and leaf["scale_dtype"] == spec.scale_dtype
  assert leaf["rule"] == {"index": 0, "pattern": r"kernel$", "describe": rules[0].describe()}
  assert leaf["granularity"] == jq.io.describe_granularity((40, 13), q.tile)


def test_header_records_rules_metadata_and_activation(tmp_path):
  params = {"params": {"embed": {"embedding": _w(0, (10, 16))},
                       "dense": {"kernel": _w(1, (16, 8)),
                                 "bias": _w(2, (8,), ml_dtypes.bfloat16)}}}
  rules = default_rules(jq.W8A16, A8_STATIC)
  qp = jq.quantize_tree(params, rules, act_scales={"params/dense/kernel": (0.05, None)})
  path = tmp_path / "a.safetensors"
  jq.io.save(path, qp, metadata={"model": "tiny", "recipe": "w8a8-static"}, rules=rules)
  h = jq.io.load_header(path)
  assert h["format"] == "jq" and h["version"] == 1   # no 3-bit values: readable by older jq
  assert h["metadata"] == {"model": "tiny", "recipe": "w8a8-static"}
  assert jq.io.rules_from_header(h) == tuple(rules)
  k = h["leaves"]["params/dense/kernel"]
  assert k["activation"] == {"mode": "static", "qtype": "int8", "symmetric": True}
  assert k["components"] == ["values", "scale", "act_scale"]
  assert k["granularity"] == "per-channel along axis 1"
  assert h["leaves"]["params/dense/bias"]["rule"]["describe"] == "float (skipped)"
  assert h["leaves"]["params/embed/embedding"]["rule"]["pattern"] == "embed"
  assert h["tensors"]["params/dense/bias"]["dtype"] == "bfloat16"
  assert set(h["leaves"]) == {p for p, _ in leaves_with_paths(qp)}
  assert_identical(qp, jq.io.load(path))


def test_files_are_standard_safetensors(tmp_path):
  safetensors = pytest.importorskip("safetensors")
  tree = mixed_tree()
  path = tmp_path / "std.safetensors"
  jq.io.save(path, tree)
  with safetensors.safe_open(str(path), framework="flax") as f:
    emb = f.get_tensor("params/embed/embedding")
    assert emb.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(emb), np.asarray(tree["params"]["embed"]["embedding"]))
    v = f.get_tensor("params/layers/int4_sym_g16/kernel.values")
    want = tree["params"]["layers"]["int4_sym_g16"]["kernel"].values
    np.testing.assert_array_equal(np.asarray(v), np.asarray(want))
    assert "jq" in f.metadata()
  header_len = struct.unpack("<Q", open(path, "rb").read(8))[0]
  assert (8 + header_len) % 8 == 0  # data section 8-byte aligned


def test_nnx_state_roundtrip(tmp_path):
  nnx = pytest.importorskip("flax.nnx")

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.lin = nnx.Linear(32, 16, rngs=rngs)
      self.layers = nnx.List([nnx.Linear(16, 16, rngs=rngs) for _ in range(2)])
      self.bn = nnx.BatchNorm(16, rngs=rngs)

  state = nnx.state(Net(nnx.Rngs(0)))
  q = jq.tree.map_with_paths(
      lambda p, x: _q(len(p), x.shape, jq.W4A16_G32) if p.endswith("kernel") else x, state)
  assert isinstance(q["lin"]["kernel"].get_value(), QArray)
  path = tmp_path / "nnx.safetensors"
  jq.io.save(path, q)
  out = jq.io.load(path)
  assert isinstance(out, nnx.State)
  assert isinstance(out["layers"][0]["kernel"], nnx.Param)
  assert_identical(q, out)


def test_nnx_state_with_rng_streams_roundtrips(tmp_path):
  """An nnx model holding ``nnx.Rngs`` streams (Dropout's) has typed PRNG keys in its state; they
  are saved as their key data and come back as keys of the same implementation."""
  nnx = pytest.importorskip("flax.nnx")

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.fc = nnx.Linear(32, 16, rngs=rngs)
      self.drop = nnx.Dropout(0.1, rngs=rngs)

  rules = jq.recipe_rules("w8a16")
  qm = jq.nn.quantize_module(Net(nnx.Rngs(0, dropout=jax.random.key(7, impl="rbg"))), rules)
  state = nnx.state(qm)
  path = tmp_path / "rngs.safetensors"
  jq.io.save(path, state, rules=rules)
  out = jq.io.load(path)
  keys = [x for x in jax.tree_util.tree_leaves(out)
          if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)]
  want = [x for x in jax.tree_util.tree_leaves(state)
          if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)]
  assert len(keys) == len(want) >= 1
  for a, b in zip(keys, want):
    assert jax.random.key_impl(a) == jax.random.key_impl(b)
    np.testing.assert_array_equal(jax.random.key_data(a), jax.random.key_data(b))
  fresh = jq.nn.quantize_module(Net(nnx.Rngs(1)), out)
  x = jnp.ones((2, 32))
  np.testing.assert_array_equal(np.asarray(fresh.fc(x)), np.asarray(qm.fc(x)))


@hypothesis.settings(max_examples=20, deadline=None,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(rows=st.integers(1, 9), cols=st.integers(1, 11),
                  qtype=st.sampled_from(list(QType)), asym=st.booleans(),
                  group=st.one_of(st.none(), st.integers(1, 6)),
                  scale_dtype=st.sampled_from(["float32", "bfloat16", "float16"]))
def test_property_roundtrip(tmp_path, rows, cols, qtype, asym, group, scale_dtype):
  sym = qtype.symmetric_only or (qtype.signed and not asym)
  gran = Granularity.CHANNEL if group is None else Granularity.GROUP
  spec = QuantSpec(qtype=qtype, symmetric=sym, granularity=gran, group_size=group,
                   scale_dtype=scale_dtype)
  tree = {"w": _q(rows * 31 + cols, (rows, cols), spec)}
  path = tmp_path / "p.safetensors"
  jq.io.save(path, tree)
  assert_identical(tree, jq.io.load(path))


# ---- bad input ----------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
  tree = {"params": {"dense": {"kernel": _q(0, (32, 24), jq.W4A16_G32),
                               "bias": _w(1, (24,), ml_dtypes.bfloat16)}}}
  path = tmp_path / "c.safetensors"
  jq.io.save(path, tree)
  return path, tree


def test_truncated_file(saved):
  path, _ = saved
  data = open(path, "rb").read()
  open(path, "wb").write(data[:-7])
  with pytest.raises(CheckpointError, match=r"truncated.*|.*truncated"):
    jq.io.load(path)
  open(path, "wb").write(data[:40])
  with pytest.raises(CheckpointError, match="truncated"):
    jq.io.load(path)
  open(path, "wb").write(data[:5])
  with pytest.raises(CheckpointError, match="too short"):
    jq.io.load(path)


def test_safetensors_shape_edited(saved):
  path, _ = saved
  st_header, body = _read_raw(path)
  st_header["params/dense/kernel.values"]["shape"] = [12, 32]  # same byte count, wrong shape
  _write_raw(path, st_header, body)
  with pytest.raises(CheckpointError,
                     match=r"params/dense/kernel\.values.*shape \(12, 32\) dtype uint8.*"
                           r"header says shape \(32, 12\)"):
    jq.io.load(path)


def test_safetensors_dtype_edited(saved):
  path, _ = saved
  st_header, body = _read_raw(path)
  st_header["params/dense/kernel.scale"]["dtype"] = "I32"
  _write_raw(path, st_header, body)
  with pytest.raises(CheckpointError, match=r"params/dense/kernel\.scale.*int32.*float32"):
    jq.io.load(path)


def test_jq_header_logical_shape_disagrees(saved):
  path, _ = saved
  _edit_jq(path, lambda h: h["leaves"]["params/dense/kernel"].update(shape=[32, 30]))
  with pytest.raises(CheckpointError, match=r"params/dense/kernel.*values have shape \(32, 12\)"):
    jq.io.load(path)


def test_jq_header_tile_disagrees_with_scale(saved):
  path, _ = saved
  _edit_jq(path, lambda h: h["leaves"]["params/dense/kernel"].update(tile=[16, 1]))
  with pytest.raises(CheckpointError, match=r"params/dense/kernel.*scale has shape \(1, 24\)"):
    jq.io.load(path)


def test_jq_header_qtype_disagrees(saved):
  path, _ = saved
  _edit_jq(path, lambda h: h["leaves"]["params/dense/kernel"].update(qtype="uint2"))
  with pytest.raises(CheckpointError, match=r"params/dense/kernel.*uint2"):
    jq.io.load(path)


def test_missing_scale_tensor(saved):
  path, _ = saved
  st_header, _ = _read_raw(path)
  tensors = safetensors_io.read_tensors(path)
  del tensors["params/dense/kernel.scale"]
  safetensors_io.write_safetensors(path, tensors, st_header["__metadata__"])
  with pytest.raises(CheckpointError, match=r"params/dense/kernel\.scale.*missing"):
    jq.io.load(path)


def test_header_without_scale_component(saved):
  path, _ = saved
  _edit_jq(path, lambda h: h["leaves"]["params/dense/kernel"].update(
      components=["values", "zero_point"]))
  with pytest.raises(CheckpointError, match=r"params/dense/kernel.*no 'scale'"):
    jq.io.load(path)


def test_extra_tensor_rejected(saved):
  path, _ = saved
  st_header, _ = _read_raw(path)
  tensors = safetensors_io.read_tensors(path)
  tensors["params/dense/kernel.act_scale"] = np.float32(1.0).reshape(())
  safetensors_io.write_safetensors(path, tensors, st_header["__metadata__"])
  with pytest.raises(CheckpointError, match=r"kernel\.act_scale.*not described"):
    jq.io.load(path)


def test_corrupt_bytes_fail_crc(saved):
  path, tree = saved
  st_header, _ = _read_raw(path)
  data = bytearray(open(path, "rb").read())
  begin = 8 + struct.unpack("<Q", data[:8])[0]
  begin += st_header["params/dense/kernel.values"]["data_offsets"][0]
  data[begin + 5] ^= 0x40  # any packed uint4 byte is a valid value: only the CRC can tell
  open(path, "wb").write(bytes(data))
  with pytest.raises(CheckpointError, match="CRC-32"):
    jq.io.load(path)
  assert jax.tree_util.tree_structure(jq.io.load(path, verify=False)) == \
      jax.tree_util.tree_structure(tree)


def test_unknown_format_version(saved):
  path, _ = saved
  _edit_jq(path, lambda h: h.update(version=99))
  with pytest.raises(CheckpointError, match="version 99 is newer"):
    jq.io.load(path)
  with pytest.raises(CheckpointError, match="version 99"):
    jq.io.load_header(path)


def test_corrupt_json_header(saved):
  path, _ = saved
  data = bytearray(open(path, "rb").read())
  data[8] = ord("x")
  open(path, "wb").write(bytes(data))
  with pytest.raises(CheckpointError, match="not valid JSON"):
    jq.io.load(path)


def test_plain_safetensors_is_not_a_jq_checkpoint(tmp_path):
  st_numpy = pytest.importorskip("safetensors.numpy")
  path = tmp_path / "plain.safetensors"
  st_numpy.save_file({"model.weight": np.ones((2, 3), np.float32)}, str(path),
                     metadata={"format": "np"})
  with pytest.raises(CheckpointError, match="not a jq checkpoint.*read_tensors"):
    jq.io.load(path)
  with pytest.raises(CheckpointError, match="not a jq checkpoint"):
    jq.io.load_header(path)
  flat = jq.io.read_tensors(path)
  np.testing.assert_array_equal(flat["model.weight"], np.ones((2, 3), np.float32))


def test_read_tensors_bf16_written_by_reference_library(tmp_path):
  st_numpy = pytest.importorskip("safetensors.numpy")
  x = np.arange(6, dtype=np.float32).astype(ml_dtypes.bfloat16).reshape(2, 3)
  path = tmp_path / "bf16.safetensors"
  st_numpy.save_file({"x": x}, str(path))
  got = jq.io.read_tensors(path)["x"]
  assert got.dtype == ml_dtypes.bfloat16 and np.array_equal(got, x)



def test_header_rules_carry_algorithm_options(tmp_path):
  """The header's rules are a valid --rules file, algorithm options included."""
  import json
  from jq import spec_json
  from jq.spec import Algorithm, GPTQOptions
  params = {"params": {"dense": {"kernel": _w(1, (16, 8))}}}
  rules = default_rules(jq.W8A16, algorithm=Algorithm.GPTQ,
                        options=GPTQOptions(act_order=True, damp=0.03))
  qp = jq.quantize_tree(params, default_rules(jq.W8A16))   # same grid; GPTQ's rounding is data
  path = tmp_path / "g.safetensors"
  jq.io.save(path, qp, rules=rules)
  h = jq.io.load_header(path)
  assert h["rules"][-1]["options"] == {"act_order": True, "damp": 0.03, "block_size": 128,
                                       "first_token_weight": 16.0}
  assert jq.io.rules_from_header(h) == tuple(rules)
  assert spec_json.rules_from_json(json.dumps(h["rules"])) == tuple(rules)
  bad = dict(h, rules=h["rules"][:-1] + [dict(h["rules"][-1], options={"act_order": "yes"})])
  with pytest.raises(CheckpointError, match=r"header rules\[\d+\]\.options\.act_order"):
    jq.io.rules_from_header(bad)

# ---- bad trees on save --------------------------------------------------------------------------


def test_save_rejects_rules_that_disagree(tmp_path):
  tree = {"dense": {"kernel": _q(0, (16, 8), jq.W8A16)}}
  with pytest.raises(CheckpointError, match=r"dense/kernel: shape \(16, 8\).*int4.*int8"):
    jq.io.save(tmp_path / "x.safetensors", tree,
               rules=[Rule(pattern="kernel", weight=QuantSpec(qtype=QType.INT4))])
  with pytest.raises(CheckpointError, match="not a QArray"):
    jq.io.save(tmp_path / "x.safetensors", {"dense": {"bias": _w(0, (8,))}},
               rules=[Rule(pattern="bias", weight=jq.W8A16)])
  assert not (tmp_path / "x.safetensors").exists()
  # a float kernel under a quantizing rule (jq kept its layer float): saved, and the header says so
  jq.io.save(tmp_path / "k.safetensors", {"dense": {"kernel": _w(0, (16, 8))}},
             rules=[Rule(pattern="kernel", weight=jq.W8A16)])
  leaf = jq.io.load_header(tmp_path / "k.safetensors")["leaves"]["dense/kernel"]
  assert leaf["rule"]["applied"] is False


def test_save_rejects_unsupported_trees(tmp_path):
  p = tmp_path / "x.safetensors"
  with pytest.raises(CheckpointError, match="occurs twice|used twice"):
    jq.io.save(p, {"a/b": jnp.ones(2), "a": {"b": jnp.ones(2)}})
  with pytest.raises(CheckpointError, match=r"w: shape \(2,\) dtype int4"):
    jq.io.save(p, {"w": jnp.ones(2, jnp.int4)})
  with pytest.raises(CheckpointError, match="cannot store a .*object"):
    jq.io.save(p, {"w": object()})
  with pytest.raises(CheckpointError, match="root must be"):
    jq.io.save(p, jnp.ones(3))
  with pytest.raises(CheckpointError, match="JSON"):
    jq.io.save(p, {"w": jnp.ones(2)}, metadata={"bad": object()})
  bad = dataclasses.replace(_q(0, (8, 4), jq.W8A16), scale=jnp.ones((2, 4)))
  with pytest.raises(CheckpointError, match=r"invalid QArray.*w: .*scale has shape \(2, 4\)"):
    jq.io.save(p, {"w": bad})
  assert not p.exists()


# ---- atomic writes ------------------------------------------------------------------------------


def _failing_writer(monkeypatch):
  calls = []
  real = safetensors_io._write_array

  def write_then_fail(f, arr):
    calls.append(arr.nbytes)
    if len(calls) == 2:
      f.write(memoryview(arr.reshape(-1).view(np.uint8))[: max(1, arr.nbytes // 2)])
      raise OSError("disk full (simulated)")
    real(f, arr)

  monkeypatch.setattr(safetensors_io, "_write_array", write_then_fail)
  return calls


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch, saved):
  path, tree = saved
  before = open(path, "rb").read()
  calls = _failing_writer(monkeypatch)
  new = jax.tree_util.tree_map(lambda x: x, mixed_tree())
  with pytest.raises(OSError, match="simulated"):
    jq.io.save(path, new)
  assert len(calls) == 2
  assert open(path, "rb").read() == before
  assert sorted(os.listdir(path.parent)) == [path.name]
  monkeypatch.undo()
  assert_identical(tree, jq.io.load(path))


def test_failed_first_write_leaves_nothing(tmp_path, monkeypatch):
  _failing_writer(monkeypatch)
  with pytest.raises(OSError, match="simulated"):
    jq.io.save(tmp_path / "new.safetensors", mixed_tree())
  assert os.listdir(tmp_path) == []


def test_overwrite_keeps_permissions(tmp_path):
  path = tmp_path / "perm.safetensors"
  jq.io.save(path, {"w": jnp.ones(3)})
  os.chmod(path, 0o640)
  jq.io.save(path, {"w": jnp.zeros(3)})
  assert os.stat(path).st_mode & 0o777 == 0o640
  np.testing.assert_array_equal(np.asarray(jq.io.load(path)["w"]), np.zeros(3, np.float32))
  assert os.listdir(tmp_path) == ["perm.safetensors"]


def test_linen_partitioning_boxes_round_trip(tmp_path):
  """A quantized tree of a model built with nn.with_partitioning keeps its nn.Partitioned boxes
  (quantize_variables keeps them); saving refused them."""
  import flax.linen as nn   # pylint: disable=import-outside-toplevel
  q = jq.quantize(jax.random.normal(jax.random.key(0), (64, 32)), jq.W4A16_G32)
  tree = {"params": {
      "q": {"kernel": nn.Partitioned(q, names=("embed", "heads")),
            "bias": nn.LogicallyPartitioned(jnp.ones((32,)), names=("heads",), mesh=None,
                                            rules=(("heads", "model"),))},
      "n": {"scale": nn.Partitioned(jnp.ones((2, 32)), names=("layers", None))}}}
  rules = [jq.Rule(pattern="kernel", weight=jq.W4A16_G32), jq.Rule(pattern=".", weight=None)]
  jq.io.save(tmp_path / "b.safetensors", tree, rules=rules)
  back = jq.io.load(tmp_path / "b.safetensors")
  k, b, s = back["params"]["q"]["kernel"], back["params"]["q"]["bias"], back["params"]["n"]["scale"]
  assert type(k) is nn.Partitioned and k.names == ("embed", "heads")
  np.testing.assert_array_equal(np.asarray(k.value.dequantize()), np.asarray(q.dequantize()))
  assert type(b) is nn.LogicallyPartitioned and b.rules == (("heads", "model"),)
  assert s.names == ("layers", None) and s.value.shape == (2, 32)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tree)
