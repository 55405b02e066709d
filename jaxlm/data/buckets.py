"""Batches of variable-length examples padded to a few bucket lengths, so that only a handful of
shapes compile; the last batch is filled with weight-0 rows to keep the batch size fixed.
Training batches can instead pack each step's examples into fewer rows (segment ids keep them
apart), which skips most of the padding that short examples such as SST-2 sentences carry.
"""

from collections.abc import Iterator, Sequence

import numpy as np

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
  used, starts = pack_starts([len(f["inputs"]) for f in features], row_len)
  R, L = -(-max(used, 1) // row_multiple) * row_multiple, row_len
  inputs, types, segments = (np.full(R * L, fill, np.int32) for fill in (pad_id, 0, 0))
  positions = np.full(R * L, max(position_offset - 1, 0), np.int32)  # padding at padding_idx
  labels = np.full(R * L, IGNORE, np.int32) if token_labels else None
  for i, (f, s) in enumerate(zip(features, starts)):
    n = len(f["inputs"])
    inputs[s:s + n], segments[s:s + n] = f["inputs"], i + 1
    positions[s:s + n] = position_offset + np.arange(n)
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


def train_batches(features: list[dict], batch_size: int, buckets: Sequence[int], pad_id: int,
                  token_labels: bool, seed: int, epoch: int, pack: dict | None = None,
                  skip: int = 0) -> Iterator[dict]:
  """One epoch of full batches in a shuffled order fixed by (seed, epoch), from batch `skip` on
  (a resumed run's place); the remainder (fewer than batch_size examples) is left out. With
  `pack` (pack_batch's row_len, row_multiple, position_offset), each step's examples are packed
  into rows instead of padded."""
  order = np.random.default_rng((seed, epoch)).permutation(len(features))
  for start in range(skip * batch_size, len(order) - batch_size + 1, batch_size):
    chunk = [features[i] for i in order[start:start + batch_size]]
    if pack:
      yield pack_batch(chunk, batch_size, pad_id=pad_id, token_labels=token_labels, **pack)
    else:
      yield pad_batch(chunk, batch_size, buckets, pad_id, token_labels)


def eval_batches(features: list[dict], batch_size: int, buckets: Sequence[int], pad_id: int,
                 token_labels: bool) -> Iterator[tuple[int, dict]]:
  """(number of real rows, batch) over all features in order; the last batch is filled."""
  for start in range(0, len(features), batch_size):
    chunk = features[start:start + batch_size]
    yield len(chunk), pad_batch(chunk, batch_size, buckets, pad_id, token_labels)
