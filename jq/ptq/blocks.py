"""The interface ``jq.ptq`` needs from a model to calibrate it block by block."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ScaleGroup:
  """Linears that share one input, and the operation producing it (where scales fold).

  Attributes:
    prev: block-relative path of the producer's parameter (``input_norm/scale`` for a norm, or
      ``mlp/up_proj/kernel`` for a linear whose output columns are the consumers' input channels).
    prev_kind: ``"norm"`` or ``"linear"``.
    consumers: block-relative kernel paths of the linears reading that input.
    block_fn: ``block_fn(x, ws) -> y``, the output whose error AWQ minimises (default: the
      concatenated ``x @ W_i``).
  """
  prev: str
  prev_kind: str
  consumers: tuple[str, ...]
  block_fn: Callable[[jax.Array, Sequence[jax.Array]], jax.Array] | None = None


def swiglu_output(x: jax.Array, ws: Sequence[jax.Array]) -> jax.Array:
  """``silu(x @ W_gate) * (x @ W_up)``: the gated-MLP output AWQ measures for gate/up."""
  g, u = ws
  return jax.nn.silu(x @ g) * (x @ u)


class BlockwiseModel(Protocol):
  """A model seen as ``embed`` followed by identical blocks (see ``jq_models.blockwise``)."""

  @property
  def num_blocks(self) -> int: ...

  def block_key(self, i: int) -> str: ...

  def embed(self, params: dict[str, Any], tokens: jax.Array) -> jax.Array: ...

  def apply_block(self, block_params: dict[str, Any], x: jax.Array) -> jax.Array: ...

  def scale_groups(self) -> Sequence[ScaleGroup]: ...


def get_path(tree: dict[str, Any], path: str) -> Any:
  node = tree
  for k in path.split("/"):
    node = node[k]
  return node


def set_path(tree: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
  """A copy of nested dict ``tree`` with ``path`` replaced (other nodes shared)."""
  head, _, rest = path.partition("/")
  new = dict(tree)
  new[head] = value if not rest else set_path(tree[head], rest, value)
  return new


def as_float32(x: jax.Array) -> jax.Array:
  return jnp.asarray(x, jnp.float32)
