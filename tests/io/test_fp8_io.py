"""fp8 QArrays in jq's checkpoints (safetensors, orbax) and what GGUF export says about them."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jq
from jq.io.gguf import codec as GC
from jq.io.gguf.types import GGUFExportError
from jq.io.safetensors_io import read_tensors
from jq.tree import is_qarray, leaves_with_paths

F8 = ml_dtypes.float8_e4m3fn


def _tree():
  rng = np.random.default_rng(0)
  w = {name: jnp.asarray(rng.standard_normal(shape).astype(np.float32))
       for name, shape in (("a", (32, 24)), ("b", (24, 40)), ("c", (40, 8)))}
  rules = [jq.Rule(pattern="a", weight=jq.FP8_CHANNEL, activation=jq.A_FP8_DYNAMIC),
           jq.Rule(pattern="b", weight=jq.FP8_CHANNEL, activation=jq.A_FP8_STATIC),
           jq.Rule(pattern="c", weight=jq.QuantSpec(
               qtype=jq.QType.FP8_E4M3, granularity=jq.Granularity.GROUP, group_size=16,
               scale_dtype="bfloat16"))]
  q = jax.jit(lambda p: jq.quantize_tree(p, rules, act_scales={"b/kernel": (jnp.float32(0.03), None)}))(
      {k: {"kernel": v} for k, v in w.items()})
  return q, rules


def _assert_identical(a, b):
  la, lb = dict(leaves_with_paths(a)), dict(leaves_with_paths(b))
  assert set(la) == set(lb)
  for k, x in la.items():
    y = lb[k]
    assert is_qarray(y) and (x.qtype, x.shape, x.tile) == (y.qtype, y.shape, y.tile), k
    assert y.values.dtype == F8 and y.scale.dtype == x.scale.dtype, k
    assert np.array_equal(np.asarray(x.values).view(np.uint8), np.asarray(y.values).view(np.uint8))
    assert np.array_equal(np.asarray(x.scale), np.asarray(y.scale)), k
    assert (x.activation is None) == (y.activation is None), k
    if x.activation is not None:
      assert x.activation.spec == y.activation.spec, k
      assert (x.activation.scale is None) == (y.activation.scale is None), k
      if x.activation.scale is not None:
        assert float(x.activation.scale) == float(y.activation.scale), k


def test_safetensors_round_trip(tmp_path):
  q, rules = _tree()
  path = tmp_path / "fp8.safetensors"
  jq.io.save(path, q, rules=rules)
  _assert_identical(q, jq.io.load(path))
  raw = read_tensors(path)                              # stored as F8_E4M3, one byte per value
  assert raw["a/kernel.values"].dtype == np.dtype(F8) and raw["a/kernel.values"].shape == (32, 24)
  assert raw["b/kernel.act_scale"].tolist() == np.float32(0.03)
  assert "a/kernel.zero_point" not in raw
  header = jq.io.load_header(path)
  leaf = header["leaves"]["b/kernel"]
  assert leaf["qtype"] == "fp8_e4m3" and leaf["symmetric"]
  assert leaf["activation"] == {"mode": "static", "qtype": "fp8_e4m3", "symmetric": True}
  assert jq.io.codec.rules_from_header(header) == tuple(rules)


def test_orbax_round_trip(tmp_path):
  q, _ = _tree()
  jq.io.save_orbax(tmp_path / "ck", q)
  _assert_identical(q, jq.io.load_orbax(tmp_path / "ck"))


def test_gguf_export_refuses_fp8_codes_clearly():
  w = jnp.asarray(np.random.default_rng(1).standard_normal((64, 32)).astype(np.float32))
  q = jq.quantize(w, jq.FP8_CHANNEL)
  with pytest.raises(GGUFExportError, match=r"k: QArray\(qtype=fp8_e4m3.*float8.*not integer "
                                            "codes.*requantize"):
    GC.encode_tensor(q, "Q8_0", name="k")
  out = GC.encode_tensor(q, "Q8_0", requantize=True, name="k")       # dequantized, then ggml's
  back = GC.decode_tensor(out, "Q8_0", (32, 64))                     # GGUF rows: (out, in)
  back = np.asarray(back.dequantize() if is_qarray(back) else back)
  d = np.asarray(q.dequantize()).T
  assert back.shape == d.shape and np.max(np.abs(back - d)) <= np.max(np.abs(d)) / 127
  f32 = GC.encode_tensor(q, "F32", name="k")                          # floats hold it exactly
  np.testing.assert_array_equal(f32, np.asarray(q.dequantize()).T)
