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
from conftest import llama_cpp_error

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


def test_gguf_export_is_checked_against_the_architecture(tiny_hf, tmp_path):
  """llama.cpp's ``llama`` architecture rotates whole heads with one set of frequencies: a
  LongRoPE / partial-rotary Phi-3 is refused for it by field, and written unfused where it fits
  (Phi-4: plain RoPE over whole heads); llama.cpp's ``phi3`` takes LongRoPE and partial rotary
  but runs no sliding window, which is refused for it."""
  from jq.io import gguf as G
  config, params = hf.load_weights(tiny_hf("phi3", tokenizer=False))
  with pytest.raises(G.GGUFExportError, match="rope_scaling=.*rotary_dim=12"):
    G.export_gguf({"params": params}, config, None, tmp_path / "x.gguf", "f32", arch="llama")
  windowed, _ = hf.load_weights(tiny_hf("phi3", name="mini-4k", tokenizer=False,
                                        sliding_window=5))
  with pytest.raises(G.GGUFExportError, match=r"sliding_window=5 \(llama.cpp's phi3: None\)"):
    G.export_gguf({"params": params}, windowed, None, tmp_path / "x.gguf", "f32", arch="phi3")
  src = tiny_hf("phi3", name="phi4", rope_scaling=None, partial_rotary_factor=1.0)
  config, params = hf.load_weights(src)
  out = tmp_path / "phi4.gguf"
  from test_gguf_families import _tokenizer_metadata
  G.export_gguf({"params": params}, config, _tokenizer_metadata(src, config.vocab_size), out,
                "f32", arch="llama")
  names = {t.name for t in gguf.GGUFReader(str(out)).tensors}
  assert "blk.0.attn_q.weight" in names and "blk.0.ffn_gate.weight" in names
  pytest.importorskip("llama_cpp")
  ids = [int(i) for i in np.random.default_rng(2).integers(3, config.vocab_size, 14)]
  assert llama_cpp_error(out, config, params, ids) < 2e-3


def test_phi3_gguf_is_fused_and_reads_back_and_runs_in_llama_cpp(tiny_hf, tmp_path, capsys):
  """The ``phi3`` export stores ``attn_qkv`` and ``ffn_up`` ([gate; up]) fused and LongRoPE as
  ``rope_factors_short`` / ``_long`` with its attention factor and original context; jq reads the
  file back into the same model. llama.cpp (where installed) computes jq's logits with the short
  factors in a context within the original one, and with the long ones past it, where the
  positions take them in jq too (llama.cpp decides by context size, jq and transformers per
  call: a short prompt in a long context differs). From the command line, a Q8_0 export of a
  quantized checkpoint (its tokenizer from a GGUF of the model) evaluates to the checkpoint's
  KL."""
  from jq.io import gguf as G
  from jq_models import gguf_weights
  from test_gguf_families import _tokenizer_metadata
  src = tiny_hf("phi3", max_position_embeddings=4096, original_max_position_embeddings=256)
  config, params = hf.load_weights(src)
  out = tmp_path / "phi3.gguf"
  meta = {**_tokenizer_metadata(src, config.vocab_size), "tokenizer.ggml.eos_token_id": 4}
  G.export_gguf({"params": params}, config, meta, out, "f32", arch="phi3")
  reader = gguf.GGUFReader(str(out))
  shapes = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}
  assert shapes["blk.0.attn_qkv.weight"] == (64, 64 + 2 * 32)
  assert shapes["blk.0.ffn_up.weight"] == (64, 2 * 96)
  assert shapes["rope_factors_long.weight"] == (6,) and "blk.0.attn_q.weight" not in shapes
  back, read = gguf_weights.load_gguf(out)
  assert (back.rotary_dim, back.rope_scaling.kind) == (12, "longrope")
  assert back.rope_scaling.long_factors == config.rope_scaling.long_factors
  read = dict(jq.tree.leaves_with_paths(read))
  for path, x in jq.tree.leaves_with_paths(params):
    np.testing.assert_array_equal(np.asarray(read[path]), np.asarray(x), err_msg=path)
  ckpt, q8 = tmp_path / "q.safetensors", tmp_path / "q8.gguf"
  assert cli.main(["quantize", "--model", str(src), "--recipe", "gguf-q8_0", "--no-eval",
                   "--out", str(ckpt)]) == 0
  assert cli.main(["export", str(ckpt), "--format", "gguf", "--out", str(q8),
                   "--tokenizer-gguf", str(out)]) == 0
  capsys.readouterr()
  kl = []
  for path in (ckpt, q8):
    assert cli.main(["eval", str(path), "--json", "--eval-windows", "1", "--window", "64"]) == 0
    kl.append(json.loads(capsys.readouterr().out)["kl"])
  assert abs(kl[0] - kl[1]) < 1e-6

  pytest.importorskip("llama_cpp")
  rng = np.random.default_rng(3)
  for n_ctx, n in ((256, 14), (512, 300)):   # (llama.cpp rounds a context up to 256)
    ids = [int(i) for i in rng.integers(3, config.vocab_size, n)]
    assert llama_cpp_error(out, config, params, ids, n_ctx) < 2e-3, n_ctx


def test_cached_generation_past_the_original_context_equals_full_forwards(tiny_hf):
  """LongRoPE switches to the long factors once a sequence grows past the original context; the
  keys cached before were rotated with the short ones, so (as transformers' Phi-3) the cache is
  recomputed then: cached greedy decoding equals greedy decoding by full forwards (without the
  recompute the tokens part after the switch)."""
  config, params = hf.load_weights(tiny_hf("phi3", tokenizer=False, seed=6,
                                           original_max_position_embeddings=8))
  ids = np.random.default_rng(4).integers(0, config.vocab_size, 6)
  model = decoder.Decoder(config)
  got = decoder.greedy_generate(model.apply, params, ids, 20, config=config)
  seq = list(ids)
  for _ in range(20):
    seq.append(int(np.argmax(np.asarray(model.apply({"params": params}, jnp.asarray([seq])))[0,
                                                                                          -1])))
  assert np.asarray(got).tolist() == seq[6:]
  batch = decoder.greedy_generate(model.apply, params, np.stack([ids, ids]), 20, config=config,
                                  eos_id=int(seq[7]))   # (a row that ended before the
  assert np.asarray(batch)[0].tolist() == seq[6:8] + [seq[7]] * 18   # recompute stays ended)
