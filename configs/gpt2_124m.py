"""GPT-2 small (124M) pretraining on an HF dataset with the GPT-2 tokenizer, for GPU/TPU.

  jaxlm train --config configs/gpt2_124m.py --workdir gs://BUCKET/runs/gpt2_124m

Defaults to WikiText-103 from the hub; point data.hf_dataset / data.tokenizer at local copies
(e.g. --config.data.tokenizer=../shared/data/tokenizers/gpt2) when offline. bf16 compute with fp32
params; 0.5M tokens per step (batch 512 x 1024) as in GPT-2, split over the mesh. Documents are
tokenized once into the cache (`python tools/prepare_data.py --config configs/gpt2_124m.py` does
it ahead of time), cut into 1024-token rows that attend within their documents, shuffled globally.
Cost: not a CPU config. Estimate, not timed: ~4.5e14 FLOP a step, over an hour a step on 2 CPU
cores (fp32 GEMMs there reach ~100 GFLOP/s), years for 20,000 steps. No GPU/TPU figure measured yet.
Expected: not measured.
"""

from jaxlm.config import base_config, model


def get_config():
  c = base_config()
  c.model = model("gpt2", max_seq_len=1024, dtype="bfloat16", remat="dots", scan_layers=True)
  c.data.source = "hf"
  c.data.hf_dataset = "Salesforce/wikitext"
  c.data.hf_config = "wikitext-103-raw-v1"
  c.data.hf_split = "train"
  c.data.tokenizer = "openai-community/gpt2"
  c.data.seq_len = 1024
  c.data.packing = "concat"  # the document pipeline (jaxlm.data.pipeline), not random windows
  c.data.val_fraction = 0.005
  c.train.steps = 20000
  c.train.batch_size = 512
  c.train.grad_accum = 1  # raise when a step's activations do not fit
  c.train.eval_every = 1000
  c.train.eval_batches = 40
  c.optim.lr = 6e-4
  c.optim.min_lr = 6e-5
  c.optim.warmup_steps = 700
  c.optim.b2 = 0.95
  c.optim.weight_decay = 0.1
  c.checkpoint.every = 1000
  c.sample.prompt = "The history of"
  c.sample.max_new_tokens = 100
  c.sample.top_k = 50
  return c
