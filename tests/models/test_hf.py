"""Hugging Face checkpoints through ``jq_models.hf`` and ``jq_models.registry`` (no torch needed)."""
from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAMILIES, hf_config

from jq_models import decoder, hf, registry


def _logits(config, params, ids):
  return np.asarray(decoder.Decoder(config).apply({"params": params}, jnp.asarray(ids)))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_loads_and_runs(tiny_hf, family):
  config, params = hf.load_weights(tiny_hf(family, tokenizer=False))
  ids = np.arange(12, dtype=np.int32)[None] % config.vocab_size
  out = _logits(config, params, ids)
  assert out.shape == (1, 12, config.vocab_size) and np.isfinite(out).all()
  # the KV-cache decode path gives the same logits as the full forward
  cache = decoder.init_cache(config, 1, 12)
  model = decoder.Decoder(config)
  first, cache = model.apply({"params": params}, jnp.asarray(ids[:, :7]), cache=cache)
  rest, _ = model.apply({"params": params}, jnp.asarray(ids[:, 7:]), cache=cache)
  np.testing.assert_allclose(np.concatenate([first, rest], 1), out, rtol=1e-5, atol=1e-5)


def test_family_features_read_from_config():
  cfg = lambda fam, **kw: hf.family_config(hf_config(fam, **kw))
  assert cfg("qwen2").qkv_bias and not cfg("qwen2").o_bias
  assert cfg("qwen2").sliding_window is None            # use_sliding_window false
  assert cfg("qwen3").qk_norm and cfg("qwen3").head_dim == 32
  g2 = cfg("gemma2")
  assert g2.sliding_layers == (True, False, True) and g2.sliding_window == 4
  assert (g2.attn_softcap, g2.final_softcap, g2.norm_offset) == (50.0, 30.0, 1.0)
  assert g2.query_scale == pytest.approx(24 ** -0.5) and g2.sandwich_norms
  g3 = cfg("gemma3_text")
  assert g3.sliding_layers == (True, False, True) and g3.local_rope_theta == 10000.0
  assert g3.rope_theta == 1e6 and g3.qk_norm
  assert cfg("mistral").sliding_layers is None and cfg("mistral").is_sliding(2)
  ll = cfg("llama")
  assert ll.rope_scaling == decoder.RopeScaling(kind="llama3", factor=8.0, low_freq_factor=1.0,
                                                high_freq_factor=4.0,
                                                original_max_position_embeddings=32)
  # transformers 5 writes rope_parameters instead of rope_theta + rope_scaling: same config
  raw = hf_config("llama")
  params = {"rope_theta": raw.pop("rope_theta"), **raw.pop("rope_scaling")}
  assert hf.family_config({**raw, "rope_parameters": params}) == ll
  assert decoder.DecoderConfig.from_json(json.loads(json.dumps(ll.to_json()))) == ll
  # OLMo 2 / OLMoE: q/k norms over the whole projection; OLMo 2 norms only block outputs
  o2, oe = cfg("olmo2"), cfg("olmoe")
  assert o2.qk_norm_full and not o2.pre_norms and o2.sandwich_norms and not o2.num_experts
  assert oe.qk_norm_full and oe.pre_norms and oe.num_experts == 4 and not oe.normalize_routing
  for c in (o2, oe):
    assert decoder.DecoderConfig.from_json(json.loads(json.dumps(c.to_json()))) == c
  assert "pre_norms" not in ll.to_json() and "qk_norm_full" not in ll.to_json()
  with pytest.raises(hf.CheckpointError, match="clip_qkv"):
    cfg("olmoe", clip_qkv=8.0)
  with pytest.raises(ValueError, match="qk_norm_full is set but qk_norm is False"):
    dataclasses.replace(ll, qk_norm_full=True)
  with pytest.raises(ValueError, match="pre_norms=False needs sandwich_norms"):
    dataclasses.replace(ll, pre_norms=False)


