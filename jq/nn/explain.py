"""``explain``: which path each layer of a (quantized) Flax model takes, traced abstractly.

Nothing is computed: the model is traced with ``jax.eval_shape`` while the adapters report each
layer's :class:`~jq.nn.common.Route` (float, weight-only reference, int8 dynamic/static, kernel
name) and ``jq.ops`` adds its performance note.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import jax
import numpy as np
from flax import nnx

from jq.nn import common
from jq.nn.linen import quantized_apply
from jq.nn.nnx import QUANTIZED_LAYERS, TWINS

Route = common.Route

_FLOAT_NNX = tuple(TWINS) + (nnx.Conv,)


def _abstract_call(fn: Callable[..., Any], *args, **kwargs) -> Any:
  """``fn(*args, **kwargs)`` under ``jax.eval_shape``; array (and ``ShapeDtypeStruct``) leaves are
  abstracted, other leaves (flags, strings) stay static."""
  leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
  is_arr = [isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)) for x in leaves]

  def run(*arrays):
    it = iter(arrays)
    full = [next(it) if a else x for x, a in zip(leaves, is_arr)]
    a, k = jax.tree_util.tree_unflatten(treedef, full)
    return fn(*a, **k)

  return jax.eval_shape(run, *[x for x, a in zip(leaves, is_arr) if a])


def _dedupe(routes: Sequence[Route]) -> list[Route]:
  seen, out = set(), []
  for r in routes:
    if r.path not in seen:
      seen.add(r.path)
      out.append(r)
  return out


def trace_routes(model: Any, *args, backend: str | None = None, **kwargs) -> list[Route]:
  """The routes of every adapted layer (first call of each), in call order.

  Args:
    model: a linen module or apply function (then ``args[0]`` is the variables dict), or an nnx
      module (typically from :func:`jq.nn.quantize_module`).  Parameters and inputs may be
      ``jax.ShapeDtypeStruct`` (e.g. ``jax.eval_shape`` of ``quantize_tree``): nothing is computed.
    *args, **kwargs: what you would pass to ``apply`` / call the nnx module with.
    backend: explain for this backend ("cpu", "gpu", "tpu") instead of the default one.
  """
  if isinstance(model, nnx.Module):
    graphdef, state = nnx.split(model)
    with common.recording(backend) as routes:
      _abstract_call(lambda st, *a, **k: nnx.merge(graphdef, st)(*a, **k), state, *args, **kwargs)
    found = {r.path: r for r in _dedupe(routes)}
    out = []
    for path, layer in nnx.iter_modules(model):
      kpath = "/".join(str(p) for p in path + ("kernel",))
      if isinstance(layer, QUANTIZED_LAYERS):
        out.append(found.pop(kpath, Route(kpath, type(layer).__name__, "?", "not called", "-")))
      elif isinstance(layer, _FLOAT_NNX):
        out.append(Route(kpath, type(layer).__name__, str(layer.kernel.get_value().dtype),
                         "float", "float"))
    return out + list(found.values())
  if not args:
    raise ValueError("explain: a linen model needs its variables as the first argument")
  qapply = quantized_apply(model)
  with common.recording(backend) as routes:
    _abstract_call(qapply, *args, **kwargs)
  return _dedupe(routes)


def format_routes(routes: Sequence[Route]) -> str:
  """A plain-text table of routes; layers expected to run slower than float are flagged."""
  head = ("path", "layer", "weight", "mode", "impl", "M", "note")
  body = [(r.path, r.layer.split("(")[0], r.weight, r.mode, r.impl,
           "-" if r.m is None else str(r.m),
           ("WARNING slower than float: " if r.slower_than_float else "") +
           (r.note.text if r.note else "")) for r in routes]
  widths = [max(len(c) for c in col) for col in zip(head, *body)]
  line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
  out = [line(head), line(["-" * w for w in widths])] + [line(b) for b in body]
  n_q = sum(r.mode != "float" for r in routes)
  n_slow = sum(r.slower_than_float for r in routes)
  out.append(f"{n_q} quantized / {len(routes) - n_q} float layers; {n_slow} expected slower "
             "than float")
  return "\n".join(out)


def explain(model: Any, *args, backend: str | None = None, file: TextIO | None = sys.stdout,
            **kwargs) -> list[Route]:
  """Prints, for each layer, the path it takes (float, weight-only reference, int8 dynamic, int8
  static, or a registered kernel's name) and warns where it is expected to be slower than float.

  Invariant: the routes are the ones ``jq.ops`` takes when the same call runs (the choice is a
  trace-time function of static shapes), so ``explain`` costs one abstract trace, no compute.

  Args:
    model: linen ``Module``/``apply`` (then pass ``variables, *inputs``) or an nnx module
      (then pass ``*inputs``).
    backend: explain for another backend than ``jax.default_backend()``.
    file: where to print (None: don't print).

  Example:
    >>> jq.explain(model, qvars, tokens)                 # linen
    >>> jq.explain(qmodel, tokens, backend="gpu")        # nnx, as it would run on a GPU

  Returns:
    The list of :class:`Route` rows.
  """
  routes = trace_routes(model, *args, backend=backend, **kwargs)
  if file is not None:
    print(format_routes(routes), file=file)
  return routes


__all__ = ["explain", "format_routes", "trace_routes", "Route"]
