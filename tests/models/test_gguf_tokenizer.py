"""Tokenizers rebuilt from GGUF metadata (jq_models.tokenizer.load_tokenizer) for the decoder families
whose GGUFs llama.cpp writes: SentencePiece BPE (``tokenizer.ggml.model = llama``: Llama 1/2,
Mistral, Gemma) and byte-level BPE with the ``llama-bpe`` (Llama 3) and ``qwen2`` pre-tokenizers.

Every test writes a tiny GGUF itself with gguf-py; nothing is downloaded. Where transformers is
installed its own GGUF tokenizer loading is the oracle for the ids; the cases where llama.cpp and
transformers disagree (text after a special token, text starting with a space) follow llama.cpp
and are checked against ids worked out by hand from llama.cpp's algorithm.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from jq_models import tokenizer
from jq_models.gguf_weights import GGUFError

SP = "\u2581"  # SentencePiece's "▁"

# ---------------------------------------------------------------------------------------------
# Writing tiny GGUFs.


def _write(path, *, model: str, tokens, scores=None, types=None, merges=None, pre=None,
           bos=None, eos=None, unk=None, pad=None, add_bos=None, add_eos=None,
           add_space_prefix=None, chat_template=None):
  """A GGUF holding one tiny tensor and the given tokenizer metadata (None: key left out)."""
  w = gguf.GGUFWriter(str(path), arch="llama")
  w.add_tokenizer_model(model)
  if pre is not None:
    w.add_tokenizer_pre(pre)
  w.add_token_list(tokens)
  if scores is not None:
    w.add_token_scores(scores)
  if types is not None:
    w.add_token_types(types)
  if merges is not None:
    w.add_token_merges(merges)
  for value, add in ((bos, w.add_bos_token_id), (eos, w.add_eos_token_id),
                     (unk, w.add_unk_token_id), (pad, w.add_pad_token_id),
                     (add_bos, w.add_add_bos_token), (add_eos, w.add_add_eos_token),
                     (add_space_prefix, w.add_add_space_prefix),
                     (chat_template, w.add_chat_template)):
    if value is not None:
      add(value)
  w.add_tensor("token_embd.weight", np.zeros((len(tokens), 4), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


# A SentencePiece BPE vocabulary laid out as llama.cpp converts Llama-2's: <unk>, <s>, </s>, the
# 256 byte tokens <0x00>..<0xFF> (so "\n" is <0x0A> = 13), then the merged pieces in merge order
# (score -rank), then the single characters (lowest scores), then two Mistral-style control
# tokens and a user-defined one.
_SPM_MERGES = [
    (SP, "t"), ("h", "e"), (SP + "t", "he"), (SP, "q"), (SP + "q", "u"), ("i", "c"),
    ("ic", "k"), ("r", "o"), ("ro", "w"), (SP, "b"), (SP + "b", "row"), (SP + "brow", "n"),
    (SP, "f"), ("o", "x"), (SP + "f", "ox"), (SP, "j"), ("u", "m"), ("um", "p"), ("e", "d"),
    (SP + "j", "ump"), (SP + "jump", "ed"), ("e", "r"), ("o", "v"), ("ov", "er"), (SP, "o"),
    (SP + "o", "ver"), (SP, "l"), ("a", "z"), ("az", "y"), (SP + "l", "azy"), (SP, "d"),
    ("o", "g"), (SP + "d", "og"), ("H", "e"), ("l", "l"), ("He", "ll"), ("Hell", "o"),
    (SP, "w"), ("o", "r"), (SP + "w", "or"), ("l", "d"), (SP + "wor", "ld"), (SP, SP),
    (SP, "Hello"), ("e", "s"), ("t", "es"), ("tes", "t"),
]
_SPM_CHARS = list(SP + "thequickbrownfxjmpsvlazydgHTW0123456789.,!?'")
_SPM_CONTROL = ["[INST]", "[/INST]"]
_SPM_USER = ["<|tool|>"]


def _spm_vocab():
  tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
  types = [2, 3, 3] + [6] * 256
  scores = [0.0] * len(tokens)
  for rank, (a, b) in enumerate(_SPM_MERGES):
    assert a + b not in tokens
    tokens.append(a + b)
    types.append(1)
    scores.append(-float(rank))
  for j, c in enumerate(dict.fromkeys(_SPM_CHARS)):
    tokens.append(c)
    types.append(1)
    scores.append(-1000.0 - j)
  for t in _SPM_CONTROL + _SPM_USER:
    tokens.append(t)
    types.append(3 if t in _SPM_CONTROL else 4)
    scores.append(0.0)
  return tokens, scores, types


SPM_TOKENS, SPM_SCORES, SPM_TYPES = _spm_vocab()
SPM_ID = {t: i for i, t in enumerate(SPM_TOKENS)}


def _ids(*pieces):
  return [SPM_ID[p] for p in pieces]


def _byte(b: int) -> int:
  return 3 + b


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
  d = tmp_path_factory.mktemp("spm")
  return _write(d / "spm.gguf", model="llama", tokens=SPM_TOKENS, scores=SPM_SCORES,
                types=SPM_TYPES, bos=1, eos=2, unk=0, add_bos=True, add_eos=False,
                chat_template="{% for m in messages %}[INST] {{ m['content'] }} [/INST]"
                              "{% endfor %}")


@pytest.fixture(scope="module")
def spm(spm_path):
  return tokenizer.load_tokenizer(spm_path)


# ---------------------------------------------------------------------------------------------
# SentencePiece BPE.


def test_spm_exact_ids(spm):
  assert len(SPM_TOKENS) > 300 and spm.vocab_size == len(SPM_TOKENS)
  # Leading "▁" added at the start; words built from merges ranked by score.
  assert spm.encode("the quick brown fox", add_bos=False) == _ids(
      SP + "the", SP + "qu", "ick", SP + "brown", SP + "fox")
  assert spm.encode("jumped over the lazy dog", add_bos=False) == _ids(
      SP + "jumped", SP + "over", SP + "the", SP + "lazy", SP + "dog")
  # "Hello" at the start merges with the prefix space (▁ + Hello has the better score).
  assert spm.encode("Hello world", add_bos=False) == _ids(SP + "Hello", SP + "world")
  # Inside a word: no prefix; pieces that never merge stay characters.
  assert spm.encode("thequick", add_bos=False) == _ids(SP + "the", "q", "u", "ick")
  # Digits one by one, newline as its byte token <0x0A> = 13 (as in Llama-2).
  assert spm.encode("12 3\nthe", add_bos=False) == (
      _ids(SP, "1", "2", SP, "3") + [13] + _ids("t", "he"))
  assert _byte(0x0A) == 13
  # Characters outside the vocabulary fall back to their UTF-8 bytes.
  assert spm.encode("é", add_bos=False) == [SPM_ID[SP], _byte(0xC3), _byte(0xA9)]
  assert spm.encode("the 中!", add_bos=False) == (
      _ids(SP + "the", SP) + [_byte(0xE4), _byte(0xB8), _byte(0xAD)] + _ids("!"))
  # Runs of spaces: "▁▁" is a piece, but "▁t" outranks it when a "t" follows.
  assert spm.encode("the  12", add_bos=False) == _ids(SP + "the", SP + SP, "1", "2")
  assert spm.encode("the  test", add_bos=False) == _ids(SP + "the", SP, SP + "t", "es", "t")
  # BOS by default (tokenizer.ggml.add_bos_token), no EOS.
  assert spm.encode("the") == [1, SPM_ID[SP + "the"]]
  assert spm.encode("the", add_eos=True) == [1, SPM_ID[SP + "the"], 2]
  assert (spm.bos_id, spm.eos_id, spm.pad_id, spm.add_bos, spm.add_eos) == (1, 2, None, True,
                                                                           False)
  assert spm.stop_ids == (2,)


def test_spm_llama_cpp_space_prefix(spm):
  """llama.cpp (and SentencePiece itself) prefix every run of text with a space, including the
  run after a special token, and keep a leading space as a second "▁". transformers'
  LlamaTokenizer (Metaspace, prepend_scheme="first") does neither; these ids follow llama.cpp."""
  # Text starting with a space: " " + " the" -> "▁▁the" -> ▁ + ▁the (▁▁ ranks below ▁the).
  assert spm.encode(" the", add_bos=False) == _ids(SP, SP + "the")
  # Control tokens are matched whole; the text after each one gets its own prefix space.
  assert spm.encode("[INST]the quick[/INST]", add_bos=False) == [
      SPM_ID["[INST]"], *_ids(SP + "the", SP + "qu", "ick"), SPM_ID["[/INST]"]]
  assert spm.encode("[INST] the [/INST]", add_bos=False) == [
      SPM_ID["[INST]"], *_ids(SP, SP + "the", SP), SPM_ID["[/INST]"]]
  # <s> and <unk> written in the text are their ids too; user-defined tokens stay whole.
  assert spm.encode("<s>the<unk>", add_bos=False) == [1, SPM_ID[SP + "the"], 0]
  assert spm.encode("test<|tool|>dog", add_bos=False) == [
      *_ids(SP + "t", "es", "t"), SPM_ID["<|tool|>"], SPM_ID[SP + "dog"]]
  # So text with a special token inside comes back with that extra space (in llama.cpp too).
  assert spm.decode(spm.encode("[INST]the[/INST]x", add_bos=False)) == "[INST] the[/INST] x"


def _llama_cpp_spm(text: str) -> list[int]:
  """A direct Python port of llama.cpp's SPM tokenizer (llm_tokenizer_spm_session, for text
  without special tokens and with add_space_prefix): symbols are the characters of " " + text
  with spaces escaped to "▁"; repeatedly join the adjacent pair whose concatenation is the
  vocabulary piece with the highest score (ties: leftmost); pieces that are not tokens are
  split back along their merges, or else written as byte tokens."""
  import heapq

  if not text:  # llama.cpp tokenizes no fragment at all
    return []
  text = (" " + text).replace(" ", SP)
  sym = [[i - 1, i + 1 if i + 1 < len(text) else -1, i, 1] for i in range(len(text))]
  # [prev, next, start, length] in characters; sizes compared in UTF-8 bytes as llama.cpp does
  def size(start, n):
    return len(text[start:start + n].encode())

  queue, rev_merge = [], {}

  def try_add(left, right):
    if left == -1 or right == -1:
      return
    piece = text[sym[left][2]:sym[left][2] + sym[left][3] + sym[right][3]]
    if piece in SPM_ID:
      heapq.heappush(queue, (-SPM_SCORES[SPM_ID[piece]], left, right, len(piece.encode())))
      rev_merge[piece] = (left, right)

  for i in range(1, len(sym)):
    try_add(i - 1, i)
  while queue:
    _, left, right, nbytes = heapq.heappop(queue)
    ls, rs = sym[left], sym[right]
    if ls[3] == 0 or rs[3] == 0 or size(ls[2], ls[3]) + size(rs[2], rs[3]) != nbytes:
      continue
    ls[3] += rs[3]
    rs[3] = 0
    ls[1] = rs[1]
    if rs[1] >= 0:
      sym[rs[1]][0] = left
    try_add(ls[0], left)
    try_add(left, ls[1])

  out = []

  def resegment(s):
    piece = text[s[2]:s[2] + s[3]]
    if piece in SPM_ID:
      out.append(SPM_ID[piece])
    elif piece in rev_merge:
      resegment(sym[rev_merge[piece][0]])
      resegment(sym[rev_merge[piece][1]])
    else:
      out.extend(_byte(b) for b in piece.encode())

  i = 0
  while i != -1:
    resegment(sym[i])
    i = sym[i][1]
  return out


def test_spm_matches_llama_cpp_algorithm(spm):
  """Random text (leading/repeated spaces included) against the port of llama.cpp's SPM loop."""
  rng = np.random.default_rng(0)
  alphabet = list("thequickbrownfxjmpsvlazydgHTW01.!") + [" "] * 6 + ["é", "\n", "中"]
  words = ["the", "quick", "brown", "fox", "jumped", "over", "lazy", "dog", "Hello", "world",
           "test", "HeHello", "thequick"]
  for _ in range(300):
    parts = [str(rng.choice(words)) if rng.random() < 0.5 else str(rng.choice(alphabet))
             for _ in range(int(rng.integers(0, 12)))]
    text = "".join(p + (" " if rng.random() < 0.4 else "") for p in parts)
    assert spm.encode(text, add_bos=False) == _llama_cpp_spm(text), repr(text)


