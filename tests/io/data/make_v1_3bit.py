"""Writes ``v1_3bit.safetensors`` and ``v1_3bit_sharded/``: checkpoints of format version 1, whose
3-bit values sit in 4-bit slots, with ``v1_3bit_expected.safetensors`` (the codes and float32
values that jq 0.1 read from them).  The committed files were written by jq at commit 99692ca
(before dense 3-bit packing) with ``python tests/io/data/make_v1_3bit.py``; a later jq writes
version 2, so running this again does not reproduce them.
"""
import os

import jax.numpy as jnp
import numpy as np
import safetensors.numpy

import jq
from jq import spec as S
from jq.qtypes import QType

HERE = os.path.dirname(os.path.abspath(__file__))


def tree():
  rng = np.random.default_rng(3)

  def w(shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)

  int3_g16 = S.QuantSpec(qtype=QType.INT3, granularity=S.Granularity.GROUP, group_size=16)
  uint3 = S.QuantSpec(qtype=QType.UINT3, symmetric=False)
  return {"params": {"a": {"kernel": jq.quantize(w((32, 21)), int3_g16)},   # 21: a partial byte
                     "b": {"kernel": jq.quantize(w((16, 10)), uint3), "bias": w((10,))},
                     "c": {"kernel": jq.quantize(w((16, 12)), jq.W4A16_G32)}}}


def main():
  t = tree()
  jq.io.save(os.path.join(HERE, "v1_3bit.safetensors"), t, metadata={"made_by": "make_v1_3bit"})
  leaves = jq.tree.leaves_with_paths(t)
  writer = jq.io.sharded.ShardedWriter(os.path.join(HERE, "v1_3bit_sharded"), leaves,
                                       max_shard_bytes=600)
  for path, leaf in leaves:
    writer.add(path, leaf)
  writer.finish(metadata={"made_by": "make_v1_3bit"})
  expected = {}
  for path, q in leaves:
    if isinstance(q, jq.QArray):
      expected[f"{path}.codes"] = np.asarray(q.unpacked())
      expected[f"{path}.float"] = np.asarray(q.dequantize(jnp.float32))
  safetensors.numpy.save_file(expected, os.path.join(HERE, "v1_3bit_expected.safetensors"))


if __name__ == "__main__":
  main()
