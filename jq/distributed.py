"""Calibration over several processes (``jax.distributed``): each process runs the model on its own
share of the calibration batches, the statistics are summed across processes, and every process
then computes the same quantized tree.

The road (``jq.ptq.quantize_model`` takes it by itself when ``jax.process_count() > 1``, see
``PTQConfig.distributed``):

1. :func:`initialize` starts ``jax.distributed`` (validated arguments; CPU collectives ``gloo``).
2. :func:`process_batches` keeps this process's share of the batches (``batches[p::n]``) and
   remembers their global indices.
3. ``quantize_model`` first checks that every process runs the same calibration (rules, config,
   mesh shape, parameter shapes, the same calibration set split without overlap; see
   :func:`plan_batches`): any difference is a ``ValueError`` in every process, naming it.
4. After each unit's collection (a block, or the whole model) and before any solve, the host-side
   statistics (``XᵀX`` and ``Σ|x|`` in float64, counts, per-channel min/max/``max|x|``, token
   samples in global batch order) are summed across processes by :func:`allreduce_stats`, in
   process order, so every process gets the same bits.
5. Each GPTQ/AWQ solve of the unit then runs in one process (the costliest first, to the least
   loaded) and :func:`share` sends the results to the others, so the solves are split rather
   than repeated and every process still ends with the same tree.

The streamed road (``jq.stream.quantize_to_dir``) splits its output instead: each process
quantizes and writes its own shards, process 0 the index (``jq.io.sharded``, through
:func:`agree`).

Every exchange goes through the coordinator's key-value store with a timeout
(:func:`set_timeout`): a process that disagrees, fails or hangs makes the others raise instead of
waiting forever; a process that fails publishes its error (:func:`fail`) so the others stop at
once with it.  The statistics travel through ``jax.experimental.multihost_utils.process_allgather``
(XLA collectives: gloo on CPU, NCCL on GPU) once the processes have agreed on their shapes, or
through the key-value store where the CPU has no cross-process collectives (``transport="kv"``).

Data parallelism inside a process is ``PTQConfig(mesh=...)`` with a mesh of this process's own
devices (:func:`local_mesh`); the two compose.  A mesh of every process's devices works too
(``PTQConfig(mesh=jax.sharding.Mesh(np.array(jax.devices()), ("data",)))``, each process still
passing its own batches): XLA then all-reduces the statistics across the processes and
``jq.calibrate.collect`` sends the host sums to every process (:func:`share`).

Example (``python calib.py 0`` and ``python calib.py 1``, each in its own process):
  >>> jq.distributed.initialize("localhost:12345", num_processes=2, process_id=int(sys.argv[1]))
  >>> mine = jq.distributed.process_batches(batches)        # batches[p::2]
  >>> res = jq.ptq.quantize_model(model, variables, rules, mine)   # same tree in both processes
"""
from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jq import _compat

_OPS = ("sum", "max", "min", "cat")
_CHUNK = 4 << 20            # bytes per key-value entry of the "kv" transport
_state: dict[str, Any] = {"seq": 0, "timeout_s": 300.0, "transport": "auto"}


class PeerError(RuntimeError):
  """Another process failed (its error is in the message) or did not answer in time."""


