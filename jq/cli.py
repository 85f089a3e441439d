"""``jq-quant``: quantize, evaluate, inspect, run and export models (the app layer).

  jq-quant quantize [--model smollm2|minilm|HF_DIR|FILE.gguf] [--recipe NAME | --rules FILE] [--out PATH]
  jq-quant eval CKPT [--json] [--kv-cache none|int8|fp8]
  jq-quant inspect CKPT
  jq-quant generate CKPT --prompt "..." [--kv-cache none|int8|fp8]
  jq-quant plan [--model smollm2] --bits 4.5          # sensitivity scan + mixed-precision rules
  jq-quant export CKPT --format gguf --type q4_0 --out model.gguf
  jq-quant export CKPT --format compressed-tensors --out DIR
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_RECIPE = "w4a16-g128"
MODEL_OVERRIDE = ("the float model (name or path) when it is no longer where the checkpoint "
                  "says it was")


def _print(*a, **k):
  print(*a, **k, flush=True)


def _fmt_bytes(n: float) -> str:
  return f"{n / 2**20:.1f} MiB"


def _fmt_size(n: float) -> str:
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else _fmt_bytes(n)


def _table(head, rows) -> str:
  widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
  line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths)))
  return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


# ------------------------------------------------------------------------------------------------
# quantization


def _rules_for(args) -> tuple[Any, str]:
  """``(rules, label)`` from ``--rules FILE`` or ``--recipe NAME``; errors name the flag."""
  from jq import spec_json
  from jq.ptq import recipes
  if args.rules:
    try:
      rules, label = spec_json.load_rules(args.rules), f"rules:{Path(args.rules).name}"
    except (ValueError, OSError) as e:   # OSError: missing file, a directory, unreadable
      raise ValueError(f"--rules {args.rules}: {e}") from e
  else:
    try:
      rules, label = recipes.rules(args.recipe), args.recipe
    except ValueError as e:
      raise ValueError(f"--recipe: {e}") from e
  if getattr(args, "head", None):
    label = f"{label}+head-{args.head}"
  return rules, label


# ``--head``: the jq.spec preset of the output head (jq.head_rule; weight-only).
HEAD_SPECS = {"int8": "W8A16"}


def _with_head(args, rules, tied: bool | None) -> tuple:
  """``--head``: a rule for the decoder's output head in front of ``rules`` (whose skip rules
  would keep it float): the token embedding when ``tied``, else ``lm_head`` alone (its lookup
  table stays float).  ``tied=None``: the model has no output head (an encoder)."""
  if not getattr(args, "head", None):
    return tuple(rules)
  if tied is None:
    raise ValueError(f"--head: {args.model} has no output head (an encoder); drop --head")
  from jq import spec
  return (spec.head_rule(getattr(spec, HEAD_SPECS[args.head]), embeddings=tied),) + tuple(rules)


# Calibration sequences per forward, in both roads of ``quantize`` (in memory and ``--stream``):
# the same batches give the same AWQ token sample, so ``--stream`` writes the in-memory road's
# codes; 4 (not PTQConfig's 8) kept onloaded GPTQ of Llama-3.2-1B within 4 GiB (3.71 vs 4.09).
CALIB_CHUNK = 4


def _ptq_config(args, **kw):
  """The calibration config of the CLI: ``CALIB_CHUNK`` sequences per forward (rounded up to a
  multiple of ``--devices``); ``--devices N`` splits each calibration batch over N local devices
  (data parallel) and the parameters too (``PTQConfig.split_params``); ``--split-factor-from K``
  (with ``--devices``) factors GPTQ Hessians of K or more input channels split over them."""
  from jq.ptq import PTQConfig
  n = max(1, args.devices or 1)
  kw.setdefault("chunk", -(-CALIB_CHUNK // n) * n)
  if args.devices and args.devices > 1:
    from jq import distributed
    try:
      kw["mesh"] = distributed.local_mesh(devices=args.devices)
    except ValueError as e:
      raise ValueError(f"--devices {args.devices}: {e}") from e
    kw["split_params"] = True
  elif args.split_factor_from is not None:
    raise ValueError(f"--split-factor-from {args.split_factor_from}: splits GPTQ's factorisation "
                     "over the devices of --devices N (N >= 2); --devices is 1")
  return PTQConfig(split_factor_from=args.split_factor_from, **kw)


def _quantize_model(model, rules, args, cfg):
  """Returns ``(qvars, ref_vars, log)``."""
  from jq import app
  return app.quantize_model(model, rules, calib_sequences=args.calib_sequences,
                            calib_len=args.calib_len, calib_text=args.calib_text,
                            ptq_config=cfg, progress=True)


def _start_processes(args) -> int:
  """Starts ``jax.distributed`` for ``--coordinator/--num-processes/--process-id`` (before
  anything else touches JAX); returns the number of processes (1 without them)."""
  given = {"--coordinator": args.coordinator is not None,
           "--num-processes": args.num_processes is not None,
           "--process-id": args.process_id is not None}
  if not any(given.values()):
    return 1
  if not all(given.values()):
    missing = ", ".join(k for k, v in given.items() if not v)
    raise ValueError(f"--coordinator, --num-processes and --process-id go together (missing "
                     f"{missing}): every process runs the same command with its own --process-id "
                     "0 .. N-1 and the address of process 0, e.g. --coordinator localhost:12345 "
                     "--num-processes 2 --process-id 0")
  from jq import distributed
  try:
    distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                           timeout_s=args.process_timeout)
  except ValueError as e:
    raise ValueError(f"--coordinator/--num-processes/--process-id: {e}") from e
  return args.num_processes


def cmd_quantize(args) -> int:
  if _start_processes(args) <= 1:
    return _quantize(args)
  from jq import distributed
  try:
    return _quantize(args)
  except BaseException as e:
    distributed.fail(f"{type(e).__name__}: {e}")   # the others stop at their next exchange
    raise


def _wait_for_process_0(args, wrote: str | None) -> None:
  """Several processes: process 0 has written the output (``wrote``) or the others wait until it
  has (or failed: then they raise its error)."""
  import jax
  from jq import distributed
  if jax.process_count() <= 1:
    return
  if jax.process_index() > 0:
    _print(f"process {jax.process_index()} of {jax.process_count()}: calibration done; process "
           "0 evaluates and writes the checkpoint")
  # process 0's evaluation and writing may take long: no step timeout here
  distributed.agree("the end (process 0 writes the checkpoint)", {}, wrote,
                    timeout_s=max(args.process_timeout, 7 * 86400.0))


def _quantize(args) -> int:
  import jax
  from jq import io as jqio
  from jq import tree as jqtree
  from jq import app
  from jq_models import registry
  t0 = time.perf_counter()
  rules, recipe = _rules_for(args)  # a bad --rules file fails before the model loads
  cfg = _ptq_config(args)           # and so does a --devices this process does not have
  if args.calib_text not in registry.CALIBRATION_SOURCES and not Path(args.calib_text).is_file():
    raise ValueError(f"--calib-text {args.calib_text}: not one of "
                     f"{list(registry.CALIBRATION_SOURCES)} and not a file")
  if _streamed(args, rules):
    return _quantize_streamed(args, rules, recipe, t0)
  if args.out:                      # and so does an --out that cannot be written
    _check_out_file(args.out)
  _print(f"loading {args.model} ...")
  # --devices N: loaded straight into shards over the N devices
  model = registry.load(args.model, place=cfg.split if cfg.split_params else None)
  rules = _with_head(args, rules, model.config.tie_embeddings if model.kind == "causal_lm"
                     else None)
  if not args.no_eval and model.kind == "causal_lm":   # before the work, not after it
    app.context_length(model.config, args.window, "--window (evaluation window)")
  _print(f"quantizing with {recipe} ...")
  t1 = time.perf_counter()
  qvars, ref_vars, log = _quantize_model(model, rules, args, cfg)
  t_quant = time.perf_counter() - t1
  for line in log:
    _print("  " + line)
  if jax.process_index() > 0:
    _wait_for_process_0(args, None)
    return 0
  fvars = app.float_variables(model)
  rows = jqtree.report(ref_vars, qvars, stored=fvars)
  _print("\nworst layers by SQNR:")
  _print(jqtree.format_report(rows, limit=args.worst))
  _note_partial_groups(recipe, qvars)
  quality = {}
  if not args.no_eval:
    _print("\nevaluating on held-out text ...")
    quality = app.evaluate(model, qvars, windows=args.eval_windows, window=args.window,
                           progress=True)
  out = Path(args.out or f"{model.name}-{recipe.replace(':', '-')}.safetensors")
  meta = {"model": model.name, "source": getattr(model, "source", None)
          or {"kind": "bundled", "name": model.name}, "recipe": recipe, "quality": quality}
  jqio.save(out, qvars, metadata=meta, rules=rules)
  before, after = jqtree.nbytes(fvars), jqtree.nbytes(qvars)
  _print("\n" + _summary_table(model.name, recipe, before, after, quality, t_quant,
                               time.perf_counter() - t0))
  _print(f"\nwrote {out} ({_fmt_bytes(out.stat().st_size)})")
  _wait_for_process_0(args, str(out))
  return 0


# recipes named for the format whose grid they match exactly
_EXACT_FOR = {"gguf-q8_0": "GGUF Q8_0", "gguf-q4_0": "GGUF Q4_0",
              "ct-w4a16": "compressed-tensors W4A16"}


def _note_partial_groups(recipe: str, qvars: Any) -> None:
  """A recipe made to export exactly (``gguf-q8_0``, ``ct-w4a16``) on a model whose linears'
  inputs its group does not divide: those tensors end in a partial group, which the format cannot
  store as it is, so their export will fall back or re-round; said now, by name."""
  from jq import tree as jqtree
  if recipe not in _EXACT_FOR:
    return
  partial = [(p, tuple(x.shape)) for p, x in jqtree.leaves_with_paths(qvars)
             if jqtree.is_qarray(x) and any(s % t for s, t in zip(x.shape, x.tile))]
  if partial:
    p, shape = partial[0]
    _print(f"note: {len(partial)} tensors end in a partial group (e.g. {p}, shape {shape}): "
           f"{recipe}'s group does not divide their input, so {_EXACT_FOR[recipe]} cannot hold "
           "them as they are: GGUF export writes them as float (named), compressed-tensors "
           "export needs --requantize (a group that divides the input, named)")


def _streamed(args, rules) -> bool:
  """Whether ``quantize`` takes the streamed road (never the whole model in memory): ``--stream``,
  or a Hugging Face checkpoint whose weights exceed ``--stream-above`` GiB."""
  from jq_models import hf
  is_hf = Path(args.model).is_dir() and hf.is_checkpoint_dir(args.model)
  if args.stream:
    if not is_hf:
      raise ValueError(f"--stream reads a Hugging Face checkpoint directory (config.json + "
                       f"safetensors); --model {args.model} is not one")
    return True
  return is_hf and hf.checkpoint_bytes(args.model) > args.stream_above * 2**30


def _check_out_dir(out: str) -> None:
  """``--out`` names a directory jq can create: its parent exists and is writable, it is not a
  file."""
  import os
  p = Path(out)
  if p.exists() and not p.is_dir():
    raise ValueError(f"--out {out} is a file; this writes a directory (of shards, or a "
                     "compressed-tensors checkpoint)")
  parent = p.resolve().parent
  if not parent.is_dir():
    raise FileNotFoundError(f"--out {out}: {parent} is a file, not a directory" if parent.exists()
                            else f"--out {out}: directory {parent} does not exist")
  if not os.access(parent, os.W_OK):
    raise PermissionError(f"--out {out}: directory {parent} is not writable")
  _probe_writable(parent, out)


def _probe_writable(directory: Path, out: str) -> None:
  """Creates and removes a file in ``directory`` (the output's temporary files go there first):
  permissions alone miss read-only filesystems, ``/proc`` and the like, and root's ``access``
  says yes to everything; so the refusal comes before the work, naming ``--out``."""
  import tempfile
  try:
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".jq-probe-"):
      pass
  except OSError as e:
    raise PermissionError(f"--out {out}: cannot write in {directory} ({e.strerror or e})") from e


def _quantize_streamed(args, rules, recipe: str, t0: float) -> int:
  """``quantize`` tensor by tensor from the checkpoint's files into a sharded jq directory."""
  import jax
  import jax.numpy as jnp
  from jq import app
  from jq import nn as jqnn
  from jq import stream
  from jq.io import sharded
  from jq.ptq import recipes
  from jq_models import hf, registry
  directory = Path(args.model)
  config, source = registry.hf_source(directory)
  rules = _with_head(args, rules, config.tie_embeddings)
  out = args.out or f"{directory.resolve().name}-{recipe.replace(':', '-')}"
  _check_out_dir(out)
  sources = hf.stream_sources(directory, config)
  module = registry.decoder_module(config)
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  abstract = jax.eval_shape(module.init, jax.random.key(0), tokens)
  lays = jqnn.layouts(module, abstract, tokens)
  files = sorted(set(hf.weight_files(directory).values()))
  fingerprint = {"source": source["path"], "recipe": recipe,
                 "files": {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}}
  total = sum(s.nbytes for s in sources)
  calibrated = recipes.needs_calibration(rules)
  how = ("calibrating one block at a time" if calibrated else "tensor by tensor")
  _print(f"streaming {directory} ({len(sources)} tensors, {_fmt_size(total)}) with {recipe}, "
         f"{how}, into {out}/ ...")
  meta = {"model": directory.resolve().name, "source": source, "recipe": recipe,
          "streamed": True}
  kw = dict(layouts=lays, metadata=meta, fingerprint=fingerprint, resume=not args.restart,
            max_shard_bytes=int(args.shard_size * 2**30), progress=True)
  if calibrated:
    from jq.ptq import onload
    from jq_models import blockwise
    try:
      calib_len = app.context_length(config, args.calib_len,
                                     "--calib-len (calibration sequence length)")
      calib = registry.calibration_tokens(hf.load_tokenizer(directory), args.calib_sequences,
                                          calib_len, args.calib_text)
    except ValueError as e:
      raise ValueError(f"--calib-sequences/--calib-len/--calib-text: {e}") from e
    res = onload.quantize_onloaded(blockwise.onload_blocks(config), sources, rules, calib, out,
                                   config=_ptq_config(args), **kw)
  else:
    res = stream.quantize_to_dir(sources, rules, out, **kw)
  for line in res.log:
    _print("  " + line)
  shards = list(sharded.iter_shard_paths(out))
  rate = res.bytes_in / max(res.seconds, 1e-9) / 2**30
  rows = [("model", meta["model"]), ("recipe", recipe),
          ("tensors", f"{res.written} written" + (f", {res.resumed} from the resumed run"
                                                  if res.resumed else "")),
          ("read", f"{_fmt_size(res.bytes_in)} at {rate:.3f} GiB/s"),
          ("written", f"{_fmt_size(sum(Path(p).stat().st_size for p in shards))} in "
                      f"{len(shards)} shards"),
          ("peak memory (RSS)", _peak_rss()), ("total time", f"{time.perf_counter() - t0:.1f} s")]
  _print("\n" + _table(("summary", ""), rows))
  _print(f"\nwrote {out}/ (evaluate with: jq-quant eval {out})")
  return 0


def _peak_rss() -> str:
  """This process's peak resident memory, from /proc (VmHWM)."""
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return f"{int(line.split()[1]) / 2**20:.2f} GiB"
  except OSError:
    pass
  return "unknown"


def _summary_table(name, recipe, before, after, quality, t_quant, t_total) -> str:
  rows = [("model", name), ("recipe", recipe),
          ("params size", f"{_fmt_bytes(before)} -> {_fmt_bytes(after)} ({after / before:.3f}x)")]
  for k, v in quality.items():
    rows.append((k, f"{v:.4f}" if isinstance(v, float) else str(v)))
  rows += [("time to quantize", f"{t_quant:.1f} s"), ("total time", f"{t_total:.1f} s")]
  return _table(("summary", ""), rows)


# ------------------------------------------------------------------------------------------------
# checkpoints


def _ckpt_kind(path: str) -> str:
  """``"gguf"`` (a .gguf file), ``"compressed-tensors"`` (a directory whose config.json has a
  compressed-tensors quantization_config), ``"orbax"`` (jq's orbax directory) or ``"jq"`` (jq's
  safetensors file)."""
  p = Path(path)
  if p.is_file() and p.suffix == ".gguf":
    return "gguf"
  if p.is_dir() and (p / "jq").is_dir():
    return "orbax"
  if p.is_dir() and (p / "jq.index.json").is_file():
    return "jq"   # a sharded jq checkpoint (jq.io.load reads both)
  if p.is_dir() and (p / "config.json").is_file():
    try:
      cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"{p / 'config.json'}: not readable JSON ({e})") from e
    if (cfg.get("quantization_config") or {}).get("quant_method") == "compressed-tensors":
      return "compressed-tensors"
    raise ValueError(f"{path}: a model directory without a compressed-tensors "
                     "quantization_config; quantize it first (jq-quant quantize --model "
                     f"{path})")
  if p.is_dir():
    raise ValueError(f"{path} is a directory, not a checkpoint (a jq .safetensors file, a "
                     "sharded jq directory with jq.index.json, a jq orbax directory, a .gguf "
                     "file or a compressed-tensors directory)")
  return "jq"


