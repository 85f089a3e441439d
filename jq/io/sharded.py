"""jq checkpoints as a directory of safetensors shards and one index (what the streamed road writes).

Layout::

  out/
    jq.index.json                       the jq header (schema in jq.io.codec), sealed as usual, with
                                        one more top-level entry: "shards": {tensor name: file}
    model-00001-of-00003.safetensors    plain safetensors files holding the tensors
    ...

The header is the one a single-file checkpoint carries (tree, leaves, rules, metadata, CRC-32 and
SHA-256 of every tensor, the integrity record), so :func:`load` rebuilds the same tree
:func:`jq.io.load` would, with the same checks; ``shards`` is covered by the integrity record.

Writing (:class:`ShardedWriter`) is built for runs that take hours and may die:

* the shards are built in a work directory beside the destination (``.out.jq-partial``); a shard
  is written under a temporary name, fsync'd and renamed when its last tensor is in, and
  ``progress.json`` there records (atomically) each finished shard's header entries and digests;
* :meth:`ShardedWriter.finish` writes ``jq.index.json`` last and renames the work directory to the
  destination (:func:`jq.io.replace_dir`): a directory without ``jq.index.json`` is never a
  checkpoint, and a failed run never leaves one that looks complete;
* a new writer with the same plan (same ``fingerprint``) resumes: each finished shard is read back
  and checked against its recorded SHA-256s (one that fails is written again), and only the leaves
  of unfinished shards are asked for (:attr:`ShardedWriter.todo`).  A different plan is refused
  (naming the fields that differ) unless ``resume=False``, which starts over.

Several processes (``jax.distributed``, on one host or several sharing a filesystem) write one
checkpoint together, the same bytes as one process: every process plans the same shards, and each
shard is written by one of them (:func:`assign_shards`, balanced by bytes).  The work directory
is shared::

  .out.jq-partial/
    progress.p0.json                    process 0's finished shards (header entries, digests)
    progress.p1.json                    process 1's ...
    model-00001-of-00004.safetensors    written by its owner only (temporary name until done)
    ...

The processes meet through ``exchange`` (``jq.distributed.agree`` in ``jq.stream``): they first
compare their plans (any difference is a ``ValueError`` in every process), process 0 alone clears
or creates the work directory, every process verifies the finished shards it owns; at
:meth:`ShardedWriter.finish` process 0 gathers every process's records, checks every shard file,
writes the one index and moves the directory into place, and the others return once it is there.
A process that fails leaves no index (process 0 writes it only after every process has reported
its shards finished); the finished shards stay for a resume, with any number of processes (the
records of every progress file are used).

Example:
  >>> w = ShardedWriter("out", [(path, abstract_leaf), ...], rules=rules, fingerprint={...})
  >>> for path in w.todo:
  ...   w.add(path, compute(path))
  >>> w.finish(metadata={"model": "..."})

  Two processes (each runs the same code; ``agree`` returns every process's ``info``):
  >>> ex = lambda what, info: jq.distributed.agree(what, {}, info)
  >>> w = ShardedWriter("out", leaves, rules=rules, process_index=jax.process_index(),
  ...                   process_count=jax.process_count(), exchange=ex)
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import struct
import zlib
import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from jq.io import codec
from jq.io.atomic import _fsync_dir, atomic_write, replace_dir
from jq.io.codec import CheckpointError
from jq.io.safetensors_io import (_NAMES, TensorInfo, _OnDemand, _PlacedArrays, _read_array,
                                  _read_header, _Tensors, check_shardings_tree,
                                  read_safetensors_header, tensor_shardings)
from jq.qarray import QArray
from jq.spec import Rule

PyTree = Any

INDEX = "jq.index.json"
PROGRESS = "progress.json"   # one process; process i of several: progress.p{i}.json
_PROGRESS_RE = re.compile(r"progress(\.p\d+)?\.json")
SHARDS_KEY = "shards"
DEFAULT_SHARD_BYTES = 2 << 30
_PARTIAL = ".jq-partial"
_TMP = ".jq-tmp"  # suffix of a shard being written


def is_sharded(path: str | os.PathLike) -> bool:
  """Whether ``path`` is a directory holding a sharded jq checkpoint (its index)."""
  return os.path.isdir(path) and os.path.isfile(os.path.join(path, INDEX))


def work_dir(out: str | os.PathLike) -> str:
  """Where a :class:`ShardedWriter` for ``out`` builds (and keeps, to resume) its shards."""
  out = os.path.abspath(os.fspath(out))
  parent, base = os.path.split(out)
  return os.path.join(parent, f".{base}{_PARTIAL}")


# ---- planning --------------------------------------------------------------------------------


def leaf_tensors(path: str, leaf: Any) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
  """``[(tensor name, dtype, shape)]`` a leaf (concrete, or abstract: ``jax.eval_shape`` output)
  is stored as, named as :func:`jq.io.codec.encode` names them."""
  if isinstance(leaf, QArray):
    parts = {"values": leaf.values, "scale": leaf.scale, "zero_point": leaf.zero_point}
    if leaf.activation is not None:
      parts["act_scale"] = leaf.activation.scale
      parts["act_zero_point"] = leaf.activation.zero_point
    return [(f"{path}.{c}", np.dtype(parts[c].dtype), tuple(parts[c].shape))
            for c in codec.COMPONENTS if parts.get(c) is not None]
  return [(path, np.dtype(leaf.dtype), tuple(leaf.shape))]


def _nbytes(dt: np.dtype, shape: tuple[int, ...]) -> int:
  return int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize


@dataclasses.dataclass(frozen=True)
class Shard:
  """One planned shard: its file name, leaves (in write order) and tensor layout."""
  file: str
  leaves: tuple[str, ...]
  infos: dict[str, TensorInfo]  # tensor name -> dtype, shape, [begin, end) in the data section
  header: bytes                 # the safetensors header (length prefix included)

  @property
  def nbytes(self) -> int:
    return len(self.header) + sum(t.end - t.begin for t in self.infos.values())


def _layout(tensors: Sequence[tuple[str, np.dtype, tuple[int, ...]]]
            ) -> tuple[dict[str, TensorInfo], bytes]:
  """Offsets (largest itemsize first, as :func:`jq.io.safetensors_io.write_safetensors` lays
  tensors out, so each starts aligned) and the encoded safetensors header."""
  order = sorted(range(len(tensors)), key=lambda i: (-np.dtype(tensors[i][1]).itemsize, i))
  infos, entries, offset = {}, {}, 0
  for i in order:
    name, dt, shape = tensors[i]
    if np.dtype(dt) not in _NAMES:
      raise CheckpointError(f"{name}: shape {shape} dtype {dt} has no safetensors dtype")
    n = _nbytes(dt, shape)
    infos[name] = TensorInfo(np.dtype(dt), tuple(shape), offset, offset + n)
    entries[name] = {"dtype": _NAMES[np.dtype(dt)], "shape": list(shape),
                     "data_offsets": [offset, offset + n]}
    offset += n
  raw = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
  raw += b" " * (-(8 + len(raw)) % 8)
  return infos, struct.pack("<Q", len(raw)) + raw


def plan_shards(leaves: Sequence[tuple[str, Any]], max_shard_bytes: int = DEFAULT_SHARD_BYTES
                ) -> list[Shard]:
  """Groups the leaves (in order) into shards of at most ``max_shard_bytes`` of tensor data (a
  leaf larger than that gets a shard of its own); a leaf's tensors stay in one shard.

  Args:
    leaves: ``[(path, leaf)]``, leaves concrete or abstract (shapes and dtypes are read).
  """
  if not isinstance(max_shard_bytes, int) or isinstance(max_shard_bytes, bool) or \
      max_shard_bytes < 1:
    raise ValueError(f"max_shard_bytes={max_shard_bytes!r} must be an int >= 1")
  groups: list[list[tuple[str, list]]] = [[]]
  size = 0
  for path, leaf in leaves:
    ts = leaf_tensors(path, leaf)
    n = sum(_nbytes(dt, shape) for _, dt, shape in ts)
    if groups[-1] and size + n > max_shard_bytes:
      groups.append([])
      size = 0
    groups[-1].append((path, ts))
    size += n
  groups = [g for g in groups if g]
  out = []
  for i, g in enumerate(groups):
    infos, header = _layout([t for _, ts in g for t in ts])
    out.append(Shard(f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors",
                     tuple(p for p, _ in g), infos, header))
  return out


def assign_shards(shards: Sequence[Shard], process_count: int) -> list[int]:
  """The process that writes each shard (``owners[i]`` writes ``shards[i]``), balanced by bytes.

  Greedy, largest first: the shards in order of decreasing size (equal sizes in plan order), each
  to the process with the fewest bytes so far (ties to the lowest index).  It depends on the plan
  only, so every process computes the same owners; with at least as many shards as processes,
  every process writes one or more.
  """
  if not isinstance(process_count, int) or isinstance(process_count, bool) or process_count < 1:
    raise ValueError(f"process_count={process_count!r} must be an int >= 1")
  load, owners = [0] * process_count, [0] * len(shards)
  for i in sorted(range(len(shards)), key=lambda i: (-shards[i].nbytes, i)):
    p = min(range(process_count), key=lambda p: (load[p], p))
    owners[i] = p
    load[p] += shards[i].nbytes
  return owners


# ---- writing ---------------------------------------------------------------------------------


def _nested(path: str, leaf: Any) -> dict:
  node: Any = leaf
  for k in reversed(path.split("/")):
    node = {k: node}
  return node


def _tree_node(paths: Sequence[str]) -> dict:
  """The header's ``tree`` entry for a tree of nested str-keyed dicts with these leaf paths."""
  root: dict = {}
  for p in paths:
    node = root
    keys = p.split("/")
    for k in keys[:-1]:
      child = node.setdefault(k, {})
      if not isinstance(child, dict):
        raise CheckpointError(f"{p}: {k!r} is both a leaf and a subtree")
      node = child
    if keys[-1] in node:
      raise CheckpointError(f"{p}: the path occurs twice")
    node[keys[-1]] = p

  def enc(node: Any) -> dict:
    if isinstance(node, str):
      return {"kind": "leaf", "path": node}
    return {"kind": "dict", "items": [[k, enc(v)] for k, v in node.items()]}

  return enc(root)