@pytest.mark.parametrize("text", [
    "the quick brown fox", "Hello world", " the", "  two leading", "trailing ", "a\n\nb",
    "12345", "é中🙂!", "the  test", "thequick", "x<|tool|>", "",
])
def test_spm_round_trip(spm, text):
  assert spm.decode(spm.encode(text, add_bos=False)) == text


def test_spm_decode(spm):
  ids = spm.encode("Hello world")
  assert ids[0] == 1
  assert spm.decode(ids, skip_special_tokens=True) == "Hello world"
  assert spm.decode(ids) == "<s> Hello world"  # llama.cpp renders it the same way
  assert spm.decode([_byte(0xC3), _byte(0xA9)]) == "é"
  assert spm.decode([_byte(0xC3)]) == "\ufffd"  # a lone continuation-less byte
  assert spm.id_to_token(SPM_ID[SP + "the"]) == SP + "the"


def test_spm_chat_template(spm):
  text = spm.apply_chat_template([{"role": "user", "content": "the fox"}])
  assert text == "[INST] the fox [/INST]"
  assert spm.encode(text) == [1, SPM_ID["[INST]"], *_ids(SP, SP + "the", SP + "fox", SP),
                              SPM_ID["[/INST]"]]


def test_spm_no_space_prefix_and_defaults(tmp_path):
  """Gemma-style: tokenizer.ggml.add_space_prefix = false; special ids and add-BOS default as
  in llama.cpp when the file leaves them out."""
  path = _write(tmp_path / "gemma.gguf", model="llama", tokens=SPM_TOKENS, scores=SPM_SCORES,
                types=SPM_TYPES, add_space_prefix=False)
  tok = tokenizer.load_tokenizer(path)
  assert tok.encode("the quick", add_bos=False) == _ids("t", "he", SP + "qu", "ick")
  assert tok.decode(tok.encode("the quick", add_bos=False)) == "the quick"
  assert tok.decode(tok.encode(" the", add_bos=False)) == " the"
  assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.add_eos) == (1, 2, True, False)
  assert tok.encode("the") == [1, *_ids("t", "he")]


