"""Mixtures of experts in jq's decoder (Mixtral, Qwen2-MoE, Qwen3-MoE): each expert's calibration
sees exactly the tokens routed to it, an expert no token reached is handled and said by name, and
the checkpoint's names go both ways (the transformers oracle is in ``test_hf_reference``)."""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jq
from jq import cli
from jq.calibrate import capture_inputs
from jq.io import compressed_tensors, decoder_names
from jq.io.gguf.llama import arch_problems
from jq.nn import quantized_apply
from jq.ptq import quantize_model
from jq_models import decoder, hf

CONFIG = decoder.DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                               num_heads=4, num_kv_heads=2, head_dim=8, num_experts=4,
                               experts_per_token=2, expert_size=24, moe_layers=(True, False),
                               shared_expert_size=40)


def _init(config=CONFIG, seed=0):
  tokens = jnp.asarray(np.random.default_rng(seed).integers(0, config.vocab_size, (2, 16)))
  model = decoder.Decoder(config)
  return model, model.init(jax.random.key(seed), tokens), tokens


def test_each_expert_sees_exactly_the_tokens_routed_to_it():
  model, variables, tokens = _init()
  _, seen = capture_inputs(model.apply, variables, tokens)
  x = np.asarray(seen["layers_0/mlp/router/kernel"]).reshape(-1, 32)
  logits = x @ np.asarray(variables["params"]["layers_0"]["mlp"]["router"]["kernel"])
  top2 = np.argsort(-logits, axis=-1)[:, :2]
  for e in range(4):
    xe = np.asarray(seen[f"layers_0/mlp/experts_{e}/gate_proj/kernel"]).reshape(-1, 32)
    routed = (top2 == e).any(axis=-1)
    assert 0 < routed.sum() < len(routed)
    np.testing.assert_array_equal(xe[routed], x[routed])
    assert not xe[~routed].any()
    down = np.asarray(seen[f"layers_0/mlp/experts_{e}/down_proj/kernel"]).reshape(-1, 24)
    assert not down[~routed].any() and down[routed].any(axis=-1).all()
  shared = np.asarray(seen["layers_0/mlp/shared_expert/gate_proj/kernel"]).reshape(-1, 32)
  np.testing.assert_array_equal(shared, x)        # the shared expert reads every token
  assert "layers_1/mlp/gate_proj/kernel" in seen    # layer 1 has a plain MLP


def test_routing_weights_follow_the_config():
  logits = jnp.asarray([[2.0, 1.0, 0.0, -1.0]])
  experts, w = decoder.route(logits, 2, normalize=True)
  np.testing.assert_array_equal(np.asarray(experts), [[0, 1]])
  np.testing.assert_allclose(np.asarray(w).sum(), 1.0, rtol=1e-6)
  _, w_raw = decoder.route(logits, 2, normalize=False)
  p = np.exp([2.0, 1.0, 0.0, -1.0]) / np.exp([2.0, 1.0, 0.0, -1.0]).sum()
  np.testing.assert_allclose(np.asarray(w_raw)[0], p[:2], rtol=1e-6)


@pytest.mark.parametrize("tokens,experts,k", [(1, 8, 2), (5, 4, 2), (64, 16, 4), (33, 3, 3),
                                              (256, 128, 8)])
def test_expert_tiles_hold_every_routed_pair_once_in_tiles_of_one_expert(tokens, experts, k):
  rng = np.random.default_rng(tokens)
  for skew in (False, True):       # uniform routing, and every token on the same k experts
    ids = np.stack([rng.permutation(experts)[:k] for _ in range(tokens)])
    if skew:
      ids = np.tile(np.arange(k), (tokens, 1))
    rows = decoder.tile_rows(ids.size, experts)
    t = decoder.expert_tiles(jnp.asarray(ids, jnp.int32), experts, rows)
    expert, pair, valid = (np.asarray(a) for a in t)
    assert pair.shape == (decoder.num_tiles(ids.size, experts, rows), rows)
    np.testing.assert_array_equal(np.sort(pair[valid]), np.arange(ids.size))
    np.testing.assert_array_equal(ids.reshape(-1)[pair[valid]],
                                  np.broadcast_to(expert[:, None], pair.shape)[valid])
    assert not valid[expert == experts].any()


