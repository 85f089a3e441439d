"""Checkpoints of (quantized) parameter trees: jq's native safetensors format and orbax.

* :func:`save` / :func:`load` / :func:`load_header`: one safetensors file; QArrays stored as
  ``<path>.values`` / ``.scale`` / ``.zero_point`` (+ ``.act_scale`` / ``.act_zero_point``), the
  jq JSON header in ``__metadata__["jq"]`` (schema in :mod:`jq.io.codec`).
* :func:`save_orbax` / :func:`load_orbax`: the same tensors and header as an orbax checkpoint.

Loading needs no model code and rebuilds the identical tree; every write is atomic.  Both loaders
take ``shardings=`` (e.g. from :func:`jq.sharding.shardings`) to place every array directly in its
sharding, each device reading only its own slice.

Example:
  >>> jq.io.save("model.safetensors", qparams, metadata={"model": "SmolLM2-135M"}, rules=rules)
  >>> qparams = jq.io.load("model.safetensors")
"""
from jq.io.atomic import atomic_write, replace_dir
from jq.io.codec import FORMAT_VERSION, CheckpointError, describe_granularity, rules_from_header
from jq.io.orbax_io import load_orbax, load_orbax_header, save_orbax
from jq.io.safetensors_io import load, load_header, read_tensors, save

__all__ = ["save", "load", "load_header", "read_tensors", "save_orbax", "load_orbax", "load_orbax_header",
           "CheckpointError", "FORMAT_VERSION", "rules_from_header", "describe_granularity",
           "atomic_write", "replace_dir"]
