"""quantize_tree on sharded parameters keeps every leaf sharded (8 simulated CPU devices).

The check runs in a subprocess with ``--xla_force_host_platform_device_count=8`` set before JAX is
imported, so the rest of the suite keeps its single device.
"""
from __future__ import annotations

import pathlib
import subprocess
import sys
import textwrap


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import spawn  # noqa: E402  pylint: disable=wrong-import-position

ROOT = pathlib.Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(r'''
import os
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jq import spec as S
from jq import tree as T
from jq.qarray import QArray
from jq.qtypes import QType

assert jax.device_count() == 8, jax.devices()
jax.config.update("jax_numpy_dtype_promotion", "strict")
rng = np.random.default_rng(0)
w = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
params = {"params": {
    "l0": {"kernel": w(256, 512), "bias": w(512)},
    "l1": {"kernel": w(300, 448)},  # 300 rows: a partial last group of 128
    "embed": {"embedding": w(64, 512)},
}}
SPECS = {AxisType.Explicit: [S.W8A16, S.W4A16_G128, S.NF4_G64, S.W2A16_G32],
         AxisType.Auto: [S.W4A16_G128, S.QuantSpec(qtype=QType.INT4, granularity=S.Granularity.GROUP,
                                                    group_size=128)]}
checked = 0
for axis_type in (AxisType.Explicit, AxisType.Auto):
  mesh = jax.make_mesh((8,), ("x",), axis_types=(axis_type,))
  # output channels sharded (tensor parallel): every leaf stays sharded on its last axis
  col = jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, P(*([None] * (a.ndim - 1)), "x"))),
                     params)
  for spec in SPECS[axis_type]:
    rules = S.default_rules(spec)
    f = jax.jit(lambda p: T.quantize_tree(p, rules))
    compiled = f.lower(col).compile()
    out = compiled(col)
    ref = jax.jit(lambda p: T.quantize_tree(p, rules))(params)  # unsharded, one device
    hlo = compiled.as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo, (axis_type, spec.describe())
    refs = dict(T.leaves_with_paths(ref))
    for path, q in T.leaves_with_paths(out):
      if not isinstance(q, QArray):
        continue
      leaves = {"values": q.values, "scale": q.scale, "zero_point": q.zero_point}
      for name, leaf in leaves.items():
        if leaf is None:
          continue
        sh = leaf.sharding
        assert isinstance(sh, NamedSharding), (path, name, sh)
        assert tuple(sh.spec) == (None, "x"), (axis_type, spec.describe(), path, name, sh.spec)
        assert not sh.is_fully_replicated
        # each device holds 1/8 of the channels
        assert leaf.addressable_shards[0].data.shape[-1] * 8 == leaf.shape[-1]
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(getattr(refs[path], name)))
        checked += 1
    deq = jax.jit(T.dequantize_tree)(out)
    k = deq["params"]["l1"]["kernel"]
    assert tuple(k.sharding.spec) == (None, "x"), k.sharding
    np.testing.assert_array_equal(np.asarray(k), np.asarray(T.dequantize_tree(ref)["params"]["l1"]["kernel"]))

  # input rows sharded (FSDP-style), groups of 32 inside each 64-row shard
  row = {"params": {"l0": {"kernel": jax.device_put(params["params"]["l0"]["kernel"][:, :64],
                                                    NamedSharding(mesh, P("x", None)))}}}
  spec = S.W2A16_G32
  out = jax.jit(lambda p: T.quantize_tree(p, S.default_rules(spec)))(row)
  q = out["params"]["l0"]["kernel"]
  ref = T.quantize_tree(jax.device_get(row), S.default_rules(spec))["params"]["l0"]["kernel"]
  for name in ("values", "scale", "zero_point"):
    leaf = getattr(q, name)
    assert tuple(leaf.sharding.spec)[0] == "x", (axis_type, name, leaf.sharding.spec)
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(getattr(ref, name)))
    checked += 1
print("SHARDING-OK", checked)
''')


def test_quantize_tree_keeps_leaves_sharded():
  proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=spawn.env(8),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0 and "SHARDING-OK" in proc.stdout, (
      f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}")
