"""Block-wise PTQ on a tiny Llama and a tiny GPT (biases everywhere): algorithms beat RTN,
folding preserves the float model, a fold that would change it is detected and skipped."""
import dataclasses
from typing import Any

import flax.linen as nn

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jq import (A8_STATIC, W4A16_G32, W8A16, Algorithm, dequantize_tree, default_rules, metrics,
                quantize_tree)
from jq.nn import quantized_apply
from jq.ptq import PTQConfig, ScaleGroup, quantize_blockwise
from jq.algorithms.fold import FOLD_TOLERANCE
from jq.qarray import QArray
from jq.quantize import quantize
from jq.spec import AWQOptions, GPTQOptions, Rule, SmoothQuantOptions
from jq_models.blockwise import LlamaBlocks
from jq_models.decoder import Llama, LlamaConfig

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


def _rules(spec, algo, act=None, options=None):
  return default_rules(spec, act, algorithm=algo, options=options)


def _fallbacks(log):
  """Log lines of layers that fell back: GPTQ without a factorisation, or a skipped fold."""
  return [l for l in log if "fallback=True" in l or "SKIPPED" in l or "not smoothed" in l]


def test_gptq_beats_rtn(tiny):
  model, fvars, calib, held = tiny
  rtn = quantize_tree(fvars, default_rules(W4A16_G32))
  res = quantize_blockwise(fvars, LlamaBlocks(CFG), _rules(W4A16_G32, Algorithm.GPTQ), calib)
  assert all(isinstance(res.qparams["params"]["layers_0"]["attn"][k]["kernel"], QArray)
             for k in ("q_proj", "k_proj", "v_proj", "o_proj"))
  kl_rtn, kl_gptq = _kl(model, fvars, rtn, held), _kl(model, fvars, res.qparams, held)
  assert kl_gptq < kl_rtn, (kl_gptq, kl_rtn)


def test_gptq_sequential_and_act_order_beat_rtn_without_fallback(tiny):
  model, fvars, calib, held = tiny
  kl_rtn = _kl(model, fvars, quantize_tree(fvars, default_rules(W4A16_G32)), held)
  base = quantize_blockwise(fvars, LlamaBlocks(CFG), _rules(W4A16_G32, Algorithm.GPTQ), calib)
  q_of = lambda r: np.asarray(r.qparams["params"]["layers_1"]["attn"]["q_proj"]["kernel"].values)
  for rules, cfg in ((_rules(W4A16_G32, Algorithm.GPTQ), PTQConfig(sequential=False)),
                     (_rules(W4A16_G32, Algorithm.GPTQ, options=GPTQOptions(act_order=True)),
                      PTQConfig())):
    res = quantize_blockwise(fvars, LlamaBlocks(CFG), rules, calib, config=cfg)
    assert not _fallbacks(res.log), res.log
    kl = _kl(model, fvars, res.qparams, held)
    assert kl <= kl_rtn, (cfg, rules[-1].options, kl, kl_rtn)
    # the variant really ran (its options reached GPTQ): other rounding decisions
    assert not np.array_equal(q_of(res), q_of(base))


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


def test_gptq_options_come_from_the_rules(tiny):
  _, fvars, calib, _ = tiny
  with pytest.raises(ValueError, match="first_token_weight"):
    GPTQOptions(first_token_weight=-1.0)
  # one capture per block: GPTQ rules of a block must agree on the first-token weight
  rules = (Rule(pattern="q_proj/kernel$", weight=W4A16_G32, algorithm=Algorithm.GPTQ,
                options=GPTQOptions(first_token_weight=1.0)),) + _rules(W4A16_G32, Algorithm.GPTQ)
  with pytest.raises(ValueError, match=r"params/layers_0/: the GPTQ rules of this block give "
                                       r"different first_token_weight .*q_proj"):
    quantize_blockwise(fvars, LlamaBlocks(CFG), rules, calib)
  # the first-token weight reaches the Hessian: 1 (textbook) and 16 round differently
  one = quantize_blockwise(fvars, LlamaBlocks(CFG), _rules(
      W4A16_G32, Algorithm.GPTQ, options=GPTQOptions(first_token_weight=1.0)), calib)
  sixteen = quantize_blockwise(fvars, LlamaBlocks(CFG), _rules(W4A16_G32, Algorithm.GPTQ), calib)
  k = lambda r: np.asarray(r.qparams["params"]["layers_0"]["attn"]["k_proj"]["kernel"].values)
  assert not np.array_equal(k(one), k(sixteen))


