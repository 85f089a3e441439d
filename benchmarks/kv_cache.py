"""Quantized KV cache on SmolLM2-135M: perplexity and bytes per token of float, int8 and fp8 caches.

Float weights throughout; the float model (float cache) is evaluated once and each cache kind is
compared with it over the ``jq-quant eval`` windows (8 held-out news windows of 512 tokens, the
numbers of ``jq.app.evaluate``; ``benchmarks/bench_common.LMReference``).  Each kind runs the full
forward with keys/values fake-quantized as the cache stores them
(``Decoder.apply(..., kv_quant=kind)``), which the tests hold equal to cached decoding.  Writes
``benchmarks/results/kv_cache_smollm2.{json,md}``.

  python benchmarks/kv_cache.py [--windows 8] [--window 512]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results" / "kv_cache_smollm2"
GOAL_INT8_PCT = 0.5   # issue 17: an int8 cache costs at most 0.5% perplexity


def run(args) -> dict:
  import jax
  import jax.numpy as jnp
  from bench_common import LMReference, load_model, log
  from jq import kv_cache
  model = load_model("smollm2")
  c = model.config
  size = lambda kind, dtype=c.dtype: kv_cache.bytes_per_token(c.num_layers, c.num_kv_heads,
                                                               c.head_dim, kind, dtype)
  log(f"float reference over {args.windows} x {args.window} tokens ...")
  ref = LMReference(model, windows=args.windows, window=args.window)
  float_m = ref.float_metrics()
  rows = [{"kv_cache": f"none ({jnp.dtype(c.dtype).name})", "bytes_per_token": size("none"),
           "ppl": float_m["ppl_float"], "kl": 0.0, "top1_agreement": 1.0}]
  if jnp.dtype(c.dtype) != jnp.bfloat16:
    rows.append({"kv_cache": "none (bfloat16, size only)",
                 "bytes_per_token": size("none", jnp.bfloat16)})
  for kind in ("int8", "fp8"):
    log(f"{kind} KV cache ...")
    apply = jax.jit(functools.partial(model.module.apply, kv_quant=kind))
    m = ref.compare(lambda t, apply=apply: apply(model.variables, t))
    rows.append({"kv_cache": kind, "bytes_per_token": size(kind), "ppl": m["ppl_quant"],
                 "kl": m["kl"], "top1_agreement": m["top1_agreement"]})
  for r in rows:
    r["x_float_cache"] = r["bytes_per_token"] / size("none")
    if "ppl" in r:
      r["ppl_change_pct"] = 100 * (r["ppl"] / float_m["ppl_float"] - 1)
  device = jax.devices()[0]
  machine = (f"{os.cpu_count()}-core CPU" if device.platform == "cpu" else device.device_kind)
  return {"model": "smollm2", "date": time.strftime("%Y-%m-%d"), "machine": machine,
          "windows": args.windows, "window": args.window, "eval_tokens": float_m["eval_tokens"],
          "compute_dtype": jnp.dtype(c.dtype).name, "rows": rows}


def table(data: dict) -> str:
  int8 = next(r for r in data["rows"] if r["kv_cache"] == "int8")
  met = "met" if int8["ppl_change_pct"] <= GOAL_INT8_PCT else "missed"
  lines = [f"# Quantized KV cache on SmolLM2-135M ({data['date']}, {data['machine']})", "",
           f"Float weights ({data['compute_dtype']} compute); the `jq-quant eval` protocol: "
           f"{data['windows']} held-out news windows of {data['window']} tokens "
           f"({data['eval_tokens']} scored tokens). One float32 scale per token and KV head; "
           "bytes per token count keys and values of all layers, scales included "
           "(`jq.kv_cache.bytes_per_token`). Goal: int8 costs at most "
           f"{GOAL_INT8_PCT}% perplexity: **{met}** ({int8['ppl_change_pct']:+.2f}%).", "",
           "| KV cache | bytes/token | x float cache | ppl | Δppl % | mean KL | top-1 agree |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for r in data["rows"]:
    q = ("-", "-", "-", "-") if "ppl" not in r else (
        f"{r['ppl']:.4f}", f"{r['ppl_change_pct']:+.2f}", f"{r['kl']:.5f}",
        f"{r['top1_agreement']:.4f}")
    lines.append(f"| {r['kv_cache']} | {r['bytes_per_token']:,} | {r['x_float_cache']:.3f} | "
                 + " | ".join(q) + " |")
  return "\n".join(lines) + "\n\nMade by `python benchmarks/kv_cache.py`.\n"


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--windows", type=int, default=8)
  ap.add_argument("--window", type=int, default=512)
  ap.add_argument("--no-write", action="store_true", help="print the table only")
  args = ap.parse_args(argv)
  data = run(args)
  text = table(data)
  print(text, flush=True)
  if not args.no_write:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    RESULTS.with_suffix(".md").write_text(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
