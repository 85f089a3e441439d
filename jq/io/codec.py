"""Pytree <-> (JSON header, flat named tensors): the container-independent half of jq checkpoints.

``encode`` turns a (quantized) parameter tree into a JSON-able header and an ordered dict of named
host arrays; ``decode`` rebuilds the identical tree from them.  Both the safetensors and the orbax
formats store exactly these two things, so they share naming, schema and validation.

Tensor names are the '/'-joined parameter paths of :func:`jq.tree.leaves_with_paths`:

* a float (or any array) leaf ``params/dense/bias`` is stored as ``params/dense/bias``;
* a :class:`~jq.qarray.QArray` at ``params/dense/kernel`` is stored as
  ``params/dense/kernel.values`` (packed storage), ``.scale``, ``.zero_point`` (asymmetric only),
  and ``.act_scale`` / ``.act_zero_point`` (static activation quantization only).

Header schema (format version 2)::

  {"format": "jq", "version": 2, "jq_version": "0.1.0",
   "metadata": {...user metadata...},
   "rules": [<rule>, ...],   # as passed to save, in jq.spec_json form (a valid --rules file)
   "tree": <node>,           # the container structure
   "leaves": {path: <leaf>, ...},
   "tensors": {name: {"dtype": "bfloat16", "shape": [64, 32], "crc32": 123,
                      "sha256": "9f86d0..."}, ...},
                             # crc32: zlib CRC-32, sha256: SHA-256 (hex) of the tensor's
                             # little-endian bytes
   "integrity": {"algorithm": "sha256", "header": "<hex>", "fields": {key: "<hex>", ...}}}

  <node> := {"kind": "dict", "items": [[key, <node>], ...]}    # key: str or int, insertion order
          | {"kind": "list" | "tuple", "items": [<node>, ...]}
          | {"kind": "none"}
          | {"kind": "leaf", "path": path}
          | {"kind": "nnx.State", "keys": [...], "items": [<node>, ...]}
          | {"kind": "nnx.Variable", "type": "Param", "metadata": [[name, value], ...],
             "child": <node>}                        # tuples as {"__tuple__": [...]}
          | {"kind": "linen.Partitioned" | "linen.LogicallyPartitioned", "names": [...],
             "rules": [...] | null, "child": <node>}   # nn.with_partitioning boxes (no mesh)
  <leaf> := {"kind": "array", "tensor": name, "array_type": "jax" | "numpy" | "numpy_scalar"}
          | {"kind": "array", "tensor": name, "array_type": "prng_key", "impl": "threefry2x32"}
                                                     # a typed PRNG key (nnx.Rngs): its key data
          | {"kind": "python", "value": 3}           # int, float, bool or str leaves
          | {"kind": "qarray", "qtype": "uint4", "shape": [64, 48], "tile": [32, 1],
             "granularity": "groups of 32 along axis 0; per-channel along axis 1",
             "symmetric": false, "scale_dtype": "float32",
             "components": ["values", "scale", "zero_point"],
             "activation": null | {"mode": "static", "qtype": "int8", "symmetric": true},
             "rule": null | {"index": 3, "pattern": "(^|/)kernel$", "describe": "rtn w:uint4 ..."}}

Versions.  Version 2 packs 3-bit values densely, eight to three bytes (:func:`jq.numerics.pack`);
version 1 kept them in 4-bit slots, two per byte.  Everything else is the same, so a header without
3-bit QArrays is written as version 1, which jq releases before version 2 read too
(:func:`format_version`); a version-1 file's 3-bit values are repacked when it is loaded, their
codes checked first.

Integrity.  ``integrity`` and the per-tensor ``sha256`` were added to format version 1 without a
version bump, on purpose: they are additive (jq releases that predate them ignore unknown keys and
still read new files) and this reader still loads headers without them.  ``integrity`` is a
deterministic function of
the rest of the header: ``fields[key]`` is the SHA-256 of the canonical JSON
(:func:`canonical_json`: sorted keys, no whitespace, ASCII) of every other top-level entry, ``header`` the SHA-256 of the
canonical JSON of the whole header without ``integrity``.  Loading recomputes the record and
compares it whole, so any change to the header (including to the record itself) is a
:class:`CheckpointError` naming the top-level field(s) that changed; since the tensor digests are
part of ``tensors``, they are covered too, and ``verify=True`` checks every tensor's bytes against
its CRC-32 and SHA-256.  A header without ``integrity`` (written before it existed) loads with
only the CRC-32 checks, and :func:`jq.io.load_header` reports ``"verified": False`` for it; such a
header must hold exactly the original top-level keys, so a damaged ``integrity`` key name is not
mistaken for an old checkpoint.

Header JSON is parsed with limits (:data:`MAX_HEADER_JSON_BYTES`, :data:`MAX_JSON_DEPTH` levels of
nesting; checked before parsing, and on save) and duplicate keys are refused.

Float leaves matched by a skip rule carry ``"rule"`` too; a float kernel matched by a quantizing
rule (kept float because its layer cannot run quantized) carries it with ``"applied": false``.  Decoding never imports model code: the
only classes it can build are dict/list/tuple, QArray/ActivationQuant and, when flax is importable,
``flax.nnx.State`` and the public ``flax.nnx`` Variable types.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import math
import re
import sys
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jq import numerics, spec_json
from jq.qarray import ActivationQuant, QArray
from jq.qtypes import QType
from jq.spec import ActivationSpec, ActMode, Rule
from jq.tree import path_str

PyTree = Any

FORMAT = "jq"
FORMAT_VERSION = 2   # the newest version this jq reads and writes
DENSE_3BIT_VERSION = 2   # from this version on, 3-bit values are packed eight to three bytes
COMPONENTS = ("values", "scale", "zero_point", "act_scale", "act_zero_point")

# numpy dtypes a checkpoint may hold, by the name written in the header.
DTYPES: dict[str, np.dtype] = {
    np.dtype(t).name: np.dtype(t) for t in (
        np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
        np.uint64, np.float16, np.float32, np.float64, np.complex64, ml_dtypes.bfloat16,
        ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2)
}


class CheckpointError(ValueError):
  """A checkpoint cannot be written or read faithfully (message names path, shape and dtype)."""


# ---- JSON with limits, canonical form and digests ----------------------------------------------

MAX_HEADER_JSON_BYTES = 64 << 20   # a jq header (large MoE models need tens of MB, not more)
MAX_JSON_DEPTH = 128               # nesting levels (a tree level takes three); a safety bound
INTEGRITY = "integrity"
DIGEST_ALGORITHM = "sha256"
_BASE_KEYS = frozenset(("format", "version", "jq_version", "metadata", "rules", "tree", "leaves",
                        "tensors"))
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
  out = {}
  for k, v in pairs:
    if k in out:
      raise CheckpointError(f"duplicate key {k!r} in a JSON header (the file was tampered with)")
    out[k] = v
  return out


def _no_constants(name: str) -> Any:
  raise CheckpointError(f"non-finite number {name} in a JSON header (jq never writes one: the "
                        "file was tampered with or is corrupt)")


def json_depth(text: str) -> int:
  """Deepest ``[``/``{`` nesting of a JSON text (strings skipped), without parsing it."""
  b = np.frombuffer(_JSON_STRING.sub("", text).encode("utf-8", "replace"), np.uint8)
  step = np.isin(b, (0x5B, 0x7B)).astype(np.int64) - np.isin(b, (0x5D, 0x7D))
  return int(np.cumsum(step).max(initial=0))


def parse_json(raw: bytes | str, what: str, *, max_bytes: int = MAX_HEADER_JSON_BYTES,
               max_depth: int = MAX_JSON_DEPTH) -> Any:
  """Parses a header's JSON with size and depth limits, refusing duplicate keys.

  Raises:
    CheckpointError: naming ``what``: too large, too deep, not UTF-8, not JSON, duplicate keys.
  """
  if len(raw) > max_bytes:
    raise CheckpointError(f"{what} is {len(raw)} bytes, more than the {max_bytes}-byte limit; the "
                          "file is corrupt or not a jq checkpoint")
  try:
    text = bytes(raw).decode("utf-8") if isinstance(raw, (bytes, bytearray, memoryview)) else raw
  except UnicodeDecodeError as e:
    raise CheckpointError(f"{what} is not valid JSON ({e}); the file is truncated or "
                          "corrupt") from e
  depth = json_depth(text)
  if depth > max_depth:
    raise CheckpointError(f"{what} nests {depth} levels deep, more than the limit of {max_depth}; "
                          "the file is corrupt or was crafted")
  try:
    return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants)
  except CheckpointError as e:
    raise CheckpointError(f"{what}: {e}") from e
  except (json.JSONDecodeError, RecursionError) as e:
    raise CheckpointError(f"{what} is not valid JSON ({type(e).__name__}: {e}); the file is "
                          "truncated or corrupt") from e


def canonical_json(obj: Any) -> bytes:
  """The canonical JSON bytes digests are taken of: sorted keys, no whitespace, ASCII only."""
  return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                    allow_nan=False).encode("ascii")


def _sha256(obj: Any) -> str:
  return hashlib.sha256(canonical_json(obj)).hexdigest()


def integrity_record(header: Mapping) -> dict:
  """The ``integrity`` entry a header (given without it) must carry (see module doc)."""
  plain = {k: v for k, v in header.items() if k != INTEGRITY}
  return {"algorithm": DIGEST_ALGORITHM, "header": _sha256(plain),
          "fields": {k: _sha256(v) for k, v in plain.items()}}


def seal(header: Mapping) -> dict:
  """``header`` as it will read back (JSON round trip) with its ``integrity`` record added.

  Raises:
    CheckpointError: the header would exceed the size or depth limits a reader enforces.
  """
  text = json.dumps({k: v for k, v in header.items() if k != INTEGRITY}, separators=(",", ":"),
                    allow_nan=False)
  limit = MAX_HEADER_JSON_BYTES // 2  # (room for the digests, string escaping and indentation)
  if len(text) > limit:
    raise CheckpointError(f"the checkpoint header would be {len(text)} bytes; jq writes headers "
                          f"of up to {limit} bytes (readers refuse more than "
                          f"{MAX_HEADER_JSON_BYTES}); split the tree")
  depth = json_depth(text)
  if depth > MAX_JSON_DEPTH:
    raise CheckpointError(f"the checkpoint header would nest {depth} levels deep; readers refuse "
                          f"more than {MAX_JSON_DEPTH} (flatten the tree or the metadata)")
  plain = json.loads(text)
  plain[INTEGRITY] = integrity_record(plain)
  return plain


def integrity_problem(header: Mapping, *, source: str) -> str | None:
  """Why ``header`` fails its integrity check (None: it passes, or predates integrity records:
  see :func:`is_sealed`)."""
  if INTEGRITY not in header:
    extra = sorted(set(header) - _BASE_KEYS)
    if extra:
      return (f"{source}: the jq header has no {INTEGRITY!r} record but unknown top-level "
              f"key(s) {extra}; the header is corrupt")
    return None
  stored = header[INTEGRITY]
  want = integrity_record(header)
  if stored == want:
    return None
  if not isinstance(stored, dict) or stored.get("algorithm") != DIGEST_ALGORITHM or not (
      isinstance(stored.get("fields"), dict)):
    return (f"{source}: the jq header's {INTEGRITY!r} record is malformed (algorithm "
            f"{stored.get('algorithm') if isinstance(stored, dict) else stored!r}); the header is "
            "corrupt")
  fields = stored["fields"]
  changed = sorted(k for k in set(fields) | set(want["fields"])
                   if fields.get(k) != want["fields"].get(k))
  what = (f"field(s) {changed} differ from what was written" if changed else
          "its integrity record itself is damaged")
  return (f"{source}: the jq header fails its SHA-256 check: {what}; the file was modified or is "
          "corrupt")


def is_sealed(header: Mapping) -> bool:
  """Whether the header carries an integrity record (checkpoints written before it did not)."""
  return INTEGRITY in header


def sha256_hex(data: np.ndarray) -> str:
  """SHA-256 (hex) of an array's raw little-endian bytes."""
  return hashlib.sha256(np.ascontiguousarray(data).reshape(-1).view(np.uint8)).hexdigest()


def tensor_digest_problem(entry: Any, data: np.ndarray, *, chunk: int = 1 << 24) -> str | None:
  """Why a tensor's raw bytes (a 1-D uint8 array, e.g. a memory map, read ``chunk`` bytes at a
  time) fail the CRC-32 / SHA-256 its header entry records (None: they pass)."""
  want_crc = entry.get("crc32") if isinstance(entry, dict) else None
  want_sha = entry.get("sha256") if isinstance(entry, dict) else None
  if not isinstance(want_crc, int) or isinstance(want_crc, bool):
    return f"fails its CRC-32 check (stored {want_crc!r})"
  crc, sha = 0, hashlib.sha256()
  for i in range(0, data.size, chunk):
    part = data[i:i + chunk]
    crc = zlib.crc32(part, crc)
    if want_sha is not None:
      sha.update(part)
  if crc != want_crc:
    return f"fails its CRC-32 check (stored {want_crc}, found {crc})"
  if want_sha is not None and sha.hexdigest() != want_sha:
    return (f"fails its SHA-256 check (stored {str(want_sha)[:16]}..., found "
            f"{sha.hexdigest()[:16]}...)")
  return None


def _jq_version() -> str:
  import jq  # pylint: disable=import-outside-toplevel  (jq/__init__ imports jq.tree -> no cycle)
  return getattr(jq, "__version__", "unknown")


# ---- rules and specs as JSON (the same form as ``jq-quant --rules FILE``: jq.spec_json) ---------


def _act_to_json(act: ActivationSpec) -> dict:
  return spec_json.spec_to_json(act)


def _act_from_json(d: Any, where: str) -> ActivationSpec:
  try:
    return spec_json.activation_from_json(d, where)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{where}: malformed activation spec {d!r} in checkpoint header "
                          f"({e})") from e


def rules_from_header(header: Mapping) -> tuple[Rule, ...]:
  """The rules a checkpoint was saved with, as :class:`Rule` objects (``header["rules"]`` is also
  a valid ``--rules`` file: ``json.dumps(header["rules"])``)."""
  rules = header.get("rules", [])
  if not isinstance(rules, list):
    raise CheckpointError(f"checkpoint header 'rules' is not a list: {rules!r}")
  try:
    return tuple(spec_json.rule_from_json(d, f"header rules[{i}]") for i, d in enumerate(rules))
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"malformed rule in checkpoint header: {e}") from e


