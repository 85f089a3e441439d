"""Phi-3 / Phi-4 checkpoints: fused ``qkv_proj`` / ``gate_up_proj`` read as jq's separate
projections and written back fused (compressed-tensors), LongRoPE and partial rotary in the config
JSON, and a GGUF export only where llama.cpp's ``llama`` architecture computes the same function.
(Logits against transformers: ``test_hf_reference``.)"""
from __future__ import annotations

import dataclasses
import json

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jq
from jq import cli
from jq.io import compressed_tensors
from jq.io.gguf import qarray_np
from jq.nn import quantized_apply
from jq_models import decoder, hf

CALIB = ["--calib-sequences", "2", "--calib-len", "32"]


@pytest.mark.parametrize("qtype,group,sym", [
    (jq.QType.UINT4, 16, False), (jq.QType.INT3, 8, True), (jq.QType.INT8, None, True)])
def test_fused_parts_concatenate_and_split_exactly(qtype, group, sym):
  """q, k and v of odd widths (not whole packing units of 3- and 4-bit values) joined along the
  output axis and cut apart again: the same codes, scales and zero points."""
  rng = np.random.default_rng(0)
  parts = []
  for n in (20, 6, 6):
    w = jnp.asarray(rng.standard_normal((32, n)), jnp.float32)
    spec = jq.QuantSpec(qtype=qtype, symmetric=sym, group_size=group,
                        granularity=jq.Granularity.GROUP if group else jq.Granularity.TENSOR)
    parts.append(jq.quantize(w, spec))
  if group is None:   # per-tensor: one scale each, so they fuse only when equal
    with pytest.raises(ValueError, match="per-tensor scales that differ"):
      qarray_np.concat_outputs(parts, "qkv_proj")
    parts = [dataclasses.replace(p, scale=parts[0].scale) for p in parts]
  fused = qarray_np.concat_outputs(parts, "qkv_proj")
  assert fused.shape == (32, 32)
  np.testing.assert_array_equal(
      qarray_np._dequantize_np(fused),
      np.concatenate([qarray_np._dequantize_np(p) for p in parts], axis=-1))
  for a, b in zip(qarray_np.split_outputs(fused, [(0, 20), (20, 26), (26, 32)], "qkv_proj"),
                  parts):
    assert (a.shape, tuple(a.tile)) == (b.shape, tuple(b.tile))
    np.testing.assert_array_equal(np.asarray(a.values), np.asarray(b.values))
    np.testing.assert_array_equal(np.asarray(a.scale), np.asarray(b.scale))


def test_config_json_round_trips_longrope_and_partial_rotary(tiny_hf):
  config, _ = hf.load_weights(tiny_hf("phi3", tokenizer=False))
  s = config.rope_scaling
  assert (s.kind, config.rotary_dim, config.fused_projections) == ("longrope", 12, True)
  assert len(s.short_factors) == 6 and s.attention_factor == pytest.approx(
      np.sqrt(1 + np.log(512 / 64) / np.log(64)))
  assert decoder.DecoderConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
  plain = decoder.DecoderConfig().to_json()   # configs written before keep their keys
  assert not {"rotary_dim", "fused_projections"} & set(plain)


def test_bad_phi3_configs_are_refused_by_field(tiny_hf):
  path = tiny_hf("phi3", tokenizer=False)
  raw = json.loads((path / "config.json").read_text())
  short = dict(raw["rope_scaling"], short_factor=[1.0] * 5)
  with pytest.raises(hf.CheckpointError, match="5 short_factor .* needs 6"):
    hf.family_config({**raw, "rope_scaling": short})
  with pytest.raises(hf.CheckpointError, match="partial_rotary_factor=0.5 is not supported for "
                     "llama"):
    hf.family_config({**raw, "model_type": "llama", "rope_scaling": None,
                      "partial_rotary_factor": 0.5})


