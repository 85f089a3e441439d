"""Block-wise PTQ on a tiny Llama: algorithms beat RTN, folding preserves the float model."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jq import (A8_STATIC, W4A16_G32, W8A16, Algorithm, dequantize_tree, default_rules, metrics,
                quantize_tree)
from jq.nn import quantized_apply
from jq.ptq import PTQConfig, quantize_blockwise
from jq.qarray import QArray
from models.blockwise import LlamaBlocks
from models.smollm2 import Llama, LlamaConfig

CFG = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, max_seq_len=64)


@pytest.fixture(scope="module")
def tiny():
  model = Llama(CFG)
  tokens = jnp.zeros((1, 8), jnp.int32)
  params = model.init(jax.random.key(0), tokens)["params"]
  # outlier input channels, as in real LLMs: a few embedding dims and norm weights are large
  emb = params["embed"]["embedding"]
  params["embed"]["embedding"] = emb.at[:, :3].multiply(12.0)
  for i in range(CFG.num_layers):
    blk = params[f"layers_{i}"]
    blk["post_attn_norm"]["scale"] = blk["post_attn_norm"]["scale"].at[5:8].set(15.0)
  rng = np.random.default_rng(0)
  calib = rng.integers(0, CFG.vocab_size, (8, 32)).astype(np.int32)
  held_out = jnp.asarray(rng.integers(0, CFG.vocab_size, (4, 32)).astype(np.int32))
  return model, {"params": params}, calib, held_out


def _kl(model, fvars, qvars, tokens):
  ref = model.apply(fvars, tokens)
  got = jax.jit(quantized_apply(model.apply))(qvars, tokens)
  return float(jnp.mean(metrics.kl_divergence(ref, got)))


def _rules(spec, algo, act=None):
  return default_rules(spec, act, algorithm=algo)


def test_gptq_beats_rtn(tiny):
  model, fvars, calib, held = tiny
  rtn = quantize_tree(fvars, default_rules(W4A16_G32))
  res = quantize_blockwise(fvars, LlamaBlocks(CFG), _rules(W4A16_G32, Algorithm.GPTQ), calib)
  assert all(isinstance(res.qparams["params"]["layers_0"]["attn"][k]["kernel"], QArray)
             for k in ("q_proj", "k_proj", "v_proj", "o_proj"))
  kl_rtn, kl_gptq = _kl(model, fvars, rtn, held), _kl(model, fvars, res.qparams, held)
  assert kl_gptq < kl_rtn, (kl_gptq, kl_rtn)


def test_gptq_sequential_and_act_order_run(tiny):
  model, fvars, calib, held = tiny
  for cfg in (PTQConfig(sequential=False), PTQConfig(gptq_act_order=True)):
    res = quantize_blockwise(fvars, LlamaBlocks(CFG), _rules(W4A16_G32, Algorithm.GPTQ), calib,
                             config=cfg)
    assert np.isfinite(_kl(model, fvars, res.qparams, held))


def test_awq_folding_keeps_float_model_and_beats_rtn(tiny):
  model, fvars, calib, held = tiny
  res = quantize_blockwise(fvars, LlamaBlocks(CFG), _rules(W4A16_G32, Algorithm.AWQ), calib)
  # the smoothed float model computes the same function as the original one
  a, b = model.apply(fvars, held), model.apply(res.ref_params, held)
  np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-4, atol=2e-4)
  assert not np.allclose(np.asarray(res.ref_params["params"]["layers_0"]["input_norm"]["scale"]),
                         np.asarray(fvars["params"]["layers_0"]["input_norm"]["scale"]))
  rtn = quantize_tree(fvars, default_rules(W4A16_G32))
  assert _kl(model, fvars, res.qparams, held) < _kl(model, fvars, rtn, held)


def test_smoothquant_static_w8a8_beats_plain_static(tiny):
  model, fvars, calib, held = tiny
  plain = quantize_blockwise(fvars, LlamaBlocks(CFG), _rules(W8A16, Algorithm.RTN, A8_STATIC), calib)
  sq = quantize_blockwise(fvars, LlamaBlocks(CFG), _rules(W8A16, Algorithm.SMOOTHQUANT, A8_STATIC),
                          calib)
  q = sq.qparams["params"]["layers_1"]["mlp"]["down_proj"]["kernel"]
  assert q.activation is not None and q.activation.scale.shape == ()
  a, b = model.apply(fvars, held), model.apply(sq.ref_params, held)
  np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-4, atol=2e-4)
  assert _kl(model, fvars, sq.qparams, held) < _kl(model, fvars, plain.qparams, held)


def test_weight_only_equals_dequantized_float(tiny):
  model, fvars, calib, held = tiny
  res = quantize_blockwise(fvars, LlamaBlocks(CFG), _rules(W4A16_G32, Algorithm.GPTQ), calib)
  got = jax.jit(quantized_apply(model.apply))(res.qparams, held)
  ref = model.apply(dequantize_tree(res.qparams), held)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-4)


def test_bad_calibration_inputs(tiny):
  model, fvars, calib, _ = tiny
  with pytest.raises(ValueError, match="calibration tokens have shape"):
    quantize_blockwise(fvars, LlamaBlocks(CFG), _rules(W4A16_G32, Algorithm.GPTQ),
                       np.zeros((0, 16), np.int32))
  bad = jax.tree_util.tree_map(lambda x: x, fvars)
  bad["params"]["embed"]["embedding"] = bad["params"]["embed"]["embedding"].at[calib[0, 0], 0].set(
      jnp.nan)
  with pytest.raises(ValueError, match="NaN/Inf"):
    quantize_blockwise(bad, LlamaBlocks(CFG), _rules(W4A16_G32, Algorithm.GPTQ), calib)


def test_algorithm_outside_blocks_is_an_error(tiny):
  _, fvars, calib, _ = tiny
  rules = (dataclasses.replace(default_rules(W4A16_G32)[-1], pattern="embed/embedding$",
                               algorithm=Algorithm.GPTQ),) + _rules(W4A16_G32, Algorithm.GPTQ)
  with pytest.raises(ValueError, match="only available for the linears inside"):
    quantize_blockwise(fvars, LlamaBlocks(CFG), rules, calib)


def test_negative_first_token_weight_is_refused(tiny):
  _, fvars, calib, _ = tiny
  with pytest.raises(ValueError, match="gptq_first_token_weight"):
    quantize_blockwise(fvars, LlamaBlocks(CFG), _rules(W4A16_G32, Algorithm.GPTQ), calib,
                       config=PTQConfig(gptq_first_token_weight=-1.0))
