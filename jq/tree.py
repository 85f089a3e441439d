"""Rules over parameter pytrees: plan, quantize, dequantize, report.

Paths are '/'-joined keys (``params/layers_0/attn/q_proj/kernel``); the same strings arise for
linen variable dicts and nnx state (the trailing ``value`` of an nnx Variable is dropped).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jq import metrics
from jq.layout import Layout
from jq.qarray import ActivationQuant, QArray, check_activation_scale, dequantize
from jq.quantize import _quantize_checked, check_float_input
from jq.spec import ActivationSpec, ActMode, Algorithm, Granularity, Rule

PyTree = Any


def _key_str(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def path_str(keypath: Sequence[Any]) -> str:
  """'/'-joined path of a ``tree_flatten_with_path`` key path (nnx ``value`` suffix dropped)."""
  parts = [_key_str(k) for k in keypath]
  if parts and parts[-1] in ("value", "raw_value"):
    parts = parts[:-1]
  return "/".join(parts)


def is_qarray(x) -> bool:
  return isinstance(x, QArray)


def leaves_with_paths(tree: PyTree) -> list[tuple[str, Any]]:
  """``[(path, leaf)]`` with QArrays as leaves."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_qarray)
  return [(path_str(kp), leaf) for kp, leaf in flat]


def map_with_paths(fn: Callable[[str, Any], Any], tree: PyTree) -> PyTree:
  """``tree_map`` with the '/'-joined path as first argument (QArrays are leaves)."""
  return jax.tree_util.tree_map_with_path(lambda kp, x: fn(path_str(kp), x), tree,
                                          is_leaf=is_qarray)


@dataclasses.dataclass(frozen=True)
class LayerPlan:
  """What the rules decided for one leaf."""
  path: str
  shape: tuple[int, ...]
  dtype: str
  rule: Rule | None  # None: no rule matched (left in float)

  @property
  def quantized(self) -> bool:
    return self.rule is not None and self.rule.weight is not None


def check_rules(rules: Any) -> tuple[Rule, ...]:
  """``rules`` as a tuple of :class:`jq.Rule` (a single Rule, a spec or a string is refused)."""
  if isinstance(rules, (Rule, str)) or not hasattr(rules, "__iter__"):
    raise ValueError(f"rules must be a list or tuple of jq.Rule, got a {type(rules).__name__}"
                     + (" (wrap one rule: (rule,))" if isinstance(rules, Rule) else "")
                     + (f" (a recipe name? jq.recipe_rules({rules!r:.40}))"
                        if isinstance(rules, str) else ""))
  rules = tuple(rules)
  bad = [r for r in rules if not isinstance(r, Rule)]
  if bad:
    raise ValueError(f"rules must be jq.Rule objects; got a {type(bad[0]).__name__} "
                     f"({bad[0]!r:.80}); build one with jq.Rule(pattern=..., weight=spec)")
  return rules


def plan(params: PyTree, rules: Sequence[Rule]) -> list[LayerPlan]:
  """Matches every leaf against the ordered rules (first match wins).

  Raises:
    ValueError: a required rule matched no leaf (usually a typo in its pattern).
  """
  rules = check_rules(rules)
  used = [False] * len(rules)
  out = []
  for path, leaf in leaves_with_paths(params):
    rule = None
    for i, r in enumerate(rules):
      if r.matches(path):
        rule, used[i] = r, True
        break
    shape = tuple(getattr(leaf, "shape", ()))
    out.append(LayerPlan(path, shape, str(getattr(leaf, "dtype", type(leaf).__name__)), rule))
  missing = [r.pattern for r, u in zip(rules, used) if r.required and not u]
  if missing:
    sample = ", ".join(p.path for p in out[:6])
    raise ValueError(f"rule pattern(s) {missing} matched no parameter; paths look like: {sample}")
  return out


def _check_rule_fits(path: str, leaf, rule: Rule) -> None:
  spec = rule.weight
  where = f"{path}: shape {tuple(leaf.shape)} dtype {leaf.dtype}"
  if leaf.ndim < 2 and spec.granularity is not Granularity.TENSOR:
    raise ValueError(f"{where}: per-channel/group quantization of a rank-{leaf.ndim} tensor; "
                     "skip it with a rule (weight=None) or use Granularity.TENSOR")
  if rule.algorithm is not Algorithm.RTN:
    raise ValueError(f"{where}: the rule asks for {rule.algorithm.value}, which needs "
                     "calibration data; use "
                     "jq.ptq.quantize_model(model, variables, rules, batches) instead of "
                     "quantize_tree (on the command line: jq-quant quantize --recipe NAME or "
                     "--rules FILE)")


