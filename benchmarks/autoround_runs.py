"""Learned rounding on SmolLM2-135M, one row per process: quantize with an ``autoround-*`` recipe
(or any recipe) through ``jq.app.quantize_model`` (the CLI's road), evaluate with the
``jq-quant eval`` protocol (8 held-out news windows of 512 tokens, float perplexity 33.06), and
merge the row into ``benchmarks/results/autoround_smollm2.json`` (plus a markdown table beside
it).  The options override the recipe's (steps, tokens per step, init, optimizer); the calibration
text is the news calibration split or Shakespeare (evaluation is always held-out news).

  python benchmarks/autoround_runs.py --recipe autoround-w4a16-g128 --steps 100 --batch-tokens 1024
  python benchmarks/autoround_runs.py --recipe autoround-w3a16-g128 --calib-text shakespeare
  python benchmarks/autoround_runs.py --recipe w2a16-g32          # a baseline row
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "autoround_smollm2.json"


def _peak_rss_gib() -> float:
  from bench_common import peak_rss_bytes
  return peak_rss_bytes() / 2**30


def run(args) -> dict:
  import jax
  from jq import app
  from jq.spec import Algorithm, recipe_rules
  from jq_models import registry
  rules = recipe_rules(args.recipe)
  over = {k: v for k, v in (("steps", args.steps), ("batch_tokens", args.batch_tokens),
                             ("init", args.init), ("optimizer", args.optimizer),
                             ("lr", args.lr)) if v is not None}
  if over:
    if rules[-1].algorithm is not Algorithm.AUTOROUND:
      raise SystemExit(f"--steps/--batch-tokens/--init/... need an autoround recipe, not "
                       f"{args.recipe}")
    rules = recipe_rules(args.recipe, options=dataclasses.replace(rules[-1].options, **over))
  model = registry.load("smollm2")
  t0 = time.perf_counter()
  qvars, _, log = app.quantize_model(model, rules, calib_sequences=args.calib_sequences,
                                     calib_len=args.calib_len, calib_text=args.calib_text,
                                     progress=True)
  secs = time.perf_counter() - t0
  q = app.evaluate(model, qvars, windows=args.windows, window=512)
  opts = rules[-1].options
  row = {"recipe": args.recipe, "calib_text": args.calib_text,
         "calib": f"{args.calib_sequences}x{args.calib_len}", "quant_s": round(secs, 1),
         "peak_rss_gib": round(_peak_rss_gib(), 2), "device": jax.devices()[0].device_kind,
         "blocks": [line for line in log if "autoround" in line], **q}
  if opts is not None and rules[-1].algorithm is Algorithm.AUTOROUND:
    row.update(dataclasses.asdict(opts))
  return row


def merge(row: dict, path: Path = RESULTS) -> dict:
  """Adds ``row`` to the results file (replacing a row with the same recipe, calibration text,
  steps and tokens per step), atomically; rewrites the markdown table beside it."""
  data = json.loads(path.read_text()) if path.exists() else {"rows": []}
  key = lambda r: (r["recipe"], r["calib_text"], r.get("steps"), r.get("batch_tokens"))
  data["rows"] = [r for r in data["rows"] if key(r) != key(row)] + [row]
  data["ppl_float"] = row["ppl_float"]
  data["rows"].sort(key=lambda r: (r["recipe"].split("-", 1)[-1], r["ppl_quant"]))
  path.parent.mkdir(parents=True, exist_ok=True)
  for target, text in ((path, json.dumps(data, indent=1) + "\n"),
                       (path.with_suffix(".md"), table(data))):
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    with os.fdopen(fd, "w") as f:
      f.write(text)
    os.replace(tmp, target)
  return data


def table(data: dict) -> str:
  pf = data["ppl_float"]
  lines = [f"# Learned rounding on SmolLM2-135M (float perplexity {pf:.2f}, 8 held-out news "
           "windows of 512 tokens)", "",
           "| recipe | calibration | steps x tokens/step | init | ppl | x float | mean KL | "
           "top-1 | quantize s | peak RSS GiB |", "| --- | --- | --- | --- | ---: | ---: | ---: | "
           "---: | ---: | ---: |"]
  for r in data["rows"]:
    how = f"{r['steps']} x {r['batch_tokens']}" if "steps" in r else "-"
    lines.append(f"| {r['recipe']} | {r['calib_text']} {r['calib']} | {how} | "
                 f"{r.get('init', '-')} | {r['ppl_quant']:.2f} | {r['ppl_quant'] / pf:.2f} | "
                 f"{r['kl']:.4f} | {r['top1_agreement']:.3f} | {r['quant_s']:.0f} | "
                 f"{r.get('peak_rss_gib', float('nan')):.2f} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--recipe", required=True)
  ap.add_argument("--steps", type=int)
  ap.add_argument("--batch-tokens", type=int)
  ap.add_argument("--init", choices=["rtn", "gptq", "awq"])
  ap.add_argument("--optimizer", choices=["signsgd", "adam"])
  ap.add_argument("--lr", type=float)
  ap.add_argument("--calib-text", default="news")
  ap.add_argument("--calib-sequences", type=int, default=32)
  ap.add_argument("--calib-len", type=int, default=512)
  ap.add_argument("--windows", type=int, default=8)
  ap.add_argument("--no-write", action="store_true", help="print the row only")
  args = ap.parse_args(argv)
  row = run(args)
  print(json.dumps({k: v for k, v in row.items() if k != "blocks"}), flush=True)
  if not args.no_write:
    merge(row)
  return 0


if __name__ == "__main__":
  sys.exit(main())
