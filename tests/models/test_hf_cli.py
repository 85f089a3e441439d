"""``jq-quant`` on a Hugging Face checkpoint directory, as a new user runs it: quantize with a
calibrated recipe, then eval / generate / inspect / export the checkpoint it wrote."""
from __future__ import annotations

import json
import shutil

import pytest
from conftest import FAMILIES

from jq import cli
from jq import io as jqio

SMALL = ["--eval-windows", "1", "--window", "64"]
CALIB = ["--calib-sequences", "2", "--calib-len", "64"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_quantize_eval_generate_from_a_directory(tiny_hf, tmp_path, capsys, family):
  path = tiny_hf(family)
  out = tmp_path / "q.safetensors"
  assert cli.main(["quantize", "--model", str(path), "--recipe", "gptq-w4a16-g128",
                   "--out", str(out), *CALIB, *SMALL]) == 0
  meta = jqio.load_header(out)["metadata"]
  assert meta["source"]["kind"] == "hf" and meta["source"]["family"] == family
  assert meta["source"]["config"]["num_layers"] == 3
  q = meta["quality"]
  assert q["kl"] > 0 and q["ppl_quant"] > 1
  capsys.readouterr()

  assert cli.main(["eval", str(out), "--json", *SMALL]) == 0
  data = json.loads(capsys.readouterr().out)
  assert data["model"] == family and abs(data["kl"] - q["kl"]) < 1e-6

  assert cli.main(["generate", str(out), "--prompt", "What is the capital", "--max-new-tokens",
                   "4"]) == 0
  assert cli.main(["inspect", str(out)]) == 0
  assert "params/layers_2/attn/o_proj/kernel" in capsys.readouterr().out

  if family != "qwen2":
    return
  # the float model moved: a clear error naming the flag, then --model finds it
  moved = tmp_path / "moved"
  shutil.move(str(path), moved)
  assert cli.main(["eval", str(out), *SMALL]) == 1
  assert "--model PATH" in capsys.readouterr().err
  assert cli.main(["eval", str(out), "--model", str(moved), *SMALL]) == 0


def test_export_keeps_the_family_config(tiny_hf, tmp_path, capsys):
  path = tiny_hf("qwen2")
  out = tmp_path / "q.safetensors"
  assert cli.main(["quantize", "--model", str(path), "--recipe", "w4a16-g128", "--no-eval",
                   "--out", str(out)]) == 0
  assert cli.main(["export", str(out), "--format", "compressed-tensors",
                   "--out", str(tmp_path / "ct")]) == 0
  cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
  src = json.loads((path / "config.json").read_text())
  assert cfg["model_type"] == "qwen2" and cfg["architectures"] == src["architectures"]
  assert {k: cfg[k] for k in src if k != "torch_dtype"} == {k: v for k, v in src.items()
                                                            if k != "torch_dtype"}
  # inspect and eval read the directory; its KL is the jq checkpoint's
  capsys.readouterr()
  assert cli.main(["inspect", str(tmp_path / "ct")]) == 0
  assert "compressed-tensors, architecture=qwen2 recipe=w4a16-g128" in capsys.readouterr().out
  kl = []
  for ckpt in (out, tmp_path / "ct"):
    assert cli.main(["eval", str(ckpt), "--json", *SMALL]) == 0
    kl.append(json.loads(capsys.readouterr().out)["kl"])
  assert abs(kl[0] - kl[1]) < 1e-6
  # the same checkpoint as an orbax directory: inspect and eval read it too
  orbax_dir = tmp_path / "orbax"
  jqio.save_orbax(orbax_dir, jqio.load(out), metadata=jqio.load_header(out)["metadata"])
  assert cli.main(["inspect", str(orbax_dir)]) == 0
  assert "params/layers_0/attn/q_proj/kernel" in capsys.readouterr().out
  assert cli.main(["eval", str(orbax_dir), "--json", *SMALL]) == 0
  assert abs(json.loads(capsys.readouterr().out)["kl"] - kl[0]) < 1e-6


def test_unknown_model_is_a_clear_cli_error(tmp_path, capsys):
  assert cli.main(["quantize", "--model", str(tmp_path / "nope"), "--no-eval"]) == 1
  assert "no such file or directory" in capsys.readouterr().err


@pytest.mark.parametrize("argv,match", [
    (["plan", "--bits", "0"], "--bits"),
    (["plan", "--bits", "nan"], "--bits"),
    (["quantize", "--rules", "/nonexistent/rules.json"], "--rules /nonexistent/rules.json"),
    (["quantize", "--recipe", "gptq-w4a16-g128", "--calib-len", "100000", "--no-eval"],
     "--calib-len"),
    (["quantize", "--window", "100000"], "--window"),
    (["quantize", "--recipe", "gptq-w4a16-g128", "--devices", "64"], "--devices 64"),
    (["quantize", "--recipe", "gptq-w4a16-g128", "--split-factor-from", "64"],
     "--split-factor-from 64: splits GPTQ's factorisation over the devices of --devices N"),
    (["quantize", "--recipe", "autoround-w4a16-g128", "--calib-text", "/nonexistent.txt"],
     "--calib-text /nonexistent.txt"),
])
def test_cli_argument_mistakes_name_the_flag(tiny_hf, tmp_path, capsys, argv, match):
  path = tiny_hf("llama")
  args = [argv[0], "--model", str(path), *argv[1:]]
  if argv[0] == "quantize":
    args += ["--out", str(tmp_path / "q.safetensors")]
  try:
    rc = cli.main(args)
  except SystemExit as e:   # argparse
    rc = e.code
  assert rc != 0 and match in capsys.readouterr().err


def test_an_evaluation_window_beyond_the_context_fails_before_calibrating(tiny_hf, tmp_path,
                                                                           capsys):
  path = tiny_hf("llama")
  assert cli.main(["quantize", "--model", str(path), "--recipe", "gptq-w4a16-g128", "--window",
                   "100000", "--out", str(tmp_path / "q.safetensors")]) == 1
  out = capsys.readouterr()
  assert "--window (evaluation window) = 100000" in out.err and "quantizing" not in out.out


def test_cli_plan_out_is_checked_before_the_scan(tiny_hf, tmp_path, capsys):
  path = tiny_hf("llama")
  assert cli.main(["plan", "--model", str(path), "--out", str(tmp_path / "no" / "r.json")]) == 1
  assert "--out" in capsys.readouterr().err


def test_learned_rounding_from_the_cli_on_the_users_own_text(tiny_hf, tmp_path, capsys):
  """``--recipe autoround-...`` with ``--calib-text FILE``: the loss per block is reported, the
  checkpoint says autoround, and it evaluates like any other."""
  path = tiny_hf("mistral")
  text = tmp_path / "domain.txt"
  text.write_text("The quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
  rules = tmp_path / "rules.json"
  rules.write_text(json.dumps([{"pattern": "kernel$", "weight": {
      "qtype": "uint2", "symmetric": False, "granularity": "group", "group_size": 32},
      "algorithm": "autoround", "options": {"steps": 8, "batch_tokens": 64}}]))
  out = tmp_path / "q.safetensors"
  assert cli.main(["quantize", "--model", str(path), "--rules", str(rules), "--calib-text",
                   str(text), "--out", str(out), *CALIB, *SMALL]) == 0
  printed = capsys.readouterr()
  text_out = printed.out + printed.err
  for unit in ("block params/layers_0", "block params/layers_1", "block params/layers_2",
               "outside blocks"):   # (the rule's pattern also takes the head: outside blocks)
    assert f"{unit}: autoround 8 steps: loss" in text_out, text_out
  header = jqio.load_header(out)
  assert header["metadata"]["quality"]["kl"] > 0
  assert cli.main(["eval", str(out), "--json", *SMALL]) == 0


def test_generate_without_a_chat_template_asks_for_raw(tiny_hf, tmp_path, capsys):
  """A checkpoint whose tokenizer_config.json has no chat_template: generate refuses to wrap the
  prompt in another model's format (it used SmolLM2's ChatML and system prompt, silently),
  naming --raw; with --raw it continues the prompt."""
  path = tiny_hf("llama")
  cfg = json.loads((path / "tokenizer_config.json").read_text())
  del cfg["chat_template"]
  (path / "tokenizer_config.json").write_text(json.dumps(cfg))
  out = tmp_path / "q.safetensors"
  assert cli.main(["quantize", "--model", str(path), "--recipe", "w8a16", "--no-eval",
                   "--out", str(out)]) == 0
  capsys.readouterr()
  assert cli.main(["generate", str(out), "--prompt", "The quick", "--max-new-tokens", "2"]) == 1
  err = capsys.readouterr().err
  assert "no chat template" in err and "--raw" in err
  assert cli.main(["generate", str(out), "--prompt", "The quick", "--max-new-tokens", "2",
                   "--raw"]) == 0


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self"), reason="needs Linux /proc")
def test_an_out_nothing_can_be_written_in_is_refused_before_the_work(tiny_hf, tmp_path, capsys):
  """``--out`` in a directory nothing can be created in (``/proc``; root's permission check says
  yes to it) is refused before loading, naming the flag, not after quantizing."""
  path = tiny_hf("llama")
  assert cli.main(["quantize", "--model", str(path), "--recipe", "w8a16", "--no-eval",
                   "--out", "/proc/q.safetensors"]) == 1
  err = capsys.readouterr()
  assert "--out /proc/q.safetensors: cannot write in /proc" in err.err
  assert "quantizing" not in err.out
  ckpt = tmp_path / "q.safetensors"
  assert cli.main(["quantize", "--model", str(path), "--recipe", "w8a16", "--no-eval",
                   "--out", str(ckpt)]) == 0
  capsys.readouterr()
  assert cli.main(["export", str(ckpt), "--format", "compressed-tensors", "--out",
                   "/proc/ct"]) == 1
  assert "--out /proc/ct: cannot write in /proc" in capsys.readouterr().err


def test_more_eval_windows_than_the_text_holds_are_said(tiny_hf, tmp_path):
  path = tiny_hf("llama")
  out = tmp_path / "q.safetensors"
  assert cli.main(["quantize", "--model", str(path), "--recipe", "w8a16", "--no-eval",
                   "--out", str(out)]) == 0
  with pytest.warns(UserWarning, match=r"--eval-windows 100000: the evaluation text holds \d+ "
                    "windows of 64 tokens; evaluating those"):
    assert cli.main(["eval", str(out), "--eval-windows", "100000", "--window", "64"]) == 0
