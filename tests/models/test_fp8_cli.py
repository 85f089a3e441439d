"""``jq-quant`` with the fp8 recipes on a Hugging Face checkpoint directory: quantize (the static
one calibrates), eval, and export as compressed-tensors' float-quantized format."""
from __future__ import annotations

import json

from jq import cli
from jq import io as jqio
from jq.io.safetensors_io import read_tensors
from jq.qtypes import QType

SMALL = ["--eval-windows", "1", "--window", "64"]
CALIB = ["--calib-sequences", "2", "--calib-len", "64"]


def test_fp8_dynamic_quantize_export_eval(tiny_hf, tmp_path, capsys):
  path = tiny_hf("llama")
  out = tmp_path / "q.safetensors"
  assert cli.main(["quantize", "--model", str(path), "--recipe", "fp8-dynamic", "--out", str(out),
                   *SMALL]) == 0
  meta = jqio.load_header(out)["metadata"]
  assert meta["recipe"] == "fp8-dynamic" and meta["quality"]["kl"] > 0
  q = jqio.load(out)["params"]["layers_0"]["mlp"]["down_proj"]["kernel"]
  assert q.qtype is QType.FP8_E4M3 and q.activation.scale is None
  assert cli.main(["export", str(out), "--format", "compressed-tensors",
                   "--out", str(tmp_path / "ct")]) == 0
  qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
  assert qc["format"] == "float-quantized"
  (g,) = qc["config_groups"].values()
  assert g["weights"]["type"] == "float" and g["input_activations"]["strategy"] == "token"
  capsys.readouterr()
  kl = []
  for ckpt in (out, tmp_path / "ct"):        # the exported directory evaluates to the same KL
    assert cli.main(["eval", str(ckpt), "--json", *SMALL]) == 0
    kl.append(json.loads(capsys.readouterr().out)["kl"])
  assert abs(kl[0] - kl[1]) < 1e-6 and abs(kl[0] - meta["quality"]["kl"]) < 1e-6


def test_fp8_static_calibrates(tiny_hf, tmp_path):
  path = tiny_hf("qwen2")
  out = tmp_path / "s.safetensors"
  assert cli.main(["quantize", "--model", str(path), "--recipe", "fp8-static", "--out", str(out),
                   *CALIB, *SMALL]) == 0
  params = jqio.load(out)["params"]
  for name in ("attn/q_proj", "mlp/down_proj"):
    q = params["layers_1"][name.split("/")[0]][name.split("/")[1]]["kernel"]
    assert q.qtype is QType.FP8_E4M3 and q.activation.spec.mode.value == "static"
    assert float(q.activation.scale) > 0
  assert cli.main(["export", str(out), "--format", "compressed-tensors",
                   "--out", str(tmp_path / "ct")]) == 0
  qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
  (g,) = qc["config_groups"].values()
  assert qc["format"] == "float-quantized" and g["input_activations"]["strategy"] == "tensor"
  assert g["input_activations"]["dynamic"] is False
  t = read_tensors(tmp_path / "ct" / "model.safetensors")
  assert t["model.layers.1.mlp.down_proj.input_scale"].tolist() == [
      float(params["layers_1"]["mlp"]["down_proj"]["kernel"].activation.scale)]
