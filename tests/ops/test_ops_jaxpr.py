"""What the jitted computations really contain (AQT's idea) and that they trace only once."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jq
from jq import ops
from jq.qarray import ActivationQuant
from jq.qtypes import QType
from jq.spec import ActivationSpec, ActMode, QuantSpec

K, N = 48, 16
DN = (((1,), (0,)), ((), ()))


def _eqns(jaxpr):
  """All equations of a jaxpr, recursing into sub-jaxprs (pjit, custom_jvp, ...)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (tuple, list)) else (p,)):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _eqns(inner)


def _dots(closed):
  return [e for e in _eqns(closed.jaxpr) if e.primitive.name == "dot_general"]


def _producer(closed, var):
  for e in _eqns(closed.jaxpr):
    if any(o is var for o in e.outvars):
      return e
  return None


def _qarray(spec, act: ActivationSpec | None = None):
  w = jnp.asarray(np.random.default_rng(0).standard_normal((K, N)), jnp.float32)
  q = jq.quantize(w, spec)
  if act is None:
    return q
  static = act.mode is ActMode.STATIC
  return dataclasses.replace(q, activation=ActivationQuant(
      jnp.float32(0.05) if static else None,
      None if act.symmetric or not static else jnp.asarray(128, act.qtype.unpacked_dtype), act))


X = jnp.ones((4, K), jnp.float32)


@pytest.mark.parametrize("act", [
    ActivationSpec(), ActivationSpec(qtype=QType.UINT8, symmetric=False),
    ActivationSpec(mode=ActMode.STATIC),
    ActivationSpec(mode=ActMode.STATIC, qtype=QType.UINT8, symmetric=False)],
    ids=lambda a: f"{a.describe()} {a.qtype.value}")
@pytest.mark.parametrize("wspec", [QuantSpec(qtype=QType.INT8),
                                   QuantSpec(qtype=QType.UINT8, symmetric=False)],
                         ids=lambda s: s.describe())
def test_int8_modes_are_int8_x_int8_to_int32(act, wspec):
  q = _qarray(wspec, act)
  closed = jax.make_jaxpr(lambda x, q: ops.dot_general(x, q, DN))(X, q)
  dots = _dots(closed)
  assert len(dots) == 1, "exactly one contraction, no dequantize-first float dot"
  (d,) = dots
  assert [v.aval.dtype for v in d.invars] == [jnp.int8, jnp.int8]
  assert d.params["preferred_element_type"] == jnp.int32
  assert d.outvars[0].aval.dtype == jnp.int32


@pytest.mark.parametrize("spec", [QuantSpec(qtype=QType.INT8), QuantSpec(qtype=QType.INT4),
                                  QuantSpec(qtype=QType.UINT4, symmetric=False)],
                         ids=lambda s: s.describe())
def test_weight_only_per_channel_scales_the_output(spec):
  """dot(x, convert(q − zp)) · s: the dot's rhs is converted integers, a mul follows the dot."""
  q = _qarray(spec)
  closed = jax.make_jaxpr(lambda x, q: ops.dot_general(x, q, DN))(X, q)
  (d,) = _dots(closed)
  rhs = _producer(closed, d.invars[1])
  assert rhs.primitive.name == "convert_element_type"
  assert jnp.issubdtype(rhs.invars[0].aval.dtype, jnp.integer)
  users = [e for e in _eqns(closed.jaxpr) if any(v is d.outvars[0] for v in e.invars)]
  assert [e.primitive.name for e in users] == ["mul"]
  assert d.params["preferred_element_type"] == jnp.float32


def test_weight_only_group_scales_dequantize_inside_the_computation():
  q = _qarray(jq.W4A16_G32)
  closed = jax.make_jaxpr(lambda x, q: ops.dot_general(x, q, DN))(X, q)
  (d,) = _dots(closed)
  assert d.invars[1].aval.dtype == jnp.float32 and d.invars[1].aval.shape == (K, N)
  # the packed uint8 weight is an input of the computation: nothing was dequantized outside
  assert closed.jaxpr.invars[1].aval.dtype == jnp.uint8


@pytest.mark.parametrize("act", [None, ActivationSpec()], ids=["weight_only", "dynamic"])
def test_no_recompilation_on_second_call(act, compiles):
  """New values of x and of the QArray (scales included) reuse the one trace and executable."""
  traces = []

  def f(x, q):
    traces.append(1)  # runs only while tracing
    return ops.matmul(x, q)

  g = jax.jit(f)
  q = _qarray(QuantSpec(qtype=QType.INT8), act)
  q2 = _qarray(QuantSpec(qtype=QType.INT8), act)
  g(X, q).block_until_ready()
  g(X * 2.0, q2).block_until_ready()
  assert len(traces) == 1 and compiles["jit(f)"] == 1
  g(jnp.ones((8, K), jnp.float32), q).block_until_ready()  # a new shape traces again
  assert len(traces) == 2 and compiles["jit(f)"] == 2
