"""The models the ``jq-quant`` command knows, loaded behind one small interface.

* ``smollm2``: SmolLM2-135M-Instruct, a linen Llama decoder (causal LM; quality = perplexity/KL).
* ``minilm``: all-MiniLM-L6-v2, an nnx BERT encoder (quality = cosine similarity of embeddings).
* a path: a Hugging Face checkpoint directory (``config.json`` + safetensors + ``tokenizer.json``)
  of a family ``jq_models.hf`` knows, or a ``.gguf`` file of one ``jq_models.gguf_weights`` knows; both
  run on ``jq_models.decoder``.

Every model has a ``source`` (a JSON-able dict) that checkpoints record, so ``load_source`` finds
the float model again for ``eval``, ``generate`` and ``export``, and checks it is the same one: its
config, and for a path a fingerprint of its weight files (:func:`weights_fingerprint`).

Evaluation text is the held-out split of ``jq_models.text``; calibration uses the disjoint split.
"""
from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

MODELS = ("smollm2", "minilm")
DEFAULT_MODEL = "smollm2"


@dataclasses.dataclass
class CausalLM:
  """A linen causal LM: ``module.apply({"params": params}, tokens) -> logits``."""
  name: str
  config: Any
  module: Any
  params: dict[str, Any]
  tokenizer: Any
  blocks: Any = None
  gguf_path: Any = None
  source: dict[str, Any] = dataclasses.field(default_factory=dict)
  kind: str = "causal_lm"

  @property
  def variables(self) -> dict[str, Any]:
    return {"params": self.params}

  def eval_tokens(self) -> np.ndarray:
    from jq_models import text
    return np.asarray(self.tokenizer.encode(text.eval_text()), np.int32)

  def calibration_tokens(self, sequences: int, length: int, source: str = "news") -> np.ndarray:
    """``(sequences, length)`` consecutive windows of ``source`` (see :func:`calibration_tokens`)."""
    return calibration_tokens(self.tokenizer, sequences, length, source)

  def prompt_ids(self, prompt: str, *, chat: bool = True) -> np.ndarray:
    """Token ids of ``prompt``, wrapped in the checkpoint's own chat template when ``chat``."""
    if not chat:
      return np.asarray(self.tokenizer.encode(prompt), np.int32)
    text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    ids = self.tokenizer.encode(text, add_bos=False)
    if self.tokenizer.add_bos and (not ids or ids[0] != self.tokenizer.bos_id):
      ids = [self.tokenizer.bos_id] + ids  # the template did not write BOS itself
    return np.asarray(ids, np.int32)

  def generate(self, apply_fn, variables, prompt_ids: np.ndarray, max_new_tokens: int, *,
               progress: bool = False, kv_cache: str = "none") -> np.ndarray:
    """Greedy continuation; ``kv_cache``: ``"none"``, ``"int8"`` or ``"fp8"`` (``jq.kv_cache``)."""
    from jq_models import decoder
    return np.asarray(decoder.greedy_generate(apply_fn, variables, prompt_ids, max_new_tokens,
                                              config=self.config, eos_id=self.tokenizer.eos_id,
                                              progress=progress, kv_cache=kv_cache))


CALIBRATION_SOURCES = ("news", "shakespeare")


def calibration_text(source: str = "news") -> str:
  """The calibration text: ``"news"`` (the calibration split of the bundled news articles,
  disjoint from the evaluation split), ``"shakespeare"`` (Hamlet, Macbeth and King Lear) or the
  path of a UTF-8 text file.

  Raises:
    ValueError: an unknown source that is not a readable file (naming it).
  """
  from jq_models import text
  if source == "news":
    return text.calibration_text()
  if source == "shakespeare":
    return "\n".join(text.shakespeare_text(p) for p in
                     ("hamlet_gut.txt", "macbeth_gut.txt", "lear_gut.txt"))
  path = Path(source)
  if not path.is_file():
    raise ValueError(f"calibration text {source!r}: not one of {list(CALIBRATION_SOURCES)} and "
                     "not a file")
  try:
    return path.read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f"calibration text {source}: {e}") from e


def calibration_tokens(tokenizer, sequences: int, length: int, source: str = "news"
                       ) -> np.ndarray:
  """``(sequences, length)`` consecutive windows of :func:`calibration_text`, tokenized."""
  if sequences < 1 or length < 2:
    raise ValueError(f"calibration needs sequences >= 1 and length >= 2, got {sequences}x{length}")
  ids = np.asarray(tokenizer.encode(calibration_text(source)), np.int32)
  if sequences * length > len(ids):
    raise ValueError(f"calibration text ({source}) has {len(ids)} tokens, fewer than the "
                     f"{sequences}x{length} asked for")
  return ids[:sequences * length].reshape(sequences, length)


