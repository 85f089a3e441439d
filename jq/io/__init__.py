"""Checkpoints of (quantized) parameter trees: jq's native safetensors format and orbax.

* :func:`save` / :func:`load` / :func:`load_header`: one safetensors file; QArrays stored as
  ``<path>.values`` / ``.scale`` / ``.zero_point`` (+ ``.act_scale`` / ``.act_zero_point``), the
  jq JSON header in ``__metadata__["jq"]`` (schema in :mod:`jq.io.codec`).
* :func:`save_orbax` / :func:`load_orbax`: the same tensors and header as an orbax checkpoint.
* a sharded directory (``jq.index.json`` + safetensors shards, :mod:`jq.io.sharded`), what the
  streamed road (:mod:`jq.stream`) writes: :func:`load` and :func:`load_header` read it too.

Loading needs no model code and rebuilds the identical tree; every write is atomic.  Both loaders
take ``shardings=`` (e.g. from :func:`jq.sharding.shardings`) to place every array directly in its
sharding, each device reading only its own slice.

Example:
  >>> jq.io.save("model.safetensors", qparams, metadata={"model": "SmolLM2-135M"}, rules=rules)
  >>> qparams = jq.io.load("model.safetensors")
"""
import os

from jq.io.atomic import atomic_write, replace_dir
from jq.io.codec import (FORMAT_VERSION, CheckpointError, LazyLeaf, describe_granularity,
                         load_leaf, rules_from_header)
from jq.io.orbax_io import load_orbax, load_orbax_header, save_orbax
from jq.io import safetensors_io as _st
from jq.io import sharded
from jq.io.safetensors_io import read_tensors, save


def load(path, *, verify: bool = True, shardings=None, lazy: bool = False):
  """Loads a jq checkpoint: a ``.safetensors`` file (:func:`jq.io.safetensors_io.load`, whose
  docstring gives the arguments and checks) or a sharded directory (:func:`jq.io.sharded.load`).
  ``lazy``: leaves as :class:`LazyLeaf`s read one at a time by their ``load()``."""
  if os.path.isdir(path):
    _sharded_or_raise(path)
    return sharded.load(path, verify=verify, shardings=shardings, lazy=lazy)
  return _st.load(path, verify=verify, shardings=shardings, lazy=lazy)


def load_header(path) -> dict:
  """The checked jq header of a ``.safetensors`` checkpoint or a sharded directory (see
  :func:`jq.io.safetensors_io.load_header`)."""
  if os.path.isdir(path):
    _sharded_or_raise(path)
    return sharded.load_header(path)
  return _st.load_header(path)


def _sharded_or_raise(path) -> None:
  if not sharded.is_sharded(path):
    raise CheckpointError(f"{path} is a directory without {sharded.INDEX}: not a sharded jq "
                          "checkpoint (an unfinished streamed run keeps its shards in "
                          f"{os.path.basename(sharded.work_dir(path))} beside it and is resumed "
                          "by running it again)")

__all__ = ["save", "load", "load_header", "read_tensors", "save_orbax", "load_orbax", "load_orbax_header",
           "CheckpointError", "FORMAT_VERSION", "rules_from_header", "describe_granularity",
           "LazyLeaf", "load_leaf",
           "atomic_write", "replace_dir"]
