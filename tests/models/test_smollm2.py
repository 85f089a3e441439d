"""SmolLM2 / Llama model, GGUF weight loading, tokenizer and KV-cache generation.

Fast tests use a tiny random Llama written to a GGUF file here; the slow ones load the real
SmolLM2-135M-Instruct Q4_1 GGUF once per module and share one compiled (1, 1024) forward.
"""
from __future__ import annotations

import dataclasses
import functools

import flax
import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jq.eval.perplexity import perplexity
from jq_models import fetch, gguf_weights, decoder, text, tokenizer

TINY = decoder.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                           num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=10000.0,
                           max_seq_len=128)
LLAMA_CPP_PPL_1024 = 27.97  # llama-perplexity, first 1024 tokens of lee_background.cor, no BOS


# ---------------------------------------------------------------------------------------------
# Tiny model: fast invariants.


@functools.cache
def _tiny_params(config=TINY, seed=0):
  tokens = jnp.zeros((1, 4), jnp.int32)
  params = jax.jit(decoder.Llama(config).init)(jax.random.key(seed), tokens)["params"]
  # Norm scales are ones at init; randomize them so the loader mapping is really checked.
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda p, x: x + jnp.asarray(rng.normal(size=x.shape) * 0.1, x.dtype)
      if p[-1].key == "scale" else x, params)


def _write_gguf(path, config, params, *, arch="llama"):
  """A llama.cpp-style GGUF: F32 tensors in (out, in) numpy order, Q/K rows permuted."""
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(config.num_layers)
  w.add_context_length(config.max_seq_len)
  w.add_embedding_length(config.hidden_size)
  w.add_feed_forward_length(config.intermediate_size)
  w.add_head_count(config.num_heads)
  w.add_head_count_kv(config.num_kv_heads)
  w.add_rope_freq_base(config.rope_theta)
  w.add_layer_norm_rms_eps(config.rms_norm_eps)
  w.add_rope_dimension_count(config.head_dim)
  w.add_vocab_size(config.vocab_size)
  f32 = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))
  w.add_tensor("token_embd.weight", f32(params["embed"]["embedding"]))
  w.add_tensor("output_norm.weight", f32(params["final_norm"]["scale"]))
  if "lm_head" in params:
    w.add_tensor("output.weight", f32(params["lm_head"]["kernel"].T))
  names = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj"}
  mlp = {"ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj"}
  for i in range(config.num_layers):
    layer = params[f"layers_{i}"]
    for g, n in names.items():
      m = np.asarray(layer["attn"][n]["kernel"]).T
      if g == "attn_q":
        m = gguf_weights.permute_qk(m, config.num_heads)
      elif g == "attn_k":
        m = gguf_weights.permute_qk(m, config.num_kv_heads)
      w.add_tensor(f"blk.{i}.{g}.weight", f32(m))
    for g, n in mlp.items():
      w.add_tensor(f"blk.{i}.{g}.weight", f32(np.asarray(layer["mlp"][n]["kernel"]).T))
    w.add_tensor(f"blk.{i}.attn_norm.weight", f32(layer["input_norm"]["scale"]))
    w.add_tensor(f"blk.{i}.ffn_norm.weight", f32(layer["post_attn_norm"]["scale"]))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_round_trip_unpermutes_qk(tmp_path, tied):
  config = dataclasses.replace(TINY, tie_embeddings=tied)
  params = _tiny_params(config)
  path = _write_gguf(tmp_path / "tiny.gguf", config, params)
  loaded_config, loaded = gguf_weights.load_llama_gguf(path)
  assert loaded_config == dataclasses.replace(
      config, rms_norm_eps=float(np.float32(config.rms_norm_eps)))
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)
  assert ("lm_head" in loaded) is not tied


