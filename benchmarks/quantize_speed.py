"""How fast does jq quantize a Llama-7B-shaped set of weights?  (CPU by default.)

Quantizes ``--layers`` decoder blocks of Llama-7B (per block: q/k/v/o 4096x4096, gate/up
4096x11008, down 11008x4096; bfloat16) to int8 per-channel and int4 with groups of 128, jitted,
and prints the median time of ``--repeats`` runs after a warm-up and the GB/s of float weights
processed.  If qwix is importable (``pip install qwix``, the ``bench`` extra), ``qwix.quantize``
runs on the same arrays in the same run, interleaved with jq, and the table shows jq/qwix.

  python benchmarks/quantize_speed.py --layers 2 --repeats 5
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from jq import metrics
from jq.qtypes import QType
from jq.quantize import quantize
from jq.spec import Granularity, QuantSpec

BLOCK = [("q_proj", (4096, 4096)), ("k_proj", (4096, 4096)), ("v_proj", (4096, 4096)),
         ("o_proj", (4096, 4096)), ("gate_proj", (4096, 11008)), ("up_proj", (4096, 11008)),
         ("down_proj", (11008, 4096))]

CASES = {  # name: (jq spec, qwix kwargs or None)
    "int8 per-channel": (QuantSpec(qtype=QType.INT8),
                         dict(qtype=jnp.int8, channelwise_axes=[1])),
    "int4 sym g128": (QuantSpec(qtype=QType.INT4, granularity=Granularity.GROUP, group_size=128),
                      dict(qtype=jnp.int4, channelwise_axes=[1], tiled_axes={0: 128})),
    "uint4 asym g128 (jq preset)": (QuantSpec(qtype=QType.UINT4, symmetric=False,
                                              granularity=Granularity.GROUP, group_size=128),
                                    None),
}


def make_weights(layers: int, dtype) -> list[jax.Array]:
  key = jax.random.key(0)
  ws = []
  for i in range(layers):
    for j, (_, shape) in enumerate(BLOCK):
      ws.append((jax.random.normal(jax.random.fold_in(key, 10 * i + j), shape, jnp.float32)
                 * 0.02).astype(dtype))
  return jax.block_until_ready(ws)


def timed(fn, ws) -> float:
  t0 = time.perf_counter()
  outs = [fn(w) for w in ws]
  jax.block_until_ready(outs)
  dt = time.perf_counter() - t0
  del outs
  return dt


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--layers", type=int, default=2, help="decoder blocks (0.4 GB of bf16 each)")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--no-qwix", action="store_true", help="skip the qwix comparison")
  args = ap.parse_args(argv)

  qwix = None
  if not args.no_qwix:
    try:
      import qwix  # noqa: F811
    except ImportError:
      print("qwix is not installed (pip install qwix): jq only")

  ws = make_weights(args.layers, jnp.bfloat16)
  gb = sum(w.size * w.dtype.itemsize for w in ws) / 1e9
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.device_count()} device(s)); "
        f"{args.layers} Llama-7B blocks = {len(ws)} bf16 matrices, {gb:.2f} GB; "
        f"median of {args.repeats} runs after warm-up")

  rows = []
  for name, (spec, qw) in CASES.items():
    fns = {"jq": jax.jit(lambda w, spec=spec: quantize(w, spec))}
    if qwix is not None and qw is not None:
      fns["qwix"] = jax.jit(lambda w, qw=qw: qwix.quantize(w, scale_dtype=jnp.float32, **qw))
    # warm-up (compiles each shape) and a quality check on one matrix, so that both do real work
    sq = {}
    for lib, fn in fns.items():
      for w in ws[:len(BLOCK)]:
        jax.block_until_ready(fn(w))
      out = fn(ws[4])
      deq = out.dequantize() if lib == "jq" else qwix.dequantize(out)
      sq[lib] = float(metrics.sqnr(ws[4], deq))
    times = {lib: [] for lib in fns}
    for _ in range(args.repeats):  # interleaved, so both see the same machine load
      for lib, fn in fns.items():
        times[lib].append(timed(fn, ws))
    med = {lib: statistics.median(t) for lib, t in times.items()}
    rows.append((name, med, sq))

  head = f"{'case':<28} {'jq s':>8} {'jq GB/s':>8} {'qwix s':>8} {'qwix GB/s':>9} {'jq/qwix':>8}  SQNR dB (jq / qwix, gate_proj)"
  print(head)
  print("-" * len(head))
  for name, med, sq in rows:
    jq_t = med["jq"]
    qw_t = med.get("qwix")
    speed = f"{qw_t / jq_t:7.2f}x" if qw_t else "       -"  # >1: jq is faster
    print(f"{name:<28} {jq_t:8.3f} {gb / jq_t:8.2f} "
          f"{(f'{qw_t:8.3f}' if qw_t else '       -')} {(f'{gb / qw_t:9.2f}' if qw_t else '        -')} "
          f"{speed}  {sq['jq']:.2f} / {sq.get('qwix', float('nan')):.2f}")
  print("jq/qwix is the speed ratio (qwix time / jq time): above 1 means jq is faster.")


if __name__ == "__main__":
  main()