def _file_digests(path: str, infos: Mapping[str, TensorInfo], start: int,
                  chunk: int = 1 << 24) -> dict[str, tuple[int, str]]:
  """``{tensor: (crc32, sha256)}`` of a shard's tensors, read back in chunks (no memory map)."""
  out = {}
  with open(path, "rb") as f:
    for name, t in infos.items():
      f.seek(start + t.begin)
      crc, sha, left = 0, hashlib.sha256(), t.end - t.begin
      while left:
        part = f.read(min(chunk, left))
        if not part:
          break
        crc, left = zlib.crc32(part, crc), left - len(part)
        sha.update(part)
      out[name] = (crc, sha.hexdigest()) if not left else (-1, "")
  return out


def _short(v: Any, limit: int = 200) -> str:
  s = repr(v)
  return s if len(s) <= limit else s[:limit] + "..."


def _first_difference(key: str, a: Any, b: Any) -> tuple[str, Any, Any]:
  """``(key, value in a, value in b)`` of the first entry where ``a`` and ``b`` (JSON values)
  differ, descending into dicts and equally long lists."""
  if isinstance(a, dict) and isinstance(b, dict):
    k = next(k for k in sorted(set(a) | set(b), key=str)
             if a.get(k, "<missing>") != b.get(k, "<missing>"))
    return _first_difference(f"{key}.{k}", a.get(k, "<missing>"), b.get(k, "<missing>"))
  if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
    i = next(i for i in range(len(a)) if a[i] != b[i])
    return _first_difference(f"{key}[{i}]", a[i], b[i])
  return key, a, b


