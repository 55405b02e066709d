"""The built-in default: a small character-level GPT trained on Python's own reference docs.

  jaxlm train --config configs/demo.py --workdir runs/demo

Needs no download (the text is pydoc_data, shipped with every CPython); about 2-3 minutes on
2 CPU cores; ends by printing a sample of Python-documentation-like text.
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
  c.optim.lr = 2e-3
  c.optim.min_lr = 2e-4
  c.optim.b2 = 0.99
  c.checkpoint.every = 500
  c.sample.prompt = "The "
  c.sample.max_new_tokens = 400
  return c