def _ckpt_metadata(path: str, kind: str) -> dict:
  """The metadata jq records in each checkpoint kind: model, source, recipe, quality."""
  if kind == "gguf":
    from jq.io.gguf import read_gguf_metadata
    meta = read_gguf_metadata(path)
    out = {"recipe": meta.get("jq.recipe"), "model": meta.get("general.name")}
    if "jq.source" in meta:
      out["source"] = json.loads(meta["jq.source"])
    return out
  if kind == "compressed-tensors":
    cfg = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    return {"recipe": cfg.get("jq_recipe"), "source": cfg.get("jq_source")}
  from jq import io as jqio
  header = jqio.load_orbax_header(path) if kind == "orbax" else jqio.load_header(path)
  return header.get("metadata", {})


def _float_model(path: str, meta: dict, override: str | None, weights: bool = True):
  """The float model a checkpoint was made from: its ``source`` record (or ``--model``);
  ``weights=False``: without its float weights (``registry.load``)."""
  from jq_models import registry
  source = meta.get("source")
  if source is None and override is None:
    name = meta.get("model")
    if name not in registry.MODELS:   # jq files before source records named a bundled model
      raise ValueError(f"{path} records no float model jq-quant knows (model {name!r}); pass "
                       "--model NAME|PATH")
  if source is None:
    source = {"kind": "bundled", "name": meta.get("model")}
  try:
    return registry.load_source(source, override=override, weights=weights)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{path}: {e}") from e


