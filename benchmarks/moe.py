"""Mixture-of-experts compute: the grouped road (each token through its own k experts) against the
dense one (every expert on every token), float and int4 weight-only, measured in the same run.

Two random-weight decoders of 2 blocks shaped after the families' MoE layers (no MoE weights
ship in a package): Qwen3-MoE-like (64 experts, top 8, expert width 256, hidden 512) and
Mixtral-like (8 experts, top 2, expert width 1024, hidden 512). For each: a prefill of
``--batch`` x ``--tokens`` tokens and one decode step (batch 1 and 16, a cache of 512) with
``moe_dispatch="dense"`` and ``"grouped"``; the median of ``--repeat`` timed calls after one
warm call (``block_until_ready``), the ratio dense / grouped printed beside each pair, the
largest logit difference between the two roads, and the process's peak RSS (``/proc``).
Writes ``benchmarks/results/moe_<machine>.{json,md}``.

  python benchmarks/moe.py [--tokens 512] [--batch 1] [--repeat 5] [--small]

``--small`` (the smoke test, a dry run without a GPU): hidden 64, 32 tokens, one timed call, int4
weights only, no batch-16 decode.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results"

SHAPES = {
    "qwen3-moe-like": dict(num_experts=64, experts_per_token=8, expert_size=256),
    "mixtral-like": dict(num_experts=8, experts_per_token=2, expert_size=1024),
}


def _median_s(fn, repeat: int) -> float:
  import jax
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeat):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def run(args) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  import jq
  from bench_common import log, peak_rss_bytes
  from jq.nn import quantized_apply
  from jq_models import decoder

  rows = []
  for shape, moe in SHAPES.items():
    width = 64 if args.small else 512
    if args.small:
      moe = dict(moe, expert_size=moe["expert_size"] // 8)
    base = decoder.DecoderConfig(vocab_size=4096, hidden_size=width, intermediate_size=2 * width,
                                 num_layers=2, num_heads=8, num_kv_heads=4, head_dim=width // 8,
                                 max_seq_len=2048, **moe)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, base.vocab_size, (args.batch, args.tokens)), jnp.int32)
    variables = decoder.Decoder(base).init(jax.random.key(0), tokens[:, :8])
    weights = {"float": variables,
               "w4a16-g128": {"params": jq.quantize_tree(variables["params"],
                                                         jq.recipe_rules("w4a16-g128"))}}
    if args.small:
      del weights["float"]
    for wname, v in weights.items():
      for case in ("prefill", "decode b1") if args.small else ("prefill", "decode b1",
                                                                "decode b16"):
        times, outs = {}, {}
        for dispatch in ("dense", "grouped"):
          c = dataclasses.replace(base, moe_dispatch=dispatch)
          apply = jax.jit(quantized_apply(decoder.Decoder(c).apply))
          if case == "prefill":
            fn = lambda apply=apply: apply(v, tokens)
          else:
            b = 1 if case == "decode b1" else 16
            cache = decoder.init_cache(c, b, 512)
            _, cache = apply(v, jnp.tile(tokens[:1, :8], (b, 1)), cache=cache)
            step = jnp.tile(tokens[:1, 8:9], (b, 1))
            fn = lambda apply=apply, cache=cache, step=step: apply(v, step, cache=cache)[0]
          times[dispatch] = _median_s(fn, args.repeat)
          outs[dispatch] = np.asarray(fn())
        diff = float(np.max(np.abs(outs["dense"] - outs["grouped"])))
        row = {"model": shape, "weights": wname, "case": case,
               "dense_ms": 1e3 * times["dense"], "grouped_ms": 1e3 * times["grouped"],
               "speedup": times["dense"] / times["grouped"], "max_logit_diff": diff}
        log(f"{shape} {wname} {case}: dense {row['dense_ms']:.1f} ms, grouped "
            f"{row['grouped_ms']:.1f} ms, {row['speedup']:.2f}x (logits differ by {diff:.1e})")
        rows.append(row)
  device = jax.devices()[0]
  machine = f"{os.cpu_count()}-core CPU" if device.platform == "cpu" else device.device_kind
  return {"date": time.strftime("%Y-%m-%d"), "machine": machine, "small": args.small,
          "hidden": width, "batch": args.batch,
          "tokens": args.tokens, "repeat": args.repeat, "peak_rss_mib": peak_rss_bytes() / 2**20,
          "rows": rows}


def markdown(res: dict) -> str:
  from bench_common import markdown_table
  head = ["model", "weights", "case", "dense ms", "grouped ms", "dense / grouped", "max |Δlogit|"]
  body = [[r["model"], r["weights"], r["case"], f"{r['dense_ms']:.1f}", f"{r['grouped_ms']:.1f}",
           f"{r['speedup']:.2f}x", f"{r['max_logit_diff']:.1e}"] for r in res["rows"]]
  return (f"MoE dispatch, {res['machine']}, {res['date']}: hidden {res['hidden']}, prefill "
          f"{res['batch']} x "
          f"{res['tokens']} tokens, decode one step; median of {res['repeat']}; peak RSS "
          f"{res['peak_rss_mib']:.0f} MiB\n\n" + markdown_table(head, body) + "\n")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--tokens", type=int, default=512)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--repeat", type=int, default=5)
  ap.add_argument("--out", default=None, help="results stem (default results/moe_<machine>)")
  ap.add_argument("--small", action="store_true", help="tiny shapes, 32 tokens, one timed call")
  args = ap.parse_args(argv)
  if args.small:
    args.tokens, args.repeat = 32, 1
  res = run(args)
  stem = Path(args.out) if args.out else RESULTS / ("moe_" + res["machine"].replace(" ", "_")
                                                    .replace("-", "_").lower())
  from jq.io.atomic import atomic_write
  for suffix, text in ((".json", json.dumps(res, indent=1) + "\n"), (".md", markdown(res))):
    with atomic_write(stem.with_suffix(suffix)) as f:
      f.write(text.encode())
  print(markdown(res))
  return 0


if __name__ == "__main__":
  sys.exit(main())
