"""Sampling from a run directory: rebuild the model from its saved config, restore, generate."""

import os
from collections.abc import Sequence
from typing import TextIO

import jax

from jaxlm import checkpoint, generate, textgen
from jaxlm.train import run as run_lib


def load_run(workdir: str, step: int | None = None):
  """(Run, params) of the newest (or given) checkpoint of the run in `workdir`, on local devices."""
  config = run_lib.load_config(workdir)
  with config.unlocked():
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1
    config.train.batch_size = jax.device_count()
    config.train.grad_accum = 1
    if config.model.get("init_from"):  # the saved model fields are resolved; weights are in ckpt
      config.model.init_from = ""
  run = run_lib.build(config, workdir)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {ckpt.directory}: train the run first")
  abstract, _ = run.abstract_state()
  params = ckpt.restore_params(step, abstract.params)  # the optimizer state is never read
  ckpt.close()
  return run, params


def load_hf(src: str):
  """(model, params, tokenizer) of a Hugging Face checkpoint: a directory or a .gguf file."""
  from jaxlm.hf import api

  model, params = api.from_hf(src)
  return model, params, api.load_tokenizer(src)


def sample_from_run(workdir: str | None, prompt: str, max_new_tokens: int = 200,
                    temperature=0.8, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                    stop: Sequence[str] = (), out: TextIO | None = None,
                    hf: str | None = None) -> str:
  """`prompt` followed by text sampled from the run's latest checkpoint, or from the Hugging Face
  checkpoint `hf` when given (streamed to `out`)."""
  if hf:
    model, params, tokenizer = load_hf(hf)
  else:
    run, params = load_run(workdir)
    model, tokenizer = run.model, run.tokenizer
  sampler = generate.Sampler(temperature, top_k, top_p)
  kwargs = {"max_new_tokens": max_new_tokens, "sampler": sampler, "seed": seed, "stop": stop}
  if out is not None:
    return textgen.print_completion(model, params, tokenizer, prompt, out, **kwargs)
  return prompt + textgen.complete(model, params, tokenizer, [prompt], **kwargs)[0]
