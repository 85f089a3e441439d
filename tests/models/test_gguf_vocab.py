"""GGUF tokenizer metadata written from a Hugging Face ``tokenizer.json`` (jq_models.gguf_vocab).

Each case builds a ``tokenizer.json`` in the style of one family (trained on a little text, so the
merges are real): GPT-2's byte-level regex, SmolLM2's single digits, Llama 3's and Qwen2's split
regexes (Qwen2 with its NFC normalizer), and SentencePiece BPE with byte fallback as Llama 2,
Mistral (Metaspace) and Gemma (no prefix space) store it.  The metadata is rebuilt into a
tokenizer as llama.cpp runs it (``jq_models.tokenizer``) and must give the same ids; where
llama-cpp-python is installed, llama.cpp itself tokenizes the written GGUF.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import tokenizers
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers

from jq_models import gguf_vocab, registry
from jq_models import tokenizer as T

SPECIAL = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
STYLES = ("gpt2", "smollm", "llama3", "dbrx", "qwen2", "spm-llama2", "spm-metaspace", "spm-gemma")
TEXTS = (*T.PROBE_TEXTS, "x = [1, 22, 333, 4444]; y='ünïcödé'  \n\n\t end", "<s>a</s> b")


def _corpus() -> list[str]:
  news = registry.calibration_text("news")[:30000]
  return [news[i:i + 300] for i in range(0, len(news), 300)] + list(T.PROBE_TEXTS) * 3


def _byte_level(style: str) -> tokenizers.Tokenizer:
  tok = tokenizers.Tokenizer(models.BPE(ignore_merges=style == "llama3"))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=style == "gpt2")
  if style == "smollm":
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
  elif style in ("llama3", "dbrx", "qwen2"):
    split = T.QWEN2_SPLIT if style == "qwen2" else T.LLAMA3_SPLIT
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level])
    if style == "qwen2":
      tok.normalizer = normalizers.NFC()
  else:
    tok.pre_tokenizer = byte_level
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(_corpus(), trainers.BpeTrainer(
      vocab_size=700, special_tokens=SPECIAL,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return tok


def _sentencepiece(style: str) -> tokenizers.Tokenizer:
  """A SentencePiece-style BPE as transformers converts one: <unk>, <s>, </s>, the 256 byte
  tokens, then the pieces; merges are every split of a piece into two pieces, ranked by the
  piece (transformers' SentencePieceExtractor)."""
  norm = {"spm-llama2": normalizers.Sequence([normalizers.Prepend("\u2581"),
                                              normalizers.Replace(" ", "\u2581")]),
          "spm-gemma": normalizers.Replace(" ", "\u2581"), "spm-metaspace": None}[style]
  trained = tokenizers.Tokenizer(models.BPE())
  trained.normalizer = norm or normalizers.Sequence([normalizers.Prepend("\u2581"),
                                                     normalizers.Replace(" ", "\u2581")])
  trained.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
  trained.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=600))
  spec = json.loads(trained.to_str())["model"]
  pieces = sorted(spec["vocab"], key=spec["vocab"].get)
  pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
  vocab = {p: i for i, p in enumerate(pieces)}
  merges = [(p[:k], p[k:]) for p in pieces[259:] for k in range(1, len(p))
            if p[:k] in vocab and p[k:] in vocab]
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>",
                                        fuse_unk=True, byte_fallback=True))
  if norm is None:
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first",
                                                 split=False)
  else:
    tok.normalizer = norm
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                          for t in ("<unk>", "<s>", "</s>")])
  return tok


def _hf_tokenizer(style: str) -> T.Tokenizer:
  backend = _sentencepiece(style) if style.startswith("spm") else _byte_level(style)
  return T.Tokenizer(backend, bos_id=backend.token_to_id("<s>"),
                     eos_id=backend.token_to_id("</s>"), add_bos=style != "gpt2",
                     chat_template="{{ messages }}")


