"""Scale groups for AWQ/SmoothQuant: found from the traced model, folded exactly, always checked.

A *group* is a set of linear layers reading one input ``x`` (q/k/v after a norm; gate/up) and the
module producing ``x``.  ``y = x W = (x / s)(diag(s) W)`` holds for any positive ``s``; the division
is folded into the producer: an elementwise-affine module (a norm: every parameter of it whose last
axis is ``K``, so scale *and* bias), or a linear layer (its output channels: kernel columns *and*
bias), possibly through operations that are linear per channel (attention's weighted sum of ``v``,
reshapes of heads, ``act(gate) * up``).

Groups are *found*, not declared: the producer is the module whose output is the consumers' input
in one abstract trace; where there is none (or it cannot take them), earlier linear layers and
elementwise-affine modules of the same block with the right number of channels are candidates.  A candidate counts only if folding random
scales into it leaves the float model's outputs unchanged (relative error ≤ ``1e-4``; a wrong fold
changes them by orders of magnitude more).  After the real scales are folded, the float model is
compared with the original again (≤ ``jq.algorithms.fold.FOLD_TOLERANCE``, 1e-5); a group that does not hold is reverted and reported
by name, never applied silently.
"""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jq.algorithms.fold import relative_error
from jq.layout import Layout
from jq.ptq.matrices import MatrixView
from jq.ptq.targets import Call, Target
from jq.tree import leaves_with_paths, map_with_paths

PyTree = Any
DISCOVERY_TOL = 1e-4
MAX_CANDIDATES = 6


@dataclasses.dataclass(frozen=True)
class Group:
  """Consumers of one input and where their scales fold.

  Attributes:
    producer: the producing module's path.
    kind: ``"affine"`` (divide ``params`` along their last axis) or ``"linear"`` (divide the
      kernel's output channels and its bias).
    params: leaf paths divided by ``s``.
    consumers: kernel paths whose input channels are multiplied by ``s``.
    offset: an affine producer multiplies by ``offset + param`` (Gemma's RMSNorm stores
      ``scale - 1``): the fold is ``param -> (offset + param) / s - offset``. Tried, and checked like
      any candidate, only after the plain fold (offset 0) fails on a one-parameter norm.
    rows: rows of ``s`` (``(rows, K)``; 1: ``(K,)``): the producer's stacked layers.  Consumers
      stacked ``n`` deep take row ``i // (n // rows)`` in their layer ``i``: ``rows == n`` for
      layers of a scan, fewer where stacked consumers read one input (``nn.vmap`` experts with
      ``in_axes=None`` after one norm: one row for all of them, as AutoAWQ scales Mixtral's
      experts; under a scan, a row per scanned layer).
    passive: float (unquantized) layers that read the same input (an MoE router): their rows are
      multiplied by ``s`` too, so that they compute what they did, and they take no part in
      choosing ``s``.
    mixed: the consumers read different inputs that the producer's output reaches through
      per-token operations (the experts of a mixture, each reading the tokens routed to it):
      ``s`` is chosen from all of their inputs together, as AutoAWQ scales Mixtral's experts.
  """
  producer: str
  kind: str
  params: tuple[str, ...]
  consumers: tuple[str, ...]
  offset: float = 0.0
  rows: int = 1
  passive: tuple[str, ...] = ()
  mixed: bool = False

  def describe(self) -> str:
    def names(paths):
      parts = [c.rsplit("/", 2)[-2] for c in paths]
      if len(parts) <= 6:
        return "+".join(parts)
      counts = {p: parts.count(p) for p in dict.fromkeys(parts)}
      return "+".join(f"{p} x{n}" for p, n in counts.items())
    float_ = f" (and {names(self.passive)}, kept float)" if self.passive else ""
    return f"{self.producer} -> {names(self.consumers)}{float_}"


def _leaves(tree) -> dict[str, Any]:
  return dict(leaves_with_paths(tree))


def replace_leaves(tree: PyTree, new: Mapping[str, Any]) -> PyTree:
  """``tree`` with the leaves at ``new``'s paths replaced."""
  return map_with_paths(lambda p, x: new.get(p, x), tree)


