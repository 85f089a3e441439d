"""Exports of Hugging Face-sourced checkpoints from the command line: compressed-tensors keeps each
family's own config and loads in transformers with the quantized model's logits; an export that
must re-round needs ``--requantize`` and lists every tensor it changed."""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAMILIES

from jq import cli
from jq import io as jqio
from jq.nn import quantized_apply
from jq_models import registry


def _quantize(path, out, recipe):
  assert cli.main(["quantize", "--model", str(path), "--recipe", recipe, "--no-eval",
                   "--out", str(out)]) == 0


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_compressed_tensors_of_every_family_loads_in_transformers(tiny_hf, tmp_path, family):
  pytest.importorskip("compressed_tensors")
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  src = tiny_hf(family)
  ckpt, out = tmp_path / "q.safetensors", tmp_path / "ct"
  asym = family in ("gemma2", "llama", "qwen3")   # uint4 with zero points, groups of 32
  _quantize(src, ckpt, "w4a16-g32" if asym else "ct-w4a16")
  assert cli.main(["export", str(ckpt), "--format", "compressed-tensors", "--out", str(out)]) == 0
  cfg = json.loads((out / "config.json").read_text())
  assert cfg["quantization_config"].get("run_compressed", True) is not asym
  assert cfg["model_type"] == family and cfg["quantization_config"]["quant_method"] == \
      "compressed-tensors"
  assert (out / "tokenizer.json").is_file()
  model = registry.load(str(src))
  qvars = jqio.load(ckpt)
  ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 12))
  want = np.asarray(quantized_apply(model.module.apply)(qvars, jnp.asarray(ids)))
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
  with torch.no_grad():
    got = hf(torch.tensor(ids)).logits.numpy()
  assert np.abs(got - want).max() / np.abs(want).max() < 1e-4, family


def test_a_group_recipe_stays_one_scheme_where_a_layer_is_one_group_wide(tiny_hf, tmp_path):
  """w4a16-g32 (zero points) on a model whose down_proj reads 32 inputs: that kernel's one group
  per row is a per-channel tile, stored as the checkpoint's group scheme (its scales repeated per
  group: exact), so the export is one scheme and transformers 5 loads it with jq's logits (two
  schemes with packed zero points it refuses)."""
  pytest.importorskip("compressed_tensors")
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  src = tiny_hf("llama", intermediate_size=32)
  ckpt, out = tmp_path / "q.safetensors", tmp_path / "ct"
  _quantize(src, ckpt, "w4a16-g32")
  qvars = jqio.load(ckpt)
  down = qvars["params"]["layers_0"]["mlp"]["down_proj"]["kernel"]
  assert down.shape == (32, 64) and tuple(down.tile) == (32, 1)   # per channel, in effect
  assert cli.main(["export", str(ckpt), "--format", "compressed-tensors", "--out", str(out)]) == 0
  groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
  assert len(groups) == 1 and groups["group_0"]["weights"]["group_size"] == 32, groups
  model = registry.load(str(src))
  ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 12))
  want = np.asarray(quantized_apply(model.module.apply)(qvars, jnp.asarray(ids)))
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
  with torch.no_grad():
    got = hf(torch.tensor(ids)).logits.numpy()
  assert np.abs(got - want).max() / np.abs(want).max() < 1e-4