def test_llama3_rope_frequencies():
  """Llama 3.1's scaling: short wavelengths kept, long ones divided by the factor."""
  s = decoder.RopeScaling(kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192)
  base = decoder.rope_inv_freq(128, 500000.0)
  scaled = decoder.rope_inv_freq(128, 500000.0, s)
  wavelen = 2 * np.pi / base
  np.testing.assert_array_equal(scaled[wavelen < 8192 / 4], base[wavelen < 8192 / 4])
  np.testing.assert_allclose(scaled[wavelen > 8192], base[wavelen > 8192] / 8, rtol=1e-6)
  mid = (wavelen >= 2048) & (wavelen <= 8192)
  assert mid.any() and np.all(scaled[mid] < base[mid]) and np.all(scaled[mid] > base[mid] / 8)


def test_sharded_bfloat16_stays_bfloat16(tiny_hf):
  f32 = tiny_hf("qwen2", "f32", tokenizer=False)
  bf16 = tiny_hf("qwen2", "bf16", tokenizer=False, dtype=jnp.bfloat16, shards=3)
  c32, p32 = hf.load_weights(f32)
  c16, p16 = hf.load_weights(bf16)
  assert c16 == c32
  leaves = jax.tree.leaves(p16)
  assert leaves and all(x.dtype == jnp.bfloat16 for x in leaves)
  ids = np.arange(10, dtype=np.int32)[None]
  a, b = _logits(c32, p32, ids), _logits(c16, p16, ids)
  assert np.abs(a - b).max() / np.abs(a).max() < 2e-2   # bf16 rounding of the weights only


def test_truncation_and_padding_in_tokenizer_json_are_not_applied(tiny_hf):
  """A tokenizer.json saved with truncation and padding (BERT-style exports) encodes whole texts:
  a long calibration text is not cut to 16 tokens, a short prompt is not padded."""
  path = tiny_hf("qwen2")
  tj = json.loads((path / "tokenizer.json").read_text())
  tj["truncation"] = {"direction": "Right", "max_length": 16, "strategy": "LongestFirst",
                      "stride": 0}
  tj["padding"] = {"strategy": {"Fixed": 16}, "direction": "Right", "pad_to_multiple_of": None,
                   "pad_id": 0, "pad_type_id": 0, "pad_token": "<unk>"}
  (path / "tokenizer.json").write_text(json.dumps(tj))
  tok = hf.load_tokenizer(path)
  text = "The quick brown fox jumps over the lazy dog. " * 8
  assert len(tok.encode(text)) > 40 and tok.decode(tok.encode(text)) == text
  assert len(tok.encode("Hi")) < 4