def test_permute_qk_round_trip_and_rope_equivalence():
  """llama.cpp's interleaved RoPE on permuted rows gives the same attention scores as HF
  rotate_half RoPE on un-permuted rows; this is why unpermute_qk is the right direction."""
  rng = np.random.default_rng(0)
  n_heads, hd, d, t = 3, 8, 16, 5
  w_hf = rng.normal(size=(n_heads * hd, d)).astype(np.float32)
  w_cpp = gguf_weights.permute_qk(w_hf, n_heads)
  np.testing.assert_array_equal(gguf_weights.unpermute_qk(w_cpp, n_heads), w_hf)
  x = rng.normal(size=(1, t, d)).astype(np.float32)
  pos = jnp.arange(t)

  def interleaved_rope(q):  # llama.cpp "normal" rope: pairs (2i, 2i + 1)
    inv = 1.0 / (10000.0 ** (np.arange(0, hd, 2) / hd))
    ang = np.arange(t)[:, None] * inv[None]
    c, s = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
    q0, q1 = q[..., 0::2], q[..., 1::2]
    return np.stack([q0 * c - q1 * s, q0 * s + q1 * c], axis=-1).reshape(q.shape)

  q_hf = np.asarray(decoder.apply_rope(jnp.asarray((x @ w_hf.T).reshape(1, t, n_heads, hd)),
                                       pos, 10000.0))
  q_cpp = interleaved_rope((x @ w_cpp.T).reshape(1, t, n_heads, hd))
  scores_hf = np.einsum("bthd,bshd->bhts", q_hf, q_hf)
  scores_cpp = np.einsum("bthd,bshd->bhts", q_cpp, q_cpp)
  np.testing.assert_allclose(scores_hf, scores_cpp, rtol=1e-4, atol=1e-4)


def _forward_padded(model, params, tokens, length):
  """Logits of ``tokens`` (1-D) from one jitted forward over a fixed ``length`` (causal: padding
  after the tokens does not change their logits), so checks do not recompile per length."""
  padded = np.zeros((1, length), np.int32)
  padded[0, :len(tokens)] = tokens
  return np.asarray(_jit_apply(model)({"params": params}, jnp.asarray(padded)))[0, :len(tokens)]


@functools.cache
def _jit_apply(model):
  return jax.jit(model.apply)


def test_kv_cache_logits_equal_full_forward():
  params = _tiny_params()
  model = decoder.Llama(TINY)
  tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, TINY.vocab_size)
  full = _jit_apply(model)({"params": params}, tokens)
  cache = decoder.init_cache(TINY, batch_size=2, max_len=12)
  step = jax.jit(model.apply)
  logits, cache = step({"params": params}, tokens[:, :5], cache=cache)
  parts = [logits]
  for i in range(5, 9):
    logits, cache = step({"params": params}, tokens[:, i:i + 1], cache=cache)
    parts.append(logits)
  assert int(cache.index) == 9
  np.testing.assert_allclose(jnp.concatenate(parts, axis=1), full, rtol=1e-5, atol=1e-5)


def test_greedy_generate_matches_argmax_and_accepts_replacement_apply():
  params = _tiny_params()
  model = decoder.Llama(TINY)
  prompt = np.array([3, 17, 5, 9], np.int32)
  out = decoder.greedy_generate(model.apply, params, prompt, 6, config=TINY)
  assert out.shape == (6,) and out.dtype == jnp.int32
  seq = list(prompt)
  for _ in range(6):  # recompute everything from scratch, token by token
    seq.append(int(np.argmax(_forward_padded(model, params, seq, 16)[-1])))
  np.testing.assert_array_equal(out, seq[len(prompt):])

  def wrapped(variables, tokens, *, cache=None):  # what a quantization tool would pass
    return model.apply(variables, tokens, cache=cache)
  out2 = decoder.greedy_generate(wrapped, {"params": params}, prompt[None], 6, config=TINY)
  np.testing.assert_array_equal(out2[0], out)
  # eos: everything after the first eos is eos.
  eos = int(out[1])
  out3 = decoder.greedy_generate(model.apply, params, prompt, 6, config=TINY, eos_id=eos)
  first = int(np.argmax(np.asarray(out3) == eos))
  assert (np.asarray(out3)[first:] == eos).all()