def describe_granularity(shape: Sequence[int], tile: Sequence[int]) -> str:
  """Human-readable scale layout, e.g. ``groups of 128 along axis 0; per-channel along axis 1``."""
  if tuple(tile) == tuple(shape):
    return "per-tensor"
  chan = [i for i, (s, t) in enumerate(zip(shape, tile)) if t == 1 and s != 1]
  groups = [(i, t) for i, (s, t) in enumerate(zip(shape, tile)) if 1 < t < s]
  parts = [f"groups of {t} along axis {i}" + (f" (the last of {s % t})" if s % t else "")
           for i, t in groups for s in [shape[i]]]
  if chan:
    parts.append(f"per-channel along axis {', '.join(map(str, chan))}")
  return "; ".join(parts) or "per-tensor"


# ---- tagged JSON for nnx Variable metadata (keeps tuples tuples) -------------------------------


def _to_tagged(v: Any, where: str) -> Any:
  if v is None or isinstance(v, (bool, int, str)):
    return v
  if isinstance(v, float):
    return v if math.isfinite(v) else {"__float__": repr(v)}
  if isinstance(v, tuple):
    return {"__tuple__": [_to_tagged(x, where) for x in v]}
  if isinstance(v, list):
    return [_to_tagged(x, where) for x in v]
  if isinstance(v, dict) and all(isinstance(k, str) for k in v):
    return {"__dict__": [[k, _to_tagged(x, where)] for k, x in v.items()]}
  raise CheckpointError(f"{where}: metadata value {v!r} of type {type(v).__name__} cannot be "
                        "stored in a checkpoint header (use None, bool, int, float, str, tuples, "
                        "lists or str-keyed dicts)")