def test_scale_group_options_must_agree(tiny):
  _, fvars, calib, _ = tiny
  rules = (Rule(pattern="q_proj/kernel$", weight=W4A16_G32, algorithm=Algorithm.AWQ,
                options=AWQOptions(grid=5)),) + _rules(W4A16_G32, Algorithm.AWQ)
  with pytest.raises(ValueError, match=r"params/layers_0/q_proj\+k_proj\+v_proj: .* different "
                                       r"options .*q_proj/kernel: AWQOptions\(grid=5"):
    quantize_blockwise(fvars, LlamaBlocks(CFG), rules, calib)


def test_smoothquant_migration_strength_comes_from_the_rules(tiny):
  _, fvars, calib, _ = tiny
  norm = lambda r: np.asarray(r.ref_params["params"]["layers_0"]["input_norm"]["scale"])
  a0 = quantize_blockwise(fvars, LlamaBlocks(CFG), _rules(
      W8A16, Algorithm.SMOOTHQUANT, A8_STATIC, SmoothQuantOptions(alpha=0.0)), calib)
  a8 = quantize_blockwise(fvars, LlamaBlocks(CFG), _rules(
      W8A16, Algorithm.SMOOTHQUANT, A8_STATIC, SmoothQuantOptions(alpha=0.8)), calib)
  assert not _fallbacks(a0.log) and not _fallbacks(a8.log)
  orig = np.asarray(fvars["params"]["layers_0"]["input_norm"]["scale"])
  # alpha=0: s = 1 / max|w| (weights alone decide); alpha=0.8: mostly the activations
  assert not np.allclose(norm(a0), norm(a8))
  assert not np.allclose(norm(a8), orig)


# ---- a GPT-style block: LayerNorm with bias, biased q/k/v/o and fc1/fc2 around a GELU ---------

GPT = dict(vocab=64, hidden=32, heads=4, mlp=64, layers=2)


class GPTBlock(nn.Module):
  hidden: int
  heads: int
  mlp: int

  @nn.compact
  def __call__(self, x):
    b, t, _ = x.shape
    hd = self.hidden // self.heads
    h = nn.LayerNorm(name="ln_1")(x)
    split = lambda y: y.reshape(b, t, self.heads, hd)
    q, k, v = (split(nn.Dense(self.hidden, name=n)(h)) for n in ("q_proj", "k_proj", "v_proj"))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.float32(np.sqrt(hd))
    mask = jnp.tril(jnp.ones((t, t), bool))
    probs = jax.nn.softmax(jnp.where(mask, scores, np.float32(-1e9)), axis=-1)
    ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, self.hidden)
    x = x + nn.Dense(self.hidden, name="o_proj")(ctx)
    h = nn.LayerNorm(name="ln_2")(x)
    return x + nn.Dense(self.hidden, name="fc2")(nn.gelu(nn.Dense(self.mlp, name="fc1")(h)))


class TinyGPT(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(GPT["vocab"], GPT["hidden"], name="embed")
    x = embed(tokens)
    for i in range(GPT["layers"]):
      x = GPTBlock(GPT["hidden"], GPT["heads"], GPT["mlp"], name=f"h_{i}")(x)
    return embed.attend(nn.LayerNorm(name="ln_f")(x))


@dataclasses.dataclass(frozen=True)
class GPTBlocks:
  """``BlockwiseModel`` of ``TinyGPT``; ``wrong`` adds fc1 -> fc2, which crosses the GELU."""
  wrong: bool = False

  num_blocks = GPT["layers"]

  def block_key(self, i: int) -> str:
    return f"h_{i}"

  def embed(self, params: dict[str, Any], tokens):
    return jnp.take(params["embed"]["embedding"], tokens, axis=0)

  def apply_block(self, block_params, x):
    return GPTBlock(GPT["hidden"], GPT["heads"], GPT["mlp"]).apply({"params": block_params}, x)

  def scale_groups(self):
    groups = [ScaleGroup(prev="ln_1/scale", prev_kind="norm",
                         consumers=("q_proj/kernel", "k_proj/kernel", "v_proj/kernel")),
              ScaleGroup(prev="ln_2/scale", prev_kind="norm", consumers=("fc1/kernel",)),
              ScaleGroup(prev="v_proj/kernel", prev_kind="linear", consumers=("o_proj/kernel",))]
    if self.wrong:
      groups.append(ScaleGroup(prev="fc1/kernel", prev_kind="linear", consumers=("fc2/kernel",)))
    return tuple(groups)


@pytest.fixture(scope="module")
def gpt():
  model = TinyGPT()
  params = model.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"]
  rng = np.random.default_rng(1)
  # every bias and LayerNorm shift non-zero (flax initialises them to 0, which would hide a fold
  # that forgets them); outlier channels in the embeddings, the norms and fc1's output
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x + jnp.asarray(rng.normal(0, 0.5, x.shape), x.dtype)
      if path[-1].key == "bias" else x, params)
  params["embed"]["embedding"] = params["embed"]["embedding"].at[:, :2].multiply(10.0)
  for i in range(GPT["layers"]):
    blk = params[f"h_{i}"]
    blk["ln_1"]["scale"] = blk["ln_1"]["scale"].at[3:5].set(8.0)
    blk["ln_2"]["scale"] = blk["ln_2"]["scale"].at[6:9].set(8.0)
    blk["fc1"]["bias"] = blk["fc1"]["bias"].at[:4].set(6.0)
  calib = rng.integers(0, GPT["vocab"], (4, 16)).astype(np.int32)
  held = jnp.asarray(rng.integers(0, GPT["vocab"], (2, 16)).astype(np.int32))
  return model, {"params": params}, calib, held


