"""The built-in default: a small character-level GPT trained on Python's own reference docs.

  jaxlm train --config configs/demo.py --workdir runs/demo

Needs no download (the text is pydoc_data, shipped with every CPython).
Cost: 1 to 1.5 minutes on 2 CPU cores (56 to 81 s measured, evaluations, checkpoints and the
closing sample included; the README's first command took 1 min 47 s and 2 min 9 s from a fresh
clone, the install included).
Expected: eval_loss 2.18, 1.78, 1.60 at steps 250, 500, 750 and 1.578 at step 800, then a
sample of Python-documentation-like text, only semi-readable.
"""

from jaxlm.config import base_config, model


def get_config():
  c = base_config()
  c.model = model("nanogpt-char", max_seq_len=128)
  c.data.source = "pydoc"
  c.data.tokenizer = "char"
  c.data.seq_len = 128
  c.train.steps = 800
  c.train.batch_size = 16
  c.train.eval_every = 250
  c.train.steps_per_call = 50  # 50 steps per jitted call: one dispatch and metrics fetch each
  c.optim.lr = 2e-3
  c.optim.min_lr = 2e-4
  c.optim.b2 = 0.99
  c.checkpoint.every = 500
  c.sample.prompt = "The "
  c.sample.max_new_tokens = 400
  return c
