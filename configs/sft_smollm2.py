r"""Instruction fine-tuning of SmolLM2-135M-Instruct on chat data, loss on the responses only.

  jaxlm train --config configs/sft_smollm2.py --workdir runs/sft_smollm2 \
    --config.model.init_from=HuggingFaceTB/SmolLM2-135M-Instruct \
    --config.data.tokenizer=HuggingFaceTB/SmolLM2-135M-Instruct \
    --config.data.path=data/chats.jsonl

data.path: JSONL (or JSON / Parquet, or a glob) with a "messages" column (lists of {role, content});
for prompt/response pairs add --config.data.messages_column= (then data.prompt_column and
data.response_column name the columns). Examples are rendered with the chat template, packed
whole (best fit) with their loss masks, and attend only within themselves.
Cost: a GPU config. Estimate for 2 CPU cores: a step is 64x the tokens of
finetune_smollm2_shakespeare's (16-33 s on busy cores), so about half an hour a step there, weeks
for 1000 steps. Expected: not measured (never run end to end: no chat data set is on this machine).
"""

from jaxlm.config import base_config


def get_config():
  c = base_config()
  c.kind = "sft"
  c.model.init_from = "HuggingFaceTB/SmolLM2-135M-Instruct"  # HF checkpoint: hub id or directory
  c.model.max_seq_len = 2048
  c.data.source = "file"
  c.data.path = "data/chats.jsonl"
  c.data.tokenizer = "HuggingFaceTB/SmolLM2-135M-Instruct"
  c.data.packing = "best_fit"
  c.data.seq_len = 1024
  c.data.truncate = True  # cut the rare example longer than a row instead of failing
  c.data.add_eos = False  # the template already ends each turn with <|im_end|>
  c.data.val_fraction = 0.02
  c.train.steps = 1000
  c.train.batch_size = 32
  c.train.eval_every = 200
  c.train.eval_batches = 10
  c.optim.lr = 5e-5
  c.optim.min_lr = 5e-6
  c.optim.warmup_steps = 50
  c.optim.weight_decay = 0.0
  c.checkpoint.every = 500
  c.sample.prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n" \
    "<|im_start|>assistant\n"
  c.sample.max_new_tokens = 64
  return c
