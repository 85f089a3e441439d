"""Smoke tests of the quality benchmarks (``benchmarks/quality.py``, ``benchmarks/ptq_compare.py``).

They run the real models on tiny settings (``--small``), in this process, and check invariants of
the results (not golden numbers).  The cached-float evaluation helper is checked against
``jq.app.evaluate``, which it replaces in the benchmarks.
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import jax
import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"

pytestmark = [pytest.mark.slow, pytest.mark.optimized]


def _load(name: str):
  if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
  mod_name = f"_bench_{name}"
  if mod_name in sys.modules:
    return sys.modules[mod_name]
  spec = importlib.util.spec_from_file_location(mod_name, BENCH / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  sys.modules[mod_name] = mod
  spec.loader.exec_module(mod)
  return mod


def test_lm_reference_matches_app_evaluate():
  """The cached float reference gives jq.app.evaluate's numbers (same windows and scoring)."""
  from jq import app
  common = _load("bench_common")
  model = common.load_model("smollm2")
  # A perturbed model (no quantization needed to exercise the KL path): one MLP scaled.
  p = jax.tree_util.tree_map(lambda x: x, model.params)
  p["layers_3"]["mlp"]["down_proj"]["kernel"] = p["layers_3"]["mlp"]["down_proj"]["kernel"] * 1.5
  qvars = {"params": p}
  want = app.evaluate(model, qvars, windows=2, window=32)
  ref = common.LMReference(model, windows=2, window=32)
  got = ref.compare(common.jq_logits_fn(model, qvars))
  assert got["eval_tokens"] == want["eval_tokens"] == 2 * 31
  for k in ("ppl_float", "ppl_quant", "top1_agreement"):
    assert got[k] == pytest.approx(want[k], rel=1e-5), k
  assert got["kl"] == pytest.approx(want["kl"], rel=1e-4, abs=1e-7)
  assert got["kl"] > 0 and got["ppl_quant"] != got["ppl_float"]
  assert ref.float_metrics()["ppl_float"] == pytest.approx(want["ppl_float"], rel=1e-5)


def test_quality_small(tmp_path):
  quality = _load("quality")
  out = tmp_path / "quality.json"
  res = quality.main(["--small", "--out", str(out)])
  saved = json.loads(out.read_text())
  assert saved["smollm2"]["rows"] == json.loads(json.dumps(res["smollm2"]["rows"]))
  md = out.with_suffix(".md").read_text()
  assert "| float" in md and "w4a16-g128" in md and "cosine" in md

  lm = res["smollm2"]
  f = lm["float"]
  assert math.isfinite(f["ppl_float"]) and f["ppl_float"] > 1
  rows = {r["recipe"]: r for r in lm["rows"]}
  assert list(rows) == ["w8a16", "w4a16-g128"]
  for r in rows.values():
    assert r["ppl_float"] == f["ppl_float"]
    assert math.isfinite(r["ppl_quant"]) and r["kl"] >= 0 and 0 <= r["top1_agreement"] <= 1
    assert r["linear_bytes_quant"] < r["linear_bytes_float"]
    # The checkpoint holds the packed tensors plus a header.
    assert r["params_bytes"] <= r["checkpoint_bytes"] < r["params_bytes"] + 2**20
    assert r["quantize_s"] > 0
  assert rows["w8a16"]["kl"] < rows["w4a16-g128"]["kl"]
  assert rows["w4a16-g128"]["checkpoint_bytes"] < rows["w8a16"]["checkpoint_bytes"] < f["checkpoint_bytes"]

  enc = {r["recipe"]: r for r in res["minilm"]["rows"]}
  assert list(enc) == ["w8a16", "w4a16-g128"]
  for r in enc.values():
    assert -1 <= r["cosine_min"] <= r["cosine_mean"] <= 1 + 1e-6
  assert enc["w8a16"]["cosine_mean"] > 0.99
  assert enc["w8a16"]["cosine_mean"] > enc["w4a16-g128"]["cosine_mean"]


