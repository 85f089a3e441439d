"""The decoder's quantized KV cache (``init_cache(..., kind=)``, ``kv_quant=``) and
``jq-quant eval/generate --kv-cache``."""
from __future__ import annotations

import dataclasses
import functools
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jq import app, cli
from jq import io as jqio
from jq import kv_cache as kvc
from jq_models import decoder, hf, registry

TINY = decoder.DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=10000.0,
                             max_seq_len=64)
SMALL = ["--eval-windows", "1", "--window", "32"]


@functools.cache
def _params():
  return jax.jit(decoder.Decoder(TINY).init)(jax.random.key(0),
                                             jnp.zeros((1, 4), jnp.int32))["params"]


def _tokens(shape=(2, 9)):
  return jax.random.randint(jax.random.key(1), shape, 0, TINY.vocab_size)


@functools.partial(jax.jit, static_argnames=("config", "kind"))
def _prefill_decode_full(params, tokens, *, config, kind):
  """Logits of a 5-token prefill + single-token steps through a ``kind`` cache, the full forward
  with ``kv_quant=kind``, the float forward, and the final cache (one compile)."""
  model, variables = decoder.Decoder(config), {"params": params}
  cache = decoder.init_cache(config, tokens.shape[0], 12, kind=kind)
  prefill, cache = model.apply(variables, tokens[:, :5], cache=cache)

  def step(cache, token):
    logits, cache = model.apply(variables, token[:, None], cache=cache)
    return cache, logits[:, 0]

  cache, steps = jax.lax.scan(step, cache, tokens[:, 5:].T)
  return (jnp.concatenate([prefill, steps.transpose(1, 0, 2)], axis=1),
          model.apply(variables, tokens, kv_quant=kind), model.apply(variables, tokens), cache)


@pytest.mark.parametrize("kind,dtype", [("int8", jnp.float32), ("fp8", jnp.float32),
                                        ("int8", jnp.bfloat16)])
def test_cached_decode_equals_fake_quantized_forward(kind, dtype):
  config = dataclasses.replace(TINY, dtype=dtype)
  cached, full, float_logits, cache = _prefill_decode_full(_params(), _tokens(), config=config,
                                                           kind=kind)
  storage = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}[kind]
  assert cache.kind.value == kind and int(cache.index) == 9
  assert all(isinstance(c, kvc.QuantizedKV) and c.values.dtype == storage
             for c in cache.keys + cache.values)
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(cached, full, rtol=tol, atol=tol)
  if dtype == jnp.float32:   # and the quantization is really there: the float forward differs
    assert float(jnp.max(jnp.abs(float_logits - full))) > 100 * tol


def test_default_path_is_unchanged():
  params, tokens = _params(), _tokens()
  model = decoder.Decoder(TINY)
  cache = decoder.init_cache(TINY, 2, 9)
  assert cache.kind is kvc.KVKind.NONE
  assert all(isinstance(k, jax.Array) and k.dtype == TINY.dtype for k in cache.keys + cache.values)
  # the same program as kv_quant="none", and no quantization anywhere in it, with or without cache
  default = str(jax.make_jaxpr(lambda p, t: model.apply({"params": p}, t))(params, tokens))
  assert default == str(jax.make_jaxpr(
      lambda p, t: model.apply({"params": p}, t, kv_quant="none"))(params, tokens))
  step = str(jax.make_jaxpr(lambda p, t, c: model.apply({"params": p}, t, cache=c))(
      params, tokens, cache))
  for text in (default, step):
    assert "i8" not in text and "f8_e4m3fn" not in text and "round" not in text


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_greedy_generate_with_a_quantized_cache(kind):
  params = _params()
  prompt = np.array([3, 17, 5, 9], np.int32)
  out = decoder.greedy_generate(decoder.Decoder(TINY).apply, params, prompt, 4, config=TINY,
                                kv_cache=kind)

  @jax.jit
  def next_token(seq, n):   # argmax of the fake-quantized full forward at position n - 1
    logits = decoder.Decoder(TINY).apply({"params": params}, seq[None], kv_quant=kind)
    return jnp.argmax(logits[0, n - 1]).astype(jnp.int32)

  seq = np.zeros(16, np.int32)
  seq[:len(prompt)] = prompt
  for n in range(len(prompt), len(prompt) + 4):   # recomputed from scratch each time
    seq[n] = int(next_token(jnp.asarray(seq), n))
  np.testing.assert_array_equal(out, seq[len(prompt):len(prompt) + 4])