def _entry(d: Any, key: str) -> Any:
  """``d["a"]["b"]`` for ``key="a.b"`` ("<missing>" where there is none)."""
  for k in key.split("."):
    d = d.get(k, "<missing>") if isinstance(d, dict) else "<missing>"
  return d


class ShardedWriter:
  """Writes a sharded jq checkpoint leaf by leaf, resumably, in one process or several (see the
  module doc).

  Args:
    out: the destination directory (created by :meth:`finish`; an existing one is replaced).
    leaves: ``[(path, leaf)]`` of the whole tree in order, leaves abstract (``jax.eval_shape``
      output, ``jax.ShapeDtypeStruct``) or concrete: the shard plan.  Paths are '/'-joined keys of
      nested str-keyed dicts.
    rules: the rules that produce the tree (recorded per leaf, as :func:`jq.io.save` does).
    fingerprint: a JSON-able description of the inputs (source, rules, ...): a partial run with
      another fingerprint is not resumed.
    max_shard_bytes: tensor bytes per shard.
    resume: continue a partial run of the same plan (default); False deletes it and starts over.
    process_index, process_count: this process and the number of processes writing the
      checkpoint together (``jax.process_index()``, ``jax.process_count()``); each writes the
      shards :func:`assign_shards` gives it.  Every process passes the same ``out`` (on a shared
      filesystem), leaves, rules, fingerprint, ``max_shard_bytes`` and ``resume``.
    exchange: with several processes, ``exchange(what, info)`` returns every process's ``info``
      (JSON-able) in process order, once every process has called it with the same ``what``
      (``lambda what, info: jq.distributed.agree(what, {}, info)``); the constructor and
      :meth:`finish` call it.  A process that raises must tell the others (``jq.distributed.fail``,
      as :func:`jq.stream.quantize_to_dir` does), or they wait for the exchange's timeout.

  Raises:
    ValueError: a bad process index or count, several processes without ``exchange``, processes
      whose plans differ (in every process, naming the first difference), a partial run of other
      inputs.
  """

  def __init__(self, out: str | os.PathLike, leaves: Sequence[tuple[str, Any]], *,
               rules: Sequence[Rule] = (), fingerprint: Mapping[str, Any] | None = None,
               max_shard_bytes: int = DEFAULT_SHARD_BYTES, resume: bool = True,
               process_index: int = 0, process_count: int = 1,
               exchange: Callable[[str, Any], Sequence[Any]] | None = None):
    for name, v, lo in (("process_count", process_count, 1), ("process_index", process_index, 0)):
      if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise ValueError(f"ShardedWriter: {name}={v!r} must be an int >= {lo}")
    if process_index >= process_count:
      raise ValueError(f"ShardedWriter: process_index={process_index} must be < "
                       f"process_count={process_count}")
    if process_count > 1 and not callable(exchange):
      raise ValueError(f"ShardedWriter: {process_count} processes need exchange(what, info) -> "
                       "every process's info (e.g. lambda what, info: "
                       f"jq.distributed.agree(what, {{}}, info)); got {exchange!r}")
    self.out = os.path.abspath(os.fspath(out))
    if os.path.exists(self.out) and not os.path.isdir(self.out):
      raise ValueError(f"{self.out} exists and is not a directory; a sharded checkpoint is a "
                       "directory")
    parent = os.path.dirname(self.out)
    if not os.path.isdir(parent):
      raise FileNotFoundError(f"cannot write {self.out}: directory {parent} does not exist")
    self.rules = tuple(rules)
    self.paths = [p for p, _ in leaves]
    self.shards = plan_shards(leaves, max_shard_bytes)
    self.shard_of = {p: i for i, s in enumerate(self.shards) for p in s.leaves}
    self.process_index, self.process_count = process_index, process_count
    self.owner = assign_shards(self.shards, process_count)   # shard index -> its process
    self.exchange = exchange
    plan = [[s.file, list(s.leaves), {n: [t.dtype.name, list(t.shape)] for n, t in s.infos.items()}]
            for s in self.shards]
    # a plan holding 3-bit values records the format that packs them (version 1 partial runs,
    # with 4-bit slots, are then refused rather than read back in the new packing)
    fmt = codec.format_version(x.qtype for _, x in leaves if isinstance(x, QArray))
    self.fingerprint = json.loads(json.dumps({"inputs": dict(fingerprint or {}), "plan": plan,
                                              "rules": [r.describe() for r in self.rules],
                                              **({"format": fmt} if fmt > 1 else {})}))
    self.work = work_dir(self.out)
    self.progress_file = PROGRESS if process_count == 1 else f"progress.p{process_index}.json"
    self.done: dict[str, dict] = {}     # shard file -> {"leaves": {...}, "tensors": {...}}
    self.log: list[str] = []
    self._open: tuple[int, Any, str, dict, dict] | None = None  # (shard, file, tmp, leaves, tensors)
    self._setup(resume)

  def _exchange(self, what: str, info: Any) -> list[Any]:
    got = list(self.exchange(what, info))
    if len(got) != self.process_count:
      raise ValueError(f"ShardedWriter: exchange({what!r}) returned {len(got)} answers for "
                       f"{self.process_count} processes")
    return got

  def _mine(self, i: int) -> bool:
    return self.owner[i] == self.process_index

  # -- resume ------------------------------------------------------------------------------
  def _setup(self, resume: bool) -> None:
    several = self.process_count > 1
    if several:
      self._agree(resume)
    if self.process_index == 0:
      self._prepare(resume)
    if several:   # process 0 has cleared or created the work directory
      self._exchange("the work directory", None)
    self._resume()
    if several:   # every process has read every progress file: they may be rewritten
      counts = self._exchange("the resumed shards", len(self.done))
      if sum(counts):
        own = sum(self._mine(i) for i in range(len(self.shards)))
        self.log.append(f"resuming {self.work}: {sum(counts)} of {len(self.shards)} shards done "
                        f"and verified ({len(self.done)} of the {own} of process "
                        f"{self.process_index})")
    elif self.done:
      self.log.append(f"resuming {self.work}: {len(self.done)} of {len(self.shards)} shards done "
                      "and verified")
    self._save_progress()

  def _agree(self, resume: bool) -> None:
    """Checks (in every process) that every process writes the same checkpoint."""
    mine = {"fingerprint": self.fingerprint, "resume": bool(resume),
            "process_count": self.process_count}
    got = self._exchange("the checkpoint plan", mine)
    diffs = []
    for p in range(1, len(got)):
      for key in ("fingerprint.inputs", "fingerprint.rules", "fingerprint.plan", "resume",
                  "process_count"):
        a, b = _entry(got[0], key), _entry(got[p], key)
        if a != b:
          k, a, b = _first_difference(key, a, b)
          diffs.append(f"{k}: process 0 has {_short(a)}, process {p} {_short(b)}")
    if diffs:
      more = f"; and {len(diffs) - 4} more" if len(diffs) > 4 else ""
      raise ValueError(f"{self.out}: the processes would write different checkpoints: "
                       + "; ".join(diffs[:4]) + more + ". Every process must pass the same "
                       "sources, rules and options")

  def _prepare(self, resume: bool) -> None:
    """Clears (``resume=False``, or nothing to resume) or creates the work directory (process 0)."""
    if os.path.isdir(self.work) and not resume:
      shutil.rmtree(self.work)
    if os.path.isdir(self.work) and not self._progress_files() and not any(
        n.endswith(".safetensors") for n in os.listdir(self.work)):
      shutil.rmtree(self.work)   # killed before its first record: nothing to resume
    if not os.path.isdir(self.work):
      os.makedirs(self.work)

  def _progress_files(self) -> list[str]:
    """The progress files in the work directory, this process's first."""
    names = sorted(n for n in os.listdir(self.work) if _PROGRESS_RE.fullmatch(n))
    return sorted(names, key=lambda n: n != self.progress_file)

  def _resume(self) -> None:
    """Adopts the verified records of this process's finished shards (from any progress file: a
    run with another number of processes is resumed too) and drops its unfinished files."""
    names = self._progress_files()
    if not names and any(n.endswith(".safetensors") for n in os.listdir(self.work)):
      raise ValueError(f"{self.work} holds a partial run whose {self.progress_file} cannot be "
                       "read (it is missing); delete the directory, or start over with "
                       "resume=False (--restart)")
    found: dict[str, list] = {}
    for name in names:
      prog_path = os.path.join(self.work, name)
      try:
        with open(prog_path, "rb") as f:
          prog = codec.parse_json(f.read(), f"{prog_path}")
      except (OSError, CheckpointError) as e:
        raise ValueError(f"{self.work} holds a partial run whose {name} cannot be read ({e}); "
                         "delete the directory, or start over with resume=False (--restart)"
                         ) from e
      self._check_fingerprint(prog)
      for file, rec in dict(prog.get("shards") or {}).items():
        found.setdefault(file, []).append(rec)
    index = {s.file: i for i, s in enumerate(self.shards)}
    for file, recs in found.items():
      i = index.get(file)
      if (self.process_index != 0) if i is None else not self._mine(i):
        continue   # another process's (process 0 drops files outside the plan)
      rec, problem = self._check_done(file, recs)
      if problem:
        self.log.append(f"{file}: {problem}; writing it again")
        try:
          os.unlink(os.path.join(self.work, file))
        except FileNotFoundError:
          pass
      else:
        self.done[file] = rec
    for name in os.listdir(self.work):   # temporary files of an interrupted shard (or record)
      if name.startswith(".") and name.endswith(_TMP):
        i = index.get(name[1:-len(_TMP)])
        if (self.process_index == 0) if i is None else self._mine(i):
          os.unlink(os.path.join(self.work, name))
      elif name.startswith(f".{self.progress_file}.jq-tmp-"):
        os.unlink(os.path.join(self.work, name))

  def _check_fingerprint(self, prog: Any) -> None:
    old = prog.get("fingerprint") if isinstance(prog, dict) else None
    if old == self.fingerprint:
      return
    fields = sorted(k for k in set(old or {}) | set(self.fingerprint)
                    if (old or {}).get(k) != self.fingerprint.get(k)) if isinstance(old, dict) \
        else ["fingerprint"]
    inner = []
    if "inputs" in fields and isinstance(old, dict) and isinstance(old.get("inputs"), dict):
      a, b = old["inputs"], self.fingerprint["inputs"]
      inner = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    raise ValueError(f"{self.work} holds a partial run made from other inputs (differing: "
                     f"{fields}{' ' + str(inner) if inner else ''}); delete it, or start over "
                     "with resume=False (--restart)")

  def _check_done(self, file: str, recs: Sequence[Any]) -> tuple[dict | None, str | None]:
    """``(a record the shard file passes, None)``, or ``(None, why none does)``."""
    idx = next((i for i, s in enumerate(self.shards) if s.file == file), None)
    recs = [r for r in recs if isinstance(r, dict) and isinstance(r.get("tensors"), dict)]
    if idx is None or not recs:
      return None, "not in the plan"
    path = os.path.join(self.work, file)
    shard = self.shards[idx]
    try:
      infos, _ = read_safetensors_header(path)
    except (OSError, CheckpointError) as e:
      return None, f"unreadable ({e})"
    if {n: (t.dtype, t.shape) for n, t in infos.items()} != \
        {n: (t.dtype, t.shape) for n, t in shard.infos.items()}:
      return None, "holds other tensors than planned"
    got = _file_digests(path, shard.infos, len(shard.header))
    problem = None
    for rec in recs:
      bad = next((name for name, (crc, sha) in got.items()
                  if (crc, sha) != (rec["tensors"].get(name, {}).get("crc32"),
                                    rec["tensors"].get(name, {}).get("sha256"))), None)
      if bad is None:
        return rec, None
      problem = problem or f"tensor {bad!r} fails its recorded SHA-256"
    return None, problem

  def _save_progress(self) -> None:
    with atomic_write(os.path.join(self.work, self.progress_file)) as f:
      f.write(json.dumps({"fingerprint": self.fingerprint, "shards": self.done},
                         separators=(",", ":")).encode())

  @property
  def mine(self) -> list[str]:
    """Leaf paths of the shards this process writes, in order (every leaf in one process)."""
    return [p for p in self.paths if self._mine(self.shard_of[p])]

  @property
  def todo(self) -> list[str]:
    """Leaf paths still to :meth:`add` in this process, in order: those of its shards that are
    not finished."""
    return [p for p in self.mine if self.shards[self.shard_of[p]].file not in self.done]

  # -- writing -----------------------------------------------------------------------------
  def add(self, path: str, leaf: Any) -> None:
    """Writes one leaf (in :attr:`todo` order); a shard is closed and recorded with its last leaf.

    Raises:
      ValueError: a leaf out of order, of a shard another process writes, or whose tensors differ
        from the plan (naming path, shapes and dtypes).
      CheckpointError: what :func:`jq.io.save` refuses (invalid QArray, rules that disagree).
      OSError: the disk is full or not writable; the work directory is kept for a resume.
    """
    if path not in self.shard_of:
      raise ValueError(f"{path}: not a leaf of the planned tree")
    i = self.shard_of[path]
    shard = self.shards[i]
    if not self._mine(i):
      raise ValueError(f"{path}: its shard {shard.file} is written by process {self.owner[i]}, "
                       f"not this one ({self.process_index}); add only the leaves of "
                       "ShardedWriter.todo")
    if shard.file in self.done:
      raise ValueError(f"{path}: its shard {shard.file} is already written")
    if self._open is None or self._open[0] != i:
      if self._open is not None:
        raise ValueError(f"{path}: shard {self.shards[self._open[0]].file} is not finished "
                         f"(leaves come in plan order)")
      self._start(i)
    _, f, tmp, leaves, tensors = self._open
    expect = shard.leaves[len(leaves)]
    if path != expect:
      raise ValueError(f"{path}: out of order; the next leaf of {shard.file} is {expect}")
    header, arrays = codec.encode(_nested(path, leaf), rules=self.rules)
    for name, arr in arrays.items():
      t = shard.infos.get(name)
      if t is None or arr.dtype != t.dtype or tuple(arr.shape) != t.shape:
        want = "nothing" if t is None else f"shape {t.shape} dtype {t.dtype}"
        raise ValueError(f"{name}: shape {tuple(arr.shape)} dtype {arr.dtype}, but the plan has "
                         f"{want}")
    try:
      for name, arr in arrays.items():
        f.seek(len(shard.header) + shard.infos[name].begin)
        f.write(memoryview(arr.reshape(-1).view(np.uint8)))
    except BaseException:
      self._abort()
      raise
    leaves[path] = header["leaves"][path]
    tensors.update(header["tensors"])
    if len(leaves) == len(shard.leaves):
      self._close()

  def _start(self, i: int) -> None:
    shard = self.shards[i]
    tmp = os.path.join(self.work, f".{shard.file}{_TMP}")
    f = open(tmp, "wb")  # pylint: disable=consider-using-with  (closed in _close/_abort)
    try:
      f.write(shard.header)
      f.truncate(shard.nbytes)
    except BaseException:
      f.close()
      os.unlink(tmp)
      raise
    self._open = (i, f, tmp, {}, {})

  def _abort(self) -> None:
    if self._open is None:
      return
    _, f, tmp, _, _ = self._open
    self._open = None
    try:
      f.close()
    finally:
      if os.path.exists(tmp):
        os.unlink(tmp)

  def _close(self) -> None:
    i, f, tmp, leaves, tensors = self._open
    shard = self.shards[i]
    try:
      f.flush()
      os.fsync(f.fileno())
      f.close()
      os.replace(tmp, os.path.join(self.work, shard.file))
      _fsync_dir(self.work)
    except BaseException:
      self._abort()
      raise
    self._open = None
    self.done[shard.file] = {"leaves": leaves, "tensors": tensors}
    self._save_progress()

  def close(self) -> None:
    """Drops an unfinished shard (the finished ones stay, for a resume)."""
    self._abort()

  def read_leaf(self, path: str) -> Any:
    """A leaf of a finished shard, read back and checked against its recorded digests (what a
    resumed run continues from, e.g. the quantized blocks before the first unfinished one).

    Raises:
      ValueError: the leaf's shard is not finished, or another process writes it.
    """
    i = self.shard_of[path]
    shard = self.shards[i]
    rec = self.done.get(shard.file)
    if rec is None:
      whose = "" if self._mine(i) else f" by this process (process {self.owner[i]} writes it)"
      raise ValueError(f"{path}: its shard {shard.file} is not finished{whose}")
    info = rec["leaves"][path]
    names = ([f"{path}.{c}" for c in info.get("components", ())] if info.get("kind") == "qarray"
             else [info["tensor"]])
    from jq import spec_json  # pylint: disable=import-outside-toplevel
    header = {"format": codec.FORMAT,
              "version": codec.format_version(codec.qarray_qtypes({path: info})), "metadata": {},
              "rules": [spec_json.rule_to_json(r) for r in self.rules],
              "tree": {"kind": "leaf", "path": path}, "leaves": {path: info},
              "tensors": {n: rec["tensors"][n] for n in names}}
    file = os.path.join(self.work, shard.file)
    with open(file, "rb") as f:
      arrays = {n: _read_array(f, shard.infos[n], len(shard.header), n, file) for n in names}
    return codec.decode(header, arrays, source=file, verify=True)

  def finish(self, *, metadata: Mapping[str, Any] | None = None) -> str:
    """Writes the index and moves the finished checkpoint to ``out``; returns its path.

    With several processes every process calls it: process 0 gathers the records of every
    shard, checks that each shard file is in the work directory with its planned size, writes the
    index (its own ``metadata``) and moves the directory; the others return once it is in place.

    Raises:
      ValueError: leaves of this process are missing (naming the first); in process 0, a shard
        that its process did not report finished, or whose file is missing or of another size in
        the work directory (the processes do not share it?).
    """
    missing = self.todo
    if missing:
      raise ValueError(f"{len(missing)} leaves were not written, e.g. {missing[0]}")
    user = dict(metadata or {})
    try:
      json.dumps(user, allow_nan=False)
    except (TypeError, ValueError) as e:
      raise CheckpointError(f"metadata must be JSON-serialisable: {e}") from e
    done = self.done
    if self.process_count > 1:
      # a JSON text, so that the records keep their key order (the index is the same bytes)
      got = self._exchange("the finished shards", json.dumps(self.done, separators=(",", ":")))
      if self.process_index != 0:
        self._exchange("the finished checkpoint", None)   # process 0 has moved it into place
        return self.out
      done = self._gathered(got)
    leaves, tensors, shards = {}, {}, {}
    for s in self.shards:
      rec = done[s.file]
      leaves.update(rec["leaves"])
      tensors.update(rec["tensors"])
      shards.update({n: s.file for n in rec["tensors"]})
    from jq import spec_json  # pylint: disable=import-outside-toplevel
    header = {"format": codec.FORMAT, "version": codec.format_version(codec.qarray_qtypes(leaves)),
              "jq_version": codec._jq_version(),  # pylint: disable=protected-access
              "metadata": user, "rules": [spec_json.rule_to_json(r) for r in self.rules],
              "tree": _tree_node(self.paths), "leaves": {p: leaves[p] for p in self.paths},
              "tensors": tensors, SHARDS_KEY: shards}
    sealed = codec.seal(header)
    with atomic_write(os.path.join(self.work, INDEX)) as f:
      f.write(json.dumps(sealed, indent=1, allow_nan=False).encode())
    for name in self._progress_files():
      os.unlink(os.path.join(self.work, name))
    replace_dir(self.work, self.out)
    if self.process_count > 1:
      self._exchange("the finished checkpoint", None)
    return self.out

  def _gathered(self, got: Sequence[Any]) -> dict[str, dict]:
    """Every process's records merged (process 0), each shard checked in the work directory."""
    index = {s.file: i for i, s in enumerate(self.shards)}
    done: dict[str, dict] = {}
    for p, blob in enumerate(got):
      for file, rec in dict(json.loads(blob) if isinstance(blob, str) else blob).items():
        i = index.get(file)
        if i is None or self.owner[i] != p:
          raise ValueError(f"{self.work}: process {p} reports shard {file!r}, which "
                           + ("is not in the plan" if i is None else
                              f"process {self.owner[i]} writes") +
                           "; do all processes run the same version of jq?")
        done[file] = rec
    for i, s in enumerate(self.shards):
      where = f"{self.work}: shard {s.file} (written by process {self.owner[i]})"
      rec = done.get(s.file)
      if not isinstance(rec, dict) or set(rec.get("leaves") or ()) != set(s.leaves):
        raise ValueError(f"{where} is not reported finished with all its leaves; the finished "
                         "shards are kept for a resume")
      try:
        size = os.path.getsize(os.path.join(self.work, s.file))
      except OSError:
        size = None
      if size != s.nbytes:
        raise ValueError(f"{where} is " + ("missing" if size is None else f"{size} bytes, not "
                                           f"{s.nbytes}") + " in process 0's work directory; "
                         "every process must write to the same directory on a shared "
                         "filesystem (rerun to resume)")
    return done


