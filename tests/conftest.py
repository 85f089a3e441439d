"""Suite-wide test setup: strict dtype promotion everywhere, and the hypothesis profile."""
from __future__ import annotations

import collections
import os
import shutil
import tempfile

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from jax._src import compiler as jax_compiler

import spawn

# Property tests: no per-example deadline (the first call of a shape compiles), and a modest
# number of examples so that the core suite stays within a couple of minutes on 2 CPU cores.
# HYPOTHESIS_PROFILE=thorough runs many more.
settings.register_profile("jq", deadline=None, max_examples=20, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.data_too_large])
settings.register_profile("thorough", parent=settings.get_profile("jq"), max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "jq"))


_CACHE_ENV = "JQ_TEST_JAX_CACHE"


def _fast_compile() -> bool:
  """JAX's own switch for its tests (XLA backend optimization level 0, no expensive LLVM passes):
  most of the suite's programs are tiny and compiled once each, so compiling is most of their
  time and optimizing does not pay (measured: the zoo GPTQ/AWQ comparison 60 s -> 44 s; the whole
  suite 2230 s -> 1981 s).  Tests marked ``optimized`` (the real SmolLM2 many times over)
  compile fully optimized: there the arithmetic dominates (the GGUF CLI test took twice as long
  unoptimized).  Not for tiny models with many programs (learned rounding, meshes): they are
  compile-bound, and their programs would miss the cache the other tests fill.  Unoptimized programs
  compute the same IEEE operations (bit-exact comparisons in the suite are between programs
  compiled the same way).  Set in the environment, so the subprocesses the tests start (CLI
  runs, notebooks, jax.distributed workers) compile the same way;
  ``JAX_DISABLE_MOST_OPTIMIZATIONS=0`` runs the whole suite fully optimized."""
  os.environ.setdefault(spawn.FAST_COMPILE_ENV, "1")
  fast = spawn.unoptimized()
  jax.config.update("jax_disable_most_optimizations", fast)
  return fast


def _fast_cpu_codegen() -> None:
  """Adds ``spawn.FAST_CPU_OPTIONS`` to every CPU compile made while
  ``jax_disable_most_optimizations`` is on (JAX builds each compile's options in
  ``get_compile_options``, and has no setting for options of every compile, hence the wrapper;
  the options are part of the persistent cache's key), and puts them in the environment as XLA
  flags for the processes the tests start.  An XLA that does not know an option refuses it, and a
  JAX without that function has other internals: then nothing changes."""
  original = getattr(jax_compiler, "get_compile_options", None)
  if original is None or getattr(original, "_jq_fast_cpu", False):
    return
  try:
    jax.config.read("jax_disable_most_optimizations")   # what the wrapper reads at each compile
    jax.jit(lambda x: x + 1).lower(np.float32(0)).compile(dict(spawn.FAST_CPU_OPTIONS))
  except (AttributeError, jax.errors.JaxRuntimeError):
    return

  def get_compile_options(*args, **kwargs):
    options = original(*args, **kwargs)
    backend = kwargs.get("backend")
    if (jax.config.read("jax_disable_most_optimizations") and backend is not None
        and backend.platform == "cpu"):
      options.env_option_overrides = (list(options.env_option_overrides)
                                      + list(spawn.FAST_CPU_OPTIONS.items()))
    return options

  get_compile_options._jq_fast_cpu = True   # pylint: disable=protected-access
  jax_compiler.get_compile_options = get_compile_options
  os.environ[spawn.FAST_XLA_FLAGS_ENV] = " ".join(f"--{k}={str(v).lower()}"
                                                  for k, v in spawn.FAST_CPU_OPTIONS.items())


def pytest_configure(config):
  """One persistent XLA compilation cache for the whole run, shared by the pytest-xdist workers
  and the subprocesses the tests start (CLI runs, notebooks, jax.distributed workers): many tests
  compile the same programs again (fresh closures of the same model), and compiling is most of
  their time on CPU.  The run's master makes a fresh directory (so every run starts cold, as CI
  does) and removes it at the end; ``JQ_TEST_JAX_CACHE=<dir>`` keeps one across runs instead."""
  config._jq_fast_compile = _fast_compile()   # pylint: disable=protected-access
  if not hasattr(config, "workerinput") and not os.environ.get(_CACHE_ENV):
    config._jq_cache = tempfile.mkdtemp(prefix="jq-jax-cache-")   # pylint: disable=protected-access
    os.environ[_CACHE_ENV] = config._jq_cache                       # pylint: disable=protected-access
  directory = os.environ.get(_CACHE_ENV)
  if directory:
    os.environ.update(JAX_COMPILATION_CACHE_DIR=directory,
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  if config._jq_fast_compile:   # pylint: disable=protected-access
    _fast_cpu_codegen()   # after the cache's set up: JAX decides once, at the first compile


def pytest_unconfigure(config):
  directory = getattr(config, "_jq_cache", None)
  if directory:
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(autouse=True)
def _optimized(request):
  """Tests marked ``optimized`` compile with XLA's full optimizations (see ``_fast_compile``),
  and so do the subprocesses they start."""
  if (not getattr(request.config, "_jq_fast_compile", False)
      or request.node.get_closest_marker("optimized") is None):
    yield
    return
  jax.config.update("jax_disable_most_optimizations", False)
  os.environ[spawn.FAST_COMPILE_ENV] = "0"
  try:
    yield
  finally:
    os.environ[spawn.FAST_COMPILE_ENV] = "1"
    jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture(autouse=True)
def _strict_dtype_promotion():
  """jq must not rely on implicit dtype promotion (int8 + float32 and the like)."""
  with jax.numpy_dtype_promotion("strict"):
    yield


@pytest.fixture
def compiles():
  """XLA compilations counted by jitted-function name (``compiles["jit(f)"]``), from
  ``jax.monitoring``'s backend-compile event: one per executable, persistent-cache hits included.
  Not ``f._cache_size()``: the C++ dispatch cache is process-wide and its count depends on what the
  test worker ran before (CI once saw 0 after two calls)."""
  counts = collections.Counter()

  def listener(event, _duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      counts[kwargs.get("fun_name")] += 1

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield counts
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
