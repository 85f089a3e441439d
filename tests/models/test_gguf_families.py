"""GGUFs of every supported architecture, written the way llama.cpp's converter writes them (Q/K
rows permuted for ``llama``, Gemma norms stored as ``1 + w``, Llama 3.1 scaling as ``rope_freqs``),
load into the same model as the Hugging Face checkpoint they came from; where transformers reads
the GGUF too, its logits agree."""
from __future__ import annotations

import dataclasses
import json

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import llama_cpp_error

from jq.io import decoder_names
from jq_models import decoder, gguf_weights, hf, registry

ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
        "gemma2": "gemma2", "gemma3_text": "gemma3", "mixtral": "llama", "qwen2_moe": "qwen2moe",
        "qwen3_moe": "qwen3moe", "olmo2": "olmo2", "olmoe": "olmoe"}
# the GGUF conventions are llama.cpp's: gemma2 slides on every other layer, gemma3 on 5 of 6,
# and both scale queries by 1/sqrt(head_dim) (below 27B); qwen2moe does not renormalize the
# routing weights and qwen3moe does, and both have experts in every layer (widths: multiples of
# the 32-wide blocks)
OVERRIDES = {"gemma2": dict(query_pre_attn_scalar=16),
             "gemma3_text": dict(query_pre_attn_scalar=16, sliding_window_pattern=6),
             "qwen2_moe": dict(norm_topk_prob=False, mlp_only_layers=[], moe_intermediate_size=64,
                               shared_expert_intermediate_size=96),
             "qwen3_moe": dict(norm_topk_prob=True, mlp_only_layers=[], moe_intermediate_size=64),
             "olmoe": dict(num_key_value_heads=4)}   # (llama.cpp's olmoe: no grouped queries)


def to_gguf(src, out, family):
  """A minimal llama.cpp-style converter (F32 tensors) of a Hugging Face checkpoint."""
  raw = json.loads((src / "config.json").read_text())
  config, params = hf.load_weights(src)
  arch = ARCH[family]
  w = gguf.GGUFWriter(str(out), arch)
  w.add_block_count(config.num_layers)
  w.add_context_length(config.max_seq_len)
  w.add_embedding_length(config.hidden_size)
  w.add_feed_forward_length(config.intermediate_size)
  w.add_head_count(config.num_heads)
  w.add_head_count_kv(config.num_kv_heads)
  w.add_key_length(config.head_dim)
  w.add_value_length(config.head_dim)
  w.add_rope_freq_base(config.rope_theta)
  w.add_layer_norm_rms_eps(config.rms_norm_eps)
  w.add_vocab_size(config.vocab_size)
  if config.sliding_window and family.startswith("gemma"):
    w.add_sliding_window(config.sliding_window)
  if config.attn_softcap:
    w.add_attn_logit_softcapping(config.attn_softcap)
  if config.final_softcap:
    w.add_final_logit_softcapping(config.final_softcap)
  if config.num_experts:
    w.add_expert_count(config.num_experts)
    w.add_expert_used_count(config.experts_per_token)
    w.add_expert_feed_forward_length(config.expert_size or config.intermediate_size)
    if config.shared_expert_size:
      w.add_expert_shared_feed_forward_length(config.shared_expert_size)
  if config.rope_scaling is not None:   # llama.cpp stores Llama 3.1's scaling as factors
    base = decoder.rope_inv_freq(config.head_dim, config.rope_theta)
    scaled = decoder.rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
    w.add_tensor("rope_freqs.weight", (base / scaled).astype(np.float32))
  stacked = {}
  for t in decoder_names.decoder_tensors(config):
    x = params
    for k in t.path:
      x = x[k]
    x = np.asarray(x, np.float32)
    x = x.T if t.transpose else x
    if t.qk and arch == "llama":
      x = gguf_weights.permute_qk(x, config.num_heads if t.qk == "q" else config.num_kv_heads)
    if t.path[-1] == "scale" and config.norm_offset:
      x = x + config.norm_offset
    if t.path[-2] == "shared_expert_gate":   # llama.cpp's is a vector (n_embd)
      x = x.reshape(-1)
    if t.expert is None:
      w.add_tensor(t.gguf, np.ascontiguousarray(x))
    else:   # llama.cpp stacks a layer's experts: (E, out, in)
      stacked.setdefault(t.gguf, {})[t.expert] = x
  for name, experts in stacked.items():
    w.add_tensor(name, np.stack([experts[e] for e in sorted(experts)]))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  assert raw["model_type"] == family
  return out


