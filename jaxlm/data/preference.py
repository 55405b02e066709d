"""Preference pairs for DPO: JSONL rows of `prompt` / `chosen` / `rejected` (TRL's formats), each
response rendered after its prompt with the tokenizer's chat template, packed into rows.

A row's fields are strings (the prompt is one user turn, each response one assistant turn) or
chat messages (`prompt`: a list of {role, content}; `chosen` / `rejected`: the assistant
message(s) that follow it). Only the response tokens are trained on (weights 1; the prompt, an
earlier assistant turn in it and padding 0). A pair is packed whole into one row, chosen then
rejected, as segments 2k + 1 and 2k + 2 (segment ids keep packed sequences from attending to
each other; positions restart at 0), which is how jaxlm.train.dpo pairs them up again.
"""

import glob
import itertools
import json

import numpy as np

from jaxlm.data import sft
from jaxlm.data.batch import process_rows
from jaxlm.data.packing import fill_segments

FIELDS = ("prompt", "chosen", "rejected")


def read_rows(pattern: str) -> list[tuple[str, dict]]:
  """(where, row) of every line of the JSONL file(s) `pattern` names; `where` is "file:line".

  Raises:
    ValueError: when no file matches, or a line is not a JSON object.
  """
  files = sorted(glob.glob(pattern))
  if not files:
    raise ValueError(
      f"no preference file matches data.path={pattern!r}; set --config.data.path "
      "to a JSONL file (or glob) of prompt/chosen/rejected rows"
    )
  rows = []
  for f in files:
    with open(f, encoding="utf-8") as fh:
      for n, line in enumerate(fh, 1):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
        except json.JSONDecodeError as err:
          raise ValueError(f"preference row {f}:{n} is not JSON ({err.msg})") from None
        if not isinstance(row, dict):
          raise TypeError(f"preference row {f}:{n} is not a JSON object with {FIELDS}")
        rows.append((f"{f}:{n}", row))
  return rows


def _turns(value, role: str) -> list[dict]:
  return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def to_messages(row: dict, where: str) -> tuple[list[dict], list[dict], list[dict]]:
  """(prompt messages, chosen messages, rejected messages) of one row.

  Raises:
    ValueError: naming the row, when a field is missing or empty, or chosen equals rejected.
  """
  missing = [k for k in FIELDS if not row.get(k)]
  if missing:
    raise ValueError(
      f"preference row {where} has no {' / '.join(missing)} (fields: "
      f"{sorted(row)}); every row needs non-empty prompt, chosen and rejected"
    )
  if row["chosen"] == row["rejected"]:
    raise ValueError(
      f"preference row {where} has chosen equal to rejected; a pair must differ (drop the row)"
    )
  prompt = _turns(row["prompt"], "user")
  chosen, rejected = _turns(row["chosen"], "assistant"), _turns(row["rejected"], "assistant")
  for name, msgs in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
    if not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
      raise ValueError(
        f"preference row {where}: {name} must be a string or a list of {{role, content}} messages"
      )
  return prompt, chosen, rejected


def encode_sequence(
  tokenizer, prompt: list[dict], response: list[dict], bos: list[int], eos: list[int]
) -> tuple[np.ndarray, np.ndarray]:
  """(int32 ids, uint8 loss mask) of `prompt` + `response` through the chat template; the mask
  is 1 on the response's assistant tokens (and a trailing eos), 0 elsewhere."""
  messages = prompt + response
  text, spans = sft.render(tokenizer, messages)
  spans = spans[sum(m["role"] == "assistant" for m in prompt) :]  # the response's turns only
  enc = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
  starts = np.array([s for s, _ in enc.offsets], np.int64)
  mask = np.zeros(len(starts), np.uint8)
  for lo, hi in spans:
    mask[(starts >= lo) & (starts < hi)] = 1
  ids = np.concatenate([bos, enc.ids, eos]).astype(np.int32)
  return ids, np.concatenate([np.zeros(len(bos)), mask, np.ones(len(eos))]).astype(np.uint8)


def encode_pairs(
  tokenizer, rows: list[tuple[str, dict]], *, row_len: int, bos=(), eos=(), drop_long: bool = False
) -> tuple[list[dict], int]:
  """(pairs, number dropped as too long): each pair {"chosen": (ids, mask), "rejected": ...}.

  Raises:
    ValueError: naming the row, for a bad row, or a pair longer than a row (unless `drop_long`).
  """
  pairs, dropped = [], 0
  for where, row in rows:
    prompt, chosen, rejected = to_messages(row, where)
    pair = {
      name: encode_sequence(tokenizer, prompt, resp, list(bos), list(eos))
      for name, resp in (("chosen", chosen), ("rejected", rejected))
    }
    n = pair_length(pair)
    if n > row_len:
      if drop_long:
        dropped += 1
        continue
      raise ValueError(
        f"preference row {where} needs {n} tokens (chosen and rejected with their "
        f"prompt), more than a row of data.seq_len={row_len}; raise data.seq_len "
        "or set data.truncate=True to drop such rows"
      )
    pairs.append(pair)
  return pairs, dropped