def _per_layer(s: jax.Array, n: int) -> jax.Array:
  """``s`` (``(K,)`` or ``(rows, K)``) as ``(n, K)``: row ``i // (n // rows)`` for layer ``i``."""
  s2 = jnp.asarray(s, jnp.float32).reshape(-1, s.shape[-1])
  return jnp.repeat(s2, n // s2.shape[0], axis=0)


def layer_row(s, layer: int, n: int) -> np.ndarray:
  """The row of ``s`` (``(K,)`` or ``(rows, K)``) that a consumer stacked ``n`` deep applies in its
  ``layer``."""
  s2 = np.asarray(s).reshape(-1, np.shape(s)[-1])
  return s2[layer // (n // len(s2))]


def wide_dtype(dtype) -> Any:
  """The dtype a folded (or dequantized, for later blocks to run on) leaf keeps: float32 for
  bfloat16/float16 leaves (rounding folded values back to 8 mantissa bits would change the model
  by ~1e-3, far above the fold check's tolerance, and every fold of a bf16 checkpoint would be
  skipped), else the leaf's own."""
  dt = jnp.dtype(dtype)
  return jnp.dtype(jnp.float32) if jnp.issubdtype(dt, jnp.floating) and dt.itemsize < 4 else dt


def folded(target: Target, params: PyTree, group: Group, s: jax.Array) -> dict[str, Any]:
  """The leaves a fold of ``s`` (``(K,)``, or ``(L, K)`` per stacked layer) changes (in float32
  where they were stored in a narrower float: see :func:`wide_dtype`)."""
  leaves = _leaves(params)
  out = {}
  for c in group.consumers + group.passive:
    view = MatrixView(tuple(leaves[c].shape), target.layouts[c])
    m = view.matrices(leaves[c].astype(jnp.float32)) * _per_layer(s, view.n)[:, :, None]
    out[c] = view.kernel(m).astype(wide_dtype(leaves[c].dtype))
  if group.kind == "linear":
    kpath = group.params[0]
    view = MatrixView(tuple(leaves[kpath].shape), target.layouts[kpath])
    inv = 1.0 / _per_layer(s, view.n)
    m = view.matrices(leaves[kpath].astype(jnp.float32)) * inv[:, None, :]
    out[kpath] = view.kernel(m).astype(wide_dtype(leaves[kpath].dtype))
    for b in group.params[1:]:
      bias = leaves[b]
      out[b] = (bias.astype(jnp.float32).reshape(view.n, view.out) * inv).reshape(
          bias.shape).astype(wide_dtype(bias.dtype))
  else:
    for p in group.params:
      x = leaves[p]
      k = x.shape[-1]
      sv = jnp.asarray(s, jnp.float32)
      sv = sv.reshape(sv.shape[:-1] + (1,) * (x.ndim - sv.ndim) + (k,)) if sv.ndim > 1 else sv
      out[p] = ((x.astype(jnp.float32) + group.offset) / sv
                - group.offset).astype(wide_dtype(x.dtype))
  return out


def relative_change(target: Target, params: PyTree, changed: PyTree, batches,
                    reference: Sequence[Any] | None = None, run=None) -> float:
  """Max over ``batches`` of ``||f(changed) − f(params)|| / ||f(params)||`` (float32)."""
  run = run or jax.jit(target.run)
  worst = 0.0
  for i, b in enumerate(batches):
    ref = run(params, b) if reference is None else reference[i]
    worst = max(worst, relative_error(ref, run(changed, b)))
  return worst


def apply_folds(target: Target, params: PyTree, folds: Sequence[tuple[Group, jax.Array]]
                ) -> PyTree:
  """``params`` with the folds applied one after another (a kernel may be both a consumer of one
  group, scaled by rows, and the producer of another, scaled by columns: the two commute)."""
  for g, s in folds:
    params = replace_leaves(params, folded(target, params, g, s))
  return params


def _k_of(target: Target, leaves, kernel: str) -> int:
  """Input channels (flattened contracting axes) of a kernel."""
  return MatrixView(tuple(leaves[kernel].shape), target.layouts[kernel]).k


def _stack(target: Target, kernel: str) -> int:
  return target.stacks.get(kernel, 1)


def find_groups(target: Target, params: PyTree, consumers: Sequence[str], batch,
                check_batches, log: list[str], *, float_layers: Sequence[str] = (),
                seed: int = 0) -> list[Group]:
  """Scale groups covering ``consumers`` (kernel paths), found and verified (see module doc).

  ``float_layers``: kernels kept in float; those reading a group's input are its ``passive``
  members.  Consumers whose input has no verified producer are left out, with a line in ``log``.
  """
  calls = target.calls(params, batch)
  leaves = _leaves(params)
  first: dict[str, tuple[int, Call]] = {}
  for i, c in enumerate(calls):
    first.setdefault(c.module, (i, c))
  readers: dict[int, list[str]] = {}   # input id -> float kernels reading it
  for k in float_layers:
    mod = k.rpartition("/")[0]
    if mod in first and first[mod][1].input_id and k in leaves:
      readers.setdefault(first[mod][1].input_id, []).append(k)
  by_input: dict[int, list[str]] = {}
  pos: dict[int, int] = {}
  for k in consumers:
    mod = k.rpartition("/")[0]
    if mod not in first or not first[mod][1].input_id:
      log.append(f"{k}: no traced input; AWQ/SmoothQuant scales not applied")
      continue
    i, call = first[mod]
    by_input.setdefault(call.input_id, []).append(k)
    pos[call.input_id] = min(pos.get(call.input_id, i), i)
  run = jax.jit(target.run)
  refs = [run(params, b) for b in check_batches]
  why = _low_precision(refs)
  rng = np.random.default_rng(seed)
  pending = {}   # input id -> (candidate iterator, random scales, members)
  for input_id, members in by_input.items():
    k = _k_of(target, leaves, members[0])
    n = _stack(target, members[0])
    if any(_k_of(target, leaves, m) != k or _stack(target, m) != n for m in members):
      log.append(f"{'+'.join(members)}: consumers of one input disagree on K or stacking; skipped")
      continue
    s = jnp.asarray(np.exp(rng.uniform(-1, 1, (n, k))), jnp.float32)
    passive = _passive(target, leaves, readers.get(input_id, ()), k)
    pending[input_id] = (iter(_with_passive(target, leaves, _candidates(
        target, leaves, calls, input_id, pos[input_id], members, k, n), passive)), s, members)
  verify = lambda trial: verify_folds(target, params, trial, check_batches, refs, run,
                                      DISCOVERY_TOL)
  found, failed = _first_verified(pending, verify)
  # inputs no producer takes alone may be per-token copies of one output (the experts of a
  # mixture, each reading the tokens routed to it): tried together, with one row of scales
  merged, order = {}, []
  for key, ids in _by_block(failed, pending, target, leaves).items():
    members = tuple(m for i in ids for m in pending[i][2])
    k, n = _k_of(target, leaves, members[0]), _stack(target, members[0])
    cands = _merged_candidates(target, leaves, calls, first, readers, ids, members, k, n)
    merged[key] = (iter(cands), pending[ids[0]][1], members)
    order.append((key, ids))
  together, _ = _first_verified(merged, verify)
  for key, ids in order:
    if key in together:
      found[ids[0]] = together[key]
      failed = [i for i in failed if i not in ids]
  if failed and not why:   # (outputs cast to float32 at the end: the layers may still be 16-bit)
    why = _low_precision_inputs(target, params, check_batches[0],
                                {m.rpartition("/")[0] for i in failed for m in pending[i][2]})
  for i in failed:
    log.append(f"{'+'.join(pending[i][2])}: no producer of their input could take the scales "
               "(none found, or folding changed the model); AWQ/SmoothQuant scales not applied"
               + why)
  if why and failed:
    warnings.warn("AWQ/SmoothQuant: no scales applied where folding failed" + why, stacklevel=3)
  return [found[i] for i in by_input if i in found]


def _first_verified(pending, verify) -> tuple[dict[Any, Group], list[Any]]:
  """``(found, failed)``: for each key of ``pending`` (``key -> (candidate iterator, random
  scales, members)``), its first candidate whose fold keeps the float model (all keys' current
  candidates checked together), or the key in ``failed`` when none does."""
  found: dict[Any, Group] = {}
  failed = []
  current = {i: next(it, None) for i, (it, _, _) in pending.items()}
  while current:
    trial = {i: (c, _rows_of(pending[i][1], c.rows)) for i, c in current.items()
             if c is not None}
    ok = verify(trial) if trial else {}
    for i in trial:
      if ok[i]:
        found[i] = current.pop(i)
      else:
        current[i] = next(pending[i][0], None)
    for i in [i for i, c in current.items() if c is None]:
      failed.append(i)
      del current[i]
  return found, failed


def _by_block(failed, pending, target: Target, leaves) -> dict[tuple, list[int]]:
  """Inputs without a producer, by the module holding their consumers' modules
  (``layers_0/mlp`` for ``layers_0/mlp/experts_3/gate_proj/kernel``), where two or more of them
  with the same ``K`` and stacking share one."""
  out: dict[Any, list[int]] = {}
  for i in failed:
    members = pending[i][2]
    if _holder(members[0]):
      key = (_holder(members[0]), _k_of(target, leaves, members[0]), _stack(target, members[0]))
      out.setdefault(key, []).append(i)
  return {key: ids for key, ids in out.items() if len(ids) >= 2}


def _holder(kernel: str) -> str:
  """The module holding a kernel's module (``layers_0/mlp`` for
  ``layers_0/mlp/experts_3/gate_proj/kernel``)."""
  return kernel.rpartition("/")[0].rpartition("/")[0].rpartition("/")[0]


def _merged_candidates(target: Target, leaves, calls: Sequence[Call], first, readers,
                       ids: Sequence[int], members: Sequence[str], k: int, n: int):
  """Producer candidates for consumers reading several inputs (see :func:`_by_block`): the
  direct producers of any of them, then earlier modules of the block around their holder
  (``layers_0`` for ``layers_0/mlp``), each with the float kernels reading its output as
  ``passive`` and marked ``mixed``."""
  holder = _holder(members[0])
  before = min(first[m.rpartition("/")[0]][0] for m in members)
  block = holder.rpartition("/")[0]
  prefix = block + "/" if block else ""
  direct = [c for c in calls[:before] if c.output_id in set(ids)]
  scope = [c for c in reversed(calls[:before])
           if c.module.startswith(prefix) and not c.module.startswith(holder + "/")]
  seen, tried = set(), 0
  for c in direct + scope:
    if c.module in seen or tried >= MAX_CANDIDATES:
      continue
    seen.add(c.module)
    kernel = c.module + "/kernel"
    if kernel in target.layouts:
      gs = [_linear_group(target, leaves, kernel, tuple(members), k, n)]
    else:
      gs = _affine_groups(leaves, c.module, tuple(members), k, n)
    gs = [g for g in gs if g is not None]
    if not gs:
      continue
    tried += 1
    passive = _passive(target, leaves, readers.get(c.output_id, ()), k)
    yield from (dataclasses.replace(g, mixed=True)
                for g in _with_passive(target, leaves, gs, passive))


def _rows_of(s: jax.Array, rows: int) -> jax.Array:
  """A trial scale for a group of ``rows`` rows (``(K,)`` for one) from ``(n, K)`` random ones."""
  return s[0] if rows == 1 else s[:rows]


def _passive(target: Target, leaves, readers: Sequence[str], k: int) -> list[str]:
  """The float kernels among ``readers`` (of a group's input) with ``k`` input channels."""
  return [r for r in readers if r in target.layouts and _k_of(target, leaves, r) == k]


def _with_passive(target: Target, leaves, candidates, passive: Sequence[str]):
  """Each candidate with the float readers of its input whose stacking takes its rows."""
  for g in candidates:
    fit = tuple(p for p in passive if _matrices(target, leaves, p) % g.rows == 0)
    yield dataclasses.replace(g, passive=fit) if fit else g


def _matrices(target: Target, leaves, kernel: str) -> int:
  return MatrixView(tuple(leaves[kernel].shape), target.layouts[kernel]).n


def _low_precision(refs) -> str:
  """A note for the log when the model computes in a 16-bit float: there any fold moves the
  outputs by rounding (~1e-3 relative), far beyond the checks' tolerance, so none can be found."""
  return _low_note(jax.tree_util.tree_leaves(refs))


def _low_precision_inputs(target: Target, params: PyTree, batch, modules) -> str:
  """:func:`_low_precision` from the inputs of ``modules`` (the failed groups' consumers, traced
  abstractly): a model whose layers compute in bfloat16 may still return float32 (logits cast at
  the end), and its folds fail for the same reason."""
  seen = []
  def hook_for(path, _):
    if path not in modules:
      return None
    def hook(call, a, kw):
      seen.extend(x for x in jax.tree_util.tree_leaves(a[:1]) if hasattr(x, "dtype"))
      return call(*a, **kw)
    return hook
  try:
    jax.eval_shape(lambda p, b: target.run_hooked(p, b, hook_for), params, batch)
  except Exception:  # pylint: disable=broad-except  (only a note for the log is at stake)
    return ""
  return _low_note(seen)


def _low_note(arrays) -> str:
  low = sorted({str(x.dtype) for x in arrays
                if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32})
  if not low:
    return ""
  return (f" (the model computes in {'/'.join(low)}: a fold moves its outputs by rounding, more "
          f"than the check's {DISCOVERY_TOL:g}; calibrate an instance that computes in float32, "
          "e.g. dtype=jnp.float32 with the same parameters, to apply AWQ/SmoothQuant)")


def verify_folds(target: Target, params: PyTree, trial: Mapping[Any, tuple[Group, jax.Array]],
                 batches, refs, run, tol: float) -> dict[Any, bool]:
  """Which folds keep the float model's outputs (relative change ≤ ``tol``): the folds are
  checked together, and halved where together they fail (so a wrong one costs a few forwards,
  right ones almost none)."""
  out: dict[Any, bool] = {}

  def check(keys):
    changed = apply_folds(target, params, [trial[key] for key in keys])
    if relative_change(target, params, changed, batches, refs, run) <= tol:
      out.update({key: True for key in keys})
    elif len(keys) == 1:
      out[keys[0]] = False
    else:
      check(keys[:len(keys) // 2])
      check(keys[len(keys) // 2:])

  if trial:
    check(list(trial))
  return out


def _candidates(target: Target, leaves, calls: Sequence[Call], input_id: int, before: int,
                members: Sequence[str], k: int, n: int):
  """Producer candidates for an input: its direct producer first, then earlier linear layers of
  the same parent module with ``k`` output channels (latest first)."""
  consumers = tuple(members)
  direct = [c for c in calls[:before] if c.output_id == input_id]
  for c in reversed(direct):
    kernel = c.module + "/kernel"
    if kernel in target.layouts and kernel not in consumers:
      g = _linear_group(target, leaves, kernel, consumers, k, n)
      if g is not None:
        yield g
    else:
      yield from _affine_groups(leaves, c.module, consumers, k, n)
  # through operations linear per channel (attention, act(gate) * up, remat boundaries): earlier
  # modules of the same block, latest first, a few at most.  The block is the consumers'
  # grandparent module (layers_0/mlp/down -> layers_0), else their parent (an nnx.scan stack's
  # blocks/down -> blocks), else the whole model
  parent = members[0].rpartition("/")[0].rpartition("/")[0]
  block = parent.rpartition("/")[0] or parent
  prefix = block + "/" if block else ""
  seen, tried = {c.module for c in direct}, 0
  for c in reversed(calls[:before]):
    if tried >= MAX_CANDIDATES:
      break
    if c.module in seen or not c.module.startswith(prefix):
      continue
    seen.add(c.module)
    kernel = c.module + "/kernel"
    if kernel in target.layouts:
      gs = [] if kernel in consumers else [_linear_group(target, leaves, kernel, consumers, k, n)]
    else:
      gs = _affine_groups(leaves, c.module, consumers, k, n)
    gs = [g for g in gs if g is not None]
    if gs:
      tried += 1
      yield from gs


def _affine_groups(leaves, module: str, consumers, k: int, n: int) -> list[Group]:
  """The plain fold into an elementwise-affine module, then (one-parameter norms only) the fold
  into a norm that multiplies by ``1 + scale``.  Its parameters are ``(K,)`` (one row of scales)
  or ``(rows, K)`` per stacked layer, ``rows`` dividing the consumers' stacking ``n`` (a norm of
  each scanned layer before its ``nn.vmap`` experts: ``n = layers × experts``)."""
  def rows(v):
    return 1 if v.ndim == 1 else v.shape[0]
  params = [(p, v) for p, v in leaves.items() if p.rpartition("/")[0] == module
            and len(getattr(v, "shape", ())) >= 1 and v.shape[-1] == k
            and (v.ndim == 1 or v.ndim == 2 and 1 < v.shape[0] and n % v.shape[0] == 0)]
  out = []
  for r in sorted({rows(v) for _, v in params}, reverse=True):
    these = tuple(p for p, v in params if rows(v) == r)
    plain = Group(module, "affine", these, tuple(consumers), rows=r)
    out += [plain] + ([dataclasses.replace(plain, offset=1.0)] if len(these) == 1 else [])
  return out


def _linear_group(target: Target, leaves, kernel: str, consumers, k: int, n: int) -> Group | None:
  lay: Layout = target.layouts[kernel]
  view = MatrixView(tuple(leaves[kernel].shape), lay)
  if view.out != k or n % view.n or lay.batch and n == 1:
    return None
  bias = kernel.rpartition("/")[0] + "/bias"
  params = (kernel,) + ((bias,) if bias in leaves else ())
  return Group(kernel.rpartition("/")[0], "linear", params, tuple(consumers), rows=view.n)


__all__ = ["Group", "find_groups", "folded", "apply_folds", "verify_folds", "relative_change",
           "replace_leaves"]
