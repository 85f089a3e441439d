"""Suite-wide test setup: strict dtype promotion everywhere, and the hypothesis profile."""
from __future__ import annotations

import os

import jax
import pytest
from hypothesis import HealthCheck, settings

# Property tests: no per-example deadline (the first call of a shape compiles), and a modest
# number of examples so that the core suite stays within a couple of minutes on 2 CPU cores.
# HYPOTHESIS_PROFILE=thorough runs many more.
settings.register_profile("jq", deadline=None, max_examples=20, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.data_too_large])
settings.register_profile("thorough", parent=settings.get_profile("jq"), max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "jq"))


@pytest.fixture(autouse=True)
def _strict_dtype_promotion():
  """jq must not rely on implicit dtype promotion (int8 + float32 and the like)."""
  with jax.numpy_dtype_promotion("strict"):
    yield
