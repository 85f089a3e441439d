"""Collecting the inputs of every quantizable layer while the UNCHANGED model runs.

The Flax adapters (``jq.nn``) call ``jq.nn.common.observe(kernel path, input, input axes, kernel)``
for every layer they adapt, float or quantized. :func:`collect` installs an observer that folds each
wanted layer's input into fixed-size statistics *inside* the jitted model (``XᵀX`` over the
flattened contracting axes, per-channel ``max|x|``, ``Σ|x|``, min and max, an evenly spaced token
sample) and sends them to the host with ``jax.debug.callback``, where they are summed. That works
inside ``nn.scan``/``nnx.scan`` stacks, whose layers share one traced body: the callbacks of a
stacked layer arrive in layer order, so the k-th of ``n·L`` calls in one model call belongs to layer
``k // n``; under ``vmap`` (:func:`_emit`) the callback receives one value per mapped layer, in
layer order, and an input shared by all of them (``in_axes=None``) counts for each. Layers reading
the same input with the same :class:`Want` (q, k and v after one norm) share one computation of the
statistics, one callback and one host sum: they get the same :class:`LayerInputs` (one float64
``XᵀX`` of K = 8192 is 0.5 GiB while it is summed).

Data parallel: with a ``mesh`` the batches are split over its data axis (:func:`shard_batches`)
and XLA all-reduces the statistics, which the callback receives once per model call.  Several
processes: a ``reduce`` (``jq.distributed.allreduce_stats``) sums the host statistics across
processes before they are returned.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.errors
import jax
import jax.numpy as jnp
import numpy as np
from jax import custom_batching

from jq.calibrate.stats import LayerStats


@dataclasses.dataclass(frozen=True)
class Want:
  """What to collect for one layer.

  Attributes:
    stack: number of stacked layers (1 if not stacked): results get a leading ``(L,)`` axis.
    xtx: accumulate ``XᵀX`` (GPTQ, AWQ, SmoothQuant); needs the input to map onto the kernel's
      contracting axes.
    samples: tokens to keep (AWQ's searches), 0 for none.
    first_token_weight: weight of position 0 along the input's second free axis (a sequence's
      first token) in ``XᵀX``.
  """
  stack: int = 1
  xtx: bool = False
  samples: int = 0
  first_token_weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class LayerInputs:
  """Statistics of one layer's input (arrays get a leading ``(L,)`` axis for stacked layers).

  Attributes:
    stats: :class:`LayerStats` over the flattened contracting axes (K), or None when not asked
      for or when the input does not map onto the kernel (then ``lo``/``hi`` are per tensor).
    lo, hi: per-channel ``(K,)`` (or per-tensor ``(1,)``) min and max.
    samples: ``(S, K)`` token sample, or None.
  """
  stats: LayerStats | None
  lo: np.ndarray
  hi: np.ndarray
  samples: np.ndarray | None


_WIDE = ("xtx", "abssum")                 # summed in float64 (in place)
_SUMMED = (*_WIDE, "count", "nonfinite")
_OPS = {"xtx": "sum", "abssum": "sum", "count": "sum", "nonfinite": "sum", "absmax": "max",
        "hi": "max", "lo": "min", "samples": "cat", "samples_batch": "cat"}


class _Acc:
  """Host-side sums of one layer's statistics, per stacked layer (``XᵀX`` and ``Σ|x|`` in
  float64, counts in int64; token samples with the index of the batch they come from)."""

  def __init__(self, want: Want, path: str):
    self.want, self.path = want, path
    self.layers: list[dict[str, Any] | None] = [None] * want.stack

  def add(self, i: int, part: dict[str, np.ndarray], batch: int = 0) -> None:
    cur = self.layers[i]
    if cur is None:
      self.layers[i] = cur = {
          k: (np.array(v, np.float64) if k in _WIDE else   # (a copy of its own: summed in place)
              np.asarray(v, np.int64) if k in ("count", "nonfinite") else
              [] if k == "samples" else np.asarray(v)) for k, v in part.items()}
      if "samples" in part:
        cur["samples"].append((batch, np.asarray(part["samples"])))
      return
    for k, v in part.items():
      if k in _WIDE:
        np.add(cur[k], v, out=cur[k])      # in place: no second K × K float64 sum
      elif k in _SUMMED:
        cur[k] = cur[k] + v
      elif k in ("absmax", "hi"):
        cur[k] = np.maximum(cur[k], v)
      elif k == "lo":
        cur[k] = np.minimum(cur[k], v)
      elif k == "samples":
        cur[k].append((batch, np.asarray(v)))

  def check_ran(self) -> None:
    if any(c is None for c in self.layers):
      raise ValueError(f"{self.path}: this layer never ran on the calibration batches")

  def export(self) -> dict[str, np.ndarray]:
    """The sums as flat named arrays (``"<path>#<layer>#<name>"``), for a cross-process reduce."""
    out = {}
    for i, c in enumerate(self.layers):
      for k, v in c.items():
        if k == "samples":
          rows = [r for _, r in v]
          out[f"{self.path}#{i}#samples"] = np.concatenate(rows)
          out[f"{self.path}#{i}#samples_batch"] = np.concatenate(
              [np.full(len(r), b, np.int64) for b, r in v])
        else:
          out[f"{self.path}#{i}#{k}"] = np.asarray(v)
    return out

  def load(self, flat: Mapping[str, np.ndarray]) -> None:
    """Replaces the sums by reduced (or received) ones, from :meth:`export`'s keys."""
    for i in range(len(self.layers)):
      pre = f"{self.path}#{i}#"
      c = {k[len(pre):]: v for k, v in flat.items() if k.startswith(pre)}
      if "samples" in c:
        order = np.argsort(c.pop("samples_batch"), kind="stable")   # global batch order
        c["samples"] = [(0, c["samples"][order])]
      self.layers[i] = c or None
    self.check_ran()

  def result(self) -> LayerInputs:
    self.check_ran()
    def stack(fn):
      vals = [fn(c) for c in self.layers]
      return vals[0] if self.want.stack == 1 else np.stack(vals)
    stats = None
    if "xtx" in self.layers[0]:
      stats = LayerStats(
          xtx=np.asarray(stack(lambda c: c["xtx"]), np.float32),   # K × K: on the host until
          # a solve places it (on its device, or split over several: jq.algorithms.factor_split)
          count=jnp.asarray(stack(lambda c: np.int32(c["count"])), jnp.int32),
          absmax=jnp.asarray(stack(lambda c: c["absmax"]), jnp.float32),
          abssum=jnp.asarray(stack(lambda c: c["abssum"]), jnp.float32),
          nonfinite=jnp.asarray(stack(lambda c: np.int32(c["nonfinite"])), jnp.int32))
    samples = None
    if "samples" in self.layers[0]:
      def pick(c):
        rows = np.concatenate([r for _, r in c["samples"]])
        idx = np.linspace(0, len(rows) - 1, min(self.want.samples, len(rows))).astype(np.int64)
        return rows[idx]
      samples = stack(pick)
    return LayerInputs(stats, np.asarray(stack(lambda c: c["lo"]), np.float32),
                       np.asarray(stack(lambda c: c["hi"]), np.float32), samples)


