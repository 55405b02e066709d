"""Tests jaxlm/train/startup.py, where a run's train state comes from: 1. its own checkpoint
(model.init_from and the random init untouched), 2. model.init_from's weights placed in the
state's shardings, 3. scratch; a checkpoint of another state shape is refused naming the keys.
The same precedence end to end, through trainer.train: test_rundir.py."""

import json

import jax
import numpy as np
import optax
import pytest

from jaxlm import checkpoint, rundir, sharding
from jaxlm.config import base_config
from jaxlm.models import heads
from jaxlm.models.config import ModelConfig
from jaxlm.train import startup
from jaxlm.train import step as step_lib


def _setting(embed_dim=32):
  config = base_config()
  config.model.update({"vocab_size": 64, "num_layers": 1, "embed_dim": embed_dim,
                       "num_heads": 2, "max_seq_len": 16})
  values = config.model.to_dict()
  values.pop("init_from")
  model = heads.build_model(ModelConfig(**values))
  mesh, tx = sharding.make_mesh(config.mesh), optax.sgd(0.1)
  abstract, shardings = step_lib.abstract_state(model, tx, mesh)

  def init(params=None, seed=0):
    return step_lib.sharded_init(model, tx, jax.random.PRNGKey(seed), mesh,
                                 shardings=shardings, params=params)[0]

  return config, model, abstract, init


def _equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_comes_first_then_init_from_then_scratch(tmp_path, monkeypatch):
  config, model, abstract, init = _setting()
  # 3. scratch: the random initialisation, no data position
  state, data = startup.initial_state(None, None, config, model.cfg, abstract=abstract, init=init)
  assert data is None
  _equal(state.params, init().params)
  # 2. model.init_from: its weights, in the state's shardings
  imported = jax.device_get(init(seed=7).params)
  monkeypatch.setattr(rundir, "init_params", lambda src, cfg: imported)
  config.model.init_from = "an/hf/checkpoint"
  state, data = startup.initial_state(None, None, config, model.cfg, abstract=abstract, init=init)
  assert data is None
  _equal(state.params, imported)
  jax.tree.map(lambda x, a: x.sharding.is_equivalent_to(a.sharding, x.ndim) or pytest.fail(),
               state.params, abstract.params)
  # 1. resume: the run's own checkpoint and data position; neither init_from nor init is read
  ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints", use_async=False)
  saved = state.replace(step=3)
  ckpt.save(3, saved, {"step": 3}, {"config": json.loads(config.to_json_best_effort())})
  ckpt.wait()

  def refuse(*args, **kwargs):
    raise AssertionError("a resumed run read model.init_from or initialised from scratch")

  monkeypatch.setattr(rundir, "init_params", refuse)
  said = []
  state, data = startup.initial_state(ckpt, 3, config, model.cfg, abstract=abstract, init=refuse,
                                      message=said.append)
  ckpt.close()
  assert data == {"step": 3} and int(state.step) == 3
  _equal(state.params, imported)
  assert said == [f"resuming from checkpoint step 3 in {ckpt.directory}"]


def test_a_checkpoint_of_another_state_shape_is_refused_naming_the_keys(tmp_path):
  config, model, abstract, init = _setting()
  ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints", use_async=False)
  ckpt.save(2, init(), None, {"config": json.loads(config.to_json_best_effort())})
  ckpt.wait()
  wider, model, abstract, init = _setting(embed_dim=64)
  wider.train.skip_nonfinite = 3
  with pytest.raises(ValueError, match=r"checkpoint step 2 was written with a different config "
                     r"\(model.embed_dim=32 there but 64 now; train.skip_nonfinite on/off "
                     r"differs .*start over with --config.checkpoint.fresh=True"):
    startup.initial_state(ckpt, 2, wider, model.cfg, abstract=abstract, init=init)
  ckpt.close()
