"""The suite's own compile settings (tests/conftest.py) take effect: a JAX upgrade that changed
the internals they use would otherwise only show as a slower CI run."""
from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from jax._src import compiler as jax_compiler

import spawn


def test_unoptimized_cpu_compiles_use_the_fast_code_generator():
  if not jax.config.read("jax_disable_most_optimizations"):
    pytest.skip("the suite runs fully optimized (JAX_DISABLE_MOST_OPTIMIZATIONS=0)")
  try:   # what tests/conftest.py probes: does this XLA know the options?
    jax.jit(lambda x: x * 2).lower(np.float32(1)).compile(dict(spawn.FAST_CPU_OPTIONS))
  except jax.errors.JaxRuntimeError:
    pytest.skip("this XLA does not know the options")
  cpu = jax.devices("cpu")[0].client
  got = dict(jax_compiler.get_compile_options(1, 1, backend=cpu).env_option_overrides)
  assert got == spawn.FAST_CPU_OPTIONS, got
  assert os.environ[spawn.FAST_XLA_FLAGS_ENV] in spawn.xla_flags(8)
  assert spawn.xla_flags(8).endswith("--xla_force_host_platform_device_count=8")


@pytest.mark.optimized
def test_optimized_tests_and_their_processes_compile_as_they_come():
  cpu = jax.devices("cpu")[0].client
  assert not jax_compiler.get_compile_options(1, 1, backend=cpu).env_option_overrides
  assert spawn.xla_flags() == ""
