"""Onloaded calibration (``jq.ptq.onload``): one block resident at a time, the same result as the
in-memory road (``jq.ptq.quantize_model`` on the whole model), resumable, bad input named.

Tolerance: calibration runs on the block alone instead of inside the whole model's jitted graph;
on CPU every quantized code and weight scale came out identical in these tests, while a static
activation scale (a max over the block's float activations, which XLA fuses differently) differed
by 1.0e-6 relative (Gemma 2's GELU MLP), so activation scales are compared to 1e-5 relative and
everything else exactly."""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

import jq
from jq import cli
from jq import io as jqio
from jq.io import sharded
from jq.ptq import PTQConfig, onload, quantize_model
from jq.spec import Algorithm, Rule
from jq_models import blockwise, hf, registry

CASES = [("llama", "gptq-w4a16-g128"), ("qwen2", "awq-w4a16-g128"),
         ("mistral", "smoothquant-w8a8-static"), ("gemma2", "w8a8-static"),
         ("gemma3_text", "gptq-w4a16-g128-actorder"), ("mixtral", "gptq-w4a16-g128"),
         ("qwen2_moe", "awq-w4a16-g128"), ("qwen3_moe", "smoothquant-w8a8-static")]
CFG = PTQConfig(chunk=2)


def _tokens():
  return np.random.default_rng(0).integers(3, 280, size=(4, 32)).astype(np.int32)


def _flat(tree):
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_close(want, got):
  fa, fb = _flat(want), _flat(got)
  assert fa.keys() == fb.keys()
  for k in fa:
    a, b = fa[k], fb[k]
    assert a.dtype == b.dtype and a.shape == b.shape, k
    if np.issubdtype(a.dtype, np.floating) and "activation" in k:
      np.testing.assert_allclose(b, a, rtol=1e-5, err_msg=k)
    else:
      assert np.array_equal(a, b), k


def _in_memory(path, rules):
  model = registry.load(str(path))
  tokens = _tokens()
  res = quantize_model(model.module, model.variables, rules,
                       [tokens[i:i + 2] for i in range(0, 4, 2)], config=CFG)
  return res.variables


def _onloaded(path, rules, out, sources=None, **kw):
  config, _ = registry.hf_source(path)
  return onload.quantize_onloaded(blockwise.onload_blocks(config),
                                  sources or hf.stream_sources(path, config), rules, _tokens(),
                                  str(out), config=CFG, max_shard_bytes=30_000, **kw)


@pytest.mark.parametrize("family,recipe", CASES)
def test_onloaded_equals_the_in_memory_road(tiny_hf, tmp_path, family, recipe):
  path = tiny_hf(family)
  rules = jq.recipe_rules(recipe)
  res = _onloaded(path, rules, tmp_path / "out")
  assert res.resumed == 0
  _assert_close(_in_memory(path, rules), jqio.load(tmp_path / "out"))
  if recipe.startswith(("awq", "smoothquant")):   # the per-block notes of the one road
    assert any("folded into" in line for line in res.log)


def test_an_interrupted_onloaded_run_resumes_from_the_written_blocks(tiny_hf, tmp_path):
  path = tiny_hf("llama")
  rules = jq.recipe_rules("gptq-w4a16-g32")
  want = jqio.load(_onloaded(path, rules, tmp_path / "ref").out)
  config, _ = registry.hf_source(path)
  sources = hf.stream_sources(path, config)
  i = next(i for i, s in enumerate(sources) if s.path.startswith("params/layers_2/"))

  def dying(a, b):
    raise OSError("simulated: killed while reading block 2")

  broken = list(sources)
  broken[i] = dataclasses.replace(sources[i], read=dying)
  out = tmp_path / "out"
  with pytest.raises(OSError, match="simulated"):
    _onloaded(path, rules, out, sources=broken)
  assert not out.exists()
  res = _onloaded(path, rules, out)
  assert res.resumed > 0
  assert any("read back from the resumed run" in line for line in res.log)
  _assert_close(want, jqio.load(out))
  # other calibration tokens: not the same run, not resumed
  with pytest.raises(OSError):
    _onloaded(path, rules, tmp_path / "o2", sources=broken)
  config_b = PTQConfig(chunk=1)
  with pytest.raises(ValueError, match="other inputs"):
    onload.quantize_onloaded(blockwise.onload_blocks(config), sources, rules, _tokens(),
                             str(tmp_path / "o2"), config=config_b, max_shard_bytes=30_000)


def test_calibrated_rules_outside_the_blocks_are_refused(tiny_hf, tmp_path):
  path = tiny_hf("llama")
  rules = (Rule(pattern="lm_head", weight=jq.W4A16_G128, algorithm=Algorithm.GPTQ),
           *jq.recipe_rules("gptq-w4a16-g128"))
  with pytest.raises(ValueError, match="params/lm_head/kernel.*inside the blocks"):
    _onloaded(path, rules, tmp_path / "out")
  assert not os.path.exists(sharded.work_dir(tmp_path / "out"))