def test_w8a8_export_decompresses_to_jq_weights(tiny_hf, tmp_path):
  """W8A8: transformers' CPU emulation of dynamic int8 activations is its own (vLLM serves the
  checkpoint); what the file defines, the int8 weights and their scales, must equal jq's."""
  pytest.importorskip("compressed_tensors")
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  import jq
  src = tiny_hf("qwen2")
  ckpt, out = tmp_path / "q.safetensors", tmp_path / "ct"
  _quantize(src, ckpt, "ct-w8a8")
  assert cli.main(["export", str(ckpt), "--format", "compressed-tensors", "--out", str(out)]) == 0
  qc = json.loads((out / "config.json").read_text())["quantization_config"]
  group = next(iter(qc["config_groups"].values()))
  assert group["input_activations"]["dynamic"] and group["input_activations"]["strategy"] == "token"
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
  state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  deq = jq.dequantize_tree(jqio.load(ckpt))["params"]
  for name, mod in (("self_attn.q_proj", ("attn", "q_proj")), ("mlp.down_proj", ("mlp", "down_proj"))):
    want = np.asarray(deq["layers_1"][mod[0]][mod[1]]["kernel"]).T
    w = state[f"model.layers.1.{name}.weight"]          # kept compressed: int8 codes + scales
    assert w.dtype == np.int8
    np.testing.assert_allclose(w * state[f"model.layers.1.{name}.weight_scale"], want,
                               rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(state["model.layers.1.self_attn.q_proj.bias"],
                                np.asarray(deq["layers_1"]["attn"]["q_proj"]["bias"]))


def test_export_that_rerounds_needs_the_flag_and_lists_changes(tiny_hf, tmp_path, capsys):
  src = tiny_hf("llama")
  ckpt = tmp_path / "nf4.safetensors"
  _quantize(src, ckpt, "nf4-g64")
  capsys.readouterr()
  out = tmp_path / "ct"
  assert cli.main(["export", str(ckpt), "--format", "compressed-tensors", "--out", str(out)]) == 1
  err = capsys.readouterr().err
  assert "--requantize" in err and "requantize=True (jq-quant" in err and not out.exists()
  assert cli.main(["export", str(ckpt), "--format", "compressed-tensors", "--out", str(out),
                   "--requantize"]) == 0
  printed = capsys.readouterr().out
  assert "params/layers_0/attn/q_proj/kernel: re-rounded from nf4" in printed
  assert "21 tensors changed grid" in printed
  # exact grids need no flag
  exact = tmp_path / "ct.safetensors"
  _quantize(src, exact, "ct-w4a16")
  capsys.readouterr()
  assert cli.main(["export", str(exact), "--format", "compressed-tensors",
                   "--out", str(tmp_path / "ct2")]) == 0
  assert "changed grid" not in capsys.readouterr().out


def test_gguf_export_of_a_hugging_face_source_is_refused_clearly(tiny_hf, tmp_path, capsys):
  src = tiny_hf("qwen3")
  ckpt = tmp_path / "q.safetensors"
  _quantize(src, ckpt, "gguf-q8_0")
  tj = json.loads((src / "tokenizer.json").read_text())   # a prefix space llama.cpp never adds
  tj["pre_tokenizer"]["add_prefix_space"] = True          # (test_gguf_families: without, it goes)
  (src / "tokenizer.json").write_text(json.dumps(tj))
  capsys.readouterr()
  assert cli.main(["export", str(ckpt), "--format", "gguf", "--out",
                   str(tmp_path / "x.gguf")]) == 1
  err = capsys.readouterr().err
  assert "qwen3's tokenizer cannot be written for llama.cpp: tokenizer.json's ByteLevel " \
      "pre-tokenizer adds a prefix space" in err and "--tokenizer-gguf PATH" in err
  g2 = tiny_hf("gemma2")   # query_pre_attn_scalar 24: llama.cpp's gemma2 scales by 1/sqrt(16)
  _quantize(g2, tmp_path / "g2.safetensors", "gguf-q8_0")
  capsys.readouterr()
  assert cli.main(["export", str(tmp_path / "g2.safetensors"), "--format", "gguf", "--out",
                   str(tmp_path / "g2.gguf")]) == 1
  assert "query_scale=" in capsys.readouterr().err
  assert cli.main(["export", str(ckpt), "--format", "gguf", "--out",
                   str(tmp_path / "missing" / "x.gguf")]) == 1
  assert "--out" in capsys.readouterr().err


def test_gguf_requantize_counts_each_changed_tensor_once(tiny_hf, tmp_path, capsys):
  """``--type q4_k --requantize`` on rows of 64: each kernel falls back to Q5_0 and is re-rounded
  (two lines, one tensor); the summary counts tensors, not lines (it said twice as many)."""
  from jq.io import gguf as G
  from jq_models import hf
  from test_gguf_families import _tokenizer_metadata
  src = tiny_hf("llama")
  config, params = hf.load_weights(src)
  tok = tmp_path / "tok.gguf"
  G.export_gguf({"params": params}, config, {**_tokenizer_metadata(src, config.vocab_size),
                                              "tokenizer.ggml.eos_token_id": 4}, tok, "f32")
  ckpt = tmp_path / "w4.safetensors"
  _quantize(src, ckpt, "w4a16-g32")
  capsys.readouterr()
  assert cli.main(["export", str(ckpt), "--format", "gguf", "--type", "q4_k", "--requantize",
                   "--out", str(tmp_path / "q4k.gguf"), "--tokenizer-gguf", str(tok)]) == 0
  printed = capsys.readouterr().out
  lines = printed.splitlines()
  rerounded = {line.split()[0].rstrip(":") for line in lines if "re-rounded" in line}
  fallbacks = {line.split()[0] for line in lines if "falls back to Q5_0" in line}
  assert len(rerounded) >= 7 and fallbacks == rerounded, printed
  assert f"\n{len(rerounded)} tensors changed grid" in printed, printed


def test_rows_gguf_blocks_do_not_divide_are_said_at_quantize_and_written_float(tiny_hf, tmp_path,
                                                                              capsys):
  """Hidden 80, intermediate 112: gguf-q8_0's groups of 32 end partial, which quantize says;
  the GGUF export writes those tensors F32 (exact), each named, and evaluates to the checkpoint's
  KL (the export had refused the whole model)."""
  src = tiny_hf("llama", hidden_size=80, num_attention_heads=4, num_key_value_heads=2,
                head_dim=20, intermediate_size=112)
  ckpt, out = tmp_path / "q.safetensors", tmp_path / "q.gguf"
  capsys.readouterr()
  _quantize(src, ckpt, "gguf-q8_0")
  printed = capsys.readouterr().out
  assert "note: 21 tensors end in a partial group (e.g. params/layers_0/attn/k_proj/kernel, " \
      "shape (80, 40))" in printed
  assert cli.main(["export", str(ckpt), "--format", "gguf", "--out", str(out)]) == 0
  printed = capsys.readouterr().out
  assert "params/layers_0/mlp/down_proj/kernel (blk.0.ffn_down.weight): 112 input columns are " \
      "not a multiple of 32, so Q8_0 falls back to F32" in printed
  assert "21 tensors written in another type than asked" in printed
  assert "changed grid" not in printed
  kl = []
  for path in (ckpt, out):
    assert cli.main(["eval", str(path), "--json", "--eval-windows", "1", "--window", "64"]) == 0
    kl.append(json.loads(capsys.readouterr().out)["kl"])
  assert kl[0] > 0 and abs(kl[0] - kl[1]) < 1e-6


def test_export_type_flags_are_checked_for_the_format_before_loading(tiny_hf, tmp_path, capsys,
                                                                     monkeypatch):
  """``--type`` / ``--embed-type`` are GGUF flags: compressed-tensors refused ``--embed-type`` but
  dropped ``--type q4_0`` silently; a type jq cannot write (``--embed-type q5_k``) was written as
  F16 where the rows were narrower than its blocks (refused only on wider ones). All are refused
  by flag before the checkpoint is read; ``export_gguf`` refuses such an ``embed_type`` too."""
  from jq.io import gguf as G
  from jq_models import hf
  src = tiny_hf("qwen2")
  ckpt = tmp_path / "q.safetensors"
  _quantize(src, ckpt, "gguf-q8_0")
  capsys.readouterr()
  loads = []
  real = cli._load_ckpt
  monkeypatch.setattr(cli, "_load_ckpt", lambda *a, **k: loads.append(a) or real(*a, **k))
  for argv, match in (
      (["--format", "compressed-tensors", "--type", "q4_0", "--out", str(tmp_path / "ct")],
       "--type applies to --format gguf only"),
      (["--format", "compressed-tensors", "--embed-type", "q8_0", "--out", str(tmp_path / "ct")],
       "--embed-type applies to --format gguf only"),
      (["--format", "gguf", "--embed-type", "q5_k", "--out", str(tmp_path / "x.gguf")],
       "--embed-type q5_k: jq cannot write GGUF Q5_K"),
      (["--format", "gguf", "--type", "bogus", "--out", str(tmp_path / "x.gguf")],
       "--type: unknown GGUF tensor type 'bogus'")):
    assert cli.main(["export", str(ckpt), *argv]) == 1
    err = capsys.readouterr().err
    assert match in err, err
  assert not loads and not (tmp_path / "ct").exists() and not (tmp_path / "x.gguf").exists()
  config, params = hf.load_weights(src)
  with pytest.raises(G.GGUFExportError, match="cannot write GGUF Q5_K"):
    G.export_gguf({"params": params}, config, None, tmp_path / "y.gguf", "f32", embed_type="q5_k")
  assert cli.main(["export", str(ckpt), "--format", "gguf", "--out", str(tmp_path / "x.gguf")]) == 0