@dataclasses.dataclass
class Encoder:
  """An nnx sentence encoder; ``embed(module, sentences) -> (N, d)`` unit vectors."""
  name: str
  config: Any
  module: Any
  tokenizer: Any
  kind: str = "encoder"

  def embed(self, module, sentences: Sequence[str]) -> np.ndarray:
    from jq_models import minilm
    return minilm.embed_sentences(module, self.tokenizer, sentences)

  def calibration_batches(self, n: int = 128, batch_size: int = 16) -> list[tuple]:
    """Calibration inputs from the calibration split (disjoint from the evaluation sentences)."""
    from jq_models import minilm, text
    return minilm.calibration_batches(self.tokenizer, text.sentences(n, split="calib"),
                                      batch_size=batch_size)

  def eval_sentences(self, n: int = 256) -> list[str]:
    from jq_models import text
    return text.sentences(n, split="eval")


def truncated(model: CausalLM, blocks: int) -> CausalLM:
  """The first ``blocks`` decoder blocks of a loaded SmolLM2-style (``layers_i``) model, with
  their real weights, the embedding, final norm and head: a small real model for smoke runs."""
  from jq_models import blockwise  # pylint: disable=import-outside-toplevel
  n = model.config.num_layers
  if not 0 < blocks <= n:
    raise ValueError(f"truncated: blocks={blocks} must be in 1..{n} for {model.name}")
  cfg = dataclasses.replace(model.config, num_layers=blocks)
  keep = lambda k: not k.startswith("layers_") or int(k.split("_")[1]) < blocks
  return CausalLM(name=f"{model.name}-{blocks}blocks", config=cfg, module=decoder_module(cfg),
                  params={k: v for k, v in model.params.items() if keep(k)},
                  tokenizer=model.tokenizer, blocks=blockwise.LlamaBlocks(cfg))


def load(name: str, *, place: Callable[[Any], Any] | None = None,
         weights: bool = True) -> CausalLM | Encoder:
  """Loads a known model by name, or a checkpoint by path (see the module docstring).

  ``place``: a causal LM's parameter tree goes through it (e.g. ``PTQConfig.split``, which splits
  it over a mesh's devices); a Hugging Face checkpoint's tensors reach it as NumPy arrays, so they
  go straight into their shards, never whole onto one device.  ``weights=False``: a checkpoint
  path's parameters are only their shapes (``jax.ShapeDtypeStruct``), none read, for work that
  needs the model's config, tokenizer and tree but not its float weights (exporting or running a
  quantized checkpoint of a model bigger than memory).

  Raises:
    ValueError: neither a known name nor a supported checkpoint path (``jq_models.hf.CheckpointError``
      and ``jq_models.gguf_weights.GGUFError`` are ValueErrors naming the file and field).
    FileNotFoundError: a path that does not exist.
  """
  if name == "smollm2":
    from jq_models import blockwise, fetch, gguf_weights, tokenizer
    path = fetch.fetch(fetch.SMOLLM2_GGUF)
    config, params = gguf_weights.load_smollm2(path)
    return CausalLM(name=name, config=config, module=decoder_module(config),
                    params=params if place is None else place(params),
                    tokenizer=tokenizer.load_tokenizer(path), blocks=blockwise.LlamaBlocks(config),
                    gguf_path=path, source={"kind": "bundled", "name": name})
  if name == "minilm":
    from jq_models import minilm
    module, tok = minilm.load_minilm()
    return Encoder(name=name, config=module.config, module=module, tokenizer=tok)
  path = Path(name)
  if path.is_dir():
    return _load_hf(path, place, weights)
  if path.is_file() and path.suffix == ".gguf":
    return _load_gguf(path, place, weights)
  if path.exists():
    raise ValueError(f"{name}: not a model jq knows how to load (expected a Hugging Face "
                     "checkpoint directory with config.json, or a .gguf file)")
  if "/" in name or name.endswith(".gguf"):
    raise FileNotFoundError(f"{name}: no such file or directory")
  raise ValueError(f"unknown model {name!r}; choose one of {list(MODELS)}, or pass a path to a "
                   "Hugging Face checkpoint directory or a .gguf file")


def decoder_module(config):
  """The linen module for a decoder config."""
  from jq_models import decoder
  return decoder.Decoder(config)


def _check_vocab(tok, config, where: str) -> None:
  """A tokenizer with ids past the embedding table would be clamped silently by the lookup."""
  if tok.vocab_size > config.vocab_size:
    raise ValueError(f"{where}: the tokenizer has {tok.vocab_size} tokens but the model's "
                     f"vocabulary has {config.vocab_size} rows; ids past it have no embedding "
                     "(a tokenizer from another model?)")


FINGERPRINT_SAMPLES, FINGERPRINT_CHUNK = 64, 4096


