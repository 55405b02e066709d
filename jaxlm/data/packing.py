"""Rows of tokens: random windows of one stream, or documents packed into fixed-length rows with
segment ids and per-segment positions (shared with the fine-tuning packer, jaxlm.data.buckets).

none:     random windows of the token stream (nanoGPT's sampling): rows {inputs, targets}.
concat:   the documents' token stream cut into rows of seq_len (a random-access source, so rows
          shuffle globally); a document cut at a row boundary continues as a new segment there.
best_fit: whole documents placed into rows by Grain's best-fit packer; never splits a document.
Packed rows are {inputs, targets, weights, segment_ids, positions}: a token's target is the next
token of its own document (weight 0 at each document's end, on padding, and where an SFT loss
mask is 0), segment ids count documents from 1 within a row (0 is padding).
"""

import grain
import grain.experimental as grain_exp
import numpy as np

from jaxlm.data.tokenize import Documents

MODES = ("none", "concat", "best_fit")


def fill_segments(lengths, starts, size: int, position_offset: int = 0,
                  pad_position: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(segment ids, positions) of `size` slots holding pieces of `lengths` at flat `starts`:
  piece i has segment id i + 1 (0 marks padding) and positions counting from `position_offset`;
  padding sits at `pad_position`."""
  segment_ids = np.zeros(size, np.int32)
  positions = np.full(size, pad_position, np.int32)
  for i, (start, n) in enumerate(zip(starts, lengths)):
    segment_ids[start:start + n] = i + 1
    positions[start:start + n] = position_offset + np.arange(n)
  return segment_ids, positions


class RandomWindows:
  """Random-access windows of one token stream: row i is the seq_len + 1 tokens from a start
  drawn from (seed, i) alone, so any process can read any row and a row never changes."""

  def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, num_rows: int = 2**40):
    self.tokens, self.seq_len, self.seed, self.num_rows = tokens, seq_len, seed, num_rows

  def __len__(self) -> int:
    return self.num_rows

  def __getitem__(self, row: int) -> dict[str, np.ndarray]:
    start = np.random.default_rng((self.seed, row)).integers(0, len(self.tokens) - self.seq_len)
    window = np.asarray(self.tokens[start:start + self.seq_len + 1], np.int32)
    return {"inputs": window[:-1], "targets": window[1:]}
ROW_KEYS = ("inputs", "targets", "weights", "segment_ids", "positions")


class ConcatRows:
  """Random-access rows of the concatenated documents; the last row is padded, nothing dropped."""

  def __init__(self, docs: Documents, seq_len: int):
    self.docs, self.seq_len = docs, seq_len
    self.num_inputs = len(docs.tokens) - 1  # every token but the last has a next token

  def __len__(self) -> int:
    return (self.num_inputs + self.seq_len - 1) // self.seq_len

  def __getitem__(self, row: int) -> dict[str, np.ndarray]:
    L, docs = self.seq_len, self.docs
    lo, hi = row * L, min(row * L + L, self.num_inputs)
    idx_T = np.arange(lo, hi)
    doc_T = np.searchsorted(docs.offsets, idx_T, side="right") - 1
    same_doc_T = idx_T + 1 < docs.offsets[doc_T + 1]
    weights_T = same_doc_T.astype(np.float32)
    if docs.loss_mask is not None:
      weights_T *= docs.loss_mask[lo + 1 : hi + 1]
    # the row's pieces: one per document it touches (a document cut at `lo` restarts at 0)
    bounds = np.unique(np.clip(docs.offsets[doc_T[0]:doc_T[-1] + 2], lo, hi))
    segment_ids, positions = fill_segments(np.diff(bounds), bounds[:-1] - lo, L)
    row_out = {"inputs": docs.tokens[lo:hi], "targets": docs.tokens[lo + 1 : hi + 1],
               "weights": weights_T}
    return {**{k: _pad(np.asarray(v), L) for k, v in row_out.items()},
            "segment_ids": segment_ids, "positions": positions}


def _pad(x: np.ndarray, length: int) -> np.ndarray:
  x = x.astype(np.float32 if x.dtype == np.float32 else np.int32, copy=False)
  return x if len(x) == length else np.pad(x, (0, length - len(x)))


class DocumentElements:
  """Random-access documents as {inputs, targets, weights} (one shorter than the document)."""

  def __init__(self, docs: Documents, seq_len: int):
    self.docs = docs
    self.index = np.flatnonzero(docs.lengths >= 2)  # a document needs a next token to train on
    too_long = np.flatnonzero(docs.lengths - 1 > seq_len)
    if len(too_long):
      raise ValueError(
        f"{len(too_long)} document(s) are longer than data.seq_len={seq_len} + 1 tokens (the "
        f"longest has {int(docs.lengths.max())}, e.g. document {int(too_long[0])}); "
        "data.packing='best_fit' never splits documents: raise data.seq_len, use "
        "data.packing='concat', or set data.truncate=True"
      )

  def __len__(self) -> int:
    return len(self.index)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    d = int(self.index[i])
    a, b = int(self.docs.offsets[d]), int(self.docs.offsets[d + 1])
    ids = np.asarray(self.docs.tokens[a:b], np.int32)
    weights = np.ones(b - a - 1, np.float32)
    if self.docs.loss_mask is not None:
      weights *= self.docs.loss_mask[a + 1 : b]
    return {"inputs": ids[:-1], "targets": ids[1:], "weights": weights}


def truncate(docs: Documents, max_len: int) -> Documents:
  """The documents cut to at most `max_len` tokens each (for best_fit with data.truncate)."""
  lengths = np.minimum(docs.lengths, max_len)
  keep = np.concatenate([np.arange(a, a + n) for a, n in zip(docs.offsets[:-1], lengths)])
  mask = None if docs.loss_mask is None else np.asarray(docs.loss_mask)[keep]
  offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  return Documents(np.asarray(docs.tokens)[keep], offsets, mask)


def best_fit(elements: grain.IterDataset, seq_len: int, num_bins: int, seed: int):
  """Grain's best-fit packer over document elements, renamed to the row keys."""
  length = {"inputs": seq_len, "targets": seq_len, "weights": seq_len}
  packed = grain_exp.BestFitPackIterDataset(
    elements, length_struct=length, num_packing_bins=num_bins, seed=seed, shuffle_bins=True
  )
  return packed.map(_rename_packed)


def _rename_packed(x: dict) -> dict[str, np.ndarray]:
  return {"inputs": x["inputs"], "targets": x["targets"], "weights": x["weights"],
          "segment_ids": x["inputs_segment_ids"], "positions": x["inputs_positions"]}
