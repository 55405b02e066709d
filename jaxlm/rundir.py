"""The run directory: its file names, the config and tokenizer a run keeps, what each checkpoint
records, reading a run back (which never writes to it), `model.init_from`'s readers, and opening
the run's checkpoints (the precedence that assembles a train state from them is
jaxlm.train.startup). Every path is an etils.epath: a run may live in gs://.

  WORKDIR/config.json         the resolved config (an imported model's fields filled in)
  WORKDIR/tokenizer/          the tokenizer, as save_pretrained writes it
  WORKDIR/checkpoints/STEP/   Orbax: state (params, opt_state, step, rng), data (iterator), meta
  WORKDIR/metrics.jsonl       one JSON record per logged step and per evaluation
  WORKDIR/tensorboard/        the same scalars as TensorBoard events
"""

import dataclasses
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from jaxlm import checkpoint, sharding
from jaxlm.data import tokenizers as tok_lib
from jaxlm.models import heads
from jaxlm.models import lora as lora_lib
from jaxlm.models.config import RUN_FIELDS, ModelConfig
from jaxlm.models.transformer import match_layer_layout

CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
BEST_METRICS = ("eval_loss", "eval_ppl")


def path(workdir) -> epath.Path:
  """`workdir` as an epath: `gs://bucket/dir` stays remote, a local path is made absolute."""
  text = os.fspath(workdir or "")
  if not text:
    raise ValueError("no run directory given: pass --workdir=DIR (a local path or gs://bucket/dir)")
  return epath.Path(text if "://" in text else os.path.abspath(text))


def is_local(p: epath.Path) -> bool:
  return "://" not in os.fspath(p)


# --- config and tokenizer -------------------------------------------------------------------------

def write_config(workdir, config: ml_collections.ConfigDict) -> None:
  """Writes config.json (atomically: a reader never sees half a file)."""
  p = path(workdir)
  p.mkdir(parents=True, exist_ok=True)
  tmp = p / f".{CONFIG_FILE}.tmp"
  tmp.write_text(config.to_json_best_effort(indent=2))
  tmp.replace(p / CONFIG_FILE)


def read_config(workdir) -> ml_collections.ConfigDict:
  """The resolved config a run saved.

  Raises:
    FileNotFoundError: when `workdir` has no config.json.
  """
  f = path(workdir) / CONFIG_FILE
  if not f.exists():
    raise FileNotFoundError(f"{f} not found: {os.fspath(workdir)!r} is not a jaxlm run directory "
                            "(train or `jaxlm convert --from-hf` into it first)")
  return ml_collections.ConfigDict(json.loads(f.read_text()))


def save_tokenizer(workdir, tokenizer) -> None:
  """Saves `tokenizer` into WORKDIR/tokenizer/ (written locally first, then copied)."""
  dest = path(workdir) / TOKENIZER_DIR
  dest.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer.save_pretrained(tmp)
    for name in sorted(os.listdir(tmp)):
      (dest / name).write_bytes(epath.Path(tmp, name).read_bytes())


def load_tokenizer(workdir):
  """The tokenizer a run saved (copied to a local temporary directory when remote)."""
  src = path(workdir) / TOKENIZER_DIR
  if not src.exists():
    raise FileNotFoundError(f"no tokenizer in {src}: is {os.fspath(workdir)!r} a jaxlm run "
                            "directory?")
  if is_local(src):
    return tok_lib.load_tokenizer(os.fspath(src))
  with tempfile.TemporaryDirectory() as tmp:
    for f in src.iterdir():
      epath.Path(tmp, f.name).write_bytes(f.read_bytes())
    return tok_lib.load_tokenizer(tmp)


def checkpoint_meta(config, tokenizer, source: str) -> dict:
  """What a checkpoint records besides arrays: the resolved config and the tokenizer used
  (`source`: where it was loaded from; a copy is saved in the run directory)."""
  return {
    "config": json.loads(config.to_json_best_effort()),
    "tokenizer": {"source": source, "saved_dir": TOKENIZER_DIR,
                  "vocab_size": tok_lib.vocab_size(tokenizer)},
  }