def _from_tagged(v: Any) -> Any:
  if isinstance(v, list):
    return [_from_tagged(x) for x in v]
  if isinstance(v, dict):
    if set(v) == {"__tuple__"}:
      return tuple(_from_tagged(x) for x in v["__tuple__"])
    if set(v) == {"__dict__"}:
      return {k: _from_tagged(x) for k, x in v["__dict__"]}
    if set(v) == {"__float__"}:
      return float(v["__float__"])
    raise CheckpointError(f"malformed tagged metadata value {v!r}")
  return v


def _nnx():
  """flax.nnx if it is importable (only needed for nnx State trees)."""
  try:
    return importlib.import_module("flax.nnx")
  except ImportError:
    return None


def _nnx_if_loaded():
  """flax.nnx if the caller already imported it (saving never imports flax itself)."""
  return sys.modules.get("flax.nnx")


_BOXES = {"Partitioned": "flax.core.meta", "LogicallyPartitioned": "flax.linen.spmd"}


def _box(x: Any):
  """``x`` if it is a linen partitioning box (``nn.with_partitioning`` /
  ``nn.with_logical_partitioning``), else None (without importing flax)."""
  home = sys.modules.get(_BOXES.get(type(x).__name__, ""))
  return x if home is not None and type(x) is getattr(home, type(x).__name__, None) else None


# ---- encoding ----------------------------------------------------------------------------------


def host_array(x: Any, where: str) -> np.ndarray:
  """``x`` as a C-contiguous little-endian numpy array of a supported dtype."""
  arr = np.asarray(jax.device_get(x))
  if arr.dtype.name not in DTYPES or arr.dtype != DTYPES[arr.dtype.name]:
    raise CheckpointError(f"{where}: shape {tuple(arr.shape)} dtype {arr.dtype} cannot be stored; "
                          f"supported dtypes: {', '.join(sorted(DTYPES))}")
  if arr.dtype.byteorder == ">":
    arr = arr.astype(arr.dtype.newbyteorder("<"))
  return arr if arr.flags.c_contiguous else arr.copy(order="C")  # (ascontiguousarray makes 0-d 1-d)


def crc32(arr: np.ndarray) -> int:
  """CRC-32 of an array's raw little-endian bytes."""
  return zlib.crc32(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))


