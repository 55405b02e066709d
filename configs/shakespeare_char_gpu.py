r"""nanoGPT's GPU recipe: a 10.7M-parameter character-level GPT on Tiny Shakespeare.

  jaxlm train --config configs/shakespeare_char_gpu.py --workdir runs/shakespeare_char_gpu \
    --config.data.path=../shared/data/tinyshakespeare/input.txt

Cost: never run in full. Estimate for 2 CPU cores: 66-104 s a step (16k tokens) timed over 3
steps on busy cores, so 4-6 days for 5000 steps; 1-2 days on idle ones (~1.2e12 FLOP a step at
the 45-100 GFLOP/s these cores sustain). No GPU figure measured yet.
Expected: not measured with jaxlm. nanoGPT reports val loss ~1.47 with this recipe (dropout also
on attention weights there; jaxlm applies dropout to embeddings and residual branches).
"""

from jaxlm.config import base_config, model


def get_config():
  c = base_config()
  c.model = model("nanogpt-char", num_layers=6, num_heads=6, embed_dim=384, max_seq_len=256,
                  dropout=0.2)
  c.data.path = "../shared/data/tinyshakespeare/input.txt"
  c.data.tokenizer = "char"
  c.data.seq_len = 256
  c.train.steps = 5000
  c.train.batch_size = 64
  c.train.eval_every = 250
  c.train.eval_batches = 200
  c.optim.lr = 1e-3
  c.optim.min_lr = 1e-4
  c.optim.warmup_steps = 100
  c.optim.b2 = 0.99
  c.optim.weight_decay = 0.1
  c.checkpoint.every = 1000
  c.sample.max_new_tokens = 500
  return c