# --- model.init_from: an HF checkpoint or another jaxlm run ---------------------------------------

def is_run_dir(src) -> bool:
  if not src:
    return False
  p = path(src)
  return (p / CONFIG_FILE).exists() and (p / CHECKPOINT_DIR).exists()


def init_model_config(src: str, run_values: dict) -> ModelConfig:
  """The ModelConfig of `src` (a jaxlm run or an HF checkpoint), with the RUN_FIELDS of
  `run_values` (dropout, dtypes, remat, scan, head) set on top."""
  overrides = {k: run_values[k] for k in RUN_FIELDS if k in run_values}
  if is_run_dir(src):
    saved = dict(read_config(src).model)
    saved.pop("init_from", None)
    return ModelConfig.from_dict({**saved, **overrides})
  from jaxlm.hf import api

  return api.config_from_hf(src, **overrides)


def init_tokenizer(src: str):
  """The tokenizer that goes with `src` (a jaxlm run or an HF checkpoint)."""
  if is_run_dir(src):
    return load_tokenizer(src)
  return tok_lib.load_tokenizer(src)


def init_params(src: str, cfg: ModelConfig) -> dict:
  """Host numpy params of `src` laid out for `cfg` (another run's newest checkpoint, read-only;
  or an HF checkpoint, with a new task head when cfg.head differs from the checkpoint's)."""
  if is_run_dir(src):
    _, params = load_run(src)
    params = match_layer_layout(jax.device_get(params), cfg)
    return jax.tree.map(lambda x: np.asarray(x, jnp.dtype(cfg.param_dtype)), params)
  from jaxlm.hf import api

  return api.import_params(src, cfg)


def resolve_model_config(config, tokenizer, seq_len: int) -> ModelConfig:
  """The run's ModelConfig: `model.init_from`'s own (with this run's RUN_FIELDS), else
  config.model; the vocabulary taken from the tokenizer when 0, else checked to fit it; and
  `seq_len` checked against max_seq_len."""
  values = dict(config.model)
  src = values.pop("init_from", "")
  if src:
    values = init_model_config(src, values).to_dict()
  if not values["vocab_size"]:
    values["vocab_size"] = tok_lib.vocab_size(tokenizer)
  tok_lib.check_fits(tokenizer, values["vocab_size"])
  model_cfg = ModelConfig.from_dict(values)
  if seq_len > model_cfg.max_seq_len:
    raise ValueError(
      f"data.seq_len={seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}, the longest "
      "sequence the model's positions support; lower data.seq_len or raise model.max_seq_len")
  return model_cfg


# --- reading a run back (never writes) ------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SavedRun:
  """A run read back from its directory: config, model and tokenizer."""

  config: ml_collections.ConfigDict
  model: object
  tokenizer: object

  @property
  def model_cfg(self) -> ModelConfig:
    return self.model.cfg


def saved_model_config(config) -> ModelConfig:
  values = dict(config.model)
  values.pop("init_from", None)  # a saved config holds the resolved model; weights are in ckpts
  return ModelConfig.from_dict(values)


def abstract_params(model, mesh):
  """ShapeDtypeStructs of `model`'s params, sharded on `mesh` by the logical rules."""
  return sharding.shard_abstract(heads.param_shapes(model), mesh)[0]


def load_run(workdir, step: int | None = None, mesh=None) -> tuple[SavedRun, dict]:
  """(SavedRun, params) of checkpoint `step` (default: the newest) of the run in `workdir`, the
  params placed on `mesh` (default: data-parallel over all devices). Nothing is written."""
  config = read_config(workdir)
  model = heads.build_model(saved_model_config(config))
  tokenizer = load_tokenizer(workdir)
  mesh = mesh or _default_mesh()
  saved = SavedRun(config, model, tokenizer)
  lora = lora_lib.for_model(config, model)
  if lora is None:
    return saved, _restore(workdir, step, {"params": abstract_params(model, mesh)})["params"]
  parts = _restore(workdir, step, abstract_lora_parts(model, lora, mesh))
  target = abstract_params(model, mesh)

  def merge(frozen, trainable):  # in the model's param dtype, as a full run's params are
    return jax.tree.map(lambda x, a: x.astype(a.dtype), lora.merge(frozen, trainable), target)

  shardings = jax.tree.map(lambda a: a.sharding, target)
  return saved, jax.jit(merge, out_shardings=shardings)(parts["frozen"], parts["params"])


