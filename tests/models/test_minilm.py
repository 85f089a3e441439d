"""Tests for the all-MiniLM-L6-v2 nnx encoder (models/minilm.py) with its real weights."""
from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from jq_models import fetch, minilm, text

pytestmark = pytest.mark.slow  # reads the real 90 MB checkpoint

# Real sentences from the news articles (checked below to be in text.sentences(40)) and
# paraphrases written by hand.
PARAPHRASES = (
    ("An estimated 500 residents have left their homes for nearby Mittagong.",
     "About five hundred locals moved out of their houses to the nearby town of Mittagong."),
    ("Yesterday, Pakistan announced it had arrested Lashkar-e-Taiba chief Hafiz Mohammed Saeed.",
     "Pakistan said yesterday that Hafiz Mohammed Saeed, head of Lashkar-e-Taiba, was detained."),
    ("Argentina's political and economic crisis has deepened with the resignation of its interim "
     "President who took office just a week ago.",
     "Argentina's stand-in president quit only a week after taking office, worsening the "
     "country's economic and political turmoil."),
)


@pytest.fixture(scope="module")
def loaded():
  return minilm.load_minilm()


@pytest.fixture(scope="module")
def hf_tensors():
  return safetensors.numpy.load_file(str(fetch.fetch(fetch.MINILM_SAFETENSORS)))


def _paths(state) -> list[str]:
  return ["/".join(str(k) for k in path) for path, _ in nnx.to_flat_state(state)]


