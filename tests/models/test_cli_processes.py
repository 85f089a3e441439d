"""``jq-quant quantize`` in two ``jax.distributed`` processes (``--coordinator``,
``--num-processes``, ``--process-id``) writes the checkpoint one process writes, bit for bit: the
in-memory road and the onloaded (``--stream``) road, GPTQ with the calibration batches split
between the processes, the statistics summed and the solves shared.

The CLI runs in subprocesses (``jax.distributed`` must start before JAX), on localhost.
"""
from __future__ import annotations

import pathlib
import subprocess
import sys

import numpy as np
import pytest

import jq.io as jqio
from jq import cli
from jq.tree import leaves_with_paths

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import spawn  # noqa: E402  pylint: disable=wrong-import-position
ARGS = ("--recipe", "gptq-w4a16-g32", "--calib-sequences", "16", "--calib-len", "32")


def _run(argvs: list[list[str]], timeout: float = 300) -> list[tuple[int, str]]:
  """Runs ``jq-quant`` with each of ``argvs`` at once (``--devices N``: on N virtual CPU
  devices); ``[(exit status, output)]``."""
  def env(argv):
    return spawn.env(int(argv[argv.index("--devices") + 1]) if "--devices" in argv else None)
  return spawn.wait([subprocess.Popen([sys.executable, "-m", "jq.cli", *argv], cwd=spawn.ROOT,
                                      env=env(argv), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True) for argv in argvs],
                    timeout)


def _leaves(path: pathlib.Path) -> dict[str, np.ndarray]:
  import jax
  out = {}
  for p, leaf in leaves_with_paths(jqio.load(path)):
    for i, x in enumerate(jax.tree_util.tree_leaves(leaf)):
      out[f"{p}:{i}"] = np.asarray(x)
  return out


@pytest.mark.parametrize("road", ["in-memory", "stream"])
def test_two_processes_write_the_one_process_checkpoint(tiny_hf, tmp_path, road):
  model = str(tiny_hf("llama"))
  ext = "" if road == "stream" else ".safetensors"
  extra = ("--stream",) if road == "stream" else ("--no-eval",)
  one, two, dev = tmp_path / f"one{ext}", tmp_path / f"two{ext}", tmp_path / f"devices{ext}"
  port = str(spawn.free_port())
  *got, ref, on_devices = _run(
      [["quantize", "--model", model, *ARGS, *extra, "--out", str(two),
        "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)]
       for i in range(2)] +
      [["quantize", "--model", model, *ARGS, *extra, "--out", str(one)],
       ["quantize", "--model", model, *ARGS, *extra, "--out", str(dev), "--devices", "2"]])
  for rc, text in got + [ref, on_devices]:
    assert rc == 0, text
  # --devices 2: the parameters loaded (in memory) or onloaded (each block) straight into shards
  # over the 2 devices and kept split; the codes of one device up to float32 sums in another order
  assert "parameters split over the mesh's devices as given: kept split" in on_devices[1], \
      on_devices[1]
  a, c = _leaves(one), _leaves(dev)
  assert sorted(a) == sorted(c)
  codes = [k for k in a if k.endswith(":0") and a[k].dtype == np.uint8]
  unpacked = [np.concatenate([x & 15, x >> 4]) for x in (np.concatenate([a[k].ravel() for k in codes]),
                                                          np.concatenate([c[k].ravel() for k in codes]))]
  assert np.mean(unpacked[0] != unpacked[1]) <= 0.01, np.mean(unpacked[0] != unpacked[1])
  assert "process 1 of 2: calibration done; process 0 evaluates and writes" in got[1][1] or \
      road == "stream", got[1][1]
  assert "solves split over 2 processes: process 0 ran" in got[0][1], got[0][1]
  a, b = _leaves(one), _leaves(two)
  assert sorted(a) == sorted(b)
  assert [k for k in a if not np.array_equal(a[k], b[k])] == []
  assert sum(k.endswith(":0") and a[k].dtype == np.uint8 for k in a) >= 7 * 3   # packed int4


def test_process_flags_go_together(capsys):
  assert cli.main(["quantize", "--coordinator", "localhost:1234", "--no-eval"]) == 1
  err = capsys.readouterr().err
  assert "--coordinator, --num-processes and --process-id go together (missing " \
         "--num-processes, --process-id)" in err, err
  assert cli.main(["quantize", "--coordinator", "localhost", "--num-processes", "2",
                   "--process-id", "0", "--no-eval"]) == 1
  err = capsys.readouterr().err
  assert "--coordinator/--num-processes/--process-id" in err and "host:port" in err, err
