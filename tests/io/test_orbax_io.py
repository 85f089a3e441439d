"""Orbax checkpoints of quantized trees: exact round trips, atomic replacement, bad input."""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jq
import jq.io
from jq.io import CheckpointError, orbax_io
from jq.qarray import ActivationQuant, QArray
from jq.qtypes import QType
from jq.spec import A8_DYNAMIC, A8_STATIC, Granularity, QuantSpec

ocp = pytest.importorskip("orbax.checkpoint")


@pytest.fixture(autouse=True)
def _strict_promotion():
  with jax.numpy_dtype_promotion("strict"):
    yield


def _q(seed: int, shape, spec: QuantSpec) -> QArray:
  """A valid QArray with random storage, built in numpy (fast; checkpoints don't care)."""
  rng = np.random.default_rng(seed)
  qt, tile = spec.qtype, spec.tile(shape)
  codes = rng.integers(qt.qmin, qt.qmax, tuple(shape), endpoint=True).astype(qt.unpacked_dtype)
  values = np.asarray(jq.numerics.pack(jnp.asarray(codes), qt))   # codes within the qtype's range
  tiles = jq.numerics.num_tiles(shape, tile)
  scale = rng.uniform(0.01, 1.0, tiles).astype(jnp.dtype(spec.scale_dtype))
  zp = None if spec.symmetric else jnp.asarray(
      rng.integers(qt.qmin, qt.qmax, tiles, endpoint=True).astype(qt.unpacked_dtype))
  return QArray(values=jnp.asarray(values.astype(qt.storage_dtype)), scale=jnp.asarray(scale),
                zero_point=zp, activation=None, qtype=qt, shape=tuple(shape), tile=tile).validate()


def tree_a() -> dict:
  specs = {
      "int8": QuantSpec(qtype=QType.INT8),
      "uint8_asym": QuantSpec(qtype=QType.UINT8, symmetric=False),
      "int4_g16": QuantSpec(qtype=QType.INT4, granularity=Granularity.GROUP, group_size=16),
      "uint4_asym_g24": QuantSpec(qtype=QType.UINT4, symmetric=False,
                                  granularity=Granularity.GROUP, group_size=24),
      "int3": QuantSpec(qtype=QType.INT3),
      "int2": QuantSpec(qtype=QType.INT2, granularity=Granularity.TENSOR),
      "uint2_asym_g8": QuantSpec(qtype=QType.UINT2, symmetric=False,
                                 granularity=Granularity.GROUP, group_size=8),
      "nf4_bf16": QuantSpec(qtype=QType.NF4, granularity=Granularity.GROUP, group_size=16,
                            scale_dtype="bfloat16"),
  }
  layers = {k: {"kernel": _q(i, (40, 13), s)} for i, (k, s) in enumerate(specs.items())}
  q8 = _q(99, (16, 8), QuantSpec(qtype=QType.INT8))
  layers["static"] = {"kernel": dataclasses.replace(q8, activation=ActivationQuant(
      scale=jnp.float32(0.02), zero_point=None, spec=A8_STATIC))}
  layers["dynamic"] = {"kernel": dataclasses.replace(q8, activation=ActivationQuant(
      scale=None, zero_point=None, spec=A8_DYNAMIC))}
  rng = np.random.default_rng(0)
  return {"params": {
      "embed": {"embedding": jnp.asarray(rng.standard_normal((11, 8)).astype(ml_dtypes.bfloat16))},
      "layers": layers,
      "stack": [jnp.arange(3, dtype=jnp.int32), (np.ones(2, np.float16), None)],
  }, "step": 7}


def assert_identical(a, b) -> None:
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    if isinstance(x, (jax.Array, np.ndarray)):
      assert type(x) is type(y) or (isinstance(x, jax.Array) and isinstance(y, jax.Array))
      assert x.dtype == y.dtype and x.shape == y.shape
      assert np.array_equal(np.asarray(x).reshape(-1).view(np.uint8),
                            np.asarray(y).reshape(-1).view(np.uint8))
    else:
      assert x == y and type(x) is type(y)


def _siblings(directory) -> list[str]:
  return sorted(os.listdir(os.path.dirname(os.path.abspath(directory))))


