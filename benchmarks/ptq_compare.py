"""PTQ acceptance table on SmolLM2-135M: RTN vs GPTQ vs AWQ (w4/w3) and W8A8 with/without
SmoothQuant, on real text; optionally side by side with qwix's GPTQ/AWQ.

Calibration uses the calibration split of ``jq_models.text`` (news articles 150..299); evaluation
uses the disjoint eval split (articles 0..149).  Every variant is compared against the same float
model on the same windows (float log-probs cached once): perplexity, mean KL(float || quant),
top-1 agreement, and the wall-clock time to quantize (calibration included, jit compilation
included).  The summary gives the fraction of RTN's perplexity loss that GPTQ and AWQ recover at
w4a16 g128, ``(ppl_rtn - ppl_algo) / (ppl_rtn - ppl_float)``, and whether SmoothQuant lowers the
W8A8 loss.

qwix (optional, ``pip install qwix``): its GPTQ/AWQ/PTQ run on the same linen model, data and
int4 group spec in the same process.  qwix is symmetric int4 (absmax) and calibrates every layer
on the float model (non-sequential), so the matched jq rows use symmetric int4 and
``sequential=False``.  qwix refuses group sizes that do not divide an axis (SmolLM2's 576 with
g128); such rows show the exact error.

  python benchmarks/ptq_compare.py                                   # everything (long on CPU)
  python benchmarks/ptq_compare.py --only rtn-w4a16-g128 gptq-w4a16-g128 awq-w4a16-g128
  python benchmarks/ptq_compare.py --small                           # smoke run
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (LMReference, fmt, jq_logits_fn, load_model, log,  # noqa: E402
                          markdown_table)


@dataclasses.dataclass(frozen=True)
class Variant:
  """One row: ``kind`` is "jq" (``recipe`` names a jq recipe, or ``spec`` a custom weight spec)
  or "qwix" (``algo`` in rtn/gptq/awq, symmetric int4 with ``group``).  ``rule_options``
  replaces the recipe's algorithm options in its rules (e.g. ``GPTQOptions(act_order=True)``);
  ``options`` are ``PTQConfig`` fields (how the pipeline runs, e.g. ``sequential``)."""
  key: str
  kind: str
  method: str
  spec: str
  recipe: str | None = None
  options: tuple[tuple[str, Any], ...] = ()
  rule_options: Any = None
  custom: str | None = None     # "int4sym-g32-<algo>" jq rows matched to qwix
  algo: str | None = None
  group: int | None = None
  calib_text: str = "news"      # jq rows: the calibration text (news split, or shakespeare)


def _jq(key, method, spec, recipe, *, rule_options=None, calib_text="news", **options):
  return Variant(key=key, kind="jq", method=method, spec=spec, recipe=recipe,
                 options=tuple(sorted(options.items())), rule_options=rule_options,
                 calib_text=calib_text)


def _variants() -> list[Variant]:
  """All rows, most important first (a partial run still answers the acceptance questions)."""
  from jq.spec import GPTQOptions
  act_order = GPTQOptions(act_order=True)
  v = []
  s = "w4a16-g128"
  v += [_jq(f"rtn-{s}", "RTN", s, s),
        _jq(f"gptq-{s}", "GPTQ", s, f"gptq-{s}"),
        _jq(f"awq-{s}", "AWQ", s, f"awq-{s}"),
        _jq(f"gptq-{s}-textbook", "GPTQ first-token weight 1", s, f"gptq-{s}",
            rule_options=GPTQOptions(first_token_weight=1.0)),
        _jq(f"gptq-{s}-actorder", "GPTQ act-order", s, f"gptq-{s}-actorder"),
        _jq(f"gptq-{s}-nonseq", "GPTQ non-seq", s, f"gptq-{s}", sequential=False)]
  v += [_jq("w8a8-static", "RTN", "w8a8 static", "w8a8-static"),
        _jq("smoothquant-w8a8-static", "SmoothQuant", "w8a8 static", "smoothquant-w8a8-static"),
        _jq("w8a8-dynamic", "RTN", "w8a8 dynamic", "w8a8-dynamic"),
        _jq("smoothquant-w8a8", "SmoothQuant", "w8a8 dynamic", "smoothquant-w8a8")]
  s = "w4a16-g32"
  v += [_jq(f"rtn-{s}", "RTN", s, s),
        _jq(f"gptq-{s}", "GPTQ", s, f"gptq-{s}"),
        _jq(f"awq-{s}", "AWQ", s, f"awq-{s}"),
        _jq(f"gptq-{s}-actorder", "GPTQ act-order", s, f"gptq-{s}", rule_options=act_order)]
  s = "w3a16-g128"
  v += [_jq(f"rtn-{s}", "RTN", s, s), _jq(f"gptq-{s}", "GPTQ", s, f"gptq-{s}"),
        _jq(f"awq-{s}", "AWQ", s, f"awq-{s}")]
  # learned rounding (the recipes' options), and the 4-bit one calibrated on Shakespeare
  for s in ("w4a16-g128", "w3a16-g128", "w2a16-g32"):
    v += [_jq(f"autoround-{s}", "AutoRound", s, f"autoround-{s}")]
  v += [_jq("rtn-w2a16-g32", "RTN", "w2a16-g32", "w2a16-g32"),
        _jq("gptq-w2a16-g32", "GPTQ", "w2a16-g32", "w2a16-g32", rule_options="gptq"),
        _jq("autoround-w4a16-g128-shakespeare", "AutoRound (Shakespeare calib.)", "w4a16-g128",
            "autoround-w4a16-g128", calib_text="shakespeare")]
  # jq on qwix's spec (symmetric int4, non-sequential), then qwix itself.
  for algo, method in (("rtn", "RTN"), ("gptq", "GPTQ non-seq"), ("awq", "AWQ non-seq")):
    v.append(Variant(key=f"jq-{algo}-int4sym-g32", kind="jq", method=method, spec="int4 sym g32",
                     custom=algo, options=(("sequential", False),) if algo != "rtn" else ()))
  for g in (128, 32):
    for algo, method in (("rtn", "qwix PTQ"), ("gptq", "qwix GPTQ"), ("awq", "qwix AWQ")):
      v.append(Variant(key=f"qwix-{algo}-int4-g{g}", kind="qwix", method=method,
                       spec=f"int4 sym g{g}", algo=algo, group=g))
  s = "w4a16-g128"
  v += [_jq(f"gptq-{s}-actorder-nonseq", "GPTQ act-order non-seq", s, f"gptq-{s}-actorder",
            sequential=False)]
  s = "w4a16-g32"
  v += [_jq(f"gptq-{s}-nonseq", "GPTQ non-seq", s, f"gptq-{s}", sequential=False)]
  return v


VARIANTS = {v.key: v for v in _variants()}
# Smoke run: the calibration pipeline (observers, SmoothQuant folding, static scales) end to end;
# GPTQ/AWQ take minutes on CPU even on 64 calibration tokens (the per-layer loops dominate).
SMALL = ("w8a8-static", "smoothquant-w8a8-static")


# ------------------------------------------------------------------------------------------------
# jq


def _jq_rules_config(v: Variant):
  """``(rules, PTQConfig)`` of a jq row: the algorithm options travel in the rules."""
  from jq.ptq.pipeline import PTQConfig
  from jq.qtypes import QType
  from jq.spec import Algorithm, Granularity, QuantSpec, default_rules, recipe_rules
  if v.rule_options == "gptq":   # an RTN recipe's spec, rounded by GPTQ (no named recipe)
    return (default_rules(recipe_rules(v.recipe)[-1].weight, algorithm=Algorithm.GPTQ),
            PTQConfig(**dict(v.options)))
  if v.custom is None:
    return recipe_rules(v.recipe, options=v.rule_options), PTQConfig(**dict(v.options))
  spec = QuantSpec(qtype=QType.INT4, symmetric=True, granularity=Granularity.GROUP, group_size=32)
  algo = {"rtn": Algorithm.RTN, "gptq": Algorithm.GPTQ, "awq": Algorithm.AWQ}[v.custom]
  return (default_rules(spec, algorithm=algo, options=v.rule_options),
          PTQConfig(**dict(v.options)))


def run_jq(model, v: Variant, args):
  from jq import app
  rules, cfg = _jq_rules_config(v)
  t0 = time.perf_counter()
  qvars, _, notes = app.quantize_model(model, rules, ptq_config=cfg,
                                       calib_sequences=args.calib_sequences,
                                       calib_len=args.calib_len, calib_text=v.calib_text)
  qvars = jax.block_until_ready(qvars)
  return jq_logits_fn(model, qvars), time.perf_counter() - t0, list(notes)


# ------------------------------------------------------------------------------------------------
# qwix

QWIX_LAYERS = r"layers_\d+/(attn|mlp)/\w+_proj"


def qwix_available() -> str | None:
  """None if qwix imports, else the reason."""
  try:
    import qwix  # noqa: F401
    from qwix.contrib import awq, gptq  # noqa: F401
  except Exception as e:  # noqa: BLE001 - any import failure means "not available"
    return f"{type(e).__name__}: {e}"
  return None


@contextlib.contextmanager
def _jitted_qwix_gptq(enabled: bool):
  """Runs qwix's ``gptq_core.quantize_weight`` under ``jax.jit`` (one compile per weight shape).

  As shipped, qwix's GPTQ runs its per-column Python loop eagerly: about 75 s per 576x576 layer on
  a loaded 2-core CPU, i.e. hours for SmolLM2's 210 linears.  The jitted function is the same
  code (same ops, same order); only the dispatch differs.
  """
  if not enabled:
    yield
    return
  from qwix.contrib import gptq_core
  orig = gptq_core.quantize_weight
  cache = {}

  def quantize_weight(W, H, how, blocksize=128, percdamp=0.01):
    key = (W.shape, str(W.dtype), repr(how), blocksize, percdamp)
    if key not in cache:
      cache[key] = jax.jit(lambda w, h: orig(w, h, how, blocksize=blocksize, percdamp=percdamp))
    return cache[key](W, H)

  gptq_core.quantize_weight = quantize_weight
  try:
    yield
  finally:
    gptq_core.quantize_weight = orig


def run_qwix(model, v: Variant, args):
  """qwix's own pipeline on the linen model: calibration provider -> quantize_params -> provider
  for inference (as in qwix's tests).  Raises whatever qwix raises."""
  import qwix
  from qwix.contrib import awq, gptq
  kw = dict(module_path=QWIX_LAYERS, weight_qtype=jnp.int4, tile_size=v.group)
  rule_cls = {"rtn": qwix.QuantizationRule, "gptq": gptq.GptqRule, "awq": awq.AwqRule}[v.algo]
  rules = [rule_cls(**kw)]
  calib = model.calibration_tokens(args.calib_sequences, args.calib_len)
  t0 = time.perf_counter()
  ptq_model = qwix.quantize_model(model.module, qwix.PtqProvider(rules))
  # The abstract quantized tree; this is where qwix checks the tiling.
  abs_params = jax.eval_shape(ptq_model.init, jax.random.key(0), jnp.asarray(calib[:1]))["params"]
  infer = ptq_model
  if v.algo == "rtn":
    qparams = qwix.quantize_params(model.params, abs_params)
  else:
    provider = (gptq.GptqCalibrationProvider if v.algo == "gptq" else awq.AwqCalibrationProvider)
    cal = qwix.quantize_model(model.module, provider(rules))
    step = jax.jit(lambda var, x: cal.apply(var, x, mutable="quant_stats"))
    var = dict(model.variables)
    for i in range(0, len(calib), args.chunk):
      _, new = step(var, jnp.asarray(calib[i:i + args.chunk]))
      var.update(new)
    if v.algo == "gptq":
      with _jitted_qwix_gptq(not args.qwix_eager):
        qparams = gptq.quantize_params(model.params, abs_params, var["quant_stats"])
    else:
      qparams = awq.quantize_params(model.params, abs_params, var["quant_stats"])
      infer = qwix.quantize_model(model.module, awq.AwqInferenceProvider(rules))
  qparams = jax.block_until_ready(qparams)
  secs = time.perf_counter() - t0
  apply = jax.jit(infer.apply)
  notes = ["qwix GPTQ column loop jitted by the benchmark (compile included in the time)"] if (
      v.algo == "gptq" and not args.qwix_eager) else []
  return (lambda t: apply({"params": qparams}, t)), secs, notes


# ------------------------------------------------------------------------------------------------


def _row(v: Variant) -> dict:
  return {"key": v.key, "kind": v.kind, "method": v.method, "spec": v.spec,
          "options": dict(v.options), "recipe": v.recipe,
          "calib_text": v.calib_text,
          "rule_options": (v.rule_options if v.rule_options is None or isinstance(
              v.rule_options, str) else dataclasses.asdict(v.rule_options))}


def run(args) -> dict:
  log("loading smollm2")
  model = load_model("smollm2")
  if args.blocks:
    from jq_models import registry
    model = registry.truncated(model, args.blocks)
    log(f"first {args.blocks} blocks only: {model.name}")
  log(f"float reference: {args.windows} windows of {args.window} tokens")
  ref = LMReference(model, windows=args.windows, window=args.window)
  fm = ref.float_metrics()
  log(f"float ppl {fm['ppl_float']:.4f}")
  rows = []
  qwix_missing = None
  if any(VARIANTS[k].kind == "qwix" for k in args.only):
    qwix_missing = qwix_available()
  for key in args.only:
    v = VARIANTS[key]
    row = _row(v)
    rows.append(row)
    if v.kind == "qwix" and qwix_missing:
      row["error"] = f"qwix not importable: {qwix_missing}"
      log(f"{key}: {row['error']}")
      continue
    log(f"{key}: quantizing")
    try:
      fn, secs, notes = (run_qwix if v.kind == "qwix" else run_jq)(model, v, args)
    except Exception as e:  # noqa: BLE001 - recorded in the table, never hidden
      if v.kind != "qwix":
        raise
      msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
      row["error"] = f"qwix: refused: {type(e).__name__}: {msg}"
      row["traceback"] = traceback.format_exc(limit=6)
      log(f"{key}: {row['error']}")
      continue
    row["quantize_s"] = secs
    row["notes"] = notes
    log(f"{key}: evaluating ({secs:.1f} s to quantize)")
    row.update(ref.compare(fn))
    log(f"{key}: ppl {row['ppl_quant']:.4f} kl {row['kl']:.5f} top1 {row['top1_agreement']:.4f}")
    del fn
    if args.out:  # partial results survive a crash or a kill
      _write(args, {"float": fm, "rows": rows, "partial": True})
  return {"float": fm, "rows": rows, "summary": summarize(fm, rows)}


def summarize(fm: dict, rows: list[dict]) -> dict:
  """Recovered fraction of RTN's loss (perplexity and KL) and SmoothQuant's effect."""
  by = {r["key"]: r for r in rows if "ppl_quant" in r}
  pf = fm["ppl_float"]
  out: dict[str, Any] = {"recovered": {}, "smoothquant": {}}
  for rtn, algos in (("rtn-w4a16-g128", ("gptq-w4a16-g128", "gptq-w4a16-g128-textbook",
                                          "gptq-w4a16-g128-nonseq",
                                          "gptq-w4a16-g128-actorder",
                                          "gptq-w4a16-g128-actorder-nonseq", "awq-w4a16-g128",
                                          "autoround-w4a16-g128",
                                          "autoround-w4a16-g128-shakespeare")),
                     ("rtn-w4a16-g32", ("gptq-w4a16-g32", "gptq-w4a16-g32-nonseq",
                                        "gptq-w4a16-g32-actorder", "awq-w4a16-g32")),
                     ("rtn-w3a16-g128", ("gptq-w3a16-g128", "awq-w3a16-g128",
                                         "autoround-w3a16-g128")),
                     ("rtn-w2a16-g32", ("gptq-w2a16-g32", "autoround-w2a16-g32")),
                     ("jq-rtn-int4sym-g32", ("jq-gptq-int4sym-g32", "jq-awq-int4sym-g32")),
                     ("qwix-rtn-int4-g32", ("qwix-gptq-int4-g32", "qwix-awq-int4-g32"))):
    if rtn not in by:
      continue
    r = by[rtn]
    for a in algos:
      if a not in by:
        continue
      loss = r["ppl_quant"] - pf
      out["recovered"][a] = {
          "vs": rtn,
          "ppl_fraction": (r["ppl_quant"] - by[a]["ppl_quant"]) / loss if loss > 0 else None,
          "kl_fraction": (r["kl"] - by[a]["kl"]) / r["kl"] if r["kl"] > 0 else None}
  for base, sq in (("w8a8-static", "smoothquant-w8a8-static"),
                   ("w8a8-dynamic", "smoothquant-w8a8")):
    if base in by and sq in by:
      out["smoothquant"][sq] = {
          "vs": base, "ppl_loss_base": by[base]["ppl_quant"] - pf,
          "ppl_loss_smoothquant": by[sq]["ppl_quant"] - pf, "kl_base": by[base]["kl"],
          "kl_smoothquant": by[sq]["kl"],
          "lowers_loss": bool(by[sq]["kl"] < by[base]["kl"]
                              and by[sq]["ppl_quant"] < by[base]["ppl_quant"])}
  return out


def report(res: dict) -> str:
  fm = res["float"]
  pf = fm["ppl_float"]
  head = ("variant", "method", "spec", "ppl", "Δppl", "mean KL", "top-1 agree", "quantize s")
  rows = [("float", "-", "float32", f"{pf:.3f}", "0", "0", "1", "-")]
  for r in res["rows"]:
    if "ppl_quant" in r:
      rows.append((r["key"], r["method"], r["spec"], f"{r['ppl_quant']:.3f}",
                   f"{r['ppl_quant'] - pf:+.3f}", f"{r['kl']:.5f}", f"{r['top1_agreement']:.4f}",
                   fmt(r.get("quantize_s"), ".1f")))
    else:
      rows.append((r["key"], r["method"], r["spec"], r.get("error", "not run"), "", "", "", ""))
  s = res["settings"]
  parts = [f"## SmolLM2-135M-Instruct PTQ: calibration {s['calib_sequences']}x{s['calib_len']} "
           f"tokens (calibration split), evaluation {s['windows']}x{s['window']} tokens (eval "
           f"split, {fm['eval_tokens']} scored)", "", markdown_table(head, rows)]
  summ = res.get("summary", {})
  if summ.get("recovered"):
    parts += ["", "### Fraction of RTN's loss recovered", "",
              markdown_table(("variant", "vs", "of Δppl", "of KL"),
                             [(k, d["vs"], fmt(d["ppl_fraction"], ".3f"), fmt(d["kl_fraction"], ".3f"))
                              for k, d in summ["recovered"].items()])]
    for k in ("gptq-w4a16-g128", "awq-w4a16-g128"):
      d = summ["recovered"].get(k)
      if d is not None and d["ppl_fraction"] is not None:
        ok = d["ppl_fraction"] >= 0.5
        parts.append(f"\n{k} recovers {d['ppl_fraction']:.1%} of RTN's perplexity loss at w4a16 "
                     f"g128: {'meets' if ok else 'DOES NOT meet'} the >= 50% target")
  if summ.get("smoothquant"):
    parts += ["", "### SmoothQuant (W8A8)", ""]
    for k, d in summ["smoothquant"].items():
      parts.append(f"- {k} vs {d['vs']}: Δppl {d['ppl_loss_base']:+.4f} -> "
                   f"{d['ppl_loss_smoothquant']:+.4f}, KL {d['kl_base']:.5f} -> "
                   f"{d['kl_smoothquant']:.5f}: "
                   f"{'lowers' if d['lowers_loss'] else 'does NOT lower'} the loss")
  goals = []   # learned rounding's goals (issue: "Learned rounding and QAT")
  by = {r["key"]: r for r in res["rows"] if "ppl_quant" in r}
  d = summ.get("recovered", {}).get("autoround-w4a16-g128")
  if d is not None and d["ppl_fraction"] is not None:
    goals.append(f"- autoround-w4a16-g128 recovers {d['ppl_fraction']:.1%} of RTN's perplexity "
                 f"loss: {'meets' if d['ppl_fraction'] >= 0.7 else 'DOES NOT meet'} >= 70%")
  for key, cap in (("autoround-w3a16-g128", 1.5), ("autoround-w2a16-g32", 4.0)):
    if key in by:
      ratio = by[key]["ppl_quant"] / pf
      goals.append(f"- {key}: ppl {ratio:.2f}x float: "
                   f"{'meets' if ratio <= cap else 'DOES NOT meet'} <= {cap}x")
  if goals:
    parts += ["", "### Learned rounding goals", ""] + goals
  parts += ["", f"device: {res['device']}; jax {res['jax']}; total {res['total_s']:.0f} s"]
  return "\n".join(parts)


def _write(args, results: dict) -> None:
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_suffix(".tmp")
  tmp.write_text(json.dumps({"settings": vars(args), **results}, indent=2, default=str))
  tmp.replace(out)


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--calib-sequences", type=int, default=None, help="default 32")
  ap.add_argument("--calib-len", type=int, default=None, help="default 512")
  ap.add_argument("--windows", type=int, default=None, help="evaluation windows (default 16)")
  ap.add_argument("--window", type=int, default=None, help="tokens per window (default 512)")
  ap.add_argument("--chunk", type=int, default=8, help="calibration sequences per qwix forward")
  ap.add_argument("--only", nargs="+", default=None, metavar="VARIANT",
                  help=f"subset of: {' '.join(VARIANTS)}")
  ap.add_argument("--no-qwix", action="store_true", help="leave out the qwix rows")
  ap.add_argument("--qwix-eager", action="store_true",
                  help="run qwix's GPTQ loop eagerly, as shipped (hours on CPU)")
  ap.add_argument("--out", help="write results as JSON here (and the tables next to it as .md)")
  ap.add_argument("--blocks", type=int, default=None,
                  help="keep only the first N decoder blocks (real weights; --small: 4)")
  ap.add_argument("--small", action="store_true",
                  help="smoke run: 1 calibration sequence of 64 tokens, 1 window of 128, "
                       f"{' and '.join(SMALL)}")
  args = ap.parse_args(argv)
  small = args.small
  args.calib_sequences = args.calib_sequences or (1 if small else 32)
  args.calib_len = args.calib_len or (64 if small else 512)
  args.windows = args.windows or (1 if small else 16)
  args.window = args.window or (128 if small else 512)
  args.only = args.only or list(SMALL if small else VARIANTS)
  args.blocks = args.blocks or (4 if small else None)
  bad = [k for k in args.only if k not in VARIANTS]
  if bad:
    ap.error(f"unknown variants {bad}; choose from {list(VARIANTS)}")
  if args.no_qwix:
    args.only = [k for k in args.only if VARIANTS[k].kind != "qwix"]
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  t0 = time.perf_counter()
  res = run(args)
  res.update(settings=vars(args), device=str(jax.devices()[0].device_kind), jax=jax.__version__,
             total_s=time.perf_counter() - t0)
  text = report(res)
  print("\n" + text, flush=True)
  if args.out:
    _write(args, {k: v for k, v in res.items() if k != "settings"})
    Path(args.out).with_suffix(".md").write_text(text + "\n")
    log(f"wrote {args.out} and {Path(args.out).with_suffix('.md')}")
  return res


if __name__ == "__main__":
  main()
