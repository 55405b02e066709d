"""Train-step memory with and without the chunked linear cross entropy (model.loss_chunk).

  python benchmarks/loss_memory.py [--preset smollm2-135m] [--seq 2048] [--batch 4]
      [--chunk 256] [--remat none|full|dots] [--dtype float32|bfloat16] [--attention auto]

Compile-only (nothing runs, so a CPU will do): lowers the jitted AdamW train step of the preset
(layers scanned) for one batch and prints XLA's temp bytes (activations and other scratch, the
step's peak working set beside its parameters and optimizer state) of the plain loss, which
materialises [B, T, V] fp32 logits, and of the chunked one, and their ratio. On a CPU the xla
attention's [H, T, T] scores dominate a step's memory; `--attention triton` (Pallas interpret
mode, blockwise like the GPU and TPU kernels) leaves the logits as the largest activation.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


MiB = 1 << 20


def temp_bytes(cfg, batch: int, seq: int) -> tuple[int, float]:
  """(temp bytes, compile seconds) of the compiled train step of `cfg` on [batch, seq]."""
  import jax
  import jax.numpy as jnp
  import ml_collections

  from jaxlm import sharding
  from jaxlm.config import base_config
  from jaxlm.data.batch import Batch
  from jaxlm.models.transformer import Transformer
  from jaxlm.train import objectives, optim
  from jaxlm.train import step as step_lib

  model = Transformer(cfg)
  tx, _ = optim.make_optimizer(base_config().optim, 1000)
  mesh = sharding.make_mesh(
    ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)), jax.devices()[:1]
  )
  abstract, shardings = step_lib.abstract_state(model, tx, mesh)
  tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  abstract_batch = Batch(inputs=tokens, targets=tokens)
  step = step_lib.jit_train_step(shardings, objectives.for_head("lm"))
  t0 = time.perf_counter()
  with sharding.mesh_rules(mesh):
    compiled = step.lower(abstract, abstract_batch).compile()
  return compiled.memory_analysis().temp_size_in_bytes, time.perf_counter() - t0


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="smollm2-135m")
  parser.add_argument("--seq", type=int, default=2048)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--chunk", type=int, default=256, help="positions per loss chunk")
  parser.add_argument("--remat", default="none", choices=("none", "full", "dots"))
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--attention", default="auto", help="model.attention (auto, xla, triton..)")
  args = parser.parse_args()

  from jaxlm.models.config import preset

  cfg = preset(
    args.preset,
    scan_layers=True,
    remat=args.remat,
    dtype=args.dtype,
    max_seq_len=max(args.seq, 1),
    attention=args.attention,
  )
  logits = args.batch * args.seq * cfg.vocab_size * 4
  print(
    f"{args.preset}: V={cfg.vocab_size} D={cfg.embed_dim} L={cfg.num_layers}, "
    f"batch {args.batch} x T {args.seq}, {args.dtype}, remat={args.remat}; "
    f"[B, T, V] fp32 logits = {logits / MiB:.0f} MiB"
  )
  plain, t_plain = temp_bytes(cfg.replace(loss_chunk=0), args.batch, args.seq)
  print(f"  plain logits loss:        temp {plain / MiB:9.1f} MiB  (compiled in {t_plain:.0f} s)")
  chunked, t_chunk = temp_bytes(cfg.replace(loss_chunk=args.chunk), args.batch, args.seq)
  print(
    f"  chunked loss (chunk {args.chunk:4d}): temp {chunked / MiB:9.1f} MiB  "
    f"(compiled in {t_chunk:.0f} s)"
  )
  print(f"  ratio chunked / plain: {chunked / plain:.3f} ({plain / chunked:.2f}x less)")


if __name__ == "__main__":
  main()
