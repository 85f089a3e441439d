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

import ml_dtypes
import numpy as np

from jq.io import codec
from jq.io.atomic import atomic_write
from jq.io.codec import CheckpointError
from jq.spec import Rule

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


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
  out = {}
  for k, v in pairs:
    if k in out:
      raise CheckpointError(f"duplicate key {k!r} in a JSON header (the file was tampered with)")
    out[k] = v
  return out


def _parse_json(raw: bytes | str, what: str) -> Any:
  try:
    return json.loads(raw, object_pairs_hook=_no_duplicate_keys)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{what} is not valid JSON ({e}); the file is truncated or "
                          "corrupt") from e


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
  that produced each leaf, CRC-32 of every tensor and ``metadata``) goes in ``__metadata__["jq"]``.
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
  hdr = _parse_json(f.read(n), f"{source}: safetensors header")
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


class _LazyArrays(Mapping):
  """Reads each tensor on first access, so loading holds one numpy copy at a time."""

  def __init__(self, f: BinaryIO, infos: dict[str, TensorInfo], data_start: int, source: str):
    self._f, self._infos, self._start, self._source = f, infos, data_start, source

  def __getitem__(self, name: str) -> np.ndarray:
    return _read_array(self._f, self._infos[name], self._start, name, self._source)

  def __contains__(self, name: object) -> bool:
    return name in self._infos

  def __iter__(self) -> Iterator[str]:
    return iter(self._infos)

  def __len__(self) -> int:
    return len(self._infos)


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


def load_header(path: str | os.PathLike) -> dict:
  """The jq JSON header of a checkpoint (reads no tensor data).

  Returns:
    The header dict (schema in :mod:`jq.io.codec`): ``header["metadata"]`` is the user metadata,
    ``header["leaves"][path]`` the per-leaf qtype/shape/tile/granularity/activation/rule,
    ``jq.io.rules_from_header(header)`` the rules as objects.

  Raises:
    CheckpointError: not a safetensors file, not a jq checkpoint, or an unknown format version.
  """
  infos, meta = read_safetensors_header(path)
  del infos
  return _jq_header(meta, os.fspath(path))


def load(path: str | os.PathLike, *, verify: bool = True) -> PyTree:
  """Loads a checkpoint written by :func:`save`; no model code needed.

  The tree is rebuilt with the same containers and keys, QArrays with their static metadata, and
  every array bit for bit (jax arrays on the default device; numpy leaves stay numpy).  Every
  QArray is checked with ``QArray.validate``.

  Args:
    path: a ``.safetensors`` file written by :func:`save`.
    verify: check each tensor's CRC-32 (catches flipped or overwritten bytes).

  Raises:
    CheckpointError (a ValueError): truncated or corrupt file, a header that disagrees with the
      tensors (naming the parameter path, shape and dtype), a file without a jq header, or an
      unknown format version.
  """
  source = os.fspath(path)
  with open(source, "rb") as f:
    infos, meta, start = _read_header(f, source)
    header = _jq_header(meta, source)
    codec.check_tensors(header, {n: (t.dtype, t.shape) for n, t in infos.items()}, source=source)
    return codec.decode(header, _LazyArrays(f, infos, start, source), source=source, verify=verify)


__all__ = ["save", "load", "load_header", "read_tensors", "read_safetensors_header",
           "write_safetensors", "TensorInfo", "HEADER_KEY"]
