"""Where a run starts: its checkpoints opened, the step to resume from chosen and checked, and the
metadata each checkpoint records (config, tokenizer)."""

import json
import os
import time

import jax

from jaxlm import checkpoint
from jaxlm.data import tokenizers as tok_lib
from jaxlm.train import metrics as metrics_lib
from jaxlm.train import run as run_lib

BEST_METRICS = ("eval_loss", "eval_ppl")


def open_checkpoints(config, workdir: str, writer) -> checkpoint.Checkpointer:
  """The run's Checkpointer; with checkpoint.fresh, older checkpoints and metrics are set aside."""
  cfg = config.checkpoint
  if cfg.every < 1:
    raise ValueError(f"checkpoint.every={cfg.every} must be >= 1 (steps between checkpoints)")
  if cfg.keep_best and cfg.best_metric not in BEST_METRICS:
    raise ValueError(f"checkpoint.best_metric={cfg.best_metric!r} is not one of {BEST_METRICS}")
  directory = os.path.join(workdir, "checkpoints")
  if cfg.fresh and jax.process_index() == 0:
    for name in ("checkpoints", "metrics.jsonl"):
      old = os.path.join(workdir, name)
      if os.path.exists(old):
        aside = f"{old}.old-{int(time.time())}"
        os.replace(old, aside)
        writer(f"checkpoint.fresh: moved {old} to {aside}")
  return checkpoint.Checkpointer.from_config(cfg, directory)


def start(config, workdir: str) -> tuple[checkpoint.Checkpointer, int | None]:
  """(the run's Checkpointer, the step to resume from or None), with the metrics.jsonl records
  after that step dropped (the resumed run writes them again)."""
  is_main = jax.process_index() == 0
  ckpt = open_checkpoints(config, workdir, print if is_main else (lambda _: None))
  try:
    step = resume_step(ckpt, config.checkpoint)
  except BaseException:
    ckpt.close()
    raise
  if is_main:
    metrics_lib.drop_records_after(workdir, step or 0)
  return ckpt, step


def resume_step(ckpt, cfg) -> int | None:
  """The step to resume from: checkpoint.restore_step, or the newest (-1); None starts fresh.

  Checkpoints newer than an explicitly chosen step are moved to `checkpoints.after-STEP/` (the
  resumed run will write those steps again).
  """
  steps = ckpt.all_steps()
  if cfg.restore_step < -1:
    raise ValueError(f"checkpoint.restore_step={cfg.restore_step}: use -1 (newest) or a step")
  if cfg.restore_step == -1 or cfg.fresh:
    return steps[-1] if steps and not cfg.fresh else None
  if cfg.restore_step not in steps:
    raise ValueError(f"checkpoint.restore_step={cfg.restore_step} is not in {ckpt.directory}; "
                     f"steps present: {steps} (-1: the newest)")
  ckpt.set_aside_after(cfg.restore_step)
  return cfg.restore_step


def restore_or_init(run, ckpt, step: int | None, writer):
  """(state, shardings, data iterator state) from checkpoint `step`, or a fresh state if None."""
  if step is None:
    return (*run.init_state(), None)
  abstract, shardings = run.abstract_state()
  state, data_state = restore(ckpt, step, run.config, abstract, writer)
  return state, shardings, data_state


def restore(ckpt, step: int, config, abstract, writer) -> tuple:
  """(state, data iterator state) of checkpoint `step`, once its saved config is checked to
  describe the same state as `config` (see check_same_model)."""
  check_same_model(config, ckpt.restore_meta(step).get("config", {}), step)
  writer.message(f"resuming from checkpoint step {step} in {ckpt.directory}")
  state, data_state, _ = ckpt.restore(step, abstract)
  return state, data_state


# config keys that change the shapes or structure of the saved train state
_STATE_KEYS = {
  "model": ("vocab_size", "num_layers", "embed_dim", "num_heads", "num_kv_heads", "head_dim",
            "mlp_dim", "max_seq_len", "position", "use_bias", "qkv_bias", "gated_mlp",
            "tie_embeddings", "norm", "param_dtype", "scan_layers"),
  "optim": ("name",),
}


def check_same_model(config, saved: dict, step: int):
  """Fails clearly when the config changed what the checkpoint's state looks like."""
  changes = [
    f"{section}.{k}={saved[section][k]!r} there but {config[section][k]!r} now"
    for section, keys in _STATE_KEYS.items() for k in keys
    if k in saved.get(section, {}) and saved[section][k] != config[section][k]
  ]
  was_skip = bool(saved.get("train", {}).get("skip_nonfinite", 0))
  if "train" in saved and was_skip != bool(config.train.skip_nonfinite):
    changes.append("train.skip_nonfinite on/off differs (it wraps the optimizer state)")
  if changes:
    raise ValueError(
      f"checkpoint step {step} was written with a different config ({'; '.join(changes)}); "
      "resume with the same settings, or start over with --config.checkpoint.fresh=True"
    )


def checkpoint_meta(config, tokenizer, source: str) -> dict:
  """What a checkpoint records besides arrays: the resolved config and the tokenizer used
  (`source`: where it was loaded from; a copy is saved in the run directory)."""
  return {
    "config": json.loads(config.to_json_best_effort()),
    "tokenizer": {"source": source, "saved_dir": run_lib.TOKENIZER_DIR,
                  "vocab_size": tok_lib.vocab_size(tokenizer)},
  }
