"""Hugging Face checkpoints and jaxlm run directories: `model.init_from` for training, and the
two directions of `jaxlm convert`.

`init_from` may name an HF source (directory, .gguf file, hub id) or a jaxlm run directory.
"""

import json
import os

from jaxlm.hf import api, convert
from jaxlm.train.run import CONFIG_FILE, TOKENIZER_DIR

# Model fields a run may set on top of an imported checkpoint; all others come from it.
RUN_LEVEL_FIELDS = ("dropout", "dtype", "param_dtype", "remat", "scan_layers")


def is_run_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isdir(
    os.path.join(path, "checkpoints"))


def model_config_for_init(src: str, run_values: dict):
  """The ModelConfig of `src`, with the run's RUN_LEVEL_FIELDS from `run_values`."""
  from jaxlm.models.config import ModelConfig

  overrides = {k: run_values[k] for k in RUN_LEVEL_FIELDS if k in run_values}
  if is_run_dir(src):
    with open(os.path.join(src, CONFIG_FILE)) as f:
      saved = dict(json.load(f)["model"])
    saved.pop("init_from", None)
    return ModelConfig.from_dict({**saved, **overrides})
  family, hf_config, _, _ = api.read_hf_config(src)
  return family.config_from_hf(hf_config).replace(**overrides)


def load_init_params(src: str, cfg):
  """Params for `cfg` from `src` (an HF source, or a jaxlm run's latest checkpoint), as host
  numpy arrays ready to be placed into a train state's shardings."""
  import jax
  import numpy as np

  if is_run_dir(src):
    from jaxlm import sample

    _, params = sample.load_run(src)
    params = jax.device_get(params)
    if "blocks" in params and not cfg.scan_layers:
      params = convert.unstack_layers(params)
    elif cfg.scan_layers and "blocks" not in params:
      params = convert.stack_layers(params, cfg.num_layers)
    dtype = np.dtype(jax.numpy.dtype(cfg.param_dtype))
    return jax.tree.map(lambda x: np.asarray(x, dtype), params)
  family, _, tensors, _, _ = api.load_hf_checkpoint(src)
  return convert.import_params(family, cfg, tensors)


def tokenizer_for_init(src: str):
  """The tokenizer that goes with `src`."""
  if is_run_dir(src):
    from jaxlm.data import tokenizers as tok_lib

    return tok_lib.load_tokenizer(os.path.join(src, TOKENIZER_DIR))
  return api.load_tokenizer(src)


def convert_from_hf(src: str, workdir: str, seq_len: int = 256) -> str:
  """Makes `workdir` a jaxlm run directory (config.json, tokenizer/, a step-0 checkpoint) holding
  the HF checkpoint `src`, so `jaxlm generate` and `model.init_from=workdir` work on it."""
  import jax

  from jaxlm import checkpoint
  from jaxlm import config as config_lib
  from jaxlm.train import resume
  from jaxlm.train import run as run_lib

  if os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise ValueError(f"{workdir!r} already holds checkpoints; convert into a new directory")
  config = config_lib.base_config()
  config.model.init_from = src
  model_cfg = model_config_for_init(src, dict(config.model))
  config.data.seq_len = min(seq_len, model_cfg.max_seq_len)
  config.train.batch_size = jax.device_count()
  # plain SGD keeps no optimizer state: the checkpoint holds just the params
  config.optim.name, config.optim.b1 = "sgd", 0.0
  run = run_lib.build(config, workdir)
  state, _ = run.init_state()
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), use_async=False)
  ckpt.save(0, state, meta=resume.checkpoint_meta(run.config, run.tokenizer, src))
  ckpt.wait()
  ckpt.close()
  return workdir


def convert_to_hf(workdir: str, out_dir: str, step: int | None = None,
                  family: str | None = None) -> str:
  """Writes checkpoint `step` (default: the latest) of the run in `workdir` as an HF directory."""
  from jaxlm import sample

  run, params = sample.load_run(workdir, step)
  return api.to_hf(run.model, params, out_dir, tokenizer=run.tokenizer, family=family)
