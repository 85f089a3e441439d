"""Block-by-block views of the reference models, for sequential calibration (``jq.ptq``).

``jq.ptq`` calibrates one transformer block at a time on the outputs of the already-quantized
blocks before it; it needs to embed tokens, run one block alone, and know which norm or linear
produces the input of which linears (to fold AWQ/SmoothQuant scales).  This module provides that
for the Llama-family decoder in ``jq_models.decoder``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jq.ptq.blocks import ScaleGroup, swiglu_output
from jq_models import decoder


@dataclasses.dataclass(frozen=True)
class LlamaBlocks:
  """Implements ``jq.ptq.blocks.BlockwiseModel`` for ``jq_models.decoder.Llama``."""
  config: decoder.LlamaConfig

  def __post_init__(self):
    if self.config.num_experts:   # its scale groups name a plain MLP's linears
      raise ValueError("LlamaBlocks: a mixture-of-experts config is not supported; "
                       "jq.ptq.quantize_model finds the blocks of any decoder itself")

  @property
  def num_blocks(self) -> int:
    return self.config.num_layers

  def block_key(self, i: int) -> str:
    return f"layers_{i}"

  def embed(self, params: dict[str, Any], tokens: jax.Array) -> jax.Array:
    return jnp.take(params["embed"]["embedding"], tokens, axis=0).astype(self.config.dtype)

  def apply_block(self, block_params: dict[str, Any], x: jax.Array) -> jax.Array:
    positions = jnp.arange(x.shape[1], dtype=jnp.int32)
    y, _ = decoder.Block(self.config).apply({"params": block_params}, x, positions)
    return y

  def scale_groups(self) -> tuple[ScaleGroup, ...]:
    c = self.config
    groups = [
        ScaleGroup(prev="input_norm/scale", prev_kind="norm",
                   consumers=("attn/q_proj/kernel", "attn/k_proj/kernel", "attn/v_proj/kernel")),
        ScaleGroup(prev="post_attn_norm/scale", prev_kind="norm",
                   consumers=("mlp/gate_proj/kernel", "mlp/up_proj/kernel"),
                   block_fn=swiglu_output),
        ScaleGroup(prev="mlp/up_proj/kernel", prev_kind="linear",
                   consumers=("mlp/down_proj/kernel",)),
    ]
    if c.num_kv_heads == c.num_heads:  # with GQA, v_proj columns feed several heads' o_proj rows
      groups.append(ScaleGroup(prev="attn/v_proj/kernel", prev_kind="linear",
                               consumers=("attn/o_proj/kernel",)))
    return tuple(groups)


def onload_blocks(config: decoder.DecoderConfig):
  """``jq.ptq.onload.OnloadBlocks`` of a decoder: the embedding lookup and each block alone
  (``decoder.OneBlock``), for calibration with one block resident at a time."""
  from jq.ptq.onload import OnloadBlocks
  return OnloadBlocks(
      prefixes=tuple(f"params/layers_{i}" for i in range(config.num_layers)),
      embed_paths=("params/embed/embedding",),
      embed=lambda leaves, tokens: decoder.embed_lookup(
          config, leaves["params/embed/embedding"], tokens),
      module=lambda i: decoder.OneBlock(config, i))
