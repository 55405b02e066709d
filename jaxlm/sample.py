"""Sampling from a run directory: rebuild the model from its saved config, restore, generate."""

import os

import jax

from jaxlm import checkpoint
from jaxlm.train import loop, run as run_lib


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
  state = ckpt.restore(step, abstract)
  ckpt.close()
  return run, state.params


def sample_from_run(workdir: str, prompt: str, max_new_tokens: int = 200, temperature=0.8,
                    top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> str:
  """`prompt` followed by text sampled from the run's latest checkpoint."""
  run, params = load_run(workdir)
  with run.config.unlocked():
    run.config.sample.update(dict(prompt=prompt, max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_k=top_k, top_p=top_p, seed=seed))
  return loop.sample_text(run, params, run.config.sample)
