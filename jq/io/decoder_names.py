"""The one tensor-name mapping of decoder-only LMs: jq param path <-> Hugging Face <-> GGUF.

jq's decoder tree (``models/decoder.py``) names a block's tensors ``layers_{i}/attn/q_proj/kernel``
and so on; Hugging Face names them ``model.layers.{i}.self_attn.q_proj.weight`` (a linear's weight
is ``(out, in)``, jq's kernel ``(in, out)``) and llama.cpp ``blk.{i}.attn_q.weight``. The families
differ only in which tensors exist (biases, q/k norms, Gemma 2/3's four norms per block, an untied
head), so one table serves all of them; :func:`decoder_tensors` lists the tensors of one config.
A mixture-of-experts MLP (Mixtral, Qwen2/3-MoE, OLMoE) has a router, one module per expert and
perhaps a shared expert (:func:`moe_modules`; Hugging Face names per the config's ``moe_names``);
llama.cpp stacks the experts' projections into one tensor each (``blk.{i}.ffn_gate_exps.weight``,
numpy ``(E, out, in)``), so an expert's :class:`TensorName` has an ``expert`` index into it.
Phi-3 stores q/k/v as one ``self_attn.qkv_proj`` and gate/up as one ``mlp.gate_up_proj``
(``fused_projections``): jq keeps its separate modules, each a :class:`TensorName` with the
``rows`` of the fused tensor that are its own.

Gemma 2/3 naming: Hugging Face's ``post_attention_layernorm`` is the attention *output's* norm
(jq ``attn_out_norm``, GGUF ``post_attention_norm``) and ``pre_feedforward_layernorm`` the MLP
input's (jq ``post_attn_norm``, GGUF ``ffn_norm``); in the other families
``post_attention_layernorm`` is the MLP input's norm.
"""
from __future__ import annotations

import dataclasses
from typing import Any

# block-relative jq module path -> (Hugging Face module, GGUF tensor stem)
LINEARS = {
    ("attn", "q_proj"): ("self_attn.q_proj", "attn_q"),
    ("attn", "k_proj"): ("self_attn.k_proj", "attn_k"),
    ("attn", "v_proj"): ("self_attn.v_proj", "attn_v"),
    ("attn", "o_proj"): ("self_attn.o_proj", "attn_output"),
    ("mlp", "gate_proj"): ("mlp.gate_proj", "ffn_gate"),
    ("mlp", "up_proj"): ("mlp.up_proj", "ffn_up"),
    ("mlp", "down_proj"): ("mlp.down_proj", "ffn_down"),
}
_NORMS = {("input_norm",): ("input_layernorm", "attn_norm")}
_PLAIN_NORMS = {("post_attn_norm",): ("post_attention_layernorm", "ffn_norm")}
_SANDWICH_NORMS = {
    ("attn_out_norm",): ("post_attention_layernorm", "post_attention_norm"),
    ("post_attn_norm",): ("pre_feedforward_layernorm", "ffn_norm"),
    ("mlp_out_norm",): ("post_feedforward_layernorm", "post_ffw_norm"),
}
_QK_NORMS = {("attn", "q_norm"): ("self_attn.q_norm", "attn_q_norm"),
             ("attn", "k_norm"): ("self_attn.k_norm", "attn_k_norm")}
GLOBALS = {
    ("embed", "embedding"): ("model.embed_tokens.weight", "token_embd.weight", False),
    ("final_norm", "scale"): ("model.norm.weight", "output_norm.weight", False),
    ("lm_head", "kernel"): ("lm_head.weight", "output.weight", True),
}


# Hugging Face model_type (or a GGUF architecture, unchanged) -> llama.cpp architecture
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "qwen2",
             "qwen3": "qwen3", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe",
             "qwen2moe": "qwen2moe", "qwen3moe": "qwen3moe", "olmo2": "olmo2", "olmo3": "olmo2",
             "olmoe": "olmoe", "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3",
             "gemma3": "gemma3", "phi3": "phi3"}