def test_greedy_generate_progress_bar_ticks_once_per_token(capsys):
  params = _tiny_params()
  model = decoder.Llama(TINY)
  prompt = np.array([3, 17, 5, 9], np.int32)
  quiet = decoder.greedy_generate(model.apply, params, prompt, 5, config=TINY)
  ticks = []
  real = decoder._tick
  decoder._tick = lambda *a: (ticks.append(1), real(*a))
  try:
    loud = decoder.greedy_generate(model.apply, params, prompt, 5, config=TINY, progress=True)
  finally:
    decoder._tick = real
  np.testing.assert_array_equal(loud, quiet)
  assert len(ticks) == 5 and not decoder._BAR


def test_greedy_generate_compiles_once():
  params = _tiny_params()
  model = decoder.Llama(TINY)
  decoder.greedy_generate(model.apply, params, np.arange(4), 3, config=TINY)
  before = decoder._generate._cache_size()
  decoder.greedy_generate(model.apply, params, np.arange(4) + 1, 3, config=TINY)
  assert decoder._generate._cache_size() == before


def test_bf16_compute_returns_float32_logits():
  params = _tiny_params()
  config = dataclasses.replace(TINY, dtype=jnp.bfloat16)
  tokens = jnp.arange(8)[None]
  lo16 = _jit_apply(decoder.Llama(config))({"params": params}, tokens)
  lo32 = _jit_apply(decoder.Llama(TINY))({"params": params}, tokens)
  assert lo16.dtype == jnp.float32
  np.testing.assert_allclose(lo16, lo32, atol=0.1 * float(jnp.abs(lo32).max()))


def test_param_tree_names():
  params = _tiny_params()
  paths = {"/".join(str(k.key) for k in p) for p, _ in
           jax.tree_util.tree_flatten_with_path({"params": params})[0]}
  expected = {"params/embed/embedding", "params/final_norm/scale"}
  for i in range(TINY.num_layers):
    expected |= {f"params/layers_{i}/{n}/scale" for n in ("input_norm", "post_attn_norm")}
    expected |= {f"params/layers_{i}/attn/{n}_proj/kernel" for n in "qkvo"}
    expected |= {f"params/layers_{i}/mlp/{n}_proj/kernel" for n in ("gate", "up", "down")}
  assert paths == expected
  assert params["layers_0"]["mlp"]["down_proj"]["kernel"].shape == (48, 32)  # (in, out)
  assert flax.traverse_util.flatten_dict(params)  # plain nested dicts


def test_config_validation():
  with pytest.raises(ValueError, match="num_kv_heads"):
    decoder.LlamaConfig(num_heads=9, num_kv_heads=2)
  with pytest.raises(ValueError, match="dtype"):
    decoder.LlamaConfig(dtype=jnp.int8)
  with pytest.raises(ValueError, match="max_seq_len"):
    decoder.greedy_generate(decoder.Llama(TINY).apply, _tiny_params(), np.arange(100), 100,
                            config=TINY)


def test_loader_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="not found"):
    gguf_weights.load_llama_gguf(tmp_path / "missing.gguf")
  bad = tmp_path / "bad.gguf"
  bad.write_bytes(b"this is not a gguf file at all" * 10)
  with pytest.raises(gguf_weights.GGUFError, match="not a readable GGUF"):
    gguf_weights.load_llama_gguf(bad)
  falcon = _write_gguf(tmp_path / "falcon.gguf", TINY, _tiny_params(), arch="falcon")
  with pytest.raises(gguf_weights.GGUFError, match="architecture='falcon' is not supported"):
    gguf_weights.load_gguf(falcon)
  with pytest.raises(gguf_weights.GGUFError, match="tokenizer"):
    tokenizer.load_tokenizer(_write_gguf(tmp_path / "tiny.gguf", TINY, _tiny_params()))


