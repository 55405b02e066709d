r"""nanoGPT's CPU recipe: a 0.8M-parameter character-level GPT on Tiny Shakespeare.

  jaxlm train --config configs/shakespeare_char.py --workdir runs/shakespeare_char \
    --config.data.path=../shared/data/tinyshakespeare/input.txt

First 90% of the text trains, the last 10% validates.
Cost: 1.5 minutes on 2 CPU cores (whole runs measured at 76 to 89 s from a cold compilation
cache, 50 steps a jitted call; nanoGPT's own train.py took 92 to 112 s beside them).
Expected: eval_loss about 1.88-1.90 at step 2000 (seed 0: 1.878 on 2026-12-02; seeds 0-6
earlier: 1.883 to 1.912, mean 1.900; it is a 20-batch estimate); on the whole val split 1.900
(seed 0) and 1.903 (seed 1), earlier. nanoGPT's own train.py, same recipe and data: 1.886
(20 batches), 1.898 (whole split); its README says 1.88.
"""

from jaxlm.config import base_config, model


def get_config():
  c = base_config()
  c.model = model("nanogpt-char")  # 4 layers, 4 heads, 128 dims, no biases, block 64
  c.data.source = "file"
  c.data.path = "../shared/data/tinyshakespeare/input.txt"
  c.data.tokenizer = "char"
  c.data.seq_len = 64
  c.train.steps = 2000
  c.train.batch_size = 12
  c.train.eval_every = 250
  c.train.eval_batches = 20
  c.train.steps_per_call = 50  # 50 steps per jitted call: one dispatch and metrics fetch each
  c.optim.lr = 1e-3
  c.optim.min_lr = 1e-4
  c.optim.warmup_steps = 100
  c.optim.b2 = 0.99
  c.optim.weight_decay = 0.1
  c.optim.clip = 1.0
  c.checkpoint.every = 2000
  c.sample.max_new_tokens = 500
  return c