# ---- reading ---------------------------------------------------------------------------------


def _index(directory: str) -> dict:
  path = os.path.join(directory, INDEX)
  try:
    size = os.path.getsize(path)
  except OSError as e:
    raise CheckpointError(f"{directory}: no {INDEX} (not a sharded jq checkpoint, or an "
                          "unfinished one)") from e
  if size > codec.MAX_HEADER_JSON_BYTES:
    raise CheckpointError(f"{path}: {size} bytes exceeds the {codec.MAX_HEADER_JSON_BYTES}-byte "
                          "header limit")
  with open(path, "rb") as f:
    header = codec.parse_json(f.read(), path)
  header = codec.check_header(header, source=path)
  shards = header.get(SHARDS_KEY)
  if not isinstance(shards, dict) or not all(
      isinstance(k, str) and isinstance(v, str) for k, v in shards.items()):
    raise CheckpointError(f"{path}: entry {SHARDS_KEY!r} must map tensor names to shard files")
  return header


def _shard_files(directory: str, header: dict) -> dict[str, str]:
  """``{shard file: its path}``; names are plain file names inside ``directory``."""
  out = {}
  for name, file in header[SHARDS_KEY].items():
    if file in out:
      continue
    if os.path.basename(file) != file or file in ("", ".", "..") or not file.endswith(
        ".safetensors"):
      raise CheckpointError(f"{directory}/{INDEX}: tensor {name!r} names shard {file!r}, which is "
                            "not a .safetensors file name inside the checkpoint directory")
    path = os.path.join(directory, file)
    if not os.path.isfile(path):
      raise CheckpointError(f"{directory}: shard {file!r} (holding {name!r}) is missing")
    out[file] = path
  return out


