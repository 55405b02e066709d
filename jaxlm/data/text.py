"""Text sources tokenized into one token stream, split into train/val, sampled as random windows.

Sources: a local text file, a Hugging Face dataset's text column (hub id or local files), or the
Python reference documentation shipped with every Python (`pydoc`, no download).
Batches depend only on (seed, step, process), so a resumed run sees exactly the same data.
"""

import dataclasses
import os

import numpy as np

from jaxlm.data import tokenizers as tok_lib

SOURCES = ("file", "hf", "pydoc")


def pydoc_text() -> str:
  """The Python language reference topics that ship with CPython (pydoc_data)."""
  from pydoc_data import topics

  return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def _hf_texts(cfg) -> list[str]:
  import datasets

  name = cfg.hf_dataset
  if os.path.exists(name) and os.path.isfile(name):
    ds = datasets.load_dataset("text", data_files=name, split=cfg.hf_split)
  else:
    ds = datasets.load_dataset(name, cfg.hf_config or None, split=cfg.hf_split)
  if cfg.text_column not in ds.column_names:
    raise ValueError(
      f"data.text_column={cfg.text_column!r} is not a column of {name!r}; "
      f"its columns are {ds.column_names}"
    )
  return [t for t in ds[cfg.text_column] if t]


def load_documents(cfg) -> list[str]:
  """The raw documents named by the data config.

  Raises:
    FileNotFoundError / ValueError with the config key to fix.
  """
  if cfg.source not in SOURCES:
    raise ValueError(f"data.source={cfg.source!r} is not one of {SOURCES}")
  if cfg.source == "pydoc":
    return [pydoc_text()]
  if cfg.source == "hf":
    if not cfg.hf_dataset:
      raise ValueError("data.source='hf' needs data.hf_dataset (a hub id or a local path)")
    docs = _hf_texts(cfg)
  else:
    if not cfg.path:
      raise ValueError("data.source='file' needs data.path: set --config.data.path=FILE")
    if not os.path.isfile(cfg.path):
      raise FileNotFoundError(
        f"data file not found: {cfg.path!r}; set --config.data.path to an existing text file"
      )
    with open(cfg.path, encoding="utf-8") as f:
      docs = [f.read()]
  if not any(docs):
    raise ValueError(f"the data source ({cfg.source}: {cfg.path or cfg.hf_dataset}) is empty")
  return docs


def tokenize_documents(tokenizer, docs: list[str]) -> np.ndarray:
  """Concatenates the documents' ids, separated by EOS when the tokenizer has one."""
  eos = tokenizer.eos_token_id
  if len(docs) == 1:
    return tok_lib.encode(tokenizer, docs[0])
  encoded = tokenizer(docs, add_special_tokens=False)["input_ids"]
  sep = [eos] if eos is not None else []
  return np.asarray([i for ids in encoded for i in ids + sep], dtype=np.int32)


@dataclasses.dataclass
class TokenStream:
  """Train and validation token streams sampled as random fixed-length windows."""

  train: np.ndarray
  val: np.ndarray
  seq_len: int
  seed: int

  @classmethod
  def split(cls, tokens: np.ndarray, val_fraction: float, seq_len: int, seed: int):
    """First (1 - val_fraction) of the stream for training, the rest for validation."""
    n_val = int(len(tokens) * val_fraction)
    train, val = tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]
    for name, part in (("train", train), ("val", val)):
      if len(part) <= seq_len and (name == "train" or n_val):
        raise ValueError(
          f"the {name} split has {len(part)} tokens, not more than a window of seq_len="
          f"{seq_len}; use more data or a smaller data.seq_len"
        )
    return cls(train, val, seq_len, seed)

  def windows(self, split: str, batch: int, key: tuple) -> dict[str, np.ndarray]:
    """`batch` random windows of `split`; the same `key` always gives the same windows."""
    data = self.train if split == "train" else self.val
    rng = np.random.default_rng((self.seed, *key))
    starts = rng.integers(0, len(data) - self.seq_len, size=batch)
    idx = starts[:, None] + np.arange(self.seq_len + 1)
    chunk = data[idx]
    return {"inputs": chunk[:, :-1], "targets": chunk[:, 1:]}

  def train_batch(self, step: int, batch: int, process: int = 0) -> dict[str, np.ndarray]:
    """This process's share of the global batch of `step`."""
    return self.windows("train", batch, (0, step, process))

  def eval_batches(self, split: str, batch: int, num: int, process: int = 0):
    """The same `num` batches at every eval, so eval losses are comparable across steps."""
    return [self.windows(split, batch, (1, i, process)) for i in range(num)]


class WindowIterator:
  """Random-window batches of a TokenStream as a resumable iterator; its state is the step."""

  def __init__(self, stream: TokenStream, local_batch: int, process_index: int = 0,
               step: int = 0):
    self.stream, self.local_batch, self.process_index, self.step = (
      stream, local_batch, process_index, step)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self.stream.train_batch(self.step, self.local_batch, self.process_index)
    self.step += 1
    return batch

  def get_state(self) -> dict:
    return {"step": self.step}

  def set_state(self, state: dict):
    self.step = int(state["step"])
