"""GPT-2 style byte-level BPE tokenizer rebuilt from GGUF metadata with the ``tokenizers`` library.

Reads ``tokenizer.ggml.{model,pre,tokens,token_type,merges,bos_token_id,eos_token_id,...}``.
Pre-tokenization follows llama.cpp's table for ``tokenizer.ggml.pre``: ``smollm`` (and starcoder,
refact, codeshell, ...) splits every digit on its own, then applies the GPT-2 regex
(``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)``); ``gpt2`` uses
the GPT-2 regex alone. Control and user-defined tokens (``<|im_start|>``, ...) are matched whole.

Example::

  tok = load_tokenizer()
  ids = tok.encode("Hello world")          # [19556, 905]
  tok.decode(ids)                          # "Hello world"
  prompt = tok.encode(chat_prompt([{"role": "user", "content": "Hi!"}]))
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from models import fetch
from models.gguf_weights import GGUFError, open_gguf

# llama.cpp pre-tokenizer names whose regexes are "\p{N}" (single digits) + the GPT-2 regex.
_DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_GPT2_PRE = ("gpt2", "default", "mpt", "olmo", "jais")
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


class Tokenizer:
  """A ``tokenizers.Tokenizer`` plus the special ids and chat template its checkpoint declares
  (built from GGUF metadata here, or from ``tokenizer.json`` by ``models.hf``).

  Attributes:
    backend: the underlying ``tokenizers.Tokenizer``.
    bos_id, eos_id, pad_id: special token ids (``None`` when the checkpoint does not declare one).
    add_bos: whether the model expects BOS at the start of a sequence (``encode`` default).
    stop_ids: ids that end generation (the EOS id, or ``generation_config.json``'s list).
    chat_template: the checkpoint's Jinja chat template, or ``None``.
  """

  def __init__(self, backend: tokenizers.Tokenizer, *, bos_id: int | None, eos_id: int | None,
               pad_id: int | None = None, add_bos: bool = False, stop_ids: Sequence[int] = (),
               chat_template: str | None = None):
    self.backend = backend
    self.bos_id = bos_id
    self.eos_id = eos_id
    self.pad_id = pad_id
    self.add_bos = add_bos
    self.stop_ids = tuple(stop_ids) or (() if eos_id is None else (eos_id,))
    self.chat_template = chat_template

  def apply_chat_template(self, messages: Sequence[Mapping[str, str]], *,
                          add_generation_prompt: bool = True) -> str:
    """The checkpoint's own chat template rendered (Jinja, sandboxed, as transformers does);
    ChatML with SmolLM2's system prompt when the checkpoint has no template."""
    if self.chat_template is None:
      return chat_prompt(messages, add_generation_prompt=add_generation_prompt)
    return render_chat_template(
        self.chat_template, messages, add_generation_prompt=add_generation_prompt,
        bos_token=self._token(self.bos_id), eos_token=self._token(self.eos_id))

  def _token(self, i: int | None) -> str:
    return "" if i is None else (self.backend.id_to_token(int(i)) or "")

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
    """Token ids of ``text``; special tokens written in the text (``<|im_end|>``) map to their id.

    ``add_bos`` defaults to the GGUF's ``tokenizer.ggml.add_bos_token`` (False for SmolLM2).
    """
    ids = self.backend.encode(text, add_special_tokens=False).ids
    add_bos = self.add_bos if add_bos is None else add_bos
    if add_bos:
      if self.bos_id is None:
        raise ValueError("encode(add_bos=True): this tokenizer has no BOS token")
      ids = [self.bos_id] + ids
    return ids

  def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
    """Text of ``ids`` (byte-level decoding; invalid UTF-8 becomes U+FFFD)."""
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def id_to_token(self, i: int) -> str | None:
    return self.backend.id_to_token(int(i))


def chat_prompt(messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True,
                default_system: str | None = DEFAULT_SYSTEM) -> str:
  """ChatML text, as SmolLM2's chat template renders it.

  A system message ``default_system`` is prepended when the first message is not a system one
  (``None`` to skip). Each message becomes ``<|im_start|>{role}\\n{content}<|im_end|>\\n``;
  ``add_generation_prompt`` appends ``<|im_start|>assistant\\n``.
  """
  parts = []
  for i, m in enumerate(messages):
    if not {"role", "content"} <= set(m):
      raise ValueError(f"chat_prompt: message {i} needs 'role' and 'content' keys, got {sorted(m)}")
    if i == 0 and m["role"] != "system" and default_system is not None:
      parts.append(f"<|im_start|>system\n{default_system}<|im_end|>\n")
    parts.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
  if add_generation_prompt:
    parts.append("<|im_start|>assistant\n")
  return "".join(parts)


def render_chat_template(template: str, messages: Sequence[Mapping[str, str]], *,
                         add_generation_prompt: bool = True, **special: str) -> str:
  """Renders a Hugging Face / GGUF chat template (Jinja) in a sandbox, with transformers'
  environment settings (``trim_blocks``, ``lstrip_blocks``, ``raise_exception``).

  Raises:
    ValueError: the template does not parse, or raises for these messages.
  """
  import datetime

  import jinja2
  from jinja2 import sandbox

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                              extensions=["jinja2.ext.loopcontrols"])
  env.filters["tojson"] = lambda x, indent=None, **_: __import__("json").dumps(
      x, ensure_ascii=False, indent=indent)
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  try:
    return env.from_string(template).render(messages=[dict(m) for m in messages],
                                            add_generation_prompt=add_generation_prompt,
                                            **special)
  except jinja2.exceptions.TemplateError as e:
    raise ValueError(f"chat template: {e}") from e