def _load_ckpt(path: str, override: str | None = None, *, float_weights: bool = True,
               lazy: bool = False):
  """``(float model, quantized variables, metadata)`` of a jq, GGUF or compressed-tensors
  checkpoint; the quantized tree is checked against the float model's.  ``float_weights=False``
  (export, generate): the float model without its weights; ``lazy`` (export): a jq checkpoint's
  leaves read one at a time by their consumer (``jq.io.load(lazy=True)``), so a checkpoint of a
  model bigger than memory exports in one tensor's (GGUF) or one shard's (compressed-tensors)
  room."""
  from jq import app
  kind = _ckpt_kind(path)
  meta = _ckpt_metadata(path, kind)
  model = _float_model(path, meta, override, float_weights)
  if kind == "gguf":
    from jq.io.gguf import load_gguf_params, read_gguf_metadata
    gmeta = read_gguf_metadata(path)
    if gmeta.get("general.architecture") == "llama" and not gmeta.get("llama.expert_count"):
      _, params, _ = load_gguf_params(path)      # exact QArrays where the type has a jq twin
    else:   # other architectures and Mixtral's stacked experts: their dequantized values
      from jq_models import gguf_weights
      params = gguf_weights.read_gguf_params(path, model.config)
    qvars = {"params": params}
  elif kind == "compressed-tensors":
    from jq.io import compressed_tensors
    _, params = compressed_tensors.load_compressed_tensors(path, config=model.config)
    qvars = {"params": params}
  else:
    from jq import io as jqio
    qvars = jqio.load_orbax(path) if kind == "orbax" else jqio.load(path, lazy=lazy)
  app.check_matches(model, qvars, source=path)
  return model, qvars, {"metadata": meta, "kind": kind}