@pytest.mark.parametrize("style", STYLES)
def test_metadata_tokenizes_as_the_tokenizer_json(style, tmp_path):
  ours = _hf_tokenizer(style)
  meta = gguf_vocab.gguf_tokenizer_metadata(ours, ours.vocab_size + 5)
  tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
  assert len(tokens) == len(types) == ours.vocab_size + 5     # padded to the model's rows
  assert tokens[-1] == f"[PAD{ours.vocab_size + 4}]" and types[-1] == T.UNUSED
  assert types[ours.backend.token_to_id("</s>")] == T.CONTROL
  want_pre = {"gpt2": "gpt-2", "smollm": "smollm", "llama3": "llama-bpe", "dbrx": "dbrx",
              "qwen2": "qwen2"}
  if style.startswith("spm"):
    assert meta["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.merges" not in meta
    assert meta["tokenizer.ggml.add_space_prefix"] == (style != "spm-gemma")
    assert types[3:259] == [T.BYTE] * 256 and types[0] == T.UNKNOWN
  else:
    assert meta["tokenizer.ggml.pre"] == want_pre[style]
  assert meta["tokenizer.ggml.add_bos_token"] == ours.add_bos
  theirs = T.tokenizer_from_metadata(meta)
  texts, notes = gguf_vocab.comparable_texts(ours, TEXTS)
  assert bool(notes) == (style == "spm-metaspace")
  if notes:   # a leading space, or a special token, and Metaspace's "first": llama.cpp differs
    assert T.tokenization_difference(ours, theirs, TEXTS) is not None
    texts = texts[:-1]
  assert T.tokenization_difference(ours, theirs, texts) is None
  assert theirs.chat_template == "{{ messages }}" and theirs.eos_id == ours.eos_id

  _llama_cpp_agrees(ours, meta, texts[:-1] if not notes else texts, tmp_path)   # ("<s>": below)


def _llama_cpp_agrees(ours: T.Tokenizer, meta: dict, texts, tmp_path) -> None:
  """llama.cpp (where llama-cpp-python is installed) tokenizes ``texts`` with a GGUF of ``meta``
  as ``ours`` does (text only: it parses special tokens in text when asked, not here)."""
  llama_cpp = pytest.importorskip("llama_cpp")
  import jax
  import jax.numpy as jnp

  from jq.io import gguf as G
  from jq_models import decoder
  config = decoder.DecoderConfig(vocab_size=len(meta["tokenizer.ggml.tokens"]), hidden_size=32,
                                 intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                                 head_dim=16, max_seq_len=64)
  params = decoder.Decoder(config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  out = tmp_path / "tok.gguf"
  G.export_gguf(params, config, meta, out, "f32")
  llm = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
  for text in texts:
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ours.encode(
        text, add_bos=False), text


def test_what_llama_cpp_cannot_run_is_refused_by_name():
  tok = _hf_tokenizer("gpt2")
  tok.backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
  with pytest.raises(ValueError, match="adds a prefix space"):
    gguf_vocab.gguf_tokenizer_metadata(tok, tok.vocab_size)
  tok.backend.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(r"\d+"), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  with pytest.raises(ValueError, match=r"pre-tokenizer .*\\\\d\+.* is none of the byte-level"):
    gguf_vocab.gguf_tokenizer_metadata(tok, tok.vocab_size)
  tok.backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.backend.normalizer = normalizers.Lowercase()
  with pytest.raises(ValueError, match="normalizes with"):
    gguf_vocab.gguf_tokenizer_metadata(tok, tok.vocab_size)
  with pytest.raises(ValueError, match="more than the model's vocab_size 10"):
    gguf_vocab.gguf_tokenizer_metadata(tok, 10)
  wordpiece = T.Tokenizer(tokenizers.Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1},
                                                                unk_token="[UNK]")),
                          bos_id=None, eos_id=None)
  with pytest.raises(ValueError, match="model is 'WordPiece'"):
    gguf_vocab.gguf_tokenizer_metadata(wordpiece, 2)
  spm = _hf_tokenizer("spm-llama2")
  spm.backend.normalizer = normalizers.Replace(" ", "_")
  with pytest.raises(ValueError, match="does not write spaces as"):
    gguf_vocab.gguf_tokenizer_metadata(spm, spm.vocab_size)


def test_scores_rank_sentencepiece_merges_as_the_tokenizer_json():
  """A piece scores minus the rank of its first merge: jq's reading of the scores (llama.cpp's
  rule: best-scoring piece first) gives back the merges in their order."""
  tok = _hf_tokenizer("spm-llama2")
  meta = gguf_vocab.gguf_tokenizer_metadata(tok, tok.vocab_size)
  tokens, scores = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"]
  merges = json.loads(tok.backend.to_str())["model"]["merges"]
  first = list(dict.fromkeys("".join(m.split(" ") if isinstance(m, str) else m) for m in merges))
  ranked = sorted((s, i) for i, s in enumerate(scores) if s > -len(merges) - 1)
  assert [tokens[i] for _, i in reversed(ranked)] == first
  assert np.all(np.asarray(scores)[:259] == -len(merges) - 1)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_transformers_conversion_of_a_sentencepiece_model(family, tmp_path):
  """A real SentencePiece BPE model (trained here with byte fallback, Llama's dummy prefix or
  Gemma's none), converted to ``tokenizer.json`` by transformers as for a hub checkpoint, then
  to GGUF metadata: jq's rebuild of llama.cpp's tokenizer (and llama.cpp, where installed) gives
  transformers' ids, apart from the leading space Metaspace treats differently (said)."""
  spm = pytest.importorskip("sentencepiece")
  transformers = pytest.importorskip("transformers")
  from jq_models import hf
  (tmp_path / "corpus.txt").write_text("\n".join(_corpus()))
  src = tmp_path / "src"
  src.mkdir()
  ids = dict(bos_id=1, eos_id=2, unk_id=0) if family == "llama" else dict(bos_id=2, eos_id=1,
                                                                             unk_id=3, pad_id=0)
  spm.SentencePieceTrainer.train(
      input=str(tmp_path / "corpus.txt"), model_prefix=str(src / "tokenizer"), vocab_size=700,
      model_type="bpe", byte_fallback=True, split_digits=True, add_dummy_prefix=family == "llama",
      normalization_rule_name="identity", remove_extra_whitespaces=False,
      allow_whitespace_only_pieces=True, minloglevel=2, **{"pad_id": -1, **ids})
  cls = transformers.LlamaTokenizerFast if family == "llama" else transformers.GemmaTokenizerFast
  out = tmp_path / "hf"
  cls.from_pretrained(str(src)).save_pretrained(str(out))
  ours = hf.load_tokenizer(out)
  if ours.vocab_size < 700:
    pytest.skip(f"transformers {transformers.__version__} did not convert the model")
  meta = gguf_vocab.gguf_tokenizer_metadata(ours, ours.vocab_size)
  assert meta["tokenizer.ggml.add_space_prefix"] == (family == "llama")
  texts, notes = gguf_vocab.comparable_texts(ours, TEXTS[:-1])
  assert T.tokenization_difference(ours, T.tokenizer_from_metadata(meta), texts) is None
  assert texts != list(TEXTS[:-1]) or not notes
  _llama_cpp_agrees(ours, meta, texts, tmp_path)