def initialize(coordinator_address: str, num_processes: int, process_id: int, *,
               local_device_ids: int | Sequence[int] | None = None, cpu_collectives: str = "gloo",
               transport: str = "auto", timeout_s: float = 300.0, init_timeout_s: int = 120,
               heartbeat_timeout_s: int | None = None) -> None:
  """``jax.distributed.initialize`` with checked arguments, CPU collectives chosen first.

  Call it before any other JAX call of the process (the backend must not have started).

  Args:
    coordinator_address: ``"host:port"`` of process 0 (e.g. ``"localhost:12345"``).
    num_processes: number of processes, >= 1.
    process_id: this process, ``0 <= process_id < num_processes``.
    local_device_ids: the devices this process uses (default: all it sees).
    cpu_collectives: ``"gloo"`` (default), ``"mpi"`` or ``"none"``: the CPU backend's
      cross-process collectives (``jax_cpu_collectives_implementation``).
    transport: how :func:`allreduce_stats` moves statistics: ``"collectives"``
      (``process_allgather``), ``"kv"`` (the coordinator's key-value store, slower, needs no
      collectives) or ``"auto"`` (collectives unless the CPU has none).
    timeout_s: how long any exchange waits for the other processes (:func:`set_timeout`); give
      it more than the longest difference in work between processes (an uneven batch split).
    init_timeout_s: how long to wait for every process to join.
    heartbeat_timeout_s: after how long without a heartbeat a process counts as dead (JAX's
      default, 100 s, when None).

  Raises:
    ValueError: a malformed address, ``num_processes < 1``, ``process_id`` out of range, an
      unknown ``cpu_collectives`` or ``transport``, a non-positive timeout.

  Example:
    >>> jq.distributed.initialize("localhost:12345", num_processes=2, process_id=0)
  """
  if not isinstance(coordinator_address, str) or not re.fullmatch(
      r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.\-]+):\d{1,5}", coordinator_address):
    raise ValueError(f"jq.distributed.initialize: coordinator_address={coordinator_address!r} "
                     "must be 'host:port' (e.g. 'localhost:12345')")
  if not 0 < int(coordinator_address.rsplit(":", 1)[1]) < 65536:
    raise ValueError(f"jq.distributed.initialize: the port of {coordinator_address!r} must be in "
                     "1..65535")
  for name, v, lo in (("num_processes", num_processes, 1), ("process_id", process_id, 0)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
      raise ValueError(f"jq.distributed.initialize: {name}={v!r} must be an int >= {lo}")
  if process_id >= num_processes:
    raise ValueError(f"jq.distributed.initialize: process_id={process_id} must be < "
                     f"num_processes={num_processes}")
  if cpu_collectives not in ("gloo", "mpi", "none"):
    raise ValueError(f"jq.distributed.initialize: cpu_collectives={cpu_collectives!r}; use "
                     "'gloo', 'mpi' or 'none'")
  if transport not in ("auto", "collectives", "kv"):
    raise ValueError(f"jq.distributed.initialize: transport={transport!r}; use 'auto', "
                     "'collectives' or 'kv'")
  set_timeout(timeout_s)
  _compat.set_cpu_collectives(cpu_collectives)
  kwargs: dict[str, Any] = {"initialization_timeout": int(init_timeout_s)}
  if heartbeat_timeout_s is not None:
    kwargs["heartbeat_timeout_seconds"] = int(heartbeat_timeout_s)
  if local_device_ids is not None:
    kwargs["local_device_ids"] = local_device_ids
  _compat.distributed_initialize(coordinator_address=coordinator_address,
                                 num_processes=int(num_processes), process_id=int(process_id),
                                 **kwargs)
  _state["transport"] = transport


def set_timeout(timeout_s: float) -> None:
  """How long every exchange waits for the other processes (seconds, > 0)."""
  if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
    raise ValueError(f"jq.distributed: timeout_s={timeout_s!r} must be a number > 0")
  _state["timeout_s"] = float(timeout_s)


def process_index() -> int:
  """This process's index (0 without ``jax.distributed``)."""
  return jax.process_index()


def process_count() -> int:
  """The number of processes (1 without ``jax.distributed``)."""
  return jax.process_count()


def local_mesh(axis: str = "data", devices: int | None = None) -> jax.sharding.Mesh:
  """A one-axis mesh of this process's devices (the first ``devices`` of them), for
  ``PTQConfig(mesh=...)``.

  Raises:
    ValueError: fewer local devices than asked for (on CPU, set
      ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before JAX starts).
  """
  local = jax.local_devices()
  if devices is not None:
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
      raise ValueError(f"devices={devices!r} must be an int >= 1")
    if devices > len(local):
      raise ValueError(f"{devices} devices asked for, but this process has {len(local)} "
                       f"({local[0].platform}); on CPU, set "
                       f"XLA_FLAGS=--xla_force_host_platform_device_count={devices} before JAX "
                       "starts")
    local = local[:devices]
  return jax.sharding.Mesh(np.array(local), (axis,))


class ProcessBatches(list):
  """A process's share of the calibration batches: a list, with ``indices`` (each batch's index
  in the whole calibration set) and ``total`` (the size of that set)."""

  def __init__(self, items: Iterable[Any], indices: Sequence[int], total: int):
    super().__init__(items)
    self.indices = [int(i) for i in indices]
    self.total = int(total)
    if len(self.indices) != len(self):
      raise ValueError(f"ProcessBatches: {len(self)} batches but {len(self.indices)} indices")


def process_batches(batches: Iterable[Any], *, index: int | None = None,
                    count: int | None = None) -> ProcessBatches:
  """This process's share of ``batches``: ``batches[index::count]`` (every ``count``-th batch).

  Args:
    batches: the whole calibration set, the same in every process.
    index, count: the process and the number of processes (default: ``jax.process_index()``,
      ``jax.process_count()``).

  Raises:
    ValueError: fewer batches than processes (a process would get none), a bad index.

  Example:
    >>> mine = jq.distributed.process_batches([tokens[i:i + 8] for i in range(0, 64, 8)])
  """
  batches = list(batches)
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count
  if not 0 <= index < count:
    raise ValueError(f"process_batches: index={index} must be in 0..{count - 1}")
  if len(batches) < count:
    raise ValueError(f"process_batches: {len(batches)} calibration batches for {count} processes; "
                     "every process needs at least one: give more (smaller) batches")
  ids = list(range(index, len(batches), count))
  return ProcessBatches([batches[i] for i in ids], ids, len(batches))


# ---- exchanges --------------------------------------------------------------------------------

def _client():
  client = _compat.distributed_client()
  if client is None:
    raise RuntimeError("jq.distributed: jax.distributed is not initialized; call "
                       "jq.distributed.initialize(...) first")
  return client


def _key(seq: int, pid: int, part: str = "") -> str:
  return f"jq/calib/{seq}/{pid}{part}"


def fail(message: str) -> None:
  """Tells the other processes that this one failed (they raise :class:`PeerError` with
  ``message`` at their next exchange instead of waiting for the timeout).  Never raises."""
  if jax.process_count() <= 1:
    return
  try:
    _compat.kv_set(_client(), _key(_state["seq"], jax.process_index()),
                   b"E" + str(message).encode("utf-8", "replace")[:4000])
  except Exception:  # pylint: disable=broad-except  (the key may exist: a later exchange fails)
    pass


def _exchange(what: str, payload: bytes, timeout_s: float | None) -> list[bytes]:
  """Every process's ``payload`` (small: it goes through the key-value store), in process order."""
  n, me = jax.process_count(), jax.process_index()
  if n <= 1:
    return [payload]
  client, seq = _client(), _state["seq"]
  _state["seq"] = seq + 1
  timeout = _state["timeout_s"] if timeout_s is None else float(timeout_s)
  _compat.kv_set(client, _key(seq, me), b"D" + payload)
  out = []
  for p in range(n):
    if p == me:
      out.append(payload)
      continue
    try:
      got = _compat.kv_get(client, _key(seq, p), timeout)
    except TimeoutError as e:
      raise PeerError(f"jq.distributed: process {p} did not reach {what} within {timeout:g} s "
                      "(it failed, is stuck or runs a different calibration; see its log, or "
                      "raise the timeout: jq.distributed.set_timeout)") from e
    if got[:1] == b"E":
      raise PeerError(f"jq.distributed: process {p} failed before {what}: "
                      f"{got[1:].decode('utf-8', 'replace')}")
    out.append(got[1:])
  return out


def _short(v: Any, limit: int = 400) -> str:
  s = repr(v)
  return s if len(s) <= limit else s[:limit] + "..."


def _differences(key: str, vals: Sequence[Any]) -> list[str]:
  """``"key: process 0: a, process 1: b"`` for each differing entry (nested dicts and equally
  long lists are compared entry by entry, so a long list names its first differing item)."""
  if all(v == vals[0] for v in vals[1:]):
    return []
  if all(isinstance(v, dict) for v in vals):
    return [d for k in sorted({k for v in vals for k in v})
            for d in _differences(f"{key}.{k}", [v.get(k, "<missing>") for v in vals])]
  if all(isinstance(v, list) for v in vals) and len({len(v) for v in vals}) == 1:
    first = next(i for i in range(len(vals[0])) if any(v[i] != vals[0][i] for v in vals))
    return _differences(f"{key}[{first}]", [v[first] for v in vals])
  return [f"{key}: " + ", ".join(f"process {p}: {_short(v)}" for p, v in enumerate(vals))]


def agree(what: str, same: Mapping[str, Any], info: Any = None, *,
          timeout_s: float | None = None) -> list[Any]:
  """Checks that every process has the same ``same`` (a JSON-able dict) and returns every
  process's ``info`` (JSON-able), in process order.

  Raises:
    ValueError: (in every process) the processes disagree; the message names each differing key
      and its value in each process.
    PeerError: another process failed, or did not get here within the timeout.
  """
  same = {"step": what, **same}   # processes at different steps say so
  blobs = _exchange(what, json.dumps({"same": same, "info": info}, sort_keys=True,
                                     default=str).encode(), timeout_s)
  got = [json.loads(b) for b in blobs]
  steps = [g["same"].get("step") for g in got]
  if any(s != steps[0] for s in steps[1:]):
    raise ValueError("jq.distributed: the processes are at different steps: " +
                     ", ".join(f"process {p}: {s}" for p, s in enumerate(steps)) +
                     "; every process must run the same calibration")
  diffs = []
  for key in sorted({k for g in got for k in g["same"]}):
    vals = [g["same"].get(key, "<missing>") for g in got]
    diffs += _differences(key, vals)
  if diffs:
    raise ValueError(f"jq.distributed: the processes disagree on {what}: " + "; ".join(diffs) +
                     ". Every process must run the same calibration (model, rules, config, "
                     "mesh shape) on its own share of one calibration set "
                     "(jq.distributed.process_batches)")
  return [g["info"] for g in got]


def all_true(what: str, flags: Mapping[str, bool], *, timeout_s: float | None = None
             ) -> dict[str, bool]:
  """``{key: flag in every process}`` (the processes must have the same keys)."""
  infos = agree(what, {"keys": sorted(flags)}, {k: bool(v) for k, v in flags.items()},
                timeout_s=timeout_s)
  return {k: all(i[k] for i in infos) for k in flags}


def plan_batches(count: int, *, indices: Sequence[int] | None = None, total: int | None = None,
                 same: Mapping[str, Any] | None = None, timeout_s: float | None = None
                 ) -> tuple[list[int], int]:
  """Checks that the processes run the same calibration and returns this process's global batch
  indices and the number of batches in all processes together.

  Each process's batches are numbered in the whole calibration set: by ``indices`` (from
  :func:`process_batches`, in every process), else batch ``i`` of process ``p`` is ``p + i·n``
  where the counts fit that split (``batches[p::n]``), else the processes' batches follow each
  other (process 0's first).

  Args:
    count: this process's number of batches.
    indices, total: global indices of this process's batches and the size of the whole set.
    same: what must be equal in every process (JSON-able), e.g. rules and config.

  Raises:
    ValueError: in every process, when ``same`` differs, when some processes give indices and
      others not, when the processes' totals differ or their batches overlap or leave gaps.
  """
  n, me = jax.process_count(), jax.process_index()
  info = {"count": int(count), "indices": None if indices is None else [int(i) for i in indices],
          "total": None if total is None else int(total)}
  same = {**dict(same or {}), "statistics transport": _transport()}
  infos = agree("the calibration setup", same, info, timeout_s=timeout_s)
  given = [i["indices"] is not None for i in infos]
  if any(given) and not all(given):
    with_ids = ", ".join(str(p) for p, g in enumerate(given) if g)
    raise ValueError(f"jq.distributed: processes {with_ids} pass batches from "
                     "jq.distributed.process_batches, the others plain lists; give every "
                     "process its share the same way")
  counts = [i["count"] for i in infos]
  if all(given):
    totals = [i["total"] for i in infos]
    if len(set(totals)) > 1:
      raise ValueError("jq.distributed: the processes split different calibration sets: " +
                       ", ".join(f"process {p}: {t} batches in all ({c} its own)"
                                 for p, (t, c) in enumerate(zip(totals, counts))) +
                       "; every process must call process_batches on the same batches")
    seen: dict[int, int] = {}
    for p, i in enumerate(infos):
      for b in i["indices"]:
        if b in seen:
          raise ValueError(f"jq.distributed: calibration batch {b} is held by processes "
                           f"{seen[b]} and {p}; give each process a disjoint share")
        seen[b] = p
    missing = sorted(set(range(totals[0])) - set(seen))
    if missing or len(seen) != totals[0]:
      raise ValueError(f"jq.distributed: calibration batches {missing[:10]} of {totals[0]} are "
                       "held by no process")
    return list(infos[me]["indices"]), totals[0]
  tot = sum(counts)
  if all(c == len(range(p, tot, n)) for p, c in enumerate(counts)):
    return list(range(me, tot, n)), tot
  start = sum(counts[:me])
  return list(range(start, start + counts[me])), tot


def _pack(arrays: Mapping[str, np.ndarray]) -> bytes:
  buf = io.BytesIO()
  np.savez(buf, **{f"a{i}": np.asarray(arrays[k]) for i, k in enumerate(sorted(arrays))})
  return buf.getvalue()


def _unpack(blob: bytes, keys: Sequence[str]) -> dict[str, np.ndarray]:
  with np.load(io.BytesIO(blob), allow_pickle=False) as z:
    return {k: z[f"a{i}"] for i, k in enumerate(sorted(keys))}


def _transport() -> str:
  t = _state["transport"]
  if t != "auto":
    return t
  on_cpu = all(d.platform == "cpu" for d in jax.devices())
  return "kv" if on_cpu and _compat.cpu_collectives() == "none" else "collectives"


def _gather_bytes(what: str, payload: bytes, sizes: Sequence[int], timeout_s: float | None
                  ) -> list[bytes]:
  """Every process's ``payload`` (of the agreed ``sizes``), in process order."""
  n, me = jax.process_count(), jax.process_index()
  if _transport() == "collectives":
    pad = np.zeros(max(max(sizes), 1), np.uint8)
    pad[:len(payload)] = np.frombuffer(payload, np.uint8)
    rows = np.asarray(_compat.process_allgather(pad))
    return [rows[p, :sizes[p]].tobytes() for p in range(n)]
  client, seq = _client(), _state["seq"]
  _state["seq"] = seq + 1
  timeout = _state["timeout_s"] if timeout_s is None else float(timeout_s)
  for c in range(0, max(len(payload), 1), _CHUNK):
    _compat.kv_set(client, _key(seq, me, f"/{c // _CHUNK}"), payload[c:c + _CHUNK])
  out = []
  for p in range(n):
    if p == me:
      out.append(payload)
      continue
    parts = []
    for c in range(0, max(sizes[p], 1), _CHUNK):
      try:
        parts.append(_compat.kv_get(client, _key(seq, p, f"/{c // _CHUNK}"), timeout))
      except TimeoutError as e:
        raise PeerError(f"jq.distributed: process {p} did not send {what} within "
                        f"{timeout:g} s") from e
    out.append(b"".join(parts)[:sizes[p]])
  try:   # every process has read every chunk: drop this process's
    client.wait_at_barrier(f"jq/calib/{seq}/read", int(timeout * 1000))
    for c in range(0, max(len(payload), 1), _CHUNK):
      _compat.kv_delete(client, _key(seq, me, f"/{c // _CHUNK}"))
  except Exception:  # pylint: disable=broad-except  (cleanup only)
    pass
  return out


def allreduce_stats(arrays: Mapping[str, np.ndarray], ops: Mapping[str, str], *,
                    what: str = "the calibration statistics", timeout_s: float | None = None
                    ) -> dict[str, np.ndarray]:
  """Reduces named host arrays across processes, the same bits in every process.

  ``ops[key]``: ``"sum"`` (in process order, in the array's dtype: float64 sums of statistics),
  ``"max"``, ``"min"``, or ``"cat"`` (concatenated along axis 0 in process order; the leading
  sizes may differ between processes).  The processes first agree on the keys, ops, dtypes and
  shapes (so a collective never runs on mismatched inputs), then exchange the arrays.

  Args:
    arrays: ``{key: array}`` of this process.
    ops: ``{key: op}`` for every key of ``arrays``.
    what: named in errors (e.g. ``"statistics of block layers_2"``).

  Raises:
    ValueError: unknown op or missing key; in every process, when the processes' keys, dtypes or
      shapes differ (naming them).
    PeerError: another process failed or timed out.

  Example:
    >>> tot = allreduce_stats({"xtx": xtx, "hi": hi}, {"xtx": "sum", "hi": "max"})
  """
  if set(arrays) != set(ops) or any(o not in _OPS for o in ops.values()):
    raise ValueError(f"allreduce_stats: ops {dict(ops)} must give one of {_OPS} for each key of "
                     f"{sorted(arrays)}")
  arrays = {k: np.asarray(v) for k, v in arrays.items()}
  if jax.process_count() <= 1:
    return dict(arrays)
  meta = {k: [ops[k], arrays[k].dtype.str, list(arrays[k].shape[1 if ops[k] == "cat" else 0:])]
          for k in sorted(arrays)}
  payload = _pack(arrays)
  sizes = agree(what, {"arrays": meta}, len(payload), timeout_s=timeout_s)
  blobs = _gather_bytes(what, payload, sizes, timeout_s)
  parts = [arrays if p == jax.process_index() else _unpack(b, list(arrays))
           for p, b in enumerate(blobs)]
  out = {}
  for k, op in ops.items():
    vals = [p[k] for p in parts]
    if op == "cat":
      out[k] = np.concatenate(vals, axis=0)
      continue
    acc = vals[0]
    for v in vals[1:]:
      acc = acc + v if op == "sum" else np.maximum(acc, v) if op == "max" else np.minimum(acc, v)
    out[k] = np.asarray(acc, arrays[k].dtype)
  return out


def share(what: str, arrays: Mapping[str, Any], info: Any = None, *,
          timeout_s: float | None = None) -> tuple[dict[str, np.ndarray], list[Any]]:
  """Work split over the processes, brought back together: every process's ``arrays`` (their
  keys disjoint between processes) merged into one dict, and every process's ``info``
  (JSON-able), in process order.

  The arrays travel as raw bytes with their dtype and shape (bfloat16 and float8 included), so
  every process holds the same bits afterwards (``jq.ptq.quantize_model`` shares its GPTQ/AWQ
  solves this way: each runs in one process).

  Raises:
    ValueError: (in every process) two processes send the same key.
    PeerError: another process failed or timed out.

  Example:
    >>> arrays, infos = share("the solves of block 0", {"q_proj/values": v}, {"q_proj": "..."})
  """
  arrays = {str(k): np.asarray(v, order="C") for k, v in arrays.items()}   # (0-d stays 0-d)
  if jax.process_count() <= 1:
    return dict(arrays), [info]
  layout = [[k, arrays[k].dtype.name, list(arrays[k].shape)] for k in sorted(arrays)]
  payload = b"".join(arrays[k].tobytes() for k in sorted(arrays))
  infos = agree(what, {}, {"layout": layout, "size": len(payload), "info": info},
                timeout_s=timeout_s)
  owner: dict[str, int] = {}
  for p, i in enumerate(infos):
    for k, _, _ in i["layout"]:
      if k in owner:
        raise ValueError(f"jq.distributed.share ({what}): processes {owner[k]} and {p} both send "
                         f"{k!r}; each key must come from one process")
      owner[k] = p
  blobs = _gather_bytes(what, payload, [i["size"] for i in infos], timeout_s)
  me, out = jax.process_index(), {}
  for p, (i, blob) in enumerate(zip(infos, blobs)):
    if p == me:
      out.update(arrays)
      continue
    offset = 0
    for k, name, shape in i["layout"]:
      dtype = np.dtype(jnp.dtype(name))
      count = int(np.prod(shape, dtype=np.int64))
      out[k] = np.frombuffer(blob, dtype, count=count, offset=offset).reshape(shape).copy()
      offset += count * dtype.itemsize
  return out, [i["info"] for i in infos]


__all__ = ["initialize", "set_timeout", "process_index", "process_count", "local_mesh",
           "process_batches", "ProcessBatches", "plan_batches", "agree", "all_true",
           "allreduce_stats", "share", "fail", "PeerError"]
