"""The kernel policy is a value: passed to quantized_apply / quantize_module / dot_general /
explain, or set as the current one, and part of every trace (a jitted function retraces)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jq
from jq.ops import dispatch, kernels, reference

DN = (((1,), (0,)), ((), ()))
W = jax.random.normal(jax.random.key(0), (64, 32), jnp.float32)
X = jax.random.normal(jax.random.key(1), (4, 64), jnp.float32)


@pytest.fixture
def marked_kernel():
  """A CPU "kernel" that the policy gates like the Pallas ones; its output is the reference's
  plus 1000, so which implementation ran is visible in the result."""
  def fn(x, w, dn, precision=None, preferred_element_type=None, *, out_sharding=None):
    return reference.weight_only_dot_general(x, w, dn, precision, preferred_element_type,
                                             out_sharding=out_sharding) + 1000.0
  dispatch.register(dispatch.Impl(
      name="marked_kernel", fn=fn, backends=frozenset({"cpu"}),
      modes=frozenset({dispatch.Mode.WEIGHT_ONLY}),
      predicate=lambda p: p.policy.allows_weight_only(p.m, p.qtype.storage_bits), priority=5))
  before = kernels.policy()
  yield
  kernels.enable(before)
  dispatch.unregister("marked_kernel")


def _ran_kernel(y) -> bool:
  return bool(np.min(np.asarray(y)) > 500.0)


def test_enable_takes_effect_on_a_function_already_jitted(marked_kernel):
  """The reproduction from the issue: enable(True), jitted call, enable(False), call again."""
  q = jq.quantize(W, jq.W8A16)
  f = jax.jit(lambda x, w: jq.ops.matmul(x, w))
  kernels.enable(True)
  assert _ran_kernel(f(X, q))
  kernels.enable(False)
  assert not _ran_kernel(f(X, q))
  kernels.enable("always")
  assert _ran_kernel(f(X, q))
  with jq.ops.kernel_policy("never"):
    assert not _ran_kernel(f(X, q))
  assert _ran_kernel(f(X, q))


def test_explicit_policy_beats_the_current_one(marked_kernel):
  q = jq.quantize(W, jq.W8A16)
  kernels.enable(True)
  never = jq.KernelPolicy(pallas="never")
  assert not _ran_kernel(jq.ops.matmul(X, q, policy=never))
  assert dispatch.route(X, q, DN, policy=never).name == "xla_reference_weight_only"
  # auto: 8-bit weights take the kernel at <= max_m_int8 rows only
  small = jq.KernelPolicy(pallas="auto", max_m_int8=4)
  assert _ran_kernel(jq.ops.matmul(X, q, policy=small))
  assert not _ran_kernel(jq.ops.matmul(jnp.tile(X, (2, 1)), q, policy=small))


class _Dense(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(16, name="out")(x)


def test_quantized_apply_policy_is_part_of_the_trace(marked_kernel):
  model = _Dense()
  x = jnp.ones((2, 8), jnp.float32)
  variables = model.init(jax.random.key(0), x)
  qvars = jq.nn.quantize_variables(model, variables, [jq.Rule(pattern="kernel", weight=jq.W8A16)],
                                   x)
  kernels.enable(False)       # the process default says never; the value given wins
  fast = jax.jit(jq.nn.quantized_apply(model, policy="always"))
  ref = jax.jit(jq.nn.quantized_apply(model, policy=jq.KernelPolicy(pallas="never")))
  plain = jax.jit(jq.nn.quantized_apply(model))
  assert _ran_kernel(fast(qvars, x))
  assert not _ran_kernel(ref(qvars, x))
  assert not _ran_kernel(plain(qvars, x))
  kernels.enable(True)
  assert _ran_kernel(plain(qvars, x))       # retraced under the new default
  assert not _ran_kernel(ref(qvars, x))     # its own policy, whatever the default
  routes = jq.explain(model, qvars, x, file=None, policy="never")
  assert {r.impl for r in routes} == {"xla_reference_weight_only"}
  routes = jq.explain(jq.nn.quantized_apply(model, policy="never"), qvars, x, file=None)
  assert {r.impl for r in routes} == {"xla_reference_weight_only"}
  assert {r.impl for r in jq.explain(model, qvars, x, file=None)} == {"marked_kernel"}


class _NnxDense(nnx.Module):
  def __init__(self, rngs):
    self.out = nnx.Linear(8, 16, rngs=rngs)

  def __call__(self, x):
    return self.out(x)


def test_quantize_module_policy_rides_on_the_module(marked_kernel):
  model = _NnxDense(nnx.Rngs(0))
  x = jnp.ones((2, 8), jnp.float32)
  rules = [jq.Rule(pattern="kernel", weight=jq.W8A16)]
  kernels.enable(True)
  ref = jq.nn.quantize_module(model, rules, policy="never")
  cur = jq.nn.quantize_module(model, rules)
  run = nnx.jit(lambda m, x: m(x))
  assert not _ran_kernel(run(ref, x))
  assert _ran_kernel(run(cur, x))
  assert {r.impl for r in jq.explain(ref, x, file=None)} == {"xla_reference_weight_only"}


def test_policy_values_are_checked(monkeypatch):
  assert jq.KernelPolicy.parse(True) == jq.KernelPolicy("always")
  assert jq.KernelPolicy.parse("0") == jq.KernelPolicy("never")
  assert hash(jq.KernelPolicy()) == hash(jq.KernelPolicy("auto"))
  with pytest.raises(ValueError, match="pallas='sometimes'"):
    jq.KernelPolicy("sometimes")
  with pytest.raises(ValueError, match="max_m_int4"):
    jq.KernelPolicy(max_m_int4=-1)
  with pytest.raises(ValueError, match="expected"):
    kernels.enable("sometimes")
  with pytest.raises(ValueError, match="expected"):
    jq.nn.quantized_apply(_Dense(), policy=3)
  monkeypatch.setenv("JQ_PALLAS", "1")
  assert jq.KernelPolicy.from_env() == jq.KernelPolicy("always")
  monkeypatch.setenv("JQ_PALLAS", "maybe")
  with pytest.raises(ValueError, match="JQ_PALLAS='maybe'"):
    jq.KernelPolicy.from_env()
