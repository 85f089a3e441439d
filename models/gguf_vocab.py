"""GGUF tokenizer metadata (``tokenizer.ggml.*``) written from a Hugging Face ``tokenizer.json``.

The inverse of :func:`jq_models.tokenizer.tokenizer_from_metadata`, for the two tokenizer kinds
llama.cpp runs for the decoder families here:

* byte-level BPE (``tokenizer.ggml.model = gpt2``: Llama 3, Qwen2/2.5/3, SmolLM2, OLMo, ...): the
  vocabulary and merges as they are, and llama.cpp's pre-tokenizer name read off
  ``tokenizer.json``'s pre-tokenizer: the GPT-2 regex alone (``gpt-2``), single digits then the
  GPT-2 regex (``smollm``), or a ``Split`` by Llama 3's regex (``llama-bpe``; ``dbrx`` where the
  tokenizer re-merges whole-token words, as GPT-4-style ones do) or Qwen2's (``qwen2``);
* SentencePiece BPE with byte fallback (``llama``: Llama 1/2, Mistral, Gemma): the vocabulary with
  a score per piece that ranks the merges as ``tokenizer.json`` does (a piece scores minus the rank
  of its first merge), ``<0xAB>`` tokens typed as bytes, and whether a ``▁`` is prepended.

Anything else is refused, naming what ``tokenizer.json`` holds.  The result is only a proposal:
the caller rebuilds a tokenizer from it and checks that it tokenizes as the checkpoint's own
(:func:`jq_models.tokenizer.tokenization_difference`), since llama.cpp runs it, not transformers.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from jq_models import tokenizer as gguf_tokenizer

# (regex, ignore_merges) -> llama.cpp's name: Llama 3's regex is also GPT-4's (DBRX, Phi-4),
# whose tokenizers re-merge whole-token words
_BYTE_LEVEL_PRE = {(gguf_tokenizer.LLAMA3_SPLIT, True): "llama-bpe",
                   (gguf_tokenizer.LLAMA3_SPLIT, False): "dbrx",
                   (gguf_tokenizer.QWEN2_SPLIT, False): "qwen2"}
_SPACE = "\u2581"


def _kind(node: dict | None) -> str | None:
  return None if node is None else node.get("type")


def _steps(node: dict | None, key: str) -> list[dict]:
  """A ``Sequence`` node's steps, or the node alone."""
  if node is None:
    return []
  return list(node.get(key, [])) if node.get("type") == "Sequence" else [node]


def _byte_level_pre(pre: dict | None, normalizer: dict | None, ignore_merges: bool) -> str:
  """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level ``tokenizer.json``'s pre-tokenizer."""
  steps = _steps(pre, "pretokenizers")
  kinds = [s.get("type") for s in steps]
  norm = [s.get("type") for s in _steps(normalizer, "normalizers")]
  if any(k != "NFC" for k in norm):   # Qwen2's NFC: llama.cpp does not normalize either
    raise ValueError(f"tokenizer.json normalizes with {norm}, which llama.cpp's byte-level "
                     "tokenizer does not do")
  if kinds and kinds[-1] == "ByteLevel" and steps[-1].get("add_prefix_space"):
    raise ValueError("tokenizer.json's ByteLevel pre-tokenizer adds a prefix space, which "
                     "llama.cpp's byte-level tokenizer does not do")
  if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
    return "gpt-2"
  if (kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits")
      and steps[1].get("use_regex", True)):
    return "smollm"
  if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
    split = steps[0]
    regex = (split.get("pattern") or {}).get("Regex")
    if ((regex, ignore_merges) in _BYTE_LEVEL_PRE and split.get("behavior") == "Isolated"
        and not split.get("invert")):
      return _BYTE_LEVEL_PRE[regex, ignore_merges]
  raise ValueError(f"tokenizer.json's pre-tokenizer ({json.dumps(pre)[:300]}, ignore_merges "
                   f"{ignore_merges}) is none of the byte-level ones jq can name for llama.cpp "
                   "(GPT-2's regex, single digits + GPT-2's, Llama 3's or Qwen2's regex)")


def _space_prefix(pre: dict | None, normalizer: dict | None) -> bool:
  """Whether a SentencePiece ``tokenizer.json`` prepends ``▁`` (else refused if it does not
  write spaces as ``▁`` as llama.cpp's SentencePiece tokenizer does)."""
  norm = _steps(normalizer, "normalizers")
  kinds = [s.get("type") for s in norm]
  replaces_space = any(s.get("type") == "Replace" and (s.get("pattern") or {}).get("String") == " "
                       and s.get("content") == _SPACE for s in norm)
  # (Gemma's tokenizer.json also splits on " " after the normalizer: there are none left)
  no_op = pre is None or (pre.get("type") == "Split" and (pre.get("pattern") or {}).get("String")
                          == " " and not pre.get("invert"))
  if replaces_space and no_op:
    return any(k == "Prepend" and s.get("prepend") == _SPACE for k, s in zip(kinds, norm))
  meta = [s for s in _steps(pre, "pretokenizers") if s.get("type") == "Metaspace"]
  if not norm and len(meta) == 1 and meta[0].get("replacement") == _SPACE:
    return meta[0].get("prepend_scheme", "always") != "never"
  raise ValueError(f"tokenizer.json (normalizer {json.dumps(normalizer)[:200]}, pre-tokenizer "
                   f"{json.dumps(pre)[:200]}) does not write spaces as {_SPACE!r} as "
                   "SentencePiece does")


