"""Calibration on a device mesh and over several ``jax.distributed`` processes gives the quantized
tree of one device in one process (``PTQConfig.mesh``, ``jq.distributed``).

Each check runs ``calib_worker.py`` in subprocesses: the virtual CPU devices
(``--xla_force_host_platform_device_count``) and ``jax.distributed`` must be set up before JAX
starts.  Model: a tiny 2-block linen decoder (``jq_models.decoder``), recipes ``gptq-w4a16-g32``
and ``w8a8-static``; plus ``jq.calibrate.collect`` of a scanned stack (vmapped callbacks).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("calib_worker.py")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import spawn  # noqa: E402  pylint: disable=wrong-import-position
RECIPES = ("gptq-w4a16-g32", "w8a8-static")


def _worker(out: Path, *args: str) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, str(WORKER), str(out), *args], cwd=spawn.ROOT,
                          env=spawn.env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _processes(out: Path, n: int = 2, bad: dict[int, str] | None = None, extra=()) -> list:
  port = str(spawn.free_port())
  return [_worker(out, "--process-id", str(i), "--num-processes", str(n), "--port", port,
                  *(["--bad", bad[i]] if bad and i in bad else []), *extra) for i in range(n)]


def compare(a, b) -> dict[str, float]:
  """Worst differences between two dumped quantized trees (``calib_worker.dump``) over all
  kernels: fraction of integer codes that differ, the largest code difference, the largest
  ``|Δ dequantized| / scale`` (in quantization steps), the largest relative difference of the
  weight scales and of the static activation scales."""
  worst = dict(codes_differ=0.0, max_code_diff=0, max_dequant_steps=0.0, scale_rel=0.0,
               act_scale_rel=0.0)
  assert sorted(a.files) == sorted(b.files)
  for k in a.files:
    if not k.endswith(".codes"):
      continue
    p = k[:-len(".codes")]
    qa, qb = a[k].astype(np.int64), b[k].astype(np.int64)
    sa, sb = a[p + ".scale"].astype(np.float64), b[p + ".scale"].astype(np.float64)
    worst["codes_differ"] = max(worst["codes_differ"], float(np.mean(qa != qb)))
    worst["max_code_diff"] = max(worst["max_code_diff"], int(np.max(np.abs(qa - qb))))
    worst["scale_rel"] = max(worst["scale_rel"], float(np.max(np.abs(sa - sb) / np.abs(sa))))
    # dequantized difference in steps of the kernel's smallest scale
    dq = np.abs(a[p + ".dequantized"].astype(np.float64) - b[p + ".dequantized"])
    worst["max_dequant_steps"] = max(worst["max_dequant_steps"], float(dq.max() / np.abs(sa).min()))
    if p + ".act_scale" in a.files:
      x, y = a[p + ".act_scale"].astype(np.float64), b[p + ".act_scale"].astype(np.float64)
      worst["act_scale_rel"] = max(worst["act_scale_rel"], float(np.max(np.abs(x - y) / x)))
  return worst


def _same(a, b) -> list[str]:
  return [k for k in a.files if not np.array_equal(a[k], b[k])]


def test_mesh_of_8_cpu_devices_matches_one_device(tmp_path):
  """Data-parallel calibration over 8 virtual CPU devices: the collected statistics are reduced
  once per model call (not once per device), static W8A8 is the same up to last-bit activation
  differences, GPTQ up to a few codes off by one; an indivisible batch is a clear ValueError."""
  [(rc, log)] = spawn.wait([_worker(tmp_path, "--devices", "8")], 420)
  assert rc == 0, log
  one, eight = np.load(tmp_path / "collect.single.npz"), np.load(tmp_path / "collect.mesh.npz")
  for k in one.files:
    if k.endswith((".count", ".nonfinite", ".lo", ".hi", ".absmax", ".samples")):
      np.testing.assert_array_equal(eight[k], one[k], err_msg=k)   # counted once, exact
    else:   # XᵀX, Σ|x|: float32 sums in another order (measured: 1e-7 of the largest entry)
      err = float(np.max(np.abs(eight[k] - one[k])) / np.max(np.abs(one[k])))
      assert err <= 1e-6, (k, err)
  static = compare(np.load(tmp_path / "w8a8-static.single.npz"),
                   np.load(tmp_path / "w8a8-static.mesh.npz"))
  assert static["codes_differ"] == 0 and static["scale_rel"] == 0, static   # RTN weights: exact
  assert static["act_scale_rel"] <= 1e-5, static
  gptq = compare(np.load(tmp_path / "gptq-w4a16-g32.single.npz"),
                 np.load(tmp_path / "gptq-w4a16-g32.mesh.npz"))
  assert gptq["codes_differ"] <= 0.01 and gptq["max_code_diff"] <= 1, gptq
  assert gptq["scale_rel"] <= 1e-5 and gptq["max_dequant_steps"] <= 1.01, gptq
  print("mesh vs one device:", {"w8a8-static": static, "gptq": gptq})
  # the mesh's devices share the GPTQ solves (one thread each); a solve on another device, and
  # a kernel solved in column blocks on three devices and joined, give the default device's bits
  log = (tmp_path / "gptq-w4a16-g32.mesh.log").read_text()
  assert "GPTQ/AWQ solves spread over 8 devices of the mesh" in log, log
  assert "solved in column blocks" in log, log
  assert (tmp_path / "solve_on.txt").read_text() == ""
  # the caller's parameters split over the mesh (kernels along their output axis) stay split:
  # the same result as replicated ones, and each quantized kernel split like its float kernel
  specs = json.loads((tmp_path / "split.json").read_text())
  for recipe, ref in (("gptq-w4a16-g32", "gptq-w4a16-g32.mesh.npz"),
                      ("smoothquant-w8a8", "smoothquant-w8a8.single.npz")):
    got = compare(np.load(tmp_path / ref), np.load(tmp_path / f"{recipe}.split.npz"))
    # (SmoothQuant against one device: its smoothing scales from float32 sums in another order
    # move a few codes by one step, in a kernel column whose scale exceeds the kernel's smallest)
    assert got["codes_differ"] <= 0.01 and got["max_code_diff"] <= 1, (recipe, got)
    assert got["scale_rel"] <= 1e-5 and got["max_dequant_steps"] <= 2, (recipe, got)
    log = (tmp_path / f"{recipe}.split.log").read_text()
    assert "split over the mesh's devices as given: kept split" in log, log
    split = [p for p, (_, float_spec) in specs[recipe].items() if "data" in float_spec]
    assert split and all("'data'" in specs[recipe][p][0] for p in split), specs[recipe]
  rtn = specs["w4a16-g32 in memory"]    # jq.stream.quantize_in_memory keeps them split too
  split = [q for q, f in rtn.values() if "data" in f]
  assert split and all("'data'" in q for q in split), rtn
  # every GPTQ Hessian factored split over the 8 devices (PTQConfig.split_factor_from): the
  # mesh's codes within the same bounds, and each device holds an eighth of the factor
  got = compare(np.load(tmp_path / "gptq-w4a16-g32.single.npz"),
                np.load(tmp_path / "gptq-w4a16-g32.factored.npz"))
  assert got["codes_differ"] <= 0.01 and got["max_code_diff"] <= 1, got
  assert got["scale_rel"] <= 1e-5 and got["max_dequant_steps"] <= 1.01, got
  log = (tmp_path / "gptq-w4a16-g32.factored.log").read_text()
  assert "GPTQ Hessians factored split over the mesh's devices (K >= 64" in log, log
  assert "params/layers_0/mlp/down_proj/kernel" in log, log
  factor = json.loads((tmp_path / "factor.json").read_text())
  assert factor["shard"] == [64, 512] and not factor["failed"], factor
  assert factor["u_err"] <= 1e-5, factor
  # per device against the dense road's largest stage (3 K x K): measured 3.9x less at K = 512
  assert factor["split_bytes"] * 3 <= factor["dense_bytes"], factor
  print("split factorisation vs one device:", got, factor)
  msg = (tmp_path / "indivisible.txt").read_text()
  assert "calibration batch 1" in msg and "(6, 32)" in msg and "8 devices" in msg, msg


def test_two_processes_match_one_process(tmp_path):
  """Two jax.distributed processes, each with half of the batches (p::2), write the same bits;
  and the same bits as one process with all batches (the float64 host sums of per-batch float32
  statistics are rounded once to float32).  The GPTQ and AWQ solves are split between the two
  (each kernel solved in one process, the results shared)."""
  ref = tmp_path / "ref"
  ref.mkdir()
  recipes = RECIPES + ("awq-w4a16-g32",)
  extra = ("--recipes", ",".join(recipes))
  procs = _processes(tmp_path, extra=extra) + [_worker(ref, *extra)]
  results = spawn.wait(procs, 240)
  for rc, log in results:
    assert rc == 0, log
  for name in ("collect",) + recipes:
    p0, p1 = np.load(tmp_path / f"{name}.p0.npz"), np.load(tmp_path / f"{name}.p1.npz")
    assert not _same(p0, p1), name                        # every process: the same tree
    single = np.load(ref / f"{name}.single.npz")
    assert not _same(p0, single), (name, _same(p0, single))
  # AWQ: 2 blocks x 7 kernels, 4 + 3 each; GPTQ: q+k+v and gate+up fused, 2 x 4 solves, 2 + 2
  for recipe, split in (("gptq-w4a16-g32", "4, process 1 ran 4"),
                        ("awq-w4a16-g32", "8, process 1 ran 6")):
    for p in (0, 1):
      log = (tmp_path / f"{recipe}.p{p}.log").read_text()
      assert f"solves split over 2 processes: process 0 ran {split}" in log, log
  assert "solves split" not in (tmp_path / "w8a8-static.p0.log").read_text()


def test_a_mesh_over_two_processes_matches_one_process(tmp_path):
  """One mesh of both processes' devices (2 x 2 CPU devices): each global batch joins the two
  processes' rows, XLA all-reduces the statistics across the processes (gloo), process 0's host
  sums reach the other; the same tree in both, and one process's tree up to float32 sums in
  another order (GPTQ and AWQ codes identical here; the token sample is the same rows).  A mesh
  whose processes share slices of the data axis is refused by name, and so is the onloaded
  road's (a mesh per process there)."""
  ref = tmp_path / "ref"
  ref.mkdir()
  recipes = ("gptq-w4a16-g32", "awq-w4a16-g32", "smoothquant-w8a8-static")
  extra = ("--recipes", ",".join(recipes))
  results = spawn.wait(_processes(tmp_path, extra=(*extra, "--devices", "2", "--global-mesh")) +
                       [_worker(ref, *extra)], 300)
  for rc, log in results:
    assert rc == 0, log
  for p in (0, 1):
    text = (tmp_path / f"overlap.p{p}.txt").read_text()
    assert "do not hold equal, disjoint slices of its data axis 'data'" in text, text
    text = (tmp_path / f"onload.p{p}.txt").read_text()
    assert "the onloaded road takes a mesh per process" in text, text
  p0, p1, single = (np.load(tmp_path / "collect.p0.npz"), np.load(tmp_path / "collect.p1.npz"),
                    np.load(ref / "collect.single.npz"))
  assert not _same(p0, p1)
  for k in single.files:
    if k.endswith((".count", ".nonfinite", ".lo", ".hi", ".absmax", ".samples")):
      np.testing.assert_array_equal(p0[k], single[k], err_msg=k)
    else:
      assert float(np.max(np.abs(p0[k] - single[k])) / np.max(np.abs(single[k]))) <= 1e-6, k
  for recipe in recipes:
    p0, p1 = np.load(tmp_path / f"{recipe}.p0.npz"), np.load(tmp_path / f"{recipe}.p1.npz")
    assert not _same(p0, p1), recipe
    got = compare(np.load(ref / f"{recipe}.single.npz"), p0)
    assert got["codes_differ"] == 0 and got["scale_rel"] <= 1e-5, (recipe, got)
    assert got["act_scale_rel"] <= 1e-5, (recipe, got)
  log = (tmp_path / "gptq-w4a16-g32.p0.log").read_text()
  assert "solves split over 2 processes" in log and "spread over 2 devices" in log, log


