"""Mixed-precision plans on SmolLM2-135M: what the planner's 3-bit option buys.

One block scan (``jq.app.block_scan``: each of the 30 blocks quantized alone with each option of
``jq.app.DEFAULT_OPTIONS``, next-token KL on 2 calibration sequences of 256 tokens); then, at each
budget, the plan from the whole menu and the plan from the menu without "w3 g128" (the same scan,
``ScanResult.with_options``), each quantized and evaluated over the ``jq-quant eval`` windows
(8 held-out news windows of 512 tokens; ``benchmarks/bench_common.LMReference``).  3-bit values are
packed densely (3 bits a value), so the option costs 3/4 of a 4-bit one's value bytes.  Writes
``benchmarks/results/mixed_precision_smollm2.{json,md}``.

  python benchmarks/mixed_precision.py [--budgets 3.5 4.0 4.5] [--windows 8] [--window 512]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results" / "mixed_precision_smollm2"
W3 = "w3 g128"


def run(args) -> dict:
  import jax
  from bench_common import LMReference, jq_logits_fn, load_model, log
  from jq import app
  t0 = time.perf_counter()
  model = load_model("smollm2")
  log(f"float reference over {args.windows} x {args.window} tokens ...")
  ref = LMReference(model, windows=args.windows, window=args.window)
  log(f"block scan ({len(app.DEFAULT_OPTIONS)} options) ...")
  t = time.perf_counter()
  scan = app.block_scan(model, calib_len=args.calib_len, calib_sequences=args.calib_sequences)
  scan_s = time.perf_counter() - t
  menus = {"with w3 g128": scan,
           "without w3 g128": scan.with_options([o for o in scan.options if o != W3])}
  rows = []
  for budget in args.budgets:
    for menu, sc in menus.items():
      mp = app.mixed_precision_plan(model, bits_per_weight=budget, scan=sc)
      qvars, _, _ = app.quantize_model(model, mp["rules"])
      m = ref.compare(jq_logits_fn(model, qvars))
      rows.append({"budget": budget, "menu": menu, "bits": mp["bits"], "predicted_kl": mp["kl"],
                   "blocks": {o: sum(v == o for v in mp["plan"].values()) for o in sc.options},
                   "ppl": m["ppl_quant"], "kl": m["kl"], "top1_agreement": m["top1_agreement"]})
      log(f"{budget} bits, {menu}: ppl {m['ppl_quant']:.2f}, KL {m['kl']:.4f}")
      del qvars
  return {"model": model.name, "blocks": len(scan.groups), "options": dict(app.DEFAULT_OPTIONS),
          "scan_s": scan_s, "ppl_float": ref.float_metrics()["ppl_float"], "rows": rows,
          "date": time.strftime("%Y-%m-%d"), "device": (
              f"{os.cpu_count()}-core CPU" if jax.devices()[0].platform == "cpu"
              else jax.devices()[0].device_kind), "jax": jax.__version__,
          "total_s": time.perf_counter() - t0,
          "settings": {k: getattr(args, k) for k in ("windows", "window", "calib_len",
                                                     "calib_sequences")}}


def markdown(res: dict) -> str:
  from bench_common import markdown_table
  opts = list(res["options"])
  rows = [[f"{r['budget']:.1f}", r["menu"], f"{r['bits']:.2f}", f"{r['ppl']:.2f}",
           f"{r['kl']:.4f}", f"{r['predicted_kl']:.4f}", f"{r['top1_agreement']:.3f}",
           ", ".join(f"{o}: {r['blocks'][o]}" for o in opts if r["blocks"].get(o))]
          for r in res["rows"]]
  return "\n".join([
      f"# Mixed-precision plans on {res['model']} ({res['date']}; {res['blocks']} blocks; "
      f"float perplexity {res['ppl_float']:.2f}, {res['settings']['windows']} held-out windows of "
      f"{res['settings']['window']} tokens)", "",
      "One block scan with every option, then per budget the plan from the whole menu and the "
      "plan without the 3-bit option (the same scan). `KL`: measured; `predicted KL`: the sum of "
      "the scan's per-block KLs that the planner minimises.", "",
      markdown_table(["budget bits/w", "menu", "bits/w", "ppl", "KL", "predicted KL", "top-1",
                      "blocks per option"], rows), "",
      f"scan: {res['scan_s']:.0f} s ({len(opts)} options, {res['settings']['calib_sequences']} x "
      f"{res['settings']['calib_len']} calibration tokens); device: {res['device']}; "
      f"jax {res['jax']}; total {res['total_s']:.0f} s", "",
      "Made by `python benchmarks/mixed_precision.py`."])


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--budgets", type=float, nargs="+", default=[3.5, 4.0, 4.5])
  p.add_argument("--windows", type=int, default=8)
  p.add_argument("--window", type=int, default=512)
  p.add_argument("--calib-len", type=int, default=256)
  p.add_argument("--calib-sequences", type=int, default=2)
  p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
  args = p.parse_args(argv)
  res = run(args)
  out = Path(args.out) if args.out else RESULTS.with_suffix(".json")
  from jq.io.atomic import atomic_write
  with atomic_write(os.fspath(out)) as f:
    f.write(json.dumps(res, indent=1).encode())
  md = markdown(res)
  with atomic_write(os.fspath(out.with_suffix(".md"))) as f:
    f.write((md + "\n").encode())
  print(md)
  return res


if __name__ == "__main__":
  main()
