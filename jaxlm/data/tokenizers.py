"""Tokenizers: any Hugging Face tokenizer, or a character-level one built from the training text.

Both are `transformers` fast tokenizers, saved into the run directory with `save_pretrained`, so
generation later decodes exactly as training encoded.
"""

import os

import numpy as np
import tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast


def char_tokenizer(text: str) -> PreTrainedTokenizerFast:
  """A character-level tokenizer whose vocabulary is the sorted set of characters in `text`."""
  chars = sorted(set(text))
  model = tokenizers.models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token=None)
  tok = tokenizers.Tokenizer(model)
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), "isolated")
  tok.decoder = tokenizers.decoders.Fuse()
  return PreTrainedTokenizerFast(tokenizer_object=tok)


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
  """Loads a Hugging Face tokenizer from a local directory or a hub id (never trusting remote code).

  Raises:
    ValueError: naming the source and what to set when it cannot be loaded.
  """
  try:
    return AutoTokenizer.from_pretrained(name, trust_remote_code=False)
  except (OSError, ValueError) as e:
    where = "directory" if os.path.isdir(name) else "hub id or directory"
    raise ValueError(
      f"cannot load tokenizer from {where} {name!r} ({type(e).__name__}: {e}). Set "
      "data.tokenizer to a directory with tokenizer files, a hub id, or 'char'."
    ) from None


def _untruncated_backend(tokenizer: PreTrainedTokenizerBase):
  """The Rust tokenizer behind `tokenizer` with any saved truncation and padding off, or None."""
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is not None and backend.truncation is not None:
    backend.no_truncation()  # a max_length saved with the tokenizer would cut whole documents
  if backend is not None and backend.padding is not None:
    backend.no_padding()  # a saved padding would fill every document with [PAD] ids
  return backend


def encode_batch(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
  """Token ids of each text (no special tokens added), batched in Rust where possible."""
  backend = _untruncated_backend(tokenizer)
  if backend is not None:
    return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
  return tokenizer(texts, add_special_tokens=False)["input_ids"]


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> np.ndarray:
  """Token ids of `text` (no special tokens added) as an int32 array."""
  backend = _untruncated_backend(tokenizer)
  if backend is not None:
    ids = backend.encode(text, add_special_tokens=False).ids
  else:
    ids = tokenizer.encode(text, add_special_tokens=False)
  return np.asarray(ids, dtype=np.int32)


def vocab_size(tokenizer: PreTrainedTokenizerBase) -> int:
  """Number of ids the tokenizer can emit (added tokens included)."""
  return len(tokenizer)


def check_fits(tokenizer, vocab_size: int) -> None:
  """Refuses a tokenizer that emits ids the model's embedding does not have."""
  n = len(tokenizer)
  if n > vocab_size:
    raise ValueError(
      f"the tokenizer has {n} tokens but the model's vocabulary has {vocab_size}: ids >= "
      f"{vocab_size} would fall outside the embedding. Use the tokenizer the model was trained "
      "with, or set model.vocab_size=0 to take it from the tokenizer")
