"""``explain``: which path each layer of a (quantized) Flax model takes, traced abstractly.

Nothing is computed: the model is traced with ``jax.eval_shape`` while the adapters report each
layer's :class:`~jq.nn.common.Route` (float, weight-only reference, int8 dynamic/static, kernel
name) and ``jq.ops`` adds its performance note.
"""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import flax.linen
from flax import nnx

from jq.nn import common, linen
from jq.ops.policy import KernelPolicy, maybe_policy
from jq.nn import nnx as jnnx
from jq.spec import Rule
from jq.tree import check_rules, leaves_with_paths

Route = common.Route


def _nnx_routes(model: nnx.Module, args, kwargs, backend) -> list[Route]:
  """nnx: runnable layers take their quantized classes (which report float kernels too); layers
  jq cannot run get a class that reports them as float with the reason; all in call order."""
  clone = jnnx.with_quantized_classes(model)
  for m in jnnx.module_layers(clone):
    if m.layout is None:
      m.layer.__class__ = _reporting_class(type(m.layer), m.path, m.reason, m.variable)
  graphdef, state = nnx.split(clone)
  with common.recording(backend) as routes:
    linen.abstract_call(lambda st, *a, **k: nnx.merge(graphdef, st)(*a, **k), state, *args,
                        **kwargs)
  routes = _dedupe(routes)
  called = {r.path for r in routes}
  for m in jnnx.module_layers(clone):
    if m.path not in called:
      routes.append(Route(m.path, type(m.layer).__name__, "?", "not called", "-",
                          reason=m.reason))
  return routes


def _reporting_class(cls: type, path: str, reason: str, var) -> type:
  def __call__(self, *a, **k):  # pylint: disable=invalid-name
    common.record_float(path, cls.__name__, getattr(var.get_value(), "dtype", "float32"),
                        reason=reason)
    return cls.__call__(self, *a, **k)
  return type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})


def _linen_routes(model: Any, args, kwargs, backend) -> list[Route]:
  """linen: the adapters report adapted layers; kernels (rank >= 2 params) of other modules are
  inserted as float, with the reason, where their module was first called."""
  variables = args[0]
  marks: list[tuple[int, str, str]] = []   # (position in routes, module path, class)
  with common.recording(backend) as routes:
    def icpt(next_fun, a, kw, context):
      if context.method_name == "__call__":
        mod = context.module
        marks.append((len({r.path for r in routes}), "/".join(("params",) + tuple(map(str, mod.path))),
                      type(mod).__name__))
      return next_fun(*a, **kw)
    with flax.linen.intercept_methods(icpt):
      linen.abstract_call(linen.quantized_apply(model), *args, **kwargs)
  routes = _dedupe(routes)
  have = {r.path for r in routes}
  owner_at = {}
  for pos, mpath, cls in marks:
    owner_at.setdefault(mpath, (pos, cls))
  extra = []
  for path, leaf in leaves_with_paths(variables):
    if path in have or len(getattr(leaf, "shape", ())) < 2 or not path.startswith("params/"):
      continue
    mpath, _, name = path.rpartition("/")
    if mpath not in owner_at or name in ("embedding", "scale", "bias"):
      continue
    pos, cls = owner_at[mpath]
    if _not_a_kernel_owner(cls):
      continue
    extra.append((pos, Route(path, cls, str(getattr(leaf, "dtype", "?")), "float", "float",
                             reason=f"{cls} runs its own code on this parameter (jq runs "
                                    f"{linen.LAYER_NAMES})")))
  out = []
  for i, r in enumerate(routes):
    out.extend(e for pos, e in extra if pos == i)
    out.append(r)
  return out + [e for pos, e in extra if pos >= len(routes)]


def _not_a_kernel_owner(cls_name: str) -> bool:
  """Modules whose own params are not kernels of a matmul (embeddings, norms)."""
  return cls_name in ("Embed", "LayerNorm", "RMSNorm", "GroupNorm", "BatchNorm")


def _dedupe(routes: Sequence[Route]) -> list[Route]:
  """The first route of each (parameter, method): an embedding table has its lookup's and, as a
  tied head, its ``attend``'s."""
  seen, out = set(), []
  for r in routes:
    key = (r.path, r.layer.split("(")[0].endswith(".attend"))
    if key not in seen:
      seen.add(key)
      out.append(r)
  return out


