"""Calibration of a model larger than memory: one block's weights resident at a time.

The road (the same calibration as :func:`jq.ptq.quantize_model`, applied to one block at a time):

1. the leaves outside the blocks go through the streamed road (:mod:`jq.stream`: kept or RTN,
   tensor by tensor) and are written first;
2. the calibration tokens are embedded once (only the embedding's leaves are read); these hidden
   states are the only activations kept between blocks;
3. for each block, in order: its float weights are read from the source, the block alone is
   calibrated and quantized by :func:`jq.ptq.quantize_model` (GPTQ, AWQ, SmoothQuant, static
   scales: every rule, every check and fold of the one road), its leaves (quantized kernels, and
   folded norms) are written to the output shards, and the block's outputs on the hidden states,
   with its weights dequantized (``PTQConfig.sequential``, as the in-memory road) or float,
   become the next block's inputs; then the block is dropped.

Peak host memory: one block's float weights, its quantized copy and the algorithms' work (GPTQ's
Hessians), plus the hidden states of the calibration set (``sequences × length × hidden × 4``
bytes), plus the largest tensor outside the blocks.  The output is written as a sharded jq
checkpoint (:mod:`jq.io.sharded`): atomic, and resumable: a resumed run reads the finished blocks'
quantized weights back from their shards to recompute the hidden states, and calibrates only the
blocks not yet written.

Several ``jax.distributed`` processes (``PTQConfig.distributed``, on by itself with several):
each embeds and carries its share of the calibration chunks (``jq.distributed.process_batches``),
every block's statistics are summed and its GPTQ/AWQ solves split between the processes (as in
:func:`jq.ptq.quantize_model`), and process 0 alone reads the source's leaves outside the blocks
and writes the checkpoint (on a resume it reads finished blocks back and sends them to the
others); the others return once it is in place.

Calibration runs on the block alone, where the in-memory road runs it inside the whole model;
the results agree to float rounding (``tests/models/test_onload.py`` states the tolerance).

Example:
  >>> res = quantize_onloaded(jq_models.blockwise.onload_blocks(config),
  ...                         jq_models.hf.stream_sources(path, config),
  ...                         jq.recipe_rules("gptq-w4a16-g128"), tokens, "out")
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jq import stream
from jq.nn.common import calibration
from jq.calibrate.collect import spanned
from jq.io import sharded
from jq.ptq import folding
from jq.layout import Layout
from jq.qarray import QArray
from jq.spec import ActMode, Algorithm, Rule
from jq.tree import leaves_with_paths


@dataclasses.dataclass(frozen=True)
class OnloadBlocks:
  """What onloaded calibration needs of a block-structured model.

  Attributes:
    prefixes: the blocks' subtrees in call order, e.g. ``("params/layers_0", ...)``; block ``i``'s
      leaves are those under ``prefixes[i] + "/"``.
    embed_paths: the leaves ``embed`` reads.
    embed: ``embed({path: array}, tokens (B, T) int32) -> hidden states (B, T, H)``.
    module: ``module(i)``: a linen module running block ``i`` alone:
      ``module(i).apply({"params": {<last key of prefixes[i]>: block params}}, x) -> y``.
  """
  prefixes: tuple[str, ...]
  embed_paths: tuple[str, ...]
  embed: Callable[[Mapping[str, Any], jax.Array], jax.Array]
  module: Callable[[int], Any]


def _nest(leaves: Mapping[str, Any]) -> dict:
  root: dict = {}
  for path, x in leaves.items():
    node = root
    keys = path.split("/")
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = x
  return root


def _dequantized(leaf: Any, dtype: Any) -> Any:
  """What later blocks run on, as in the in-memory road: a quantized kernel dequantized in
  float32 (``jq.ptq.folding.wide_dtype`` of its stored dtype)."""
  if isinstance(leaf, QArray):
    return leaf.dequantize(jnp.float32).astype(folding.wide_dtype(dtype))
  return jnp.asarray(leaf)


def _fingerprint(calib: np.ndarray, config: Any) -> dict:
  return {"calibration_sha256": hashlib.sha256(np.ascontiguousarray(calib).tobytes()).hexdigest(),
          "calibration_shape": list(calib.shape), "ptq_config": repr(config)}


@calibration
def quantize_onloaded(blocks: OnloadBlocks, sources: Sequence[stream.SourceTensor],
                      rules: Sequence[Rule], calib_tokens: np.ndarray, out: str, *,
                      config: Any = None, layouts: Mapping[str, Layout] | None = None,
                      metadata: Mapping[str, Any] | None = None,
                      fingerprint: Mapping[str, Any] | None = None,
                      max_shard_bytes: int = sharded.DEFAULT_SHARD_BYTES,
                      chunk_bytes: int = 256 << 20, resume: bool = True,
                      progress: bool = False) -> stream.StreamResult:
  """Calibrates and quantizes a model block by block from its sources into a sharded jq
  checkpoint at ``out`` (see the module doc).

  Args:
    blocks: the model's :class:`OnloadBlocks` (``jq_models.blockwise.onload_blocks``).
    sources: every tensor of the model (:class:`jq.stream.SourceTensor`), read on demand.
    rules: ordered rules; calibrated algorithms apply to the leaves inside the blocks.
    calib_tokens: ``(sequences, length)`` int token ids.
    out: the output directory.
    config: a :class:`jq.ptq.PTQConfig` (``sequential``, ``chunk``: sequences per forward,
      ``sample_tokens``).
    layouts: ``{path: Layout}`` for the leaves outside the blocks (``jq.nn.layouts``).
    metadata, fingerprint, max_shard_bytes, chunk_bytes, resume, progress: as for
      :func:`jq.stream.quantize_to_dir`.

  Returns:
    A :class:`jq.stream.StreamResult`; its ``log`` holds the calibration notes of every block
    (folds checked and skipped, GPTQ fallbacks) and the resume notes.

  Raises:
    ValueError: bad calibration tokens, a calibrated rule on a leaf outside the blocks, a block
      with no leaves, or what :func:`jq.ptq.quantize_model` refuses (naming the layer).
  """
  from jq.ptq import pipeline  # pylint: disable=import-outside-toplevel
  from jq.ptq.quantize_model import quantize_model  # pylint: disable=import-outside-toplevel
  t0 = time.perf_counter()
  cfg = config if config is not None else pipeline.PTQConfig()
  calib = np.asarray(calib_tokens)
  if calib.ndim != 2 or calib.shape[0] < 1 or calib.shape[1] < 2 or \
      not np.issubdtype(calib.dtype, np.integer):
    raise ValueError(f"calibration tokens have shape {calib.shape} dtype {calib.dtype}; need "
                     "integer ids of shape (sequences >= 1, length >= 2)")
  if not isinstance(cfg, pipeline.PTQConfig):
    raise ValueError(f"quantize_onloaded: config={config!r:.80} must be a jq.ptq.PTQConfig")
  if cfg.mesh is not None and len(spanned(cfg.mesh)) > 1:
    raise ValueError("quantize_onloaded: PTQConfig.mesh holds the devices of several processes; "
                     "the onloaded road takes a mesh per process (jq.distributed.local_mesh())")
  if calib.size and calib.min() < 0:
    raise ValueError(f"calibration tokens hold negative ids (min {calib.min()})")
  rules = tuple(rules)
  planned = stream.plan_stream(sources, rules, layouts=layouts, calibrated=True)
  by_path = {s.path: (s, r, q) for s, r, q in planned}
  block_of = {}
  for s, _, _ in planned:
    for i, pre in enumerate(blocks.prefixes):
      if s.path.startswith(pre + "/"):
        block_of[s.path] = i
  outside = [p for p in by_path if p not in block_of]
  for p in outside:
    _, rule, _ = by_path[p]
    if rule is not None and (rule.algorithm is not Algorithm.RTN or (
        rule.activation is not None and rule.activation.mode is ActMode.STATIC)):
      s = by_path[p][0]
      raise ValueError(f"{p}: shape {s.shape} dtype {np.dtype(s.dtype)}: the rule asks for "
                       f"{rule.algorithm.value}{' with static activations' if rule.activation else ''}"
                       ", but onloaded calibration calibrates the leaves inside the blocks only; "
                       "use RTN weight-only here (or skip it)")
  per_block = [[p for p in by_path if block_of.get(p) == i] for i in range(len(blocks.prefixes))]
  for i, ps in enumerate(per_block):
    if not ps:
      raise ValueError(f"block {blocks.prefixes[i]} has no leaves among the sources")
  missing = [p for p in blocks.embed_paths if p not in by_path]
  if missing:
    raise ValueError(f"the embedding reads {missing}, which are not among the sources")
  rows = by_path[blocks.embed_paths[0]][0].shape[0]
  if calib.size and calib.max() >= rows:
    raise ValueError(f"calibration tokens hold id {calib.max()}, but the embedding "
                     f"{blocks.embed_paths[0]} has {rows} rows (a tokenizer of another model?)")
  order = outside + [p for ps in per_block for p in ps]
  # AWQ/SmoothQuant fold their scales into a block's float leaves (norms, biases) in float32
  # (jq.ptq.folding): a block's narrow-float leaves kept float are written widened (exactly)
  smoothing = any(r.weight is not None and r.initial.algorithm in (Algorithm.AWQ,
                                                                   Algorithm.SMOOTHQUANT)
                  for r in rules)
  widened = {p for p in block_of if smoothing and by_path[p][1] is None and
             np.dtype(by_path[p][0].dtype).itemsize < 4 and
             jnp.issubdtype(np.dtype(by_path[p][0].dtype), jnp.floating)}
  abstract = {p: (jax.ShapeDtypeStruct(by_path[p][0].shape, np.float32) if p in widened
                  else by_path[p][2]) for p in order}
  dist = jax.process_count() > 1 and cfg.distributed is not False
  lead = not dist or jax.process_index() == 0
  writer = sharded.ShardedWriter(
      out, [(p, abstract[p]) for p in order], rules=rules,
      fingerprint={**dict(fingerprint or {}), **_fingerprint(calib, cfg)},
      max_shard_bytes=max_shard_bytes, resume=resume) if lead else None
  todo = set(writer.todo) if lead else set()
  log = list(writer.log) if lead else []
  n_chunks = -(-calib.shape[0] // max(1, min(cfg.chunk, calib.shape[0])))
  mine = list(range(n_chunks))   # this process's chunks of the calibration set
  if dist:
    from jq import distributed  # pylint: disable=import-outside-toplevel
    mine = distributed.process_batches(mine).indices
    same = {"leaves": [[p, list(by_path[p][0].shape), str(np.dtype(by_path[p][0].dtype))]
                       for p in order],
            "calibration": {k: v for k, v in _fingerprint(calib, cfg).items() if k != "ptq_config"},
            "config": [cfg.sequential, cfg.chunk, cfg.sample_tokens]}
    todo = set(distributed.agree("the onloaded calibration plan", same,
                                 sorted(todo) if lead else None)[0])
  if any(r.weight is not None and r.algorithm is Algorithm.AUTOROUND and
         r.algorithm_options.target == "float" for r in rules):
    log.append("onloaded: learned rounding matches each block to the float block on the "
               "quantized blocks' output (as target='local'): the float model's own activations "
               "are not kept between blocks on this road")
  block_rules = tuple(dataclasses.replace(r, required=False) for r in rules)
  total = sum(s.nbytes for s, _, _ in planned)
  bar = stream._bar(progress, total, 0, "onloaded calibration")  # pylint: disable=protected-access
  written = bytes_out = 0

  def put(path: str, leaf: Any) -> None:
    nonlocal written, bytes_out
    if not lead:   # several processes: process 0 writes
      return
    if path in widened:
      leaf = np.asarray(leaf).astype(np.float32)
    writer.add(path, leaf)
    written += 1
    bytes_out += sum(int(np.prod(sh, dtype=np.int64)) * dt.itemsize
                     for _, dt, sh in sharded.leaf_tensors(path, leaf))

  try:
    # 1. outside the blocks: the streamed road, tensor by tensor
    quant = stream._Quantizer(layouts, "raise")  # pylint: disable=protected-access
    emb = {}   # the embedding's float leaves, kept as they pass (not read twice)
    for path, leaf in stream._quantized([by_path[p] for p in outside],  # pylint: disable=protected-access
                                        todo if lead else set(), quant, chunk_bytes, bar):
      if path in blocks.embed_paths and by_path[path][1] is None:
        emb[path] = leaf
      put(path, leaf)
    if bar is not None:
      bar.update(sum(by_path[p][0].nbytes for p in outside if p not in todo))
    # 2. the hidden states of the calibration set
    chunk = max(1, min(cfg.chunk, calib.shape[0]))
    emb.update({p: by_path[p][0].read_all() for p in blocks.embed_paths if p not in emb})
    embed = jax.jit(blocks.embed)
    xs = [np.asarray(embed(emb, jnp.asarray(calib[i * chunk:(i + 1) * chunk], jnp.int32)))
          for i in mine]
    del emb
    # 3. block by block
    for i, paths in enumerate(per_block):
      key = blocks.prefixes[i].rsplit("/", 1)[-1]
      module = blocks.module(i)
      fwd = jax.jit(module.apply)
      dtypes = {p: np.dtype(by_path[p][0].dtype) for p in paths}
      if all(p not in todo for p in paths):   # finished in a resumed run: read it back
        cur = {p: _dequantized(writer.read_leaf(p), dtypes[p]) for p in paths} if lead else {}
        if dist:   # process 0 reads it, the others get its bits
          got, _ = distributed.share(f"block {blocks.prefixes[i]} read back", cur)
          cur = {p: jnp.asarray(got[p]) for p in paths}
        log.append(f"{blocks.prefixes[i]}: read back from the resumed run")
        if bar is not None:
          bar.update(sum(by_path[p][0].nbytes for p in paths))
      else:
        fl = {p: by_path[p][0].read_all() for p in paths}
        on = (lambda x: x) if cfg.split_params else jnp.asarray   # split: straight into shards
        variables = {"params": _nest({p.split("/", 1)[1]: on(x) for p, x in fl.items()})}
        batches = [jnp.asarray(x) for x in xs]
        if dist:   # every process calibrates on its share; statistics and solves are shared
          batches = distributed.ProcessBatches(batches, mine, n_chunks)
        res = quantize_model(module, variables, block_rules, batches,
                             config=dataclasses.replace(cfg, sequential=False))
        log += [f"{blocks.prefixes[i]}: {line}" for line in res.log]
        got = dict(leaves_with_paths(res.variables))
        for p in paths:
          if p in todo:
            put(p, got[p])
        cur = {p: _dequantized(got[p], dtypes[p]) for p in paths} if cfg.sequential else \
            {p: jnp.asarray(fl[p]) for p in paths}
        del fl, variables, res, got
        if bar is not None:
          bar.update(sum(by_path[p][0].nbytes for p in paths))
      params = {"params": _nest({p.split("/", 1)[1]: x for p, x in cur.items()})}
      if i + 1 < len(per_block):
        xs = [np.asarray(fwd(params, jnp.asarray(x))) for x in xs]
      del cur, params
      if bar is not None:
        bar.set_postfix_str(f"block {i + 1}/{len(per_block)} ({key})", refresh=False)
  except BaseException as e:
    if writer is not None:
      writer.close()
    if dist:
      distributed.fail(f"{type(e).__name__}: {e}")
    raise
  finally:
    if bar is not None:
      bar.close()
  try:
    path = writer.finish(metadata=metadata) if lead else None
  except BaseException as e:
    if dist:
      distributed.fail(f"{type(e).__name__}: {e}")
    raise
  if dist:   # the others return once process 0 has moved the checkpoint into place
    path = distributed.agree("the onloaded checkpoint written by process 0", {}, path)[0]
  return stream.StreamResult(out=path, written=written, resumed=len(planned) - len(todo),
                             bytes_in=total, bytes_out=bytes_out,
                             seconds=time.perf_counter() - t0, log=log)


__all__ = ["OnloadBlocks", "quantize_onloaded"]
