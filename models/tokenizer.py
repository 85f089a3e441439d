"""Tokenizers rebuilt from GGUF metadata with the ``tokenizers`` library, as llama.cpp reads them.

Two ``tokenizer.ggml.model`` kinds are supported:

* ``gpt2``: byte-level BPE (SmolLM2, Llama 3/3.1/3.2, Qwen2/2.5/3, ...) from
  ``tokenizer.ggml.{tokens,merges,token_type}``. Pre-tokenization follows llama.cpp's table for
  ``tokenizer.ggml.pre``: ``smollm`` (and starcoder, refact, codeshell, ...) splits every digit on
  its own, then applies the GPT-2 regex
  (``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)``);
  ``gpt2`` uses the GPT-2 regex alone; ``llama-bpe`` (Llama 3) and ``qwen2`` split with their own
  regexes (digits in groups of up to three, resp. one by one), and Llama 3 also keeps a word that
  is a whole token without merging it (``ignore_merges``).
* ``llama``: SentencePiece BPE (Llama 1/2, Mistral, Gemma, ...) from
  ``tokenizer.ggml.{tokens,scores,token_type}``: merges ranked by the score of the merged piece,
  spaces written as ``▁`` with one prepended at the start of the text and after every special
  token (``tokenizer.ggml.add_space_prefix``, default on, as llama.cpp does), and byte fallback
  to the ``<0xAB>`` tokens for characters outside the vocabulary.

Control, unknown and user-defined tokens (``<|im_start|>``, ``<s>``, ...) are matched whole.

Example::

  tok = load_tokenizer()
  ids = tok.encode("Hello world")          # [19556, 905]
  tok.decode(ids)                          # "Hello world"
  prompt = tok.encode(chat_prompt([{"role": "user", "content": "Hi!"}]))
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers

from jq_models import fetch
from jq_models.gguf_weights import GGUFError, open_gguf

# llama.cpp pre-tokenizer names whose regexes are "\p{N}" (single digits) + the GPT-2 regex.
_DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva",
                    "minerva-7b")
_GPT2_PRE = ("gpt2", "gpt-2", "default", "mpt", "olmo", "jais")
# llama.cpp's LLAMA3 regex (Llama 3's tokenizer.json; digits in groups of up to three). These
# pre-tokenizers also set ignore_merges (a word that is a whole token is not re-merged) and add BOS.
_LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
               "lfm2")
# The same regex without ignore_merges or a default BOS (as llama.cpp reads these names).
_GPT4_PRE = ("dbrx", "smaug-bpe")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's QWEN2 regex (Qwen2's tokenizer.json; every digit on its own).
_QWEN2_PRE = ("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp token types (tokenizer.ggml.token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_SPACE = "\u2581"  # SentencePiece's "▁"
# Tokens that end generation besides EOS, found by their text as llama.cpp does (its EOG list).
_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
              "<|eom_id|>", "<|end_of_text|>", "<EOT>")

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


class Tokenizer:
  """A ``tokenizers.Tokenizer`` plus the special ids and chat template its checkpoint declares
  (built from GGUF metadata here, or from ``tokenizer.json`` by ``jq_models.hf``).

  Attributes:
    backend: the underlying ``tokenizers.Tokenizer``.
    bos_id, eos_id, pad_id: special token ids (``None`` when the checkpoint does not declare one).
    add_bos: whether the model expects BOS at the start of a sequence (``encode`` default).
    add_eos: whether the model expects EOS at the end of a sequence (``encode`` default; False
      for every decoder family here).
    stop_ids: ids that end generation (the EOS id, or ``generation_config.json``'s list; for a
      GGUF, EOS plus the end-of-turn tokens llama.cpp recognises by their text).
    chat_template: the checkpoint's Jinja chat template, or ``None``.
  """

  def __init__(self, backend: tokenizers.Tokenizer, *, bos_id: int | None, eos_id: int | None,
               pad_id: int | None = None, add_bos: bool = False, stop_ids: Sequence[int] = (),
               chat_template: str | None = None, add_eos: bool = False):
    self.backend = backend
    self.bos_id = bos_id
    self.eos_id = eos_id
    self.pad_id = pad_id
    self.add_bos = add_bos
    self.add_eos = add_eos
    self.stop_ids = tuple(stop_ids) or (() if eos_id is None else (eos_id,))
    self.chat_template = chat_template

  def apply_chat_template(self, messages: Sequence[Mapping[str, str]], *,
                          add_generation_prompt: bool = True) -> str:
    """The checkpoint's own chat template rendered (Jinja, sandboxed, as transformers does).

    Raises:
      ValueError: the checkpoint has no template (as transformers refuses: another model's
        format, SmolLM2's ChatML, would be plain text to this one).
    """
    if self.chat_template is None:
      raise ValueError("the checkpoint has no chat template (tokenizer_config.json's "
                       "'chat_template', chat_template.jinja, or a GGUF's "
                       "tokenizer.chat_template): continue the prompt as plain text with --raw "
                       "(jq-quant generate; chat=False in Python), or add the model's template")
    return render_chat_template(
        self.chat_template, messages, add_generation_prompt=add_generation_prompt,
        bos_token=self._token(self.bos_id), eos_token=self._token(self.eos_id))

  def _token(self, i: int | None) -> str:
    return "" if i is None else (self.backend.id_to_token(int(i)) or "")

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, *, add_bos: bool | None = None,
             add_eos: bool | None = None) -> list[int]:
    """Token ids of ``text``; special tokens written in the text (``<|im_end|>``) map to their id.

    ``add_bos`` / ``add_eos`` default to the GGUF's ``tokenizer.ggml.add_bos_token`` /
    ``add_eos_token`` (llama.cpp's defaults when absent: BOS on for SentencePiece and Llama 3,
    off otherwise, e.g. for SmolLM2; EOS off).
    """
    ids = self.backend.encode(text, add_special_tokens=False).ids
    add_bos = self.add_bos if add_bos is None else add_bos
    add_eos = self.add_eos if add_eos is None else add_eos
    if add_bos:
      if self.bos_id is None:
        raise ValueError("encode(add_bos=True): this tokenizer has no BOS token")
      ids = [self.bos_id] + ids
    if add_eos:
      if self.eos_id is None:
        raise ValueError("encode(add_eos=True): this tokenizer has no EOS token")
      ids = ids + [self.eos_id]
    return ids

  def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
    """Text of ``ids`` (invalid UTF-8 from byte-level or byte-fallback tokens becomes U+FFFD)."""
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


def _field(meta: Mapping[str, Any], key: str, default=None, *, required: bool = False):
  if key not in meta:
    if required:
      raise GGUFError(f"GGUF metadata key {key!r} is missing (no tokenizer in this file?)")
    return default
  return meta[key]


def _array(meta: Mapping[str, Any], key: str, kind: type | tuple[type, ...],
           n: int | None = None, *, required: bool = True) -> list | None:
  """The array ``key``, checked to hold ``kind`` values (``n`` of them when given)."""
  value = _field(meta, key, required=required)
  if value is None:
    return None
  if not isinstance(value, list) or not all(isinstance(v, kind) for v in value):
    raise GGUFError(f"GGUF metadata key {key!r} must be an array of "
                    f"{getattr(kind, '__name__', 'numbers')} values")
  if n is not None and len(value) != n:
    raise GGUFError(f"GGUF metadata key {key!r} has {len(value)} entries but "
                    f"'tokenizer.ggml.tokens' has {n}")
  return value


def _token_id(meta: Mapping[str, Any], key: str, n_tokens: int,
              default: int | None = None) -> int | None:
  """Special token id ``key`` (``default`` when absent), checked to lie in the vocabulary."""
  value = _field(meta, key)
  if value is None:
    return default if default is not None and default < n_tokens else None
  if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n_tokens:
    raise GGUFError(f"GGUF metadata key {key!r} = {value!r} is not a token id of the "
                    f"{n_tokens}-token vocabulary")
  return value


def _flag(meta: Mapping[str, Any], key: str, default: bool) -> bool:
  value = _field(meta, key)
  if value is None:
    return default
  if not isinstance(value, (bool, int)):
    raise GGUFError(f"GGUF metadata key {key!r} = {value!r} is not a boolean")
  return bool(value)


def _pre_tokenizer(pre: str) -> tuple[pre_tokenizers.PreTokenizer, bool]:
  """Byte-level pre-tokenizer for llama.cpp's ``tokenizer.ggml.pre`` name, and whether the name
  is one of llama.cpp's LLAMA3 family (``ignore_merges`` on, BOS added by default)."""
  if pre in _LLAMA3_PRE or pre in _GPT4_PRE or pre in _QWEN2_PRE:
    split = QWEN2_SPLIT if pre in _QWEN2_PRE else LLAMA3_SPLIT
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), pre in _LLAMA3_PRE
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre in _DIGIT_SPLIT_PRE:
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    byte_level]), False
  if pre in _GPT2_PRE:
    return byte_level, False
  known = _LLAMA3_PRE + _GPT4_PRE + _QWEN2_PRE + _DIGIT_SPLIT_PRE + _GPT2_PRE
  raise GGUFError(f"GGUF tokenizer.ggml.pre={pre!r} is not supported; known: {', '.join(known)}")