def test_spm_matches_transformers(spm_path, spm):
  """The ids transformers' own GGUF tokenizer loading gives, on text where llama.cpp and
  transformers agree (no leading space, no special token inside)."""
  transformers = pytest.importorskip("transformers")
  hf = transformers.AutoTokenizer.from_pretrained(str(spm_path.parent), gguf_file=spm_path.name)
  texts = ["the quick brown fox", "jumped over the lazy dog", "Hello world", "thequick",
           "12 3\nthe", "é", "the 中!", "the  test", "trailing ", "a\n\nb", "🙂 Hello, world!",
           "HeHello lazy  dogs"]
  for text in texts:
    theirs = hf(text, add_special_tokens=False)["input_ids"]
    assert spm.encode(text, add_bos=False) == theirs, text
    assert spm.decode(theirs) == hf.decode(theirs), text
  assert spm.encode("the fox") == hf("the fox")["input_ids"]  # BOS added by both


# ---------------------------------------------------------------------------------------------
# Byte-level BPE: llama-bpe (Llama 3) and qwen2.


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's printable spelling of the 256 bytes."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  out, extra = {}, 0
  for b in range(256):
    if b in printable:
      out[b] = chr(b)
    else:
      out[b] = chr(256 + extra)
      extra += 1
  return out


