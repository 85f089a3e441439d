"""jq checkpoints as orbax checkpoint directories.

The same split as the safetensors format (:mod:`jq.io.codec`): a composite orbax checkpoint with
two items,

* ``tensors``: a flat ``{tensor name: array}`` dict saved with ``StandardSave`` (names as in the
  safetensors format: ``params/dense/kernel.values``, ``.scale``, ``.zero_point``, ...);
* ``jq``: the jq JSON header (tree structure, QArray static metadata, rules, per-tensor CRC-32s
  and SHA-256s, user metadata, and the header's own SHA-256 integrity record; see
  :mod:`jq.io.codec`) saved with ``JsonSave``,

so QArray's static fields (qtype, shape, tile, activation spec) and the container structure
round-trip exactly without pickling a treedef.

Atomicity: orbax writes into a temporary directory and renames it when complete, but with
``force=True`` it deletes an existing checkpoint *before* writing.  jq instead builds the new
checkpoint beside the destination and swaps it in only after orbax has finished
(:func:`jq.io.atomic.replace_dir`), so a failed save leaves the previous checkpoint intact.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jq.io import codec
from jq.io.atomic import replace_dir, temporary_sibling_dir
from jq.io.codec import CheckpointError
from jq.io.safetensors_io import check_shardings_tree, tensor_shardings
from jq.spec import Rule

PyTree = Any

_TENSORS, _HEADER = "tensors", "jq"


def _orbax():
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel  (slow import)
  return ocp


def save_orbax(directory: str | os.PathLike, tree: PyTree, *,
               metadata: Mapping[str, Any] | None = None,
               rules: Sequence[Rule] | None = None) -> None:
  """Saves a (quantized) tree as an orbax checkpoint directory, replacing any previous one.

  Args:
    directory: the checkpoint directory (created; an existing jq/orbax checkpoint is replaced only
      once the new one is complete).
    tree: as for :func:`jq.io.save`.
    metadata: JSON-serialisable user metadata.
    rules: the rules that produced ``tree`` (recorded per leaf).

  Raises:
    CheckpointError: as for :func:`jq.io.save`; or ``directory`` exists and is not a directory.
  """
  dst = os.path.abspath(os.fspath(directory))
  if os.path.lexists(dst) and (not os.path.isdir(dst) or os.path.islink(dst)):
    raise CheckpointError(f"{dst}: exists and is not a directory; refusing to replace it")
  header, tensors = codec.encode(tree, metadata=metadata, rules=rules)
  ocp = _orbax()
  work = temporary_sibling_dir(dst)
  try:
    staged = os.path.join(work, "checkpoint")
    items = {_HEADER: ocp.args.JsonSave(header)}
    if tensors:
      items[_TENSORS] = ocp.args.StandardSave(dict(tensors))
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
      ckpt.save(staged, args=ocp.args.Composite(**items))
    replace_dir(staged, dst)
  finally:
    shutil.rmtree(work, ignore_errors=True)


def _stored_specs(ocp, path: str, source: str) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
  """``{name: (dtype, shape)}`` from orbax's own array metadata (no data read)."""
  try:
    from etils import epath  # pylint: disable=import-outside-toplevel  (an orbax dependency)
    meta = ocp.StandardCheckpointHandler().metadata(epath.Path(path))
  except Exception as e:  # pylint: disable=broad-except  (orbax raises many types here)
    raise CheckpointError(f"{source}: cannot read the orbax tensor metadata: {e}") from e
  tree = getattr(meta, "tree", meta)
  if not isinstance(tree, Mapping):
    raise CheckpointError(f"{source}: orbax tensor item is not a flat dict of arrays")
  return {name: (np.dtype(m.dtype), tuple(m.shape)) for name, m in tree.items()}