def test_bad_calibration_tokens_are_named(tiny_hf, tmp_path):
  path = tiny_hf("llama")
  config, _ = registry.hf_source(path)
  for tokens, match in ((np.zeros((4,), np.int32), "shape"), (-np.ones((2, 8), np.int32),
                                                              "negative"),
                        (np.zeros((2, 8), np.float32), "integer"),
                        (np.full((2, 8), 288, np.int32), "288 rows")):
    with pytest.raises(ValueError, match=match):
      onload.quantize_onloaded(blockwise.onload_blocks(config), hf.stream_sources(path, config),
                               jq.recipe_rules("gptq-w4a16-g128"), tokens, str(tmp_path / "o"))


def test_cli_stream_calibrates_block_by_block(tiny_hf, tmp_path, capsys):
  path = tiny_hf("qwen2")
  out = tmp_path / "q"
  assert cli.main(["quantize", "--model", str(path), "--stream", "--recipe", "gptq-w4a16-g128",
                   "--calib-sequences", "2", "--calib-len", "32", "--out", str(out)]) == 0
  assert "one block at a time" in capsys.readouterr().out
  header = jqio.load_header(out)
  assert header["metadata"]["recipe"] == "gptq-w4a16-g128" and header["verified"]
  assert cli.main(["eval", str(out), "--json", "--eval-windows", "1", "--window", "64"]) == 0
  assert json.loads(capsys.readouterr().out)["kl"] > 0


def test_cli_stream_writes_the_in_memory_checkpoint(tiny_hf, tmp_path):
  """The same command with and without ``--stream`` gives the same AWQ checkpoint: both roads
  calibrate on the same batches (``cli.CALIB_CHUNK``), and AWQ's token sample (1024 tokens, 512
  kept) depends on them (the streamed road's 4 sequences per forward against the in-memory
  road's 8 once picked other tokens: on a user's 3-block Qwen2, other scales in every kernel
  and 1-35% of the codes)."""
  path = tiny_hf("qwen2")
  args = ["quantize", "--model", str(path), "--recipe", "awq-w4a16-g32", "--calib-sequences",
          "8", "--calib-len", "128", "--no-eval"]
  assert cli.main([*args, "--out", str(tmp_path / "m.safetensors")]) == 0
  assert cli.main([*args, "--stream", "--out", str(tmp_path / "s")]) == 0
  got, want = _flat(jqio.load(tmp_path / "s")), _flat(jqio.load(tmp_path / "m.safetensors"))
  assert got.keys() == want.keys()
  for k, v in want.items():
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(v), err_msg=k)


def test_bf16_checkpoints_fold_awq_scales_and_both_roads_agree(tiny_hf, tmp_path):
  """A bfloat16 checkpoint: folded norms stay float32 (rounding them to bf16 failed every fold
  check, so AWQ silently did nothing); onloaded and in-memory give the same values."""
  import ml_dtypes
  path = tiny_hf("mistral", dtype=ml_dtypes.bfloat16)
  rules = jq.recipe_rules("awq-w4a16-g32")
  model = registry.load(str(path))
  tokens = _tokens()
  res = quantize_model(model.module, model.variables, rules,
                       [tokens[i:i + 2] for i in range(0, 4, 2)], config=CFG)
  assert sum("folded into" in line for line in res.log) >= 3 * 3
  on = _onloaded(path, rules, tmp_path / "out")
  assert sum("folded into" in line for line in on.log) >= 3 * 3
  got = _flat(jqio.load(tmp_path / "out"))
  for k, want in _flat(res.variables).items():
    wide = lambda x: x.astype(np.float32) if x.dtype.kind == "f" or x.dtype == ml_dtypes.bfloat16 \
        else x
    assert np.array_equal(wide(want), wide(got[k])), k


def test_learned_rounding_onloaded_block_by_block(tiny_hf, tmp_path):
  """autoround on the onloaded road: each block learns against the float block on the quantized
  prefix's output, and the log says that this is what the float target means here."""
  path = tiny_hf("llama")
  rules = jq.default_rules(jq.W2A16_G32, algorithm=Algorithm.AUTOROUND,
                           options=jq.AutoRoundOptions(steps=6, batch_tokens=32))
  res = _onloaded(path, rules, tmp_path / "out")
  assert any("as target='local'" in line for line in res.log), res.log
  assert sum("autoround 6 steps: loss" in line or "fell back" in line for line in res.log) == 3
  q = jqio.load(tmp_path / "out")
  kernels = [x for p, x in jq.leaves_with_paths(q) if isinstance(x, jq.QArray)]
  assert kernels and all(k.qtype is jq.QType.UINT2 for k in kernels)