_G = _bytes_to_unicode()[ord(" ")]  # "Ġ"
_BL_MERGES = [
    ("H", "e"), ("l", "l"), ("He", "ll"), ("Hell", "o"), (_G, "w"), ("o", "r"), (_G + "w", "or"),
    ("l", "d"), (_G + "wor", "ld"), ("1", "2"), ("12", "3"), ("4", "5"), ("'", "s"), ("i", "t"),
    ("'", "S"), ("I", "T"), ("Ċ", "Ċ"),
]


def _byte_level_vocab():
  tokens = [_bytes_to_unicode()[b] for b in range(256)]
  tokens += [a + b for a, b in _BL_MERGES]
  tokens += ["abc"]  # a whole token that no merge reaches
  tokens += ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
  types = [1] * (len(tokens) - 3) + [3, 3, 3]
  return tokens, types


BL_TOKENS, BL_TYPES = _byte_level_vocab()
BL_ID = {t: i for i, t in enumerate(BL_TOKENS)}
BL_MERGE_STRINGS = [f"{a} {b}" for a, b in _BL_MERGES]


@pytest.fixture(scope="module", params=["llama-bpe", "dbrx", "qwen2"])
def byte_level(request, tmp_path_factory):
  pre = request.param
  d = tmp_path_factory.mktemp(pre)
  bos = BL_ID["<|begin_of_text|>"]
  path = _write(d / f"{pre}.gguf", model="gpt2", pre=pre, tokens=BL_TOKENS, types=BL_TYPES,
                merges=BL_MERGE_STRINGS, bos=bos, eos=BL_ID["<|end_of_text|>"])
  return pre, path, tokenizer.load_tokenizer(path)