def test_without_cpu_collectives_the_key_value_store_carries_the_statistics(tmp_path):
  """``cpu_collectives="none"`` (process_allgather would raise "Multiprocess computations aren't
  implemented on the CPU backend"): the statistics go through the coordinator's key-value store,
  with the same result."""
  ref = tmp_path / "ref"
  ref.mkdir()
  extra = ("--cpu-collectives", "none", "--recipes", "gptq-w4a16-g32")
  results = spawn.wait(_processes(tmp_path, extra=extra) + [_worker(ref, "--recipes",
                                                               "gptq-w4a16-g32")], 240)
  for rc, log in results:
    assert rc == 0, log
  for name in ("collect", "gptq-w4a16-g32"):
    p0, p1 = np.load(tmp_path / f"{name}.p0.npz"), np.load(tmp_path / f"{name}.p1.npz")
    single = np.load(ref / f"{name}.single.npz")
    assert not _same(p0, p1) and not _same(p0, single), name


@pytest.mark.parametrize("bad, expect", [
    ("rules", "disagree on the calibration setup: rules[5]"),
    ("batches", "split different calibration sets: process 0: 4 batches in all"),
])
def test_processes_that_disagree_fail_in_both(tmp_path, bad, expect):
  """Process 1 runs other rules / splits another calibration set: both processes raise a
  ValueError naming the difference, quickly (no hang)."""
  t = time.monotonic()
  results = spawn.wait(_processes(tmp_path, bad={1: bad}, extra=("--skip-collect", "--recipes",
                                                            "gptq-w4a16-g32")), 90)
  for i, (rc, log) in enumerate(results):
    assert rc == 3, log
    msg = (tmp_path / f"error.p{i}.txt").read_text()
    assert msg.startswith("ValueError: jq.distributed:") and expect in msg, msg
  assert time.monotonic() - t < 60