def _field(reader, key: str, default=None, *, required: bool = False):
  if key not in reader.fields:
    if required:
      raise GGUFError(f"GGUF metadata key {key!r} is missing (no tokenizer in this file?)")
    return default
  return reader.fields[key].contents()


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre in _DIGIT_SPLIT_PRE:
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  if pre in _GPT2_PRE:
    return byte_level
  raise GGUFError(f"GGUF tokenizer.ggml.pre={pre!r} is not supported; known: "
                  f"{', '.join(_DIGIT_SPLIT_PRE + _GPT2_PRE)}")


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
  """The tokenizer stored in a GGUF file; ``path=None`` uses the cached SmolLM2 GGUF.

  Raises:
    FileNotFoundError, GGUFError: missing/corrupt file, or a tokenizer that is not byte-level BPE
      (``tokenizer.ggml.model`` other than ``gpt2``) or has an unknown pre-tokenizer.
  """
  reader = open_gguf(fetch.fetch(fetch.SMOLLM2_GGUF) if path is None else path)
  kind = _field(reader, "tokenizer.ggml.model", required=True)
  if kind != "gpt2":
    raise GGUFError(f"GGUF tokenizer.ggml.model={kind!r} is not supported; only 'gpt2' (byte-level "
                    "BPE) is")
  tokens = _field(reader, "tokenizer.ggml.tokens", required=True)
  merges = _field(reader, "tokenizer.ggml.merges", required=True)
  types = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
  if len(types) != len(tokens):
    raise GGUFError(f"GGUF tokenizer: {len(tokens)} tokens but {len(types)} token types")
  vocab = {t: i for i, t in enumerate(tokens)}
  if len(vocab) != len(tokens):
    raise GGUFError("GGUF tokenizer.ggml.tokens has duplicate entries")
  pairs = []
  for m in merges:
    a, sep, b = m.partition(" ")
    if not sep or not a or not b:
      raise GGUFError(f"GGUF tokenizer.ggml.merges: malformed merge {m!r}")
    pairs.append((a, b))
  backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False,
                                            byte_fallback=False))
  backend.pre_tokenizer = _pre_tokenizer(_field(reader, "tokenizer.ggml.pre", "default"))
  backend.decoder = decoders.ByteLevel()
  special = [tokenizers.AddedToken(tokens[i], special=True, normalized=False)
             for i, t in enumerate(types) if t == _CONTROL]
  user = [tokenizers.AddedToken(tokens[i], special=False, normalized=False)
          for i, t in enumerate(types) if t == _USER_DEFINED]
  backend.add_special_tokens(special)
  if user:
    backend.add_tokens(user)

  def opt_id(key: str) -> int | None:
    v = _field(reader, key)
    return None if v is None else int(v)

  return Tokenizer(backend, bos_id=opt_id("tokenizer.ggml.bos_token_id"),
                   eos_id=opt_id("tokenizer.ggml.eos_token_id"),
                   pad_id=opt_id("tokenizer.ggml.padding_token_id"),
                   add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
                   chat_template=_field(reader, "tokenizer.chat_template"))
