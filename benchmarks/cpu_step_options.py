"""The nanoGPT recipe's train step on the CPU, XLA's default fusions vs runtime.cpu_step_options.

  python benchmarks/cpu_step_options.py [--rounds 12] [--steps 20]

Both programs are compiled from one lowering of jaxlm's jitted train step (2 CPU devices, the
recipe's model, optimizer and batches) and run in the same process, alternating blocks of
`--steps` steps (A B, B A, ...), each from its own copy of the state, so a busy machine slows
both alike. Prints each variant's median ms a step and the median per-round ratio B / A (below 1:
the options are faster), and both final losses.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "tinyshakespeare", "input.txt")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=12)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--data", default=DATA, help="Tiny Shakespeare input.txt")
  args = parser.parse_args()

  import jax

  from jaxlm import runtime

  runtime.limit_malloc_arenas()
  jax.config.update("jax_num_cpu_devices", 2)
  from configs import shakespeare_char
  from jaxlm import sharding
  from jaxlm.train import objectives, trainer
  from jaxlm.train import step as step_lib

  config = shakespeare_char.get_config()
  config.data.path = args.data
  run = trainer.setup(config, os.path.join("/tmp", "jaxlm-cpu-step-options"))
  state, shardings = step_lib.sharded_init(run.model, run.tx, jax.random.PRNGKey(0), run.mesh)
  batches = [sharding.global_batch(next(run.mode.batches), run.mesh) for _ in range(8)]
  rows = config.train.batch_size * config.data.seq_len // sharding.batch_divisor(run.mesh)
  options = runtime.cpu_step_options(rows, run.model.cfg.embed_dim)
  print(f"{rows} rows x {run.model.cfg.embed_dim} per device; B's options: {options}")
  fn = step_lib.jit_train_step(shardings, objectives.for_head("lm"))
  with sharding.mesh_rules(run.mesh):
    lowered = fn.lower(state, batches[0])
    programs = {"A": lowered.compile(), "B": lowered.compile(compiler_options=options)}
  states = {"A": state, "B": jax.tree.map(lambda x: x.copy(), state)}
  times, ratios, losses = {"A": [], "B": []}, [], {}
  for r in range(args.rounds + 1):
    for name in ("A", "B") if r % 2 == 0 else ("B", "A"):
      s, start = states[name], time.perf_counter()
      for i in range(args.steps):
        s, metrics = programs[name](s, batches[i % len(batches)])
      losses[name] = float(metrics["loss"])
      if r:  # round 0 warms both up
        times[name].append((time.perf_counter() - start) / args.steps * 1e3)
      states[name] = s
    if r:
      ratios.append(times["B"][-1] / times["A"][-1])
  print(f"A (XLA's defaults)      {statistics.median(times['A']):6.2f} ms a step, "
        f"loss {losses['A']:.5f}")
  print(f"B (cpu_step_options)    {statistics.median(times['B']):6.2f} ms a step, "
        f"loss {losses['B']:.5f}")
  print(f"B / A: median of {args.rounds} rounds {statistics.median(ratios):.3f} "
        f"(min {min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
  main()
