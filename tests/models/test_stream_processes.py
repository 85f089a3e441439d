"""The streamed road in several ``jax.distributed`` processes (``jq.stream.quantize_to_dir`` with
``distributed``): each process quantizes and writes its own shards, process 0 the one index, and
the checkpoint is the one a single process writes, byte for byte; a failing process leaves no
checkpoint, and the rerun resumes.

Each run is ``stream_worker.py`` in subprocesses (``jax.distributed`` must be set up before JAX
starts; only the coordinator's key-value store is used, no CPU collectives), on a tiny random
bfloat16 Llama checkpoint (2 layers) cut into 6 shards of at most 20 kB (``w4a16-g32``).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import jax
import jq
from jq import io as jqio
from jq.io import sharded

WORKER = Path(__file__).with_name("stream_worker.py")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import spawn  # noqa: E402  pylint: disable=wrong-import-position


def _write_checkpoint(directory: Path) -> Path:
  """The tiny random checkpoint of ``conftest.write_checkpoint`` (loaded by file: several
  conftest modules share the name)."""
  spec = importlib.util.spec_from_file_location("_models_conftest",
                                                Path(__file__).with_name("conftest.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.write_checkpoint(directory, "llama", dtype=ml_dtypes.bfloat16, tokenizer=False,
                              num_hidden_layers=2)


def _worker(src: Path, out: Path, results: Path, *args: str) -> subprocess.Popen:
  results.mkdir(exist_ok=True)
  return subprocess.Popen([sys.executable, str(WORKER), str(src), str(out), str(results), *args],
                          cwd=spawn.ROOT, env=spawn.env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT,
                          text=True)


def _two(src: Path, out: Path, results: Path, bad: dict[int, list[str]] | None = None
         ) -> list[tuple[int, str]]:
  port = str(spawn.free_port())
  return spawn.wait([_worker(src, out, results, "--process-id", str(i), "--port", port,
                        *(bad or {}).get(i, [])) for i in range(2)])


def _result(results: Path, me: str) -> dict:
  return json.loads((results / f"{me}.json").read_text())


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  """``(source checkpoint, the one-process jq checkpoint)``."""
  base = tmp_path_factory.mktemp("stream_processes")
  src = _write_checkpoint(base / "src")
  [(rc, log)] = spawn.wait([_worker(src, base / "ref", base / "ref_results")])
  assert rc == 0, log
  yield src, base / "ref"


def _assert_same_files(a: Path, b: Path) -> None:
  names = sorted(os.listdir(a))
  assert names == sorted(os.listdir(b))
  for n in names:
    assert (a / n).read_bytes() == (b / n).read_bytes(), n


def _owners(ref_dir: Path) -> dict[str, int]:
  """``{shard file: the process that writes it}`` for two processes, from the reference's shard
  sizes (the plan's)."""
  header = jqio.load_header(ref_dir)
  files = sorted(set(header["shards"].values()))
  shards = [types.SimpleNamespace(nbytes=os.path.getsize(ref_dir / f)) for f in files]
  return dict(zip(files, sharded.assign_shards(shards, 2)))


def test_two_processes_write_the_one_process_checkpoint(ref, tmp_path):
  """Each process writes only its own shards (balanced by bytes); the index and every shard are
  the bytes one process writes, and load to the same tree."""
  src, want = ref
  out = tmp_path / "out"
  for rc, log in _two(src, out, tmp_path / "res"):
    assert rc == 0, log
  _assert_same_files(out, want)
  assert not os.path.exists(sharded.work_dir(out))
  header = jqio.load_header(out)
  tree = jqio.load(out)   # (the same bytes as the reference: the same tree)
  assert sorted(p for p, _ in jq.tree.leaves_with_paths(tree)) == sorted(header["leaves"])
  owners = _owners(want)
  assert len(owners) >= 4 and set(owners.values()) == {0, 1}
  r = [_result(tmp_path / "res", f"p{i}") for i in range(2)]
  for i in range(2):
    assert r[i]["created"] == sorted(f for f, p in owners.items() if p == i), (i, r[i])
    assert r[i]["out"] == str(out) and r[i]["resumed"] == 0 and r[i]["written"] > 0
  assert r[0]["written"] + r[1]["written"] == len(header["leaves"])


def test_a_failing_process_leaves_no_checkpoint_and_the_rerun_resumes(ref, tmp_path):
  """Process 1 fails after its first shard: both exit with an error (process 0 a PeerError
  quoting process 1's), there is no output, the finished shards stay; both rerun, resume and
  write the one-process checkpoint."""
  src, want = ref
  out, res = tmp_path / "out", tmp_path / "res"
  results = _two(src, out, res, bad={1: ["--fail-after-shards", "1"]})
  assert [rc for rc, _ in results] == [3, 3], results
  mine = (res / "error.p1.txt").read_text()
  assert mine.startswith("RuntimeError: simulated failure in process 1 after writing model-"), mine
  other = (res / "error.p0.txt").read_text()
  assert other.startswith("PeerError: jq.distributed: process 1 failed before the finished "
                          "shards: RuntimeError: simulated failure"), other
  assert not out.exists()
  work = Path(sharded.work_dir(out))
  owners = _owners(want)
  first = sorted(f for f, p in owners.items() if p == 1)[0]
  kept = sorted(n for n in os.listdir(work) if n.endswith(".safetensors"))
  assert kept == sorted([f for f, p in owners.items() if p == 0] + [first]), kept
  assert sharded.INDEX not in os.listdir(work) and not any(n.endswith(".jq-tmp")
                                                           for n in os.listdir(work))
  assert sorted(n for n in os.listdir(work) if n.startswith("progress")) == \
      ["progress.p0.json", "progress.p1.json"]
  for f in kept:
    assert (work / f).read_bytes() == (want / f).read_bytes(), f

  rerun = tmp_path / "rerun"
  for rc, log in _two(src, out, rerun):
    assert rc == 0, log
  _assert_same_files(out, want)
  r = [_result(rerun, f"p{i}") for i in range(2)]
  assert r[0]["written"] == 0 and r[0]["created"] == [] and r[1]["resumed"] > 0, r
  assert r[1]["created"] == sorted(f for f, p in owners.items() if p == 1 and f != first), r
  for i in range(2):
    assert any(line.startswith(f"resuming {work}: {len(kept)} of {len(owners)} shards done and "
                               "verified") for line in r[i]["log"]), r[i]["log"]
  assert not work.exists()


def test_processes_with_different_rules_fail_in_both(ref, tmp_path):
  """Process 1 quantizes with other rules: a ValueError in both naming the difference, before
  any work directory exists."""
  src, _ = ref
  out, res = tmp_path / "out", tmp_path / "res"
  t = time.monotonic()
  results = _two(src, out, res, bad={1: ["--recipe", "w8a16"]})
  assert [rc for rc, _ in results] == [3, 3], results
  for i in range(2):
    msg = (res / f"error.p{i}.txt").read_text()
    assert msg.startswith(f"ValueError: {out}: the processes would write different checkpoints: "
                          "fingerprint.rules[5]: process 0 has 'rtn w:uint4 asym g32', process 1 "
                          "'rtn w:int8 sym channel'; fingerprint.plan"), msg
    assert msg.endswith("Every process must pass the same sources, rules and options"), msg
  assert not out.exists() and not os.path.exists(sharded.work_dir(out))
  assert time.monotonic() - t < 60


def test_writer_shares_and_checks_without_jax_distributed(tmp_path):
  """In one process, with a stand-in exchange: shards balanced by bytes, a leaf of another
  process's shard refused (naming its owner), several processes need an exchange, and process 0
  refuses to write an index for a shard whose file is not in the work directory."""
  shards = sharded.plan_shards([(f"l{i}", jax.ShapeDtypeStruct((n, 8), np.float32))
                                for i, n in enumerate((64, 8, 32, 32, 8))], 1)
  assert sharded.assign_shards(shards, 2) == [0, 0, 1, 1, 1]   # 2048 + 256 | 1024 + 1024 + 256
  assert sharded.assign_shards(shards, 1) == [0] * 5
  leaves = [(f"l{i}", jax.ShapeDtypeStruct((32, 8), np.float32)) for i in range(4)]
  with pytest.raises(ValueError, match="2 processes need exchange"):
    sharded.ShardedWriter(tmp_path / "out", leaves, max_shard_bytes=1, process_count=2)
  seen = []

  def alone(what, info):   # as if process 1 had sent process 0's info
    seen.append(what)
    return [info, info]

  w = sharded.ShardedWriter(tmp_path / "out", leaves, max_shard_bytes=1, process_count=2,
                            exchange=alone)
  assert seen == ["the checkpoint plan", "the work directory", "the resumed shards"]
  assert w.owner == [0, 1, 0, 1] and w.todo == w.mine == ["l0", "l2"]
  assert os.listdir(w.work) == ["progress.p0.json"]
  with pytest.raises(ValueError, match=r"l1: its shard model-00002-of-00004.safetensors is "
                                       r"written by process 1, not this one \(0\)"):
    w.add("l1", np.zeros((32, 8), np.float32))
  for p in w.todo:
    w.add(p, np.ones((32, 8), np.float32))
  with pytest.raises(ValueError, match="process 1 reports shard 'model-00001-of-00004"):
    w.finish()
  with pytest.raises(ValueError, match=r"model-00002-of-00004.safetensors \(written by process "
                                       r"1\) is not reported finished"):
    w.exchange = lambda what, info: [info, "{}"]
    w.finish()
  fake = {"model-00002-of-00004.safetensors": {"leaves": {"l1": {}}, "tensors": {}},
          "model-00004-of-00004.safetensors": {"leaves": {"l3": {}}, "tensors": {}}}
  w.exchange = lambda what, info: [info, json.dumps(fake)]
  with pytest.raises(ValueError, match=r"model-00002-of-00004.safetensors \(written by process "
                                       r"1\) is missing in process 0's work directory"):
    w.finish()
  assert not (tmp_path / "out").exists() and sharded.INDEX not in os.listdir(w.work)
