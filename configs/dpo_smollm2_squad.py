r"""DPO of the LoRA-SFT SmolLM2-135M-Instruct on SQuAD preference pairs (LoRA, reference = base).

  python tools/squad_chat.py build --out data/squad_chat --tokenizer SMOLLM2_GGUF
  jaxlm train --config configs/sft_lora_smollm2_squad.py --workdir runs/sft_lora_smollm2_squad
  jaxlm train --config configs/dpo_smollm2_squad.py --workdir runs/dpo_smollm2_squad
  python tools/squad_chat.py eval --workdir runs/dpo_smollm2_squad --questions 500

Starts from the SFT run (model.init_from=runs/sft_lora_smollm2_squad: its adapters merged into
the base) and trains fresh LoRA adapters with the DPO loss; the reference model is that starting
point, the frozen base with the adapters off, so no second copy of the weights is held. Pairs:
chosen = the gold answer, rejected = another span of the context as long as it (or the model's
own wrong answer: build with --rejected_from PREDICTIONS.json from `squad_chat.py eval --split
train --out`). A pair is packed whole into a row of 512 tokens (chosen then rejected).
Cost: 25 steps of 4 rows x 512 tokens (100 pairs), two forward passes (policy and reference)
and one backward a step: 1,523 s on 2 CPU cores (about 50 s a step).
Expected: step 1's loss is log 2 = 0.693; eval loss 0.490, reward accuracy 0.81, margin 1.32 at
step 25; EM/F1 on 500 dev questions 43.8 / 57.7 (after SFT 56.8 / 63.9: these pairs lower EM).
"""

from jaxlm.config import base_config, model


def get_config():
  c = base_config()
  c.kind = "dpo"
  c.model = model("smollm2-135m")  # sizes come from init_from at train time
  c.model.init_from = "runs/sft_lora_smollm2_squad"  # the SFT run (or an HF checkpoint)
  c.data.update(
    {
      "path": "data/squad_chat/dpo.jsonl",  # JSONL of prompt / chosen / rejected
      "tokenizer": "",  # "": init_from's
      "seq_len": 512,  # a pair (chosen and rejected, each with its prompt) fits one row
      "truncate": True,  # drop the rare longer pair
      "add_eos": False,  # the template ends each turn with <|im_end|>
      "val_fraction": 0.02,
    }
  )
  c.dpo.update({"loss": "sigmoid", "beta": 0.1})
  c.lora.update({"rank": 16, "alpha": 32.0, "targets": "all"})
  c.train.update(
    {"steps": 25, "batch_size": 4, "eval_every": 25, "eval_batches": 4, "log_every": 5}
  )
  c.optim.update({"lr": 5e-4, "min_lr": 5e-5, "warmup_steps": 3, "weight_decay": 0.0})
  c.checkpoint.every = 25
  c.runtime.cpu_devices = 1
  c.sample.max_new_tokens = 0
  return c
