"""Packing tokenized documents into fixed-length rows with segment ids and per-segment positions.

concat:   the documents' token stream cut into rows of seq_len (a random-access source, so rows
          shuffle globally); a document cut at a row boundary continues as a new segment there.
best_fit: whole documents placed into rows by Grain's best-fit packer; never splits a document.
Both give rows {inputs, targets, weights, segment_ids, positions}: a token's target is the next
token of its own document (weight 0 at each document's end, on padding, and where an SFT loss
mask is 0), segment ids count documents from 1 within a row (0 is padding).
"""

import grain
import grain.experimental as grain_exp
import numpy as np

from jaxlm.data.tokenize import Documents

MODES = ("concat", "best_fit")
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
    row_out = {
      "inputs": docs.tokens[lo:hi], "targets": docs.tokens[lo + 1 : hi + 1], "weights": weights_T,
      "segment_ids": (doc_T - doc_T[0] + 1).astype(np.int32),
      "positions": (idx_T - np.maximum(docs.offsets[doc_T], lo)).astype(np.int32),
    }
    return {k: _pad(np.asarray(v), L) for k, v in row_out.items()}


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