def quantize_tree(params: PyTree, rules: Sequence[Rule], *,
                  act_scales: Mapping[str, tuple[jax.Array, jax.Array | None]] | None = None,
                  layouts: Mapping[str, Layout] | None = None,
                  nan_policy: str = "raise") -> PyTree:
  """Returns ``params`` with every leaf that a rule quantizes replaced by a :class:`QArray`.

  Pure and jittable (rules are static); under ``jax.jit`` with sharded inputs each leaf keeps its
  sharding.  Leaves skipped by a rule, or matched by none, are returned unchanged.

  Args:
    params: a pytree of arrays (linen variables, or nnx state).
    rules: ordered rules; first match wins; see :func:`jq.spec.default_rules`.
    act_scales: for rules with static activation quantization, ``{kernel path: (scale, zp)}`` from
      calibration (see ``jq.calibrate``); stacked kernels take one scale per stacked layer.
    layouts: ``{kernel path: Layout}``, the roles of each kernel's axes in the layer that uses it
      (from ``jq.nn.layouts``).  Without it a 2-D kernel is read as Dense ``(in, out)`` and a kernel
      of higher rank needs a spec that names its axes.  With it, every quantized path needs an
      entry (a missing one means no layer jq can run quantized uses that parameter).
    nan_policy: ``"raise"`` (default): a quantized leaf with NaN/Inf values is an error (checked
      on concrete leaves; under ``jit`` inside ``jq.qarray.checked()``); ``"zero"``: they are
      quantized as 0 (see :func:`jq.quantize`).

  Example:
    >>> qparams = quantize_tree(params, default_rules(W4A16_G128))
    >>> qvars = quantize_tree(variables, rules, layouts=jq.nn.layouts(model, variables, x))
  """
  rules = check_rules(rules)
  decided = {p.path: p for p in plan(params, rules)}
  act_scales = dict(act_scales or {})
  layouts = None if layouts is None else dict(layouts)

  def one(path, leaf):
    pl = decided[path]
    if not pl.quantized or isinstance(leaf, QArray):
      return leaf
    return quantize_leaf(path, leaf, pl.rule, layouts=layouts, act_scale=act_scales.get(path),
                         nan_policy=nan_policy)

  return map_with_paths(one, params)


def leaf_layout(path: str, leaf, layouts: Mapping[str, Layout] | None) -> Layout | None:
  """The layout ``quantize_tree`` uses for ``path`` (None without ``layouts``).

  Raises:
    ValueError: ``layouts`` is given but has no entry for ``path``.
  """
  if layouts is None:
    return None
  if path not in layouts:
    raise ValueError(f"{path}: shape {tuple(leaf.shape)} dtype {leaf.dtype}: no layer that jq "
                     "runs quantized uses this parameter (it has no layout); keep it in float "
                     f"with Rule(pattern={path!r}, weight=None)")
  return layouts[path]


def quantize_leaf(path: str, leaf, rule: Rule, *, layouts: Mapping[str, Layout] | None = None,
                  act_scale: tuple[jax.Array, jax.Array | None] | None = None,
                  nan_policy: str = "raise") -> QArray:
  """One leaf as :func:`quantize_tree` quantizes it under ``rule`` (its first matching rule, which
  quantizes): value checks, the rule's fit, the layout, then the activation spec attached.  The
  streamed road (``jq.stream``) calls this per tensor (or per column chunk)."""
  leaf = check_float_input(leaf, path, nan_policy)  # once per leaf: reads the whole tensor
  _check_rule_fits(path, leaf, rule)
  layout = leaf_layout(path, leaf, layouts)
  q = _quantize_checked(jnp.asarray(leaf), rule.weight, name=path, layout=layout)
  return with_activation(q, rule.activation, act_scale, path=path, leaf=leaf)


def with_activation(q: QArray, act: ActivationSpec | None,
                    scale_zp: tuple[jax.Array, jax.Array | None] | None, *, path: str,
                    leaf) -> QArray:
  """``q`` carrying how its layer's input is quantized (the one place this is attached):
  nothing for weight-only, the dynamic marker, or the calibrated static ``(scale, zero_point)``.

  Raises:
    ValueError: naming the path, shape and dtype, when static mode has no calibrated scale, or
      one that is not finite and positive (or a zero point outside the qtype's range).
  """
  if act is None:
    return q
  if act.mode is ActMode.STATIC:
    if scale_zp is None:
      raise ValueError(f"{path}: shape {tuple(leaf.shape)} dtype {leaf.dtype}: static activation "
                       "quantization needs a calibrated input scale; run jq.calibrate first")
    s, z = scale_zp
    where = f"{path}: shape {tuple(leaf.shape)} dtype {leaf.dtype}"
    s, z = (_per_stacked_layer(v, leaf.shape, where) for v in (s, z))
    check_activation_scale(s, z, act, where)
    aq = ActivationQuant(scale=jnp.asarray(s, jnp.float32), zero_point=z, spec=act)
  else:
    aq = ActivationQuant(scale=None, zero_point=None, spec=act)
  return dataclasses.replace(q, activation=aq)


def _per_stacked_layer(v, shape: Sequence[int], where: str):
  """A flat ``(n,)`` per-layer activation scale (or zero point) of a kernel stacked on several
  leading axes (``nn.scan`` over ``nn.vmap`` experts: ``(L, E, ...)``, n = L·E in row-major
  order) shaped ``(L, E)``, so each stack level slices its own axis."""
  if v is None or np.ndim(v) != 1 or np.size(v) == 1:
    return v
  n, lead = int(np.size(v)), 1
  for k, d in enumerate(shape):
    lead *= int(d)
    if lead == n:
      return jnp.reshape(v, tuple(shape[:k + 1]))
    if lead > n:
      break
  raise ValueError(f"{where}: {n} static activation scales (one per stacked layer) do not match "
                   "the kernel's leading (stacked) axes (a stack on a later axis, e.g. "
                   "nn.scan(..., variable_axes={'params': 1}), takes no static activation scales: "
                   "stack the layers on axis 0, or quantize their inputs dynamically)")