class _NotMapped(ValueError):
  """``XᵀX`` asked for a layer whose input does not map onto its kernel."""


def _token(kernel) -> jax.Array | None:
  """A scalar computed from the kernel: mapped wherever the kernel is (``vmap``-stacked layers),
  also when their input is shared (``in_axes=None``)."""
  leaves = jax.tree_util.tree_leaves(kernel)
  if not leaves or not hasattr(leaves[0], "reshape"):
    return None
  first = jnp.reshape(leaves[0], (-1,))[:1]
  return jnp.sum(first == first, dtype=jnp.int32)


def _emit(fn: Callable[[dict[str, np.ndarray]], None], part: dict[str, jax.Array],
          token: jax.Array | None = None) -> None:
  """``jax.debug.callback(fn, part)`` that under ``vmap`` calls ``fn`` ONCE with the mapped values
  stacked on leading axes (outer ``vmap`` first), rather than once per mapped element.

  ``jax.debug.callback`` unrolls a ``vmap`` into one callback per element, and unordered callbacks
  reach the host in any order: the statistics of ``nn.vmap``-stacked experts landed on the wrong
  expert.  Statistics that do not depend on the mapped value (a token count, an input shared by
  the experts) are broadcast; ``token`` (:func:`_token` of the kernel) is mapped wherever the
  layer is stacked, so each stacked layer gets its entry.
  """
  @custom_batching.custom_vmap
  def send(part, token):
    del token
    jax.debug.callback(fn, part)
    return jnp.zeros((), jnp.int32)

  @send.def_vmap
  def _batched(axis_size, in_batched, part, token):   # (an outer vmap batches this call again)
    part = jax.tree_util.tree_map(
        lambda v, mapped: v if mapped else jnp.broadcast_to(v, (axis_size, *v.shape)),
        part, in_batched[0])
    _emit(fn, part, token)
    return jnp.zeros((axis_size,), jnp.int32), True

  send(part, jnp.int32(0) if token is None else token)