def test_bad_kinds_are_clear_errors():
  params, tokens = _params(), _tokens()
  model = decoder.Decoder(TINY)
  with pytest.raises(ValueError, match="got 'int4'"):
    model.apply({"params": params}, tokens, kv_quant="int4")
  with pytest.raises(ValueError, match="got 'q8'"):
    decoder.init_cache(TINY, 1, 8, kind="q8")
  with pytest.raises(ValueError, match="kv_quant='fp8' but the cache is 'int8'"):
    model.apply({"params": params}, tokens, cache=decoder.init_cache(TINY, 2, 12, kind="int8"),
                kv_quant="fp8")
  with pytest.raises(ValueError, match="got 'int4'"):
    decoder.greedy_generate(model.apply, params, np.array([1, 2]), 2, config=TINY, kv_cache="int4")


@pytest.fixture
def float_ckpt(tiny_hf, tmp_path):
  """A jq checkpoint of a tiny random Llama's float weights: eval's "quant" side then differs
  from the float side by the KV cache alone."""
  path = tiny_hf("llama")
  _, source = registry.hf_source(path)
  _, params = hf.load_weights(path)
  out = tmp_path / "float.safetensors"
  jqio.save(out, {"params": params}, metadata={"model": "llama", "source": source})
  return out


def test_cli_eval_kv_cache_int8(float_ckpt, capsys):
  assert cli.main(["eval", str(float_ckpt), "--json", "--kv-cache", "int8", *SMALL]) == 0
  got = json.loads(capsys.readouterr().out)
  # 3 layers, 2 kv heads of 16: int8 values + a float32 scale vs the float32 cache
  assert got["kv_cache"] == "int8" and got["kv_bytes_per_token"] == 2 * 3 * 2 * (16 + 4)
  assert got["kv_bytes_per_token_float"] == 2 * 3 * 2 * 16 * 4
  assert got["kv_ratio_to_float"] == pytest.approx(20 / 64)
  assert got["ppl_quant"] != got["ppl_float"] and got["kl"] > 0
  assert abs(got["ppl_quant"] / got["ppl_float"] - 1) < 0.02


def test_cli_generate_kv_cache_fp8(float_ckpt, capsys):
  assert cli.main(["generate", str(float_ckpt), "--prompt", "What is", "--max-new-tokens", "3",
                   "--kv-cache", "fp8"]) == 0
  assert "an fp8 KV cache" in capsys.readouterr().err


def test_cli_bad_kv_cache_value_names_the_flag(capsys):
  for command in (["eval", "x.safetensors"], ["generate", "x.safetensors", "--prompt", "hi"]):
    with pytest.raises(SystemExit):
      cli.main([*command, "--kv-cache", "int4"])
    err = capsys.readouterr().err
    assert "--kv-cache" in err and "'int4'" in err


def test_kv_cache_on_a_non_decoder_is_a_clear_error():
  encoder = types.SimpleNamespace(kind="encoder", name="minilm")
  with pytest.raises(ValueError, match="--kv-cache int8: minilm is an encoder, not a decoder"):
    app.evaluate(encoder, {}, kv_cache="int8")
  with pytest.raises(ValueError, match="--kv-cache fp8: minilm"):
    app.generate(encoder, {}, "hi", kv_cache="fp8")