def cmd_eval(args) -> int:
  from jq import app
  model, qvars, header = _load_ckpt(args.ckpt, args.model)
  quality = app.evaluate(model, qvars, windows=args.eval_windows, window=args.window,
                         progress=not args.json, kv_cache=args.kv_cache)
  if args.json:
    _print(json.dumps({"checkpoint": args.ckpt, "model": model.name,
                       "recipe": header.get("metadata", {}).get("recipe"), **quality}, indent=2))
  else:
    _print(_table(("metric", "value"), [(k, f"{v:.4f}" if isinstance(v, float) else v)
                                        for k, v in quality.items()]))
  return 0


def cmd_inspect(args) -> int:
  kind = _ckpt_kind(args.ckpt)
  if kind in ("gguf", "compressed-tensors"):
    return _inspect_foreign(args.ckpt, kind)
  from jq import io as jqio
  header = jqio.load_orbax_header(args.ckpt) if kind == "orbax" else jqio.load_header(args.ckpt)
  meta = header.get("metadata", {})
  rows = []
  total = 0
  for path, leaf in header["leaves"].items():
    nbytes = sum(int(header["tensors"][t]["nbytes"]) if "nbytes" in header["tensors"][t] else
                 _tensor_bytes(header["tensors"][t]) for t in _leaf_tensors(path, leaf, header))
    total += nbytes
    if leaf["kind"] == "qarray":
      act = leaf.get("activation")
      rows.append((path, "x".join(map(str, leaf["shape"])), leaf["qtype"],
                   leaf.get("granularity", ""), "sym" if leaf.get("symmetric") else "asym",
                   "-" if not act else f"a8 {act['mode']}", f"{nbytes:,}"))
    else:
      t = header["tensors"].get(leaf.get("tensor", ""), {})
      rows.append((path, "x".join(map(str, t.get("shape", []))), t.get("dtype", leaf["kind"]),
                   "float", "", "", f"{nbytes:,}"))
  _print(f"{args.ckpt}: model={meta.get('model')} recipe={meta.get('recipe')} "
         f"format v{header.get('version')}")
  _print(_table(("path", "shape", "type", "granularity", "", "activations", "bytes"), rows))
  _print(f"{len(rows)} tensors, {_fmt_bytes(total)}")
  return 0


