"""Masked-LM inputs: 15% of tokens chosen (of those 80% [MASK], 10% random, 10% kept), special
tokens and padding never chosen; optionally whole words chosen together.

The same rule as transformers' DataCollatorForLanguageModeling / ...ForWholeWordMask, on numpy
arrays and a numpy Generator; `Masker` applies it to the rows of any data path (random windows or
packed documents) inside the Grain pipeline, so batches are deterministic and resumable.
"""

import dataclasses

import numpy as np


def word_start_table(tokenizer) -> np.ndarray:
  """[V] bool: True where a token begins a word. WordPiece continuations start with '##';
  byte-level BPE / SentencePiece mark word starts with 'Ġ' / '▁' instead."""
  pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
  if any(p.startswith("##") for p in pieces):
    return np.asarray([not p.startswith("##") for p in pieces])
  return np.asarray([p.startswith(("Ġ", "▁")) or p in tokenizer.all_special_tokens
                     for p in pieces])


def special_table(tokenizer) -> np.ndarray:
  """[V] bool: True for the tokenizer's special tokens ([CLS], [SEP], [PAD], ...)."""
  table = np.zeros(len(tokenizer), bool)
  table[tokenizer.all_special_ids] = True
  return table


def _chosen_words(rng, word_starts_BT, candidate_BT, prob: float) -> np.ndarray:
  """Chooses whole words with probability `prob`: every sub-word follows its word's choice."""
  word_id_BT = np.cumsum(word_starts_BT | ~candidate_BT, axis=1)
  word_choice_BW = rng.random((word_id_BT.shape[0], word_id_BT.shape[1] + 1)) < prob
  return np.take_along_axis(word_choice_BW, word_id_BT, axis=1) & candidate_BT


def mask_tokens(rng: np.random.Generator, tokens_BT: np.ndarray, *, special_BT: np.ndarray,
                mask_id: int, vocab_size: int, prob: float = 0.15,
                word_starts_BT: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Masks a batch for MLM.

  Args:
    rng: numpy Generator (seed it from (seed, step) for reproducible batches).
    tokens_BT: int ids, padding included.
    special_BT: True at special tokens and padding; these are never chosen.
    mask_id: the [MASK] id; vocab_size: random replacements are drawn from [0, vocab_size).
    prob: chance that a token (or a whole word) is chosen.
    word_starts_BT: when given, whole-word masking: True where a token starts a word.
  Returns:
    {"inputs": corrupted ids, "targets": original ids, "weights": 1.0 at chosen tokens}.
  """
  candidate_BT = ~special_BT
  if word_starts_BT is None:
    chosen_BT = (rng.random(tokens_BT.shape) < prob) & candidate_BT
  else:
    chosen_BT = _chosen_words(rng, word_starts_BT, candidate_BT, prob)
  roll_BT = rng.random(tokens_BT.shape)
  masked_BT = chosen_BT & (roll_BT < 0.8)
  randomised_BT = chosen_BT & (roll_BT >= 0.8) & (roll_BT < 0.9)
  random_ids_BT = rng.integers(0, vocab_size, tokens_BT.shape)
  inputs_BT = np.where(masked_BT, mask_id, np.where(randomised_BT, random_ids_BT, tokens_BT))
  return {"inputs": inputs_BT.astype(np.int32), "targets": tokens_BT.astype(np.int32),
          "weights": chosen_BT.astype(np.float32)}


@dataclasses.dataclass
class Masker:
  """Masked-LM as a transform of any data path's rows: `masker(rows, rng) -> rows` takes each
  row's `inputs` as the text, chooses and corrupts tokens, and returns {inputs: corrupted,
  targets: original, weights: 1 at chosen tokens} (segment ids and positions kept, padding never
  chosen). `wrap` puts [CLS] before and [SEP] after each row (for random windows of a stream,
  which are 2 tokens shorter); `position_offset` shifts packed rows' positions (RoBERTa).
  """

  tokenizer: object
  prob: float = 0.15
  whole_word: bool = False
  wrap: bool = False
  position_offset: int = 0

  def __post_init__(self):
    tok = self.tokenizer
    missing = [n for n in ("cls_token_id", "sep_token_id", "mask_token_id")
               if getattr(tok, n, None) is None]
    if missing:
      raise ValueError(f"masked-LM training needs a tokenizer with {missing} (a BERT or "
                       "RoBERTa tokenizer); set data.tokenizer to one")
    if not 0.0 < self.prob < 1.0:
      raise ValueError(f"mlm.prob={self.prob} must be between 0 and 1")
    self.special = special_table(tok)
    self.word_starts = word_start_table(tok) if self.whole_word else None

  def __call__(self, rows: dict, rng: np.random.Generator) -> dict:
    tokens_BT = rows["inputs"]
    if self.wrap:
      B = tokens_BT.shape[0]
      tokens_BT = np.concatenate([np.full((B, 1), self.tokenizer.cls_token_id), tokens_BT,
                                  np.full((B, 1), self.tokenizer.sep_token_id)], axis=1)
    special_BT = self.special[tokens_BT]
    segment_ids_BT = rows.get("segment_ids")
    if segment_ids_BT is not None:
      special_BT = special_BT | (segment_ids_BT == 0)
    starts = None if self.word_starts is None else self.word_starts[tokens_BT]
    out = mask_tokens(rng, tokens_BT, special_BT=special_BT, mask_id=self.tokenizer.mask_token_id,
                      vocab_size=len(self.tokenizer), prob=self.prob, word_starts_BT=starts)
    if segment_ids_BT is not None:
      out["segment_ids"] = segment_ids_BT
      out["positions"] = rows["positions"] + np.int32(self.position_offset)
    return out