def dequantize_tree(tree: PyTree, dtype=jnp.float32) -> PyTree:
  """Replaces every QArray by its dequantized array in ``dtype``; other leaves unchanged."""
  return map_with_paths(lambda p, x: dequantize(x, dtype, name=p) if is_qarray(x) else x, tree)


def nbytes(tree: PyTree) -> int:
  """Bytes of storage of a tree (QArrays counted packed)."""
  total = 0
  for _, leaf in leaves_with_paths(tree):
    if is_qarray(leaf):
      total += leaf.nbytes
    elif hasattr(leaf, "dtype"):
      total += int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
  return total


@dataclasses.dataclass(frozen=True)
class LayerReport:
  path: str
  shape: tuple[int, ...]
  spec: str
  mse: float
  sqnr_db: float
  bytes_before: int
  bytes_after: int


def report(params: PyTree, qparams: PyTree, stored: PyTree | None = None) -> list[LayerReport]:
  """Per quantized leaf: error metrics of the dequantized weight against the float one (``params``),
  and sizes: ``bytes_before`` of ``stored``'s leaf where given (the model as loaded: AWQ and
  SmoothQuant hand back ``params`` folded in float32 from a bfloat16 / float16 checkpoint),
  else of ``params``'."""
  ref = dict(leaves_with_paths(params))
  quantized_ref = [p for p, x in ref.items() if is_qarray(x)]
  if quantized_ref and not any(is_qarray(q) for _, q in leaves_with_paths(qparams)):
    raise ValueError(f"report: the float tree holds quantized leaves ({quantized_ref[0]}"
                     f"{', ...' if quantized_ref[1:] else ''}) and the quantized tree none; "
                     "swapped arguments? jq.report(float_params, quantized_params)")
  sizes = {p: int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
           for p, x in leaves_with_paths(params if stored is None else stored)}
  rows = []
  for path, q in leaves_with_paths(qparams):
    if not is_qarray(q):
      continue
    if path not in ref:
      raise ValueError(f"report: {path} is quantized but missing from the float tree")
    w = ref[path]
    if is_qarray(w):
      raise ValueError(f"report: {path} is quantized in the float tree too; pass the float "
                       "parameters first: jq.report(float_params, quantized_params)")
    deq = dequantize(q, jnp.float32)
    desc = f"{q.qtype.value} tile={'x'.join(map(str, q.tile))}"
    desc += "" if q.zero_point is None else " asym"
    desc += "" if q.activation is None else f" {q.activation.spec.describe()}"
    rows.append(LayerReport(path, tuple(q.shape), desc, float(metrics.mse(w, deq)),
                            float(metrics.sqnr(w, deq)),
                            sizes.get(path, int(np.prod(w.shape)) * np.dtype(w.dtype).itemsize),
                            q.nbytes))
  return rows


def format_report(rows: Sequence[LayerReport], *, limit: int | None = None) -> str:
  """A plain-text table of a :func:`report` (worst SQNR first when ``limit`` is set)."""
  all_rows = list(rows)
  if limit is not None:
    rows = sorted(all_rows, key=lambda r: r.sqnr_db)[:limit]
  head = ("path", "shape", "spec", "MSE", "SQNR dB", "bytes before", "bytes after")
  body = [(r.path, "x".join(map(str, r.shape)), r.spec, f"{r.mse:.3e}", f"{r.sqnr_db:.2f}",
           f"{r.bytes_before:,}", f"{r.bytes_after:,}") for r in rows]
  widths = [max(len(str(x)) for x in col) for col in zip(head, *body)] if body else [len(h) for h in head]
  line = lambda cells: "  ".join(str(c).ljust(w) if i < 3 else str(c).rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths)))
  out = [line(head), line(["-" * w for w in widths])] + [line(b) for b in body]
  if all_rows:
    before, after = sum(r.bytes_before for r in all_rows), sum(r.bytes_after for r in all_rows)
    out.append(f"{len(all_rows)} quantized tensors: {before:,} -> {after:,} bytes "
               f"({after / max(before, 1):.3f}x)")
  return "\n".join(out)


def tree_error(params: PyTree, qparams: PyTree) -> dict[str, float]:
  """Error metrics over all quantized leaves together (concatenated)."""
  rows = report(params, qparams)
  ref = dict(leaves_with_paths(params))
  q = dict(leaves_with_paths(qparams))
  a = jnp.concatenate([jnp.ravel(ref[r.path]).astype(jnp.float32) for r in rows]) if rows else jnp.zeros(0)
  b = jnp.concatenate([jnp.ravel(dequantize(q[r.path])) for r in rows]) if rows else jnp.zeros(0)
  return metrics.error_stats(a, b) if rows else {}
