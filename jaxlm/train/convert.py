"""`jaxlm convert --from-hf`: a Hugging Face checkpoint made into a jaxlm run directory, so the
commands that read a run (generate, eval, convert --to-hf, model.init_from) read it."""

import jax

from jaxlm import config as config_lib
from jaxlm import rundir
from jaxlm.train import metrics as metrics_lib
from jaxlm.train.trainer import Trainer, setup


def convert_from_hf(src: str, workdir) -> str:
  """Makes `workdir` a jaxlm run directory (config.json, tokenizer/, a step-0 checkpoint) holding
  the HF checkpoint `src`, so `jaxlm generate`, `jaxlm convert --to-hf` and
  `model.init_from=WORKDIR` work on it."""
  p = rundir.path(workdir)
  if (p / rundir.CHECKPOINT_DIR).exists():
    raise ValueError(f"{p} already holds checkpoints; convert into a new directory")
  config = config_lib.base_config()
  stored = rundir.init_model_config(src, {})
  config.kind = "lm" if stored.causal else ("mlm" if stored.head == "mlm" else "finetune")
  config.model.update(head=stored.head, num_labels=stored.num_labels, init_from=src)
  config.data.seq_len = min(config.data.seq_len, stored.max_seq_len)
  config.train.batch_size = jax.device_count()
  config.optim.name, config.optim.b1 = "sgd", 0.0  # plain SGD keeps no optimizer state
  run = setup(config, p, with_data=False)
  ckpt = rundir.open_checkpoints(run.config, p)
  try:
    quiet = metrics_lib.MetricsWriter(p, 0, enabled=False)
    state, _, _ = Trainer(run, ckpt, quiet, None).start_state(None)
    ckpt.save(0, state, meta=rundir.checkpoint_meta(run.config, run.tokenizer, src))
    ckpt.wait()
  finally:
    ckpt.close()
  return str(p)