class _Encoder:
  def __init__(self, rules: Sequence[Rule]):
    self.rules = tuple(rules)
    self.leaves: dict[str, dict] = {}
    self.tensors: dict[str, np.ndarray] = {}

  def _rule_for(self, path: str) -> tuple[int, Rule] | None:
    for i, r in enumerate(self.rules):
      if r.matches(path):
        return i, r
    return None

  def _add_tensor(self, name: str, x: Any, where: str) -> None:
    if name in self.tensors:
      raise CheckpointError(f"{where}: tensor name {name!r} is used twice (two paths collide, e.g. "
                            "a key containing '/' or a leaf named like a QArray component); "
                            "rename the keys")
    self.tensors[name] = host_array(x, where)

  def _add_leaf(self, path: str, info: dict, where: str) -> dict:
    if path in self.leaves:
      raise CheckpointError(f"{where}: path {path!r} occurs twice in the tree (keys containing '/' "
                            "or a trailing 'value' key collide); rename the keys")
    self.leaves[path] = info
    return {"kind": "leaf", "path": path}

  def _rule_json(self, path: str, leaf: Any) -> dict | None:
    hit = self._rule_for(path)
    if hit is None:
      return None
    i, rule = hit
    where = (f"{path}: shape {tuple(getattr(leaf, 'shape', ()))} "
             f"dtype {getattr(leaf, 'dtype', type(leaf).__name__)}")
    if isinstance(leaf, QArray):
      w = rule.weight
      problem = None
      if w is None:
        problem = "it keeps the leaf in float, but the leaf is quantized"
      elif w.qtype is not leaf.qtype:
        problem = f"it asks for {w.qtype.value}, but the leaf is {leaf.qtype.value}"
      elif not w.admits_tile(leaf.shape, leaf.tile):
        problem = (f"it ({w.describe()}) cannot give tile {leaf.tile} for shape {leaf.shape} "
                   "under any layout")
      elif w.symmetric != (leaf.zero_point is None):
        problem = (f"it is {'symmetric' if w.symmetric else 'asymmetric'}, but the leaf "
                   f"{'has' if leaf.zero_point is not None else 'has no'} zero point")
      elif rule.activation != (None if leaf.activation is None else leaf.activation.spec):
        problem = "its activation spec differs from the leaf's"
      if problem:
        raise CheckpointError(f"{where}: rule {i} ({rule.pattern!r}: {rule.describe()}) is the "
                              f"first match, but {problem}; pass the rules that produced this tree")
    elif rule.weight is not None:
      if len(getattr(leaf, "shape", ())) < 2:
        raise CheckpointError(f"{where}: rule {i} ({rule.pattern!r}: {rule.describe()}) is the "
                              "first match and quantizes it, but the leaf is not a QArray; pass "
                              "the rules that produced this tree")
      # a kernel jq kept in float because its layer cannot run quantized (jq.nn reports those)
      return {"index": i, "pattern": rule.pattern, "describe": rule.describe(), "applied": False}
    return {"index": i, "pattern": rule.pattern, "describe": rule.describe()}

  def node(self, x: Any, keypath: tuple) -> dict:
    path = path_str(keypath)
    where = path or "<root>"
    if x is None:
      return {"kind": "none"}
    if isinstance(x, QArray):
      return self._add_leaf(path, self.qarray(path, x), where)
    if type(x) is dict:  # pylint: disable=unidiomatic-typecheck  (subclasses have other treedefs)
      items = []
      for k, v in x.items():
        if isinstance(k, bool) or not isinstance(k, (str, int)):
          raise CheckpointError(f"{where}: dict key {k!r} of type {type(k).__name__} is not "
                                "supported; use str or int keys")
        items.append([k, self.node(v, keypath + (jax.tree_util.DictKey(k),))])
      return {"kind": "dict", "items": items}
    if type(x) in (list, tuple):
      return {"kind": type(x).__name__,
              "items": [self.node(v, keypath + (jax.tree_util.SequenceKey(i),))
                        for i, v in enumerate(x)]}
    nnx = _nnx_if_loaded()
    if nnx is not None and isinstance(x, nnx.State):
      children, treedef = jax.tree_util.tree_flatten(x, is_leaf=lambda y: y is not x)
      keys = list(treedef.node_data()[1])
      for k in keys:
        if isinstance(k, bool) or not isinstance(k, (str, int)):
          raise CheckpointError(f"{where}: nnx.State key {k!r} is not supported; use str or int")
      return {"kind": "nnx.State", "keys": keys,
              "items": [self.node(c, keypath + (jax.tree_util.DictKey(k),))
                        for k, c in zip(keys, children)]}
    if nnx is not None and isinstance(x, nnx.Variable):
      cls = type(x)
      if getattr(nnx, cls.__name__, None) is not cls:
        raise CheckpointError(f"{where}: custom nnx Variable type "
                              f"{cls.__module__}.{cls.__qualname__} cannot be rebuilt without "
                              "model code; convert it to a public nnx type (e.g. nnx.Param) or "
                              "save state.to_pure_dict()")
      children, treedef = jax.tree_util.tree_flatten(x, is_leaf=lambda y: y is not x)
      aux = treedef.node_data()[1]
      if not all(isinstance(kv, tuple) and len(kv) == 2 and isinstance(kv[0], str) for kv in aux):
        raise CheckpointError(f"{where}: nnx.{cls.__name__} has unexpected pytree metadata {aux!r}")
      meta = [[k, _to_tagged(v, f"{where} (metadata {k!r})")] for k, v in aux]
      return {"kind": "nnx.Variable", "type": cls.__name__, "metadata": meta,
              "child": self.node(children[0], keypath + (jax.tree_util.GetAttrKey("value"),))}
    if _box(x) is not None:   # (the mesh is the running program's, not the checkpoint's)
      rules = getattr(x, "rules", None)
      return {"kind": f"linen.{type(x).__name__}", "names": _to_tagged(tuple(x.names), where),
              "rules": None if rules is None else _to_tagged(tuple(rules), where),
              "child": self.node(x.value, keypath + (jax.tree_util.GetAttrKey("value"),))}
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      self._add_tensor(path, jax.random.key_data(x), where)   # (an nnx.Rngs stream's key)
      info = {"kind": "array", "tensor": path, "array_type": "prng_key",
              "impl": str(jax.random.key_impl(x))}
      return self._add_leaf(path, info, where)
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
      kind = ("jax" if isinstance(x, jax.Array) else
              "numpy" if isinstance(x, np.ndarray) else "numpy_scalar")
      self._add_tensor(path, x, where)
      info = {"kind": "array", "tensor": path, "array_type": kind}
      rule = self._rule_json(path, x)
      if rule is not None:
        info["rule"] = rule
      return self._add_leaf(path, info, where)
    if type(x) in (bool, int, float, str):
      return self._add_leaf(path, {"kind": "python", "value": _to_tagged(x, where)}, where)
    raise CheckpointError(f"{where}: cannot store a {type(x).__module__}.{type(x).__qualname__}; "
                          "checkpoints hold dicts, lists, tuples, None, arrays, QArrays, python "
                          "scalars, nnx State and linen partitioning boxes (convert e.g. "
                          "FrozenDict with flax.core.unfreeze)")

  def qarray(self, path: str, q: QArray) -> dict:
    qt = getattr(q.qtype, "value", q.qtype)
    where = f"{path}: QArray(qtype={qt}, shape={q.shape}, tile={q.tile})"
    try:
      q.validate(path)
    except ValueError as e:
      raise CheckpointError(f"refusing to save an invalid QArray: {e}") from e
    parts = {"values": q.values, "scale": q.scale, "zero_point": q.zero_point}
    act = None
    if q.activation is not None:
      a = q.activation
      parts["act_scale"], parts["act_zero_point"] = a.scale, a.zero_point
      act = _act_to_json(a.spec)
    components = [c for c in COMPONENTS if parts.get(c) is not None]
    for c in components:
      self._add_tensor(f"{path}.{c}", parts[c], where)
    return {"kind": "qarray", "qtype": q.qtype.value, "shape": list(q.shape), "tile": list(q.tile),
            "granularity": describe_granularity(q.shape, q.tile),
            "symmetric": q.zero_point is None, "scale_dtype": np.dtype(q.scale.dtype).name,
            "components": components, "activation": act, "rule": self._rule_json(path, q)}


