"""compressed-tensors export/import: packing vectors, round trips, config layout, bad input."""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jq
from jq.io import compressed_tensors as C
from jq.io.safetensors_io import read_tensors, write_safetensors
from jq.tree import is_qarray, leaves_with_paths

CFG = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
           num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5, max_seq_len=256,
           tie_embeddings=True)
KERNELS = r"(^|/)kernel$"


def tiny_llama(rng, cfg=CFG):
  d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
  q, kv = cfg["num_heads"] * cfg["head_dim"], cfg["num_kv_heads"] * cfg["head_dim"]
  w = lambda *s: (rng.standard_normal(s) * 0.05).astype(np.float32)
  p = {"embed": {"embedding": w(v, d)}, "final_norm": {"scale": 1 + w(d)}}
  for i in range(cfg["num_layers"]):
    p[f"layers_{i}"] = {
        "attn": {"q_proj": {"kernel": w(d, q)}, "k_proj": {"kernel": w(d, kv)},
                 "v_proj": {"kernel": w(d, kv)}, "o_proj": {"kernel": w(q, d)}},
        "mlp": {"gate_proj": {"kernel": w(d, f)}, "up_proj": {"kernel": w(d, f)},
                "down_proj": {"kernel": w(f, d)}},
        "input_norm": {"scale": 1 + w(d)}, "post_attn_norm": {"scale": 1 + w(d)}}
  return p


_dequantize = jax.jit(lambda q: q.dequantize(jnp.float32))


def qtree(params, rules, act_scales=None):
  """``jq.quantize_tree`` under one ``jax.jit`` (eager dispatch compiles every op per shape)."""
  rules = tuple(rules)
  return jax.jit(lambda p, a: jq.quantize_tree(p, rules, act_scales=a))(params, act_scales)


def _deq(x):
  return np.asarray(_dequantize(x)) if is_qarray(x) else np.asarray(x)


def _assert_same_values(a, b):
  la, lb = dict(leaves_with_paths(a)), dict(leaves_with_paths(b))
  assert set(la) == set(lb), set(la) ^ set(lb)
  for k in la:
    assert is_qarray(la[k]) == is_qarray(lb[k]), k
    assert np.array_equal(_deq(la[k]), _deq(lb[k])), k


# ---- packing --------------------------------------------------------------------------------

def test_pack_hand_computed_vectors():
  # int4 [-8, -7, -1, 0, 1, 2, 6, 7] + 8 = [0, 1, 7, 8, 9, 10, 14, 15], value i in nibble i:
  words = C.pack_int32(np.array([[-8, -7, -1, 0, 1, 2, 6, 7]]), 4)
  assert words.dtype == np.int32 and words.shape == (1, 1)
  assert int(words.view(np.uint32)[0, 0]) == 0xFEA98710
  assert int(words[0, 0]) == 0xFEA98710 - 2**32
  assert int(words.view(np.uint32)[0, 0]) != 0x76210F98   # two's-complement nibbles: not CT's
  # int3: 32 values fill exactly 3 words; value 10 (bits 30..32) straddles words 0 and 1.
  q = np.full((1, 32), -4)
  q[0, 0], q[0, 10] = -3, 3                                 # offset codes 1 and 7 = 0b111
  assert list(C.pack_int32(q, 3).view(np.uint32)[0]) == [0xC0000001, 0x00000001, 0]
  # a partial last word is zero-padded after the offset (padding decodes to the minimum value)
  w = C.pack_int32(np.array([[7] * 12]), 4)
  assert list(w.view(np.uint32)[0]) == [0xFFFFFFFF, 0x0000FFFF]
  # zero points are packed along dim 0
  zp = np.arange(-8, 8).reshape(16, 1).repeat(3, axis=1)
  zpp = C.pack_int32(zp, 4, packed_dim=0)
  assert zpp.shape == (2, 3) and int(zpp.view(np.uint32)[0, 0]) == 0x76543210
  assert np.array_equal(C.unpack_int32(zpp, 4, (16, 3), packed_dim=0), zp)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("cols", [1, 7, 32, 33, 100])