def test_state_paths_are_readable_and_round_trip(loaded):
  model, tok = loaded
  paths = _paths(nnx.state(model, nnx.Param))
  assert "layers/0/attention/query/kernel" in paths
  assert "layers/5/mlp/output/kernel" in paths
  assert "embeddings/word/embedding" in paths
  assert "layers/0/attention_norm/scale" in paths
  # The layer kind shows in the path: a quantization rule can skip embeddings and norms by regex.
  for p in paths:
    leaf = p.rsplit("/", 1)[1]
    if leaf == "embedding":
      assert "embed" in p, p
    elif leaf == "scale":
      assert "norm" in p, p
    elif "norm" not in p:
      assert re.fullmatch(r"layers/\d/(attention|mlp)/\w+/(kernel|bias)", p), p
      assert "embed" not in p, p
  assert len(paths) == 5 + 6 * 16
  kernel = nnx.state(model, nnx.Param)["layers"][0]["attention"]["query"]["kernel"]
  assert kernel[...].shape == (384, 384)

  graphdef, state = nnx.split(model)
  clone = nnx.merge(graphdef, state)
  batch = minilm.tokenize(tok, ["Round trip through split and merge."])
  a = minilm.encode(model, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
  b = minilm.encode(clone, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_linear_kernels_are_transposed_hf_weights(loaded, hf_tensors):
  model, _ = loaded
  np.testing.assert_array_equal(
      np.asarray(model.layers[2].mlp.intermediate.kernel[...]),
      hf_tensors["encoder.layer.2.intermediate.dense.weight"].T)
  np.testing.assert_array_equal(np.asarray(model.embeddings.word.embedding[...]),
                                hf_tensors["embeddings.word_embeddings.weight"])


def test_embeddings_have_unit_norm_and_are_order_independent(loaded):
  model, tok = loaded
  sents = text.sentences(64)
  emb = minilm.embed_sentences(model, tok, sents, batch_size=16)
  assert emb.shape == (64, 384) and emb.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
  # Batching, sorting and bucket padding do not change a sentence's embedding.
  alone = minilm.embed_sentences(model, tok, sents[5:6])
  np.testing.assert_allclose(alone[0], emb[5], atol=2e-6)


def test_paraphrase_is_closer_than_unrelated_real_sentences(loaded):
  model, tok = loaded
  real = text.sentences(40)
  originals = [o for o, _ in PARAPHRASES]
  for o in originals:
    assert o in real, o
  others = [s for s in real if s not in originals]
  emb = minilm.embed_sentences(model, tok, originals + [p for _, p in PARAPHRASES] + others)
  n = len(PARAPHRASES)
  orig, para, rest = emb[:n], emb[n:2 * n], emb[2 * n:]
  for i in range(n):
    pair = float(orig[i] @ para[i])
    unrelated = [float(orig[i] @ orig[j]) for j in range(n) if j != i]
    unrelated += [float(orig[i] @ para[j]) for j in range(n) if j != i]
    unrelated += list(rest @ orig[i]) + list(rest @ para[i])
    assert pair > 0.6 and pair > max(unrelated) + 0.05, (i, pair, max(unrelated))


def test_no_recompilation_for_same_bucket(loaded):
  model, tok = loaded
  minilm.embed_sentences(model, tok, ["First call compiles.", "Two sentences."])
  size = minilm._embed_batch._cache_size()
  minilm.embed_sentences(model, tok, ["Second call has other words", "but the same shape."])
  assert minilm._embed_batch._cache_size() == size


def test_long_input_is_truncated_to_256_tokens(loaded):
  model, tok = loaded
  long = " ".join(text.sentences(40))
  batch = minilm.tokenize(tok, [long])
  assert batch["input_ids"].shape == (1, 256) and batch["attention_mask"].sum() == 256
  emb = minilm.embed_sentences(model, tok, [long, "short"])
  assert np.all(np.isfinite(emb))


def test_bad_sentences_argument(loaded):
  model, tok = loaded
  with pytest.raises(TypeError, match="single string"):
    minilm.embed_sentences(model, tok, "not a list")
  with pytest.raises(ValueError, match="batch_size"):
    minilm.embed_sentences(model, tok, ["x"], batch_size=0)
  assert minilm.embed_sentences(model, tok, []).shape == (0, 384)


def test_missing_tensor_in_file_is_named(tmp_path, hf_tensors):
  tensors = dict(hf_tensors)
  del tensors["encoder.layer.3.attention.self.key.weight"]
  path = tmp_path / "model.safetensors"
  safetensors.numpy.save_file(tensors, str(path))
  with pytest.raises(ValueError, match=r"missing tensor\(s\): encoder\.layer\.3\.attention\.self"
                     r"\.key\.weight \(expected shape \(384, 384\)"):
    minilm.load_minilm(path)


def test_unexpected_and_misshapen_tensors_are_named(hf_tensors):
  tensors = dict(hf_tensors)
  tensors["cls.predictions.bias"] = np.zeros((30522,), np.float32)
  tensors["encoder.layer.0.output.dense.weight"] = np.zeros((384, 100), np.float32)
  tensors["encoder.layer.1.output.dense.bias"] = np.zeros((384,), np.int32)
  with pytest.raises(ValueError) as e:
    minilm.from_hf_tensors(tensors)
  msg = str(e.value)
  assert "unexpected tensor(s): cls.predictions.bias (shape (30522,) float32)" in msg
  assert "encoder.layer.0.output.dense.weight: shape (384, 100) float32" in msg
  assert "expected shape (384, 1536)" in msg
  assert "encoder.layer.1.output.dense.bias: shape (384,) int32 is not a floating-point" in msg


def test_bert_prefix_is_accepted(hf_tensors):
  prefixed = {f"bert.{k}": v for k, v in hf_tensors.items()}
  model = minilm.from_hf_tensors(prefixed)
  np.testing.assert_array_equal(np.asarray(model.layers[0].mlp_norm.bias[...]),
                                hf_tensors["encoder.layer.0.output.LayerNorm.bias"])


def test_matches_transformers_bert(tmp_path, loaded):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  model, tok = loaded
  (tmp_path / "model.safetensors").symlink_to(fetch.fetch(fetch.MINILM_SAFETENSORS))
  shutil.copy(fetch.fetch(minilm.MINILM_CONFIG), tmp_path / "config.json")
  ref = transformers.BertModel.from_pretrained(str(tmp_path), attn_implementation="eager",
                                               add_pooling_layer=False).eval()

  sents = text.sentences(24) + [" ".join(text.sentences(30)), "Short one."]
  encs = tok.encode_batch(sents)  # padded to the longest, truncated to 256
  ids = torch.tensor([e.ids for e in encs])
  mask = torch.tensor([e.attention_mask for e in encs])
  types = torch.tensor([e.type_ids for e in encs])
  with torch.no_grad():
    hidden = ref(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    m = mask[..., None].float()
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    expected = torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()

  ours_hidden = np.asarray(minilm.encode(model, ids.numpy(), mask.numpy(), types.numpy()))
  real = mask.numpy().astype(bool)
  np.testing.assert_allclose(ours_hidden[real], hidden.numpy()[real], atol=1e-4)

  got = minilm.embed_sentences(model, tok, sents, batch_size=8)
  cos = np.sum(got * expected, axis=1)
  assert cos.min() > 0.99999, cos.min()
  np.testing.assert_allclose(got, expected, atol=1e-5)
