"""The default run config, nested by component; `configs/*.py` start from it and change fields.

Each section is validated where it is consumed (ModelConfig, optim, data), not by one giant
checker. Configs are locked: an unknown key or a wrong type fails at once.
"""

import ml_collections

from jaxlm.models import config as model_config


def model(preset: str | None = None, **overrides) -> ml_collections.ConfigDict:
  """The `model` section: a named preset (or the defaults) with `overrides` applied."""
  cfg = model_config.preset(preset, **overrides) if preset else model_config.ModelConfig(**overrides)
  # init_from: an HF checkpoint (directory, .gguf file, hub id) or a jaxlm run directory to start
  # from; its model config wins over the fields above except dropout/dtype/remat/scan_layers
  return ml_collections.ConfigDict({**cfg.to_dict(), "init_from": ""})


def base_config() -> ml_collections.ConfigDict:
  """Every key a training run reads, with its default."""
  c = ml_collections.ConfigDict()
  c.model = model()
  c.data = ml_collections.ConfigDict(dict(
    source="file",  # file | hf | pydoc (Python's reference docs, no download)
    path="",  # text file for source=file
    hf_dataset="",  # hub id or local path for source=hf
    hf_config="",  # dataset config name, e.g. wikitext-103-raw-v1
    hf_split="train",
    text_column="text",
    tokenizer="char",  # char | a tokenizer directory | a hub id
    seq_len=256,  # tokens per training window
    val_fraction=0.1,  # last fraction of the stream held out for eval
  ))
  c.train = ml_collections.ConfigDict(dict(
    steps=1000,
    batch_size=16,  # global, over all devices and processes
    grad_accum=1,  # micro-batches per step (batch_size must divide evenly)
    seed=0,
    log_every=10,  # steps between metrics.jsonl records
    eval_every=250,
    eval_batches=20,
  ))
  c.optim = ml_collections.ConfigDict(dict(
    name="adamw",  # adamw | adafactor | lion | sgd
    lr=1e-3,  # peak learning rate after warmup
    min_lr=1e-4,  # end of the cosine decay
    warmup_steps=100,
    decay_steps=0,  # 0: decay over train.steps
    schedule="cosine",  # decay after warmup: cosine | linear
    b1=0.9,
    b2=0.95,
    eps=1e-8,
    weight_decay=0.1,  # not applied to biases and norm scales
    clip=1.0,  # global-norm gradient clipping; 0 disables
  ))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1: the rest
  c.runtime = ml_collections.ConfigDict(dict(
    cpu_devices=0,  # on CPU, devices to split the cores into; 0 = auto (see jaxlm.runtime)
  ))
  c.checkpoint = ml_collections.ConfigDict(dict(every=1000, keep=3, use_async=True))
  c.sample = ml_collections.ConfigDict(dict(
    prompt="\n", max_new_tokens=200, temperature=0.8, top_k=0, top_p=1.0, seed=0,
  ))
  return c
