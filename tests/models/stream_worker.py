"""One streamed quantization for tests/models/test_stream_processes.py (run as a script: JAX and
``jax.distributed`` must be set up before anything else).

``python stream_worker.py SRC OUT RESULTS [--process-id I --num-processes N --port P]
[--recipe R] [--shard-bytes B] [--fail-after-shards K] [--timeout S]``

* ``SRC``: a Hugging Face checkpoint directory; ``OUT``: the jq checkpoint to write
  (``jq.stream.quantize_to_dir``, RTN); ``RESULTS``: where ``<me>.json`` goes (``me`` is
  ``single`` or ``p<I>``): the result's counts and log, and ``created``, the shard files this
  process wrote (in order).
* ``--process-id``: one of ``--num-processes`` ``jax.distributed`` processes on localhost (key-value
  store only: no CPU collectives); without it, one process.
* ``--fail-after-shards K``: raise a RuntimeError once this process has written K shards.
* on an error, ``error.<me>.txt`` in ``RESULTS`` holds ``<type>: <message>`` and the exit status
  is 3.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _args(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("src")
  ap.add_argument("out")
  ap.add_argument("results")
  ap.add_argument("--process-id", type=int, default=None)
  ap.add_argument("--num-processes", type=int, default=2)
  ap.add_argument("--port", type=int, default=0)
  ap.add_argument("--recipe", default="w4a16-g32")
  ap.add_argument("--shard-bytes", type=int, default=20_000)
  ap.add_argument("--fail-after-shards", type=int, default=0)
  ap.add_argument("--timeout", type=float, default=60.0)
  return ap.parse_args(argv)


def main(argv=None) -> int:
  a = _args(argv)
  import jax
  jax.config.update("jax_numpy_dtype_promotion", "strict")   # as in the test suite
  import jq
  import jq.distributed
  me = "single"
  if a.process_id is not None:
    jq.distributed.initialize(f"localhost:{a.port}", a.num_processes, a.process_id,
                              cpu_collectives="none", timeout_s=a.timeout,
                              init_timeout_s=int(a.timeout))
    me = f"p{a.process_id}"
  import jax.numpy as jnp
  from jq import nn as jqnn
  from jq import stream
  from jq.io import sharded
  from jq_models import hf, registry
  from pathlib import Path

  created: list[str] = []
  real_close = sharded.ShardedWriter._close

  def close(self):   # records the shards this process writes; fails after K of them
    file = self.shards[self._open[0]].file
    real_close(self)
    created.append(file)
    if a.fail_after_shards and len(created) >= a.fail_after_shards:
      raise RuntimeError(f"simulated failure in process {a.process_id} after writing {file}")

  sharded.ShardedWriter._close = close
  try:
    config = hf.family_config(hf.read_json(Path(a.src) / "config.json"))
    module = registry.decoder_module(config)
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    layouts = jqnn.layouts(module, jax.eval_shape(module.init, jax.random.key(0), tokens), tokens)
    t = time.perf_counter()
    res = stream.quantize_to_dir(hf.stream_sources(a.src, config), jq.recipe_rules(a.recipe),
                                 a.out, layouts=layouts, max_shard_bytes=a.shard_bytes,
                                 metadata={"recipe": a.recipe})
  except Exception as e:  # pylint: disable=broad-except
    with open(os.path.join(a.results, f"error.{me}.txt"), "w") as f:
      f.write(f"{type(e).__name__}: {e}")
    import traceback
    traceback.print_exc()
    return 3
  with open(os.path.join(a.results, f"{me}.json"), "w") as f:
    json.dump({"out": res.out, "written": res.written, "resumed": res.resumed,
               "bytes_in": res.bytes_in, "log": res.log, "created": created,
               "seconds": time.perf_counter() - t}, f)
  print(f"{me}: done in {time.perf_counter() - t:.1f} s", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