def _read_header(ocp, ckpt, src: str) -> Any:
  """The jq header item: parsed here with jq's limits (size, depth, no duplicate keys) when it is
  the plain JSON file ``jq/metadata`` orbax's JsonSave writes, else restored by orbax."""
  meta = os.path.join(src, _HEADER, "metadata")
  if os.path.isfile(meta):
    size = os.path.getsize(meta)
    if size > codec.MAX_HEADER_JSON_BYTES:
      raise CheckpointError(f"{meta}: the jq header is {size} bytes, more than the "
                            f"{codec.MAX_HEADER_JSON_BYTES}-byte limit; the checkpoint is corrupt")
    with open(meta, "rb") as f:
      return codec.parse_json(f.read(), f"{meta}: jq header")
  try:
    return ckpt.restore(src, args=ocp.args.Composite(**{_HEADER: ocp.args.JsonRestore()}))[_HEADER]
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"{src}: cannot read the jq header item: {e}") from e


def _checkpoint_dir(directory: str | os.PathLike) -> str:
  """The absolute path of a jq orbax checkpoint directory (one with jq's header item)."""
  src = os.path.abspath(os.fspath(directory))
  if not os.path.isdir(os.path.join(src, _HEADER)):
    raise CheckpointError(f"{src}: not a jq orbax checkpoint (no {_HEADER!r} item; write it with "
                          "jq.io.save_orbax)")
  return src


def load_orbax_header(directory: str | os.PathLike) -> dict:
  """The jq header of an orbax checkpoint (checked, incl. its integrity record), without tensors.

  Raises:
    CheckpointError: as :func:`load_orbax` for the header.
  """
  src = _checkpoint_dir(directory)
  ocp = _orbax()
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
    header = _read_header(ocp, ckpt, src)
  codec.check_header(header, source=src)
  return header


def load_orbax(directory: str | os.PathLike, *, verify: bool = True,
               shardings: PyTree | None = None) -> PyTree:
  """Loads a checkpoint written by :func:`save_orbax` (arrays on the default device, or laid out
  by ``shardings``).

  With ``shardings``, orbax restores every array straight into its sharding (each device reads
  only its own slice).

  Args:
    directory: the checkpoint directory.
    verify: check each tensor's CRC-32 and SHA-256 against the header (this copies one tensor
      at a time to the host); False skips only these, never the header's own integrity check.
    shardings: None, or a shardings tree as for :func:`jq.io.load`.

  Example:
    >>> qparams = jq.io.load_orbax("ckpt/", shardings=jq.sharding.shardings(qshapes, float_sh))

  Raises:
    CheckpointError: not a jq orbax checkpoint, an unknown format version, a header that fails
      its SHA-256 integrity check (naming the field) or disagrees with the stored tensors (naming
      path, shape and dtype), tensor bytes that fail their CRC-32/SHA-256, unreadable tensor data,
      or a shardings tree that differs from the stored tree (naming the path).
  """
  src = _checkpoint_dir(directory)
  ocp = _orbax()
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
    header = _read_header(ocp, ckpt, src)
    codec.check_header(header, source=src)
    want = codec.tensor_specs(header, source=src)
    has_tensors = os.path.isdir(os.path.join(src, _TENSORS))
    if want and not has_tensors:
      raise CheckpointError(f"{src}: the jq header lists {len(want)} tensors but the checkpoint "
                            f"has no {_TENSORS!r} item")
    found = _stored_specs(ocp, os.path.join(src, _TENSORS), src) if has_tensors else {}
    codec.verify_header(header, found, source=src)  # (always, also without verify)
    placement = {} if shardings is None else tensor_shardings(header, shardings, source=src)
    arrays: dict[str, Any] = {}
    if want:
      default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      abstract = {n: jax.ShapeDtypeStruct(shape, dt, sharding=placement.get(n) or default)
                  for n, (dt, shape) in want.items()}
      try:
        arrays = ckpt.restore(src, args=ocp.args.Composite(
            **{_TENSORS: ocp.args.StandardRestore(abstract)}))[_TENSORS]
      except Exception as e:  # pylint: disable=broad-except  (tensorstore raises many types)
        raise CheckpointError(f"{src}: cannot read the tensor data ({type(e).__name__}: {e}); "
                              "the checkpoint is corrupt") from e
  tree = codec.decode(header, arrays, source=src, verify=verify)
  if shardings is not None:
    check_shardings_tree(tree, shardings, source=src)
  return tree


__all__ = ["save_orbax", "load_orbax"]