def test_a_failing_process_stops_the_others(tmp_path):
  """Process 1 fails on its own batch (a negative token id): process 0 raises PeerError quoting
  it instead of waiting for the timeout."""
  results = spawn.wait(_processes(tmp_path, bad={1: "tokens"}, extra=("--skip-collect", "--recipes",
                                                                 "w8a8-static")), 90)
  assert [rc for rc, _ in results] == [3, 3], results
  mine = (tmp_path / "error.p1.txt").read_text()
  assert "negative token ids" in mine, mine
  other = (tmp_path / "error.p0.txt").read_text()
  assert other.startswith("PeerError: jq.distributed: process 1 failed") and \
      "negative token ids" in other, other


def test_process_batches_and_plan_without_distributed():
  """One process: process_batches keeps every batch; PTQConfig checks its new fields."""
  import jax
  import jq.distributed
  from jq.ptq import PTQConfig
  mine = jq.distributed.process_batches(range(5), index=1, count=2)
  assert list(mine) == [1, 3] and mine.indices == [1, 3] and mine.total == 5
  with pytest.raises(ValueError, match="2 calibration batches for 3 processes"):
    jq.distributed.process_batches([0, 1], index=0, count=3)
  assert jq.distributed.plan_batches(3) == ([0, 1, 2], 3)
  assert jq.distributed.allreduce_stats({"x": np.ones(2)}, {"x": "sum"})["x"].tolist() == [1, 1]
  with pytest.raises(ValueError, match="must give one of"):
    jq.distributed.allreduce_stats({"x": np.ones(2)}, {"x": "mean"})
  with pytest.raises(ValueError, match="coordinator_address"):
    jq.distributed.initialize("localhost", 2, 0)
  with pytest.raises(ValueError, match="process_id=2 must be < num_processes=2"):
    jq.distributed.initialize("localhost:1234", 2, 2)
  with pytest.raises(ValueError, match="PTQConfig.mesh"):
    PTQConfig(mesh="data")
  mesh = jax.make_mesh((1,), ("batch",))
  with pytest.raises(ValueError, match="not an axis of the mesh"):
    PTQConfig(mesh=mesh, data_axis="data")
  with pytest.raises(ValueError, match="must be a bool or None"):
    PTQConfig(distributed=1)