class _ShardArrays(_Tensors):
  """Reads each tensor from its shard on first access (plain reads, one copy at a time)."""

  def __init__(self, files: dict[str, Any], where: dict[str, tuple[str, TensorInfo, int]],
               directory: str):
    self._files, self._where, self._dir = files, where, directory
    self._infos = {n: w[1] for n, w in where.items()}

  def __getitem__(self, name: str) -> np.ndarray:
    file, info, start = self._where[name]
    return _read_array(self._files[file], info, start, name, os.path.join(self._dir, file))


def _open_shards(directory: str, header: dict
                 ) -> tuple[dict[str, tuple[str, TensorInfo, int]], dict[str, tuple]]:
  where, found = {}, {}
  for file, path in _shard_files(directory, header).items():
    with open(path, "rb") as f:
      infos, _, start = _read_header(f, path)
    for name, t in infos.items():
      if header[SHARDS_KEY].get(name) != file:
        raise CheckpointError(f"{path}: holds tensor {name!r}, which the index places in "
                              f"{header[SHARDS_KEY].get(name)!r}")
      where[name] = (file, t, start)
      found[name] = (t.dtype, t.shape)
  return where, found


def load_header(directory: str | os.PathLike) -> dict:
  """The checked jq header of a sharded checkpoint (as :func:`jq.io.load_header`; reads no tensor
  data, but every shard's safetensors header)."""
  directory = os.fspath(directory)
  header = _index(directory)
  _, found = _open_shards(directory, header)
  verified = codec.verify_header(header, found, source=os.path.join(directory, INDEX))
  return {**header, "verified": verified}