def comparable_texts(tok: gguf_tokenizer.Tokenizer,
                     texts: Sequence[str]) -> tuple[list[str], list[str]]:
  """``texts`` as llama.cpp must tokenize them exactly as ``tok`` does, and notes on what differs
  by design: a ``Metaspace`` pre-tokenizer (Mistral's ``tokenizer.json``, and any transformers
  converts from a SentencePiece model today) prepends no ``▁`` to a text that already starts with
  a space (nor, with ``prepend_scheme="first"``, after a special token), where llama.cpp's
  SentencePiece tokenizer always does (so does every GGUF of such a model): those texts are
  compared without their leading spaces."""
  spec = json.loads(tok.backend.to_str())
  meta = [s for s in _steps(spec.get("pre_tokenizer"), "pretokenizers")
          if s.get("type") == "Metaspace"]
  if not (meta and meta[0].get("prepend_scheme", "always") in ("always", "first")):
    return list(texts), []
  return [t.lstrip(" ") for t in texts], [
      "tokenizer.json's Metaspace prepends '▁' unless the text starts with a space (and, "
      "scheme 'first', only before the first special token); llama.cpp always prepends one: "
      "such a text tokenizes differently there, as in every GGUF of this model"]


def gguf_tokenizer_metadata(tok: gguf_tokenizer.Tokenizer, vocab_size: int) -> dict[str, Any]:
  """``tokenizer.*`` GGUF metadata for ``tok`` (a ``tokenizer.json``'s, as
  ``jq_models.hf.load_tokenizer`` builds it), padded to the model's ``vocab_size`` rows.

  Raises:
    ValueError: a tokenizer llama.cpp cannot run as the checkpoint does (not BPE, an unknown
      pre-tokenizer or normalizer, more tokens than the model has rows); the message says which.
  """
  spec = json.loads(tok.backend.to_str())
  model = spec.get("model") or {}
  if model.get("type") != "BPE":
    raise ValueError(f"tokenizer.json's model is {model.get('type')!r}; GGUF export writes "
                     "BPE tokenizers only (byte-level, or SentencePiece with byte fallback)")
  n = tok.vocab_size
  if n > vocab_size:
    raise ValueError(f"tokenizer.json has {n} tokens, more than the model's vocab_size "
                     f"{vocab_size}")
  added = {int(a["id"]): a for a in spec.get("added_tokens") or []}
  tokens = [tok.backend.id_to_token(i) for i in range(vocab_size)]
  types = [gguf_tokenizer.NORMAL] * vocab_size
  for i, t in enumerate(tokens):
    if t is None:   # ids the tokenizer does not use (the model's padding rows): llama.cpp's way
      tokens[i], types[i] = f"[PAD{i}]", gguf_tokenizer.UNUSED
    elif i in added:
      types[i] = gguf_tokenizer.CONTROL if added[i].get("special") else gguf_tokenizer.USER_DEFINED
  merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
  pre, normalizer = spec.get("pre_tokenizer"), spec.get("normalizer")
  meta: dict[str, Any] = {}
  if model.get("byte_fallback"):
    meta["tokenizer.ggml.model"] = "llama"
    meta["tokenizer.ggml.add_space_prefix"] = _space_prefix(pre, normalizer)
    rank: dict[str, int] = {}
    for r, m in enumerate(merges):
      a, _, b = m.partition(" ")
      rank.setdefault(a + b, r)
    worst = float(len(merges) + 1)
    meta["tokenizer.ggml.scores"] = [-float(rank[t]) if t in rank else -worst for t in tokens]
    unk = model.get("unk_token")
    for i, t in enumerate(tokens):
      if len(t) == 6 and t.startswith("<0x") and t.endswith(">") and i not in added:
        types[i] = gguf_tokenizer.BYTE
      elif unk is not None and t == unk:
        types[i] = gguf_tokenizer.UNKNOWN
        meta["tokenizer.ggml.unknown_token_id"] = i
  else:
    meta["tokenizer.ggml.model"] = "gpt2"
    meta["tokenizer.ggml.pre"] = _byte_level_pre(pre, normalizer,
                                                 bool(model.get("ignore_merges")))
    meta["tokenizer.ggml.merges"] = merges
  meta["tokenizer.ggml.tokens"] = tokens
  meta["tokenizer.ggml.token_type"] = types
  for key, i in (("bos", tok.bos_id), ("eos", tok.eos_id), ("padding", tok.pad_id)):
    if i is not None:
      meta[f"tokenizer.ggml.{key}_token_id"] = int(i)
  meta["tokenizer.ggml.add_bos_token"] = bool(tok.add_bos)
  meta["tokenizer.ggml.add_eos_token"] = bool(tok.add_eos)
  if tok.chat_template:
    meta["tokenizer.chat_template"] = tok.chat_template
  return meta
