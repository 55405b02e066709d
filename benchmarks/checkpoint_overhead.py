"""What a checkpoint save costs the training loop: synchronous vs asynchronous, same state.

  PYTHONPATH=. python benchmarks/checkpoint_overhead.py [--mb 200] [--repeats 3]

Saves a state of about `--mb` MB (float32 arrays sharded over the local devices) through
jaxlm.checkpoint.Checkpointer, and prints, side by side: the time the loop is blocked by a
synchronous save, the time it is blocked by an asynchronous one (the device-to-host copy; the
write continues in the background), their ratio, and the slowdown of a simulated training loop
that keeps stepping while the asynchronous write runs.
"""

import argparse
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlm import checkpoint


def make_state(total_mb: float) -> dict:
  """A params + two Adam moments-like pytree of ~total_mb MB, rows sharded over the devices."""
  mesh = jax.make_mesh((len(jax.devices()),), ("data",))
  shard = NamedSharding(mesh, P("data"))
  rows = 1024 * len(jax.devices())
  cols = max(int(total_mb * 2**20 / 4 / 3 / 8 / rows), 1)
  key = jax.random.PRNGKey(0)

  def leaf(i):
    return jax.device_put(jax.random.normal(jax.random.fold_in(key, i), (rows, cols)), shard)

  return {name: {f"layer_{i}": leaf(j * 8 + i) for i in range(8)}
          for j, name in enumerate(("params", "mu", "nu"))}


def nbytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def time_saves(directory: str, state: dict, use_async: bool, repeats: int):
  """(blocking seconds of each save() call, seconds until each was fully on disk)."""
  ckpt = checkpoint.Checkpointer(directory, keep=1, use_async=use_async)
  blocked, total = [], []
  for step in range(1, repeats + 1):
    jax.block_until_ready(state)
    start = time.perf_counter()
    ckpt.save(step, state, {"step": step}, {"bench": True})
    blocked.append(time.perf_counter() - start)
    ckpt.wait()
    total.append(time.perf_counter() - start)
  ckpt.close()
  return blocked, total


def loop_slowdown(directory: str, state: dict, steps: int) -> tuple[float, float]:
  """Seconds of `steps` simulated train steps alone, and with an async save started first."""
  x = jnp.ones((512, 512))
  step_fn = jax.jit(lambda a: jnp.tanh(a @ a) * 0.5)

  def run_steps():
    y = x
    for _ in range(steps):
      y = step_fn(y)
    y.block_until_ready()

  run_steps()  # compile
  start = time.perf_counter()
  run_steps()
  alone = time.perf_counter() - start
  ckpt = checkpoint.Checkpointer(directory, keep=1, use_async=True)
  start = time.perf_counter()
  ckpt.save(1, state, {"step": 1}, {})
  run_steps()
  with_save = time.perf_counter() - start
  ckpt.close()
  return alone, with_save


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--mb", type=float, default=200.0, help="state size in MB")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--loop_steps", type=int, default=100)
  parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
  args = parser.parse_args()
  state = make_state(args.mb)
  print(f"state: {nbytes(state) / 2**20:.0f} MiB in {len(jax.tree.leaves(state))} arrays on "
        f"{len(jax.devices())} {jax.devices()[0].platform} device(s)")
  with tempfile.TemporaryDirectory(dir=args.dir) as root:
    sync_blocked, _ = time_saves(os.path.join(root, "sync"), state, False, args.repeats)
    async_blocked, async_total = time_saves(os.path.join(root, "async"), state, True, args.repeats)
    alone, with_save = loop_slowdown(os.path.join(root, "loop"), state, args.loop_steps)
  sync_s, async_s = statistics.median(sync_blocked), statistics.median(async_blocked)
  print(f"{'':34s}{'synchronous':>14s}{'asynchronous':>14s}")
  print(f"{'loop blocked per save (median, s)':34s}{sync_s:14.3f}{async_s:14.3f}")
  print(f"{'until on disk (median, s)':34s}{sync_s:14.3f}{statistics.median(async_total):14.3f}")
  print(f"ratio async/sync blocking: {async_s / sync_s:.3f} "
        f"({'under' if async_s < 0.1 * sync_s else 'NOT under'} the 10% target)")
  print(f"simulated loop of {args.loop_steps} steps: {alone:.3f} s alone, "
        f"{with_save:.3f} s with an "
        f"async save started first (+{with_save - alone:.3f} s, "
        f"{(with_save - alone) / sync_s:.3f} of a synchronous save)")


if __name__ == "__main__":
  main()
