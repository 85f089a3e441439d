"""The oracle: jq's decoder gives Hugging Face transformers' (PyTorch) logits and greedy tokens on
tiny random checkpoints of every family (skipped where the ``reference`` extra is missing)."""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAMILIES

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jq_models import decoder, hf, registry  # noqa: E402


def _hf_model(path):
  m = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
  return m.eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_and_greedy_tokens_match_transformers(tiny_hf, family):
  path = tiny_hf(family, tokenizer=False, seed=3)
  config, params = hf.load_weights(path)
  ref_model = _hf_model(path)
  ids = np.random.default_rng(1).integers(0, config.vocab_size, (2, 16))
  with torch.no_grad():
    ref = ref_model(torch.tensor(ids)).logits.numpy()
  ours = np.asarray(decoder.Decoder(config).apply({"params": params}, jnp.asarray(ids)))
  rel = np.abs(ours - ref).max() / np.abs(ref).max()
  assert rel <= 1e-4, f"{family}: max relative logit error {rel:.2e}"

  prompt = ids[:1, :6]
  with torch.no_grad():
    want = ref_model.generate(torch.tensor(prompt), max_new_tokens=10, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, 6:].numpy()
  got = decoder.greedy_generate(decoder.Decoder(config).apply, params, prompt[0], 10,
                                config=config)
  np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("family,fields", [
    ("gemma2", dict(attention_bias=True)),
    ("llama", dict(attention_bias=True, mlp_bias=True)),
    ("qwen3", dict(attention_bias=True)),
], ids=lambda v: v if isinstance(v, str) else "+".join(v))
def test_projection_biases_match_transformers(tiny_hf, family, fields):
  """``attention_bias`` / ``mlp_bias`` (random, nonzero biases: zero ones would hide a dropped
  bias) give transformers' logits; a bias tensor config.json has no use for is refused by name
  (it was dropped silently for the Gemma families)."""
  path = tiny_hf(family, tokenizer=False, seed=4, **fields)
  config, params = hf.load_weights(path)
  ids = np.random.default_rng(2).integers(0, config.vocab_size, (2, 12))
  with torch.no_grad():
    ref = _hf_model(path)(torch.tensor(ids)).logits.numpy()
  ours = np.asarray(decoder.Decoder(config).apply({"params": params}, jnp.asarray(ids)))
  assert np.abs(ours - ref).max() / np.abs(ref).max() <= 1e-4
  raw = json.loads((path / "config.json").read_text())
  (path / "config.json").write_text(json.dumps({**raw, **{k: False for k in fields}}))
  with pytest.raises(hf.CheckpointError, match=r"config.json gives no use for.*_proj\.bias"):
    hf.load_weights(path)


