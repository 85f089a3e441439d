"""For the tests that start Python processes of their own (``jax.distributed`` workers, CLI runs):
their environment and XLA flags, a free port, and waiting for them with a timeout (a hang fails
the test)."""
from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# XLA's CPU code generator for fusions: its newer MLIR emitters take longer to compile than the
# classic ones (measured on 2 cores: the GPTQ and quantize tests 35-43 s -> 25-27 s, three runs
# each, interleaved; the whole suite 1198 s -> 887 s, back to back).  Only for the unoptimized
# compiles: the ``optimized`` tests (the real SmolLM2 evaluated many times) ran ~20 s longer with
# the classic emitters.
# tests/conftest.py applies them; FAST_XLA_FLAGS_ENV holds them as XLA flags for the processes
# the tests start, when this XLA knows them.
FAST_CPU_OPTIONS = {"xla_cpu_use_fusion_emitters": False}
FAST_XLA_FLAGS_ENV = "JQ_TEST_FAST_XLA_FLAGS"
FAST_COMPILE_ENV = "JAX_DISABLE_MOST_OPTIMIZATIONS"   # tests/conftest.py sets it, per test


def unoptimized() -> bool:
  """Whether what runs now (the test, the processes it starts) compiles unoptimized."""
  return os.environ.get(FAST_COMPILE_ENV, "").lower() not in ("", "0", "false")


def env(devices: int | None = None) -> dict[str, str]:
  """This environment (with the run's compilation cache and compile settings, tests/conftest.py)
  on CPU, with ``devices`` virtual CPU devices (one by default) and the checkout importable."""
  out = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  out["JAX_PLATFORMS"] = "cpu"
  out["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [out.get("PYTHONPATH")] if p])
  flags = xla_flags(devices)
  if flags:
    out["XLA_FLAGS"] = flags
  return out


def xla_flags(devices: int | None = None) -> str:
  """XLA flags for a process a test starts: the suite's fast CPU code generation while the test
  compiles unoptimized (tests/conftest.py), and ``devices`` virtual CPU devices."""
  flags = []
  if unoptimized():
    flags.append(os.environ.get(FAST_XLA_FLAGS_ENV, ""))
  if devices is not None:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  return " ".join(f for f in flags if f)


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