@pytest.mark.parametrize("recipe", [None, "w4a16-g32", "w8a8-dynamic"])
def test_grouped_experts_compute_the_dense_function(recipe):
  """``moe_dispatch="grouped"`` (each token through its own experts, a loop over tiles) and
  ``"dense"`` (every expert on every token) are one function, float and quantized, prefill and
  decode with a cache; ``"auto"`` takes the grouped road only where it computes fewer rows."""
  config = dataclasses.replace(CONFIG, num_experts=8, experts_per_token=2)
  model, variables, tokens = _init(config, seed=3)
  if recipe is not None:
    variables = quantize_model(model, variables, jq.recipe_rules(recipe), [tokens]).variables
  run = lambda c, *a, **kw: quantized_apply(decoder.Decoder(c).apply)(variables, *a, **kw)
  dense, grouped = (dataclasses.replace(config, moe_dispatch=d) for d in ("dense", "grouped"))
  want = run(dense, tokens)
  np.testing.assert_allclose(run(grouped, tokens), want, rtol=1e-5, atol=1e-5)
  for c in (dense, grouped):          # decode one token at a time from a 12-token prefill
    cache = decoder.init_cache(c, tokens.shape[0], 16)
    _, cache = run(c, tokens[:, :12], cache=cache)
    step, _ = run(c, tokens[:, 12:13], cache=cache)
    np.testing.assert_allclose(step[:, 0], want[:, 12], rtol=1e-4, atol=1e-4)
  grouped_jaxpr = lambda c, t: "cond" in str(jax.make_jaxpr(lambda v: run(c, t))(variables))
  auto = dataclasses.replace(config, moe_dispatch="auto")
  assert grouped_jaxpr(grouped, tokens) and not grouped_jaxpr(dense, tokens)
  assert grouped_jaxpr(auto, tokens[:1, :1])      # one token: 2 of 8 experts' rows, not 8
  assert not decoder.grouped_is_cheaper(2, 8, 2, "gpu")     # not measured there yet
  with jq.nn.common.observing(lambda *a: None):   # calibration observes the dense road
    assert not grouped_jaxpr(grouped, tokens)
  # and runs it throughout, so its roads (in memory, onloaded) propagate the same bits
  assert not jq.nn.common.calibration(grouped_jaxpr)(grouped, tokens)


def test_moe_config_is_checked_and_round_trips():
  assert decoder.DecoderConfig.from_json(CONFIG.to_json()) == CONFIG
  dense = decoder.DecoderConfig(num_layers=2)
  assert "num_experts" not in dense.to_json()       # a dense config's JSON is what it was
  for bad, match in ((dict(experts_per_token=5), "exceeds num_experts"),
                     (dict(moe_layers=(True,)), "moe_layers has 1 entries"),
                     (dict(moe_names="deepseek"), "moe_names"),
                     (dict(num_experts=0), "num_experts is 0")):
    with pytest.raises(ValueError, match=match):
      dataclasses.replace(CONFIG, **bad)


def test_an_expert_no_token_reaches_is_rounded_to_nearest_and_takes_its_siblings_range():
  """Calibrating on one repeated token routes every position to the same two experts: the other
  two have no GPTQ Hessian (rounded to nearest, logged) and W8A8-static gives them the range of
  the experts that were reached (a scale of 1 would round their real inputs to a handful of
  levels), logged by name."""
  config = dataclasses.replace(CONFIG, moe_layers=None, shared_expert_size=0)
  model, variables, _ = _init(config)
  calib = [jnp.full((2, 16), 5, jnp.int32)] * 2
  _, seen = capture_inputs(model.apply, variables, calib[0])
  dead = [e for e in range(4) if not np.asarray(seen[f"layers_0/mlp/experts_{e}/gate_proj/kernel"]
                                                ).any()]
  assert len(dead) == 2, dead
  res = quantize_model(model, variables, jq.recipe_rules("gptq-w4a16-g32"), calib)
  path = f"params/layers_0/mlp/experts_{dead[0]}/gate_proj/kernel"
  assert any(line.startswith(f"{path}: no nonzero calibration input") for line in res.log)
  notes = {r.path: r.note or "" for r in res.report}
  assert "no calibration input; rounded to nearest" in notes[path]
  live = path.replace(f"experts_{dead[0]}", f"experts_{({0, 1, 2, 3} - set(dead)).pop()}")
  assert "rounded to nearest" not in notes[live]
  res = quantize_model(model, variables, jq.recipe_rules("w8a8-static"), calib)
  qp = res.variables["params"]["layers_0"]["mlp"]
  scales = [float(np.asarray(qp[f"experts_{e}"]["gate_proj"]["kernel"].activation.scale))
            for e in range(4)]
  live = [s for e, s in enumerate(scales) if e not in dead]
  assert all(scales[e] >= max(live) * (1 - 1e-6) for e in dead), scales
  assert any(line.startswith(f"{path}: no calibration input reached this expert") and
             "2 sibling experts" in line for line in res.log), res.log


