"""Streamed round-to-nearest: quantizing a checkpoint larger than memory, one tensor at a time.

The road: the source's tensors (read lazily, :class:`SourceTensor`) → the rules decide per leaf
(:func:`jq.tree.plan`), checked up front on abstract shapes (``jax.eval_shape`` of the very
function that quantizes, so every error names the parameter before any work) → each tensor is
read, checked for NaN/Inf and quantized by :func:`jq.tree.quantize_leaf` (jitted, on the default
device) → a :class:`jq.io.sharded.ShardedWriter` writes the shards as they fill, resumably, and
moves the finished checkpoint into place only at the end.

Large 2-D kernels whose scales are per output column (per-channel or groups along the input axis:
``tile[-1] == 1``) are read and quantized in column chunks of about ``chunk_bytes``: each column's
scale depends only on that column, so the result is bit for bit the whole tensor's (packing runs
along the last axis; chunks are multiples of 64 columns).  Host memory then stays near one chunk
plus one output tensor; other tensors (tensor-wise scales, embeddings kept in float) are read
whole.

Several ``jax.distributed`` processes (one host, or several sharing a filesystem) write one
checkpoint together, each quantizing the tensors of its own shards (``distributed``; on by
itself with several processes): the same bytes one process writes.

The result is the tree :func:`jq.quantize_tree` gives for the same rules and layouts (tests hold
the two together); static activation scales and the calibrated algorithms (GPTQ, AWQ,
SmoothQuant) need calibration data and are refused here, naming the parameter.

Example:
  >>> res = jq.stream.quantize_to_dir(sources, jq.recipe_rules("w4a16-g128"), "out",
  ...                                 layouts=layouts, progress=True)
  >>> qvars = jq.io.load("out")
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jq.io import sharded
from jq.layout import Layout
from jq.qarray import QArray
from jq.quantize import check_float_input
from jq.spec import ActMode, Algorithm, Rule
from jq.tree import leaves_with_paths, map_with_paths, plan, quantize_leaf

CHUNK_COLUMNS = 64  # chunk widths are multiples of this (packing runs along the last axis)


@dataclasses.dataclass(frozen=True)
class SourceTensor:
  """One tensor of a checkpoint, read on demand.

  Attributes:
    path: the leaf's '/'-joined path in the tree the checkpoint becomes (``params/...``).
    shape: its shape in that tree (jq's layout, e.g. a Dense kernel is ``(in, out)``).
    dtype: its stored dtype (numpy; bfloat16 from ``ml_dtypes``).
    read: ``read(a, b)`` returns columns ``[a, b)`` of the last axis in jq's layout (any
      strides); ``read(0, shape[-1])`` the whole tensor (``(0, 1)`` for a scalar).
    where: the file and stored name, for messages.
  """
  path: str
  shape: tuple[int, ...]
  dtype: np.dtype
  read: Callable[[int, int], np.ndarray]
  where: str = ""

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

  def read_all(self) -> np.ndarray:
    x = self.read(0, self.shape[-1] if self.shape else 1)
    return np.ascontiguousarray(x).reshape(self.shape)


@dataclasses.dataclass
class StreamResult:
  """What :func:`quantize_to_dir` did: the output directory, tensors written (this run, and
  skipped because a resumed run had them), bytes read and written, seconds, log lines (with
  several processes: this process's tensors and bytes)."""
  out: str
  written: int
  resumed: int
  bytes_in: int
  bytes_out: int
  seconds: float
  log: list[str]


def _tree(sources: Sequence[SourceTensor]) -> dict:
  root: dict = {}
  for s in sources:
    node = root
    keys = s.path.split("/")
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = jax.ShapeDtypeStruct(s.shape, s.dtype)
  return root


def _refuse(s: SourceTensor, rule: Rule) -> None:
  where = f"{s.path}: shape {s.shape} dtype {np.dtype(s.dtype)}"
  if rule.algorithm is not Algorithm.RTN:
    raise ValueError(f"{where}: the rule asks for {rule.algorithm.value}, which needs calibration "
                     "data; the streamed road rounds to nearest only (use a RTN recipe, or "
                     "quantize in memory without --stream)")
  if rule.activation is not None and rule.activation.mode is ActMode.STATIC:
    raise ValueError(f"{where}: static activation quantization needs calibrated input scales; the "
                     "streamed road has no calibration (use dynamic activations, or quantize in "
                     "memory without --stream)")


def abstract_output(s: SourceTensor, rule: Rule | None, *,
                    layouts: Mapping[str, Layout] | None = None, nan_policy: str = "raise"
                    ) -> Any:
  """The leaf ``rule`` makes of ``s``, abstractly (``jax.eval_shape`` of the function that
  quantizes: the rule's fit is checked, naming the parameter).  Calibrated rules give the shapes
  of their RTN twin (GPTQ/AWQ choose other values on the same grid) with a static activation
  scale (and zero point) where the rule asks for one."""
  x = jax.ShapeDtypeStruct(s.shape, s.dtype)
  if rule is None or rule.weight is None:
    return x
  act = rule.activation

  def fn(v):
    scale = None
    if act is not None and act.mode is ActMode.STATIC:
      from jq.calibrate import act_params  # pylint: disable=import-outside-toplevel
      scale = act_params(jnp.zeros((), jnp.float32), jnp.ones((), jnp.float32), act)
    return quantize_leaf(s.path, v, dataclasses.replace(rule, algorithm=Algorithm.RTN, options=None),
                         layouts=layouts, act_scale=scale, nan_policy=nan_policy)

  return jax.eval_shape(fn, x)


def plan_stream(sources: Sequence[SourceTensor], rules: Sequence[Rule], *,
                layouts: Mapping[str, Layout] | None = None, nan_policy: str = "raise",
                calibrated: bool = False) -> list[tuple[SourceTensor, Rule | None, Any]]:
  """``[(source, rule or None (kept as stored), abstract output leaf)]`` in order; every rule's fit
  is checked on abstract shapes (names the parameter, reads nothing).

  Args:
    calibrated: admit rules that need calibration (the onloaded road, ``jq.ptq.onload``);
      otherwise they are refused.

  Raises:
    ValueError: duplicate paths, a required rule that matches nothing, a rule the streamed road
      cannot apply, a shape the spec does not fit, a kernel without a layout.
  """
  paths = [s.path for s in sources]
  if len(set(paths)) != len(paths):
    dup = next(p for p in paths if paths.count(p) > 1)
    raise ValueError(f"{dup}: two source tensors have this path")
  decided = {p.path: p for p in plan(_tree(sources), rules)}
  out = []
  for s in sources:
    pl = decided[s.path]
    rule = pl.rule if pl.quantized else None
    if rule is not None and not calibrated:
      _refuse(s, rule)
    out.append((s, rule, abstract_output(s, rule, layouts=layouts, nan_policy=nan_policy)))
  return out


class _Quantizer:
  """One jitted quantizer per (rule, layout); XLA compiles once per chunk shape."""

  def __init__(self, layouts: Mapping[str, Layout] | None, nan_policy: str):
    self.layouts, self.nan_policy = layouts, nan_policy
    self._fns: dict[tuple, Callable] = {}

  def __call__(self, path: str, x: np.ndarray, rule: Rule) -> QArray:
    layout = None if self.layouts is None else self.layouts[path]
    key = (rule, layout)
    if key not in self._fns:
      lays = None if layout is None else {"<stream>": layout}
      self._fns[key] = jax.jit(lambda v: quantize_leaf("<stream>", v, rule, layouts=lays,
                                                       nan_policy=self.nan_policy))
    x = jnp.asarray(x)   # one device copy, checked and quantized
    if self.nan_policy == "raise":
      check_float_input(x, path)   # eagerly, naming the parameter (jit would skip it)
    return self._fns[key](x)


def _chunk_columns(s: SourceTensor, q: Any, chunk_bytes: int) -> int | None:
  """Columns per chunk, or None to read the tensor whole."""
  if len(s.shape) != 2 or q.tile[-1] != 1:
    return None
  col_bytes = s.shape[0] * 4  # float32 working copy of one column
  cols = max(CHUNK_COLUMNS, (chunk_bytes // max(col_bytes, 1)) // CHUNK_COLUMNS * CHUNK_COLUMNS)
  return None if cols >= s.shape[1] else cols


def _assemble(parts: list[QArray], like: Any, shape: tuple[int, ...]) -> QArray:
  """The column chunks' QArrays as one (concatenated along the last axis, on the host)."""
  cat = lambda xs: None if xs[0] is None else np.concatenate([np.asarray(x) for x in xs], axis=-1)
  first = parts[0]
  q = QArray(values=cat([p.values for p in parts]), scale=cat([p.scale for p in parts]),
             zero_point=cat([p.zero_point for p in parts]), activation=first.activation,
             qtype=first.qtype, shape=shape, tile=first.tile)
  if q.tile != like.tile or q.values.shape != like.values.shape or \
      q.scale.shape != like.scale.shape:
    raise AssertionError(f"chunked quantization gave tile {q.tile} values {q.values.shape} scale "
                         f"{q.scale.shape}; the whole tensor gives tile {like.tile} values "
                         f"{like.values.shape} scale {like.scale.shape}")
  return q


def _host(q: QArray) -> QArray:
  """``q`` with its arrays fetched to the host (device buffers freed as the chunk is done)."""
  get = lambda x: None if x is None else np.asarray(jax.device_get(x))
  return dataclasses.replace(q, values=get(q.values), scale=get(q.scale),
                             zero_point=get(q.zero_point))


def _quantized(planned, todo: set[str], quant: _Quantizer, chunk_bytes: int, bar
               ) -> Iterator[tuple[str, Any]]:
  """``(path, leaf)`` for every planned leaf in ``todo``, in order: kept leaves as read, quantized
  ones whole or in column chunks (the one loop both sinks share)."""
  for i, (s, rule, q_abs) in enumerate(planned):
    if s.path not in todo:
      continue
    if bar is not None:
      bar.set_postfix_str(f"tensor {i + 1}/{len(planned)}", refresh=False)
    cols = None if rule is None else _chunk_columns(s, q_abs, chunk_bytes)
    if rule is None:
      leaf = s.read_all()
    elif cols is None:
      leaf = _host(quant(s.path, s.read_all(), rule))
    else:
      parts = []
      for a in range(0, s.shape[1], cols):
        b = min(a + cols, s.shape[1])
        parts.append(_host(quant(s.path, s.read(a, b), rule)))
        if bar is not None:
          bar.update(s.nbytes * (b - a) // s.shape[1])
      leaf = _assemble(parts, q_abs, s.shape)
    if bar is not None and cols is None:
      bar.update(s.nbytes)
    yield s.path, leaf


def _bar(progress: bool, total: int, initial: int, desc: str):
  if not progress:
    return None
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
              desc=desc, smoothing=0.1)


def _check_chunk_bytes(chunk_bytes: Any) -> None:
  if not isinstance(chunk_bytes, int) or isinstance(chunk_bytes, bool) or chunk_bytes < 1:
    raise ValueError(f"chunk_bytes={chunk_bytes!r} must be an int >= 1")


def quantize_to_dir(sources: Sequence[SourceTensor], rules: Sequence[Rule],
                    out: str, *, layouts: Mapping[str, Layout] | None = None,
                    metadata: Mapping[str, Any] | None = None,
                    fingerprint: Mapping[str, Any] | None = None,
                    max_shard_bytes: int = sharded.DEFAULT_SHARD_BYTES,
                    chunk_bytes: int = 256 << 20, resume: bool = True,
                    nan_policy: str = "raise", progress: bool = False,
                    distributed: bool | None = None) -> StreamResult:
  """Quantizes ``sources`` tensor by tensor into a sharded jq checkpoint at ``out``.

  Args:
    sources: the checkpoint's tensors, in the order they are written (see :class:`SourceTensor`).
    rules: ordered rules (RTN weight-only or dynamic activations); first match wins.
    out: the output directory (replaced atomically at the end; see :mod:`jq.io.sharded`).
    layouts: ``{path: Layout}`` as for :func:`jq.quantize_tree` (``jq.nn.layouts`` of the model).
    metadata: stored in the header (e.g. the model's source record, the recipe); with several
      processes, process 0's.
    fingerprint: describes the inputs (e.g. file sizes and times): a partial run of other inputs
      is not resumed.
    max_shard_bytes: tensor bytes per output shard.
    chunk_bytes: float32 working size of one column chunk of a large kernel.
    resume: continue a partial run of the same inputs (kept beside ``out``), verifying the shards
      it finished; False starts over.
    nan_policy: as for :func:`jq.quantize_tree`.
    progress: a progress bar over the bytes read (tensors, GB, GB/s).
    distributed: write the checkpoint together with the other ``jax.distributed`` processes
      (None: when ``jax.process_count() > 1``; False: this process alone writes all of it, so
      give each process its own ``out``).  Every process calls this with the same sources,
      rules and options, ``out`` on a filesystem they share; each quantizes and writes its own
      shards (:func:`jq.io.sharded.assign_shards`, balanced by bytes), process 0 writes
      the index, and every process returns once the checkpoint (the same bytes as one process
      writes) is in place.  The progress bar and the returned counts are this process's work.
      The processes wait for each other at the start and at the end, each wait up to
      ``jq.distributed.set_timeout`` (give it more than the difference in their run times); a
      process that fails makes the others raise ``jq.distributed.PeerError`` with its error, and
      no index is written (the finished shards stay for a resume, with any number of processes).

  Raises:
    ValueError: what :func:`plan_stream` refuses, or NaN/Inf values (naming the parameter, shape,
      dtype and first bad index), before the output is finished (the shards done so far are kept
      for a resume); with several processes, processes whose inputs differ (in every process,
      naming the first difference).
    OSError: reading a source or writing (disk full): the partial output is kept, never moved
      into place.
    jq.distributed.PeerError: another process failed (its error is quoted) or did not answer in
      time.
  """
  if distributed is not None and not isinstance(distributed, bool):
    raise ValueError(f"quantize_to_dir: distributed={distributed!r} must be a bool or None")
  dist = distributed if distributed is not None else jax.process_count() > 1
  if not dist or jax.process_count() <= 1:
    return _quantize_to_dir(sources, rules, out, layouts, metadata, fingerprint, max_shard_bytes,
                            chunk_bytes, resume, nan_policy, progress, {})
  from jq import distributed as jqdist  # pylint: disable=import-outside-toplevel
  many = dict(process_index=jax.process_index(), process_count=jax.process_count(),
              exchange=lambda what, info: jqdist.agree(what, {}, info))
  try:
    return _quantize_to_dir(sources, rules, out, layouts, metadata, fingerprint, max_shard_bytes,
                            chunk_bytes, resume, nan_policy, progress, many)
  except BaseException as e:
    jqdist.fail(f"{type(e).__name__}: {e}")   # the others stop at their next exchange
    raise


def _quantize_to_dir(sources, rules, out, layouts, metadata, fingerprint, max_shard_bytes,
                     chunk_bytes, resume, nan_policy, progress, many: dict) -> StreamResult:
  t0 = time.perf_counter()
  _check_chunk_bytes(chunk_bytes)
  rules = tuple(rules)
  planned = plan_stream(sources, rules, layouts=layouts, nan_policy=nan_policy)
  writer = sharded.ShardedWriter(out, [(s.path, q) for s, _, q in planned], rules=rules,
                                 fingerprint={**dict(fingerprint or {}), "nan_policy": nan_policy},
                                 max_shard_bytes=max_shard_bytes, resume=resume, **many)
  mine, todo = set(writer.mine), set(writer.todo)
  total = sum(s.nbytes for s, _, _ in planned if s.path in mine)
  done_bytes = sum(s.nbytes for s, _, _ in planned if s.path in mine and s.path not in todo)
  bar = _bar(progress, total, done_bytes, "quantizing")
  written = bytes_out = 0
  try:
    for path, leaf in _quantized(planned, todo, _Quantizer(layouts, nan_policy), chunk_bytes,
                                 bar):
      writer.add(path, leaf)
      written += 1
      bytes_out += sum(int(np.prod(shape, dtype=np.int64)) * dt.itemsize
                       for _, dt, shape in sharded.leaf_tensors(path, leaf))
      del leaf
  except BaseException:
    writer.close()
    raise
  finally:
    if bar is not None:
      bar.close()
  path = writer.finish(metadata=metadata)
  return StreamResult(out=path, written=written, resumed=len(mine) - len(todo),
                      bytes_in=total - done_bytes, bytes_out=bytes_out,
                      seconds=time.perf_counter() - t0, log=list(writer.log))


def tree_sources(tree: Any) -> list[SourceTensor]:
  """The leaves of an in-memory tree of nested str-keyed dicts as sources (for
  :func:`quantize_in_memory`)."""
  out = []
  for path, leaf in leaves_with_paths(tree):
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
      raise ValueError(f"{path}: a {type(leaf).__name__} leaf; the tensor-by-tensor road takes "
                       "array leaves (use jq.quantize_tree)")
    read = (lambda a, b, x=leaf: x if not np.ndim(x) else x[..., a:b])
    out.append(SourceTensor(path, tuple(leaf.shape), np.dtype(leaf.dtype), read, path))
  return out


def quantize_in_memory(tree: Any, rules: Sequence[Rule], *,
                       layouts: Mapping[str, Layout] | None = None, nan_policy: str = "raise",
                       chunk_bytes: int = 256 << 20, progress: bool = False) -> Any:
  """:func:`jq.quantize_tree`'s result for a tree of nested str-keyed dicts, computed tensor by
  tensor on the streamed road (the same checks and chunking as :func:`quantize_to_dir`), with a
  progress bar; kept leaves are returned as given, and a leaf split over a mesh's devices comes
  back split the same way (``jq.sharding.qarray_sharding``; each is gathered only while it is
  quantized)."""
  _check_chunk_bytes(chunk_bytes)
  sources = tree_sources(tree)
  planned = plan_stream(sources, tuple(rules), layouts=layouts, nan_policy=nan_policy)
  bar = _bar(progress, sum(s.nbytes for s in sources), 0, "quantizing")
  done = {}
  try:
    for path, leaf in _quantized(planned, {s.path for s in sources},
                                 _Quantizer(layouts, nan_policy), chunk_bytes, bar):
      done[path] = leaf
  finally:
    if bar is not None:
      bar.close()
  kept = {s.path for s, r, _ in planned if r is None}

  def out(path, x):
    if path in kept:
      return x
    q, where = done[path], getattr(x, "sharding", None)    # (q: host arrays)
    if isinstance(where, jax.sharding.NamedSharding) and not where.is_fully_replicated:
      from jq.sharding import qarray_sharding  # pylint: disable=import-outside-toplevel
      return jax.device_put(q, qarray_sharding(q, where) if isinstance(q, QArray) else where)
    return jax.tree.map(jnp.asarray, q)
  return map_with_paths(out, tree)


__all__ = ["SourceTensor", "StreamResult", "plan_stream", "abstract_output", "quantize_to_dir", "quantize_in_memory",
           "tree_sources"]