def _flatten(x: jax.Array, x_axes) -> tuple[jax.Array, jax.Array | None]:
  """``(tokens, K)`` rows of ``x`` with its contracting axes last (kernel order), and the free
  axes' shape (for token weights)."""
  free = [a for a in range(x.ndim) if a not in x_axes]
  xt = jnp.transpose(x, free + list(x_axes))
  k = int(np.prod([x.shape[a] for a in x_axes], dtype=np.int64))
  return xt.reshape(-1, k).astype(jnp.float32), tuple(x.shape[a] for a in free)


def _statistics(x: jax.Array, x_axes, want: Want, per_call_samples: int, chunks: int = 1
                ) -> dict[str, jax.Array]:
  """The per-call statistics of one input (traced, inside the model); the token sample is taken
  from each of ``chunks`` equal runs of tokens (the processes' rows of a batch on a mesh over
  several processes: the tokens one process would sample from each of its batches)."""
  if x_axes is None or not want.xtx and not want.samples:
    xf = x.astype(jnp.float32)
    fin = jnp.isfinite(xf)
    xz = jnp.where(fin, xf, 0.0)
    return {"lo": jnp.min(xz).reshape(1), "hi": jnp.max(xz).reshape(1),
            "nonfinite": jnp.sum(~fin, dtype=jnp.int32)}
  flat, free_shape = _flatten(x, x_axes)
  fin = jnp.isfinite(flat)
  flat = jnp.where(fin, flat, 0.0)
  out = {"lo": jnp.min(flat, axis=0), "hi": jnp.max(flat, axis=0),
         "nonfinite": jnp.sum(~fin, dtype=jnp.int32)}
  if want.xtx:
    ax = jnp.abs(flat)
    xw = flat
    if want.first_token_weight != 1.0 and len(free_shape) >= 2:
      tw = jnp.ones(free_shape, jnp.float32).at[:, 0].set(want.first_token_weight)
      xw = flat * tw.reshape(-1, 1)
    out.update(xtx=jax.lax.dot_general(xw, flat, (((0,), (0,)), ((), ())),
                                       precision=jax.lax.Precision.HIGHEST,
                                       preferred_element_type=jnp.float32),
               count=jnp.int32(flat.shape[0]), absmax=jnp.max(ax, axis=0),
               abssum=jnp.sum(ax, axis=0))
  if want.samples:
    run = flat.shape[0] // chunks
    n = min(per_call_samples, run)
    idx = jnp.linspace(0, run - 1, n).astype(jnp.int32)
    # an input with zero rows (an expert's: the tokens not routed to it) is sampled from its
    # nonzero rows, spread evenly over them (all of them, then zero rows, when there are fewer)
    live = jnp.any(flat[:chunks * run].reshape(chunks, run, -1) != 0, axis=-1)
    count = jnp.sum(live, axis=-1, keepdims=True, dtype=jnp.int32)
    first = jnp.argsort(~live, axis=-1, stable=True).astype(jnp.int32)
    j = jnp.arange(n, dtype=jnp.int32)[None]
    pos = jnp.where(count >= n, (j * count) // n, j)
    idx = jnp.where(count == run, idx[None], jnp.take_along_axis(first, pos, axis=-1))
    out["samples"] = flat[(jnp.arange(chunks, dtype=jnp.int32)[:, None] * run + idx).reshape(-1)]
  return out


def data_sharding(mesh, data_axis: str | None = None):
  """``(sharding of a batch's leading axis, replicated sharding, number of shards)`` on ``mesh``.

  ``data_axis``: the mesh axis the batches are split over (default: the mesh's only axis, or its
  ``"data"`` axis); the other axes hold copies.  The shardings use an ``Auto``-typed twin of the
  mesh (``jq._compat.auto_mesh``), so XLA inserts the all-reduce of each statistic.

  The mesh may hold the devices of several processes (``jax.distributed``): see :func:`collect`.

  Raises:
    ValueError: ``mesh`` is not a ``jax.sharding.Mesh`` or has no such axis.
  """
  # pylint: disable=import-outside-toplevel
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  from jq import _compat  # pylint: disable=import-outside-toplevel
  if not isinstance(mesh, Mesh):
    raise ValueError(f"calibration mesh: {type(mesh).__name__} is not a jax.sharding.Mesh "
                     "(e.g. jax.make_mesh((8,), ('data',)))")
  names = tuple(mesh.axis_names)
  if data_axis is None:
    if len(names) != 1 and "data" not in names:
      raise ValueError(f"calibration mesh: axes {names}; name the batch axis (data_axis=...) or "
                       "call it 'data'")
    data_axis = names[0] if len(names) == 1 else "data"
  if data_axis not in names:
    raise ValueError(f"calibration mesh: no axis {data_axis!r} in {names}")
  m = _compat.auto_mesh(mesh)
  return (NamedSharding(m, PartitionSpec(data_axis)), NamedSharding(m, PartitionSpec()),
          int(mesh.shape[data_axis]))


def spanned(mesh) -> list[int]:
  """The processes whose devices ``mesh`` holds (``[this one]`` for a mesh of local devices)."""
  return sorted({d.process_index for d in mesh.devices.flat})


def put(x, sharding):
  """``jax.device_put(x, sharding)``, except that on a mesh over several processes a value every
  process holds alike (a replicated parameter) is built from this process's own copy: no device
  sends to another host."""
  if (not isinstance(x, jax.Array) or x.sharding.is_equivalent_to(sharding, x.ndim)
      or len({d.process_index for d in sharding.device_set}) == 1):
    return jax.device_put(x, sharding)
  mine = x if x.is_fully_addressable else x.addressable_data(0)   # (then fully replicated)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: mine[idx])


def shard_batches(batches: Iterable[Any], mesh, data_axis: str | None = None, *,
                  batch_ids: Sequence[int] | None = None) -> list[Any]:
  """``batches`` with every array's leading (batch) axis split over the mesh's data axis (scalars
  replicated), so each device runs its share of every batch.  On a mesh over several processes
  each process gives its own batches: batch ``i`` is then every process's batch ``i``, their rows
  joined in process order (``jax.make_array_from_process_local_data``).

  Args:
    batches: calibration inputs (arrays, or tuples/pytrees of arrays with a leading batch axis).
    mesh, data_axis: see :func:`data_sharding`.
    batch_ids: the batches' indices, for errors (default ``0, 1, ...``).

  Raises:
    ValueError: a batch whose leading axis does not divide by the number of devices on the data
      axis (naming the batch, its shape and the device count), or a bad mesh; on a mesh over
      processes, in every process, when their batches differ in number, shape or dtype.

  Example:
    >>> placed = shard_batches(batches, jax.make_mesh((8,), ("data",)))
  """
  split, whole, n = data_sharding(mesh, data_axis)
  procs = len(spanned(mesh))
  batches = list(batches)
  ids = list(range(len(batches))) if batch_ids is None else list(batch_ids)
  def placed(x) -> bool:
    return isinstance(x, jax.Array) and x.sharding.is_equivalent_to(split, x.ndim)

  if procs > 1 and not all(placed(x) for b in batches for x in jax.tree_util.tree_leaves(b)
                           if np.ndim(x)):   # (once: placed global batches are not checked again)
    from jq import distributed  # pylint: disable=import-outside-toplevel
    def desc(x):   # every global batch joins one batch of each process: as many, alike
      return [list(np.shape(x)), str(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype)]
    distributed.agree("the calibration batches on the mesh", {
        "batches": [jax.tree_util.tree_map(desc, b) for b in batches]})

  def place(b: int, x):
    if not (isinstance(x, (jax.Array, np.ndarray)) or hasattr(x, "__array__")):
      return x
    shape = tuple(np.shape(x))
    if not shape:
      return put(x, whole)
    if placed(x):
      return x
    if shape[0] % (n // procs):
      raise ValueError(f"calibration batch {b}: an input of shape {shape} has a leading (batch) "
                       f"axis of {shape[0]}, which does not divide over the {n // procs} devices "
                       f"of the mesh's data axis in this process; give every batch a multiple of "
                       f"{n // procs} rows")
    if procs > 1:   # this process's rows of one batch, joined over the processes' devices
      return jax.make_array_from_process_local_data(split, np.asarray(x))
    return jax.device_put(x, split)

  return [jax.tree_util.tree_map(functools.partial(place, b), batch)
          for b, batch in zip(ids, batches)]


def collect(run: Callable[[Any, Any], Any], batches: Iterable[Any], wants: Mapping[str, Want], *,
            operands: Any = None, mesh=None, data_axis: str | None = None,
            batch_ids: Sequence[int] | None = None, total_batches: int | None = None,
            reduce: Callable[[dict[str, np.ndarray], dict[str, str]], dict[str, np.ndarray]]
            | None = None) -> dict[str, LayerInputs]:
  """Runs the model over ``batches`` and returns the statistics of each wanted layer's input.

  Data parallel (``mesh``): every batch is split along its leading axis over the mesh's data axis
  (:func:`shard_batches`) and ``operands`` are replicated; each device runs its rows and XLA
  all-reduces the statistics, which ``jax.debug.callback`` receives once per model call (the
  logical, reduced values).  ``XᵀX`` and ``Σ|x|`` are then summed in another order than on one
  device (float32 rounding: see ``jq.ptq.PTQConfig.mesh`` for the measured differences); min, max,
  counts and token samples are the same bits.

  Several processes (``reduce``): each process runs its own batches (``batch_ids``: their indices
  in the whole calibration set of ``total_batches``, which also sets how many tokens each call
  samples); ``reduce`` (``jq.distributed.allreduce_stats``) sums the host statistics across the
  processes before they are returned.

  A mesh over several processes (``jax.distributed``; the processes on disjoint slices of its
  data axis, each with its own batches, as many and as shaped as the others'): each global batch
  joins the processes' batches (:func:`shard_batches`), XLA all-reduces the statistics across
  the processes, the callbacks run in the process XLA gives them to, and that process's host
  sums are sent to the others (``jq.distributed.share``), so every process returns the same
  arrays.  The token sample is taken from each process's rows as one process would from its
  batch.  No ``reduce`` then.

  Args:
    run: ``run(operands, batch)`` runs the model once through jq's adapters (jitted here, with
      ``operands``, e.g. the variables or an nnx state, as an argument rather than a constant).
    batches: calibration inputs, each passed to ``run`` as is.
    wants: ``{kernel path: Want}``.
    operands: passed to ``run``.
    mesh, data_axis: data-parallel calibration (see :func:`data_sharding`).
    batch_ids: global index of each batch (default ``0..len(batches)-1``).
    total_batches: number of batches in all processes (default ``len(batches)``).
    reduce: ``reduce(arrays, ops) -> arrays``, a cross-process reduction of named host arrays
      (ops ``sum``/``max``/``min``/``cat``).

  Raises:
    ValueError: no batch; a wanted layer never ran; a non-finite input (naming the layer and the
      batch); ``XᵀX`` asked for a layer whose input does not map onto its kernel; a stacked layer
      whose calls do not divide into its layers; a batch that does not divide over the mesh.
  """
  from jq.nn import common  # pylint: disable=import-outside-toplevel  (jq.nn imports calibrate)
  batches = list(batches)
  if not batches:
    raise ValueError("calibration: no batches were given")
  ids = list(range(len(batches))) if batch_ids is None else [int(i) for i in batch_ids]
  if len(ids) != len(batches):
    raise ValueError(f"calibration: {len(ids)} batch_ids for {len(batches)} batches")
  total = len(batches) if total_batches is None else int(total_batches)
  chunks = 1 if mesh is None else len(spanned(mesh))
  spans = chunks > 1   # a mesh over processes: each global batch joins the processes' batches
  if spans:
    if reduce is not None:
      raise ValueError("calibration: a mesh over several processes reduces the statistics "
                       "itself; pass no reduce")
    ids, total = list(range(len(batches))), len(batches) * chunks
  if mesh is not None:
    batches = shard_batches(batches, mesh, data_axis, batch_ids=ids)
    whole = data_sharding(mesh, data_axis)[1]
    operands = jax.tree_util.tree_map(lambda x: put(x, whole) if isinstance(
        x, (jax.Array, np.ndarray)) else x, operands)
  per_call = {p: -(-w.samples // total) for p, w in wants.items() if w.samples}
  seen: dict[str, list[dict[str, np.ndarray]]] = collections.defaultdict(list)
  # layers reading one input with the same wants (q, k and v) share one computation, one
  # callback and one host sum (for K = 8192 one float64 XᵀX is 0.5 GiB): named by the first
  # of them to run, the group's paths in the order they ran
  groups: dict[str, list[str]] = {}

  def host(group, part):
    part = {k: np.asarray(v) for k, v in part.items()}
    lead = part["nonfinite"].shape  # () per call; (E,) or (E1, E2) under vmap: in layer order
    n = int(np.prod(lead, dtype=np.int64))
    part = {k: v.reshape((n, *v.shape[len(lead):])) for k, v in part.items()}
    seen[group].extend({k: v[i] for k, v in part.items()} for i in range(n))

  def observed(ops, batch):
    cache: dict[tuple[int, Any, Want], str] = {}   # input -> the first path that read it
    keep = []

    def observer(path, x, x_axes, kernel):
      want = wants.get(path)
      if want is None:
        return
      if want.xtx and x_axes is None:
        raise _NotMapped(f"{path}: this layer's input does not map onto its kernel's contracting "
                         "axes (a convolution, dot batch dims or summed einsum axes); GPTQ, AWQ "
                         "and SmoothQuant are not available for it: use RTN")
      key = (id(x), x_axes, want)
      if key not in cache:
        keep.append(x)
        cache[key] = path
        _emit(functools.partial(host, path),
              _statistics(x, x_axes, want, per_call.get(path, 0), chunks), _token(kernel))
      members = groups.setdefault(cache[key], [])
      if path not in members:
        members.append(path)

    with common.observing(observer):
      return run(ops, batch)

  step = jax.jit(observed)
  accs: dict[str, _Acc] = {}       # one per group
  for b, batch in enumerate(batches):
    seen.clear()
    try:
      jax.block_until_ready(step(operands, batch))
    except _NotMapped:
      raise   # (the layer's, not the batch's)
    except (TypeError, ValueError, KeyError, flax.errors.FlaxError) as e:
      shapes = jax.tree_util.tree_map(lambda a: tuple(np.shape(a)), batch)
      kind = "KeyError " if isinstance(e, KeyError) else ""   # (a bare KeyError: only the key)
      raise ValueError(f"calibration batch {ids[b]} (shapes {shapes}): {kind}{e}") from e
    jax.effects_barrier()
    for group, calls in seen.items():
      n, names = wants[group].stack, ", ".join(groups[group])
      bad = sum(int(c["nonfinite"]) for c in calls)
      if bad:
        raise ValueError(f"{names}: calibration batch {ids[b]} gives this layer {bad} NaN/Inf "
                         "input values; fix the model or the calibration data")
      if len(calls) == 1 and n > 1:   # one input shared by every stacked layer
        calls = calls * n
      if len(calls) % n:
        raise ValueError(f"{names}: {len(calls)} calls in one model call do not divide into its "
                         f"{n} stacked layers")
      per = len(calls) // n
      if group not in accs:
        accs[group] = _Acc(wants[group], group)
      for k, c in enumerate(calls):
        accs[group].add(k // per, c, ids[b])
  owner = {p: g for g, members in groups.items() for p in members}
  if spans:   # the callbacks ran in the process of the device XLA gave them: sent to the others
    from jq import distributed  # pylint: disable=import-outside-toplevel
    flat, _ = distributed.share("the statistics", {k: v for a in accs.values()
                                                   for k, v in a.export().items()})
    accs = {g: _Acc(wants[g], g) for g in groups if any(k.startswith(f"{g}#") for k in flat)}
    for a in accs.values():
      a.load(flat)
  for p in wants:
    if owner.get(p) not in accs:
      raise ValueError(f"{p}: this layer never ran on the calibration batches")
    accs[owner[p]].check_ran()
  if reduce is not None:   # (every process traced the same model: the same groups)
    flat = {k: v for a in accs.values() for k, v in a.export().items()}
    flat = reduce(flat, {k: _OPS[k.rpartition("#")[2]] for k in flat})
    for a in accs.values():
      a.load(flat)
  results = {g: a.result() for g, a in accs.items()}
  return {p: results[owner[p]] for p in wants}   # (a group's layers share their arrays)


def capture_inputs(fn: Callable[..., Any], *args, prefix: str = "",
                   reduce: Callable[[str, Any], Any] | None = None, **kwargs
                   ) -> tuple[Any, dict[str, Any]]:
  """Runs ``fn(*args, **kwargs)`` and returns ``(output, {kernel path: reduce(path, x)})``, in-graph
  (use it inside ``jax.jit``; a ``reduce`` that folds ``x`` into fixed-size statistics keeps the
  activations from piling up).

  ``x`` is each adapted layer's input with the axes it contracts against the kernel moved last and
  flattened: ``(..., K)``, ``K`` in the kernel's contracting order.  Layers whose input does not map
  onto the kernel that way (convolutions, dot batch dims) are not captured.  Values captured
  inside a ``scan``/``vmap`` body are that body's tracers: for stacked layers use
  :func:`collect`.  Linen modules run
  through jq's adapter hook; nnx modules report when they are jq's layer classes (e.g. from
  ``jq.nn.quantize_module`` or ``jq.nn.nnx.with_quantized_classes``).

  Args:
    fn: calls a linen module's ``apply`` (the module is not modified), or an nnx module.
    prefix: replaces the ``params`` prefix of linen kernel paths (``""``: paths relative to the
      applied module, e.g. ``attn/q_proj/kernel`` when ``fn`` applies one block).
    reduce: maps each captured input to what is kept; identity by default.  If a layer runs
      several times, the values are kept in a list.
  """
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from jq.nn import common, linen  # pylint: disable=import-outside-toplevel
  found: dict[str, Any] = {}

  def observer(path, x, x_axes, _kernel):
    if x_axes is None:
      return
    if path.startswith("params/"):
      path = "/".join(p for p in (prefix, path[len("params/"):]) if p)
    free = [a for a in range(x.ndim) if a not in x_axes]
    x = jnp.transpose(x, free + list(x_axes))
    x = x.reshape(x.shape[:len(free)] + (-1,))
    val = x if reduce is None else reduce(path, x)
    if path in found:
      prev = found[path]
      found[path] = (prev if isinstance(prev, list) else [prev]) + [val]
    else:
      found[path] = val

  with common.observing(observer), nn.intercept_methods(linen.adapter_interceptor):
    out = fn(*args, **kwargs)
  return out, found


def input_ranges(run: Callable[[Any, Any], Any], batches: Iterable[Any], *,
                 paths: Iterable[str], stacks: Mapping[str, int] | None = None,
                 operands: Any = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Per-tensor ``(min, max)`` of each layer's input over all batches (``(L,)`` for stacked
  layers, ``()`` otherwise); see :func:`collect`."""
  stacks = dict(stacks or {})
  return tensor_ranges(collect(run, batches, {p: Want(stack=stacks.get(p, 1)) for p in paths},
                               operands=operands))


def tensor_ranges(inputs: Mapping[str, LayerInputs]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Per-tensor ``(min, max)`` (per stacked layer) from collected per-channel ranges."""
  return {p: (np.min(r.lo, axis=-1), np.max(r.hi, axis=-1)) for p, r in inputs.items()}


__all__ = ["collect", "shard_batches", "data_sharding", "spanned", "put", "capture_inputs",
           "input_ranges", "tensor_ranges", "Want", "LayerInputs"]
