"""Tokenizers: any Hugging Face tokenizer (a directory, a .gguf file or a hub id), or a
character-level one built from the training text; and the check that one fits a model's vocabulary.

Both are `transformers` fast tokenizers, saved into the run directory with `save_pretrained`, so
generation later decodes exactly as training encoded.
"""

import json
import os

import numpy as np
import tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from jaxlm.hf import io as hf_io  # numpy/json/os only: no cycle back into jaxlm.data


def char_tokenizer(text: str) -> PreTrainedTokenizerFast:
  """A character-level tokenizer whose vocabulary is the sorted set of characters in `text`."""
  chars = sorted(set(text))
  model = tokenizers.models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token=None)
  tok = tokenizers.Tokenizer(model)
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), "isolated")
  tok.decoder = tokenizers.decoders.Fuse()
  return PreTrainedTokenizerFast(tokenizer_object=tok)


def load_tokenizer(src: str, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
  """Loads a Hugging Face tokenizer (never trusting remote code).

  Args:
    src: a local directory (tokenizer files, e.g. an HF checkpoint's or a run's), a .gguf file,
      or a hub id.
    gguf_file: a GGUF file name inside the directory `src`.

  Raises:
    ValueError: naming the source and what it should be when it cannot be loaded.
  """
  try:
    # local paths resolve as jaxlm.hf.io does for checkpoints (a .gguf file -> its directory and
    # name); hub ids go to transformers as they are, which fetches only the tokenizer files
    src_dir = src
    if os.path.exists(src):
      src_dir, gguf_file = hf_io.resolve_source(src, gguf_file)
    if not gguf_file and _saved_class(src_dir) in _PLAIN_FAST:
      # what AutoTokenizer builds for it, without importing AutoTokenizer: that import pulls in
      # PyTorch wherever it is installed (about 250 MB and seconds of start-up)
      return PreTrainedTokenizerFast.from_pretrained(src_dir)
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoTokenizer.from_pretrained(src_dir, trust_remote_code=False, **kwargs)
  except (OSError, ValueError) as e:
    raise ValueError(
      f"cannot load tokenizer from {src!r} ({type(e).__name__}: {e}); give a directory with "
      "tokenizer files, a .gguf file or a hub id (or data.tokenizer='char' in a run config)"
    ) from None


# the tokenizer classes transformers saves a plain fast tokenizer (char_tokenizer's) under
_PLAIN_FAST = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _saved_class(src_dir: str) -> str | None:
  """The tokenizer_class a local tokenizer directory records (None: not a local directory)."""
  config = os.path.join(src_dir, "tokenizer_config.json")
  if not os.path.isfile(config):
    return None
  with open(config) as f:
    return json.load(f).get("tokenizer_class")


def check_fits(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
  """Refuses a tokenizer that emits ids the model's embedding (`vocab_size` rows) does not have.

  Raises:
    ValueError: one line naming both sizes and the fix.
  """
  n = len(tokenizer)  # as vocab_size(tokenizer) counts, added tokens included
  if n > vocab_size:
    raise ValueError(
      f"the tokenizer has {n} tokens but the model's vocabulary has {vocab_size}: ids >= "
      f"{vocab_size} would fall outside the embedding; use the tokenizer the model was trained "
      "with (or, for a new model, model.vocab_size=0 to take the size from the tokenizer)"
    )


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