def _pieces(tok, text):
  return [p for p, _ in tok.backend.pre_tokenizer.pre_tokenize_str(text)]


def test_byte_level_splits_and_ids(byte_level):
  pre, _, tok = byte_level
  g = _G
  if pre in ("llama-bpe", "dbrx"):   # (the same regex)
    assert _pieces(tok, "Hello world 12345") == ["Hello", g + "world", g, "123", "45"]
    assert tok.encode("Hello world 12345", add_bos=False) == [
        BL_ID["Hello"], BL_ID[g + "world"], BL_ID[g], BL_ID["123"], BL_ID["45"]]
    assert tok.add_bos == (pre == "llama-bpe")  # llama.cpp's default for the LLAMA3 names
  else:
    assert _pieces(tok, "Hello world 12345") == ["Hello", g + "world", g, "1", "2", "3", "4",
                                                 "5"]
    assert tok.encode("Hello world 12345", add_bos=False) == [
        BL_ID["Hello"], BL_ID[g + "world"], BL_ID[g]] + [BL_ID[d] for d in "12345"]
    assert not tok.add_bos
  # Case-insensitive contractions, letters with one leading non-letter, newlines kept together.
  assert _pieces(tok, "it's IT'S")[:3] == ["it", "'s", g + "IT"]
  assert _pieces(tok, "a\n\nb") == ["a", "ĊĊ", "b"]
  assert tok.encode("a\n\nb", add_bos=False) == [BL_ID["a"], BL_ID["ĊĊ"], BL_ID["b"]]
  # Special tokens whole; EOT-like tokens end generation too.
  assert tok.encode("<|eot_id|>Hello", add_bos=False) == [BL_ID["<|eot_id|>"], BL_ID["Hello"]]
  assert tok.stop_ids == (BL_ID["<|end_of_text|>"], BL_ID["<|eot_id|>"])
  for text in ["Hello world 12345", "  spaces  ", "é中🙂\n\n", "it's IT'S"]:
    assert tok.decode(tok.encode(text, add_bos=False)) == text