class _Placed(_Tensors):
  """Each tensor from its shard's :class:`jq.io.safetensors_io._PlacedArrays` (memory-mapped;
  every device reads only its own slice)."""

  def __init__(self, by_shard: dict[str, Any], where: dict[str, tuple[str, TensorInfo, int]]):
    self._by, self._where = by_shard, where
    self._infos = {n: w[1] for n, w in where.items()}

  def __getitem__(self, name: str) -> Any:
    return self._by[self._where[name][0]][name]


def load(directory: str | os.PathLike, *, verify: bool = True, shardings: PyTree | None = None,
         lazy: bool = False) -> PyTree:
  """Loads a sharded jq checkpoint (see the module doc): the same tree and checks as
  :func:`jq.io.load` (header integrity always; each tensor's CRC-32 and SHA-256 with ``verify``;
  ``shardings`` places every array as there, each device reading its own slice; ``lazy``: leaves
  as :class:`jq.io.codec.LazyLeaf`s, each read from its shard by its ``load()``).

  Raises:
    CheckpointError: a missing, truncated or foreign shard, a shard name leaving the directory,
      or any check :func:`jq.io.load` makes.
  """
  directory = os.fspath(directory)
  header = _index(directory)
  where, found = _open_shards(directory, header)
  source = os.path.join(directory, INDEX)
  codec.verify_header(header, found, source=source)
  if lazy:
    if shardings is not None:
      raise ValueError("jq.io.load: lazy=True reads leaves one at a time on the host; it does "
                       "not take shardings")
    return codec.decode(header, _OnDemand({n: (os.path.join(directory, w[0]), w[1], w[2])
                                           for n, w in where.items()}),
                        source=source, verify=verify, lazy=True)
  shard_names = sorted({w[0] for w in where.values()})
  if shardings is not None:
    placement = tensor_shardings(header, shardings, source=source)
    by = {}
    for file in shard_names:
      path = os.path.join(directory, file)
      mine = {n: w[1] for n, w in where.items() if w[0] == file}
      start = next(w[2] for w in where.values() if w[0] == file)
      size = os.path.getsize(path)
      data = (np.memmap(path, np.uint8, mode="r", offset=start) if size > start
              else np.zeros(0, np.uint8))
      by[file] = _PlacedArrays(data, mine, header, placement, path, verify)
    tree = codec.decode(header, _Placed(by, where), source=source, verify=False)
    check_shardings_tree(tree, shardings, source=source)
    return tree
  files: dict[str, Any] = {}
  try:
    for file in shard_names:
      files[file] = open(os.path.join(directory, file), "rb")  # pylint: disable=consider-using-with
    return codec.decode(header, _ShardArrays(files, where, directory), source=source,
                        verify=verify)
  finally:
    for f in files.values():
      f.close()


def iter_shard_paths(directory: str | os.PathLike) -> Iterator[str]:
  """The shard files of a sharded checkpoint (for size reports)."""
  directory = os.fspath(directory)
  yield from _shard_files(directory, _index(directory)).values()


__all__ = ["ShardedWriter", "plan_shards", "assign_shards", "leaf_tensors", "is_sharded", "load",
           "load_header", "work_dir", "INDEX", "DEFAULT_SHARD_BYTES"]
