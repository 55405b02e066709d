"""Everything a run needs before its first step: tokenizer, data, model config, mesh, run dir.

Shared by `jaxlm train` (which builds it) and `jaxlm generate` (which reads it back).
"""

import dataclasses
import json
import os

import jax
import ml_collections
import numpy as np

from jaxlm import sharding
from jaxlm.data import text, tokenizers as tok_lib
from jaxlm.models.config import ModelConfig
from jaxlm.models.transformer import Transformer
from jaxlm.train import optim, step as step_lib

CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"


@dataclasses.dataclass
class Run:
  """The pieces of a training run, resolved from its config."""

  config: ml_collections.ConfigDict
  workdir: str
  tokenizer: object
  model: Transformer
  mesh: jax.sharding.Mesh
  tx: object
  schedule: object

  @property
  def example_tokens(self):
    return np.zeros((1, self.config.data.seq_len), np.int32)

  def abstract_state(self):
    return step_lib.abstract_state(self.model, self.tx, self.example_tokens, self.mesh)

  def init_state(self):
    rng = jax.random.PRNGKey(self.config.train.seed)
    state, shardings = step_lib.sharded_init(self.model, self.tx, rng, self.example_tokens,
                                             self.mesh)
    init_from = self.config.model.get("init_from", "")
    if init_from:  # imported weights replace the random ones, placed straight into shardings
      from jaxlm.hf import runs as hf_runs

      params = hf_runs.load_init_params(init_from, self.model.cfg)
      state = state.replace(params=jax.device_put(params, shardings.params))
    return state, shardings


def load_or_build_tokenizer(config, workdir: str, docs: list[str] | None):
  """The run's tokenizer: the one saved in `workdir` if resuming, else built/loaded and saved."""
  saved = os.path.join(workdir, TOKENIZER_DIR)
  if os.path.isdir(saved):
    return tok_lib.load_tokenizer(saved)
  init_from = config.model.get("init_from", "")
  if init_from and config.data.tokenizer in ("char", ""):
    from jaxlm.hf import runs as hf_runs

    tokenizer = hf_runs.tokenizer_for_init(init_from)
  elif config.data.tokenizer == "char":
    if docs is None:
      raise ValueError(f"no tokenizer saved in {saved}; is {workdir!r} a jaxlm run directory?")
    tokenizer = tok_lib.char_tokenizer("".join(docs))
  else:
    tokenizer = tok_lib.load_tokenizer(config.data.tokenizer)
  if jax.process_index() == 0:
    tokenizer.save_pretrained(saved)
  return tokenizer


def resolve_model_config(config, tokenizer) -> ModelConfig:
  """The ModelConfig of the run: vocab from the tokenizer when 0, checked against it otherwise."""
  values = dict(config.model)
  init_from = values.pop("init_from", "")
  if init_from:  # the checkpoint's own model config, with the run-level fields of this run
    from jaxlm.hf import runs as hf_runs

    values = hf_runs.model_config_for_init(init_from, values).to_dict()
  n_tok = tok_lib.vocab_size(tokenizer)
  if not values["vocab_size"]:
    values["vocab_size"] = n_tok
  elif values["vocab_size"] < n_tok:
    raise ValueError(
      f"the tokenizer has {n_tok} tokens but model.vocab_size={values['vocab_size']}: ids would "
      "fall outside the embedding. Use a matching tokenizer or set model.vocab_size=0 "
      "(take it from the tokenizer)"
    )
  model_cfg = ModelConfig.from_dict(values)
  if config.data.seq_len > model_cfg.max_seq_len:
    raise ValueError(
      f"data.seq_len={config.data.seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}, "
      "the longest sequence the model's positions support; lower data.seq_len or raise "
      "model.max_seq_len"
    )
  return model_cfg


def check_batch(config, mesh):
  per = sharding.batch_divisor(mesh) * config.train.grad_accum
  if config.train.batch_size % per:
    raise ValueError(
      f"train.batch_size={config.train.batch_size} must be divisible by the data-parallel "
      f"size {sharding.batch_divisor(mesh)} times train.grad_accum={config.train.grad_accum}"
    )


def build(config, workdir: str, docs: list[str] | None = None) -> Run:
  """Resolves tokenizer, model, mesh and optimizer for `config`; writes the resolved config."""
  os.makedirs(workdir, exist_ok=True)
  tokenizer = load_or_build_tokenizer(config, workdir, docs)
  model_cfg = resolve_model_config(config, tokenizer)
  with config.unlocked():
    config.model.vocab_size = model_cfg.vocab_size
    if config.model.get("init_from"):  # record the imported model in the saved config
      config.model.update(model_cfg.to_dict())
  mesh = sharding.make_mesh(config.mesh)
  check_batch(config, mesh)
  tx, schedule = optim.make_optimizer(config.optim, config.train.steps)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  return Run(config, workdir, tokenizer, build_model(model_cfg), mesh, tx, schedule)


def build_model(model_cfg: ModelConfig):
  """The decoder, or for model.causal=False an encoder with its model.head."""
  if model_cfg.causal:
    return Transformer(model_cfg)
  from jaxlm.models.heads import EncoderModel

  return EncoderModel(model_cfg)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a run saved in its directory."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: {workdir!r} is not a jaxlm run directory")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_stream(config, tokenizer, docs) -> text.TokenStream:
  tokens = text.tokenize_documents(tokenizer, docs)
  if "mlm" in config:  # masked-LM pretraining: windows of seq_len with [CLS] and [SEP] added
    from jaxlm.data import mlm

    stream = text.TokenStream.split(tokens, config.data.val_fraction, config.data.seq_len - 2,
                                    config.train.seed)
    return mlm.MlmStream(stream, tokenizer, config.mlm.prob, config.mlm.whole_word)
  return text.TokenStream.split(tokens, config.data.val_fraction, config.data.seq_len,
                                config.train.seed)