_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _inspect_foreign(path: str, kind: str) -> int:
  """The tensor table of a GGUF file or a compressed-tensors directory, from headers only."""
  import numpy as np
  meta = _ckpt_metadata(path, kind)
  rows = []
  if kind == "gguf":
    from jq.io.gguf.reader import _GGUFFile
    f = _GGUFFile(path)
    for t in f.tensors:
      rows.append((t.name, "x".join(map(str, t.shape)), t.type.name, f"{t.nbytes:,}"))
    total = sum(t.nbytes for t in f.tensors)
    arch = f.metadata.get("general.architecture")
  else:
    from safetensors import safe_open
    d = Path(path)
    index = d / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else ["model.safetensors"])
    total = 0
    for fname in files:
      with safe_open(d / fname, framework="numpy") as f:
        for name in f.keys():
          sl = f.get_slice(name)
          shape, dtype = sl.get_shape(), sl.get_dtype()
          nbytes = int(np.prod(shape)) * _ST_ITEMSIZE.get(dtype, 0)
          total += nbytes
          rows.append((name, "x".join(map(str, shape)), dtype, f"{nbytes:,}"))
    cfg = json.loads((d / "config.json").read_text())
    arch = cfg.get("model_type")
    for name, g in (cfg["quantization_config"].get("config_groups") or {}).items():
      w = g.get("weights") or {}
      a = g.get("input_activations")
      _print(f"{name}: int{w.get('num_bits')} {'sym' if w.get('symmetric') else 'asym'} "
             f"{w.get('strategy')}{'' if not w.get('group_size') else ' ' + str(w['group_size'])}"
             f"{'' if not a else ' + int8 activations ' + str(a.get('strategy'))}, "
             f"targets {g.get('targets')}")
  _print(f"{path}: {kind}, architecture={arch} recipe={meta.get('recipe')} "
         f"source={(meta.get('source') or {}).get('path') or (meta.get('source') or {}).get('name')}")
  _print(_table(("tensor", "shape", "type", "bytes"), rows))
  _print(f"{len(rows)} tensors, {_fmt_bytes(total)}")
  return 0


def _leaf_tensors(path, leaf, header):
  if leaf["kind"] == "qarray":
    return [f"{path}.{c}" for c in leaf.get("components", ()) if f"{path}.{c}" in header["tensors"]]
  return [leaf["tensor"]] if "tensor" in leaf else []


def _tensor_bytes(t) -> int:
  import numpy as np
  from jq.io.codec import DTYPES
  return int(np.prod(t["shape"])) * DTYPES[t["dtype"]].itemsize


def cmd_generate(args) -> int:
  from jq import app
  if not args.prompt.strip() and args.raw:
    raise ValueError("--prompt is empty; with --raw there is nothing to continue from")
  model, qvars, _ = _load_ckpt(args.ckpt, args.model, float_weights=False)
  if model.kind != "causal_lm":
    raise SystemExit(f"error: generate needs a causal LM; {args.ckpt} holds {model.name}")
  t0 = time.perf_counter()
  text, n = app.generate(model, qvars, args.prompt, max_new_tokens=args.max_new_tokens,
                         chat=not args.raw, progress=True, kv_cache=args.kv_cache)
  dt = time.perf_counter() - t0
  _print(text)
  cache = "a KV cache" if args.kv_cache == "none" else f"an {args.kv_cache} KV cache"
  _print(f"\n[{n} tokens in {dt:.1f} s incl. compile, greedy, jitted with {cache}]",
         file=sys.stderr)
  return 0


def cmd_plan(args) -> int:
  from jq import app
  from jq import spec_json
  from jq_models import registry
  if args.out:   # before the scan, not after it
    _check_out_file(args.out)
  model = registry.load(args.model)
  result = app.mixed_precision_plan(model, bits_per_weight=args.bits, progress=True)
  _print(result["scan"].table())
  _print(f"\nplan at {args.bits} bits/weight: {result['bits']:.3f} bits/weight, "
         f"estimated KL {result['kl']:.4f}")
  text = spec_json.rules_to_json(result["rules"])
  if args.out:
    Path(args.out).write_text(text)
    _print(f"rules written to {args.out} (use: jq-quant quantize --rules {args.out})")
  else:
    _print(text)
  return 0


def _export_blockers(model) -> list[str]:
  """The config features of ``model`` that the GGUF / compressed-tensors exporters cannot write."""
  import dataclasses
  from jq_models.decoder import DecoderConfig
  config = getattr(model, "config", None)
  if model.kind != "causal_lm" or not isinstance(config, DecoderConfig):
    return [f"a {model.kind} architecture"]
  plain = DecoderConfig()
  skip = {"vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
          "num_kv_heads", "head_dim", "rope_theta", "rms_norm_eps", "max_seq_len",
          "tie_embeddings", "dtype"}
  return [f"{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(config)
          if f.name not in skip and getattr(config, f.name) != getattr(plain, f.name)]


def _check_out_file(out: str) -> None:
  """``--out`` names a file jq can write: its directory exists and is writable, it is not one."""
  import os
  p = Path(out)
  if p.is_dir():
    raise ValueError(f"--out {out} is a directory; give a file name")
  parent = p.parent
  if not parent.is_dir():
    raise FileNotFoundError(f"--out {out}: {parent} is a file, not a directory" if parent.exists()
                            else f"--out {out}: directory {parent} does not exist")
  if not os.access(parent, os.W_OK):
    raise PermissionError(f"--out {out}: directory {parent} is not writable")
  _probe_writable(parent, out)


