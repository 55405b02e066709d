"""Fine-tuning end to end on tiny random encoders: GLUE, CoNLL-2003 and SQuAD through the one
trainer (kind='finetune'), `jaxlm eval` scoring the saved run the same, task losses and bucketed
batches by hand."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.config import finetune_config
from jaxlm.data import buckets
from jaxlm.data.batch import Batch
from jaxlm.train import objectives

SHARED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
  os.path.abspath(__file__)))), "shared", "data")


@pytest.mark.parametrize("task,folder,metric", [("sst2", "glue", "accuracy"),
                                                ("conll2003", "conll2003", "f1"),
                                                ("squad", "squad_v1.1", "f1")])
def test_finetune_then_eval_scores_the_saved_run_the_same(task, folder, metric, tiny_bert,
                                                          tmp_path):
  from jaxlm.train import evaluation, trainer

  data_dir = os.path.join(SHARED_DATA, folder)
  if not os.path.isdir(data_dir):
    pytest.skip(f"{data_dir} not found (../shared/data is absent)")
  c = finetune_config(task, data_dir, 64, epochs=1, lr=1e-3, batch_size=8, warmup_steps=1,
                      max_train_examples=24, max_eval_examples=20, buckets=(64,), doc_stride=16)
  c.model.init_from = tiny_bert
  c.train.log_every = 1
  result = trainer.train(c, str(tmp_path))
  assert result["step"] >= 3  # 24 examples (more windows for squad) in batches of 8
  assert np.isfinite(result[metric])
  again = evaluation.evaluate_run(str(tmp_path), "dev")
  assert again[metric] == pytest.approx(result[metric], abs=1e-6)
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in records if "loss" in r]
  assert len(losses) == result["step"] and all(np.isfinite(losses))


def test_task_losses_by_hand():
  logits = jnp.asarray([[2.0, 0.0], [0.0, 1.0]])
  batch = Batch(inputs=None, labels=jnp.asarray([0, 0]), weights=jnp.asarray([1.0, 0.0]))
  total, weight = objectives.task_loss_sums("seq_cls", logits, batch)
  assert float(weight) == 1.0  # the weight-0 filler row counts for nothing
  assert float(total) == pytest.approx(np.log(1 + np.exp(-2.0)), rel=1e-6)
  total, weight = objectives.task_loss_sums(
    "seq_cls", jnp.asarray([[1.5], [0.0]]), Batch(inputs=None, labels=jnp.asarray([0.5, 9.0]),
                                                  weights=jnp.asarray([1.0, 0.0])))
  assert (float(total), float(weight)) == pytest.approx((1.0, 1.0))  # squared error
  tok = jnp.zeros((1, 3, 2))
  total, weight = objectives.task_loss_sums(
    "token_cls", tok, Batch(inputs=None, labels=jnp.asarray([[1, -100, 0]]),
                            weights=jnp.asarray([1.0])))
  assert (float(total), float(weight)) == pytest.approx((2 * np.log(2), 2.0))
  qa = jnp.zeros((1, 4, 2))
  total, _ = objectives.task_loss_sums(
    "qa", qa, Batch(inputs=None, labels=jnp.asarray([[1, 2]]), weights=jnp.asarray([1.0]),
                    padding_mask=jnp.asarray([[True, True, True, False]])))
  assert float(total) == pytest.approx(np.log(3))  # uniform over the 3 real positions


def test_bucketed_batches_compile_few_shapes():
  rng = np.random.default_rng(0)
  feats = [{"inputs": np.arange(n, dtype=np.int32) + 5, "label": np.int32(n % 2)}
           for n in rng.integers(3, 64, 100)]
  bks = buckets.default_buckets(64)
  assert bks == (16, 32, 64)
  pad = functools.partial(buckets.pad_batch, batch_size=8, buckets=bks, pad_id=0,
                          token_labels=False)
  epoch = buckets.TaskBatches(feats, 8, pad, seed=0)
  shapes = {next(epoch)["inputs"].shape for _ in range(epoch.per_epoch)}
  assert shapes <= {(8, 16), (8, 32), (8, 64)}
  evals = list(buckets.eval_batches(feats, 8, bks, 0, False))
  assert sum(n for n, _ in evals) == 100
  n, last = evals[-1]
  assert n == 4 and last["weights"].tolist() == [1.0] * 4 + [0.0] * 4
  assert last["padding_mask"][0].sum() == len(feats[96]["inputs"])
  with pytest.raises(ValueError, match="longer than the largest bucket"):
    buckets.bucket_length(65, bks)


def test_a_preempted_finetune_resumes_to_the_uninterrupted_result(tiny_bert, tmp_path,
                                                                   monkeypatch):
  """SIGTERM mid-epoch saves; rerunning the same command resumes there (the epoch's batches
  before it skipped) and ends with the same losses, scores and params as a run never stopped."""
  from jaxlm import rundir
  from jaxlm.train import preemption, trainer

  data_dir = os.path.join(SHARED_DATA, "glue")
  if not os.path.isdir(data_dir):
    pytest.skip(f"{data_dir} not found (../shared/data is absent)")
  c = finetune_config("sst2", data_dir, 64, epochs=2, lr=1e-3, batch_size=8, warmup_steps=1,
                      max_train_examples=24, max_eval_examples=16)
  c.model.init_from = tiny_bert
  c.train.log_every = 1
  c.checkpoint.use_async = False
  whole = trainer.train(c, str(tmp_path / "whole"))
  monkeypatch.setattr(preemption.PreemptionGuard, "should_stop",
                      lambda self, step: step == 4)  # mid-way through epoch 2 (3 steps each)
  with pytest.raises(preemption.Preempted, match="at step 4"):
    trainer.train(c, str(tmp_path / "cut"))
  monkeypatch.undo()
  from jaxlm.hf import api

  def no_reload(*args, **kwargs):
    raise AssertionError("a resumed run read the HF weights the checkpoint replaces")

  monkeypatch.setattr(api, "from_hf", no_reload)
  monkeypatch.setattr(api, "import_params", no_reload)
  resumed = trainer.train(c, str(tmp_path / "cut"))
  assert resumed["step"] == whole["step"] == 6
  assert resumed["accuracy"] == whole["accuracy"]
  def loss(run):
    lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]

  assert loss("cut") == pytest.approx(loss("whole"), abs=1e-6) and len(loss("cut")) == 6
  _, a = rundir.load_run(str(tmp_path / "whole"))
  _, b = rundir.load_run(str(tmp_path / "cut"))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