def test_ptq_compare_small(tmp_path):
  ptq = _load("ptq_compare")
  out = tmp_path / "ptq.json"
  res = ptq.main(["--small", "--out", str(out)])
  saved = json.loads(out.read_text())
  assert "partial" not in saved and saved["summary"] == json.loads(json.dumps(res["summary"]))
  assert "SmoothQuant" in out.with_suffix(".md").read_text()
  rows = {r["key"]: r for r in res["rows"]}
  assert list(rows) == list(ptq.SMALL)
  for r in rows.values():
    assert math.isfinite(r["ppl_quant"]) and r["kl"] >= 0 and r["quantize_s"] > 0
  sq = res["summary"]["smoothquant"]["smoothquant-w8a8-static"]
  assert sq["vs"] == "w8a8-static"
  # Per-tensor static int8 activations collapse on SmolLM2's outlier channels; smoothing fixes
  # most of it even with 64 calibration tokens.
  assert sq["lowers_loss"]


def test_ptq_compare_records_qwix_refusal():
  pytest.importorskip("qwix")
  ptq = _load("ptq_compare")
  res = ptq.main(["--small", "--only", "qwix-gptq-int4-g128"])
  (row,) = res["rows"]
  assert row["error"].startswith("qwix: refused: ")
  assert "cannot be tiled" in row["error"]
  assert "qwix: refused" in ptq.report(res)


def test_ptq_summary_fractions():
  ptq = _load("ptq_compare")
  fm = {"ppl_float": 10.0, "eval_tokens": 1}
  row = lambda k, ppl, kl: {"key": k, "method": "m", "spec": "s", "ppl_quant": ppl, "kl": kl,
                            "top1_agreement": 0.9, "quantize_s": 1.0}
  rows = [row("rtn-w4a16-g128", 14.0, 0.4), row("gptq-w4a16-g128", 12.0, 0.1),
          row("awq-w4a16-g128", 15.0, 0.5), row("w8a8-static", 11.0, 0.2),
          row("smoothquant-w8a8-static", 10.5, 0.05), {"key": "qwix-gptq-int4-g128", "method": "qwix GPTQ", "spec": "s", "error": "qwix: refused: x"}]
  s = ptq.summarize(fm, rows)
  assert s["recovered"]["gptq-w4a16-g128"]["ppl_fraction"] == pytest.approx(0.5)
  assert s["recovered"]["gptq-w4a16-g128"]["kl_fraction"] == pytest.approx(0.75)
  assert s["recovered"]["awq-w4a16-g128"]["ppl_fraction"] == pytest.approx(-0.25)
  assert s["smoothquant"]["smoothquant-w8a8-static"]["lowers_loss"] is True
  text = ptq.report({"float": fm, "rows": rows, "summary": s, "device": "cpu", "jax": "x",
                     "total_s": 1.0, "settings": {"calib_sequences": 1, "calib_len": 2,
                                                  "windows": 1, "window": 2}})
  assert "DOES NOT meet" in text  # AWQ
  assert "gptq-w4a16-g128 recovers 50.0%" in text and "meets the" in text
  assert "qwix: refused: x" in text


def test_mixed_precision_small(tmp_path):
  mp = _load("mixed_precision")
  out = tmp_path / "mp.json"
  res = mp.main(["--budgets", "4.0", "--windows", "1", "--window", "32", "--calib-len", "32",
                 "--calib-sequences", "1", "--out", str(out)])
  assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(res["rows"]))
  assert "blocks per option" in out.with_suffix(".md").read_text()
  rows = {r["menu"]: r for r in res["rows"]}
  assert list(rows) == ["with w3 g128", "without w3 g128"] and res["blocks"] == 30
  assert "w3 g128" not in rows["without w3 g128"]["blocks"]
  for r in rows.values():
    assert r["bits"] <= 4.0 and sum(r["blocks"].values()) == 30
    assert math.isfinite(r["ppl"]) and r["kl"] >= 0 and r["predicted_kl"] >= 0
  assert set(rows["with w3 g128"]["blocks"]) == set(res["options"]) >= {"w3 g128", "w2 g32"}


def test_moe_small(tmp_path):
  """Grouped and dense mixture-of-experts roads give the same logits in every benchmarked case;
  the results are written as JSON and markdown."""
  moe = _load("moe")
  assert moe.main(["--small", "--out", str(tmp_path / "moe")]) == 0
  res = json.loads((tmp_path / "moe.json").read_text())
  assert len(res["rows"]) == 4 and res["peak_rss_mib"] > 0
  for r in res["rows"]:
    assert r["max_logit_diff"] < 1e-4 and r["dense_ms"] > 0 and r["grouped_ms"] > 0, r
  assert "dense / grouped" in (tmp_path / "moe.md").read_text()
