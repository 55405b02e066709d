"""Every shipped config in configs/ loads and resolves without training (levanter's
test_llama_configs habit): a known kind, a model that kind trains, a valid optimizer and mesh,
parameters counted through jax.eval_shape (nothing allocated), and a docstring with the command,
the cost and the expected result."""

import glob
import importlib.util
import os

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from jaxlm import config as config_lib
from jaxlm.models import heads
from jaxlm.models.config import ModelConfig
from jaxlm.tasks import registry
from jaxlm.train import optim, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.py"), recursive=True))


def _load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_there_are_configs():
  assert len(CONFIGS) >= 10


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, REPO))
def test_config_resolves_without_training(path):
  module = _load(path)
  doc = module.__doc__ or ""
  assert "jaxlm train --config configs/" in doc, "the docstring gives the command"
  assert "Cost" in doc and "Expected" in doc, "the docstring gives the cost and the result"
  config = module.get_config()
  assert isinstance(config, ml_collections.ConfigDict)
  default_keys = set(config_lib.base_config().to_dict())
  assert set(config.to_dict()) == default_keys, "a config has exactly the base sections"
  kind = trainer.check_kind(config)
  values = {k: v for k, v in config.model.to_dict().items() if k != "init_from"}
  values["vocab_size"] = values["vocab_size"] or 256  # taken from the tokenizer at train time
  model_cfg = ModelConfig.from_dict(values)
  if kind == "finetune":
    task = registry.get_task(config.task)
    assert (model_cfg.head, model_cfg.num_labels) == (task.head, task.num_labels)
    assert config.train.steps or config.train.epochs
  else:
    trainer.check_model(kind, model_cfg)
    assert config.data.seq_len <= model_cfg.max_seq_len
  optim.make_optimizer(config.optim, config.train.steps or 1000)
  assert config.checkpoint.every >= 1
  model = heads.build_model(model_cfg)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, 1), jnp.int32)))
  n_params = sum(x.size for x in jax.tree.leaves(shapes))
  assert n_params > 0