def _check_metadata_keys(v: Any, where: str) -> None:
  """Dict keys that JSON would turn into strings (ints, floats, None, bools): CheckpointError,
  as the metadata would not read back as written."""
  if isinstance(v, Mapping):
    for k, x in v.items():
      if not isinstance(k, str):
        raise CheckpointError(f"{where}: key {k!r} of type {type(k).__name__} is not a str; "
                              "JSON would store it as a string, so the metadata would not read "
                              "back as written; use str keys")
      _check_metadata_keys(x, f"{where}[{k!r}]")
  elif isinstance(v, (list, tuple)):
    for i, x in enumerate(v):
      _check_metadata_keys(x, f"{where}[{i}]")


def encode(tree: PyTree, *, metadata: Mapping[str, Any] | None = None,
           rules: Sequence[Rule] | None = None) -> tuple[dict, dict[str, np.ndarray]]:
  """Splits ``tree`` into a JSON-able header and ``{tensor name: host array}`` (see module doc).

  Args:
    tree: a dict / list / tuple (or nnx State) of arrays, QArrays and python scalars.
    metadata: JSON-serialisable user metadata (model name, recipe, ...), stored verbatim.
    rules: the rules that produced ``tree``; each leaf records the first that matches, and a rule
      that contradicts its leaf (e.g. int4 rule, int8 leaf) is an error.

  Raises:
    CheckpointError: unsupported node type or dtype, colliding paths, invalid QArray,
      non-JSON metadata, rules that disagree with the tree.
  """
  if not isinstance(tree, (dict, list, tuple)) and not (
      _nnx_if_loaded() is not None and isinstance(tree, _nnx_if_loaded().State)):
    raise CheckpointError(f"the tree root must be a dict, list, tuple or nnx.State, got "
                          f"{type(tree).__name__}; wrap a single array as {{'w': x}}")
  rules = tuple(rules or ())
  for r in rules:
    if not isinstance(r, Rule):
      raise CheckpointError(f"rules must be jq.spec.Rule objects, got {r!r}")
  enc = _Encoder(rules)
  root = enc.node(tree, ())
  if metadata is not None and not isinstance(metadata, Mapping):
    raise CheckpointError(f"metadata must be a dict (str keys, JSON values), got "
                          f"{type(metadata).__name__} {metadata!r}")
  user = dict(metadata or {})
  _check_metadata_keys(user, "metadata")
  try:
    json.dumps(user, allow_nan=False)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"metadata must be JSON-serialisable (str keys; finite numbers): "
                          f"{e}") from e
  header = {
      "format": FORMAT, "version": format_version(qarray_qtypes(enc.leaves)),
      "jq_version": _jq_version(),
      "metadata": user, "rules": [spec_json.rule_to_json(r) for r in rules], "tree": root,
      "leaves": enc.leaves,
      "tensors": {name: {"dtype": a.dtype.name, "shape": list(a.shape), "crc32": crc32(a),
                         "sha256": sha256_hex(a)}
                  for name, a in enc.tensors.items()},
  }
  return seal(header), enc.tensors


# ---- decoding ----------------------------------------------------------------------------------


_THREE_BIT = frozenset((QType.INT3.value, QType.UINT3.value))


def qarray_qtypes(leaves: Mapping[str, Any]) -> list[str]:
  """The qtype names of a header's QArray leaves (``header["leaves"]``)."""
  return [str(v.get("qtype")) for v in leaves.values()
          if isinstance(v, dict) and v.get("kind") == "qarray"]


def format_version(qtypes: Any) -> int:
  """The format version a checkpoint holding QArrays of ``qtypes`` (QTypes or their names) is
  written as: :data:`DENSE_3BIT_VERSION` where one is 3-bit, else 1, so that a file without 3-bit
  values still loads in jq releases that predate dense 3-bit packing."""
  return DENSE_3BIT_VERSION if any(getattr(q, "value", q) in _THREE_BIT for q in qtypes) else 1


def legacy_3bit_paths(header: Mapping) -> list[str]:
  """Paths of 3-bit QArrays that ``header`` (format version 1) stores in 4-bit slots."""
  if header.get("version", FORMAT_VERSION) >= DENSE_3BIT_VERSION:
    return []
  return [p for p, v in header["leaves"].items() if isinstance(v, dict)
          and v.get("kind") == "qarray" and v.get("qtype") in _THREE_BIT]


