"""Fine-tuning batches: variable-length task examples padded to a few bucket lengths, so that
only a handful of shapes compile (the last batch filled with weight-0 rows to keep its size), or
each step's examples packed into fewer rows (segment ids keep them apart, as in pretraining's
packed rows), which skips most of the padding that short examples such as SST-2 sentences carry.
"""

from collections.abc import Callable, Iterator, Sequence

import numpy as np

from jaxlm.data.batch import process_rows
from jaxlm.data.packing import fill_segments

IGNORE = -100  # label of padded tokens in per-token tasks


def default_buckets(max_len: int, smallest: int = 16) -> tuple[int, ...]:
  """Powers of two from `smallest` below max_len, then max_len itself (e.g. 16, 32, 64)."""
  out, n = [], smallest
  while n < max_len:
    out.append(n)
    n *= 2
  return (*out, max_len)


def bucket_length(n: int, buckets: Sequence[int]) -> int:
  for b in buckets:
    if n <= b:
      return b
  raise ValueError(f"an example of {n} tokens is longer than the largest bucket {max(buckets)}; "
                   "raise task.max_len or the buckets")


def pad_batch(features: list[dict], batch_size: int, buckets: Sequence[int], pad_id: int,
              token_labels: bool) -> dict[str, np.ndarray]:
  """Stacks `features` (dicts with inputs, optional token_types, label) into arrays of
  [batch_size, bucket], adding weight-0 rows after them when there are fewer."""
  L = bucket_length(max(len(f["inputs"]) for f in features), buckets)
  B = batch_size
  inputs = np.full((B, L), pad_id, np.int32)
  types = np.zeros((B, L), np.int32)
  mask = np.zeros((B, L), bool)
  label0 = np.asarray(features[0]["label"])
  labels = (np.full((B, L), IGNORE, np.int32) if token_labels
            else np.zeros((B, *label0.shape), label0.dtype))
  for i, f in enumerate(features):
    n = len(f["inputs"])
    inputs[i, :n], mask[i, :n] = f["inputs"], True
    if "token_types" in f:
      types[i, :n] = f["token_types"]
    if token_labels:
      labels[i, :n] = f["label"]
    else:
      labels[i] = f["label"]
  weights = (np.arange(B) < len(features)).astype(np.float32)
  return {"inputs": inputs, "token_types": types, "padding_mask": mask, "labels": labels,
          "weights": weights}


def pack_starts(lengths: Sequence[int], row_len: int) -> tuple[int, np.ndarray]:
  """(rows used, each example's flat start index row * row_len + column): examples placed longest
  first, each into the first row with room (first-fit decreasing), in order within a row."""
  room, starts = [], np.zeros(len(lengths), np.int32)
  for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
    if lengths[i] > row_len:
      raise ValueError(f"an example of {lengths[i]} tokens does not fit a packed row of "
                       f"{row_len}; raise task.max_len")
    r = next((r for r, free in enumerate(room) if free >= lengths[i]), len(room))
    if r == len(room):
      room.append(row_len)
    starts[i] = r * row_len + row_len - room[r]
    room[r] -= lengths[i]
  return len(room), starts


def pack_batch(features: list[dict], batch_size: int, row_len: int, pad_id: int,
               token_labels: bool, row_multiple: int = 4, position_offset: int = 0
               ) -> dict[str, np.ndarray]:
  """The `batch_size` examples of one step packed into as few rows of `row_len` tokens as fit
  (rounded up to a multiple of `row_multiple`, so only a few shapes compile), with segment ids
  (0 = padding) that keep examples from attending to each other and positions restarting at
  `position_offset` for each example.

  Per-example labels (classification, regression) come as [batch_size] arrays with `cls_index`,
  the flat index (row * row_len + column) of each example's first token, and `weights` (0 for the
  rows that fill a short last batch); per-token labels come as [rows, row_len].
  """
  lengths = [len(f["inputs"]) for f in features]
  used, starts = pack_starts(lengths, row_len)
  R, L = -(-max(used, 1) // row_multiple) * row_multiple, row_len
  # the same segment/position layout as pretraining's packed rows; padding at padding_idx
  segments, positions = fill_segments(lengths, starts, R * L, position_offset,
                                      pad_position=max(position_offset - 1, 0))
  inputs, types = np.full(R * L, pad_id, np.int32), np.zeros(R * L, np.int32)
  labels = np.full(R * L, IGNORE, np.int32) if token_labels else None
  for f, s, n in zip(features, starts, lengths):
    inputs[s:s + n] = f["inputs"]
    types[s:s + n] = f.get("token_types", 0)
    if token_labels:
      labels[s:s + n] = f["label"]
  batch = {"inputs": inputs, "token_types": types, "segment_ids": segments,
           "positions": positions, "padding_mask": segments > 0}
  batch = {k: v.reshape(R, L) for k, v in batch.items()}
  if token_labels:
    return {**batch, "labels": labels.reshape(R, L), "weights": np.ones(R, np.float32)}
  label0 = np.asarray(features[0]["label"])
  labels = np.zeros((batch_size, *label0.shape), label0.dtype)
  labels[:len(features)] = [f["label"] for f in features]
  weights = (np.arange(batch_size) < len(features)).astype(np.float32)
  cls_index = np.zeros(batch_size, np.int32)
  cls_index[:len(features)] = starts
  return {**batch, "labels": labels, "weights": weights, "cls_index": cls_index}


class TaskBatches:
  """Epochs of a task's training batches, each epoch in a shuffled order fixed by (seed, epoch)
  (the remainder of fewer than batch_size examples left out). The batch of step s is a function
  of s alone, so the iterator's state is the step; each process gets its rows of the batch.

  `make_batch(features) -> dict` pads (pad_batch) or packs (pack_batch) one step's examples.
  """

  def __init__(self, features: list[dict], batch_size: int, make_batch: Callable, seed: int,
               process_index: int = 0, process_count: int = 1):
    self.features, self.batch_size, self.make_batch, self.seed = (
      features, batch_size, make_batch, seed)
    self.process_index, self.process_count = process_index, process_count
    self.per_epoch = len(features) // batch_size
    if not self.per_epoch:
      raise ValueError(f"{len(features)} training features do not fill one batch of "
                       f"train.batch_size={batch_size}")
    self.step, self._order = 0, (None, None)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    epoch, i = divmod(self.step, self.per_epoch)
    if self._order[0] != epoch:
      self._order = (epoch, np.random.default_rng((self.seed, epoch)).permutation(
        len(self.features)))
    picked = self._order[1][i * self.batch_size:(i + 1) * self.batch_size]
    self.step += 1
    batch = self.make_batch([self.features[j] for j in picked])
    return process_rows(batch, self.process_index, self.process_count)

  def get_state(self) -> dict:
    return {"step": self.step}

  def set_state(self, state: dict):
    self.step = int(state["step"])


def eval_batches(features: list[dict], batch_size: int, buckets: Sequence[int], pad_id: int,
                 token_labels: bool) -> Iterator[tuple[int, dict]]:
  """(number of real rows, batch) over all features in order; the last batch is filled."""
  for start in range(0, len(features), batch_size):
    chunk = features[start:start + batch_size]
    yield len(chunk), pad_batch(chunk, batch_size, buckets, pad_id, token_labels)
