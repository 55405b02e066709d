"""Tests jaxlm/train/evaluation.py (`jaxlm eval`): a saved run's newest checkpoint scores as the
run itself scored it, and a split the run's kind does not have is refused, never the held-out
tail scored under its name. Fine-tuning runs (a task's splits): test_finetune.py."""

import pytest

from jaxlm.config import base_config
from jaxlm.train import evaluation, trainer


def test_a_language_model_run_scores_its_held_out_tail_and_refuses_other_splits(tmp_path):
  text = tmp_path / "text.txt"
  text.write_text("to be or not to be, that is the question\n" * 40)
  c = base_config()
  c.model.update({"num_layers": 1, "embed_dim": 32, "num_heads": 2, "max_seq_len": 16})
  c.data.update({"source": "file", "path": str(text), "seq_len": 16, "tokenizer": "char"})
  c.train.update({"steps": 2, "batch_size": 8, "eval_every": 2, "eval_batches": 1})
  c.optim.warmup_steps = 1
  c.checkpoint.use_async = False
  c.sample.max_new_tokens = 0
  workdir = str(tmp_path / "run")
  final = trainer.train(c, workdir)
  scores = evaluation.evaluate_run(workdir)
  assert scores["eval_loss"] == pytest.approx(final["eval_loss"], rel=1e-6)
  for split in ("test", "train", "validation"):
    with pytest.raises(ValueError, match=rf"--split='{split}': a kind='lm' run has one held-out "
                       r"split, 'dev' \(the data.val_fraction tail of its data\); use --split=dev"):
      evaluation.evaluate_run(workdir, split)


@pytest.mark.parametrize("kind", ["lm", "sft", "mlm", "dpo"])
def test_only_finetune_runs_have_splits_besides_the_held_out_tail(kind):
  evaluation.check_split(kind, "dev")
  evaluation.check_split("finetune", "test")  # the task says which splits it has
  with pytest.raises(ValueError, match=f"a kind='{kind}' run has one held-out split"):
    evaluation.check_split(kind, "test")
