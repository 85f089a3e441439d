"""The streamed road (``jq.stream`` + ``jq.io.sharded``) on Hugging Face checkpoint directories:
the same tree as ``jq.quantize_tree`` bit for bit, resumable, atomic, and every bad input named."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jq
from jq import cli, stream
from jq import io as jqio
from jq import nn as jqnn
from jq import tree as jqtree
from jq.io import sharded
from jq.io.codec import CheckpointError
from jq_models import hf, registry

RECIPES = ["w4a16-g32", "w8a16", "w2a16-g32", "nf4-g64", "w8a8-dynamic"]


def _layouts(config):
  module = registry.decoder_module(config)
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  return jqnn.layouts(module, jax.eval_shape(module.init, jax.random.key(0), tokens), tokens)


def _flat(tree):
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_same(a, b):
  fa, fb = _flat(a), _flat(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    assert fa[k].dtype == fb[k].dtype and fa[k].shape == fb[k].shape, k
    assert np.array_equal(fa[k], fb[k]), k
  assert jax.tree.structure(a) == jax.tree.structure(b)


def _in_memory(path, rules):
  config, params = hf.load_weights(path)
  variables = {"params": jax.tree.map(jnp.asarray, params)}
  return jqtree.quantize_tree(variables, rules, layouts=_layouts(config)), config


@pytest.mark.parametrize("recipe", RECIPES)
def test_streamed_equals_quantize_tree_bit_for_bit(tiny_hf, tmp_path, recipe):
  path = tiny_hf("qwen2", dtype=ml_dtypes.bfloat16, shards=2)
  rules = jq.recipe_rules(recipe)
  want, config = _in_memory(path, rules)
  out = tmp_path / "out"
  # tiny chunks (gate/up are read in 64-column chunks) and shards (several output files)
  res = stream.quantize_to_dir(hf.stream_sources(path, config), rules, str(out),
                               layouts=_layouts(config), max_shard_bytes=20_000,
                               chunk_bytes=64 * 64 * 4)
  assert res.written == len(hf.stream_sources(path, config)) and res.resumed == 0
  assert len(list(sharded.iter_shard_paths(out))) > 2
  _assert_same(jqio.load(out), want)
  lazy = jqio.load(out, lazy=True)   # leaves read one at a time, from their shards
  assert all(isinstance(x, jqio.LazyLeaf) for x in jax.tree.leaves(lazy))
  _assert_same(jax.tree.map(jqio.load_leaf, lazy), want)
  header = jqio.load_header(out)
  assert header["verified"] and header["metadata"] == {}
  assert jqio.rules_from_header(header) == tuple(rules)


def test_column_chunks_equal_the_whole_tensor():
  rng = np.random.default_rng(0)
  tree = {"a": {"kernel": jnp.asarray(rng.standard_normal((96, 200)), jnp.bfloat16)},
          "b": {"kernel": jnp.asarray(rng.standard_normal((64, 130)), jnp.float32)},
          "n": {"scale": jnp.ones((64,), jnp.float32)}}
  for recipe in ("w4a16-g32", "w8a16", "w2a16-g32", "nf4-g64"):
    rules = jq.recipe_rules(recipe)
    whole = jqtree.quantize_tree(tree, rules)
    for chunk in (1, 64 * 96 * 4, 128 * 96 * 4):
      _assert_same(stream.quantize_in_memory(tree, rules, chunk_bytes=chunk), whole)


def _run(path, config, out, rules=None, **kw):
  return stream.quantize_to_dir(hf.stream_sources(path, config),
                                rules or jq.recipe_rules("w4a16-g32"), str(out),
                                layouts=_layouts(config), max_shard_bytes=20_000, **kw)


def test_interrupted_run_resumes_and_verifies_finished_shards(tiny_hf, tmp_path, monkeypatch):
  path = tiny_hf("llama", dtype=ml_dtypes.bfloat16)
  config, _ = registry.hf_source(path)
  want = jqio.load(_run(path, config, tmp_path / "ref").out)

  out = tmp_path / "out"
  sources = hf.stream_sources(path, config)
  calls = {"n": 0}

  def dying(a, b, real=sources[20].read):
    calls["n"] += 1
    raise OSError("simulated: the machine went away")

  sources[20] = dataclasses_replace(sources[20], read=dying)
  with pytest.raises(OSError, match="simulated"):
    stream.quantize_to_dir(sources, jq.recipe_rules("w4a16-g32"), str(out),
                           layouts=_layouts(config), max_shard_bytes=20_000)
  assert calls["n"] == 1 and not out.exists()      # no half-written output that looks complete
  work = sharded.work_dir(out)
  done = [n for n in os.listdir(work) if n.endswith(".safetensors")]
  assert done and not [n for n in os.listdir(work) if n.endswith(".jq-tmp")]
  with pytest.raises(CheckpointError, match="without jq.index.json"):
    jqio.load(work)

  res = _run(path, config, out)
  assert res.resumed > 0 and res.written + res.resumed == len(sources)
  assert any("resuming" in line for line in res.log)
  _assert_same(jqio.load(out), want)
  assert not os.path.exists(work)


def dataclasses_replace(obj, **kw):
  import dataclasses
  return dataclasses.replace(obj, **kw)


def test_a_damaged_finished_shard_is_written_again(tiny_hf, tmp_path):
  path = tiny_hf("llama", dtype=ml_dtypes.bfloat16)
  config, _ = registry.hf_source(path)
  want = jqio.load(_run(path, config, tmp_path / "ref").out)
  out = tmp_path / "out"
  sources = hf.stream_sources(path, config)

  def dying(a, b):
    raise OSError("simulated")

  sources[-1] = dataclasses_replace(sources[-1], read=dying)
  with pytest.raises(OSError):
    stream.quantize_to_dir(sources, jq.recipe_rules("w4a16-g32"), str(out),
                           layouts=_layouts(config), max_shard_bytes=20_000)
  work = sharded.work_dir(out)
  first = sorted(n for n in os.listdir(work) if n.endswith(".safetensors"))[0]
  with open(os.path.join(work, first), "r+b") as f:   # flip a byte of its data
    f.seek(-3, os.SEEK_END)
    b = f.read(1)
    f.seek(-3, os.SEEK_END)
    f.write(bytes([b[0] ^ 0x40]))
  res = _run(path, config, out)
  assert any(first in line and "writing it again" in line for line in res.log)
  _assert_same(jqio.load(out), want)


def test_partial_run_of_other_inputs_is_not_resumed(tiny_hf, tmp_path):
  path = tiny_hf("llama")
  config, _ = registry.hf_source(path)
  out = tmp_path / "out"
  sources = hf.stream_sources(path, config)
  sources[-1] = dataclasses_replace(sources[-1], read=lambda a, b: (_ for _ in ()).throw(
      OSError("simulated")))
  with pytest.raises(OSError):
    stream.quantize_to_dir(sources, jq.recipe_rules("w4a16-g32"), str(out),
                           layouts=_layouts(config), max_shard_bytes=20_000)
  with pytest.raises(ValueError, match=r"other inputs.*plan|other inputs.*rules"):
    _run(path, config, out, rules=jq.recipe_rules("w8a16"))
  res = _run(path, config, out, rules=jq.recipe_rules("w8a16"), resume=False)
  assert res.resumed == 0 and jqio.load_header(out)["verified"]


def test_disk_full_leaves_no_output_and_no_temporary_file(tiny_hf, tmp_path, monkeypatch):
  path = tiny_hf("llama")
  config, _ = registry.hf_source(path)
  out = tmp_path / "out"
  real = sharded.ShardedWriter._start
  n = {"shards": 0}

  def start(self, i):
    real(self, i)
    n["shards"] += 1
    if n["shards"] == 2:   # the second shard's file refuses its first tensor
      f = self._open[1]

      class Full:
        def __getattr__(self, name):
          return getattr(f, name)

        def write(self, data):
          raise OSError(28, "No space left on device")

      self._open = (self._open[0], Full(), *self._open[2:])

  monkeypatch.setattr(sharded.ShardedWriter, "_start", start)
  with pytest.raises(OSError, match="No space left"):
    _run(path, config, out)
  assert not out.exists()
  work = sharded.work_dir(out)
  assert not [n for n in os.listdir(work) if n.endswith(".jq-tmp")]
  assert len([n for n in os.listdir(work) if n.endswith(".safetensors")]) == 1


def test_nan_in_a_source_tensor_is_named(tiny_hf, tmp_path):
  path = tiny_hf("llama")
  config, _ = registry.hf_source(path)
  sources = hf.stream_sources(path, config)
  i = next(i for i, s in enumerate(sources) if s.path.endswith("layers_1/mlp/up_proj/kernel"))

  def poisoned(a, b, read=sources[i].read):
    x = np.array(read(a, b))
    x[3, 0] = np.nan
    return x

  sources[i] = dataclasses_replace(sources[i], read=poisoned)
  with pytest.raises(ValueError, match=r"params/layers_1/mlp/up_proj/kernel.*NaN"):
    stream.quantize_to_dir(sources, jq.recipe_rules("w4a16-g32"), str(tmp_path / "out"),
                           layouts=_layouts(config))
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("recipe,match", [("gptq-w4a16-g128", "needs calibration"),
                                          ("w8a8-static", "static activation")])
def test_calibrated_rules_are_refused_before_any_work(tiny_hf, tmp_path, recipe, match):
  path = tiny_hf("llama")
  config, _ = registry.hf_source(path)
  with pytest.raises(ValueError, match=r"params/layers_0/.*" + match):
    _run(path, config, tmp_path / "out", rules=jq.recipe_rules(recipe))
  assert not os.path.exists(sharded.work_dir(tmp_path / "out"))


def test_truncated_and_missing_input_shards_are_named(tiny_hf):
  path = tiny_hf("llama", shards=2)
  config, _ = registry.hf_source(path)
  shard = path / "model-00002-of-00002.safetensors"
  data = shard.read_bytes()
  shard.write_bytes(data[:-100])
  with pytest.raises(hf.CheckpointError, match="model-00002-of-00002.safetensors.*truncated"):
    hf.stream_sources(path, config)
  shard.unlink()
  with pytest.raises(hf.CheckpointError, match="model-00002-of-00002.safetensors.*missing"):
    hf.stream_sources(path, config)


def _sharded_ckpt(tmp_path):
  rng = np.random.default_rng(1)
  tree = {"params": {f"l{i}": {"kernel": jnp.asarray(rng.standard_normal((64, 32)), jnp.float32),
                               "bias": jnp.zeros((32,), jnp.float32)} for i in range(4)}}
  rules = jq.recipe_rules("w4a16-g32")
  out = tmp_path / "ck"
  res = stream.quantize_to_dir(stream.tree_sources(tree), rules, str(out), max_shard_bytes=1500)
  return out, jqtree.quantize_tree(tree, rules), res


def test_sharded_checkpoint_checks_on_load(tmp_path):
  out, want, _ = _sharded_ckpt(tmp_path)
  _assert_same(jqio.load(out), want)
  mesh = jax.make_mesh((1,), ("x",))
  placed = jqio.load(out, shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  _assert_same(placed, want)
  shards = sorted(p.name for p in out.glob("model-*.safetensors"))
  assert len(shards) >= 3

  # a flipped data byte: a named digest failure with verify, none without
  f = out / shards[1]
  raw = bytearray(f.read_bytes())
  raw[-1] ^= 1
  f.write_bytes(bytes(raw))
  with pytest.raises(CheckpointError, match="fails its CRC-32"):
    jqio.load(out)
  jqio.load(out, verify=False)
  raw[-1] ^= 1
  f.write_bytes(bytes(raw))

  # the index: any edit fails the integrity check; shard names cannot leave the directory
  index = out / sharded.INDEX
  header = json.loads(index.read_text())
  name = next(iter(header["shards"]))
  for bad in ("../elsewhere.safetensors", "/etc/passwd"):
    edited = dict(header, shards={**header["shards"], name: bad})
    index.write_text(json.dumps(edited))
    with pytest.raises(CheckpointError, match="not a .safetensors file name inside"):
      jqio.load(out)
  edited = dict(header, metadata={"model": "other"})
  index.write_text(json.dumps(edited))
  with pytest.raises(CheckpointError, match="SHA-256"):
    jqio.load_header(out)
  index.write_text(json.dumps(header))

  # a missing shard, a truncated one
  (out / shards[0]).rename(tmp_path / "aside")
  with pytest.raises(CheckpointError, match=f"shard '{shards[0]}'.*missing"):
    jqio.load(out)
  (tmp_path / "aside").rename(out / shards[0])
  f.write_bytes(bytes(raw[:-7]))
  with pytest.raises(CheckpointError, match="truncated|trailing|needs"):
    jqio.load(out)


def test_cli_streams_and_reads_the_directory_back(tiny_hf, tmp_path, capsys):
  path = tiny_hf("qwen3", dtype=ml_dtypes.bfloat16, shards=2)
  out = tmp_path / "q"
  assert cli.main(["quantize", "--model", str(path), "--stream", "--recipe", "w4a16-g32",
                   "--out", str(out)]) == 0
  text = capsys.readouterr().out
  assert "peak memory (RSS)" in text and "GiB/s" in text
  meta = jqio.load_header(out)["metadata"]
  assert meta["streamed"] and meta["source"]["kind"] == "hf" and meta["recipe"] == "w4a16-g32"
  want, _ = _in_memory(path, jq.recipe_rules("w4a16-g32"))
  _assert_same(jqio.load(out), want)
  assert cli.main(["eval", str(out), "--json", "--eval-windows", "1", "--window", "64"]) == 0
  assert json.loads(capsys.readouterr().out)["kl"] > 0
  assert cli.main(["inspect", str(out)]) == 0
  assert "params/layers_2/mlp/down_proj/kernel" in capsys.readouterr().out
  # above --stream-above the streamed road is the default
  out2 = tmp_path / "q2"
  assert cli.main(["quantize", "--model", str(path), "--stream-above", "0.00001",
                   "--recipe", "w4a16-g32", "--out", str(out2)]) == 0
  _assert_same(jqio.load(out2), want)


@pytest.mark.parametrize("argv,match", [
    (["--stream", "--model", "smollm2"], "--stream reads a Hugging Face checkpoint"),
    (["--stream", "--stream-above", "0"], "--stream-above"),
    (["--stream", "--shard-size", "nan"], "--shard-size"),
])
def test_cli_stream_mistakes(tiny_hf, tmp_path, capsys, argv, match):
  path = tiny_hf("llama")
  args = ["quantize", "--model", str(path), "--out", str(tmp_path / "o"), *argv]
  try:
    rc = cli.main(args)
  except SystemExit as e:   # argparse
    rc = e.code
  assert rc != 0
  err = capsys.readouterr().err
  assert match in err


def test_cli_stream_out_is_a_file(tiny_hf, tmp_path, capsys):
  path = tiny_hf("llama")
  (tmp_path / "f").write_text("x")
  assert cli.main(["quantize", "--model", str(path), "--stream", "--out",
                   str(tmp_path / "f")]) == 1
  assert "--out" in capsys.readouterr().err