def pair_length(pair: dict) -> int:
  """Tokens a pair takes in a row: each sequence less one (inputs are ids[:-1])."""
  return sum(len(pair[k][0]) - 1 for k in ("chosen", "rejected"))


def pack(pairs: list[dict], num_rows: int, row_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """`pairs` placed in order into `num_rows` rows (each into the first row with room) as the
  packed-row fields inputs / targets / weights / segment_ids / positions.

  Raises:
    ValueError: when the pairs do not fit.
  """
  room, placed = [row_len] * num_rows, [[] for _ in range(num_rows)]
  for pair in pairs:
    need = pair_length(pair)
    r = next((r for r in range(num_rows) if room[r] >= need), None)
    if r is None:
      raise ValueError(f"{len(pairs)} preference pairs do not fit {num_rows} rows of {row_len}")
    placed[r].append(pair)
    room[r] -= need
  fields = {
    k: np.zeros((num_rows, row_len), np.float32 if k == "weights" else np.int32)
    for k in ("inputs", "targets", "weights", "segment_ids", "positions")
  }
  fields["inputs"][:] = pad_id
  for r, row_pairs in enumerate(placed):
    seqs = [p[k] for p in row_pairs for k in ("chosen", "rejected")]
    lengths = [len(ids) - 1 for ids, _ in seqs]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    fields["segment_ids"][r], fields["positions"][r] = fill_segments(lengths, starts, row_len)
    for (ids, mask), s, n in zip(seqs, starts, lengths):
      fields["inputs"][r, s : s + n] = ids[:-1]
      fields["targets"][r, s : s + n] = ids[1:]
      fields["weights"][r, s : s + n] = mask[1:]
  return fields


def plan_batches(
  pairs: list[dict], order: np.ndarray, num_rows: int, row_len: int, start: int = 0
) -> list[int]:
  """The index in `order` where each batch after `start` begins: a batch takes pairs in order
  while they fit its `num_rows` rows (first fit), so its size varies with the pairs' lengths."""
  bounds, i = [], start
  while i < len(order):
    room = [row_len] * num_rows
    j = i
    while j < len(order):
      need = pair_length(pairs[order[j]])
      r = next((r for r in range(num_rows) if room[r] >= need), None)
      if r is None:
        break
      room[r] -= need
      j += 1
    bounds.append(i)
    i = j
  return bounds


class PairBatches:
  """Epochs of packed preference batches, each epoch in an order fixed by (seed, epoch); a batch
  fills `num_rows` rows with as many pairs as fit, so epochs have slightly different numbers of
  batches. The batch of step s is a function of s alone, so the iterator's state is the step;
  each process gets its rows of the batch."""

  def __init__(
    self,
    pairs: list[dict],
    num_rows: int,
    row_len: int,
    pad_id: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
  ):
    if not pairs:
      raise ValueError("no preference pairs to train on; check data.path")
    self.pairs, self.num_rows, self.row_len, self.pad_id, self.seed = (
      pairs,
      num_rows,
      row_len,
      pad_id,
      seed,
    )
    self.process_index, self.process_count = process_index, process_count
    self.step, self._plans, self._counts = 0, {}, {}
    self.per_epoch = len(self._plan(0)[1]) - 1  # epoch 0's batches (others differ a little)

  def _plan(self, epoch: int):
    """(order, batch bounds in it) of `epoch`; the newest two epochs are kept."""
    if epoch not in self._plans:
      order = np.random.default_rng((self.seed, epoch)).permutation(len(self.pairs))
      bounds = plan_batches(self.pairs, order, self.num_rows, self.row_len) + [len(order)]
      self._plans = {e: v for e, v in self._plans.items() if e >= epoch - 1}
      self._plans[epoch] = (order, bounds)
      self._counts[epoch] = len(bounds) - 1
    return self._plans[epoch]

  def _locate(self, step: int) -> tuple[int, int]:
    """(epoch, batch within it) of `step`."""
    epoch = 0
    while step >= (self._counts[epoch] if epoch in self._counts else len(self._plan(epoch)[1]) - 1):
      step -= self._counts[epoch]
      epoch += 1
    return epoch, step

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    epoch, i = self._locate(self.step)
    order, bounds = self._plan(epoch)
    picked = order[bounds[i] : bounds[i + 1]]
    self.step += 1
    batch = pack([self.pairs[j] for j in picked], self.num_rows, self.row_len, self.pad_id)
    return process_rows(batch, self.process_index, self.process_count)

  def get_state(self) -> dict:
    return {"step": self.step}

  def set_state(self, state: dict):
    self.step = int(state["step"])


def eval_batches(
  pairs: list[dict], num_rows: int, row_len: int, pad_id: int, max_batches: int
) -> list[dict]:
  """Up to `max_batches` packed batches of `pairs` in order (the last may be partly empty)."""
  bounds = plan_batches(pairs, np.arange(len(pairs)), num_rows, row_len) + [len(pairs)]
  return [
    pack(pairs[lo:hi], num_rows, row_len, pad_id)
    for lo, hi in list(itertools.pairwise(bounds))[:max_batches]
  ]