# llama.cpp architectures that store q/k/v as one ``attn_qkv`` and gate/up as one ``ffn_up``
# (rows [gate; up]): their tensors are named as a ``fused_projections`` config's
GGUF_FUSED = frozenset({"phi3"})


# the decoder features each llama.cpp architecture fixes (whatever the file holds); the rest
# (qwen2moe's biases, Gemma's query scale and sliding pattern) come from the file or the layer
# count, in the GGUF reader and the exporter's checks
_GEMMA_FEATURES = dict(embed_scale=True, activation="gelu_tanh")
GGUF_FEATURES = {
    "qwen2": dict(qkv_bias=True), "qwen3": dict(qk_norm=True), "qwen3moe": dict(qk_norm=True),
    "olmo2": dict(qk_norm=True, qk_norm_full=True, pre_norms=False, sandwich_norms=True),
    "olmoe": dict(qk_norm=True, qk_norm_full=True),
    "gemma": _GEMMA_FEATURES, "gemma2": dict(_GEMMA_FEATURES, sandwich_norms=True),
    "gemma3": dict(_GEMMA_FEATURES, sandwich_norms=True, qk_norm=True)}


@dataclasses.dataclass(frozen=True)
class GGUFMoE:
  """How llama.cpp runs one architecture's mixture of experts (experts in every layer).

  Attributes:
    normalize: the top-k routing weights are renormalized to sum to 1.
    shared: a shared expert gated by ``sigmoid(ffn_gate_inp_shexp · x)`` (Qwen2-MoE).
    ff_width: an expert's width is ``feed_forward_length`` (else ``expert_feed_forward_length``).
    always: the architecture is always a mixture (``llama`` is one only with ``expert_count``).
  """
  normalize: bool
  shared: bool = False
  ff_width: bool = False
  always: bool = True


# llama.cpp architecture -> its mixture of experts (``llama``: Mixtral)
GGUF_MOE = {"llama": GGUFMoE(normalize=True, ff_width=True, always=False),
            "qwen2moe": GGUFMoE(normalize=False, shared=True),
            "qwen3moe": GGUFMoE(normalize=True),
            "olmoe": GGUFMoE(normalize=False, ff_width=True)}


@dataclasses.dataclass(frozen=True)
class TensorName:
  """One tensor of a decoder under its three names.

  Attributes:
    path: the jq param path (inside ``params``), e.g. ``("layers_0", "attn", "q_proj", "kernel")``.
    hf: the Hugging Face safetensors name.
    gguf: the GGUF tensor name.
    transpose: jq's array is the transpose of the Hugging Face / GGUF-as-numpy one (linears).
    qk: ``"q"`` / ``"k"`` for the Q and K projection weights (llama.cpp permutes their rows for its
      interleaved RoPE in the ``llama`` architecture), else ``None``.
    expert: for an expert's projection, its index along axis 0 of the stacked GGUF tensor
      ``gguf`` (which holds every expert of the layer), else ``None``.
    rows: for a projection the checkpoint fuses with its siblings (Phi-3's ``qkv_proj``,
      ``gate_up_proj``; ``DecoderConfig.fused_projections``), the ``[start, stop)`` rows of the
      fused Hugging Face / GGUF-as-numpy tensor (its output features) that are this one, else
      ``None``.
    fused_rows: with ``rows``, the fused tensor's row count (its siblings' rows together).
  """
  path: tuple[str, ...]
  hf: str
  gguf: str
  transpose: bool
  qk: str | None = None
  expert: int | None = None
  rows: tuple[int, int] | None = None
  fused_rows: int | None = None

  @property
  def jq(self) -> str:
    return "/".join(self.path)


