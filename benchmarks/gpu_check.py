"""One-call GPU check: kernel correctness on the device, then the matmul and decode benchmarks.

Run from the repository root on the GPU machine (writes everything under ``$OUT``)::

  python benchmarks/gpu_check.py            # <= 8.5 min, each stage time-boxed (100+125+3x70+75 s)

Stages (each in its own subprocess with a hard timeout, so one hang cannot eat the others):

1. ``pytest tests/ops/test_pallas_kernels.py test_pallas_heads.py test_ops_fp8.py
   tests/core/test_kv_cache.py``
   (when pytest is importable, with ``--noconftest`` so hypothesis/strict-promotion setup is not
   needed): on a GPU the interpret-mode tests run the *compiled* kernels on the odd small shapes,
   plus the ``gpu``-marked large-shape tests; the fp8 tests run XLA's native fp8 dot.
   Without pytest, a built-in subset (:func:`builtin_checks`) runs instead.
2. ``benchmarks/matmul.py`` (``--budget-s``: shapes not started in time are skipped): bf16, XLA
   paths (int8, fp8 native), jq kernels (Triton; Mosaic GPU weight-only and W8A8), qwix.
3. ``benchmarks/decode.py`` three times, each row printed with its ratio to the bf16 row of the
   same run and the batch-1 cap (bytes moved): Llama-3.2-1B with a bf16 head; the same with an
   int8 head and an int8 KV cache; Llama-3.1-8B (``mosaic-w4a16-g128``: the Mosaic GPU kernel,
   split-K at batch 1, in the 1B and 8B runs).
4. ``pytest tests/ops/test_mosaic_kernels.py test_mosaic_w8a8.py``: the Mosaic GPU kernels
   (weight-only; W8A8 int8 and fp8) compiled (their own stage
   and junit file, ``pytest_mosaic.xml``, so a slow first compile cannot cost the others).
   ``python benchmarks/gpu_check.py --sweep`` adds ``benchmarks/matmul.py --sweep``: the Triton
   kernels under several launch configs at M=1 (``sweep.json``; run twice on an H100 already).
   ``--moe`` adds ``benchmarks/moe.py`` (60 s): mixture-of-experts dispatch, grouped against
   dense, prefill and decode (``moe.json``; ``moe_dispatch="auto"`` stays dense on GPU until
   this is measured).

Outputs in ``$OUT``: ``gpu_check.log`` (everything), ``pytest.xml`` or ``checks.json``,
``pytest_mosaic.xml``, ``matmul.json``, ``decode.json``, ``decode_int8head_kv8.json``,
``decode_8b.json``, ``sweep.json`` (with ``--sweep``), ``summary.json`` (stage exit codes and
timings, device, versions).  Without a GPU it is a dry run (interpret mode, ``--small``
benchmarks) that checks the script itself.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("OUT") or "/tmp/jq_gpu_check")


def builtin_checks(out: Path) -> int:
  """Kernel-vs-reference checks on GPU shapes, for machines without pytest."""
  sys.path.insert(0, str(ROOT))
  import functools

  import jax
  import jax.numpy as jnp
  import numpy as np

  from jq import spec as S
  from jq.ops import pallas_w8a8, pallas_wo, reference
  from jq.qarray import ActivationQuant
  from jq.quantize import quantize
  from jq.qtypes import QType

  on_gpu = jax.devices()[0].platform == "gpu"
  interpret = not on_gpu  # a CPU dry run of this script checks one small shape in interpret mode
  dn = (((1,), (0,)), ((), ()))
  specs = [S.W8A16, S.QuantSpec(qtype=QType.UINT8, symmetric=False), S.W4A16_G128,
           S.QuantSpec(qtype=QType.INT4, granularity=S.Granularity.GROUP, group_size=32)]
  acts = [ActivationQuant(None, None, S.A8_DYNAMIC),
          ActivationQuant(jnp.float32(0.02), None, S.A8_STATIC)]
  shapes = [(1, 576, 1536), (5, 96, 130), (16, 4096, 1024), (300, 576, 1536), (1024, 4096, 4096)]
  shapes = shapes if on_gpu else [(5, 96, 130)]
  results, failures = [], 0
  rng = np.random.default_rng(0)
  for m, k, n in shapes:
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((k, n)) * 0.05, jnp.float32)
    cases = [(sp.describe(), quantize(w, sp), "wo") for sp in specs]
    cases += [(f"w8 {a.spec.describe()}", dataclasses.replace(quantize(w, S.W8A16), activation=a),
               "int8") for a in acts]
    for name, q, kind in cases:
      row = dict(shape=(m, k, n), case=name)
      try:
        if kind == "wo":
          y = jax.jit(functools.partial(pallas_wo.weight_only_dot_general, dimension_numbers=dn,
                                        interpret=interpret))(x, q)
          yr = jnp.dot(x.astype(jnp.float32), q.dequantize(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
        else:
          y = jax.jit(functools.partial(pallas_w8a8.int8_dot_general, dimension_numbers=dn,
                                        interpret=interpret))(x, q)
          yr = jax.jit(reference.int8_dot_general, static_argnums=2)(x, q, dn)
        y, yr = np.asarray(y, np.float32), np.asarray(yr, np.float32)
        err = float(np.abs(y - yr).max() / max(1e-30, np.abs(yr).max()))
        row.update(max_rel_err=err, ok=bool(err < 2e-2))
      except Exception as e:  # noqa: BLE001
        row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:500]}")
      failures += not row["ok"]
      results.append(row)
      print(row, flush=True)
  (out / "checks.json").write_text(json.dumps(results, indent=1))
  return 1 if failures else 0


def _stage(name: str, cmd: list[str], timeout: float, log) -> dict:
  t0 = time.monotonic()
  log(f"\n===== {name}: {' '.join(cmd)} (timeout {timeout:.0f}s)")
  try:
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout, env=dict(os.environ, OUT=str(OUT)))
    rc, text = proc.returncode, proc.stdout
  except subprocess.TimeoutExpired as e:
    rc, text = "timeout", (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (
        e.stdout or "")
  log(text)   # (no per-stage files: the device tool returns at most 8 files)
  res = dict(stage=name, rc=rc, seconds=round(time.monotonic() - t0, 1))
  log(f"===== {name}: rc={rc} in {res['seconds']}s")
  return res


def main() -> int:
  if len(sys.argv) > 1 and sys.argv[1] == "--builtin-checks":
    return builtin_checks(OUT)
  OUT.mkdir(parents=True, exist_ok=True)
  logf = open(OUT / "gpu_check.log", "w")

  def log(s: str):
    print(s, flush=True)
    logf.write(s + "\n")
    logf.flush()

  py = sys.executable
  summary = dict(started=time.strftime("%Y-%m-%d %H:%M:%S"), stages=[])
  small = []
  try:
    import jax
    dev = jax.devices()[0]
    summary.update(device=dev.device_kind, platform=dev.platform, jax=jax.__version__,
                   python=sys.version.split()[0])
    log(f"device {dev.device_kind} ({dev.platform}), jax {jax.__version__}")
    if dev.platform != "gpu":
      small = ["--small"]
      log("no GPU: a dry run (benchmarks with --small, kernels in interpret mode)")
  except Exception:  # noqa: BLE001
    log(traceback.format_exc())
  if importlib.util.find_spec("pytest") is not None:
    summary["stages"].append(_stage(
        "pytest", [py, "-m", "pytest", "-q", "--noconftest", "-p", "no:cacheprovider", "-rfEs",
                   "--durations=10", f"--junitxml={OUT / 'pytest.xml'}",
                   "tests/ops/test_pallas_kernels.py", "tests/ops/test_pallas_heads.py",
                   "tests/ops/test_ops_fp8.py",
                   "tests/core/test_kv_cache.py"], 100, log))
  else:
    summary["stages"].append(_stage("builtin-checks", [py, __file__, "--builtin-checks"], 120,
                                    log))
  summary["stages"].append(_stage(
      "matmul", [py, "benchmarks/matmul.py", "--out", str(OUT / "matmul.json"), "--budget-s",
                 "95", "--iters", "3" if small else "10"] + small, 125, log))
  decode = [py, "benchmarks/decode.py", "--steps", "4" if small else "64", "--iters",
            "2" if small else "3"] + small
  summary["stages"].append(_stage(
      "decode", decode + ["--out", str(OUT / "decode.json"), "--budget-s", "50", "--variants",
                          "bf16", "w8a16", "w4a16-g128", "xla-w8a16", "xla-w4a16-g128",
                          "xla-w8a8", "fp8", "jq-auto-w4a16-g128", "mosaic-w4a16-g128"],
      70, log))
  summary["stages"].append(_stage(
      "decode-int8-head-kv8", decode + [
          "--out", str(OUT / "decode_int8head_kv8.json"), "--budget-s", "50", "--head", "int8",
          "--kv-cache", "int8", "--variants", "bf16", "w8a16", "jq-auto-w4a16-g128", "fp8"],
      70, log))
  summary["stages"].append(_stage(
      "decode-8b", decode + ["--out", str(OUT / "decode_8b.json"), "--budget-s", "50",
                             "--shape", "8b", "--batches", "1", "16", "--variants", "bf16",
                             "w8a16", "jq-auto-w4a16-g128", "mosaic-w4a16-g128"], 70, log))
  if importlib.util.find_spec("pytest") is not None:
    summary["stages"].append(_stage(
        "pytest-mosaic", [py, "-m", "pytest", "-q", "--noconftest", "-p", "no:cacheprovider",
                          "-rfEs", "--durations=10", f"--junitxml={OUT / 'pytest_mosaic.xml'}",
                          "tests/ops/test_mosaic_kernels.py", "tests/ops/test_mosaic_w8a8.py"], 75,
        log))
  if "--sweep" in sys.argv[1:]:
    summary["stages"].append(_stage(
        "sweep", [py, "benchmarks/matmul.py", "--sweep", "--out", str(OUT / "sweep.json"),
                  "--budget-s", "35", "--iters", "3" if small else "7", "--m", "1"] + small,
        50, log))
  if "--moe" in sys.argv[1:]:
    summary["stages"].append(_stage(
        "moe", [py, "benchmarks/moe.py", "--out", str(OUT / "moe"), "--repeat", "3"] +
        small, 60, log))
  (OUT / "summary.json").write_text(json.dumps(summary, indent=1))
  log(json.dumps(summary, indent=1))
  return 0 if all(s["rc"] == 0 for s in summary["stages"]) else 1


if __name__ == "__main__":
  sys.exit(main())
