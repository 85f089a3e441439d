"""Capturing the inputs of Dense layers of an unchanged linen model (for calibration).

``capture_dense_inputs(fn, ...)`` runs ``fn`` under ``flax.linen.intercept_methods`` (a scoped,
public hook) and returns, besides ``fn``'s output, ``{kernel path: input}`` for every
``nn.Dense``/``nn.DenseGeneral`` called.  Used inside ``jax.jit`` with a reducer that folds each
input into fixed-size statistics, so activations are never all kept.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn


def module_kernel_path(mod: nn.Module, prefix: str = "") -> str:
  return "/".join(p for p in (prefix, *map(str, mod.path), "kernel") if p)


def capture_dense_inputs(fn: Callable[..., Any], *args, prefix: str = "",
                         reduce: Callable[[str, Any], Any] | None = None, **kwargs
                         ) -> tuple[Any, dict[str, Any]]:
  """Runs ``fn(*args, **kwargs)`` and returns ``(output, {kernel path: reduce(path, x)})``.

  Args:
    fn: calls a linen module's ``apply`` (the module is not modified).
    prefix: prepended to the module paths (e.g. ``"params/layers_3"`` when ``fn`` applies one
      block on its own).
    reduce: maps each captured input (``(..., K)``) to what is kept; identity by default.  If a
      layer runs several times, the captured values are kept in a list.
  """
  found: dict[str, Any] = {}

  def interceptor(next_fun, a, kw, context):
    mod = context.module
    if context.method_name == "__call__" and isinstance(mod, (nn.Dense, nn.DenseGeneral)) and a:
      path = module_kernel_path(mod, prefix)
      val = a[0] if reduce is None else reduce(path, a[0])
      if path in found:
        prev = found[path]
        found[path] = (prev if isinstance(prev, list) else [prev]) + [val]
      else:
        found[path] = val
    return next_fun(*a, **kw)

  with nn.intercept_methods(interceptor):
    out = fn(*args, **kwargs)
  return out, found