@pytest.mark.parametrize("family", sorted(ARCH))
def test_gguf_loads_as_its_hugging_face_source(tiny_hf, tmp_path, family):
  src = tiny_hf(family, tokenizer=False, **OVERRIDES.get(family, {}))
  path = to_gguf(src, tmp_path / f"{family}.gguf", family)
  hf_config, hf_params = hf.load_weights(src)
  config, params = gguf_weights.load_gguf(path)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 14)))
  want = np.asarray(decoder.Decoder(hf_config).apply({"params": hf_params}, ids))
  got = np.asarray(decoder.Decoder(config).apply({"params": params}, ids))
  assert np.abs(got - want).max() / np.abs(want).max() < 1e-5


# qwen3 is left out: transformers' GGUF reader ignores qwen3.attention.key_length (head_dim)
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_gguf_logits_match_transformers_gguf_loader(tiny_hf, tmp_path, family):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  overrides = OVERRIDES.get(family, {})
  if family == "gemma2":   # transformers' reader takes query_pre_attn_scalar = 256 (real models')
    overrides = dict(head_dim=256, query_pre_attn_scalar=256)
  src = tiny_hf(family, tokenizer=False, **overrides)
  if family == "llama":   # transformers' GGUF reader does not read rope_freqs: plain RoPE here
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("rope_scaling")
    (src / "config.json").write_text(json.dumps(cfg))
  path = to_gguf(src, tmp_path / f"{family}.gguf", family)
  config, params = gguf_weights.load_gguf(path)
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
  ids = np.random.default_rng(1).integers(0, config.vocab_size, (2, 14))
  with torch.no_grad():
    want = ref(torch.tensor(ids)).logits.numpy()
  got = np.asarray(decoder.Decoder(config).apply({"params": params}, jnp.asarray(ids)))
  assert np.abs(got - want).max() / np.abs(want).max() < 1e-4


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_moe_export_logits_match_transformers_gguf_loader(tiny_hf, tmp_path, family):
  """jq's GGUF export of a quantized mixture of experts (each layer's experts stacked into
  ``ffn_{gate,up,down}_exps``, the float routers F32, Qwen2-MoE's shared expert and its gate),
  read by transformers' own GGUF loader into the source's config, computes jq's logits."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  import jq
  from jq import nn as jqnn
  from jq.io import gguf as G
  src = tiny_hf(family, tokenizer=False, **OVERRIDES[family])
  config, params = hf.load_weights(src)
  model = decoder.Decoder(config)
  ids = np.random.default_rng(4).integers(0, config.vocab_size, (2, 14))
  lays = jqnn.layouts(model, {"params": params}, jnp.asarray(ids))
  q = jq.quantize_tree({"params": params}, jq.recipe_rules("gguf-q8_0"), layouts=lays)
  out = tmp_path / "gguf" / f"{family}.gguf"
  out.parent.mkdir()
  written = G.export_gguf(q, config, None, out, "q8_0", arch=ARCH[family])
  assert written["blk.0.ffn_gate_exps.weight"].name == "Q8_0"
  assert written["blk.0.ffn_gate_inp.weight"].name == "F32"     # the router stays float
  reader = gguf.GGUFReader(str(out))
  exps = next(t for t in reader.tensors if t.name == "blk.0.ffn_down_exps.weight")
  assert [int(n) for n in exps.shape] == [config.expert_size, config.hidden_size, 4]
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      str(out.parent), gguf_file=out.name, config=transformers.AutoConfig.from_pretrained(src),
      dtype=torch.float32).eval()
  with torch.no_grad():
    want = ref(torch.tensor(ids)).logits.numpy()
  got = np.asarray(model.apply(jq.dequantize_tree(q), jnp.asarray(ids)))
  assert np.abs(got - want).max() / np.abs(want).max() < 1e-4


def test_registry_records_gguf_architecture(tiny_hf, tmp_path):
  src = tiny_hf("qwen3", tokenizer=False)
  path = to_gguf(src, tmp_path / "q.gguf", "qwen3")
  config, _ = gguf_weights.load_gguf(path)
  assert config.qk_norm and config.tie_embeddings
  with pytest.raises(gguf_weights.GGUFError, match="tokenizer"):
    registry.load(str(path))   # a GGUF without a tokenizer cannot be a CLI model


@pytest.mark.parametrize("family", sorted(ARCH))
def test_quantized_export_to_every_architecture_round_trips(tiny_hf, tmp_path, family):
  """jq's GGUF export writes each family's llama.cpp architecture (Q/K order, Gemma's 1 + w
  norms, biases, q/k norms, soft-capping, rope_freqs); read back, the quantized model's logits
  are the ones jq computes (Q8_0 holds the gguf-q8_0 grid exactly)."""
  import jq
  from jq import nn as jqnn
  from jq.io import gguf as G
  from jq.io.gguf.llama import arch_problems
  src = tiny_hf(family, tokenizer=False, **OVERRIDES.get(family, {}))
  config, params = hf.load_weights(src)
  model = decoder.Decoder(config)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 14)))
  lays = jqnn.layouts(model, {"params": params}, ids)
  q = jq.quantize_tree({"params": params}, jq.recipe_rules("gguf-q8_0"), layouts=lays)
  arch = ARCH[family]
  assert arch_problems(config, arch) == []
  out = tmp_path / "q.gguf"
  G.export_gguf(q, config, None, out, "q8_0", arch=arch)
  back_config, back = gguf_weights.load_gguf(out)
  want = np.asarray(model.apply(jq.dequantize_tree(q), ids))
  got = np.asarray(decoder.Decoder(back_config).apply({"params": back}, ids))
  assert np.abs(got - want).max() / np.abs(want).max() < 1e-5
  # read into the source's own config (Gemma: norms stored as 1 + w come back as w)
  again = gguf_weights.read_gguf_params(out, config)
  got = np.asarray(model.apply({"params": again}, ids))
  assert np.abs(got - want).max() / np.abs(want).max() < 1e-5


def test_architecture_mismatches_are_named():
  from jq.io.gguf.llama import arch_problems
  mistral = hf.family_config(hf_config_of("mistral"))
  assert any("sliding_window=5" in p for p in arch_problems(mistral, "llama"))
  qwen2 = hf.family_config(hf_config_of("qwen2"))
  assert any("qkv_bias=True" in p for p in arch_problems(qwen2, "qwen3"))
  g3 = hf.family_config(hf_config_of("gemma3_text"))   # slides on every other layer, not 5 of 6
  assert any(p.startswith("sliding_layers=") for p in arch_problems(g3, "gemma3"))
  yarn = hf.family_config({**hf_config_of("llama"), "rope_scaling": dict(
      rope_type="yarn", factor=4.0, original_max_position_embeddings=16)})
  assert any(p.startswith("rope_scaling=RopeScaling(kind='yarn'") for p in
             arch_problems(yarn, "llama"))    # jq writes rope_freqs, which has no YaRN scale
  olmo3 = hf.family_config(hf_config_of("olmo3"))      # sliding layers: not written for olmo2
  assert any(p.startswith("sliding_window=6") for p in arch_problems(olmo3, "olmo2"))
  olmoe = hf.family_config(hf_config_of("olmoe"))      # grouped queries: k_norm not n_embd wide
  assert any(p.startswith("num_kv_heads=2") for p in arch_problems(olmoe, "olmoe"))
  assert any(p.startswith("qk_norm_full=True") for p in arch_problems(olmoe, "qwen3moe"))


def hf_config_of(family):
  from conftest import hf_config
  return hf_config(family)


def _tokenizer_metadata(src, vocab_size):
  """gpt2-style GGUF tokenizer metadata of the fixture's tokenizer.json, padded to the vocab."""
  tok = json.loads((src / "tokenizer.json").read_text())
  vocab = tok["model"]["vocab"]
  for t in tok["added_tokens"]:
    vocab[t["content"]] = t["id"]
  tokens = [None] * vocab_size
  for piece, i in vocab.items():
    tokens[i] = piece
  types = [3 if t in ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>") else 1 for t in tokens]
  for i, t in enumerate(tokens):
    if t is None:
      tokens[i], types[i] = f"[PAD{i}]", 5
  merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
  return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default",
          "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
          "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": 1,
          "tokenizer.ggml.eos_token_id": 2}