def decoder_tensors(config: Any) -> list[TensorName]:
  """Every tensor a decoder with ``config`` has (a ``DecoderConfig``, or any object with its
  attribute names: ``num_layers``, ``tie_embeddings`` and the optional family flags
  ``qkv_bias``, ``o_bias``, ``mlp_bias``, ``qk_norm``, ``sandwich_norms``, ``pre_norms`` (default
  True), ``fused_projections`` (with the sizes: the parts' rows) and mixture-of-experts fields
  ``num_experts``, ``moe_layers``, ``shared_expert_size``, ``moe_names``)."""
  flag = lambda name: bool(getattr(config, name, False))
  out = [TensorName(path, hf, gg, t) for path, (hf, gg, t) in GLOBALS.items()
         if path[0] != "lm_head" or not config.tie_embeddings]
  bias = {"q_proj": flag("qkv_bias"), "k_proj": flag("qkv_bias"), "v_proj": flag("qkv_bias"),
          "o_proj": flag("o_bias"), "gate_proj": flag("mlp_bias"), "up_proj": flag("mlp_bias"),
          "down_proj": flag("mlp_bias")}
  norms = {**_NORMS, **(_SANDWICH_NORMS if flag("sandwich_norms") else _PLAIN_NORMS),
           **(_QK_NORMS if flag("qk_norm") else {})}
  if not getattr(config, "pre_norms", True):   # OLMo 2: the attention's and MLP's outputs only
    norms = {k: v for k, v in norms.items() if k not in (("input_norm",), ("post_attn_norm",))}
  fused = _fused_rows(config) if flag("fused_projections") else {}
  for i in range(config.num_layers):
    blk, hf_pre, gg_pre = f"layers_{i}", f"model.layers.{i}.", f"blk.{i}."
    moe = is_moe(config, i)
    for (mod, name), (hf, gg) in LINEARS.items():
      if moe and mod == "mlp":
        continue
      qk = {"q_proj": "q", "k_proj": "k"}.get(name)
      hf, gg, rows, total = fused.get((mod, name), (hf, gg, None, None))
      out.append(TensorName((blk, mod, name, "kernel"), f"{hf_pre}{hf}.weight",
                            f"{gg_pre}{gg}.weight", True, qk, rows=rows, fused_rows=total))
      if bias[name]:
        out.append(TensorName((blk, mod, name, "bias"), f"{hf_pre}{hf}.bias",
                              f"{gg_pre}{gg}.bias", False, qk, rows=rows, fused_rows=total))
    if moe:
      for path, hf in moe_modules(config):
        gg, expert = _moe_gguf(path)
        out.append(TensorName((blk, "mlp") + path + ("kernel",), f"{hf_pre}{hf}.weight",
                              f"{gg_pre}{gg}.weight", True, expert=expert))
    for path, (hf, gg) in norms.items():
      out.append(TensorName((blk,) + path + ("scale",), f"{hf_pre}{hf}.weight",
                            f"{gg_pre}{gg}.weight", False))
  return out


# fused projections (Phi-3): the fused module -> its parts, in row order
FUSED = {("self_attn.qkv_proj", "attn_qkv"): (("attn", "q_proj"), ("attn", "k_proj"),
                                              ("attn", "v_proj")),
         ("mlp.gate_up_proj", "ffn_up"): (("mlp", "gate_proj"), ("mlp", "up_proj"))}


def _fused_rows(config: Any) -> dict[tuple[str, str], tuple[str, str, tuple[int, int], int]]:
  """Block-relative jq module -> ``(Hugging Face module, GGUF stem, rows, fused rows)`` of the
  projections a ``fused_projections`` checkpoint stores together."""
  out = {}
  for (hf, gg), parts in FUSED.items():
    widths = [expected_shape(("layers_0",) + p + ("kernel",), config)[1] for p in parts]
    start = 0
    for p, w in zip(parts, widths):
      out[p] = (hf, gg, (start, start + w), sum(widths))
      start += w
  return out


# a mixture-of-experts MLP's linears (block-relative jq module under "mlp" -> Hugging Face
# module), by the config's ``moe_names``
_EXPERT_HF = {"qwen": ("mlp", {"gate_proj": "gate_proj", "up_proj": "up_proj",
                               "down_proj": "down_proj"}),
              "mixtral": ("block_sparse_moe", {"gate_proj": "w1", "up_proj": "w3",
                                               "down_proj": "w2"})}


