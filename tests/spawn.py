"""For the tests that start Python processes of their own (``jax.distributed`` workers, CLI runs):
their environment, a free port, and waiting for them with a timeout (a hang fails the test)."""
from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def env() -> dict[str, str]:
  """This environment (with the run's compilation cache, tests/conftest.py) on CPU, without
  XLA flags, with the checkout importable."""
  out = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  out["JAX_PLATFORMS"] = "cpu"
  out["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [out.get("PYTHONPATH")] if p])
  return out


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def wait(procs: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str]]:
  """``(exit status, output)`` of each process; kills all of them (and fails) after ``timeout``."""
  end = time.monotonic() + timeout
  out = []
  try:
    for p in procs:
      text, _ = p.communicate(timeout=max(1.0, end - time.monotonic()))
      out.append((p.returncode, text))
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    pytest.fail(f"processes still running after {timeout:g} s (a hang)")
  return out
