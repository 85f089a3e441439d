"""jq's native checkpoint: one safetensors file, readable without model code.

File layout (the safetensors format, https://github.com/huggingface/safetensors): an 8-byte
little-endian header length ``N``, ``N`` bytes of JSON (``{name: {"dtype", "shape",
"data_offsets"}, "__metadata__": {str: str}}``, space-padded to 8-byte alignment), then the raw
little-endian tensor bytes, packed without gaps.  jq writes and reads this format itself (so
bfloat16 and float8 work without a framework) and stores its own JSON header (schema in
:mod:`jq.io.codec`) as the string ``__metadata__["jq"]``.

Tensor names: ``<path>`` for array leaves, ``<path>.values`` / ``.scale`` / ``.zero_point`` /
``.act_scale`` / ``.act_zero_point`` for QArrays, e.g. ``params/layers_0/attn/q_proj/kernel.scale``.

A plain safetensors file without the ``jq`` entry (e.g. a Hugging Face checkpoint) is *not* loaded
by :func:`load` (a clear CheckpointError says so): its flat names carry no tree structure or
quantization metadata, and guessing would risk a silently wrong tree.  Read its tensors as a flat
dict with :func:`read_tensors` instead.
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, BinaryIO

import jax
import ml_dtypes
import numpy as np

from jq.io import codec
from jq.io.atomic import atomic_write
from jq.io.codec import CheckpointError
from jq.qarray import ActivationQuant, QArray
from jq.qtypes import QType
from jq.sharding import qarray_sharding
from jq.spec import Rule
from jq.tree import path_str

PyTree = Any

HEADER_KEY = "jq"
MAX_HEADER_BYTES = 100_000_000  # the safetensors reference implementation's limit

# safetensors dtype codes <-> numpy dtypes.
_CODES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16), "I16": np.dtype(np.int16), "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32), "U64": np.dtype(np.uint64), "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32), "F64": np.dtype(np.float64), "C64": np.dtype(np.complex64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_NAMES = {dt: code for code, dt in _CODES.items()}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """Where one tensor lives in a safetensors file (offsets relative to the data section)."""
  dtype: np.dtype
  shape: tuple[int, ...]
  begin: int
  end: int


def _parse_json(raw: bytes | str, what: str, max_bytes: int = codec.MAX_HEADER_JSON_BYTES) -> Any:
  """JSON with size/depth limits and no duplicate keys (:func:`jq.io.codec.parse_json`)."""
  return codec.parse_json(raw, what, max_bytes=max_bytes)


# ---- writing ----------------------------------------------------------------------------------


def _write_array(f: BinaryIO, arr: np.ndarray) -> None:
  """Writes one tensor's raw bytes (a seam for tests that simulate a failing disk)."""
  f.write(memoryview(arr.reshape(-1).view(np.uint8)))


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
  """Writes ``tensors`` (numpy or jax arrays) as a safetensors file, atomically.

  Tensors are laid out largest itemsize first (then in the given order), so each starts aligned to
  its itemsize; the header is space-padded so the data section starts 8-byte aligned.

  Raises:
    CheckpointError: a dtype safetensors cannot represent (naming tensor, shape and dtype).
  """
  entries: dict[str, Any] = {}
  if metadata:
    entries["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  tensors = {name: codec.host_array(arr, name) for name, arr in tensors.items()}
  order = sorted(tensors, key=lambda n: -tensors[n].dtype.itemsize)
  offset = 0
  for name in order:
    arr = tensors[name]
    if name == "__metadata__":
      raise CheckpointError("a tensor cannot be named '__metadata__'")
    if arr.dtype not in _NAMES:
      raise CheckpointError(f"{name}: shape {arr.shape} dtype {arr.dtype} has no safetensors dtype")
    entries[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                     "data_offsets": [offset, offset + arr.nbytes]}
    offset += arr.nbytes
  raw = json.dumps(entries, separators=(",", ":"), ensure_ascii=False,
                   allow_nan=False).encode("utf-8")
  raw += b" " * (-(8 + len(raw)) % 8)
  with atomic_write(path) as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for name in order:
      _write_array(f, tensors[name])


def save(path: str | os.PathLike, tree: PyTree, *, metadata: Mapping[str, Any] | None = None,
         rules: Sequence[Rule] | None = None) -> None:
  """Saves a (quantized) parameter tree as one safetensors file, atomically.

  Every QArray is stored as its packed values, scales and zero points (``<path>.values``,
  ``<path>.scale``, ``<path>.zero_point``, plus ``.act_scale``/``.act_zero_point`` for static
  activations); other array leaves as ``<path>`` in their own dtype (bfloat16 included).  The jq
  JSON header (tree structure, per-tensor qtype/shape/tile/granularity, activation spec, the rule
  that produced each leaf, CRC-32 and SHA-256 of every tensor, ``metadata`` and the header's own
  SHA-256 integrity record) goes in ``__metadata__["jq"]``.
  A failed write leaves an existing file at ``path`` untouched.

  Args:
    path: destination file (its directory must exist).
    tree: dicts / lists / tuples (or an nnx State) of arrays, QArrays and python scalars.
    metadata: JSON-serialisable user metadata, e.g. ``{"model": "SmolLM2-135M", "recipe": ...}``.
    rules: the rules that produced ``tree``, recorded per leaf (first match) and in full.

  Example:
    >>> qparams = jq.quantize_tree(params, jq.recipe_rules("w4a16-g128"))
    >>> jq.io.save("model.safetensors", qparams, metadata={"recipe": "w4a16-g128"},
    ...            rules=jq.recipe_rules("w4a16-g128"))

  Raises:
    CheckpointError: unsupported leaf type or dtype, colliding paths, an invalid QArray, rules that
      disagree with the tree, or metadata that is not JSON.
  """
  header, tensors = codec.encode(tree, metadata=metadata, rules=rules)
  write_safetensors(path, tensors, {HEADER_KEY: json.dumps(header, separators=(",", ":"),
                                                           allow_nan=False)})


# ---- reading ----------------------------------------------------------------------------------


def _read_header(f: BinaryIO, source: str) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
  """Parses and checks a safetensors header: ``(tensors, __metadata__, data start)``."""
  size = os.fstat(f.fileno()).st_size
  if size < 8:
    raise CheckpointError(f"{source}: {size} bytes is too short for a safetensors file "
                          "(truncated or not safetensors)")
  (n,) = struct.unpack("<Q", f.read(8))
  if n > MAX_HEADER_BYTES or n > size - 8:
    raise CheckpointError(f"{source}: header length {n} exceeds the file size {size} (or the "
                          f"{MAX_HEADER_BYTES}-byte limit); truncated or not safetensors")
  hdr = _parse_json(f.read(n), f"{source}: safetensors header", MAX_HEADER_BYTES)
  if not isinstance(hdr, dict):
    raise CheckpointError(f"{source}: safetensors header is not a JSON object")
  meta = hdr.pop("__metadata__", None) or {}
  if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
    raise CheckpointError(f"{source}: safetensors __metadata__ must map strings to strings")
  infos: dict[str, TensorInfo] = {}
  for name, e in hdr.items():
    where = f"{source}: tensor {name!r}"
    if not isinstance(e, dict):
      raise CheckpointError(f"{where}: header entry is not an object")
    code, shape, offs = e.get("dtype"), e.get("shape"), e.get("data_offsets")
    if code not in _CODES:
      raise CheckpointError(f"{where}: dtype {code!r} is not one jq reads ({sorted(_CODES)})")
    ok_ints = lambda v: isinstance(v, list) and all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v)
    if not ok_ints(shape) or not ok_ints(offs) or len(offs) != 2 or offs[0] > offs[1]:
      raise CheckpointError(f"{where}: malformed shape {shape!r} or data_offsets {offs!r}")
    dt = _CODES[code]
    want = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    if offs[1] - offs[0] != want:
      raise CheckpointError(f"{where}: shape {tuple(shape)} dtype {dt} needs {want} bytes but "
                            f"data_offsets {offs} span {offs[1] - offs[0]}")
    infos[name] = TensorInfo(dt, tuple(shape), offs[0], offs[1])
  data_len = size - 8 - n
  pos = 0
  for name, t in sorted(infos.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
    what = f"{source}: tensor {name!r} (shape {t.shape} dtype {t.dtype})"
    if t.begin != pos:
      raise CheckpointError(f"{what} starts at byte {t.begin} of the data section, expected {pos} "
                            "(overlapping or gapped tensors); the file is corrupt")
    if t.end > data_len:
      raise CheckpointError(f"{what} needs data bytes [{t.begin}, {t.end}) but the file has only "
                            f"{data_len}; the file is truncated")
    pos = t.end
  if pos != data_len:
    raise CheckpointError(f"{source}: {data_len - pos} trailing bytes after the last tensor; "
                          "the file is corrupt")
  return infos, meta, 8 + n


def _read_array(f: BinaryIO, t: TensorInfo, data_start: int, name: str, source: str) -> np.ndarray:
  arr = np.empty(t.shape, t.dtype)
  if arr.nbytes:
    f.seek(data_start + t.begin)
    got = f.readinto(arr.reshape(-1).view(np.uint8))
    if got != arr.nbytes:
      raise CheckpointError(f"{source}: tensor {name!r} (shape {t.shape} dtype {t.dtype}): read "
                            f"{got} of {arr.nbytes} bytes; the file is truncated")
  return arr


class _Tensors(Mapping):
  """A mapping over the tensors described by ``self._infos``."""
  _infos: dict[str, TensorInfo]

  def __contains__(self, name: object) -> bool:
    return name in self._infos

  def __iter__(self) -> Iterator[str]:
    return iter(self._infos)

  def __len__(self) -> int:
    return len(self._infos)


class _LazyArrays(_Tensors):
  """Reads each tensor on first access, so loading holds one numpy copy at a time."""

  def __init__(self, f: BinaryIO, infos: dict[str, TensorInfo], data_start: int, source: str):
    self._f, self._infos, self._start, self._source = f, infos, data_start, source

  def __getitem__(self, name: str) -> np.ndarray:
    return _read_array(self._f, self._infos[name], self._start, name, self._source)


class _OnDemand(_Tensors):
  """Each tensor read when asked, its file opened for that read alone: a lazily loaded tree
  (:class:`jq.io.codec.LazyLeaf`) holds no open file and no data."""

  def __init__(self, where: dict[str, tuple[str, TensorInfo, int]]):
    self._where = where   # name -> (file, info, data start)
    self._infos = {n: w[1] for n, w in where.items()}

  def __getitem__(self, name: str) -> np.ndarray:
    path, info, start = self._where[name]
    with open(path, "rb") as f:
      return _read_array(f, info, start, name, path)


def read_safetensors_header(path: str | os.PathLike
                            ) -> tuple[dict[str, TensorInfo], dict[str, str]]:
  """``({name: TensorInfo}, __metadata__)`` of any safetensors file, checked for consistency."""
  source = os.fspath(path)
  with open(source, "rb") as f:
    infos, meta, _ = _read_header(f, source)
  return infos, meta


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of any safetensors file (jq or not) as a flat ``{name: numpy array}`` dict."""
  source = os.fspath(path)
  with open(source, "rb") as f:
    infos, _, start = _read_header(f, source)
    return {name: _read_array(f, t, start, name, source) for name, t in infos.items()}


def _jq_header(meta: Mapping[str, str], source: str) -> dict:
  if HEADER_KEY not in meta:
    raise CheckpointError(
        f"{source}: not a jq checkpoint (its safetensors __metadata__ has no {HEADER_KEY!r} entry; "
        f"keys: {sorted(meta)}).  jq.io.load only reads files written by jq.io.save; use "
        "jq.io.read_tensors(path) for the flat tensors of a plain safetensors file")
  return codec.check_header(_parse_json(meta[HEADER_KEY], f"{source}: jq header"), source=source)


def _found(infos: Mapping[str, TensorInfo]) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
  return {n: (t.dtype, t.shape) for n, t in infos.items()}


def load_header(path: str | os.PathLike) -> dict:
  """The jq JSON header of a checkpoint, checked (reads no tensor data).

  The header's integrity record (SHA-256 of every field, see :mod:`jq.io.codec`) is checked, as
  are the tensor table and the tree it describes.

  Returns:
    The header dict (schema in :mod:`jq.io.codec`): ``header["metadata"]`` is the user metadata,
    ``header["leaves"][path]`` the per-leaf qtype/shape/tile/granularity/activation/rule,
    ``jq.io.rules_from_header(header)`` the rules as objects.  ``header["verified"]`` (added
    here, not stored) is True when the header carried an integrity record and it matched, False
    for checkpoints written before jq stored one (nothing to check the header against).

  Raises:
    CheckpointError: not a safetensors file, not a jq checkpoint, an unknown format version, or a
      header that fails its integrity check or disagrees with the tensor table.
  """
  source = os.fspath(path)
  infos, meta = read_safetensors_header(path)
  header = _jq_header(meta, source)
  verified = codec.verify_header(header, _found(infos), source=source)
  return {**header, "verified": verified}


# ---- sharded reading (shared with the orbax format) --------------------------------------------


def _is_entry(x: Any) -> bool:
  return isinstance(x, (jax.sharding.Sharding, jax.ShapeDtypeStruct, QArray))


def _leaf_shardings(info: Any, specs: Mapping[str, tuple[np.dtype, tuple[int, ...]]], path: str,
                    entry: Any, source: str) -> dict[str, jax.sharding.Sharding | None]:
  """``{tensor name: sharding}`` of one header leaf (None: default placement / numpy)."""
  where = f"{source}: {path or '<root>'}"
  kind = info.get("kind") if isinstance(info, dict) else None
  if kind == "array":
    name = info.get("tensor")
    if name not in specs:
      raise CheckpointError(f"{where}: tensor {name!r} is missing from the checkpoint")
    dt, shape = specs[name]
    if isinstance(entry, QArray):
      raise CheckpointError(f"{where}: the shardings tree has a QArray here, but the checkpoint "
                            f"holds a plain array of shape {shape} dtype {dt}")
    if isinstance(entry, jax.ShapeDtypeStruct):
      if tuple(entry.shape) != shape or np.dtype(entry.dtype) != dt:
        raise CheckpointError(f"{where}: the abstract tree says shape {tuple(entry.shape)} dtype "
                              f"{np.dtype(entry.dtype)}, but the checkpoint holds shape {shape} "
                              f"dtype {dt}")
      entry = entry.sharding
    return {name: entry if info.get("array_type", "jax") == "jax" else None}
  if kind != "qarray":
    return {}  # python scalars (and malformed leaves, which decoding reports)
  try:
    qtype, shape, tile = QType(info["qtype"]), tuple(info["shape"]), tuple(info["tile"])
  except (KeyError, TypeError, ValueError) as e:
    raise CheckpointError(f"{where}: malformed QArray entry in the checkpoint header ({e})") from e
  abstract = {c: jax.ShapeDtypeStruct(specs[f"{path}.{c}"][1], specs[f"{path}.{c}"][0])
              for c in codec.COMPONENTS if f"{path}.{c}" in specs}
  has_act = "act_scale" in abstract or "act_zero_point" in abstract
  q = QArray(values=abstract.get("values"), scale=abstract.get("scale"),
             zero_point=abstract.get("zero_point"),
             activation=ActivationQuant(abstract.get("act_scale"), abstract.get("act_zero_point"),
                                        None) if has_act else None,
             qtype=qtype, shape=shape, tile=tile)
  if isinstance(entry, jax.ShapeDtypeStruct):
    if tuple(entry.shape) != shape:
      raise CheckpointError(f"{where}: the abstract tree says shape {tuple(entry.shape)}, but the "
                            f"checkpoint holds a QArray of shape {shape}")
    entry = entry.sharding
  if entry is None:
    return {f"{path}.{c}": None for c in abstract}
  if isinstance(entry, jax.sharding.Sharding):
    try:
      entry = qarray_sharding(q, entry)
    except (TypeError, ValueError) as e:
      raise CheckpointError(f"{where}: {e}") from e
  elif (entry.qtype, tuple(entry.shape), tuple(entry.tile)) != (qtype, shape, tile):
    raise CheckpointError(f"{where}: the shardings tree has a QArray(qtype={entry.qtype.value}, "
                          f"shape={entry.shape}, tile={entry.tile}), but the checkpoint holds "
                          f"QArray(qtype={qtype.value}, shape={shape}, tile={tile})")
  act = entry.activation
  fields = {"values": entry.values, "scale": entry.scale, "zero_point": entry.zero_point,
            "act_scale": None if act is None else act.scale,
            "act_zero_point": None if act is None else act.zero_point}
  given = [c for c in codec.COMPONENTS if fields[c] is not None]
  if given != list(abstract):
    raise CheckpointError(f"{where}: the shardings tree gives QArray fields {given}, but the "
                          f"checkpoint stores {list(abstract)}")
  out = {}
  for c in given:
    s = fields[c].sharding if isinstance(fields[c], jax.ShapeDtypeStruct) else fields[c]
    if s is not None and not isinstance(s, jax.sharding.Sharding):
      raise CheckpointError(f"{where}: QArray field {c} has {type(s).__name__}, not a Sharding")
    out[f"{path}.{c}"] = s
  return out


def _check_fits(sharding: jax.sharding.Sharding, dtype: np.dtype, shape: tuple[int, ...],
                where: str) -> None:
  try:
    if isinstance(sharding, jax.sharding.NamedSharding) and len(sharding.spec) > len(shape):
      raise ValueError(f"{sharding.spec} has more entries than the tensor has axes")
    sharding.shard_shape(shape)  # checks mesh axes and divisibility
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{where} (shape {shape} dtype {dtype}) cannot be laid out as "
                          f"{sharding}: {e}") from e


def tensor_shardings(header: dict, shardings: PyTree, *, source: str
                     ) -> dict[str, jax.sharding.Sharding | None]:
  """``{tensor name: Sharding or None}`` for every tensor of a checkpoint, from a shardings tree.

  ``shardings`` has the structure of the stored tree, with QArrays either expanded (a QArray of
  Shardings, as :func:`jq.sharding.shardings` returns) or given as one Sharding for the whole
  QArray (split with :func:`jq.sharding.qarray_sharding`); ``jax.ShapeDtypeStruct`` leaves stand
  for their ``.sharding``.  A Sharding may also stand for a whole subtree.  None: default device;
  numpy leaves always stay numpy.

  Raises:
    CheckpointError: naming the path where the shardings tree and the checkpoint's tree differ.
  """
  leaves = header["leaves"]
  legacy = codec.legacy_3bit_paths(header)
  if legacy:
    raise CheckpointError(f"{source}: {legacy[0]}: format version {header['version']} stores 3-bit "
                          "values in 4-bit slots, which are repacked on load; load it without "
                          "shardings and save it again to place it")
  specs = codec.tensor_specs(header, source=source)
  out: dict[str, jax.sharding.Sharding | None] = {}
  covered: set[str] = set()
  for kp, entry in jax.tree_util.tree_flatten_with_path(shardings, is_leaf=_is_entry)[0]:
    path = path_str(kp)
    where = f"{source}: {path or '<root>'}"
    if not _is_entry(entry):
      raise CheckpointError(f"{where}: the shardings tree holds a {type(entry).__name__}; expected "
                            "a jax.sharding.Sharding, a QArray of them or a jax.ShapeDtypeStruct")
    if path in leaves:
      targets = [path]
    else:
      targets = [p for p in leaves if path == "" or p.startswith(path + "/")]
      if not targets:
        raise CheckpointError(f"{where}: the shardings tree has an entry here, but the checkpoint "
                              "has no leaf at this path")
      if not isinstance(entry, jax.sharding.Sharding):
        raise CheckpointError(f"{where}: the checkpoint has a subtree here ({targets[0]}, ...); "
                              f"only a Sharding can stand for a subtree, not a "
                              f"{type(entry).__name__}")
    for p in targets:
      for name, sharding in _leaf_shardings(leaves[p], specs, p, entry, source).items():
        if sharding is not None:
          _check_fits(sharding, *specs[name], f"{source}: {p or '<root>'}: tensor {name!r}")
        out[name] = sharding
      covered.add(p)
  missing = [p for p in leaves if p not in covered]
  if missing:
    raise CheckpointError(f"{source}: {missing[0] or '<root>'}: the checkpoint has a leaf here but "
                          "the shardings tree has no entry for it"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
  return out


def _first_difference(shardings: PyTree, tree: PyTree, keypath: tuple = ()
                      ) -> tuple[tuple, Any, Any] | None:
  """``(key path, shardings node, tree node)`` where the containers first differ, or None."""
  if _is_entry(shardings):
    return None
  level = lambda x: jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)
  (s_kids, s_def), (t_kids, t_def) = level(shardings), level(tree)
  if s_def.node_data() is None or s_def.node_data() != t_def.node_data() or (
      len(s_kids) != len(t_kids)):
    return keypath, s_def, t_def
  for (key, s), (_, t) in zip(s_kids, t_kids):
    found = _first_difference(s, t, keypath + key)
    if found is not None:
      return found
  return None


def check_shardings_tree(tree: PyTree, shardings: PyTree, *, source: str) -> None:
  """Checks that ``shardings`` is a prefix of the loaded ``tree`` (same containers and keys).

  Raises:
    CheckpointError: naming the path where the containers differ (e.g. a tuple for a list).
  """
  found = _first_difference(shardings, tree)
  if found is not None:
    keypath, s_def, t_def = found
    raise CheckpointError(f"{source}: {path_str(keypath) or '<root>'}: the shardings tree has "
                          f"{s_def} here, but the checkpoint has {t_def}")


def _copy_slice(host: np.ndarray, index: Any) -> np.ndarray:
  """One device's slice of a memory-mapped tensor, copied: on CPU, jax would otherwise alias the
  file mapping (a file truncated later would then crash the process).  Read-only, so that jax
  adopts the copy instead of copying it again."""
  out = np.array(host[index])
  out.flags.writeable = False
  return out


class _PlacedArrays(_Tensors):
  """Tensors of a memory-mapped file as jax arrays laid out by their shardings: each device
  receives only its own slice, read from the page cache (numpy views where the sharding is None).

  With ``verify``, each tensor's CRC-32 and SHA-256 are checked first by streaming its bytes on
  the host.
  """

  def __init__(self, data: np.ndarray, infos: dict[str, TensorInfo], header: dict,
               placement: Mapping[str, jax.sharding.Sharding | None], source: str, verify: bool):
    self._data, self._infos, self._header = data, infos, header
    self._placement, self._source, self._verify = placement, source, verify

  def __getitem__(self, name: str) -> np.ndarray | jax.Array:
    t = self._infos[name]
    raw = self._data[t.begin:t.end]
    if self._verify:
      problem = codec.tensor_digest_problem(self._header["tensors"].get(name, {}), raw)
      if problem:
        raise CheckpointError(f"{self._source}: tensor {name!r} (shape {t.shape} dtype {t.dtype}) "
                              f"{problem}; the data is corrupt")
    host = raw.view(t.dtype).reshape(t.shape)
    sharding = self._placement.get(name)
    if sharding is None:
      return host
    return jax.make_array_from_callback(t.shape, sharding, lambda idx: _copy_slice(host, idx))


def load(path: str | os.PathLike, *, verify: bool = True, shardings: PyTree | None = None,
         lazy: bool = False) -> PyTree:
  """Loads a checkpoint written by :func:`save`; no model code needed.

  The tree is rebuilt with the same containers and keys, QArrays with their static metadata, and
  every array bit for bit (jax arrays on the default device, or laid out by ``shardings``; numpy
  leaves stay numpy).  Every QArray is checked with ``QArray.validate``.

  With ``shardings``, each array is built with ``jax.make_array_from_callback`` from a memory map
  of the file: every device receives only its own slice, copied from the mapping, and no tensor
  is first read whole into host memory (digests are computed by streaming the mapped bytes).

  The header's own integrity record (SHA-256 of every header field) is always checked, whatever
  ``verify`` says; a checkpoint written before jq stored one loads with only the per-tensor CRC-32
  checks (:func:`load_header` then reports ``"verified": False``).

  Args:
    path: a ``.safetensors`` file written by :func:`save`.
    verify: check each tensor's CRC-32 and SHA-256 (catches flipped or overwritten bytes);
      False skips only these per-tensor checks (faster), never the header's.
    shardings: None (default device), or a tree with the loaded tree's structure whose leaves are
      ``jax.sharding.Sharding``s (QArrays expanded as by :func:`jq.sharding.shardings`, or one
      NamedSharding per QArray: its fields are then split like the float kernel's) or
      ``jax.ShapeDtypeStruct``s with ``.sharding`` set (``jax.eval_shape`` output).  One Sharding
      may stand for a whole subtree.
    lazy: read nothing yet: array and QArray leaves are :class:`jq.io.codec.LazyLeaf`s (shape,
      dtype/qtype), each read and checked by its ``load()`` (the structure is checked now), so a
      consumer holds one leaf at a time (export of a model bigger than memory).

  Example:
    >>> qshapes = jax.eval_shape(lambda p: jq.quantize_tree(p, rules), params)
    >>> qparams = jq.io.load("model.safetensors",
    ...                      shardings=jq.sharding.shardings(qshapes, float_shardings))

  Raises:
    CheckpointError (a ValueError): truncated or corrupt file, a header that fails its SHA-256
      integrity check (naming the field) or disagrees with the tensors (naming the parameter
      path, shape and dtype), a tensor whose bytes fail their CRC-32/SHA-256 (naming it), a
      file without a jq header, an unknown format version, a header too large or too deeply
      nested, or a shardings tree that differs from the stored tree (naming the path).
  """
  source = os.fspath(path)
  if lazy and shardings is not None:
    raise ValueError("jq.io.load: lazy=True reads leaves one at a time on the host; it does not "
                     "take shardings")
  with open(source, "rb") as f:
    infos, meta, start = _read_header(f, source)
    header = _jq_header(meta, source)
    codec.verify_header(header, _found(infos), source=source)  # (always, also without verify)
    if lazy:
      return codec.decode(header, _OnDemand({n: (source, t, start) for n, t in infos.items()}),
                          source=source, verify=verify, lazy=True)
    if shardings is None:
      return codec.decode(header, _LazyArrays(f, infos, start, source), source=source,
                          verify=verify)
    placement = tensor_shardings(header, shardings, source=source)
    data = (np.memmap(f, np.uint8, mode="r", offset=start)  # (outlives the file object)
            if os.fstat(f.fileno()).st_size > start else np.zeros(0, np.uint8))
  arrays = _PlacedArrays(data, infos, header, placement, source, verify)
  tree = codec.decode(header, arrays, source=source, verify=False)  # (digests checked by arrays)
  check_shardings_tree(tree, shardings, source=source)
  return tree


__all__ = ["save", "load", "load_header", "read_tensors", "read_safetensors_header",
           "write_safetensors", "tensor_shardings", "check_shardings_tree", "TensorInfo",
           "HEADER_KEY"]