def weights_fingerprint(files: Sequence[Path]) -> dict[str, str]:
  """File name -> a digest of its size, its first 64 KiB (a safetensors / GGUF header) and
  ``FINGERPRINT_SAMPLES`` evenly spaced ``FINGERPRINT_CHUNK``-byte samples of the rest: weights
  changed in place (same shapes, so the same header) show, a copy (other times) does not, and it
  reads ~320 KiB per file."""
  out = {}
  for f in files:
    size = f.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(f, "rb") as fh:
      h.update(fh.read(1 << 16))
      for i in range(FINGERPRINT_SAMPLES):
        fh.seek(size * i // FINGERPRINT_SAMPLES)
        h.update(fh.read(FINGERPRINT_CHUNK))
    out[f.name] = h.hexdigest()
  return out


def hf_source(path: str | Path) -> tuple[Any, dict[str, Any]]:
  """``(config, source record)`` of a Hugging Face checkpoint directory, reading no weights (the
  tokenizer is read and checked against the vocabulary)."""
  from jq_models import hf
  path = Path(path)
  if not (path / "config.json").is_file():
    raise ValueError(f"{path}: a directory without config.json is not a Hugging Face checkpoint")
  raw = hf.read_json(path / "config.json")
  config = hf.family_config(raw, where=str(path / "config.json"))
  tok = hf.load_tokenizer(path)
  _check_vocab(tok, config, f"{path / 'tokenizer.json'} vs {path / 'config.json'} vocab_size")
  return config, {"kind": "hf", "path": str(path.resolve()), "family": raw.get("model_type"),
                  "config": config.to_json(),
                  "weights": weights_fingerprint(sorted(set(hf.weight_files(path).values())))}


def _shapes_only(config) -> dict[str, Any]:
  """A decoder's parameter tree as shapes and dtypes, no array made (``weights=False``)."""
  import jax
  tokens = jax.ShapeDtypeStruct((1, 8), jax.numpy.int32)
  return jax.eval_shape(decoder_module(config).init, jax.random.key(0), tokens)["params"]


def _load_hf(path: Path, place=None, weights: bool = True) -> CausalLM:
  import jax
  from jq_models import hf
  config, source = hf_source(path)
  if weights:
    _, params = hf.load_weights(path)
    params = jax.tree.map(jax.numpy.asarray, params) if place is None else place(params)
  else:
    params = _shapes_only(config)
  return CausalLM(name=path.resolve().name, config=config, module=decoder_module(config),
                  params=params, tokenizer=hf.load_tokenizer(path), source=source)


def _load_gguf(path: Path, place=None, weights: bool = True) -> CausalLM:
  from jq_models import gguf_weights, tokenizer
  reader = gguf_weights.open_gguf(path)
  config = gguf_weights.read_config(reader)
  if weights:
    params = gguf_weights.read_gguf_params(path, config)
    params = params if place is None else place(params)
  else:
    params = _shapes_only(config)
  tok = tokenizer.load_tokenizer(path)
  _check_vocab(tok, config, f"{path}: tokenizer.ggml.tokens vs the token_embd rows")
  return CausalLM(name=path.stem, config=config, module=decoder_module(config), params=params,
                  tokenizer=tok, gguf_path=path,
                  source={"kind": "gguf", "path": str(path.resolve()),
                          "family": gguf_weights.metadata(reader)["general.architecture"],
                          "config": config.to_json(), "weights": weights_fingerprint([path])})


def load_source(source: dict[str, Any], *, override: str | None = None,
                weights: bool = True) -> CausalLM | Encoder:
  """The float model a checkpoint's ``source`` record names (or ``override``, a name or path, when
  the model has moved); checks that its config is the recorded one.  ``weights``: see
  :func:`load`.

  Raises:
    ValueError: the record is malformed, or the model found has a different config.
    FileNotFoundError: the recorded path is gone and no override was given.
  """
  if not isinstance(source, dict) or source.get("kind") not in ("bundled", "hf", "gguf"):
    raise ValueError(f"checkpoint source record {source!r} is not one jq wrote")
  where = override or (source.get("name") if source["kind"] == "bundled" else source.get("path"))
  if not isinstance(where, str):
    raise ValueError(f"checkpoint source record {source!r} names no model")
  if override is None and source["kind"] != "bundled" and not Path(where).exists():
    raise FileNotFoundError(f"the float model this checkpoint was made from, {where}, is not "
                            "there any more; pass --model PATH to say where it is now")
  model = load(where, weights=weights)
  want = source.get("config")
  have = model.config.to_json() if hasattr(model.config, "to_json") else None
  if want is not None and have is not None and have != want:
    diff = sorted(k for k in set(want) | set(have) if have.get(k) != want.get(k))
    raise ValueError(f"{where}: its config differs from the one the checkpoint was made from "
                     f"(fields {diff})")
  want = source.get("weights")   # (checkpoints before fingerprints: not checked)
  have = (getattr(model, "source", None) or {}).get("weights")
  if want is not None and have is not None:
    changed = sorted(k for k in set(want) | set(have) if have.get(k) != want.get(k))
    if changed:
      raise ValueError(f"{where}: its weights differ from those the checkpoint was made from "
                       f"(files {changed} changed since): compared with them, the checkpoint "
                       "would be measured against another model; pass --model PATH of the "
                       "original")
  return model