# ---------------------------------------------------------------------------------------------
# Real SmolLM2-135M-Instruct weights.


@pytest.fixture(scope="module")
def smol():
  config, params = gguf_weights.load_smollm2()
  return config, params, decoder.Llama(config)


@pytest.fixture(scope="module")
def tok():
  return tokenizer.load_tokenizer()


@pytest.fixture(scope="module")
def eval_ids(tok):
  return np.asarray(tok.encode(text.eval_text())[:1024], np.int32)


@pytest.fixture(scope="module")
def logits_1024(smol, eval_ids):
  """One compiled (1, 1024) forward over the first 1024 evaluation tokens, shared by tests."""
  config, params, model = smol
  return _forward_padded(model, params, eval_ids, 1024)[None]


@pytest.mark.slow
def test_real_config(smol):
  config, params, _ = smol
  assert config == decoder.LlamaConfig(rms_norm_eps=float(np.float32(1e-5)))
  assert params["embed"]["embedding"].shape == (49152, 576)
  assert len([k for k in params if k.startswith("layers_")]) == 30


@pytest.mark.slow
def test_tokenizer_round_trip_and_counts(tok):
  t = text.eval_text()
  ids = tok.encode(t)
  assert tok.decode(ids) == t
  assert 0.15 < len(ids) / len(t) < 0.30  # ~4.8 characters per token on English news
  assert tok.encode("Hello world") == [19556, 905]
  assert tok.encode("<|im_start|>user") == [tok.bos_id, 4093]
  assert tok.encode("2024") == tok.encode("2") + tok.encode("0") + tok.encode("2") + tok.encode("4")
  assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 49152)


@pytest.mark.slow
def test_perplexity_matches_llama_cpp(smol, eval_ids, logits_1024):
  result = perplexity(lambda t: logits_1024, eval_ids, window=1024)
  print(f"\nSmolLM2-135M Q4_1, 1024 tokens: ppl={result.ppl:.4f} (llama.cpp {LLAMA_CPP_PPL_1024})")
  assert result.n_predictions == 1023
  assert abs(result.ppl / LLAMA_CPP_PPL_1024 - 1) < 0.01


@pytest.mark.slow
def test_logits_match_transformers(eval_ids, logits_1024):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("accelerate")  # transformers needs it to load a GGUF
  path = fetch.fetch(fetch.SMOLLM2_GGUF)
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32)
  hf.eval()
  n = 256
  with torch.no_grad():
    ref = hf(torch.tensor(eval_ids[None, :n])).logits.numpy()
  ours = logits_1024[:, :n]  # causal: the first n positions do not see later tokens
  rel = np.abs(ours - ref).max() / np.abs(ref).max()
  print(f"\nmax |logits - transformers| / max |transformers| = {rel:.2e}")
  assert rel < 1e-3
  assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.99


@pytest.mark.slow
def test_chat_generation(smol, tok):
  config, params, model = smol
  prompt = tok.encode(tokenizer.chat_prompt(
      [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]))
  out = decoder.greedy_generate(model.apply, params, prompt, 16, config=config, eos_id=tok.eos_id)
  reply = tok.decode(out, skip_special_tokens=True)
  print(f"\nSmolLM2 reply: {reply!r}")
  assert "Paris" in reply
  # The KV-cache decode equals greedy argmax of a full recomputation over prompt + reply.
  full = np.concatenate([prompt, np.asarray(out)])
  logits = _forward_padded(model, params, full, 1024)  # reuses the compiled 1024 forward
  n_real = int(np.argmax(np.asarray(out) == tok.eos_id)) + 1 if tok.eos_id in out else len(out)
  expect = logits[len(prompt) - 1:-1].argmax(-1)
  np.testing.assert_array_equal(np.asarray(out)[:n_real], expect[:n_real])
