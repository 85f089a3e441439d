"""Quantized matmul speed against bf16, measured in the same run.

For each ``K × N`` weight and each ``M``: bf16 XLA, the XLA reference (dequant) paths, each jq
Pallas kernel and qwix (when importable).  Timing: median over ``--iters`` calls of one jitted
function that runs the op on ``--copies`` different (x, W) copies, divided by the copy count; the
copies are rotated so no weight is still in L2 when it is read again (8 × ≥ 29 MB > 50 MB L2), and
each copy has its own ``x`` so XLA cannot merge the dots.  Reported per op: time, ratio to bf16,
effective bandwidth (weights + scales + x + y bytes / time) and its fraction of the device's copy
bandwidth, which the script measures itself (``y = x + 1`` on 1 GiB: read + write).

Usage::

  python benchmarks/matmul.py --out matmul.json          # GPU: the full table
  python benchmarks/matmul.py --small                    # CPU smoke run (< 1 min, interpret mode)
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jq import spec as S  # noqa: E402
from jq import _compat  # noqa: E402
from jq.ops import mosaic_w8a8 as mosaic_w8a8_  # noqa: E402
from jq.ops import mosaic_wo as mosaic_wo_  # noqa: E402
from jq.ops import pallas_w8a8, pallas_wo, reference  # noqa: E402
from jq.qarray import ActivationQuant  # noqa: E402
from jq.quantize import quantize  # noqa: E402

FULL_KN = [(4096, 14336), (8192, 8192), (14336, 4096)]
FULL_M = [1, 16, 64, 256, 4096]
SMALL_KN = [(256, 384)]
SMALL_M = [1, 32]


def _dn(x):
  return (((x.ndim - 1,), (0,)), ((), ()))


def _nbytes(tree) -> int:
  return int(sum(np.prod(a.shape) * np.dtype(a.dtype).itemsize
                 for a in jax.tree_util.tree_leaves(tree)))


def time_fn(fn: Callable, args, iters: int) -> float:
  """Median wall time (s) of ``fn(*args)`` over ``iters`` calls, after one warm-up call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def copy_bandwidth(nbytes: int, iters: int) -> float:
  """Device copy bandwidth in bytes/s: ``x + 1`` over ``nbytes`` of bf16 (read + write)."""
  x = jnp.zeros((nbytes // 2,), jnp.bfloat16)
  t = time_fn(jax.jit(lambda a: a + jnp.bfloat16(1)), (x,), iters)
  return 2 * nbytes / t


@dataclasses.dataclass
class Method:
  """One way to compute ``x @ W``: ``prep(W) -> w`` once per copy, ``run(x, w) -> y``."""
  name: str
  prep: Callable
  run: Callable


def _qwix_methods() -> list[Method]:
  try:  # optional: qwix's core quantize / dot_general (private module paths may move)
    qa = importlib.import_module("qwix._src.core.qarray")
    qd = importlib.import_module("qwix._src.core.dot_general")
  except Exception:  # noqa: BLE001 - any import problem means "not available"
    return []

  def run(x, w):
    return qd.dot_general(x, w, _dn(x), preferred_element_type=x.dtype)

  return [
      Method("qwix-w8a16", lambda w: qa.quantize_api(w, jnp.int8, channelwise_axes=(1,)), run),
      Method("qwix-w4a16-g128", lambda w: qa.quantize_api(
          w, jnp.int4, channelwise_axes=(1,), tiled_axes={0: 128}), run),
  ]


def methods(interpret: bool) -> list[Method]:
  """The table's rows: XLA baselines, XLA reference paths, jq kernels, qwix."""
  q8 = jax.jit(functools.partial(quantize, spec=S.W8A16))
  q4 = jax.jit(functools.partial(quantize, spec=S.W4A16_G128))

  qf8 = jax.jit(functools.partial(quantize, spec=S.FP8_CHANNEL))

  def q8a8(w):
    return dataclasses.replace(q8(w), activation=ActivationQuant(None, None, S.A8_DYNAMIC))

  def qf8a8(w):   # fp8 e4m3 weights per channel, fp8 activations per token at run time
    return dataclasses.replace(qf8(w), activation=ActivationQuant(None, None, S.A_FP8_DYNAMIC))

  def ref_fp8(x, w):   # XLA's native fp8 dot on GPUs that have one, the exact emulation elsewhere
    return reference.fp8_dot_general(x, w, _dn(x))

  def ref_wo(x, w):
    return reference.weight_only_dot_general(x, w, _dn(x))

  def ref_int8(x, w):
    return reference.int8_dot_general(x, w, _dn(x))

  def jq_wo(x, w):
    return pallas_wo.weight_only_dot_general(x, w, _dn(x), interpret=interpret)

  def mosaic_wo(x, w):  # the Hopper (TMA + wgmma) kernel: split-K decode, prefill tiles
    return mosaic_wo_.weight_only_dot_general(x, w, _dn(x), interpret=interpret)

  def mosaic_w8a8(x, w):  # the Hopper kernel: int8 x int8 -> int32 / fp8 x fp8 -> float32 wgmma
    return mosaic_w8a8_.w8a8_dot_general(x, w, _dn(x), interpret=interpret)

  def jq_int8(x, w):
    return pallas_w8a8.int8_dot_general(x, w, _dn(x), interpret=interpret)

  def xla_dequant(x, w):  # the naive path: materialize bf16 weights, then a bf16 dot
    return jnp.dot(x, w.dequantize(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)

  return [
      Method("bf16", lambda w: w.astype(jnp.bfloat16),
             lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)),
      Method("xla-dequant-w4a16-g128", q4, xla_dequant),
      Method("xla-ref-w8a16", q8, ref_wo),
      Method("xla-ref-w4a16-g128", q4, ref_wo),
      Method("xla-ref-w8a8", q8a8, ref_int8),
      Method("xla-fp8-w8a8", qf8a8, ref_fp8),
      Method("xla-ref-fp8-w8a16", qf8, ref_wo),
      Method("jq-w8a16", q8, jq_wo),
      Method("jq-w4a16-g128", q4, jq_wo),
      Method("jq-w8a8", q8a8, jq_int8),
      Method("mosaic-w8a16", q8, mosaic_wo),
      Method("mosaic-w4a16-g128", q4, mosaic_wo),
      Method("mosaic-w8a8", q8a8, mosaic_w8a8),
      Method("mosaic-fp8-w8a8", qf8a8, mosaic_w8a8),
  ] + _qwix_methods()


def bench(kn_list, m_list, *, copies: int, iters: int, interpret: bool, only: set[str] | None,
          copy_bw: float, deadline: float = float("inf"), log=print,
          on_rows: Callable[[list[dict]], None] = lambda rows: None) -> list[dict]:
  """Runs every method on every shape; returns one row per (K, N, M, method).

  Shapes not started before ``deadline`` (a ``time.monotonic()`` value) are skipped (and logged);
  ``on_rows`` sees the rows so far after each (K, N), so a partial run still leaves results.
  """
  rows = []
  meths = [m for m in methods(interpret) if only is None or m.name in only or m.name == "bf16"]
  for k, n in kn_list:
    if time.monotonic() > deadline:
      log(f"# time budget spent: skipping K={k} N={n}")
      continue
    keys = jax.random.split(jax.random.key(0), copies)
    ws_f = [jax.random.normal(kk, (k, n), jnp.bfloat16) * jnp.bfloat16(0.02) for kk in keys]
    prepared = {}
    for meth in meths:
      try:
        prepared[meth.name] = [jax.block_until_ready(meth.prep(w)) for w in ws_f]
      except Exception as e:  # noqa: BLE001 - report, keep going
        prepared[meth.name] = e
    del ws_f
    for m in m_list:
      if time.monotonic() > deadline:
        log(f"# time budget spent: skipping K={k} N={n} M={m}")
        continue
      xkeys = jax.random.split(jax.random.key(1), copies)
      xs = [jax.random.normal(kk, (m, k), jnp.bfloat16) for kk in xkeys]
      base_t, base_y = None, None
      for meth in meths:
        row = dict(K=k, N=n, M=m, method=meth.name)
        ws = prepared[meth.name]
        try:
          if isinstance(ws, Exception):
            raise ws
          run_all = jax.jit(lambda xs_, ws_, f=meth.run: [f(a, b) for a, b in zip(xs_, ws_)])
          t = time_fn(run_all, (xs, ws), iters) / copies
          y0 = jax.jit(meth.run)(xs[0], ws[0])
          nbytes = _nbytes(ws[0]) + _nbytes(xs[0]) + _nbytes(y0)
          if meth.name == "bf16":
            base_t, base_y = t, np.asarray(y0, np.float32)
          rel = None
          if base_y is not None:
            yf = np.asarray(y0, np.float32)
            rel = float(np.linalg.norm(yf - base_y) / max(np.linalg.norm(base_y), 1e-30))
          row.update(time_us=t * 1e6, ratio_to_bf16=(t / base_t) if base_t else None,
                     bytes=nbytes, GBps=nbytes / t / 1e9, frac_copy_bw=nbytes / t / copy_bw,
                     rel_err_vs_bf16=rel)
        except Exception as e:  # noqa: BLE001 - one broken op must not hide the others
          row.update(error=f"{type(e).__name__}: {str(e)[:300]}")
        rows.append(row)
        log(_fmt_row(row))
    del prepared
    on_rows(rows)
  return rows


# Launch configurations tried by --sweep (decode shapes):
# (block_n, block_k, split_k, num_warps, num_stages); split_k None = the shape-based default.
SWEEP = {
    # around the winners of the first H100 sweep (benchmarks/results/gpu_h100/run1_sweep.json):
    # w8a16 block_n=128/block_k=128, w4a16 block_n=128/block_k=64; the first entry repeats the
    # default as a noise estimate
    "jq-w8a16": [(128, 128, None, 4, 4), (128, 128, None, 4, 4), (128, 128, None, 4, 3),
                 (128, 64, None, 4, 4), (256, 128, None, 4, 4), (256, 64, None, 8, 4),
                 (128, 128, None, 8, 4), (128, 256, None, 4, 3), (128, 128, 2, 4, 4),
                 (64, 128, None, 4, 4)],
    "jq-w4a16-g128": [(128, 64, None, 4, 4), (128, 64, None, 4, 4), (128, 64, None, 4, 3),
                      (256, 64, None, 4, 4), (128, 32, None, 4, 4), (256, 64, None, 8, 4),
                      (128, 64, 1, 4, 4), (128, 64, 6, 4, 4), (64, 64, None, 4, 4),
                      (256, 128, None, 8, 3)],
    "jq-w8a8": [(64, 256, None, 4, 4), (128, 128, None, 4, 4), (128, 256, None, 4, 3),
                (256, 128, None, 8, 3)],
}


def sweep(kn_list, m_list, *, copies: int, iters: int, interpret: bool, copy_bw: float,
          deadline: float, log=print) -> list[dict]:
  """Times each kernel under each :data:`SWEEP` launch configuration (for tuning defaults)."""
  rows = []
  by_name = {m.name: m for m in methods(interpret)}
  for k, n in kn_list:
    keys = jax.random.split(jax.random.key(0), copies)
    ws_f = [jax.random.normal(kk, (k, n), jnp.bfloat16) * jnp.bfloat16(0.02) for kk in keys]
    for name, configs in SWEEP.items():
      meth = by_name[name]
      ws = [jax.block_until_ready(meth.prep(w)) for w in ws_f]
      for m in m_list:
        xs = [jax.random.normal(kk, (m, k), jnp.bfloat16)
              for kk in jax.random.split(jax.random.key(1), copies)]
        for bn, bk, split, warps, stages in configs:
          if time.monotonic() > deadline:
            break
          cfg = dict(block_n=bn, block_k=bk, split_k=split, num_warps=warps, num_stages=stages)
          row = dict(K=k, N=n, M=m, method=name, config=cfg)
          fn = pallas_w8a8.int8_dot_general if name == "jq-w8a8" else \
              pallas_wo.weight_only_dot_general
          try:
            run_all = jax.jit(lambda xs_, ws_: [fn(a, b, _dn(a), interpret=interpret, **cfg)
                                                for a, b in zip(xs_, ws_)])
            t = time_fn(run_all, (xs, ws), iters) / copies
            nbytes = _nbytes(ws[0]) + _nbytes(xs[0]) + m * n * 2
            row.update(time_us=t * 1e6, GBps=nbytes / t / 1e9, frac_copy_bw=nbytes / t / copy_bw)
          except Exception as e:  # noqa: BLE001
            row.update(error=f"{type(e).__name__}: {str(e)[:200]}")
          rows.append(row)
          log(f"{k:>6} {n:>6} {m:>5}  {name:<16} {cfg}  " + (
              f"{row['time_us']:.1f} us  {row['frac_copy_bw']:.0%} of copy bw"
              if "time_us" in row else row["error"]))
  return rows


def _fmt_row(r: dict) -> str:
  head = f"{r['K']:>6} {r['N']:>6} {r['M']:>5}  {r['method']:<24}"
  if "error" in r:
    return head + "  ERROR " + r["error"]
  ratio = f"{r['ratio_to_bf16']:.2f}x" if r.get("ratio_to_bf16") else "-"
  frac = f"{r['frac_copy_bw']:.0%}" if r.get("frac_copy_bw") is not None else "-"
  rel = f"{r['rel_err_vs_bf16']:.1e}" if r.get("rel_err_vs_bf16") is not None else "-"
  return (head + f"  {r['time_us']:>10.1f} us  {ratio:>7}  {r['GBps']:>8.1f} GB/s  {frac:>5}"
          f"  err {rel}")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--small", action="store_true", help="tiny shapes, CPU smoke run")
  p.add_argument("--out", type=Path, help="write the results as JSON here")
  p.add_argument("--iters", type=int, default=None, help="timed calls per op (default 20)")
  p.add_argument("--copies", type=int, default=None, help="(x, W) copies rotated (default 8)")
  p.add_argument("--only", nargs="*", help="method names to run (bf16 always runs)")
  p.add_argument("--m", type=int, nargs="*", help="override the M list")
  p.add_argument("--budget-s", type=float, default=float("inf"),
                 help="start no new shape after this many seconds (partial results are kept)")
  p.add_argument("--sweep", action="store_true",
                 help="instead of the table, time the jq kernels under several launch configs")
  args = p.parse_args(argv)
  start = time.monotonic()
  interpret = _compat.default_interpret()
  kn, ms = (SMALL_KN, SMALL_M) if args.small else (FULL_KN, FULL_M)
  ms = args.m or ms
  iters = args.iters or (3 if args.small else 20)
  copies = args.copies or (2 if args.small else 8)
  dev = jax.devices()[0]
  bw = copy_bandwidth((64 << 20) if args.small else (1 << 30), max(3, iters // 2))
  print(f"device {dev.device_kind} ({dev.platform}), jax {jax.__version__}, "
        f"copy bandwidth {bw / 1e9:.1f} GB/s, interpret={interpret}, copies={copies}, "
        f"iters={iters}")
  print(f"{'K':>6} {'N':>6} {'M':>5}  {'method':<24}  {'time':>13}  {'vs bf16':>7}  "
        f"{'bandwidth':>13}  {'%copy':>5}", flush=True)
  meta = dict(device=dev.device_kind, platform=dev.platform, jax_version=jax.__version__,
              jaxlib_version=importlib.import_module("jaxlib").__version__,
              python=platform.python_version(), copy_bandwidth_GBps=bw / 1e9,
              interpret=interpret, copies=copies, iters=iters)

  def save(rows):
    if args.out:
      args.out.parent.mkdir(parents=True, exist_ok=True)
      args.out.write_text(json.dumps(dict(meta, rows=rows), indent=1))

  if args.sweep:
    rows = sweep(SMALL_KN if args.small else [(4096, 14336), (14336, 4096)], args.m or [1],
                 copies=copies, iters=iters, interpret=interpret, copy_bw=bw,
                 deadline=start + args.budget_s, log=lambda line: print(line, flush=True))
    save(rows)
    return 1 if any("error" in r for r in rows) else 0
  rows = bench(kn, ms, copies=copies, iters=iters, interpret=interpret,
               only=set(args.only) if args.only else None, copy_bw=bw,
               deadline=start + args.budget_s, log=lambda line: print(line, flush=True),
               on_rows=save)
  save(rows)
  if args.out:
    print(f"wrote {args.out}")
  return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
  sys.exit(main())