def _check_gguf_tokenizer(model: Any, path: str) -> None:
  """``--tokenizer-gguf``: the GGUF's tokenizer must turn text into the model's own token ids
  (probe strings and a passage of the calibration text), its special ids too; else refused,
  naming the first text that differs."""
  from jq_models import tokenizer as gguf_tokenizer
  if getattr(model, "tokenizer", None) is None:
    raise ValueError(f"--tokenizer-gguf {path}: {model.name} has no tokenizer to check it against")
  try:
    theirs = gguf_tokenizer.load_tokenizer(path)
  except (OSError, ValueError) as e:
    raise ValueError(f"--tokenizer-gguf {path}: {e}") from e
  vocab = getattr(getattr(model, "config", None), "vocab_size", None)
  if vocab is not None and theirs.vocab_size != vocab:
    raise ValueError(f"--tokenizer-gguf {path}: {theirs.vocab_size} tokens, the model's "
                     f"vocab_size is {vocab}: not this model's tokenizer")
  problem = _tokenization_difference(model, theirs)
  if problem:
    raise ValueError(f"--tokenizer-gguf {path}: {problem}, unlike the checkpoint's tokenizer: "
                     "pass a GGUF of this model")


def _tokenization_difference(model: Any, theirs: Any) -> str | None:
  """How ``theirs`` tokenizes the probe texts and a passage of the calibration text differently
  from ``model``'s own tokenizer (``None``: identically), apart from what differs by design
  between transformers and llama.cpp (printed)."""
  from jq_models import gguf_vocab, registry
  from jq_models import tokenizer as gguf_tokenizer
  passage = registry.calibration_text("news")[:2000]
  texts, notes = gguf_vocab.comparable_texts(model.tokenizer,
                                             (*gguf_tokenizer.PROBE_TEXTS, passage))
  for line in notes:
    _print(f"note: {line}")
  return gguf_tokenizer.tokenization_difference(model.tokenizer, theirs, texts)


def _converted_tokenizer(model: Any, ckpt: str) -> dict[str, Any]:
  """GGUF ``tokenizer.*`` metadata converted from a Hugging Face checkpoint's ``tokenizer.json``,
  checked to tokenize as the checkpoint does once llama.cpp's way of running it is rebuilt."""
  from jq_models import gguf_vocab
  from jq_models import tokenizer as gguf_tokenizer
  how = ("pass --tokenizer-gguf PATH (a GGUF of the same model, e.g. any quantization of it) or "
         "use --format compressed-tensors")
  try:
    meta = gguf_vocab.gguf_tokenizer_metadata(model.tokenizer, model.config.vocab_size)
    theirs = gguf_tokenizer.tokenizer_from_metadata(meta)
  except ValueError as e:
    raise ValueError(f"{ckpt}: --format gguf: {model.name}'s tokenizer cannot be written for "
                     f"llama.cpp: {e}; {how}") from e
  kind = meta["tokenizer.ggml.model"] + (f", pre-tokenizer {meta['tokenizer.ggml.pre']}"
                                         if "tokenizer.ggml.pre" in meta else "")
  problem = _tokenization_difference(model, theirs)
  if problem:
    raise ValueError(f"{ckpt}: --format gguf: {model.name}'s tokenizer.json converted for "
                     f"llama.cpp ({kind}) does not tokenize as the checkpoint does: {problem}; "
                     f"{how}")
  _print(f"tokenizer: tokenizer.json converted for llama.cpp ({kind}); it tokenizes the probe "
         "texts and a passage of news as the checkpoint does")
  return meta


def cmd_export(args) -> int:
  if args.format == "gguf":   # --out and the types checked before the model loads and the work
    _check_out_file(args.out)
    from jq.io.gguf.types import EXPORT_TYPES, to_ggml_type
    for flag, name in (("--type", args.type), ("--embed-type", args.embed_type)):
      if name is None:
        continue
      try:
        kind = to_ggml_type(name)
      except ValueError as e:
        raise ValueError(f"{flag}: {e}") from None
      if kind not in EXPORT_TYPES:
        raise ValueError(f"{flag} {name}: jq cannot write GGUF {kind.name}; choose one of "
                         f"{[t.name.lower() for t in EXPORT_TYPES]}")
  else:   # compressed-tensors: a directory
    _check_out_dir(args.out)
    for flag, given in (("--type", args.type), ("--embed-type", args.embed_type)):
      if given is not None:
        raise ValueError(f"{flag} applies to --format gguf only (compressed-tensors keeps the "
                         "recipe's own grid and embeddings float)")
  model, qvars, info = _load_ckpt(args.ckpt, args.model, float_weights=False, lazy=True)
  source = getattr(model, "source", {}) or {}
  recipe = info["metadata"].get("recipe")
  hf_source = source.get("kind") == "hf"
  # compressed-tensors of a Hugging Face source keeps its own config.json, so every family goes;
  # GGUF writes the family's llama.cpp architecture, which must run the config as it is
  arch = None
  if args.format == "gguf":
    from jq.io.decoder_names import GGUF_ARCH
    from jq.io.gguf.llama import arch_problems
    family = source.get("family") or ("llama" if source.get("kind") == "bundled" else None)
    arch = GGUF_ARCH.get(family or "", "llama")
    features = (arch_problems(model.config, arch) if model.kind == "causal_lm"
                else [f"a {model.kind} architecture"])
  else:
    features = [] if hf_source else _export_blockers(model)
  if features:
    what = (f"llama.cpp's {arch} architecture" if arch else "a Llama config.json")
    raise ValueError(f"{args.ckpt}: --format {args.format} cannot write {model.name} as it is: "
                     f"{', '.join(features)} — {what} would run it differently"
                     + ("" if hf_source or arch else " (compressed-tensors export of the other "
                        "families needs a Hugging Face source checkpoint)"))
  tokenizer_gguf, tokenizer_meta = None, None
  if args.format == "gguf":
    tokenizer_gguf = args.tokenizer_gguf or getattr(model, "gguf_path", None)
    if tokenizer_gguf is None and hf_source and getattr(model, "tokenizer", None) is not None:
      tokenizer_meta = _converted_tokenizer(model, args.ckpt)
    elif tokenizer_gguf is None:
      raise ValueError(f"{args.ckpt}: --format gguf carries the tokenizer over from a GGUF or "
                       f"a Hugging Face tokenizer.json, and {model.name} has neither: pass "
                       "--tokenizer-gguf PATH (a GGUF of the same model, e.g. any quantization "
                       "of it; checked to tokenize as this checkpoint does) or use --format "
                       "compressed-tensors")
    if args.tokenizer_gguf:
      _check_gguf_tokenizer(model, args.tokenizer_gguf)
  elif args.tokenizer_gguf:
    raise ValueError("--tokenizer-gguf applies to --format gguf only (compressed-tensors keeps "
                     "the checkpoint's own tokenizer files)")
  notes: list[str] = []
  if args.format == "gguf":
    from jq.io.gguf import export_model
    record = {"jq.source": json.dumps(source)} | ({"jq.recipe": recipe} if recipe else {})
    types = export_model(model, qvars, args.out, ggml_type=args.type or "q8_0",
                         embed_type=args.embed_type, requantize=args.requantize, notes=notes,
                         extra_metadata=record, arch=arch, progress=True,
                         source_gguf=tokenizer_gguf, tokenizer_meta=tokenizer_meta)
    counts: dict[str, int] = {}
    for t in types.values():
      counts[getattr(t, "name", str(t))] = counts.get(getattr(t, "name", str(t)), 0) + 1
    summary = "tensor types: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
  else:
    from jq.io import compressed_tensors
    kw: dict[str, Any] = {"hf_config_extra": {"jq_source": source, "jq_recipe": recipe}}
    if hf_source:
      src = Path(source["path"])
      kw["hf_config"] = json.loads((src / "config.json").read_text(encoding="utf-8"))
      kw["extra_files"] = {f: (src / f).read_bytes() for f in (
          "tokenizer.json", "tokenizer_config.json", "generation_config.json",
          "special_tokens_map.json", "chat_template.jinja") if (src / f).is_file()}
    compressed_tensors.export_model(qvars, args.out, model=model, requantize=args.requantize,
                                    notes=notes, progress=True, **kw)
    summary = ""
  for line in notes:
    _print("  " + line)
  def count(what: str) -> int:
    return len({line.split()[0].rstrip(":") for line in notes
                if line.startswith("params/") and what in line})
  for n, what in ((count(": re-rounded"), "changed grid"),
                  (count(" falls back to "), "written in another type than asked")):
    if n:
      _print(f"{n} tensors {what} (listed above)")
  if summary:
    _print(summary)
  _print(f"wrote {args.out}")
  return 0


