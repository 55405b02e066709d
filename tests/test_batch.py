"""Tests jaxlm/data/batch.py, the data contract: every resumable iterator the trainer can receive
(each mode's train batches, and the loop's Prefetch and Stack around them) is a BatchIterator
whose state resumes it exactly; a batch refuses keys that are not Batch fields."""

import functools

import numpy as np
import pytest

from jaxlm.config import base_config
from jaxlm.data import batch, buckets, iterators, pipeline, preference
from jaxlm.train import trainer


def _lm_batches(tmp_path):
  """A real lm mode's train batches (pipeline.DataIterator), as trainer.setup builds them."""
  text = tmp_path / "text.txt"
  text.write_text("\n".join(f"line {i}: the quick brown fox jumps" for i in range(200)))
  c = base_config()
  c.model.update({"num_layers": 1, "embed_dim": 32, "num_heads": 2, "max_seq_len": 16})
  c.data.update({"source": "file", "path": str(text), "seq_len": 16, "tokenizer": "char"})
  c.train.update({"steps": 2, "batch_size": 8})
  c.optim.warmup_steps = 1
  return trainer.setup(c, str(tmp_path / "run")).mode.batches


def _pair(n: int) -> dict:
  ids = np.arange(1, n + 1, dtype=np.int32)
  mask = (np.arange(n) >= n // 2).astype(np.uint8)
  return {"chosen": (ids, mask), "rejected": (ids[::-1].copy(), mask)}


def test_every_iterator_the_trainer_can_receive_is_a_resumable_batch_iterator(tmp_path):
  features = [{"inputs": np.arange(2, 2 + n, dtype=np.int32), "label": n % 2}
              for n in range(3, 19)]
  pad = functools.partial(buckets.pad_batch, batch_size=4, buckets=(8, 16, 32), pad_id=0,
                          token_labels=False)
  sources = {
    pipeline.DataIterator: _lm_batches(tmp_path),  # lm, sft, mlm
    preference.PairBatches: preference.PairBatches([_pair(6 + i % 5) for i in range(12)],
                                                   num_rows=2, row_len=32, pad_id=0, seed=0),
    buckets.TaskBatches: buckets.TaskBatches(features, 4, pad, seed=0),  # finetune
  }
  for cls, source in sources.items():
    assert type(source) is cls
    wrapped = [iterators.Prefetch(source), iterators.Stack(source, [1, 2])]
    for it in [source, *wrapped]:
      assert isinstance(it, batch.BatchIterator), type(it).__name__
    state = source.get_state()
    first, second = next(source), next(source)
    assert set(first) <= set(batch.FIELDS) and "inputs" in first
    source.set_state(state)  # the state resumes exactly
    for want in (first, second):
      got = next(source)
      assert got.keys() == want.keys()
      for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    wrapped[0].close()

  class Unresumable:  # iterates, but a checkpoint could not record where it is
    def __iter__(self):
      return self

    def __next__(self):
      return {"inputs": np.zeros((1, 1), np.int32)}

  assert not isinstance(Unresumable(), batch.BatchIterator)


def test_a_batch_refuses_keys_that_are_not_batch_fields():
  with pytest.raises(ValueError, match="Batch fields are"):
    batch.from_dict({"inputs": np.zeros((1, 2)), "input_ids": np.zeros((1, 2))})
  assert batch.from_dict({"inputs": np.zeros((1, 2))}).targets is None