def _byte_level_bpe(meta, vocab: dict[str, int]) -> tuple[tokenizers.Tokenizer, bool]:
  """``tokenizer.ggml.model = gpt2``: the backend and llama.cpp's default for adding BOS."""
  merges = _array(meta, "tokenizer.ggml.merges", str)
  pairs = []
  for m in merges:
    a, sep, b = m.partition(" ")
    if not sep or not a or not b:
      raise GGUFError(f"GGUF tokenizer.ggml.merges: malformed merge {m!r}")
    pairs.append((a, b))
  pre = _field(meta, "tokenizer.ggml.pre", "default")
  pre_tokenizer, llama3 = _pre_tokenizer(pre)
  backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False,
                                            byte_fallback=False, ignore_merges=llama3))
  backend.pre_tokenizer = pre_tokenizer
  backend.decoder = decoders.ByteLevel()
  return backend, llama3


def _sentencepiece_merges(tokens: Sequence[str], scores: Sequence[float],
                          vocab: Mapping[str, int]) -> list[tuple[str, str]]:
  """BPE merges equivalent to llama.cpp's SentencePiece tokenizer.

  llama.cpp repeatedly joins the adjacent pair whose concatenation is the vocabulary piece with
  the highest score. As merges: every split ``(left, right)`` of a piece into two vocabulary
  pieces, ranked by the piece's score (best first; ties by token id, then split point).
  """
  ranked = []
  for i, piece in enumerate(tokens):
    score = float(scores[i])
    key = math.inf if math.isnan(score) else -score  # NaN ranks last
    for k in range(1, len(piece)):
      left, right = piece[:k], piece[k:]
      if left in vocab and right in vocab:
        ranked.append((key, i, k))
  ranked.sort()
  return [(tokens[i][:k], tokens[i][k:]) for _, i, k in ranked]


