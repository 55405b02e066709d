"""benchmarks/train_throughput.py's GPT-2-style model (6 layers, 384 dims, 6 heads, sequence
256, batch 8, fp32) trained through the document pipeline on local WikiText-2 + Tiny Shakespeare,
to check that input never stalls the step. Vocabulary: the GPT-2 tokenizer's 50,257 (the
throughput benchmark uses 8,192 random ids).

  jaxlm train --config configs/gpt2_bench_data.py --workdir runs/gpt2_bench_data

Cost: about 16 s a step measured on the CPU, so ~11 minutes for the 40 steps (estimate).
Expected: data_wait_frac in metrics.jsonl below the goal of 0.02; measured 0.0013, 0.00064 and
0.00064 at steps 10, 20 and 30.
"""

from jaxlm.config import base_config, model

DATA = "../shared/data"


def get_config():
  c = base_config()
  c.model = model("gpt2", num_layers=6, embed_dim=384, num_heads=6, max_seq_len=256)
  c.data.source = "file"
  c.data.mixture = ",".join(f"{DATA}/{f}" for f in (
    "wikitext2/valid.txt", "wikitext2/test.txt", "tinyshakespeare/input.txt"))
  c.data.tokenizer = f"{DATA}/tokenizers/gpt2"
  c.data.packing = "concat"
  c.data.seq_len = 256
  c.data.val_fraction = 0.05
  c.train.steps = 40
  c.train.batch_size = 8
  c.train.log_every = 10
  c.train.eval_every = 1000
  c.train.eval_batches = 2
  c.optim.lr = 3e-4
  c.optim.min_lr = 3e-4
  c.optim.warmup_steps = 5
  c.checkpoint.every = 1000
  c.sample.max_new_tokens = 0
  return c