@pytest.mark.parametrize("family", sorted(ARCH))
def test_llama_cpp_runs_every_exported_architecture(tiny_hf, tmp_path, family):
  """Optional (needs llama-cpp-python): llama.cpp loads jq's export of each architecture and
  computes jq's logits (F32 tensors, so the comparison is of the architectures, not of rounding)."""
  pytest.importorskip("llama_cpp")
  from jq.io import gguf as G
  src = tiny_hf(family, **OVERRIDES.get(family, {}))
  config, params = hf.load_weights(src)
  out = tmp_path / "f32.gguf"
  G.export_gguf({"params": params}, config, _tokenizer_metadata(src, config.vocab_size), out,
                "f32", arch=ARCH[family])
  ids = [int(i) for i in np.random.default_rng(2).integers(3, config.vocab_size, 14)]
  assert llama_cpp_error(out, config, params, ids) < 2e-3, family   # seen: 3e-4 .. 8e-4


def test_cli_evaluates_a_gemma2_gguf_like_its_checkpoint(tiny_hf, tmp_path, capsys):
  """eval of a non-llama GGUF jq wrote reads it into the source's config (1 + w norms back to w)
  and gives the jq checkpoint's KL."""
  from jq import cli
  from jq import io as jqio
  from jq.io import gguf as G
  src = tiny_hf("gemma2", **OVERRIDES["gemma2"])
  ckpt, out = tmp_path / "q.safetensors", tmp_path / "q.gguf"
  small = ["--eval-windows", "1", "--window", "64"]
  assert cli.main(["quantize", "--model", str(src), "--recipe", "gguf-q8_0", "--no-eval",
                   "--out", str(ckpt)]) == 0
  meta = jqio.load_header(ckpt)["metadata"]
  model = registry.load(str(src))
  G.export_gguf(jqio.load(ckpt), model.config, None, out, "q8_0", arch="gemma2",
                extra_metadata={"jq.source": json.dumps(meta["source"]), "jq.recipe": "gguf-q8_0"})
  capsys.readouterr()
  kl = []
  for path in (ckpt, out):
    assert cli.main(["eval", str(path), "--json", *small]) == 0
    kl.append(json.loads(capsys.readouterr().out)["kl"])
  assert abs(kl[0] - kl[1]) < 1e-6


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_cli_quantizes_and_exports_a_moe_gguf(tiny_hf, tmp_path, capsys, family):
  """A mixture-of-experts GGUF through the CLI as a llama.cpp user would take it: quantize
  (gguf-q4_0), export to GGUF (stacked experts again), evaluate: the export gives the
  checkpoint's KL."""
  from jq import cli
  from jq.io import gguf as G
  src = tiny_hf(family, **OVERRIDES.get(family, {}))
  config, params = hf.load_weights(src)
  source = tmp_path / "moe-f32.gguf"
  G.export_gguf({"params": params}, config, _tokenizer_metadata(src, config.vocab_size), source,
                "f32", arch=ARCH[family])
  ckpt, out = tmp_path / "q.safetensors", tmp_path / "q.gguf"
  small = ["--eval-windows", "1", "--window", "64"]
  assert cli.main(["quantize", "--model", str(source), "--recipe", "gguf-q4_0", "--no-eval",
                   "--out", str(ckpt)]) == 0
  assert cli.main(["export", str(ckpt), "--format", "gguf", "--out", str(out)]) == 0
  assert "blk.1.ffn_up_exps.weight" in {t.name for t in gguf.GGUFReader(str(out)).tensors}
  capsys.readouterr()
  kl = []
  for path in (ckpt, out):
    assert cli.main(["eval", str(path), "--json", *small]) == 0
    kl.append(json.loads(capsys.readouterr().out)["kl"])
  assert kl[0] > 0 and abs(kl[0] - kl[1]) < 1e-6


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_cli_exports_a_hugging_face_checkpoint_to_gguf_with_a_checked_tokenizer(tiny_hf, tmp_path,
                                                                               capsys, family):
  """A Hugging Face source has no GGUF tokenizer: by default its tokenizer.json is converted
  (checked to tokenize as the checkpoint does); ``--tokenizer-gguf`` takes one from any GGUF of
  the model instead, after the same check (a GGUF of another tokenizer is refused, naming the
  flag); both exports evaluate to the checkpoint's KL (llama: with Llama 3.1's RoPE scaling,
  whose rope_freqs tensor the llama reader took for a stray tensor)."""
  from jq import cli
  from jq.io import gguf as G
  src = tiny_hf(family)
  config, params = hf.load_weights(src)
  meta = {**_tokenizer_metadata(src, config.vocab_size), "tokenizer.ggml.eos_token_id": 4}
  tok_gguf = tmp_path / "any-quant.gguf"
  G.export_gguf({"params": params}, config, meta, tok_gguf, "f32", arch=ARCH[family])
  ckpt, out = tmp_path / "q.safetensors", tmp_path / "q.gguf"
  assert cli.main(["quantize", "--model", str(src), "--recipe", "gguf-q8_0", "--no-eval",
                   "--out", str(ckpt)]) == 0
  export = ["export", str(ckpt), "--format", "gguf", "--out", str(out)]
  other = tmp_path / "other.gguf"   # the same vocabulary without its merges: other ids
  G.export_gguf({"params": params}, config, {**meta, "tokenizer.ggml.merges": meta[
      "tokenizer.ggml.merges"][:5]}, other, "f32", arch=ARCH[family])
  capsys.readouterr()
  bigger_src = tiny_hf(family, name="bigger", vocab_size=config.vocab_size + 12)
  bigger_cfg, bigger_params = hf.load_weights(bigger_src)
  bigger = tmp_path / "bigger.gguf"   # another model's tokenizer, of another vocabulary size
  G.export_gguf({"params": bigger_params}, bigger_cfg,
                {**_tokenizer_metadata(bigger_src, bigger_cfg.vocab_size),
                 "tokenizer.ggml.eos_token_id": 4}, bigger, "f32", arch=ARCH[family])
  for argv, match in (([*export, "--tokenizer-gguf", str(other)],
                       "differently (first at token"),
                      ([*export, "--tokenizer-gguf", str(bigger)],
                       f"{config.vocab_size + 12} tokens, the model's vocab_size is "
                       f"{config.vocab_size}"),
                      (["export", str(ckpt), "--format", "compressed-tensors", "--out",
                        str(tmp_path / "ct"), "--tokenizer-gguf", str(tok_gguf)],
                       "--tokenizer-gguf applies to --format gguf only")):
    assert cli.main(argv) != 0
    assert match in capsys.readouterr().err
  assert not out.exists()
  assert cli.main([*export, "--tokenizer-gguf", str(tok_gguf)]) == 0
  converted = tmp_path / "converted.gguf"
  assert cli.main([*export[:-1], str(converted)]) == 0
  capsys.readouterr()
  kl = []
  for path in (ckpt, out, converted):
    assert cli.main(["eval", str(path), "--json", "--eval-windows", "1", "--window", "64"]) == 0
    kl.append(json.loads(capsys.readouterr().out)["kl"])
  assert kl[0] > 0 and abs(kl[0] - kl[1]) < 1e-6 and abs(kl[0] - kl[2]) < 1e-6
  written = G.read_gguf_metadata(converted)
  assert written["tokenizer.ggml.pre"] == "gpt-2" and written["tokenizer.ggml.eos_token_id"] == 4
  assert written["tokenizer.ggml.tokens"] == meta["tokenizer.ggml.tokens"]
  assert written["tokenizer.ggml.merges"] == meta["tokenizer.ggml.merges"]