def _rel(ref, got) -> float:
  ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
  return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("algo,spec,act", [(Algorithm.AWQ, W4A16_G32, None),
                                           (Algorithm.SMOOTHQUANT, W8A16, A8_STATIC)])
def test_gpt_fold_keeps_float_model_with_biases(gpt, algo, spec, act):
  model, fvars, calib, held = gpt
  res = quantize_blockwise(fvars, GPTBlocks(), _rules(spec, algo, act), calib)
  assert not _fallbacks(res.log), res.log
  with jax.default_matmul_precision("highest"):
    err = _rel(model.apply(fvars, held), model.apply(res.ref_params, held))
  assert err <= FOLD_TOLERANCE, err
  # the folds happened, biases included: norm scale and shift, v_proj's kernel and bias
  for name, leaf in (("ln_1", "scale"), ("ln_1", "bias"), ("v_proj", "kernel"), ("v_proj", "bias")):
    before = np.asarray(fvars["params"]["h_0"][name][leaf])
    after = np.asarray(res.ref_params["params"]["h_0"][name][leaf])
    assert not np.allclose(after, before), (name, leaf)


@pytest.mark.parametrize("algo,spec,act", [(Algorithm.AWQ, W4A16_G32, None),
                                           (Algorithm.SMOOTHQUANT, W8A16, A8_STATIC)])
def test_gpt_wrong_scale_group_is_detected_skipped_and_logged(gpt, algo, spec, act):
  model, fvars, calib, held = gpt
  res = quantize_blockwise(fvars, GPTBlocks(wrong=True), _rules(spec, algo, act), calib)
  for i in range(GPT["layers"]):
    lines = [l for l in res.log if l.startswith(f"params/h_{i}/fc2: ")]
    assert len(lines) == 1 and "SKIPPED" in lines[0], res.log
    assert f"params/h_{i}/fc1/kernel, params/h_{i}/fc1/bias" in lines[0]
    err = float(lines[0].split("differ from the original's by ")[1].split(" ")[0])
    assert err > FOLD_TOLERANCE
  assert len(_fallbacks(res.log)) == GPT["layers"], res.log   # the right groups were applied
  with jax.default_matmul_precision("highest"):
    assert _rel(model.apply(fvars, held), model.apply(res.ref_params, held)) <= FOLD_TOLERANCE
  blk, qblk = fvars["params"]["h_0"], res.qparams["params"]["h_0"]
  # fc2 left unscaled and quantized without the algorithm: plain RTN of the original kernel
  np.testing.assert_array_equal(np.asarray(res.ref_params["params"]["h_0"]["fc2"]["kernel"]),
                                np.asarray(blk["fc2"]["kernel"]))
  plain = quantize(blk["fc2"]["kernel"], spec, name="fc2")
  np.testing.assert_array_equal(np.asarray(qblk["fc2"]["kernel"].values), np.asarray(plain.values))
  np.testing.assert_array_equal(np.asarray(qblk["fc2"]["kernel"].scale), np.asarray(plain.scale))