@pytest.mark.parametrize("family,scaling", [
    ("llama", dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16)),
    ("qwen3", dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=8,
                   beta_fast=16, beta_slow=2, truncate=False)),
    ("qwen2", dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16,
                   mscale=0.707, mscale_all_dim=1.0)),
], ids=["llama", "qwen3-betas-untruncated", "qwen2-mscale"])
def test_yarn_rope_scaling_matches_transformers(tiny_hf, family, scaling):
  """YaRN (Qwen3's long context; OLMo 3's): the blended frequencies and the attention factor
  (given, from mscale / mscale_all_dim, or from the factor) give transformers' logits past the
  original context, and cached decoding continues them."""
  path = tiny_hf(family, tokenizer=False, seed=5, rope_scaling=scaling)
  config, params = hf.load_weights(path)
  assert config.rope_scaling.kind == "yarn" and config.rope_scaling.attention_factor != 1.0
  ids = np.random.default_rng(3).integers(0, config.vocab_size, (2, 40))
  with torch.no_grad():
    ref = _hf_model(path)(torch.tensor(ids)).logits.numpy()
  model = decoder.Decoder(config)
  ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))
  assert np.abs(ours - ref).max() / np.abs(ref).max() <= 1e-4
  cache = decoder.init_cache(config, 2, 48)
  _, cache = model.apply({"params": params}, jnp.asarray(ids[:, :39]), cache=cache)
  step, _ = model.apply({"params": params}, jnp.asarray(ids[:, 39:]), cache=cache)
  np.testing.assert_allclose(np.asarray(step)[:, 0], ours[:, 39], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fields,length", [
    (dict(original_max_position_embeddings=8), 16),
    (dict(rope_scaling=None, partial_rotary_factor=1.0, sliding_window=5,
          tie_word_embeddings=False), 16),
    (dict(rope_scaling=None, partial_rotary_factor=None, max_position_embeddings=64,
          rope_parameters={"rope_type": "longrope", "rope_theta": 5000.0,
                           "partial_rotary_factor": 1.0, "attention_factor": 1.3,
                           "short_factor": [1.0, 1.2, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0],
                           "long_factor": [1.0, 2.0, 3.0, 5.0, 8.0, 12.0, 16.0, 20.0]}), 24),
], ids=["longrope-long-factors", "phi3-mini-4k-sliding", "rope-parameters-whole-heads"])
def test_phi3_variants_match_transformers(tiny_hf, fields, length):
  """Phi-3 as its checkpoints come: LongRoPE past the original context (the long factors; a
  greedy generation that crosses it recomputes its cache with them, as transformers' does),
  Phi-3-mini-4k's plain RoPE with a sliding window on every layer and
  an untied head, and transformers 5's ``rope_parameters`` (LongRoPE over whole heads, a given
  attention factor); the fused qkv_proj / gate_up_proj read as jq's separate projections."""
  path = tiny_hf("phi3", tokenizer=False, seed=6, **fields)
  config, params = hf.load_weights(path)
  assert config.fused_projections and "q_proj" in params["layers_0"]["attn"]
  ids = np.random.default_rng(4).integers(0, config.vocab_size, (2, length))
  with torch.no_grad():
    ref = _hf_model(path)(torch.tensor(ids)).logits.numpy()
  ours = np.asarray(decoder.Decoder(config).apply({"params": params}, jnp.asarray(ids)))
  assert np.abs(ours - ref).max() / np.abs(ref).max() <= 1e-4
  with torch.no_grad():
    want = _hf_model(path).generate(torch.tensor(ids[:1, :6]), max_new_tokens=10,
                                    do_sample=False, eos_token_id=None, pad_token_id=0)
  got = decoder.greedy_generate(decoder.Decoder(config).apply, params, ids[0, :6], 10,
                                config=config)
  np.testing.assert_array_equal(np.asarray(got), want[0, 6:].numpy())


def test_chat_template_matches_transformers(tiny_hf):
  path = tiny_hf("qwen2")
  ours = registry.load(str(path)).tokenizer
  theirs = transformers.AutoTokenizer.from_pretrained(str(path))
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
  text = ours.apply_chat_template(messages)
  assert text == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"]


def test_gemma3_attention_softcapping_is_ignored_as_transformers_does(tiny_hf):
  """Gemma 3's config keeps ``attn_logit_softcapping``, but transformers' Gemma 3 attention never
  applies it (only ``final_logit_softcapping``); jq applied it, 5e-2 off transformers' logits on
  a checkpoint that set it. Now ignored with a warning naming the field."""
  path = tiny_hf("gemma3_text", tokenizer=False, seed=7, attn_logit_softcapping=1.0,
                 final_logit_softcapping=3.0)
  with pytest.warns(UserWarning, match="attn_logit_softcapping=1.0 is ignored"):
    config, params = hf.load_weights(path)
  assert config.attn_softcap is None and config.final_softcap == 3.0
  ids = np.random.default_rng(5).integers(0, config.vocab_size, (2, 12))
  with torch.no_grad():
    ref = _hf_model(path)(torch.tensor(ids)).logits.numpy()
  ours = np.asarray(decoder.Decoder(config).apply({"params": params}, jnp.asarray(ids)))
  assert np.abs(ours - ref).max() / np.abs(ref).max() <= 1e-4
