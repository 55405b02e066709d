"""Fine-tuning a task and `jaxlm eval` as 2 real processes on localhost (jax.distributed, gloo)
score as one process does; a file of its own so it runs beside tests/test_multihost.py."""

import importlib.util
import os

import pytest
from test_multihost import _close, launch, losses, train, wait

pytestmark = pytest.mark.slow  # the slow tier: python -m pytest tests -m slow

FINETUNE = '''
from jaxlm.config import finetune_config


def get_config():
  c = finetune_config("sst2", {data!r}, 64, epochs=1, lr=1e-3, batch_size=8, warmup_steps=1,
                      max_train_examples=32, max_eval_examples=24)
  c.model.init_from = {bert!r}
  c.train.log_every = 1
  return c
'''


def test_finetune_and_eval_on_two_processes_score_as_on_one(tiny_bert, tmp_path):
  from conftest import SHARED_DATA

  from jaxlm.train import trainer

  data = os.path.join(SHARED_DATA, "glue")
  if not os.path.isdir(os.path.join(data, "SST-2")):
    pytest.skip(f"{data} not found (../shared/data is absent)")
  cfg = str(tmp_path / "sst2.py")
  with open(cfg, "w") as f:
    f.write(FINETUNE.format(data=data, bert=tiny_bert))
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  spec = importlib.util.spec_from_file_location("sst2_config", cfg)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  alone = trainer.train(module.get_config(), one)
  train(2, 4, cfg, two)
  _close(losses(two), losses(one))
  assert len(losses(two)) == alone["step"] == 4
  assert losses(two, "dev_accuracy") == pytest.approx([alone["accuracy"]], abs=1e-9)
  logs = wait(launch(2, 4, ["eval", "--workdir", two], two), two)
  assert f"dev_accuracy={alone['accuracy']:.4f}" in logs[0] and "dev_accuracy" not in logs[1]