# ------------------------------------------------------------------------------------------------


def _at_least(low: int):
  """An argparse type: an int >= ``low`` (argparse names the flag in its error)."""
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
      raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
    return value
  parse.__name__ = f"int >= {low}"
  return parse


def _positive_float(text: str) -> float:
  """An argparse type: a finite float > 0."""
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
  if not (value > 0 and value != float("inf")):
    raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}")
  return value


def build_parser() -> argparse.ArgumentParser:
  from jq import kv_cache
  from jq.ptq import recipes
  p = argparse.ArgumentParser(prog="jq-quant", description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="command")

  def eval_opts(sp):
    sp.add_argument("--eval-windows", type=_at_least(1), default=8,
                    help="evaluation windows (default 8)")
    sp.add_argument("--window", type=_at_least(2), default=None,
                    help="tokens per window (default 512, or the model's context if shorter)")

  def kv_opt(sp, what):
    sp.add_argument("--kv-cache", choices=kv_cache.KINDS, default="none",
                    help="how the decoder's KV cache stores keys and values: none (float, the "
                    "default), int8 or fp8 (e4m3), with a float32 scale per token and head; "
                    + what)

  q = sub.add_parser("quantize", help="quantize a model and write a jq checkpoint")
  q.add_argument("--model", default="smollm2",
                 help="smollm2 (default), minilm, a Hugging Face checkpoint directory "
                 "(config.json + safetensors + tokenizer.json) or a llama .gguf file")
  g = q.add_mutually_exclusive_group()
  g.add_argument("--recipe", default=DEFAULT_RECIPE, choices=recipes.names(),
                 help=f"named recipe (default {DEFAULT_RECIPE})")
  g.add_argument("--rules", help="JSON rules file (see jq.spec_json); a rule's \"options\" "
                 "hold its algorithm's settings, e.g. {\"algorithm\": \"gptq\", "
                 "\"options\": {\"act_order\": true}}")
  q.add_argument("--head", choices=sorted(HEAD_SPECS), default=None,
                 help="also quantize the decoder's output head, weight-only (int8: one scale "
                 "per vocabulary entry): lm_head, or a tied head's token embedding, whose "
                 "lookups then read int8 rows too.  Default: the head stays float")
  q.add_argument("--out", help="output .safetensors path (streamed: a directory)")
  q.add_argument("--worst", type=_at_least(0), default=8,
                 help="layers shown in the worst-SQNR table")
  q.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation")
  q.add_argument("--stream", action="store_true",
                 help="quantize tensor by tensor from the checkpoint's files into a directory "
                 "of shards (round-to-nearest recipes; Hugging Face checkpoint directories); "
                 "the default above --stream-above")
  q.add_argument("--stream-above", type=_positive_float, default=8.0, metavar="GIB",
                 help="stream Hugging Face checkpoints whose weights exceed this many GiB "
                 "(default 8)")
  q.add_argument("--shard-size", type=_positive_float, default=2.0, metavar="GIB",
                 help="streamed output: GiB of tensors per shard (default 2)")
  q.add_argument("--restart", action="store_true",
                 help="streamed: discard a partial run of --out instead of resuming it")
  q.add_argument("--devices", type=_at_least(1), default=1,
                 help="calibration: split each batch over this many local devices (data "
                 "parallel; the batch size, 8 sequences or 4 with --stream, must divide) and the "
                 "parameters too (each tensor along its last axis, loaded straight into shards)")
  q.add_argument("--split-factor-from", type=_at_least(1), default=None, metavar="K",
                 help="with --devices: GPTQ kernels of K or more input channels factor their "
                 "Hessian split over the devices, none holding a K x K matrix (default: where "
                 "one device's solve would take over half of its memory, as GPUs/TPUs report "
                 "it; never on CPU)")
  q.add_argument("--coordinator", metavar="HOST:PORT",
                 help="several processes (jax.distributed; with --num-processes and "
                 "--process-id): the address of process 0.  Every process runs the same command "
                 "with its own --process-id; the calibration batches are split between them, "
                 "the statistics summed and the GPTQ/AWQ solves shared; process 0 evaluates and "
                 "writes --out (streamed: each process writes its own shards of the directory)")
  q.add_argument("--num-processes", type=_at_least(2), default=None, metavar="N",
                 help="several processes: how many (see --coordinator)")
  q.add_argument("--process-id", type=_at_least(0), default=None, metavar="I",
                 help="several processes: this one, 0 .. N-1 (see --coordinator)")
  q.add_argument("--process-timeout", type=_positive_float, default=1800.0, metavar="S",
                 help="several processes: how long one waits for the others at each step "
                 "(default 1800 s)")
  q.add_argument("--calib-sequences", type=_at_least(1), default=32, metavar="N",
                 help="calibrated recipes: calibration sequences of --calib-len tokens from "
                 "--calib-text (default 32)")
  q.add_argument("--calib-len", type=_at_least(2), default=None,
                 help="tokens per calibration sequence (default 512, or the model's context if "
                 "shorter)")
  q.add_argument("--calib-text", default="news", metavar="SOURCE",
                 help="calibration text of a causal LM: news (default: the calibration split of "
                 "the bundled articles), shakespeare, or the path of a UTF-8 text file")
  eval_opts(q)
  q.set_defaults(fn=cmd_quantize)

  e = sub.add_parser("eval", help="perplexity/KL (or cosine similarity) of a checkpoint")
  e.add_argument("ckpt")
  e.add_argument("--json", action="store_true", help="machine-readable output")
  e.add_argument("--model", help=MODEL_OVERRIDE)
  kv_opt(e, "the quantized model is evaluated as decoding with that cache computes, and the "
         "cache's bytes per token are reported")
  eval_opts(e)
  e.set_defaults(fn=cmd_eval)

  i = sub.add_parser("inspect", help="per-tensor table from the checkpoint header alone")
  i.add_argument("ckpt")
  i.set_defaults(fn=cmd_inspect)

  gen = sub.add_parser("generate", help="greedy decoding from a quantized causal LM")
  gen.add_argument("ckpt", help="a jq checkpoint (file or sharded directory), a GGUF file or a "
                   "compressed-tensors directory")
  gen.add_argument("--prompt", required=True, help="the user message (wrapped in the "
                   "checkpoint's chat template unless --raw)")
  gen.add_argument("--max-new-tokens", type=_at_least(1), default=64,
                   help="tokens to generate at most (default 64; prompt + these must fit the "
                   "model's context)")
  gen.add_argument("--raw", action="store_true", help="no chat template around the prompt")
  gen.add_argument("--model", help=MODEL_OVERRIDE)
  kv_opt(gen, "dequantized inside the jitted decoding step")
  gen.set_defaults(fn=cmd_generate)

  pl = sub.add_parser("plan", help="sensitivity scan and a mixed-precision plan as rules")
  pl.add_argument("--model", default="smollm2")
  pl.add_argument("--bits", type=_positive_float, default=4.5,
                  help="budget: average bits per weight")
  pl.add_argument("--out", help="write the rules JSON here")
  pl.set_defaults(fn=cmd_plan)

  x = sub.add_parser("export", help="export to GGUF (llama.cpp) or compressed-tensors (vLLM)")
  x.add_argument("ckpt", help="the checkpoint to export, as eval reads it (a jq file or sharded "
                 "directory: read one tensor at a time)")
  x.add_argument("--format", required=True, choices=["gguf", "compressed-tensors"],
                 help="gguf: one llama.cpp file; compressed-tensors: a Hugging Face directory "
                 "vLLM and transformers load")
  x.add_argument("--type", help="--format gguf: GGUF tensor type for quantized kernels "
                 "(default q8_0)")
  x.add_argument("--embed-type", help="GGUF type of token_embd/output (default: a float "
                 "embedding stays float, a quantized one takes --type)")
  x.add_argument("--out", required=True, help="the .gguf file, or the compressed-tensors "
                 "directory")
  x.add_argument("--model", help=MODEL_OVERRIDE)
  x.add_argument("--requantize", action="store_true",
                 help="allow re-rounding where jq's grid has no exact equivalent (each changed "
                 "tensor is listed)")
  x.add_argument("--tokenizer-gguf", metavar="PATH",
                 help="--format gguf: the GGUF whose tokenizer to carry over (any GGUF of the "
                 "same model; checked to tokenize as the checkpoint does).  Default: the "
                 "model's own GGUF, or a Hugging Face checkpoint's tokenizer.json converted "
                 "(byte-level or SentencePiece BPE; checked the same way)")
  x.set_defaults(fn=cmd_export)
  return p


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.command is None:
    parser.print_help()
    return 2
  try:
    return args.fn(args)
  except BrokenPipeError:   # `jq-quant inspect CKPT | head`: the reader left; not an error
    sys.stdout = open(os.devnull, "w", encoding="utf-8")   # (Python flushes stdout at exit)
    return 0
  except (ValueError, OSError) as e:   # OSError: missing, unreadable or unwritable paths
    _print(f"error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