def trace_routes(model: Any, *args, backend: str | None = None,
                 policy: "KernelPolicy | bool | str | None" = None, **kwargs) -> list[Route]:
  """The routes of every layer with a kernel (first call of each), in call order.

  Args:
    model: a linen module or apply function (then ``args[0]`` is the variables dict), or an nnx
      module (typically from :func:`jq.nn.quantize_module`).  Parameters and inputs may be
      ``jax.ShapeDtypeStruct`` (e.g. ``jax.eval_shape`` of ``quantize_tree``): nothing is computed.
    *args, **kwargs: what you would pass to ``apply`` / call the nnx module with.
    backend: explain for this backend ("cpu", "gpu", "tpu") instead of the default one.
    policy: explain under this :class:`jq.KernelPolicy` (default: the current one; a policy given
      to ``quantized_apply``/``quantize_module`` takes precedence, as when the model runs).
  """
  if not isinstance(model, nnx.Module) and not args:
    raise ValueError("explain: a linen model needs its variables as the first argument")
  with maybe_policy(policy):
    if isinstance(model, nnx.Module):
      return _nnx_routes(model, args, kwargs, backend)
    return _linen_routes(model, args, kwargs, backend)


def format_routes(routes: Sequence[Route]) -> str:
  """A plain-text table of routes; layers expected to run slower than float are flagged."""
  head = ("path", "layer", "weight", "mode", "impl", "M", "note")
  body = [(r.path, r.layer.split("(")[0], r.weight, r.mode, r.impl,
           "-" if r.m is None else str(r.m),
           ("WARNING slower than float: " if r.slower_than_float else "") +
           (r.note.text if r.note else "") + r.reason) for r in routes]
  widths = [max(len(c) for c in col) for col in zip(head, *body)]
  line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
  out = [line(head), line(["-" * w for w in widths])] + [line(b) for b in body]
  n_q = sum(r.mode != "float" for r in routes)
  n_slow = sum(r.slower_than_float for r in routes)
  out.append(f"{n_q} quantized / {len(routes) - n_q} float layers; {n_slow} expected slower "
             "than float")
  return "\n".join(out)


def explain(model: Any, *args, backend: str | None = None, file: TextIO | None = sys.stdout,
            policy: "KernelPolicy | bool | str | None" = None,
            rules: Sequence[Rule] | None = None, **kwargs) -> list[Route]:
  """Prints, for each layer, the path it takes (float, weight-only reference, int8 dynamic, int8
  static, or a registered kernel's name) and warns where it is expected to be slower than float.

  Invariant: the routes are the ones ``jq.ops`` takes when the same call runs (the choice is a
  trace-time function of static shapes), so ``explain`` costs one abstract trace, no compute.

  Args:
    model: linen ``Module``/``apply`` (then pass ``variables, *inputs``) or an nnx module
      (then pass ``*inputs``).
    backend: explain for another backend than ``jax.default_backend()``.
    file: where to print (None: don't print).
    policy: the kernel policy to explain under (see :func:`trace_routes`).
    rules: the rules the model was quantized with: each float layer then says why (the rule
      that keeps it float, or that no rule matches it).

  Example:
    >>> jq.explain(model, qvars, tokens)                 # linen
    >>> jq.explain(qmodel, tokens, rules=rules)          # why each float layer is float
    >>> jq.explain(qmodel, tokens, backend="gpu")        # nnx, as it would run on a GPU

  Returns:
    The list of :class:`Route` rows.
  """
  routes = trace_routes(model, *args, backend=backend, policy=policy, **kwargs)
  if rules is not None:
    routes = [r if r.mode != "float" or r.reason else
              dataclasses.replace(r, reason=_float_by(r.path, check_rules(rules)))
              for r in routes]
  if file is not None:
    print(format_routes(routes), file=file)
  return routes


def _float_by(path: str, rules: Sequence[Rule]) -> str:
  """Why the rules leave the kernel at ``path`` float."""
  rule = next((r for r in rules if r.matches(path)), None)
  if rule is None:
    return "no rule matches it"
  if rule.weight is None:
    return f"kept float by rule {rule.pattern!r}"
  return f"float in these parameters, though rule {rule.pattern!r} would quantize it"


__all__ = ["explain", "format_routes", "trace_routes", "Route"]