def test_roundtrip_exact(tmp_path):
  tree = tree_a()
  d = tmp_path / "ckpt"
  jq.io.save_orbax(d, tree, metadata={"model": "toy"})
  out = jq.io.load_orbax(d)
  assert_identical(tree, out)
  assert isinstance(out["params"]["stack"][1][0], np.ndarray)
  q = out["params"]["layers"]["uint4_asym_g24"]["kernel"]
  assert (q.qtype, q.shape, q.tile) == (QType.UINT4, (40, 13), (24, 1))
  assert out["params"]["layers"]["static"]["kernel"].activation.spec == A8_STATIC
  assert _siblings(d) == ["ckpt"]


def test_overwrite_replaces_and_failed_save_keeps_previous(tmp_path, monkeypatch):
  d = tmp_path / "ckpt"
  first = {"params": {"w": _q(1, (8, 4), jq.W8A16), "b": jnp.ones(4)}}
  jq.io.save_orbax(d, first)
  second = tree_a()
  jq.io.save_orbax(d, second)  # replaces a complete checkpoint
  assert_identical(second, jq.io.load_orbax(d))
  assert _siblings(d) == ["ckpt"]

  real_save = ocp.CompositeCheckpointHandler.save

  def save_then_die(self, *args, **kwargs):
    real_save(self, *args, **kwargs)  # tensors are on disk in orbax's temporary directory ...
    raise OSError("host lost (simulated)")  # ... and the save dies before it is committed

  monkeypatch.setattr(ocp.CompositeCheckpointHandler, "save", save_then_die)
  with pytest.raises(OSError, match="simulated"):
    jq.io.save_orbax(d, first)
  monkeypatch.undo()
  assert_identical(second, jq.io.load_orbax(d))
  assert _siblings(d) == ["ckpt"]

  def swap_fails(src, dst):
    raise OSError("rename failed (simulated)")

  monkeypatch.setattr(orbax_io, "replace_dir", swap_fails)
  with pytest.raises(OSError, match="simulated"):
    jq.io.save_orbax(d, first)
  monkeypatch.undo()
  assert_identical(second, jq.io.load_orbax(d))
  assert _siblings(d) == ["ckpt"]


def test_not_a_jq_checkpoint(tmp_path):
  d = tmp_path / "plain"
  with ocp.StandardCheckpointer() as ck:
    ck.save(os.path.abspath(d), {"w": np.ones(3, np.float32)})
  with pytest.raises(CheckpointError, match="not a jq orbax checkpoint"):
    jq.io.load_orbax(d)


def _edit_header(d, fn) -> None:
  meta = os.path.join(d, "jq", "metadata")
  h = json.load(open(meta))
  fn(h)
  json.dump(h, open(meta, "w"))


def test_tampered_header_is_rejected(tmp_path):
  d = tmp_path / "ckpt"
  tree = {"params": {"dense": {"kernel": _q(0, (32, 24), jq.W4A16_G32)}}}
  jq.io.save_orbax(d, tree)
  orig = open(os.path.join(d, "jq", "metadata")).read()

  _edit_header(d, lambda h: h["leaves"]["params/dense/kernel"].update(shape=[32, 30]))
  with pytest.raises(CheckpointError, match=r"params/dense/kernel.*values have shape \(32, 12\)"):
    jq.io.load_orbax(d)

  open(os.path.join(d, "jq", "metadata"), "w").write(orig)
  _edit_header(d, lambda h: h["tensors"]["params/dense/kernel.scale"].update(dtype="float16"))
  with pytest.raises(CheckpointError, match=r"kernel\.scale.*float32.*header says.*float16"):
    jq.io.load_orbax(d)

  open(os.path.join(d, "jq", "metadata"), "w").write(orig)
  newer = jq.io.FORMAT_VERSION + 1
  _edit_header(d, lambda h: h.update(version=newer))
  with pytest.raises(CheckpointError, match=f"version {newer} is newer"):
    jq.io.load_orbax(d)

  open(os.path.join(d, "jq", "metadata"), "w").write(orig)
  assert_identical(tree, jq.io.load_orbax(d))
