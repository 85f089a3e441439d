"""The jq-quant command end to end on the real SmolLM2 (small evaluation settings)."""
import json

import pytest

from jq import cli
from jq import io as jqio

pytestmark = pytest.mark.slow
FAST = ["--eval-windows", "1", "--window", "128"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  out = tmp_path_factory.mktemp("ckpt") / "smollm2-w8.safetensors"
  assert cli.main(["quantize", "--recipe", "w8a16", "--out", str(out), *FAST]) == 0
  return out


def test_quantize_writes_checkpoint_with_summary(ckpt, capsys):
  header = jqio.load_header(ckpt)
  assert header["metadata"]["model"] == "smollm2"
  assert header["metadata"]["recipe"] == "w8a16"
  q = header["metadata"]["quality"]
  assert q["ppl_quant"] < 1.05 * q["ppl_float"] and q["kl"] < 0.05


def test_inspect_reads_header_only(ckpt, capsys):
  assert cli.main(["inspect", str(ckpt)]) == 0
  out = capsys.readouterr().out
  assert "params/layers_0/attn/q_proj/kernel" in out and "int8" in out


def test_eval_json(ckpt, capsys):
  assert cli.main(["eval", str(ckpt), "--json", *FAST]) == 0
  data = json.loads(capsys.readouterr().out)
  assert data["model"] == "smollm2" and data["kl"] >= 0 and data["ppl_quant"] > 1


def test_generate_writes_text(ckpt, capsys):
  assert cli.main(["generate", str(ckpt), "--prompt", "What is the capital of France?",
                   "--max-new-tokens", "12"]) == 0
  assert "Paris" in capsys.readouterr().out


def test_bad_inputs(ckpt, tmp_path, capsys):
  with pytest.raises(SystemExit):
    cli.main(["quantize", "--recipe", "no-such-recipe"])
  assert cli.main(["quantize", "--model", "gpt-17", "--no-eval"]) == 1
  assert "unknown model" in capsys.readouterr().err
  assert cli.main(["eval", str(ckpt), "--window", "100000", "--eval-windows", "1"]) == 1
  assert "fewer than one window" in capsys.readouterr().err
  # a checkpoint for another model: same metadata name, foreign tree
  import jax.numpy as jnp
  other = tmp_path / "other.safetensors"
  jqio.save(other, {"params": {"dense": {"kernel": jnp.ones((4, 4))}}},
            metadata={"model": "smollm2"})
  assert cli.main(["eval", str(other), *FAST]) == 1
  assert "does not fit model smollm2" in capsys.readouterr().err
  assert cli.main(["inspect", str(tmp_path / "missing.safetensors")]) == 1
