"""Training throughput: jaxlm vs Hugging Face GPT2LMHeadModel on PyTorch, same model, same run.

  python benchmarks/train_throughput.py [--steps 30] [--warmup 5]

GPT-2-style model: 6 layers, 384 dims, 6 heads, vocab 8192, sequence 256, batch 8, AdamW, fp32.
Prints the median step time and tokens/s of each and the ratio jaxlm / PyTorch.
"""

import argparse
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxlm import runtime  # noqa: E402

LAYERS, DIM, HEADS, VOCAB, SEQ, BATCH = 6, 384, 6, 8192, 256, 8
LR, WD = 3e-4, 0.1


def batches(n, seed=0):
  import numpy as np

  rng = np.random.default_rng(seed)
  return [rng.integers(0, VOCAB, (BATCH, SEQ + 1)).astype(np.int32) for _ in range(n)]


def run_jaxlm(data, warmup):
  import jax
  import ml_collections

  from jaxlm import sharding
  from jaxlm.config import base_config
  from jaxlm.models.config import preset
  from jaxlm.models.transformer import Transformer
  from jaxlm.train import objectives, optim
  from jaxlm.train import step as step_lib

  model = Transformer(preset("gpt2", vocab_size=VOCAB, num_layers=LAYERS, embed_dim=DIM,
                             num_heads=HEADS, max_seq_len=SEQ))
  ocfg = base_config().optim
  ocfg.update(dict(lr=LR, min_lr=LR, warmup_steps=0, weight_decay=WD, b2=0.999, clip=0.0))
  tx, _ = optim.make_optimizer(ocfg, 10_000)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
  state, shardings = step_lib.sharded_init(model, tx, jax.random.PRNGKey(0), mesh)
  fn = step_lib.jit_train_step(shardings, objectives.for_head("lm"))
  times = []
  with sharding.mesh_rules(mesh):
    for i, chunk in enumerate(data):
      batch = sharding.global_batch({"inputs": chunk[:, :-1], "targets": chunk[:, 1:]}, mesh)
      t0 = time.perf_counter()
      state, metrics = fn(state, batch)
      loss = float(metrics["loss"])
      times.append(time.perf_counter() - t0)
  return times[warmup:], loss, f"{len(jax.devices())} XLA {jax.default_backend()} device(s)"


def run_torch(data, warmup, device):
  import torch
  from transformers import GPT2Config, GPT2LMHeadModel

  torch.manual_seed(0)
  torch.set_float32_matmul_precision("high")  # TF32 on GPU, as XLA's default fp32 dot uses
  cfg = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=DIM, n_layer=LAYERS, n_head=HEADS,
                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
  model = GPT2LMHeadModel(cfg).to(device).train()
  opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
  times = []
  for chunk in data:
    x = torch.from_numpy(chunk).long().to(device)
    t0 = time.perf_counter()
    out = model(input_ids=x[:, :-1], labels=x[:, :-1])
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    loss = out.loss.item()
    times.append(time.perf_counter() - t0)
  where = torch.cuda.get_device_name() if device == "cuda" else f"{torch.get_num_threads()} threads"
  return times[warmup:], loss, f"torch on {where}"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--warmup", type=int, default=5)
  args = parser.parse_args()
  runtime.configure_cpu_devices(0, BATCH)
  data = batches(args.steps + args.warmup)
  tokens = BATCH * SEQ
  results = {}
  import jax

  # PyTorch runs on the same kind of device as JAX: the GPU when JAX has one, else the CPU.
  torch_device = "cuda" if jax.default_backend() == "gpu" else "cpu"
  runs = (("jaxlm", run_jaxlm), ("pytorch-hf", functools.partial(run_torch, device=torch_device)))
  for name, fn in runs:
    times, loss, how = fn(data, args.warmup)
    med = statistics.median(times)
    results[name] = tokens / med
    print(f"{name:11s} median step {med * 1e3:8.1f} ms  {tokens / med:10,.0f} tokens/s  "
          f"(last loss {loss:.3f}; {how})", flush=True)
  print(f"ratio jaxlm / pytorch-hf tokens/s: {results['jaxlm'] / results['pytorch-hf']:.2f}x")


if __name__ == "__main__":
  main()
