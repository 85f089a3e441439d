"""The jq-quant command end to end on the real SmolLM2 (small evaluation settings)."""
import json

import pytest

from jq import cli
from jq import io as jqio

pytestmark = [pytest.mark.slow, pytest.mark.optimized]
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
  assert "--window (evaluation window) = 100000 exceeds the model's context" in capsys.readouterr().err
  # a checkpoint for another model: same metadata name, foreign tree
  import jax.numpy as jnp
  other = tmp_path / "other.safetensors"
  jqio.save(other, {"params": {"dense": {"kernel": jnp.ones((4, 4))}}},
            metadata={"model": "smollm2"})
  assert cli.main(["eval", str(other), *FAST]) == 1
  assert "does not fit model smollm2" in capsys.readouterr().err
  assert cli.main(["inspect", str(tmp_path / "missing.safetensors")]) == 1


def test_rules_file_expresses_algorithm_options(tmp_path):
  """A rules file can say everything a recipe says: act-order GPTQ from --rules equals the
  gptq-w4a16-g128-actorder recipe (no model is loaded to parse it)."""
  from jq import spec_json
  from jq.ptq import recipes
  rules = json.loads(spec_json.rules_to_json(recipes.rules("gptq-w4a16-g128")))
  rules[-1] = {"pattern": rules[-1]["pattern"],
               "weight": {"qtype": "uint4", "symmetric": False, "granularity": "group",
                          "group_size": 128},
               "algorithm": "gptq", "options": {"act_order": True}}
  path = tmp_path / "actorder.json"
  path.write_text(json.dumps(rules))
  args = cli.build_parser().parse_args(["quantize", "--rules", str(path)])
  got, label = cli._rules_for(args)
  assert got == recipes.rules("gptq-w4a16-g128-actorder") and label == "rules:actorder.json"
  assert got != recipes.rules("gptq-w4a16-g128")


def test_bad_rules_file_error_names_the_flag_and_location(tmp_path, capsys):
  path = tmp_path / "bad.json"
  path.write_text(json.dumps([{"pattern": "kernel$", "weight": None, "algorithm": "gptq",
                               "options": {"act_order": "yes"}}]))
  assert cli.main(["quantize", "--rules", str(path), "--no-eval"]) == 1
  out = capsys.readouterr()
  assert f"--rules {path}: rules[0].options.act_order" in out.err and "must be a bool" in out.err
  assert "loading" not in out.out   # refused before the model loads


def test_exact_gguf_export_is_read_back_by_inspect_and_eval(tmp_path, capsys):
  """`quantize --recipe gguf-q8_0 && export --type q8_0` re-rounds nothing (no --requantize), the
  float embedding stays F32, and eval of the GGUF jq wrote equals eval of the jq checkpoint."""
  ckpt, out = tmp_path / "q8.safetensors", tmp_path / "smol.q8_0.gguf"
  assert cli.main(["quantize", "--recipe", "gguf-q8_0", "--out", str(ckpt), *FAST]) == 0
  assert cli.main(["export", str(ckpt), "--format", "gguf", "--type", "q8_0",
                   "--out", str(out)]) == 0
  printed = capsys.readouterr().out
  assert "changed grid" not in printed and "F32 x" in printed and "Q8_0 x210" in printed
  assert cli.main(["inspect", str(out)]) == 0
  table = capsys.readouterr().out
  assert "recipe=gguf-q8_0" in table and "blk.0.attn_q.weight" in table
  want = jqio.load_header(ckpt)["metadata"]["quality"]   # quantize's own eval, same settings
  assert cli.main(["eval", str(out), "--json", *FAST]) == 0
  got = json.loads(capsys.readouterr().out)
  assert got["recipe"] == "gguf-q8_0" and abs(got["kl"] - want["kl"]) < 1e-6
  # int8 codes do not fit Q4_0: re-rounding needs the flag, named as the CLI user types it
  assert cli.main(["export", str(ckpt), "--format", "gguf", "--type", "q4_0",
                   "--out", str(tmp_path / "x.gguf")]) == 1
  assert "--requantize" in capsys.readouterr().err


def test_arguments_are_checked_before_any_work(tmp_path, capsys):
  """Counts below their minimum and unwritable outputs are refused by flag before loading."""
  for argv, flag in ((["quantize", "--eval-windows", "0"], "--eval-windows"),
                     (["quantize", "--calib-len", "1"], "--calib-len"),
                     (["eval", "x.safetensors", "--window", "abc"], "--window"),
                     (["generate", "x", "--prompt", "p", "--max-new-tokens", "0"],
                      "--max-new-tokens")):
    with pytest.raises(SystemExit):
      cli.main(argv)
    assert flag in capsys.readouterr().err
  assert cli.main(["quantize", "--out", str(tmp_path), "--no-eval"]) == 1
  out = capsys.readouterr()
  assert "--out" in out.err and "is a directory" in out.err and "loading" not in out.out
  assert cli.main(["quantize", "--out", str(tmp_path / "no" / "x.safetensors"), "--no-eval"]) == 1
  assert "does not exist" in capsys.readouterr().err
  assert cli.main(["inspect", str(tmp_path)]) == 1
  assert "is a directory, not a checkpoint" in capsys.readouterr().err


def test_quantize_help_documents_the_calibration_count(capsys):
  """``--calib-sequences`` was listed in ``quantize --help`` with no text (its default, 32,
  unsaid)."""
  with pytest.raises(SystemExit):
    cli.main(["quantize", "--help"])
  text = " ".join(capsys.readouterr().out.split())
  assert "--calib-sequences N calibrated recipes: calibration sequences" in text
  assert "(default 32)" in text