def _from_4bit_slots(values: Any, qtype: QType, shape: tuple[int, ...], desc: str,
                     abstract: bool) -> Any:
  """A version-1 file's 3-bit ``values`` (4-bit slots, two per byte) packed densely, after
  checking that every code lies in the qtype's range (a slot can hold more)."""
  n = shape[-1] if shape else 1
  old = (*shape[:-1], -(-n // 2)) if shape else ()
  if tuple(values.shape) != old or np.dtype(values.dtype) != np.uint8:
    raise CheckpointError(f"{desc}: values have shape {tuple(values.shape)} dtype {values.dtype}; "
                          f"a format version 1 file holds 3-bit values two per byte: {old} "
                          "uint8")
  if abstract:
    return jax.ShapeDtypeStruct(numerics.packed_shape(shape, qtype), np.uint8)
  slots = QType.from_bits(4, signed=qtype.signed)   # a 4-bit slot reads as the 4-bit type
  codes = numerics.unpack(np.asarray(values), slots, n, xp=np).reshape(shape)
  bad = (codes < qtype.qmin) | (codes > qtype.qmax)
  if bad.any():
    i = tuple(int(j) for j in np.argwhere(bad)[0])
    raise CheckpointError(f"{desc}: values (format version 1, 4-bit slots): {int(bad.sum())} "
                          f"codes outside [{qtype.qmin}, {qtype.qmax}], first at index {i}: "
                          f"{int(codes[i])}; the data is corrupt")
  return numerics.pack(codes, qtype, xp=np)


def _need(d: Any, key: str, types: type | tuple[type, ...], where: str) -> Any:
  if not isinstance(d, dict) or key not in d:
    raise CheckpointError(f"{where}: checkpoint header entry lacks {key!r}")
  v = d[key]
  allowed = types if isinstance(types, tuple) else (types,)
  if not isinstance(v, allowed) or (isinstance(v, bool) and bool not in allowed):
    raise CheckpointError(f"{where}: checkpoint header entry {key!r}={v!r} has the wrong type")
  return v


def _int_tuple(v: Any, where: str, what: str) -> tuple[int, ...]:
  if not isinstance(v, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                        for i in v):
    raise CheckpointError(f"{where}: {what} {v!r} in the checkpoint header is not a list of "
                          "non-negative ints")
  return tuple(v)


def check_header(header: Any, *, source: str) -> dict:
  """Checks the header's format and version; returns it.

  Raises:
    CheckpointError: not a jq header, or a format version this jq cannot read.
  """
  if not isinstance(header, dict) or header.get("format") != FORMAT:
    raise CheckpointError(f"{source}: not a jq checkpoint header (format="
                          f"{header.get('format') if isinstance(header, dict) else header!r})")
  version = header.get("version")
  if not isinstance(version, int) or isinstance(version, bool) or version < 1:
    raise CheckpointError(f"{source}: invalid jq checkpoint format version {version!r}")
  if version > FORMAT_VERSION:
    raise CheckpointError(f"{source}: jq checkpoint format version {version} is newer than this jq "
                          f"reads (up to {FORMAT_VERSION}); upgrade jq")
  for key, typ in (("tree", dict), ("leaves", dict), ("tensors", dict), ("metadata", dict),
                   ("rules", list)):
    _need(header, key, typ, source)
  return header


def _tensor_spec(name: str, t: Any, source: str) -> tuple[np.dtype, tuple[int, ...]]:
  where = f"{source}: tensor {name!r}"
  dt = _need(t, "dtype", str, where)
  if dt not in DTYPES:
    raise CheckpointError(f"{where}: unsupported dtype {dt!r} in checkpoint header")
  return DTYPES[dt], _int_tuple(_need(t, "shape", list, where), where, "shape")


def tensor_specs(header: dict, *, source: str) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
  """``{name: (dtype, shape)}`` the header promises."""
  return {name: _tensor_spec(name, t, source) for name, t in header["tensors"].items()}


def check_tensors(header: dict, found: Mapping[str, tuple[np.dtype, tuple[int, ...]]], *,
                  source: str) -> None:
  """Checks that the container holds exactly the tensors the header lists, with their dtypes and
  shapes (cheap: no tensor data is read).

  Raises:
    CheckpointError: naming the tensor, with both shapes and dtypes.
  """
  want = tensor_specs(header, source=source)
  missing = [n for n in want if n not in found]
  if missing:
    n = missing[0]
    raise CheckpointError(f"{source}: tensor {n!r} (shape {want[n][1]} dtype {want[n][0]}) is "
                          f"listed in the jq header but missing from the file"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
  extra = [n for n in found if n not in want]
  if extra:
    n = extra[0]
    raise CheckpointError(f"{source}: tensor {n!r} (shape {tuple(found[n][1])} dtype "
                          f"{found[n][0]}) is in the file but not described by the jq header")
  for n, (dt, shape) in want.items():
    fdt, fshape = found[n]
    if np.dtype(fdt) != dt or tuple(fshape) != shape:
      raise CheckpointError(f"{source}: tensor {n!r} is stored with shape {tuple(fshape)} dtype "
                            f"{np.dtype(fdt)}, but the jq header says shape {shape} dtype {dt}; "
                            "the file was modified or is corrupt")


class LazyLeaf:
  """An array or QArray leaf of a checkpoint not read yet (``jq.io.load(path, lazy=True)``).

  ``shape`` (a QArray's logical shape), ``dtype`` (arrays), ``qtype`` and ``tile`` (QArrays, else
  None) come from the header; :meth:`load` reads the leaf's tensors and returns the array or QArray,
  checked exactly as :func:`decode` checks it.  Each call reads again (nothing is kept), so a
  tree of these holds no tensor data: a consumer loads one leaf at a time."""

  def __init__(self, header: dict, arrays: Mapping[str, Any], source: str, verify: bool,
               path: str, info: dict):
    self._header, self._arrays, self._source, self._verify = header, arrays, source, verify
    self.path = path
    if info["kind"] == "qarray":
      self.qtype, self.dtype = QType(info["qtype"]), None
      self.shape = tuple(int(n) for n in info["shape"])
      self.tile = tuple(int(n) for n in info["tile"])
    else:
      self.qtype = self.tile = None
      self.dtype, self.shape = _tensor_spec(info["tensor"], header["tensors"][info["tensor"]],
                                            source)

  def load(self) -> Any:
    return _Decoder(self._header, self._arrays, self._source, self._verify).leaf(self.path)

  def __repr__(self) -> str:
    what = f"qtype={self.qtype.value}" if self.qtype is not None else f"dtype={self.dtype}"
    return f"LazyLeaf({self.path!r}, shape={self.shape}, {what})"


def load_leaf(x: Any) -> Any:
  """``x`` read if it is a :class:`LazyLeaf`, else ``x``."""
  return x.load() if isinstance(x, LazyLeaf) else x


class _Decoder:
  """Rebuilds the tree; with ``abstract``, ``arrays`` holds ``jax.ShapeDtypeStruct``s and only the
  structure is checked (QArrays are validated under ``jax.eval_shape``, no data is read); with
  ``lazy``, array and QArray leaves become :class:`LazyLeaf`s (the structure checked first)."""

  def __init__(self, header: dict, arrays: Mapping[str, Any], source: str, verify: bool,
               abstract: bool = False, lazy: bool = False):
    self.header, self.arrays, self.source, self.verify = header, arrays, source, verify
    self.abstract, self.lazy = abstract, lazy
    self.used: set[str] = set()
    self.seen: set[str] = set()

  def tensor(self, name: str, where: str) -> np.ndarray:
    if name not in self.arrays or name not in self.header["tensors"]:
      raise CheckpointError(f"{where}: tensor {name!r} is missing from the checkpoint")
    if name in self.used:
      raise CheckpointError(f"{where}: tensor {name!r} is claimed by two leaves in the header")
    arr = self.arrays[name]
    dt, shape = _tensor_spec(name, self.header["tensors"][name], self.source)
    if arr.dtype != dt or tuple(arr.shape) != shape:
      raise CheckpointError(f"{where}: tensor {name!r} has shape {tuple(arr.shape)} dtype "
                            f"{arr.dtype}, but the jq header says shape {shape} dtype {dt}")
    if self.verify:
      problem = tensor_digest_problem(
          self.header["tensors"][name],
          np.ascontiguousarray(np.asarray(arr)).reshape(-1).view(np.uint8))
      if problem:
        raise CheckpointError(f"{where}: tensor {name!r} (shape {shape} dtype {dt}) {problem}; "
                              "the data is corrupt")
    self.used.add(name)
    return arr

  def node(self, n: Any, where: str) -> Any:
    kind = _need(n, "kind", str, where)
    if kind == "none":
      return None
    if kind == "leaf":
      return self.leaf(_need(n, "path", str, where))
    if kind in ("dict", "list", "tuple"):
      items = _need(n, "items", list, where)
      if kind == "dict":
        out = {}
        for it in items:
          if (not isinstance(it, list) or len(it) != 2 or isinstance(it[0], bool)
              or not isinstance(it[0], (str, int))):
            raise CheckpointError(f"{where}: malformed dict item {it!r} in checkpoint header")
          out[it[0]] = self.node(it[1], f"{where}/{it[0]}")
        return out
      children = [self.node(c, f"{where}/{i}") for i, c in enumerate(items)]
      return children if kind == "list" else tuple(children)
    if kind in ("nnx.State", "nnx.Variable"):
      nnx = _nnx()
      if nnx is None and self.abstract:  # (checking the structure needs no flax: visit children)
        kids = (_need(n, "items", list, where) if kind == "nnx.State"
                else [_need(n, "child", dict, where)])
        for i, c in enumerate(kids):
          self.node(c, f"{where}/{i}")
        return None
      if nnx is None:
        raise CheckpointError(f"{where}: the checkpoint holds an {kind}; install flax to load it")
      if kind == "nnx.State":
        keys = _need(n, "keys", list, where)
        items = _need(n, "items", list, where)
        if len(keys) != len(items):
          raise CheckpointError(f"{where}: nnx.State has {len(keys)} keys but {len(items)} items")
        return nnx.State({k: self.node(c, f"{where}/{k}") for k, c in zip(keys, items)})
      name = _need(n, "type", str, where)
      cls = getattr(nnx, name, None)
      if not (isinstance(cls, type) and issubclass(cls, nnx.Variable)):
        raise CheckpointError(f"{where}: unknown nnx Variable type {name!r}")
      pairs = _need(n, "metadata", list, where)
      if not all(isinstance(kv, list) and len(kv) == 2 and isinstance(kv[0], str) for kv in pairs):
        raise CheckpointError(f"{where}: malformed nnx Variable metadata {pairs!r}")
      meta = tuple((k, _from_tagged(v)) for k, v in pairs)
      child = self.node(_need(n, "child", dict, where), where)
      star = jax.tree_util.tree_structure(0)
      try:
        treedef = jax.tree_util.PyTreeDef.from_node_data_and_children(
            jax.tree_util.default_registry, (cls, meta), [star])
        return jax.tree_util.tree_unflatten(treedef, [child])
      except Exception as e:  # pylint: disable=broad-except  (flax decides what metadata is valid)
        raise CheckpointError(f"{where}: cannot rebuild nnx.{name} with metadata {meta!r}: "
                              f"{e}") from e
    if kind in tuple(f"linen.{b}" for b in _BOXES):
      child = self.node(_need(n, "child", dict, where), where)
      name = kind.partition(".")[2]
      if self.abstract and _BOXES[name] not in sys.modules:
        return None
      try:
        cls = getattr(importlib.import_module(_BOXES[name]), name)
      except ImportError as e:
        raise CheckpointError(f"{where}: the checkpoint holds a {kind}; install flax to load "
                              "it") from e
      names = _from_tagged(n.get("names"))
      if not isinstance(names, tuple):
        raise CheckpointError(f"{where}: malformed {kind} names {n.get('names')!r}")
      if name == "Partitioned":
        return cls(child, names=names, mesh=None)
      rules = n.get("rules")
      return cls(child, names=names, mesh=None,
                 rules=None if rules is None else _from_tagged(rules))
    raise CheckpointError(f"{where}: unknown node kind {kind!r} in checkpoint header")

  def leaf(self, path: str) -> Any:
    where = f"{self.source}: {path or '<root>'}"
    if path in self.seen:
      raise CheckpointError(f"{where}: leaf occurs twice in the checkpoint tree")
    self.seen.add(path)
    leaves = self.header["leaves"]
    if path not in leaves:
      raise CheckpointError(f"{where}: leaf is missing from the checkpoint header's 'leaves'")
    info = leaves[path]
    kind = _need(info, "kind", str, where)
    if self.lazy and kind in ("array", "qarray"):
      self.used.update([info["tensor"]] if kind == "array" else
                       [f"{path}.{c}" for c in info["components"]])
      return LazyLeaf(self.header, self.arrays, self.source, self.verify, path, info)
    if kind == "python":
      v = _from_tagged(info.get("value"))
      if type(v) not in (bool, int, float, str):
        raise CheckpointError(f"{where}: malformed python leaf {v!r}")
      return v
    if kind == "array":
      arr = self.tensor(_need(info, "tensor", str, where), where)
      typ = info.get("array_type", "jax")
      if typ not in ("jax", "numpy", "numpy_scalar", "prng_key"):
        raise CheckpointError(f"{where}: unknown array_type {typ!r}")
      if self.abstract:
        return arr
      if typ == "prng_key":
        try:
          return jax.random.wrap_key_data(jnp.asarray(arr), impl=_need(info, "impl", str, where))
        except (TypeError, ValueError) as e:
          raise CheckpointError(f"{where}: key data of shape {tuple(arr.shape)} dtype {arr.dtype} "
                                f"is not a {info['impl']!r} PRNG key ({e})") from e
      if typ == "numpy":
        return np.array(arr)
      if typ == "numpy_scalar":
        return np.asarray(arr)[()]
      if typ != "jax":
        raise CheckpointError(f"{where}: unknown array_type {typ!r}")
      out = jnp.asarray(arr)
      if out.dtype != arr.dtype:
        raise CheckpointError(f"{where}: shape {tuple(arr.shape)} dtype {arr.dtype} would become "
                              f"{out.dtype} as a jax array; enable jax_enable_x64 to load it")
      return out
    if kind == "qarray":
      return self.qarray(path, info, where)
    raise CheckpointError(f"{where}: unknown leaf kind {kind!r}")

  def qarray(self, path: str, info: dict, where: str) -> QArray:
    try:
      qtype = QType(_need(info, "qtype", str, where))
    except ValueError as e:
      raise CheckpointError(f"{where}: unknown qtype {info['qtype']!r}") from e
    shape = _int_tuple(_need(info, "shape", list, where), where, "logical shape")
    tile = _int_tuple(_need(info, "tile", list, where), where, "tile")
    desc = f"{where}: QArray(qtype={qtype.value}, shape={shape}, tile={tile})"
    comps = _need(info, "components", list, where)
    unknown = [c for c in comps if c not in COMPONENTS]
    if unknown:
      raise CheckpointError(f"{desc}: unknown components {unknown}")
    for c in ("values", "scale"):
      if c not in comps:
        raise CheckpointError(f"{desc}: the header lists no {c!r} tensor ({path}.{c}); a QArray "
                              "needs packed values and scales")
    sym = _need(info, "symmetric", bool, where)
    if sym == ("zero_point" in comps):
      raise CheckpointError(f"{desc}: header says symmetric={sym} but "
                            f"{'lists' if 'zero_point' in comps else 'lacks'} a zero_point tensor")
    act_json = info.get("activation")
    spec = None
    if act_json is not None:
      spec = _act_from_json(act_json, desc)
      static = spec.mode is ActMode.STATIC
      if static != ("act_scale" in comps):
        raise CheckpointError(f"{desc}: activation mode {spec.mode.value} "
                              f"{'needs' if static else 'takes no'} an act_scale tensor "
                              f"({path}.act_scale)")
    elif "act_scale" in comps or "act_zero_point" in comps:
      raise CheckpointError(f"{desc}: activation tensors stored but no activation spec in header")
    parts = {c: self.tensor(f"{path}.{c}", desc) for c in COMPONENTS if c in comps}
    if qtype.bits == 3 and self.header["version"] < DENSE_3BIT_VERSION:
      parts["values"] = _from_4bit_slots(parts["values"], qtype, shape, desc, self.abstract)

    def build(parts: dict) -> QArray:
      activation = None
      if spec is not None:
        a_scale, a_zp = parts.get("act_scale"), parts.get("act_zero_point")
        if a_scale is not None and not jnp.issubdtype(a_scale.dtype, jnp.floating):
          raise CheckpointError(f"{desc}: act_scale has shape {a_scale.shape} dtype "
                                f"{a_scale.dtype}; expected a floating-point scale")
        activation = ActivationQuant(scale=a_scale, zero_point=a_zp, spec=spec)
      q = QArray(values=parts["values"], scale=parts["scale"], zero_point=parts.get("zero_point"),
                 activation=activation, qtype=qtype, shape=shape, tile=tile)
      try:
        return q.validate(f"{self.source}: {path}")
      except ValueError as e:
        raise CheckpointError(f"{e} (the checkpoint header disagrees with its tensors)") from e

    if self.abstract:  # tracers: shapes and dtypes checked, value checks skipped
      return jax.eval_shape(build, parts)
    return build({c: jnp.asarray(v) for c, v in parts.items()})


def decode(header: dict, arrays: Mapping[str, np.ndarray], *, source: str,
           verify: bool = True, lazy: bool = False) -> PyTree:
  """Rebuilds the tree :func:`encode` split (arrays as jax arrays unless saved as numpy).

  Args:
    header: the parsed header (checked with :func:`check_header` here).
    arrays: ``{tensor name: numpy array}`` read from the container.
    source: the file or directory, for error messages.
    verify: check each tensor's CRC-32 against the header.
    lazy: array and QArray leaves as :class:`LazyLeaf`s, read (and checked) by their ``load()``
      from ``arrays``, which must stay readable (the structure is checked here, reading nothing).

  Raises:
    CheckpointError: any disagreement between header and tensors, naming path, shape and dtype.
  """
  check_header(header, source=source)
  if lazy:
    check_structure(header, source=source)
  return _decode(header, arrays, source=source, verify=verify, abstract=False, lazy=lazy)


def _decode(header: dict, arrays: Mapping[str, Any], *, source: str, verify: bool,
            abstract: bool, lazy: bool = False) -> PyTree:
  dec = _Decoder(header, arrays, source, verify, abstract, lazy)
  tree = dec.node(header["tree"], source)
  unused = set(header["tensors"]) - dec.used
  if unused:
    raise CheckpointError(f"{source}: tensor(s) {sorted(unused)[:3]} are listed in the jq header "
                          "but belong to no leaf of its tree")
  unreached = set(header["leaves"]) - dec.seen
  if unreached:
    raise CheckpointError(f"{source}: leaves {sorted(unreached)[:3]} are in the header but not "
                          "in its tree")
  return tree


def check_structure(header: dict, *, source: str) -> None:
  """Checks that the header describes a tree its own tensor specs can fill (every QArray's
  storage shapes and dtypes, every leaf's tensor), reading no tensor data.

  Raises:
    CheckpointError: naming the path, as :func:`decode` would.
  """
  abstract = {n: jax.ShapeDtypeStruct(shape, dt)
              for n, (dt, shape) in tensor_specs(header, source=source).items()}
  _decode(header, abstract, source=source, verify=False, abstract=True)


def verify_header(header: Any, found: Mapping[str, tuple[np.dtype, tuple[int, ...]]] | None, *,
                  source: str) -> bool:
  """All checks of a parsed header that need no tensor data; returns whether it was sealed.

  Checks the format and version, the integrity record (:func:`integrity_problem`), that the
  container holds exactly the tensors listed (``found``: ``{name: (dtype, shape)}``, None to skip)
  and that the tree can be built from them (:func:`check_structure`).  Where the header was
  modified, the more specific of the two messages comes first and the digest failure is appended.

  Raises:
    CheckpointError: naming the file and the field, path or tensor.
  """
  check_header(header, source=source)
  problem = integrity_problem(header, source=source)
  try:
    if found is not None:
      check_tensors(header, found, source=source)
    check_structure(header, source=source)
  except CheckpointError as e:
    if problem:
      raise CheckpointError(f"{e}\n(also: {problem})") from e
    raise
  except Exception as e:  # pylint: disable=broad-except  (a damaged header can break anything)
    raise CheckpointError(problem or f"{source}: the jq header is malformed "
                          f"({type(e).__name__}: {e})") from e
  if problem:
    raise CheckpointError(problem)
  return is_sealed(header)


__all__ = ["FORMAT", "FORMAT_VERSION", "DENSE_3BIT_VERSION", "format_version", "qarray_qtypes",
           "legacy_3bit_paths", "COMPONENTS", "DTYPES", "CheckpointError", "encode",
           "decode", "check_header", "check_tensors", "tensor_specs", "rules_from_header",
           "describe_granularity", "crc32", "host_array", "sha256_hex", "parse_json",
           "canonical_json", "integrity_record", "integrity_problem", "is_sealed", "seal",
           "check_structure", "verify_header", "tensor_digest_problem", "MAX_HEADER_JSON_BYTES", "MAX_JSON_DEPTH"]