def test_gemma3_linear_rope_scaling_exports_and_runs_in_llama_cpp(tiny_hf, tmp_path):
  """Gemma 3 4B-27B scale RoPE linearly (factor 8) on their global layers only; llama.cpp's
  gemma3 does the same from ``rope.scaling.*`` (the export was refused): jq reads its export back
  with the scaling, and llama.cpp (where installed) computes jq's logits past the window."""
  from jq.io import gguf as G
  src = tiny_hf("gemma3_text", **OVERRIDES["gemma3_text"], num_hidden_layers=6,
                rope_theta=10000.0, rope_scaling={"rope_type": "linear", "factor": 8.0})
  config, params = hf.load_weights(src)
  assert config.rope_scaling.kind == "linear"
  out = tmp_path / "g3.gguf"
  G.export_gguf({"params": params}, config, _tokenizer_metadata(src, config.vocab_size), out,
                "f32", arch="gemma3")
  back, _ = gguf_weights.load_gguf(out)
  assert back.rope_scaling == config.rope_scaling
  pytest.importorskip("llama_cpp")
  ids = [int(i) for i in np.random.default_rng(4).integers(3, config.vocab_size, 40)]
  assert llama_cpp_error(out, config, params, ids) < 2e-3
  plain = dataclasses.replace(config, rope_scaling=None)   # (the 6th layer's scaling is felt)
  assert llama_cpp_error(out, plain, params, ids) > 1e-2
