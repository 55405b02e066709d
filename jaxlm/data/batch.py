"""The one data contract: `Batch`, what every data path produces and every train/eval step reads,
and `BatchIterator`, what every resumable stream of batches the trainer receives provides.

Sources build batches as dicts of numpy arrays with these field names (one process's rows);
`jaxlm.sharding.global_batch` turns them into a Batch of global arrays on the mesh.
"""

import dataclasses
from typing import Protocol, runtime_checkable

import jax
import numpy as np
from flax import struct


@struct.dataclass
class Batch:
  """One step's batch; fields a data path does not produce stay None (no leaves, no cost).

  Shape letters: B rows, T tokens per row, N examples (packed task rows hold several).
  """

  inputs: jax.Array  # [B, T] int32 token ids the model reads
  targets: jax.Array | None = None  # [B, T] int32: next token (lm, sft), original token (mlm)
  weights: jax.Array | None = None  # [B, T] float32 token loss weights; tasks: [N] or [B] per row
  segment_ids: jax.Array | None = None  # [B, T] int32 packed documents/examples, 0 = padding
  positions: jax.Array | None = None  # [B, T] int32 position of each token in its document
  labels: jax.Array | None = None  # tasks: [N] class or score, [B, T] tags, [N, 2] answer span
  token_types: jax.Array | None = None  # [B, T] int32 sentence A/B ids (BERT)
  padding_mask: jax.Array | None = None  # [B, T] bool, True at real tokens (tasks)
  cls_index: jax.Array | None = None  # [N] int32 flat index (row * T + column) of each [CLS]


FIELDS = tuple(f.name for f in dataclasses.fields(Batch))


def from_dict(arrays: dict) -> Batch:
  """A Batch of `arrays` (field name -> array).

  Raises:
    ValueError: for a key that is not a Batch field, or a missing `inputs`.
  """
  unknown = sorted(set(arrays) - set(FIELDS))
  if unknown or "inputs" not in arrays:
    raise ValueError(f"a batch has keys {sorted(arrays)}; Batch fields are {list(FIELDS)} and "
                     "`inputs` is required")
  return Batch(**arrays)


def process_rows(arrays: dict, index: int, count: int) -> dict:
  """Process `index`'s share (of `count`) of every array of a batch all processes built whole."""
  return {k: np.array_split(v, count)[index] for k, v in arrays.items()}


@runtime_checkable
class BatchIterator(Protocol):
  """A resumable iterator of this process's batches (dicts of numpy arrays named by Batch's
  fields): the modes' train batches (pipeline.DataIterator, buckets.TaskBatches,
  preference.PairBatches) and the wrappers the loop puts around them (iterators.Prefetch,
  iterators.Stack). get_state() is JSON-serializable and saved with each checkpoint;
  set_state(state) continues exactly after the batch that state was taken at."""

  def __iter__(self) -> "BatchIterator": ...

  def __next__(self) -> dict: ...

  def get_state(self) -> dict: ...

  def set_state(self, state: dict) -> None: ...
