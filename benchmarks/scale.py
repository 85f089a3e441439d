"""Bigger than memory: peak host memory and time of jq's streamed road on checkpoints of real shapes.

Writes random bfloat16 Hugging Face checkpoints of real model shapes to disk (config.json, sharded
safetensors, a word-level tokenizer.json of the model's vocabulary size: what ``jq-quant`` reads),
then runs each measured step in a FRESH process through the CLI (``jq-quant quantize --stream``)
and reads that process's peak resident memory from ``/proc/self/status`` (VmHWM: anonymous and
file-backed pages, so a memory-mapped read would show) and its wall time.

  python benchmarks/scale.py --shape llama-3.1-8b --dir /tmp/jq-scale     # write + measure
  python benchmarks/scale.py --shape llama-3.2-1b --steps gptq-w4a16-g128 --calib-sequences 16
  python benchmarks/scale.py --shape llama-3.1-8b --steps gguf-q4_0 --export gguf   # + export

Goals (issue "Bigger than memory"): streamed RTN peak RSS <= 2x the largest tensor + 1 GiB (and
<= 3 GiB for the 8B shape); onloaded calibration <= one block's float32 weights x 3 + the hidden
states + 2 GiB (and <= 4 GiB for the 1B shape).  ``--export gguf`` also exports each streamed
result (``jq-quant export DIR --format gguf``, leaves read one at a time): the same goal as
streamed RTN, whatever the checkpoint's size.  Results:
``benchmarks/results/scale_<shape>_<steps>.json``; the summary is ``results/scale.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SHAPES = {  # Hugging Face config.json fields of the real models
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         vocab_size=128256, tie_word_embeddings=True),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         vocab_size=128256, tie_word_embeddings=False),
    "llama-3.1-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                          vocab_size=128256, tie_word_embeddings=False),
}
_LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
              max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
              rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
              bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")


def _tensors(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
  h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
  q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
  out = [("model.embed_tokens.weight", (v, h)), ("model.norm.weight", (h,))]
  if not cfg["tie_word_embeddings"]:
    out.append(("lm_head.weight", (v, h)))
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}."
    out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q)),
            (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
            (p + "mlp.down_proj.weight", (h, f))]
  return out


def write_checkpoint(directory: Path, shape: str, shard_bytes: int = 5 << 30) -> dict:
  """A random bfloat16 checkpoint of ``shape`` (written tensor by tensor: the writer holds one
  256 MiB random block, not the model)."""
  cfg = {**_LLAMA, **SHAPES[shape]}
  directory.mkdir(parents=True, exist_ok=True)
  tensors = _tensors(cfg)
  groups, size = [[]], 0
  for name, shp in tensors:
    n = int(np.prod(shp)) * 2
    if groups[-1] and size + n > shard_bytes:
      groups.append([])
      size = 0
    groups[-1].append((name, shp))
    size += n
  rng = np.random.default_rng(0)
  # finite bfloat16 values of both signs, magnitudes ~2^-9..2^-4 (a trained weight's range)
  block = (rng.integers(0x3B00, 0x3D80, size=128 << 20, dtype=np.uint16)
           | (rng.integers(0, 2, size=128 << 20, dtype=np.uint16) << 15))
  norm = np.full(cfg["hidden_size"], 0x3F80, np.uint16)   # 1.0
  weight_map, k = {}, 0
  for s, group in enumerate(groups):
    fname = f"model-{s + 1:05d}-of-{len(groups):05d}.safetensors"
    entries, off = {}, 0
    for name, shp in group:
      n = int(np.prod(shp)) * 2
      entries[name] = {"dtype": "BF16", "shape": list(shp), "data_offsets": [off, off + n]}
      off += n
      weight_map[name] = fname
    raw = json.dumps(entries).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    with open(directory / fname, "wb") as fh:
      fh.write(struct.pack("<Q", len(raw)) + raw)
      for name, shp in group:
        count = int(np.prod(shp))
        if len(shp) == 1:
          fh.write(norm[:count].tobytes())
          continue
        k = (k + 7919 * 64) % block.size   # a different window of the block per tensor
        left = count
        while left:
          take = min(left, block.size - k)
          fh.write(block[k:k + take].tobytes())
          left -= take
          k = (k + take) % block.size
  (directory / "model.safetensors.index.json").write_text(json.dumps(
      {"metadata": {"total_size": sum(int(np.prod(s)) * 2 for _, s in tensors)},
       "weight_map": weight_map}))
  (directory / "config.json").write_text(json.dumps(cfg, indent=1))
  _write_tokenizer(directory, cfg["vocab_size"])
  return cfg


def _write_tokenizer(directory: Path, vocab_size: int) -> None:
  """A byte-level BPE tokenizer (GPT-2's pre-tokenizer, so GGUF export converts it) trained on
  jq's calibration and evaluation text, up to ``vocab_size`` tokens (the text holds fewer
  merges: the model's other rows are never looked up)."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  from jq_models import text
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator([text.calibration_text(), text.eval_text()], trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(str(directory / "tokenizer.json"))
  (directory / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))


_RUNNER = r"""
import json, sys, time
t0 = time.perf_counter()
from jq import cli
rc = cli.main(sys.argv[1:])
wall = time.perf_counter() - t0
status = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
print("JQ_RESULT " + json.dumps({"rc": rc, "wall_s": wall,
      "peak_rss_gib": int(status["VmHWM"].split()[0]) / 2**20}), flush=True)
"""


def run_step(argv: list[str], log: Path) -> dict:
  """One CLI run in a fresh process: its exit code, wall time and peak RSS."""
  env = dict(os.environ, TQDM_MININTERVAL="5")
  with open(log, "w") as fh:
    proc = subprocess.run([sys.executable, "-c", _RUNNER, *argv], stdout=subprocess.PIPE,
                          stderr=fh, text=True, env=env, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("JQ_RESULT ")]
  if not lines:
    raise RuntimeError(f"step {argv} failed (exit {proc.returncode}); see {log}")
  return json.loads(lines[-1][len("JQ_RESULT "):])


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
  ap.add_argument("--dir", default="/tmp/jq-scale", help="where checkpoints are written")
  ap.add_argument("--steps", default="w4a16-g128,w8a16",
                  help="comma-separated recipes: round-to-nearest ones stream tensor by tensor, "
                  "calibrated ones (gptq-...) calibrate one block at a time")
  ap.add_argument("--calib-sequences", type=int, default=16)
  ap.add_argument("--calib-len", type=int, default=512)
  ap.add_argument("--export", choices=["gguf", "compressed-tensors"], default=None,
                  help="also export each result (GGUF: --type q4_0 for 4-bit recipes, q8_0 "
                  "for 8-bit ones; --requantize where the grid is not the format's)")
  ap.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
  ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
  args = ap.parse_args()
  root = Path(args.dir)
  src = root / args.shape
  t0 = time.perf_counter()
  if not (src / "config.json").is_file():
    print(f"writing a random {args.shape} checkpoint to {src} ...", flush=True)
    write_checkpoint(src, args.shape)
  t_write = time.perf_counter() - t0
  cfg = json.loads((src / "config.json").read_text())
  tensors = _tensors(cfg)
  total = sum(int(np.prod(s)) * 2 for _, s in tensors)
  largest = max(int(np.prod(s)) * 2 for _, s in tensors)
  rows = []
  from jq.ptq import recipes
  block = sum(int(np.prod(s)) * 2 for n, s in tensors if n.startswith("model.layers.0."))
  for recipe in args.steps.split(","):
    calibrated = recipes.needs_calibration(recipes.rules(recipe))
    out = root / f"{args.shape}-{recipe}"
    shutil.rmtree(out, ignore_errors=True)
    argv = ["quantize", "--model", str(src), "--stream", "--recipe", recipe, "--out", str(out),
            "--restart"]
    if calibrated:
      argv += ["--calib-sequences", str(args.calib_sequences), "--calib-len", str(args.calib_len)]
    print(f"{recipe}: jq-quant {' '.join(argv)}", flush=True)
    res = run_step(argv, root / f"{args.shape}-{recipe}.log")
    written = _size(out)
    if calibrated:   # one block's float32 weights x 3 + the hidden states + 2 GiB
      acts = args.calib_sequences * args.calib_len * cfg["hidden_size"] * 4
      goal = 3 * 2 * block / 2**30 + acts / 2**30 + 2.0
      goal = min(goal, 4.0) if args.shape == "llama-3.2-1b" else goal
    else:            # 2x the largest tensor + 1 GiB, and 3 GiB for the 8B shape
      goal = 2 * largest / 2**30 + 1.0
      goal = min(goal, 3.0) if args.shape == "llama-3.1-8b" else goal
    rows.append({"shape": args.shape, "step": "onloaded calibration" if calibrated else
                 "streamed RTN", "recipe": recipe, "rc": res["rc"],
                 "wall_s": round(res["wall_s"], 1),
                 "read_gib_per_s": round(total / 2**30 / res["wall_s"], 3),
                 "peak_rss_gib": round(res["peak_rss_gib"], 3), "goal_rss_gib": round(goal, 3),
                 "meets_goal": res["rc"] == 0 and res["peak_rss_gib"] <= goal,
                 "checkpoint_gib": round(total / 2**30, 3),
                 "largest_tensor_gib": round(largest / 2**30, 3),
                 "block_gib": round(block / 2**30, 3),
                 **({"calibration": f"{args.calib_sequences}x{args.calib_len}"}
                    if calibrated else {}),
                 "output_gib": round(written / 2**30, 3)})
    print(json.dumps(rows[-1]), flush=True)
    if args.export and res["rc"] == 0:
      gguf = args.export == "gguf"
      exported = root / f"{args.shape}-{recipe}.{'gguf' if gguf else 'ct'}"
      bits4 = "4" in recipe.split("-")[0] or recipe.endswith("q4_0")
      argv = ["export", str(out), "--format", args.export, "--out", str(exported)]
      if gguf:
        argv += ["--type", "q4_0" if bits4 else "q8_0"]
      if not recipe.startswith("gguf-" if gguf else "ct-"):
        argv.append("--requantize")
      print(f"{recipe} export: jq-quant {' '.join(argv)}", flush=True)
      ex = run_step(argv, root / f"{args.shape}-{recipe}-export.log")
      goal = 2 * largest / 2**30 + 1.0
      rows.append({"shape": args.shape, "step": f"{args.export} export of the streamed result",
                   "recipe": recipe, "rc": ex["rc"], "wall_s": round(ex["wall_s"], 1),
                   "peak_rss_gib": round(ex["peak_rss_gib"], 3), "goal_rss_gib": round(goal, 3),
                   "meets_goal": ex["rc"] == 0 and ex["peak_rss_gib"] <= goal,
                   "input_gib": round(written / 2**30, 3),
                   "largest_tensor_gib": round(largest / 2**30, 3),
                   "output_gib": round(_size(exported) / 2**30, 3)
                   if exported.exists() else None})
      print(json.dumps(rows[-1]), flush=True)
      if exported.is_dir():
        shutil.rmtree(exported)
      else:
        exported.unlink(missing_ok=True)
    if not args.keep:
      shutil.rmtree(out, ignore_errors=True)
  machine = f"{os.cpu_count()} cores, {_mem_gib():.0f} GiB RAM, {platform.machine()}, no GPU"
  result = {"machine": machine, "checkpoint_write_s": round(t_write, 1), "rows": rows}
  Path(args.results).mkdir(parents=True, exist_ok=True)
  path = Path(args.results) / (f"scale_{args.shape}_{'_'.join(args.steps.split(','))}"
                               f"{'_export_' + args.export if args.export else ''}.json")
  path.write_text(json.dumps(result, indent=1) + "\n")
  print(json.dumps(result))
  if not args.keep:
    shutil.rmtree(src, ignore_errors=True)
  return 0 if all(r["rc"] == 0 for r in rows) else 1


def _size(p: Path) -> int:
  return sum(f.stat().st_size for f in p.iterdir()) if p.is_dir() else p.stat().st_size


def _mem_gib() -> float:
  with open("/proc/meminfo") as f:
    for line in f:
      if line.startswith("MemTotal:"):
        return int(line.split()[1]) / 2**20
  return float("nan")


if __name__ == "__main__":
  sys.exit(main())