def test_registry_loads_a_directory_and_records_its_source(tiny_hf):
  path = tiny_hf("qwen3")
  model = registry.load(str(path))
  assert model.kind == "causal_lm" and model.name == "qwen3"
  assert model.source["kind"] == "hf" and model.source["family"] == "qwen3"
  again = registry.load_source(json.loads(json.dumps(model.source)))
  assert again.config == model.config
  # the checkpoint's chat template, not a hard-coded one
  text = model.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
  assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
  ids = model.prompt_ids("Hi")
  assert model.tokenizer.decode(ids) == text
  # a source whose config changed since is refused by field
  cfg = json.loads((path / "config.json").read_text())
  (path / "config.json").write_text(json.dumps({**cfg, "rope_theta": 5.0}))
  with pytest.raises(ValueError, match="rope_theta"):
    registry.load_source(model.source)
  # so is one whose weights changed in place (same shapes, same header), while a copy elsewhere
  # (other file times) passes as --model
  (path / "config.json").write_text(json.dumps(cfg))
  copy = shutil.copytree(path, path.parent / "moved")
  assert registry.load_source(model.source, override=str(copy)).config == model.config
  f = path / "model.safetensors"
  data = bytearray(f.read_bytes())
  data[len(data) // 2] ^= 0x40   # one byte of one weight (in a sampled chunk: see the docstring)
  f.write_bytes(bytes(data))
  with pytest.raises(ValueError, match=r"weights differ .*model.safetensors.*--model PATH"):
    registry.load_source(model.source)


def test_bad_checkpoints_name_file_and_field(tiny_hf, tmp_path):
  path = tiny_hf("llama", tokenizer=False)
  cfg = json.loads((path / "config.json").read_text())

  def with_config(**kw):
    (path / "config.json").write_text(json.dumps({**cfg, **kw}))

  with_config(model_type="falcon")
  with pytest.raises(hf.CheckpointError, match=r"config.json: model_type 'falcon'.*supported"):
    hf.load_weights(path)
  with_config(rope_scaling={"rope_type": "dynamic", "factor": 4.0})
  with pytest.raises(hf.CheckpointError, match="rope scaling type 'dynamic' is not supported"):
    hf.load_weights(path)
  with_config(rope_scaling={"rope_type": "longrope", "factor": 4.0})
  with pytest.raises(hf.CheckpointError, match="rope scaling 'longrope' lacks field "
                     "'short_factor'"):
    hf.load_weights(path)
  with_config(num_hidden_layers=None)
  with pytest.raises(hf.CheckpointError, match="'num_hidden_layers' is missing"):
    hf.load_weights(path)
  with_config(vocab_size=None)   # (read inside the DecoderConfig call: its file was named twice)
  with pytest.raises(hf.CheckpointError, match=r"^[^:]*config.json: field 'vocab_size' is missing"):
    hf.load_weights(path)
  with_config(intermediate_size=80)   # the tensors disagree with the config
  with pytest.raises(hf.CheckpointError, match=r"model.safetensors: tensor 'model.layers.0.mlp"):
    hf.load_weights(path)
  with_config(num_hidden_layers=4)    # a layer the weights do not have
  with pytest.raises(hf.CheckpointError, match=r"missing, e.g. \['model.layers.3"):
    hf.load_weights(path)

  sharded = tiny_hf("qwen2", "sharded", shards=2, tokenizer=False)
  (sharded / "model-00002-of-00002.safetensors").unlink()
  with pytest.raises(hf.CheckpointError, match="shard 'model-00002-of-00002.safetensors'"):
    hf.load_weights(sharded)
  index = json.loads((sharded / "model.safetensors.index.json").read_text())
  name = next(iter(index["weight_map"]))
  index["weight_map"][name] = "../outside.safetensors"
  (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(hf.CheckpointError, match="points outside"):
    hf.load_weights(sharded)

  tok_dir = tiny_hf("gemma", "tok")
  (tok_dir / "tokenizer.json").write_text('{"model": {"type": "Nonsense"}}')
  with pytest.raises(hf.CheckpointError, match="tokenizer.json: the tokenizer cannot be built"):
    hf.load_tokenizer(tok_dir)
  small = tiny_hf("qwen2", "small", vocab_size=200)   # its tokenizer has 261 tokens
  with pytest.raises(ValueError, match=r"tokenizer has 2\d\d tokens but the model.s vocabulary has 200 rows"):
    registry.load(str(small))
  with pytest.raises(ValueError, match="not a Hugging Face checkpoint"):
    registry.load(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no such file"):
    registry.load(str(tmp_path / "absent"))


def test_awq_folds_into_gemma_norms_exactly(tiny_hf):
  """Gemma's RMSNorm multiplies by ``1 + scale``: AWQ's fold must keep the offset (found, checked)."""
  import jq
  from jq.ptq import quantize_model
  model = registry.load(str(tiny_hf("gemma2")))
  batches = [np.random.default_rng(i).integers(0, 288, (2, 32)).astype(np.int32) for i in range(3)]
  res = quantize_model(model.module, model.variables, jq.recipe_rules("awq-w4a16-g128"), batches)
  folds = [line for line in res.log if "folded into" in line and "input_norm" in line]
  assert len(folds) == 3 and all("1 + scale" in line for line in folds)
  ids = jnp.asarray(batches[0])
  before = np.asarray(model.module.apply(model.variables, ids))
  after = np.asarray(model.module.apply(res.ref, ids))
  assert np.abs(after - before).max() / np.abs(before).max() < 1e-5
  changed = res.ref["params"]["layers_0"]["input_norm"]["scale"]
  assert not np.allclose(changed, model.params["layers_0"]["input_norm"]["scale"])


def test_cli_lengths_default_to_a_short_context(tiny_hf, tmp_path, capsys):
  """A model with a context under 512 tokens quantizes, calibrates (in memory and streamed) and
  evaluates without --window / --calib-len: they default to its context; given, longer is
  refused."""
  from jq import cli
  from jq import io as jqio
  path = tiny_hf("llama", max_position_embeddings=64)
  out = tmp_path / "q.safetensors"
  assert cli.main(["quantize", "--model", str(path), "--recipe", "awq-w4a16-g32", "--out",
                   str(out), "--calib-sequences", "2", "--eval-windows", "2"]) == 0, \
      capsys.readouterr().err
  assert jqio.load_header(out)["metadata"]["quality"]["eval_tokens"] == 2 * 63
  assert cli.main(["quantize", "--model", str(path), "--recipe", "awq-w4a16-g32", "--stream",
                   "--out", str(tmp_path / "s"), "--calib-sequences", "2"]) == 0
  capsys.readouterr()
  assert cli.main(["eval", str(out), "--eval-windows", "1", "--json"]) == 0
  assert json.loads(capsys.readouterr().out)["eval_tokens"] == 63
  assert cli.main(["eval", str(out), "--window", "65"]) == 1
  assert "--window (evaluation window) = 65 exceeds the model's context of 64" in \
      capsys.readouterr().err
  assert cli.main(["quantize", "--model", str(path), "--recipe", "awq-w4a16-g32", "--stream",
                   "--out", str(tmp_path / "s2"), "--calib-len", "100"]) == 1
  assert "--calib-len (calibration sequence length) = 100 exceeds" in capsys.readouterr().err
  assert cli.main(["generate", str(out), "--prompt", "Hi", "--max-new-tokens", "60"]) == 1
  assert "--max-new-tokens 60 after the prompt's" in capsys.readouterr().err
  afile = tmp_path / "afile"
  afile.write_text("")
  assert cli.main(["export", str(out), "--format", "gguf", "--out", str(afile / "x.gguf")]) == 1
  assert f"{afile} is a file, not a directory" in capsys.readouterr().err


def test_export_and_generate_read_no_float_weights(tiny_hf, tmp_path, monkeypatch):
  """``export`` and ``generate`` need the float model's config, tokenizer and tree, not its
  weights (a streamed checkpoint of a model bigger than memory would not fit beside them):
  loaded with ``weights=False``, the tree is shapes only."""
  from jq import cli
  path = tiny_hf("qwen2")
  ckpt = tmp_path / "q.safetensors"
  assert cli.main(["quantize", "--model", str(path), "--recipe", "gguf-q8_0", "--no-eval",
                   "--out", str(ckpt)]) == 0
  shapes = registry.load(str(path), weights=False)
  leaf = shapes.params["layers_0"]["attn"]["q_proj"]["kernel"]
  assert isinstance(leaf, jax.ShapeDtypeStruct) and leaf.shape == (64, 64)

  def no_weights(*a, **k):
    raise AssertionError("float weights read")
  monkeypatch.setattr(hf, "load_weights", no_weights)
  assert cli.main(["export", str(ckpt), "--format", "gguf", "--out",
                   str(tmp_path / "q.gguf")]) == 0
  assert cli.main(["generate", str(ckpt), "--prompt", "Hi", "--max-new-tokens", "3"]) == 0
  with pytest.raises(AssertionError, match="float weights read"):   # (eval compares with them)
    cli.main(["eval", str(ckpt), "--eval-windows", "1", "--window", "32"])
