"""A linen model with its variables, or an nnx module, seen the one way the PTQ road needs.

* ``params``: the tree the rules apply to (linen variables; nnx ``Param`` state);
* ``layouts`` / ``stacks`` / ``reasons``: from the layers (see ``jq.nn``);
* ``run(params, batch)``: the unchanged model through jq's adapters (float or quantized kernels);
* ``run_hooked(params, batch, hook_for)``: the same, with each module's ``__call__`` routed
  through ``hook_for(path, module)(call, args, kwargs)`` where that returns a hook (module paths
  '/'-joined, linen's with the ``params`` prefix): the block runner of sequential calibration;
* ``calls(params, batch)``: every module call of one abstract trace, in call order, with the
  identities of its input and output (to find which module produced a layer's input);
* ``finish(qparams)``: the result (linen variables, or a new nnx module).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jq import _compat


def as_args(batch) -> tuple:
  return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


@dataclasses.dataclass(frozen=True)
class Call:
  """One module call seen in a trace: ``module`` path ('/'-joined, the params prefix included),
  its class name, ``id`` of its first (array) input and of its output (0 if not an array)."""
  module: str
  cls: str
  input_id: int
  output_id: int
  mapped: bool = False   # its input is mapped by a vmap of the model (_compat.is_mapped)


Hook = Callable[[Callable[..., Any], tuple, dict], Any]


@dataclasses.dataclass
class Target:
  params: Any
  layouts: dict
  stacks: dict
  reasons: dict
  run: Callable[[Any, Any], Any]
  run_hooked: Callable[[Any, Any, Callable[[str, Any], Hook | None]], Any]
  finish: Callable[[Any], Any]
  kind: str

  def calls(self, params, batch) -> list[Call]:
    """Every module ``__call__`` of one abstract trace (nothing computed), in the order the calls
    return."""
    out: list[Call] = []

    def hook_for(path, module):
      def hook(call, a, k):
        y = call(*a, **k)
        out.append(Call(path, type(module).__name__, _array_id(a[0]) if a else 0, _array_id(y),
                        mapped=bool(a) and _compat.is_mapped(a[0])))
        return y
      return hook

    from jq.nn import linen  # pylint: disable=import-outside-toplevel
    linen.abstract_call(lambda p, b: self.run_hooked(p, b, hook_for), params, batch)
    return out


def _array_id(x) -> int:
  return id(x) if isinstance(x, (jax.Array, np.ndarray)) or hasattr(x, "aval") else 0


def linen_target(model, variables, example_batch, example_kwargs: dict) -> Target:
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from jq.nn import linen  # pylint: disable=import-outside-toplevel
  qapply = linen.quantized_apply(model)
  lays, stacks, reasons = linen.layouts_and_stacks(model, variables, *as_args(example_batch),
                                                   **example_kwargs)

  def run(v, batch):
    return qapply(v, *as_args(batch), **example_kwargs)

  def run_hooked(v, batch, hook_for):
    def icpt(next_fun, a, kw, context):
      if context.method_name == "__call__":
        mod = context.module
        hook = hook_for("/".join(("params",) + tuple(map(str, mod.path))), mod)
        if hook is not None:
          return hook(next_fun, a, kw)
      return next_fun(*a, **kw)

    with nn.intercept_methods(icpt):
      return qapply(v, *as_args(batch), **example_kwargs)

  return Target(params=variables, layouts=lays, stacks=stacks, reasons=reasons, run=run,
                run_hooked=run_hooked, finish=lambda q: q, kind="linen")


def nnx_target(module, example_kwargs: dict | None = None) -> Target:
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from jq.nn import nnx as jnnx  # pylint: disable=import-outside-toplevel
  jnnx.check_eval_mode(module, "quantize_model")
  layers = jnnx.module_layers(module)
  prepared = jnnx.with_quantized_classes(module)
  graphdef, _, rest = nnx.split(prepared, nnx.Param, ...)

  kwargs = dict(example_kwargs or {})

  def run(p, batch):
    return nnx.merge(graphdef, p, rest)(*as_args(batch), **kwargs)

  def run_hooked(p, batch, hook_for):
    clone = nnx.merge(graphdef, p, rest)
    for path, m in nnx.iter_modules(clone):
      if any("__call__" in c.__dict__ for c in type(m).__mro__ if c is not object):
        hook = hook_for("/".join(map(str, path)), m)
        if hook is not None:
          m.__class__ = _hooked_class(type(m), hook)
    return clone(*as_args(batch), **kwargs)

  return Target(
      params=nnx.state(module, nnx.Param),
      layouts={m.path: m.layout for m in layers if m.layout is not None},
      stacks={m.path: m.stack for m in layers if m.stack > 1},
      reasons={m.path: m.reason for m in layers if m.layout is None},
      run=run, run_hooked=run_hooked,
      finish=lambda q: jnnx.quantize_module(module, nnx.merge_state(nnx.state(module), q)),
      kind="nnx")


def _hooked_class(cls: type, hook: Hook) -> type:
  """A subclass of ``cls`` (same name) whose ``__call__`` goes through ``hook(call, args,
  kwargs)``."""
  def __call__(self, *a, **k):  # pylint: disable=invalid-name
    return hook(lambda *a2, **k2: super(hooked, self).__call__(*a2, **k2), a, k)
  hooked = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})
  return hooked


__all__ = ["Call", "Hook", "Target", "as_args", "linen_target", "nnx_target"]