def _sentencepiece_bpe(tokens: Sequence[str], scores: Sequence[float], vocab: dict[str, int], *,
                       unk_id: int | None, add_space_prefix: bool) -> tokenizers.Tokenizer:
  """``tokenizer.ggml.model = llama``: SentencePiece BPE with byte fallback.

  Spaces become ``▁``, and with ``add_space_prefix`` one ``▁`` is prepended to every run of text
  (the start, and each stretch after a special or user-defined token, which are split off before
  normalization), as llama.cpp's SPM tokenizer does. Decoding undoes both: ``▁`` back to spaces,
  ``<0xAB>`` tokens back to bytes, and one leading space removed.
  """
  model = models.BPE(vocab=vocab, merges=_sentencepiece_merges(tokens, scores, vocab),
                     unk_token=None if unk_id is None else tokens[unk_id], fuse_unk=True,
                     byte_fallback=True)
  backend = tokenizers.Tokenizer(model)
  replace = normalizers.Replace(" ", _SPACE)
  backend.normalizer = (normalizers.Sequence([normalizers.Prepend(_SPACE), replace])
                        if add_space_prefix else replace)
  steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
  if add_space_prefix:
    steps.append(decoders.Strip(content=" ", left=1, right=0))
  backend.decoder = decoders.Sequence(steps)
  return backend


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
  """The tokenizer stored in a GGUF file; ``path=None`` uses the cached SmolLM2 GGUF.

  Supports ``tokenizer.ggml.model`` ``gpt2`` (byte-level BPE; ``tokenizer.ggml.pre`` one of
  llama.cpp's smollm/gpt2/llama-bpe/qwen2 families) and ``llama`` (SentencePiece BPE). Special ids
  and the add-BOS/EOS flags default as in llama.cpp when the file does not set them.

  Raises:
    FileNotFoundError, GGUFError: missing/corrupt file, an unsupported tokenizer model or
      pre-tokenizer, or missing/inconsistent tokenizer metadata (the message names the key).
  """
  reader = open_gguf(fetch.fetch(fetch.SMOLLM2_GGUF) if path is None else path)
  return tokenizer_from_metadata({k: f.contents() for k, f in reader.fields.items()
                                  if k.startswith("tokenizer.")})


