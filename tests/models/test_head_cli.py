"""``jq-quant quantize --head int8``: the decoder's output head in int8 (``lm_head``, or a tied head's
token embedding, whose lookups then read int8 rows), in memory and streamed, run as quantized and
exported where the format can hold it."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jq
from jq import cli
from jq import io as jqio
from jq.nn import quantized_apply
from jq_models import registry


def _quantize(src, out, *extra, recipe="w4a16-g32"):
  assert cli.main(["quantize", "--model", str(src), "--recipe", recipe, "--head", "int8",
                   "--no-eval", "--out", str(out), *extra]) == 0


@pytest.mark.parametrize("family", ["llama", "gemma"])   # untied; tied with scaled embeddings
def test_int8_head_in_memory_and_streamed(tiny_hf, tmp_path, capsys, family):
  src = tiny_hf(family)
  model = registry.load(str(src))
  cfg = model.config
  ckpt, streamed = tmp_path / "q.safetensors", tmp_path / "streamed"
  _quantize(src, ckpt)
  qvars = jqio.load(ckpt)
  p = qvars["params"]
  head = p["embed"]["embedding"] if cfg.tie_embeddings else p["lm_head"]["kernel"]
  assert isinstance(head, jq.QArray) and head.qtype is jq.QType.INT8
  vocab_axis = 0 if cfg.tie_embeddings else 1
  assert head.scale.shape[vocab_axis] == cfg.vocab_size and head.scale.size == cfg.vocab_size
  if not cfg.tie_embeddings:      # an untied lookup table stays float
    assert not isinstance(p["embed"]["embedding"], jq.QArray)
  assert jqio.load_header(ckpt)["metadata"]["recipe"] == "w4a16-g32+head-int8"
  ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 10)))
  got = quantized_apply(model.module.apply)(qvars, ids)
  want = model.module.apply(jq.dequantize_tree(qvars), ids)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4,
                             atol=1e-4 * float(np.abs(want).max()))
  # the streamed road writes the same tensors, bit for bit
  _quantize(src, streamed, "--stream")
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               qvars, jqio.load(streamed))     # (the same tree: paths, qtypes, tiles too)
  capsys.readouterr()
  assert cli.main(["eval", str(ckpt), "--json", "--eval-windows", "1", "--window", "32"]) == 0
  assert json.loads(capsys.readouterr().out)["kl"] > 0
  assert cli.main(["generate", str(ckpt), "--prompt", "Hi", "--max-new-tokens", "3",
                   "--kv-cache", "int8"]) == 0


def test_an_int8_lm_head_exports_to_compressed_tensors_and_a_tied_one_is_refused(
    tiny_hf, tmp_path, capsys):
  pytest.importorskip("compressed_tensors")
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  src = tiny_hf("llama")
  ckpt, out = tmp_path / "q.safetensors", tmp_path / "ct"
  _quantize(src, ckpt, recipe="ct-w4a16")   # (symmetric: transformers decompresses mixed grids)
  assert cli.main(["export", str(ckpt), "--format", "compressed-tensors", "--out", str(out)]) == 0
  qc = json.loads((out / "config.json").read_text())["quantization_config"]
  assert "lm_head" not in qc["ignore"]
  assert any(g["targets"] == ["lm_head"] and g["weights"]["num_bits"] == 8
             for g in qc["config_groups"].values())
  model = registry.load(str(src))
  ids = np.random.default_rng(1).integers(0, model.config.vocab_size, (2, 12))
  want = np.asarray(quantized_apply(model.module.apply)(jqio.load(ckpt), jnp.asarray(ids)))
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
  with torch.no_grad():
    got = hf(torch.tensor(ids)).logits.numpy()
  assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
  # a tied head is the token embedding, which compressed-tensors keeps float: refused by name
  tied = tiny_hf("qwen2")
  _quantize(tied, tmp_path / "t.safetensors", recipe="ct-w4a16")
  capsys.readouterr()
  assert cli.main(["export", str(tmp_path / "t.safetensors"), "--format", "compressed-tensors",
                   "--out", str(tmp_path / "ct2")]) == 1
  err = capsys.readouterr().err
  assert "params/embed/embedding" in err and "without --head" in err
  assert not (tmp_path / "ct2").exists()


def test_head_is_refused_for_a_model_without_one():
  args = cli.build_parser().parse_args(["quantize", "--model", "minilm", "--head", "int8"])
  with pytest.raises(ValueError, match="--head: minilm has no output head"):
    cli._with_head(args, jq.recipe_rules("w8a16"), None)   # pylint: disable=protected-access