def _default_mesh():
  return sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}))


def load_lora_run(workdir, step: int | None = None, mesh=None) -> tuple:
  """(SavedRun, Lora, trainable params (adapters), frozen base) of a LoRA run's checkpoint
  `step` (default: the newest); nothing is written.

  Raises:
    ValueError: when the run is not a LoRA run.
  """
  config = read_config(workdir)
  model = heads.build_model(saved_model_config(config))
  lora = lora_lib.for_model(config, model)
  if lora is None:
    raise ValueError(f"{os.fspath(workdir)} is not a LoRA run (lora.rank=0); export it whole")
  mesh = mesh or _default_mesh()
  parts = _restore(workdir, step, abstract_lora_parts(model, lora, mesh))
  return SavedRun(config, model, load_tokenizer(workdir)), lora, parts["params"], parts["frozen"]


def abstract_lora_parts(model, lora, mesh) -> dict:
  """ShapeDtypeStructs (sharded) of a LoRA state's trainable params and frozen base."""
  def init(rng, params):
    return {"params": lora.init(rng, params), "frozen": lora.freeze(params)}

  return sharding.abstract_tree(init, mesh, heads.param_shapes(model))[0]


def _restore(workdir, step: int | None, target: dict) -> dict:
  ckpt = checkpoint.Checkpointer(path(workdir) / CHECKPOINT_DIR, read_only=True)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {ckpt.directory}: train the run first")
    return ckpt.restore_fields(step, target)
  finally:
    ckpt.close()


def trim_metrics(workdir, step: int) -> int:
  """Rewrites metrics.jsonl (atomically) without records past `step`, so a resumed run's log
  continues from its checkpoint. Returns how many records were dropped."""
  f = path(workdir) / METRICS_FILE
  if not f.exists():
    return 0
  lines = [line for line in f.read_text().splitlines(keepends=True) if line.strip()]
  kept = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= step:
        kept.append(line if line.endswith("\n") else line + "\n")
    except (ValueError, KeyError):  # a line cut short by a kill
      continue
  if len(kept) != len(lines):
    tmp = f.parent / f".{METRICS_FILE}.tmp"
    tmp.write_text("".join(kept))
    tmp.replace(f)
  return len(lines) - len(kept)


# --- the run's checkpoints ---------------------------------------------------------------------

def open_checkpoints(config, workdir, message=print) -> checkpoint.Checkpointer:
  """The run's Checkpointer; with checkpoint.fresh, older checkpoints and metrics are set aside."""
  cfg = config.checkpoint
  if cfg.every < 1:
    raise ValueError(f"checkpoint.every={cfg.every} must be >= 1 (steps between checkpoints)")
  if cfg.keep_best and cfg.best_metric not in BEST_METRICS:
    raise ValueError(f"checkpoint.best_metric={cfg.best_metric!r} is not one of {BEST_METRICS}")
  p = path(workdir)
  if cfg.fresh and jax.process_index() == 0:
    for name in (CHECKPOINT_DIR, METRICS_FILE):
      if (p / name).exists():
        aside = p / f"{name}.old-{int(time.time())}"
        (p / name).rename(aside)
        message(f"checkpoint.fresh: moved {p / name} to {aside}")
  return checkpoint.Checkpointer.from_config(cfg, p / CHECKPOINT_DIR)


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


def open_run(config, workdir) -> tuple[checkpoint.Checkpointer, int | None]:
  """(the run's Checkpointer, the step to resume from or None)."""
  is_main = jax.process_index() == 0
  ckpt = open_checkpoints(config, workdir, print if is_main else (lambda _: None))
  try:
    return ckpt, resume_step(ckpt, config.checkpoint)
  except BaseException:
    ckpt.close()
    raise
