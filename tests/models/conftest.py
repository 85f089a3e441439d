"""Tiny random Hugging Face-format checkpoints of every decoder family ``jq_models.hf`` supports.

The configs carry the real fields of each family (biases, q/k norms, soft-capping, sliding layers,
Llama 3.1 RoPE scaling); the weights are random, written with safetensors' numpy API (no torch), so
the loader and the CLI are tested everywhere and the transformers oracle wherever torch exists.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

_COMMON = dict(vocab_size=288, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)

FAMILIES = {
    "llama": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
                  tie_word_embeddings=False, rope_theta=500000.0,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "mistral": dict(architectures=["MistralForCausalLM"], model_type="mistral", hidden_act="silu",
                    tie_word_embeddings=False, rope_theta=1000000.0, sliding_window=5,
                    head_dim=16),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu",
                  tie_word_embeddings=True, rope_theta=1000000.0, use_sliding_window=False,
                  sliding_window=32768, max_window_layers=21),
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_act="silu",
                  tie_word_embeddings=True, rope_theta=1000000.0, head_dim=32,
                  attention_bias=False),
    "gemma": dict(architectures=["GemmaForCausalLM"], model_type="gemma", head_dim=16,
                  hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
                  rope_theta=10000.0),
    "gemma2": dict(architectures=["Gemma2ForCausalLM"], model_type="gemma2", head_dim=16,
                   hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=24,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4,
                   rope_theta=10000.0),
    "gemma3_text": dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text",
                        head_dim=16, hidden_activation="gelu_pytorch_tanh",
                        query_pre_attn_scalar=24, sliding_window=4, rope_theta=1000000.0,
                        rope_local_base_freq=10000.0, sliding_window_pattern=2),
    "mixtral": dict(architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_act="silu",
                    tie_word_embeddings=False, rope_theta=1000000.0, num_local_experts=4,
                    num_experts_per_tok=2),
    "qwen2_moe": dict(architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe",
                      hidden_act="silu", tie_word_embeddings=False, rope_theta=1000000.0,
                      use_sliding_window=False, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=48, shared_expert_intermediate_size=80,
                      norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[1]),
    "qwen3_moe": dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
                      hidden_act="silu", tie_word_embeddings=False, rope_theta=1000000.0,
                      head_dim=32, attention_bias=False, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=48, norm_topk_prob=True),
    "olmo2": dict(architectures=["Olmo2ForCausalLM"], model_type="olmo2", hidden_act="silu",
                  tie_word_embeddings=False, rope_theta=500000.0, attention_bias=False),
    "olmo3": dict(architectures=["Olmo3ForCausalLM"], model_type="olmo3", hidden_act="silu",
                  tie_word_embeddings=False, attention_bias=False, sliding_window=6,
                  layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                  rope_parameters={"full_attention": {"rope_type": "yarn", "factor": 4.0,
                                                      "original_max_position_embeddings": 16,
                                                      "rope_theta": 500000.0},
                                   "sliding_attention": {"rope_type": "default",
                                                         "rope_theta": 500000.0}}),
    # Phi-4-mini's shape: LongRoPE (short factors up to the original context, long ones past it:
    # test_hf_reference), three quarters of each head rotated, fused qkv_proj / gate_up_proj,
    # a tied head
    "phi3": dict(architectures=["Phi3ForCausalLM"], model_type="phi3", hidden_act="silu",
                 tie_word_embeddings=True, rope_theta=10000.0, partial_rotary_factor=0.75,
                 original_max_position_embeddings=64, sliding_window=None, rms_norm_eps=1e-5,
                 pad_token_id=0,
                 rope_scaling={"type": "longrope",
                               "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                               "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0]}),
    "olmoe": dict(architectures=["OlmoeForCausalLM"], model_type="olmoe", hidden_act="silu",
                  tie_word_embeddings=False, rope_theta=10000.0, num_experts=4,
                  num_experts_per_tok=2, norm_topk_prob=False, attention_bias=False,
                  clip_qkv=None),
}

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] "
          "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIAL = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def hf_config(family: str, **overrides) -> dict:
  return {**_COMMON, **FAMILIES[family], **overrides}


def write_tokenizer(directory: Path, vocab_size: int) -> None:
  """A byte-level BPE ``tokenizer.json`` trained on a few sentences, plus its tokenizer_config."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  text = ["The quick brown fox jumps over the lazy dog.", "Quantization maps floats to integers.",
          "What is the capital of France? Paris is."] * 20
  tok.train_from_iterator(text, trainer)
  tok.save(str(directory / "tokenizer.json"))
  (directory / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<unk>",
       "add_bos_token": False, "chat_template": CHATML}))


def write_checkpoint(directory: Path, family: str, *, seed: int = 0, dtype=np.float32,
                     shards: int = 1, tokenizer: bool = True, **overrides) -> Path:
  """A random checkpoint of ``family`` in ``directory`` (created); returns ``directory``."""
  from safetensors.numpy import save_file
  from jq_models import hf
  directory.mkdir(parents=True, exist_ok=True)
  raw = hf_config(family, **overrides)
  config = hf.family_config(raw)
  rng = np.random.default_rng(seed)
  tensors = {}
  for name, (path, shape) in sorted(hf.hf_tensors(config).items()):
    if path[-1] == "scale":  # norms: around 1 (Gemma stores scale - 1)
      base = 0.0 if config.norm_offset else 1.0
      w = base + 0.1 * rng.standard_normal(shape)
    elif path[-1] == "bias":
      w = 0.1 * rng.standard_normal(shape)
    else:
      w = rng.standard_normal(shape) / np.sqrt(shape[-1])
    tensors[name] = np.asarray(w, np.float32).astype(dtype)
  names = sorted(tensors)
  if shards == 1:
    save_file(tensors, str(directory / "model.safetensors"))
  else:
    weight_map = {}
    for s in range(shards):
      part = names[s::shards]
      fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
      save_file({n: tensors[n] for n in part}, str(directory / fname))
      weight_map.update({n: fname for n in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": weight_map}))
  raw["torch_dtype"] = np.dtype(dtype).name
  (directory / "config.json").write_text(json.dumps(raw, indent=2))
  if tokenizer:
    write_tokenizer(directory, raw["vocab_size"])
  return directory


@pytest.fixture
def tiny_hf(tmp_path):
  """``tiny_hf(family, **kw) -> Path`` of a fresh random checkpoint under ``tmp_path``."""
  def make(family: str, name: str | None = None, **kw) -> Path:
    return write_checkpoint(tmp_path / (name or family), family, **kw)
  return make


def llama_cpp_error(path: Path, config, params, ids: list[int], n_ctx: int = 64) -> float:
  """Max |llama.cpp's logits - jq's| / max |jq's| for ``ids`` through the GGUF at ``path`` and
  jq's decoder of ``config`` / ``params`` (llama-cpp-python: callers skip without it)."""
  import jax.numpy as jnp
  import llama_cpp
  from jq_models import decoder
  llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False,
                        n_threads=1)
  llm.eval(ids)
  got = np.asarray(llm.scores[:len(ids)], np.float32)
  want = np.asarray(decoder.Decoder(config).apply({"params": params}, jnp.asarray([ids])))[0]
  return float(np.abs(got - want).max() / np.abs(want).max())
