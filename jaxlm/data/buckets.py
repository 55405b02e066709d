"""Batches of variable-length examples padded to a few bucket lengths, so that only a handful of
shapes compile; the last batch is filled with weight-0 rows to keep the batch size fixed.
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


def train_batches(features: list[dict], batch_size: int, buckets: Sequence[int], pad_id: int,
                  token_labels: bool, seed: int, epoch: int) -> Iterator[dict]:
  """One epoch of full batches in a shuffled order fixed by (seed, epoch); the remainder
  (fewer than batch_size examples) is left out."""
  order = np.random.default_rng((seed, epoch)).permutation(len(features))
  for start in range(0, len(order) - batch_size + 1, batch_size):
    chunk = [features[i] for i in order[start:start + batch_size]]
    yield pad_batch(chunk, batch_size, buckets, pad_id, token_labels)


def eval_batches(features: list[dict], batch_size: int, buckets: Sequence[int], pad_id: int,
                 token_labels: bool) -> Iterator[tuple[int, dict]]:
  """(number of real rows, batch) over all features in order; the last batch is filled."""
  for start in range(0, len(features), batch_size):
    chunk = features[start:start + batch_size]
    yield len(chunk), pad_batch(chunk, batch_size, buckets, pad_id, token_labels)