def test_pack_round_trip(bits, cols):
  rng = np.random.default_rng(bits * 100 + cols)
  x = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), size=(3, cols))
  p = C.pack_int32(x, bits)
  assert p.shape == (3, -(-cols * bits // 32))
  assert np.array_equal(C.unpack_int32(p, bits, x.shape), x)
  p0 = C.pack_int32(x, bits, packed_dim=0)
  assert np.array_equal(C.unpack_int32(p0, bits, x.shape, packed_dim=0), x)
  with pytest.raises(ValueError, match="outside int"):
    C.pack_int32(x + (1 << bits), bits)


# ---- export / import ------------------------------------------------------------------------

SPECS = {
    "w4a16-g32-asym": (jq.W4A16_G32, None),
    "w4a16-g32-sym": (jq.QuantSpec(qtype=jq.QType.INT4, granularity=jq.Granularity.GROUP,
                                   group_size=32), None),
    "w4-channel-asym-bf16": (jq.QuantSpec(qtype=jq.QType.UINT4, symmetric=False,
                                          scale_dtype="bfloat16"), None),
    "w8a16": (jq.W8A16, None),
    "w8a8-dynamic": (jq.W8A16, jq.A8_DYNAMIC),
    "w8a8-dynamic-asym": (jq.W8A16, jq.A8_DYNAMIC_ASYM),
    "w3-g32": (jq.QuantSpec(qtype=jq.QType.UINT3, symmetric=False,
                            granularity=jq.Granularity.GROUP, group_size=32), None),
    "w2-tensor-sym": (jq.QuantSpec(qtype=jq.QType.INT2, granularity=jq.Granularity.TENSOR), None),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_round_trip(tmp_path, name):
  spec, act = SPECS[name]
  params = tiny_llama(np.random.default_rng(0))
  q = qtree(params, jq.default_rules(spec, act))
  qc = C.export_compressed_tensors({"params": q}, CFG, tmp_path / "ck")
  hf, back = C.load_compressed_tensors(tmp_path / "ck")
  _assert_same_values(q, back)
  assert C.llama_hparams(hf) == jq.io.gguf.LlamaHParams(**CFG)
  (g,) = qc["config_groups"].values()
  bits = spec.qtype.bits
  assert g["targets"] == ["Linear"] and g["weights"]["num_bits"] == bits
  assert g["weights"]["symmetric"] == spec.symmetric and g["weights"]["type"] == "int"
  assert qc["format"] == ("int-quantized" if act else "pack-quantized")
  assert qc["quant_method"] == "compressed-tensors" and qc["ignore"] == ["lm_head"]
  on_disk = json.loads((tmp_path / "ck" / "config.json").read_text())
  assert on_disk["quantization_config"] == qc and on_disk["architectures"] == ["LlamaForCausalLM"]
  t = read_tensors(tmp_path / "ck" / "model.safetensors")
  m = "model.layers.1.mlp.down_proj"                     # jq kernel (96, 64) -> HF (64, 96)
  assert t["model.embed_tokens.weight"].shape == (128, 64)
  assert t["model.layers.0.input_layernorm.weight"].shape == (64,)
  if act:
    assert t[f"{m}.weight"].dtype == np.int8 and t[f"{m}.weight"].shape == (64, 96)
    assert g["input_activations"]["strategy"] == "token" and g["input_activations"]["dynamic"]
  else:
    assert t[f"{m}.weight_packed"].dtype == np.int32
    assert t[f"{m}.weight_packed"].shape == (64, -(-96 * bits // 32))
    assert list(t[f"{m}.weight_shape"]) == [64, 96] and t[f"{m}.weight_shape"].dtype == np.int64
  strategy = g["weights"]["strategy"]
  want_scale = {"group": (64, 3), "channel": (64, 1), "tensor": (1,)}[strategy]
  assert t[f"{m}.weight_scale"].shape == want_scale
  assert t[f"{m}.weight_scale"].dtype == np.dtype(jnp.dtype(spec.scale_dtype))
  if not spec.symmetric:
    assert t[f"{m}.weight_zero_point"].shape == (-(-64 * bits // 32), want_scale[1])
    assert t[f"{m}.weight_zero_point"].dtype == np.int32
  else:
    assert f"{m}.weight_zero_point" not in t
  qd = back["layers_1"]["mlp"]["down_proj"]["kernel"]
  assert qd.qtype is (spec.qtype if spec.symmetric else jq.QType.from_bits(bits, signed=False))


def test_sharded_and_lazy_exports_hold_the_same_checkpoint(tmp_path):
  """Past ``max_shard_bytes`` the weights go into Hugging Face's numbered shards and index (each
  written as it fills), and a lazily loaded jq checkpoint (leaves read one at a time) exports the
  same tensors; both read back to the same values."""
  q = qtree(tiny_llama(np.random.default_rng(3)), jq.default_rules(jq.W4A16_G32))
  one = C.export_compressed_tensors({"params": q}, CFG, tmp_path / "one")
  jq.io.save(tmp_path / "q.safetensors", {"params": q})
  lazy = jq.io.load(tmp_path / "q.safetensors", lazy=True)
  assert C.export_compressed_tensors(lazy, CFG, tmp_path / "many", max_shard_bytes=20_000) == one
  files = sorted(p.name for p in (tmp_path / "many").iterdir())
  shards = [f for f in files if f.startswith("model-")]
  assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
  assert "model.safetensors" not in files and not any(f.startswith(".") for f in files)
  index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
  whole = read_tensors(tmp_path / "one" / "model.safetensors")
  assert set(index["weight_map"]) == set(whole) and set(index["weight_map"].values()) == set(shards)
  assert index["metadata"]["total_size"] == sum(v.nbytes for v in whole.values())
  for name, shard in index["weight_map"].items():
    np.testing.assert_array_equal(read_tensors(tmp_path / "many" / shard)[name], whole[name])
  _assert_same_values(C.load_compressed_tensors(tmp_path / "many")[1],
                      C.load_compressed_tensors(tmp_path / "one")[1])


def test_static_w8a8_and_mixed_precision(tmp_path):
  params = tiny_llama(np.random.default_rng(1))
  paths = [p for p, _ in leaves_with_paths(params) if p.endswith("kernel")]
  a8s = jq.ActivationSpec(mode=jq.ActMode.STATIC, qtype=jq.QType.UINT8, symmetric=False)
  rules = [jq.Rule(pattern=r"o_proj", weight=None),
           jq.Rule(pattern=r"layers_0/attn", weight=jq.W8A16, activation=a8s),
           jq.Rule(pattern=r"mlp", weight=jq.W4A16_G32),
           jq.Rule(pattern=KERNELS, weight=jq.W8A16)]
  scales = {p: (jnp.float32(0.02), jnp.uint8(131)) for p in paths}
  q = qtree(params, rules, scales)
  qc = C.export_compressed_tensors(q, CFG, tmp_path / "mixed")
  assert qc["format"] == "mixed-precision" and len(qc["config_groups"]) == 3
  assert qc["ignore"] == ["lm_head", "model.layers.0.self_attn.o_proj",
                          "model.layers.1.self_attn.o_proj"]
  static = next(g for g in qc["config_groups"].values() if g["format"] == "int-quantized")
  assert static["targets"] == ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.q_proj",
                               "model.layers.0.self_attn.v_proj"]
  assert static["input_activations"]["strategy"] == "tensor"
  assert not static["input_activations"]["dynamic"] and not static["input_activations"]["symmetric"]
  t = read_tensors(tmp_path / "mixed" / "model.safetensors")
  assert t["model.layers.0.self_attn.q_proj.input_scale"].tolist() == [np.float32(0.02)]
  assert t["model.layers.0.self_attn.q_proj.input_zero_point"].tolist() == [131 - 128]
  _, back = C.load_compressed_tensors(tmp_path / "mixed")
  _assert_same_values(q, back)
  a = back["layers_0"]["attn"]["q_proj"]["kernel"].activation
  assert a.spec == a8s and int(a.zero_point) == 131 and float(a.scale) == np.float32(0.02)
  assert not is_qarray(back["layers_1"]["attn"]["o_proj"]["kernel"])


def test_unrepresentable_grids(tmp_path):
  params = tiny_llama(np.random.default_rng(2))
  partial = qtree(params, jq.default_rules(jq.QuantSpec(
      qtype=jq.QType.UINT4, symmetric=False, granularity=jq.Granularity.GROUP, group_size=48)))
  with pytest.raises(C.CompressedTensorsError,
                     match=r"model\.layers\.0\..*group size 48 does not divide.*requantize=True"):
    C.export_compressed_tensors(partial, CFG, tmp_path / "p")
  assert not (tmp_path / "p").exists()
  notes = []
  C.export_compressed_tensors(partial, CFG, tmp_path / "p", requantize=True, notes=notes)
  per_tensor = [n for n in notes if n.startswith("params/")]
  assert per_tensor and all("re-rounded from uint4 asym tile (48, 1) to compressed-tensors int4 "
                            "asym group 32" in n for n in per_tensor)
  assert len(per_tensor) == sum(1 for p, x in leaves_with_paths(partial)
                                if is_qarray(x) and x.shape[0] % 48)
  # groups of 48 and of 32 with zero points: transformers 5 cannot decompress the mix (said)
  assert [n for n in notes if n not in per_tensor] == [
      n for n in notes if n.startswith("2 weight schemes with zero points") and "vLLM" in n]
  assert len(notes) == len(per_tensor) + 1
  _, back = C.load_compressed_tensors(tmp_path / "p")
  for p, x in leaves_with_paths(back):
    if is_qarray(x):
      w = _deq(dict(leaves_with_paths(partial))[p])
      assert x.qtype is jq.QType.UINT4, p
      if x.shape[0] == 96:                                    # 48 divides 96: stored exactly
        assert x.tile == (48, 1) and np.array_equal(_deq(x), w), p
        continue
      assert x.tile == (32, 1), p          # re-rounded to the largest group dividing 64
      step = np.repeat(np.asarray(x.scale, np.float32), x.tile[0], axis=0)
      assert np.all(np.abs(_deq(x) - w) <= step * (1 + 1e-6)), p
      assert not np.array_equal(_deq(x), w), p
  nf4 = qtree(params, jq.default_rules(jq.NF4_G64))
  with pytest.raises(C.CompressedTensorsError, match="NF4"):
    C.export_compressed_tensors(nf4, CFG, tmp_path / "n")
  C.export_compressed_tensors(nf4, CFG, tmp_path / "n", requantize=True)
  _, back = C.load_compressed_tensors(tmp_path / "n")
  assert back["layers_0"]["mlp"]["up_proj"]["kernel"].qtype is jq.QType.INT4


def test_export_errors(tmp_path):
  params = tiny_llama(np.random.default_rng(3))
  with pytest.raises(C.CompressedTensorsError, match="no QArray kernels"):
    C.export_compressed_tensors(params, CFG, tmp_path / "f")
  bert = {"encoder": {"layer_0": {"attention": {"query": {"kernel": np.zeros((4, 4))}}}}}
  with pytest.raises(C.CompressedTensorsError,
                     match="params/encoder/layer_0.*not a tensor of this decoder config"):
    C.export_compressed_tensors(bert, CFG, tmp_path / "b")
  with pytest.raises(ValueError, match="architecture 'bert'"):
    C.export_compressed_tensors(params, {**CFG, "model_type": "bert"}, tmp_path / "b")
  q = qtree(params, [jq.Rule(pattern="embed", weight=jq.QuantSpec(
      qtype=jq.QType.INT8)), jq.Rule(pattern=KERNELS, weight=jq.W8A16)])
  with pytest.raises(C.CompressedTensorsError,
                     match="embed/embedding: shape .* only Linear kernels"):
    C.export_compressed_tensors(q, CFG, tmp_path / "e")


def test_import_errors(tmp_path):
  params = tiny_llama(np.random.default_rng(4))
  q = qtree(params, jq.default_rules(jq.W4A16_G32))
  ck = tmp_path / "ck"
  C.export_compressed_tensors(q, CFG, ck)
  cfg = json.loads((ck / "config.json").read_text())
  with pytest.raises(FileNotFoundError):
    C.load_compressed_tensors(tmp_path / "nothing")

  def with_config(mutate):
    c = json.loads(json.dumps(cfg))
    mutate(c)
    (ck / "config.json").write_text(json.dumps(c))

  with_config(lambda c: c["quantization_config"].update(quant_method="gptq"))
  with pytest.raises(C.CompressedTensorsError, match="not 'compressed-tensors'"):
    C.load_compressed_tensors(ck)
  with_config(lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"].update(
      type="float"))
  with pytest.raises(C.CompressedTensorsError, match="weight type 'float'"):
    C.load_compressed_tensors(ck)
  with_config(lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"].update(
      num_bits=8))
  with pytest.raises(C.CompressedTensorsError, match="does not hold 8-bit values"):
    C.load_compressed_tensors(ck)
  with_config(lambda c: None)
  t = read_tensors(ck / "model.safetensors")
  good = t["model.layers.0.mlp.up_proj.weight_scale"]
  t["model.layers.0.mlp.up_proj.weight_scale"] = good[:, :1]
  write_safetensors(ck / "model.safetensors", t)
  with pytest.raises(C.CompressedTensorsError, match=r"up_proj.*weight_scale shape \(96, 1\)"):
    C.load_compressed_tensors(ck)
  t["model.layers.0.mlp.up_proj.weight_scale"] = good
  t["model.layers.7.mlp.up_proj.weight"] = np.zeros((2, 2), np.float32)
  write_safetensors(ck / "model.safetensors", t)
  with pytest.raises(C.CompressedTensorsError, match="model.layers.7.mlp.up_proj"):
    C.load_compressed_tensors(ck)


# ---- against the compressed-tensors package itself (optional: needs torch + the package) -----

def test_matches_compressed_tensors_package(tmp_path):
  ct = pytest.importorskip("compressed_tensors")
  torch = pytest.importorskip("torch")
  from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor
  from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
  from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
  from compressed_tensors.quantization import QuantizationConfig
  from compressed_tensors.quantization.utils import calculate_qparams
  from compressed_tensors.quantization.lifecycle.forward import quantize

  assert ct.__version__.startswith("0.20")
  rng = np.random.default_rng(5)
  for bits in range(1, 9):
    x = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), size=(5, 70))
    for dim in (0, 1):
      ref = pack_to_int32(torch.tensor(x, dtype=torch.int8), bits, packed_dim=dim).numpy()
      assert np.array_equal(C.pack_int32(x, bits, packed_dim=dim), ref), (bits, dim)
  params = tiny_llama(rng)
  for name, (spec, act) in SPECS.items():
    q = qtree(params, jq.default_rules(spec, act))
    qc = C.export_compressed_tensors(q, CFG, tmp_path / name)
    (scheme,) = QuantizationConfig.model_validate(qc).config_groups.values()
    t = read_tensors(tmp_path / name / "model.safetensors")
    comp = IntQuantizationCompressor if act else PackedQuantizationCompressor
    for p, x in leaves_with_paths(q):
      if not is_qarray(x):
        continue
      mod, _ = C.hf_module_name(p)
      sd = {k[len(mod) + 1:]: torch.from_numpy(np.array(v).astype(np.float32)
                                               if v.dtype == jnp.bfloat16 else np.array(v))
            for k, v in t.items() if k.startswith(mod + ".")}
      if spec.scale_dtype == "bfloat16":
        sd["weight_scale"] = sd["weight_scale"].to(torch.bfloat16).to(torch.float32)
      w = comp.decompress(sd, scheme)["weight"].float().numpy()
      assert np.array_equal(w, _deq(x).T), (name, p)
  # requantize=True uses CT's own min-max formulas
  w = (rng.standard_normal((64, 80)) * 0.05).astype(np.float32)      # (out, in), 80 % 32 != 0
  for sym in (True, False):
    qv, s, zp = C._ct_requantize(w, 4, sym, "channel", None, np.dtype(np.float32))
    from compressed_tensors.quantization import QuantizationArgs
    args = QuantizationArgs(num_bits=4, symmetric=sym, strategy="channel")
    tw = torch.from_numpy(w)
    rs, rz = calculate_qparams(tw.amin(1, keepdim=True), tw.amax(1, keepdim=True), args)
    rq = quantize(tw, rs, rz, args, dtype=torch.int8)
    assert np.array_equal(s, rs.numpy()) and np.array_equal(qv, rq.numpy())
    if not sym:
      assert np.array_equal(zp, rz.numpy())


# ---- the real model -------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_w4a16_g64_round_trip(tmp_path):
  fetch = pytest.importorskip("jq_models.fetch")
  from jq.io import gguf as G
  hp, qparams, meta = G.load_gguf_params(fetch.fetch(fetch.SMOLLM2_GGUF))
  params = jq.dequantize_tree(qparams)
  spec = jq.QuantSpec(qtype=jq.QType.UINT4, symmetric=False, granularity=jq.Granularity.GROUP,
                      group_size=64)            # 576 and 1536 are multiples of 64, not of 128
  quantize = jax.jit(jq.quantize, static_argnames=("spec", "name"))   # 4 kernel shapes
  q = jq.tree.map_with_paths(lambda p, x: quantize(x, spec) if p.endswith("kernel") else x, params)
  qc = C.export_compressed_tensors(q, hp, tmp_path / "smollm2",
                                   hf_config_extra={"bos_token_id": 1, "eos_token_id": 2})
  assert qc["config_groups"]["group_0"]["weights"]["group_size"] == 64
  hf, back = C.load_compressed_tensors(tmp_path / "smollm2")
  assert hf["num_hidden_layers"] == 30 and hf["tie_word_embeddings"] and hf["eos_token_id"] == 2
  a, b = dict(leaves_with_paths(q)), dict(leaves_with_paths(back))
  assert set(a) == set(b) and sum(map(is_qarray, b.values())) == 30 * 7
  for p in ("layers_0/attn/q_proj/kernel", "layers_29/mlp/down_proj/kernel", "embed/embedding"):
    assert np.array_equal(_deq(a[p]), _deq(b[p])), p
  w128 = dict(q, layers_0=dict(q["layers_0"], attn=dict(q["layers_0"]["attn"], q_proj={
      "kernel": quantize(params["layers_0"]["attn"]["q_proj"]["kernel"], jq.W4A16_G128)})))
  with pytest.raises(C.CompressedTensorsError, match="q_proj.*group size 128 does not divide the input dim 576"):
    C.export_compressed_tensors(w128, hp, tmp_path / "g128")


def _transformers_case():
  """``(torch, transformers, jq Llama, its params, tokens)`` for the transformers oracle tests
  (skipped without compressed-tensors, torch or transformers)."""
  pytest.importorskip("compressed_tensors")
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  decoder = pytest.importorskip("jq_models.decoder")
  model = decoder.Llama(decoder.LlamaConfig(**CFG))
  return (torch, transformers, model, tiny_llama(np.random.default_rng(6)),
          np.array([[1, 5, 9, 77, 3, 100, 42, 8]]))


def test_transformers_loads_checkpoint(tmp_path):
  """Optional: transformers (+ compressed-tensors) loads symmetric and asymmetric checkpoints;
  logits match jq. (Asymmetric exports carry ``run_compressed: false``: transformers 5.x would
  otherwise expect unpacked zero points and refuse the packed ``weight_zero_point``.)"""
  torch, transformers, model, params, toks = _transformers_case()
  for spec in (jq.W8A16, SPECS["w4a16-g32-sym"][0], jq.W4A16_G32):
    q = qtree(params, jq.default_rules(spec))
    C.export_compressed_tensors(q, CFG, tmp_path / "ck")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.float32)
    with torch.no_grad():
      got = hf(torch.tensor(toks)).logits.numpy()
    want = np.asarray(model.apply({"params": jq.dequantize_tree(q)}, jnp.asarray(toks)))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_export_model_adapter(tmp_path):
  import types
  q = qtree(tiny_llama(np.random.default_rng(7)), jq.default_rules(jq.W8A16))
  with pytest.raises(C.CompressedTensorsError, match="pass config="):
    C.export_model({"params": q}, tmp_path / "x")
  C.export_model({"params": q}, tmp_path / "x", model=types.SimpleNamespace(config=CFG))
  _, back = C.load_compressed_tensors(tmp_path / "x")
  _assert_same_values(q, back)


# ---- fp8 (float-quantized) ------------------------------------------------------------------

FP8_TENSOR_BF16 = jq.QuantSpec(qtype=jq.QType.FP8_E4M3, granularity=jq.Granularity.TENSOR,
                               scale_dtype="bfloat16")


@pytest.mark.parametrize("name", ["fp8-dynamic", "fp8-static", "fp8-weight-only",
                                  "fp8-tensor-bf16"])
def test_fp8_round_trip(tmp_path, name):
  params = tiny_llama(np.random.default_rng(8))
  kernels = [p for p, _ in leaves_with_paths(params) if p.endswith("kernel")]
  if name == "fp8-tensor-bf16":
    rules, act = jq.default_rules(FP8_TENSOR_BF16), None
  else:
    rules = jq.recipe_rules(name)
    act = rules[-1].activation
  scales = {p: (jnp.float32(0.01 * (i + 1)), None) for i, p in enumerate(kernels)}
  q = qtree(params, rules, scales if name == "fp8-static" else None)
  qc = C.export_compressed_tensors(q, CFG, tmp_path / "ck")
  assert qc["format"] == "float-quantized" and qc["quant_method"] == "compressed-tensors"
  (g,) = qc["config_groups"].values()
  tensor = name == "fp8-tensor-bf16"
  assert {k: g["weights"][k] for k in ("num_bits", "type", "strategy", "symmetric", "dynamic")} \
      == {"num_bits": 8, "type": "float", "strategy": "tensor" if tensor else "channel",
          "symmetric": True, "dynamic": False}
  a = g["input_activations"]
  if act is None:
    assert a is None
  else:
    assert {k: a[k] for k in ("num_bits", "type", "strategy", "symmetric", "dynamic")} == {
        "num_bits": 8, "type": "float", "symmetric": True,
        "strategy": "token" if name == "fp8-dynamic" else "tensor",
        "dynamic": name == "fp8-dynamic"}
  t = read_tensors(tmp_path / "ck" / "model.safetensors")
  m = "model.layers.1.mlp.down_proj"                     # jq kernel (96, 64) -> HF (64, 96)
  assert t[f"{m}.weight"].dtype == np.dtype(ml_dtypes.float8_e4m3fn)
  assert t[f"{m}.weight"].shape == (64, 96)
  assert t[f"{m}.weight_scale"].shape == ((1,) if tensor else (64, 1))
  assert t[f"{m}.weight_scale"].dtype == (np.dtype(ml_dtypes.bfloat16) if tensor else np.float32)
  assert sorted(k[len(m) + 1:] for k in t if k.startswith(m + ".")) == sorted(
      ["weight", "weight_scale"] + (["input_scale"] if name == "fp8-static" else []))
  kd = q["layers_1"]["mlp"]["down_proj"]["kernel"]
  assert np.array_equal(t[f"{m}.weight"].view(np.uint8), np.asarray(kd.values).T.view(np.uint8))
  if name == "fp8-static":
    want = scales["layers_1/mlp/down_proj/kernel"][0]
    assert t[f"{m}.input_scale"].tolist() == [np.float32(want)]
  _, back = C.load_compressed_tensors(tmp_path / "ck")
  _assert_same_values(q, back)
  for p, x in leaves_with_paths(back):
    if is_qarray(x):
      y = dict(leaves_with_paths(q))[p]
      assert x.qtype is jq.QType.FP8_E4M3 and x.tile == y.tile, p
      assert (x.activation is None) == (act is None), p
      if act is not None:
        assert x.activation.spec == act, p
        if name == "fp8-static":
          assert float(x.activation.scale) == float(y.activation.scale), p


def test_fp8_groups_and_bad_checkpoints(tmp_path):
  params = tiny_llama(np.random.default_rng(9))
  g32 = jq.QuantSpec(qtype=jq.QType.FP8_E4M3, granularity=jq.Granularity.GROUP, group_size=32)
  q = qtree(params, jq.default_rules(g32))
  with pytest.raises(C.CompressedTensorsError,
                     match=r"model\.layers\.0\..*fp8 weights with groups of 32.*requantize=True"):
    C.export_compressed_tensors(q, CFG, tmp_path / "g")
  notes = []
  C.export_compressed_tensors(q, CFG, tmp_path / "g", requantize=True, notes=notes)
  assert notes and all("re-rounded from fp8_e4m3 sym tile (32, 1) to compressed-tensors float8 "
                       "sym channel" in n for n in notes)
  _, back = C.load_compressed_tensors(tmp_path / "g")
  for p, x in leaves_with_paths(back):
    if is_qarray(x):
      w = _deq(dict(leaves_with_paths(q))[p])
      assert x.qtype is jq.QType.FP8_E4M3 and x.tile == (x.shape[0], 1), p
      s = np.asarray(x.scale, np.float32)
      assert np.all(np.abs(_deq(x) - w) <= 2.0 ** -4 * np.abs(w) + 2.0 ** -10 * s), p
  # operands jq's rules never pair (built by hand): refused by name
  q8 = qtree(params, jq.default_rules(jq.W8A16))
  k = q8["layers_0"]["mlp"]["up_proj"]["kernel"]
  q8["layers_0"]["mlp"]["up_proj"]["kernel"] = dataclasses.replace(
      k, activation=jq.ActivationQuant(None, None, jq.A_FP8_DYNAMIC))
  with pytest.raises(C.CompressedTensorsError,
                     match=r"up_proj.*fp8_e4m3 activations with integer weights have no"):
    C.export_compressed_tensors(q8, CFG, tmp_path / "x")
  # a checkpoint whose data disagree with its float scheme
  ck = tmp_path / "ck"
  C.export_compressed_tensors(qtree(params, jq.recipe_rules("fp8-dynamic")), CFG, ck)
  t = read_tensors(ck / "model.safetensors")
  m = "model.layers.0.mlp.up_proj"
  good = dict(t)
  t[f"{m}.weight"] = t[f"{m}.weight"].astype(np.float32).astype(np.int8)
  write_safetensors(ck / "model.safetensors", t)
  with pytest.raises(C.CompressedTensorsError, match=r"up_proj.*expected a 2-D float8_e4m3fn"):
    C.load_compressed_tensors(ck)
  t = dict(good, **{f"{m}.input_scale": np.ones(1, np.float32)})
  write_safetensors(ck / "model.safetensors", t)
  with pytest.raises(C.CompressedTensorsError, match="dynamic float8 activations need"):
    C.load_compressed_tensors(ck)
  write_safetensors(ck / "model.safetensors", good)
  cfg = json.loads((ck / "config.json").read_text())
  cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 4
  (ck / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(C.CompressedTensorsError, match="weight type 'float' with num_bits=4"):
    C.load_compressed_tensors(ck)
  cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 8
  cfg["quantization_config"]["config_groups"]["group_0"]["input_activations"]["type"] = "int"
  (ck / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(C.CompressedTensorsError, match="not symmetric float8"):
    C.load_compressed_tensors(ck)


def test_fp8_matches_compressed_tensors_package(tmp_path):
  """compressed-tensors' own float compressor decompresses jq's fp8 export to jq's values, and
  its min-max scale and float quantization agree with jq's."""
  pytest.importorskip("compressed_tensors")
  torch = pytest.importorskip("torch")
  from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
  from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig
  from compressed_tensors.quantization.lifecycle.forward import quantize
  from compressed_tensors.quantization.utils import calculate_qparams

  params = tiny_llama(np.random.default_rng(10))
  q = qtree(params, jq.recipe_rules("fp8-dynamic"))
  qc = C.export_compressed_tensors(q, CFG, tmp_path / "ck")
  (scheme,) = QuantizationConfig.model_validate(qc).config_groups.values()
  t = read_tensors(tmp_path / "ck" / "model.safetensors")
  args = QuantizationArgs(num_bits=8, type="float", strategy="channel", symmetric=True)
  for p, x in leaves_with_paths(q):
    if not is_qarray(x):
      continue
    mod, _ = C.hf_module_name(p)
    sd = {"weight": torch.from_numpy(t[f"{mod}.weight"].view(np.uint8)).view(torch.float8_e4m3fn),
          "weight_scale": torch.from_numpy(t[f"{mod}.weight_scale"])}
    w = FloatQuantizationCompressor.decompress(sd, scheme)["weight"].float().numpy()
    assert np.array_equal(w, _deq(x).T), p
    tw = torch.from_numpy(np.asarray(params_leaf(params, p)).T.copy())
    rs, rz = calculate_qparams(tw.amin(1, keepdim=True), tw.amax(1, keepdim=True), args)
    np.testing.assert_allclose(np.asarray(x.scale).T, rs.numpy(), rtol=2.0 ** -19)  # jq: 20 bits
    rq = quantize(tw, torch.from_numpy(np.asarray(x.scale).T.copy()), rz, args,
                  dtype=torch.float8_e4m3fn)
    assert np.array_equal(rq.view(torch.uint8).numpy(), np.asarray(x.values).T.view(np.uint8)), p


def params_leaf(params, path):
  for k in path.split("/"):
    params = params[k]
  return params


def test_transformers_runs_fp8_checkpoint(tmp_path):
  """Optional: transformers (+ compressed-tensors) loads jq's fp8 exports; with fp8-dynamic its
  fake-quantized fp8 activations give jq's quantized model's logits."""
  torch, transformers, model, params, toks = _transformers_case()
  for name in ("fp8-weight-only", "fp8-dynamic"):
    q = qtree(params, jq.recipe_rules(name))
    C.export_compressed_tensors(q, CFG, tmp_path / name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / name, dtype=torch.float32)
    with torch.no_grad():
      got = hf(torch.tensor(toks)).logits.numpy()
    want = np.asarray(jq.nn.quantized_apply(model)({"params": q}, jnp.asarray(toks)))
    np.testing.assert_allclose(got, want, atol=1e-5)
    if name == "fp8-dynamic":     # the activations really were quantized (by both)
      deq = np.asarray(model.apply({"params": jq.dequantize_tree(q)}, jnp.asarray(toks)))
      assert np.max(np.abs(deq - want)) > 1e-3