@pytest.mark.parametrize("recipe", ["w4a16-g32", "w8a8-static"])
def test_compressed_tensors_fuses_and_reads_back_the_same_quantized_tree(tiny_hf, tmp_path,
                                                                          recipe):
  """The export stores q/k/v as one ``qkv_proj`` and gate/up as one ``gate_up_proj`` (zero
  points, group scales, one static input scale), and jq's reader cuts them back into exactly the
  quantized tree it was made from; ``jq-quant eval`` reads the export."""
  pytest.importorskip("compressed_tensors")
  src = tiny_hf("phi3")
  ckpt, out = tmp_path / "q.safetensors", tmp_path / "ct"
  assert cli.main(["quantize", "--model", str(src), "--recipe", recipe, "--no-eval",
                   "--out", str(ckpt), *CALIB]) == 0
  assert cli.main(["export", str(ckpt), "--format", "compressed-tensors", "--out", str(out)]) == 0
  from safetensors import safe_open
  with safe_open(str(out / "model.safetensors"), "np") as f:
    names = set(f.keys())
  assert "model.layers.0.self_attn.qkv_proj.weight_scale" in names
  assert "model.layers.0.mlp.gate_up_proj.weight_scale" in names
  assert not any(".q_proj." in n or ".up_proj." in n for n in names)
  config, _ = hf.load_weights(src)
  _, params = compressed_tensors.load_compressed_tensors(out, config=config)
  ours = jq.io.load(ckpt)["params"]
  for (path, a), (_, b) in zip(jq.tree.leaves_with_paths(params),
                               jq.tree.leaves_with_paths(ours)):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=path)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 12)))
  run = jax.jit(quantized_apply(decoder.Decoder(config).apply))
  np.testing.assert_array_equal(np.asarray(run({"params": params}, ids)),
                                np.asarray(run({"params": ours}, ids)))
  assert cli.main(["eval", str(out), "--eval-windows", "1", "--window", "32"]) == 0


def test_a_fused_layer_quantized_in_part_is_refused_by_name(tiny_hf, tmp_path):
  src = tiny_hf("phi3", tokenizer=False)
  config, params = hf.load_weights(src)
  qvars = jq.quantize_tree({"params": params}, jq.default_rules(jq.W4A16_G32))
  attn = qvars["params"]["layers_1"]["attn"]
  attn["v_proj"]["kernel"] = params["layers_1"]["attn"]["v_proj"]["kernel"]
  with pytest.raises(compressed_tensors.CompressedTensorsError,
                     match=r"layers\.1\.self_attn\.qkv_proj.*only .*q_proj.*k_proj.* are "
                           r"quantized"):
    compressed_tensors.export_compressed_tensors(qvars, config, tmp_path / "ct")


def test_gguf_export_refuses_longrope_and_partial_rotary_and_writes_phi4(tiny_hf, tmp_path):
  """llama.cpp's ``llama`` architecture rotates whole heads with one set of frequencies: LongRoPE
  and partial rotary are refused by field; Phi-4's plain RoPE over whole heads is written unfused
  (``attn_q`` ...), and where llama-cpp-python is installed it computes jq's logits."""
  from jq.io import gguf as G
  config, params = hf.load_weights(tiny_hf("phi3", tokenizer=False))
  with pytest.raises(G.GGUFExportError, match="rope_scaling=.*rotary_dim=12"):
    G.export_gguf({"params": params}, config, None, tmp_path / "x.gguf", "f32", arch="llama")
  src = tiny_hf("phi3", name="phi4", rope_scaling=None, partial_rotary_factor=1.0)
  config, params = hf.load_weights(src)
  out = tmp_path / "phi4.gguf"
  from test_gguf_families import _tokenizer_metadata
  G.export_gguf({"params": params}, config, _tokenizer_metadata(src, config.vocab_size), out,
                "f32", arch="llama")
  names = {t.name for t in gguf.GGUFReader(str(out)).tensors}
  assert "blk.0.attn_q.weight" in names and "blk.0.ffn_gate.weight" in names
  llama_cpp = pytest.importorskip("llama_cpp")
  ids = [int(i) for i in np.random.default_rng(2).integers(3, config.vocab_size, 14)]
  llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, logits_all=True, verbose=False,
                        n_threads=1)
  llm.eval(ids)
  got = np.asarray(llm.scores[:len(ids)], np.float32)
  want = np.asarray(decoder.Decoder(config).apply({"params": params}, jnp.asarray([ids])))[0]
  assert np.abs(got - want).max() / np.abs(want).max() < 2e-3