def is_moe(config: Any, layer: int) -> bool:
  """Whether ``layer``'s MLP is a mixture of experts (``num_experts``, ``moe_layers``)."""
  layers = getattr(config, "moe_layers", None)
  return bool(getattr(config, "num_experts", 0)) and (layers is None or bool(layers[layer]))


def moe_modules(config: Any) -> list[tuple[tuple[str, ...], str]]:
  """``(jq module path under the block's "mlp", Hugging Face module under the block)`` of every
  linear of a mixture-of-experts MLP: the router, each expert's three projections, and a shared
  expert with its gate (``shared_expert_size``)."""
  prefix, proj = _EXPERT_HF[config.moe_names]
  out = [(("router",), f"{prefix}.gate")]
  for e in range(config.num_experts):
    out += [((f"experts_{e}", name), f"{prefix}.experts.{e}.{hf}") for name, hf in proj.items()]
  if getattr(config, "shared_expert_size", 0):
    out += [(("shared_expert", name), f"{prefix}.shared_expert.{name}")
            for name in ("gate_proj", "up_proj", "down_proj")]
    out.append((("shared_expert_gate",), f"{prefix}.shared_expert_gate"))
  return out


_MOE_GGUF = {"router": "ffn_gate_inp", "shared_expert_gate": "ffn_gate_inp_shexp"}


def _moe_gguf(path: tuple[str, ...]) -> tuple[str, int | None]:
  """``(GGUF stem, expert index)`` of a mixture-of-experts module under the block's ``mlp``: the
  router ``ffn_gate_inp``, expert ``e``'s ``gate_proj`` row ``e`` of ``ffn_gate_exps`` (up,
  down likewise), the shared expert's ``ffn_gate_shexp`` ... and its gate
  ``ffn_gate_inp_shexp``."""
  if len(path) == 1:
    return _MOE_GGUF[path[0]], None
  stem = {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[path[1]]
  if path[0] == "shared_expert":
    return f"{stem}_shexp", None
  return f"{stem}_exps", int(path[0].removeprefix("experts_"))


def expected_shape(path: tuple[str, ...], config: Any) -> tuple[int, ...]:
  """The jq-side shape of the param at ``path`` for a decoder with ``config``."""
  c = config
  q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  sizes = {"q_proj": (c.hidden_size, q), "k_proj": (c.hidden_size, kv),
           "v_proj": (c.hidden_size, kv), "o_proj": (q, c.hidden_size),
           "gate_proj": (c.hidden_size, c.intermediate_size),
           "up_proj": (c.hidden_size, c.intermediate_size),
           "down_proj": (c.intermediate_size, c.hidden_size),
           "lm_head": (c.hidden_size, c.vocab_size)}
  if path[-1] == "embedding":
    return (c.vocab_size, c.hidden_size)
  if path[-1] == "kernel" and path[1:2] == ("mlp",) and (
      len(path) == 5 or path[-2] in ("router", "shared_expert_gate")):   # a mixture of experts
    width = {"shared_expert": getattr(c, "shared_expert_size", 0)}.get(
        path[-3], getattr(c, "expert_size", None) or c.intermediate_size)
    moe = {"router": (c.hidden_size, getattr(c, "num_experts", 0)),
           "shared_expert_gate": (c.hidden_size, 1),
           "gate_proj": (c.hidden_size, width), "up_proj": (c.hidden_size, width),
           "down_proj": (width, c.hidden_size)}
    return moe[path[-2]]
  if path[-1] == "kernel":
    return sizes[path[-2]]
  if path[-1] == "bias":
    return (sizes[path[-2]][1],)
  if path[-2] in ("q_norm", "k_norm"):
    if not getattr(c, "qk_norm_full", False):
      return (c.head_dim,)
    return (q,) if path[-2] == "q_norm" else (kv,)
  return (c.hidden_size,)


__all__ = ["TensorName", "FUSED", "GGUFMoE", "GGUF_MOE", "GGUF_FEATURES", "GGUF_FUSED", "GGUF_ARCH",
           "GLOBALS",
           "LINEARS", "decoder_tensors", "is_moe", "moe_modules", "expected_shape"]