def test_byte_level_ignore_merges(byte_level):
  """llama.cpp's LLAMA3 pre-tokenizers keep a word that is a whole token as that token
  (ignore_merges); qwen2 and dbrx (Llama 3's regex without it) build it from the merges (here:
  none, so bytes)."""
  pre, _, tok = byte_level
  expected = [BL_ID["abc"]] if pre == "llama-bpe" else [BL_ID["a"], BL_ID["b"], BL_ID["c"]]
  assert tok.encode("abc", add_bos=False) == expected


def test_byte_level_matches_transformers(byte_level):
  transformers = pytest.importorskip("transformers")
  _, path, tok = byte_level
  hf = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  for text in ["Hello world 12345", "it's IT'S 1234567", "  spaces  ", "a\n\nb", "é中🙂!",
               "<|eot_id|>Hello world"]:
    assert tok.encode(text, add_bos=False) == hf(text, add_special_tokens=False)["input_ids"], text
  assert ([p for p, _ in hf.backend_tokenizer.pre_tokenizer.pre_tokenize_str("Hello world 12345")]
          == _pieces(tok, "Hello world 12345"))


# ---------------------------------------------------------------------------------------------
# Errors name the GGUF key.


def test_unsupported_model(tmp_path):
  path = _write(tmp_path / "t5.gguf", model="t5", tokens=["<pad>", "</s>", "<unk>"],
                scores=[0.0, 0.0, 0.0])
  with pytest.raises(GGUFError, match=r"tokenizer\.ggml\.model='t5' is not supported"):
    tokenizer.load_tokenizer(path)


def test_unknown_pre(tmp_path):
  path = _write(tmp_path / "pre.gguf", model="gpt2", pre="no-such-pre", tokens=BL_TOKENS,
                types=BL_TYPES, merges=BL_MERGE_STRINGS)
  with pytest.raises(GGUFError, match=r"tokenizer\.ggml\.pre='no-such-pre'"):
    tokenizer.load_tokenizer(path)


@pytest.mark.parametrize("change,key", [
    ({"scores": None}, "tokenizer.ggml.scores"),
    ({"scores": SPM_SCORES[:-1]}, "tokenizer.ggml.scores"),
    ({"types": SPM_TYPES[:-2]}, "tokenizer.ggml.token_type"),
    ({"tokens": [*SPM_TOKENS, SP + "the"], "scores": [*SPM_SCORES, 0.0],
      "types": [*SPM_TYPES, 1]}, "tokenizer.ggml.tokens"),
    ({"bos": len(SPM_TOKENS)}, "tokenizer.ggml.bos_token_id"),
    ({"unk": 10**6}, "tokenizer.ggml.unknown_token_id"),
])
def test_spm_bad_metadata(tmp_path, change, key):
  kwargs = {"model": "llama", "tokens": SPM_TOKENS, "scores": SPM_SCORES, "types": SPM_TYPES}
  kwargs.update(change)
  path = _write(tmp_path / "bad.gguf", **kwargs)
  with pytest.raises(GGUFError, match=key.replace(".", r"\.")):
    tokenizer.load_tokenizer(path)


def test_byte_level_bad_metadata(tmp_path):
  path = _write(tmp_path / "nomerges.gguf", model="gpt2", pre="qwen2", tokens=BL_TOKENS,
                types=BL_TYPES)
  with pytest.raises(GGUFError, match=r"tokenizer\.ggml\.merges"):
    tokenizer.load_tokenizer(path)
  path = _write(tmp_path / "types.gguf", model="gpt2", pre="qwen2", tokens=BL_TOKENS,
                types=BL_TYPES[:10], merges=BL_MERGE_STRINGS)
  with pytest.raises(GGUFError, match=r"tokenizer\.ggml\.token_type"):
    tokenizer.load_tokenizer(path)
