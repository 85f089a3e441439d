"""Accuracy and size of jq's RTN recipes on real models (CPU is fine; slow but exact).

SmolLM2-135M-Instruct: perplexity of the float model and of each quantized variant on held-out
text (``jq_models.text`` eval split), mean KL(float || quant) per token, top-1 agreement, bytes of the
parameters and of the saved checkpoint (``jq.io.save`` to a temporary file), and the time to
quantize.  MiniLM-L6: mean and min cosine similarity of sentence embeddings before/after, for the
recipes that apply to it (RTN weight-only and ``w8a8-dynamic``).  Each model is loaded once and
the float model is evaluated once (its log-probabilities are cached per window).

  python benchmarks/quality.py                               # 6 recipes, 16 windows of 512
  python benchmarks/quality.py --recipes w8a16 w4a16-g128 --windows 4 --out results.json
  python benchmarks/quality.py --small                       # smoke run (2 windows of 128)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (EncoderReference, LMReference, checkpoint_bytes, fmt,  # noqa: E402
                          jq_logits_fn, load_model, log, markdown_table, mib,
                          quantized_linear_bytes)

DEFAULT_RECIPES = ("w8a16", "w8a8-dynamic", "w4a16-g128", "w4a16-g32", "w2a16-g32", "nf4-g64")
SMALL_RECIPES = ("w8a16", "w4a16-g128")


def _quantize(model, name: str, args):
  from jq import app
  from jq.ptq import recipes
  rules = recipes.rules(name)
  t0 = time.perf_counter()
  qvars, ref_vars, _ = app.quantize_model(model, rules, calib_sequences=args.calib_sequences,
                                          calib_len=args.calib_len)
  qvars = jax.block_until_ready(qvars)
  return rules, qvars, ref_vars, time.perf_counter() - t0


def _encoder_applicable(name: str) -> bool:
  from jq.ptq import recipes
  return not recipes.needs_calibration(recipes.rules(name))


def run_lm(args) -> dict:
  from jq import app
  from jq import tree as jqtree
  log("loading smollm2")
  model = load_model("smollm2")
  log(f"float reference: {args.windows} windows of {args.window} tokens")
  ref = LMReference(model, windows=args.windows, window=args.window)
  fvars = app.float_variables(model)
  float_row = {"recipe": "float", **ref.float_metrics(), "params_bytes": jqtree.nbytes(fvars),
               "checkpoint_bytes": checkpoint_bytes(fvars, metadata={"model": "smollm2"})}
  log(f"float ppl {float_row['ppl_float']:.4f}")
  rows = []
  for name in args.recipes:
    log(f"smollm2 {name}: quantizing")
    rules, qvars, ref_vars, secs = _quantize(model, name, args)
    log(f"smollm2 {name}: evaluating ({secs:.1f} s to quantize)")
    q = ref.compare(jq_logits_fn(model, qvars))
    lin_before, lin_after = quantized_linear_bytes(ref_vars, qvars)
    row = {"recipe": name, **q, "quantize_s": secs, "params_bytes": jqtree.nbytes(qvars),
           "linear_bytes_float": lin_before, "linear_bytes_quant": lin_after,
           "checkpoint_bytes": checkpoint_bytes(qvars, rules=rules,
                                                metadata={"model": "smollm2", "recipe": name})}
    rows.append(row)
    log(f"smollm2 {name}: ppl {q['ppl_quant']:.4f} kl {q['kl']:.5f} top1 {q['top1_agreement']:.4f}")
    del qvars, ref_vars
  return {"float": float_row, "rows": rows, "windows": args.windows, "window": args.window}


def run_encoder(args) -> dict:
  from jq import app
  from jq import tree as jqtree
  names = [n for n in args.recipes if _encoder_applicable(n)]
  skipped = [n for n in args.recipes if n not in names]
  if not names:
    return {"rows": [], "skipped": skipped}
  log("loading minilm")
  model = load_model("minilm")
  ref = EncoderReference(model, sentences=args.sentences)
  fvars = app.float_variables(model)
  float_row = {"recipe": "float", "params_bytes": jqtree.nbytes(fvars),
               "checkpoint_bytes": checkpoint_bytes(fvars, metadata={"model": "minilm"})}
  rows = []
  for name in names:
    log(f"minilm {name}: quantizing")
    rules, qvars, ref_vars, secs = _quantize(model, name, args)
    c = ref.compare(qvars)
    rows.append({"recipe": name, **c, "quantize_s": secs, "params_bytes": jqtree.nbytes(qvars),
                 "checkpoint_bytes": checkpoint_bytes(qvars, rules=rules,
                                                      metadata={"model": "minilm", "recipe": name})})
    log(f"minilm {name}: cosine mean {c['cosine_mean']:.5f} min {c['cosine_min']:.5f}")
  return {"float": float_row, "rows": rows, "skipped": skipped, "sentences": len(ref.sentences)}


def lm_table(res: dict) -> str:
  f = res["float"]
  head = ("recipe", "ppl float", "ppl quant", "Δppl", "mean KL", "top-1 agree", "params MiB",
          "linears MiB", "ckpt MiB", "quantize s")
  rows = [("float", fmt(f["ppl_float"], ".3f"), fmt(f["ppl_float"], ".3f"), "0", "0", "1",
           mib(f["params_bytes"]), "-", mib(f["checkpoint_bytes"]), "-")]
  for r in res["rows"]:
    rows.append((r["recipe"], fmt(r["ppl_float"], ".3f"), fmt(r["ppl_quant"], ".3f"),
                 fmt(r["ppl_quant"] - r["ppl_float"], "+.3f"), fmt(r["kl"], ".5f"),
                 fmt(r["top1_agreement"], ".4f"), mib(r["params_bytes"]),
                 f"{mib(r['linear_bytes_float'])} → {mib(r['linear_bytes_quant'])}",
                 mib(r["checkpoint_bytes"]), fmt(r["quantize_s"], ".1f")))
  return markdown_table(head, rows)


def encoder_table(res: dict) -> str:
  head = ("recipe", "cosine mean", "cosine min", "params MiB", "ckpt MiB", "quantize s")
  f = res.get("float")
  rows = [] if f is None else [("float", "1", "1", mib(f["params_bytes"]), mib(f["checkpoint_bytes"]),
                                "-")]
  for r in res["rows"]:
    rows.append((r["recipe"], fmt(r["cosine_mean"], ".5f"), fmt(r["cosine_min"], ".5f"),
                 mib(r["params_bytes"]), mib(r["checkpoint_bytes"]), fmt(r["quantize_s"], ".2f")))
  return markdown_table(head, rows)


def report(results: dict) -> str:
  lm = results["smollm2"]
  parts = [f"## SmolLM2-135M-Instruct: {lm['windows']} windows x {lm['window']} tokens of held-out "
           f"text ({lm['float']['eval_tokens']} scored tokens)", "", lm_table(lm)]
  enc = results.get("minilm")
  if enc is not None:
    parts += ["", f"## all-MiniLM-L6-v2: cosine similarity of {enc.get('sentences', 0)} held-out "
              "sentence embeddings, float vs quantized", "", encoder_table(enc)]
    if enc.get("skipped"):
      parts.append(f"\nnot applicable to the encoder (need calibration): {', '.join(enc['skipped'])}")
  parts += ["", f"device: {results['device']}; jax {results['jax']}; total {results['total_s']:.0f} s"]
  return "\n".join(parts)


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--recipes", nargs="+", default=None, help=f"default: {' '.join(DEFAULT_RECIPES)}")
  ap.add_argument("--windows", type=int, default=None, help="evaluation windows (default 16)")
  ap.add_argument("--window", type=int, default=None, help="tokens per window (default 512)")
  ap.add_argument("--sentences", type=int, default=None, help="MiniLM sentences (default 256)")
  ap.add_argument("--calib-sequences", type=int, default=32,
                  help="only for calibration-based recipes")
  ap.add_argument("--calib-len", type=int, default=512)
  ap.add_argument("--no-encoder", action="store_true", help="skip MiniLM")
  ap.add_argument("--out", help="write results as JSON here (and the table next to it as .md)")
  ap.add_argument("--small", action="store_true",
                  help="smoke run: 2 recipes, 2 windows of 128 tokens, 16 sentences")
  args = ap.parse_args(argv)
  small = args.small
  args.recipes = args.recipes or list(SMALL_RECIPES if small else DEFAULT_RECIPES)
  args.windows = args.windows or (2 if small else 16)
  args.window = args.window or (128 if small else 512)
  args.sentences = args.sentences or (16 if small else 256)
  from jq.ptq import recipes
  unknown = [r for r in args.recipes if r not in recipes.names()]
  if unknown:
    ap.error(f"unknown recipes {unknown}; choose from {recipes.names()}")
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  t0 = time.perf_counter()
  results = {"settings": {k: v for k, v in vars(args).items()},
             "smollm2": run_lm(args)}
  if not args.no_encoder:
    results["minilm"] = run_encoder(args)
  results["device"] = str(jax.devices()[0].device_kind)
  results["jax"] = jax.__version__
  results["total_s"] = time.perf_counter() - t0
  text = report(results)
  print("\n" + text, flush=True)
  if args.out:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(text + "\n")
    log(f"wrote {out} and {out.with_suffix('.md')}")
  return results


if __name__ == "__main__":
  main()