def tokenizer_from_metadata(meta: Mapping[str, Any]) -> Tokenizer:
  """The tokenizer of GGUF ``tokenizer.*`` metadata (as :func:`load_tokenizer` reads it from a
  file, or as ``jq_models.gguf_vocab`` writes it), built as llama.cpp runs it."""
  kind = _field(meta, "tokenizer.ggml.model", required=True)
  if kind not in ("gpt2", "llama"):
    raise GGUFError(f"GGUF tokenizer.ggml.model={kind!r} is not supported; supported: 'gpt2' "
                    "(byte-level BPE), 'llama' (SentencePiece BPE)")
  tokens = _array(meta, "tokenizer.ggml.tokens", str)
  n = len(tokens)
  if n == 0:
    raise GGUFError("GGUF metadata key 'tokenizer.ggml.tokens' is empty")
  tokens = [t or f"[EMPTY_{i}]" for i, t in enumerate(tokens)]  # llama.cpp's name for ""
  types = _array(meta, "tokenizer.ggml.token_type", int, n, required=False) or [NORMAL] * n
  vocab = {t: i for i, t in enumerate(tokens)}
  if len(vocab) != n:
    seen: set[str] = set()
    dup = next(t for t in tokens if t in seen or seen.add(t))
    raise GGUFError(f"GGUF tokenizer.ggml.tokens has duplicate entries (e.g. {dup!r})")

  spm = kind == "llama"
  # llama.cpp's defaults: SentencePiece vocabularies start <unk>, <s>, </s>.
  bos = _token_id(meta, "tokenizer.ggml.bos_token_id", n, 1 if spm else None)
  eos = _token_id(meta, "tokenizer.ggml.eos_token_id", n, 2 if spm else None)
  unk = _token_id(meta, "tokenizer.ggml.unknown_token_id", n, 0 if spm else None)
  pad = _token_id(meta, "tokenizer.ggml.padding_token_id", n)
  if spm:
    scores = _array(meta, "tokenizer.ggml.scores", (int, float), n)
    backend = _sentencepiece_bpe(
        tokens, scores, vocab, unk_id=unk,
        add_space_prefix=_flag(meta, "tokenizer.ggml.add_space_prefix", True))
    add_bos_default = True
  else:
    backend, add_bos_default = _byte_level_bpe(meta, vocab)

  special = [tokenizers.AddedToken(tokens[i], special=True, normalized=False)
             for i, t in enumerate(types) if t in (CONTROL, UNKNOWN)]
  user = [tokenizers.AddedToken(tokens[i], special=False, normalized=False)
          for i, t in enumerate(types) if t == USER_DEFINED]
  backend.add_special_tokens(special)
  if user:
    backend.add_tokens(user)

  stops = [eos] if eos is not None else []
  stops += [vocab[t] for t in _EOG_TEXTS if t in vocab and vocab[t] != eos]
  return Tokenizer(backend, bos_id=bos, eos_id=eos, pad_id=pad,
                   add_bos=_flag(meta, "tokenizer.ggml.add_bos_token", add_bos_default),
                   add_eos=_flag(meta, "tokenizer.ggml.add_eos_token", False),
                   stop_ids=stops,
                   chat_template=_field(meta, "tokenizer.chat_template"))


# Texts two tokenizers of one model are compared on: spaces, digits, punctuation, accents, CJK,
# code, newlines, long runs (a passage of real text is added by the callers).
PROBE_TEXTS = ("Hello world!", "  two  spaces\tand a tab\n\nnew paragraph",
               "In 2024, 1,234,567 people paid $89.99 (or 12%).", "naïve café, Zürich",
               "東京は日本の首都です。", "def f(x):\n    return x ** 2  # square",
               "don't won't I'm you're", "A" * 40 + " " + "z" * 17)


def tokenization_difference(ours: Tokenizer, theirs: Tokenizer,
                            texts: Iterable[str] = PROBE_TEXTS) -> str | None:
  """Where ``theirs`` tokenizes differently from ``ours`` (BOS/EOS ids, the ids of the first
  differing text), or ``None`` when they agree on all of ``texts``."""
  for what in ("bos_id", "eos_id"):
    if getattr(ours, what) is not None and getattr(theirs, what) != getattr(ours, what):
      return f"its {what} is {getattr(theirs, what)}, not {getattr(ours, what)}"
  for text in texts:
    a, b = ours.encode(text, add_bos=False), theirs.encode(text, add_bos=False)
    if a != b:
      i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
      return (f"it tokenizes {text[:40]!r} differently (first at token {i}: {b[i:i + 3]} vs "
              f"{a[i:i + 3]})")
  return None