@pytest.mark.parametrize("recipe", ["awq-w4a16-g32", "smoothquant-w8a8"])
def test_awq_and_smoothquant_scale_all_experts_of_a_layer_through_its_norm(recipe):
  """Each expert reads its own masked copy of the norm's output, so no producer takes one
  expert's scales alone: the experts (and the shared expert) take one row of scales together,
  folded into the norm, the float router and shared-expert gate taking it into their rows (the
  fold checked: the float model is unchanged); with AWQ the quantized model is closer to the
  float one than rounded to nearest."""
  model, variables, _ = _init()
  rng = np.random.default_rng(3)
  calib = [jnp.asarray(rng.integers(0, 64, (2, 16))) for _ in range(2)]
  res = quantize_model(model, variables, jq.recipe_rules(recipe), calib)
  algo = recipe.split("-")[0]
  line = ("params/layers_0/post_attn_norm -> gate_proj x5+up_proj x5 (and router+"
          f"shared_expert_gate, kept float): {algo} scales folded into "
          "params/layers_0/post_attn_norm (affine); float model unchanged")
  assert line in res.log, res.log
  assert not any("experts_0/gate_proj" in l and "not applied" in l for l in res.log)
  if algo != "awq":
    return
  run = jax.jit(quantized_apply(model.apply))
  ref = np.asarray(model.apply(variables, calib[0]))
  base = quantize_model(model, variables, jq.recipe_rules("w4a16-g32"), calib).variables
  err = lambda v: np.linalg.norm(np.asarray(run(v, calib[0])) - ref) / np.linalg.norm(ref)
  assert err(res.variables) < err(base)


def test_names_cover_every_param_and_gguf_refuses_what_llama_cpp_runs_otherwise():
  _, variables, _ = _init()
  for names in ("qwen", "mixtral"):
    config = dataclasses.replace(CONFIG, moe_names=names)
    tensors = decoder_names.decoder_tensors(config)
    paths = {t.jq for t in tensors}
    assert paths == {p for p, _ in jq.leaves_with_paths(variables["params"])}
    for t in tensors:   # the shapes the loader checks are the model's
      want = decoder_names.expected_shape(t.path, config)
      leaf = variables["params"]
      for k in t.path:
        leaf = leaf[k]
      assert tuple(leaf.shape) == want, t.jq
    hf_names = {t.hf for t in tensors}
    prefix = "block_sparse_moe" if names == "mixtral" else "mlp"
    assert f"model.layers.0.{prefix}.experts.3.{'w2' if names == 'mixtral' else 'down_proj'}" \
        ".weight" in hf_names and f"model.layers.0.{prefix}.gate.weight" in hf_names
    stacked = [t for t in tensors if t.expert is not None]   # llama.cpp's (E, out, in) tensors
    assert len(stacked) == 3 * 4 and {t.gguf for t in stacked} == {
        f"blk.0.ffn_{w}_exps.weight" for w in ("gate", "up", "down")}
  # CONFIG has a plain MLP in layer 1 and a shared expert: llama.cpp's llama (Mixtral) runs
  # experts in every layer and no shared expert; qwen2 has no experts at all
  problems = arch_problems(CONFIG, "llama")
  assert any(p.startswith("plain MLPs in layers [1]") for p in problems), problems
  assert any(p.startswith("shared_expert_size=40") for p in problems), problems
  assert any("mixture of experts" in p for p in arch_problems(CONFIG, "qwen2"))
  assert any(p.startswith("normalize_routing=True") for p in arch_problems(CONFIG, "qwen2moe"))


def test_compressed_tensors_of_a_moe_model_reads_back_as_the_same_quantized_tree(
    tiny_hf, tmp_path, capsys):
  """Export (router kept float, in ``ignore``), then jq's reader, then jq-quant eval of the
  export: the logits of the quantized model it was made from."""
  pytest.importorskip("compressed_tensors")
  src = tiny_hf("mixtral")
  ckpt, out = tmp_path / "q.safetensors", tmp_path / "ct"
  assert cli.main(["quantize", "--model", str(src), "--recipe", "ct-w4a16", "--no-eval",
                   "--out", str(ckpt)]) == 0
  assert cli.main(["export", str(ckpt), "--format", "compressed-tensors", "--out", str(out)]) == 0
  qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
  assert "model.layers.0.block_sparse_moe.gate" in qcfg["ignore"]
  config, _ = hf.load_weights(src)
  _, params = compressed_tensors.load_compressed_tensors(out, config=config)
  ours = jq.io.load(ckpt)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 12)))
  run = jax.jit(quantized_apply(decoder.Decoder(config).apply))
  np.testing.assert_allclose(np.asarray(run({"params": params}, ids)),
                             np.asarray(run(ours, ids)), rtol=1e-5, atol=1e-5)
  assert cli.main(["eval", str(out), "--eval-windows", "2", "--window", "32"]) == 0
  # zero points on experts: transformers 5 drops them when it fuses the experts, so it is said
  asym, out2 = tmp_path / "asym.safetensors", tmp_path / "ct-asym"
  assert cli.main(["quantize", "--model", str(src), "--recipe", "w4a16-g32", "--no-eval",
                   "--out", str(asym)]) == 0
  capsys.readouterr()
  assert cli.main(["export", str(asym), "--format", "compressed-tensors", "--out", str(out2)]) == 0
  assert "expert linears with zero points" in capsys.readouterr().out
