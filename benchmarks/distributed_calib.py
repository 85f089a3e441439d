"""GPTQ calibration of a small decoder in one process and in two ``jax.distributed`` processes.

Model: a random linen ``jq_models.decoder.Decoder`` (hidden 512, 4 blocks, intermediate 1536,
8 heads, vocabulary 4096); calibration: 64 sequences of 256 tokens in 8 batches of 8;
``gptq-w4a16-g128``, sequential (block by block).  Every process is asked to use one CPU thread
(``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``), but JAX
0.10's CPU runtime does not keep to it: one process still ran about 1.6 cores (its CPU time over
its wall time) on this 2-core machine, and pinned to one core (``os.sched_setaffinity``) it hung
during calibration, so the processes are not pinned and one process is not a one-core baseline.
The run with two processes gives each one half of the batches
(``jq.distributed.process_batches``) and sums the statistics across them.

Per run it prints the wall time of ``quantize_model`` split into the statistics collection
(``collect``: the model's forwards with the statistics, and the cross-process sum), the GPTQ
solves (each kernel solved in one process, the costliest first to the least loaded; the results
are shared) and the rest (the chained block forwards that carry each block's input, sharing the
solved kernels, tracing), the speed-up of each, the peak RSS of every process (``VmHWM`` of
``/proc/self/status``), the CPU time of the collection in each process (less sensitive than wall
time to other work on the machine; the 1-minute load average is printed too), the part of it
spent compiling (XLA compiles the same programs in every process: that part does not shrink),
and whether the
two runs give the same quantized tree (SHA-256 of every code and scale).  The last line is JSON.

Usage:
  python benchmarks/distributed_calib.py            # both runs
  python benchmarks/distributed_calib.py --small    # a quick check (hidden 128, 2 blocks)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import time

ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def _peak_rss_mib() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024.0
  return float("nan")


def worker(a) -> None:
  """One process: quantize, print one JSON line of timings."""
  import jq
  import jq.distributed
  if a.num_processes > 1:
    jq.distributed.initialize(f"localhost:{a.port}", a.num_processes, a.process_id,
                              timeout_s=1800)
  import jax
  import jax.numpy as jnp
  import numpy as np
  import jq.ptq  # noqa: F401  (jq.ptq.quantize_model is also the name of the function)
  qm = sys.modules["jq.ptq.quantize_model"]
  from jq_models.decoder import Decoder, DecoderConfig
  small = a.small
  cfg = DecoderConfig(vocab_size=4096, hidden_size=128 if small else 512,
                      intermediate_size=384 if small else 1536, num_layers=2 if small else 4,
                      num_heads=8, num_kv_heads=8, head_dim=16 if small else 64, max_seq_len=256)
  model = Decoder(cfg)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  seqs, length, per = (16, 64, 4) if small else (64, 256, 8)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (seqs, length)).astype(np.int32)
  batches = [tokens[i:i + per] for i in range(0, seqs, per)]
  if a.num_processes > 1:
    batches = jq.distributed.process_batches(batches)
  spent = {"collect": 0.0, "solve": 0.0, "collect_cpu": 0.0, "solve_cpu": 0.0, "compile": 0.0,
           "collect_compile": 0.0}
  inside = {"collect": False}

  def on_event(event: str, secs: float, **_) -> None:
    if event.endswith("/backend_compile_duration"):   # XLA compilation (same in every process)
      spent["compile"] += secs
      if inside["collect"]:
        spent["collect_compile"] += secs

  jax.monitoring.register_event_duration_secs_listener(on_event)

  def timed(fn, key):
    def wrapped(*args, **kwargs):
      t, c = time.perf_counter(), time.process_time()
      inside[key] = True
      try:
        return fn(*args, **kwargs)
      finally:
        inside[key] = False
        spent[key] += time.perf_counter() - t
        spent[key + "_cpu"] += time.process_time() - c
    return wrapped

  qm.collect, qm.solve = timed(qm.collect, "collect"), timed(qm.solve, "solve")
  t, c = time.perf_counter(), time.process_time()
  res = qm.quantize_model(model, variables, jq.recipe_rules("gptq-w4a16-g128"), batches)
  total, total_cpu = time.perf_counter() - t, time.process_time() - c
  h = hashlib.sha256()
  for path, q in jq.tree.leaves_with_paths(res.variables):
    if isinstance(q, jq.QArray):
      h.update(path.encode())
      h.update(np.asarray(q.values).tobytes())
      h.update(np.asarray(q.scale).tobytes())
  print("RESULT " + json.dumps({
      "process": a.process_id, "batches": len(batches), "total_s": round(total, 3),
      "collect_s": round(spent["collect"], 3), "solve_s": round(spent["solve"], 3),
      "other_s": round(total - spent["collect"] - spent["solve"], 3),
      "cpu_s": round(total_cpu, 3), "collect_cpu_s": round(spent["collect_cpu"], 3),
      "solve_cpu_s": round(spent["solve_cpu"], 3), "compile_s": round(spent["compile"], 3),
      "collect_compile_s": round(spent["collect_compile"], 3),
      "peak_rss_mib": round(_peak_rss_mib(), 1), "tree_sha256": h.hexdigest()[:16]}), flush=True)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run(n: int, small: bool) -> tuple[float, list[dict]]:
  env = dict(os.environ, XLA_FLAGS=ONE_THREAD, JAX_PLATFORMS="cpu")
  port = str(_free_port())
  t = time.perf_counter()
  procs = [subprocess.Popen([sys.executable, __file__, "--worker", "--process-id", str(i),
                             "--num-processes", str(n), "--port", port] +
                            (["--small"] if small else []),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(n)]
  outs = [p.communicate() for p in procs]
  wall = time.perf_counter() - t
  got = []
  for p, (out, err) in zip(procs, outs):
    lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
    if p.returncode or not lines:
      raise SystemExit(f"worker failed ({p.returncode}):\n{out}\n{err[-4000:]}")
    got.append(json.loads(lines[-1][len("RESULT "):]))
  return wall, got


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--small", action="store_true")
  ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
  ap.add_argument("--num-processes", type=int, default=1, help=argparse.SUPPRESS)
  ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
  a = ap.parse_args(argv)
  if a.worker:
    worker(a)
    return {}
  runs = {}
  for n in (1, 2):
    load = os.getloadavg()[0]
    wall, procs = _run(n, a.small)
    runs[n] = {"wall_s": round(wall, 3), "processes": procs,
               "load_avg_1min": [round(load, 2), round(os.getloadavg()[0], 2)]}
    worst = max(procs, key=lambda r: r["total_s"])
    print(f"{n} process{'es' if n > 1 else ''}: quantize_model {worst['total_s']:.2f} s "
          f"(collect {max(r['collect_s'] for r in procs):.2f} s, GPTQ solves "
          f"{max(r['solve_s'] for r in procs):.2f} s, other {max(r['other_s'] for r in procs):.2f}"
          f" s); collect CPU time {', '.join(str(r['collect_cpu_s']) + ' s' for r in procs)} "
          f"(of which XLA compiling {', '.join(str(r['collect_compile_s']) + ' s' for r in procs)})"
          "; "
          f"peak RSS {', '.join(str(r['peak_rss_mib']) + ' MiB' for r in procs)}; wall with "
          f"start-up {wall:.2f} s; load average {runs[n]['load_avg_1min']} on {os.cpu_count()} "
          "CPUs", flush=True)
  one, two = runs[1]["processes"], runs[2]["processes"]
  speed = {
      "collect": round(one[0]["collect_s"] / max(r["collect_s"] for r in two), 3),
      "solve": round(one[0]["solve_s"] / max(r["solve_s"] for r in two), 3),
      "collect_and_solve": round((one[0]["collect_s"] + one[0]["solve_s"]) /
                                 max(r["collect_s"] + r["solve_s"] for r in two), 3),
      "collect_cpu_per_process": round(one[0]["collect_cpu_s"] /
                                       max(r["collect_cpu_s"] for r in two), 3),
      "collect_without_compiling": round(
          (one[0]["collect_s"] - one[0]["collect_compile_s"]) /
          max(r["collect_s"] - r["collect_compile_s"] for r in two), 3),
      "quantize_model": round(one[0]["total_s"] / max(r["total_s"] for r in two), 3),
  }
  same = len({r["tree_sha256"] for r in one + two}) == 1
  print(f"speed-up with 2 processes: collect x{speed['collect']} (without XLA compiling "
        f"x{speed['collect_without_compiling']}; CPU time per process "
        f"x{speed['collect_cpu_per_process']}), GPTQ solves x{speed['solve']}, collect + solves "
        f"x{speed['collect_and_solve']}, quantize_model x{speed['quantize_model']}; "
        f"identical quantized trees: {same}")
  summary = {"benchmark": "distributed_calib", "small": a.small, "one_process": runs[1],
             "two_processes": runs[2], "speedup": speed, "identical_trees": same}
  print(json.dumps(summary))
  return summary


if __name__ == "__main__":
  main()
