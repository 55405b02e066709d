"""Tokenization of whole sources into flat token arrays plus document offsets, cached on disk.

The fast (Rust) tokenizer encodes each batch of documents on all cores; the result is stored in
the cache (jaxlm.data.cache) keyed by source, tokenizer and settings, and memory-mapped on reuse.
"""

import dataclasses
import hashlib
import itertools

import numpy as np
import tqdm

from jaxlm.data import cache
from jaxlm.data import sources as sources_lib
from jaxlm.data import tokenizers as tok_lib

FORMAT_VERSION = 2  # bump when the stored layout or the encoding rules change
BATCH_DOCS = 2048


@dataclasses.dataclass
class Documents:
  """Tokenized documents: doc i is tokens[offsets[i]:offsets[i+1]] (loss_mask aligned with it)."""

  tokens: np.ndarray  # int32 [N]
  offsets: np.ndarray  # int64 [D + 1]
  loss_mask: np.ndarray | None = None  # uint8 [N]: 1 where the token is a training target

  def __len__(self) -> int:
    return len(self.offsets) - 1

  @property
  def lengths(self) -> np.ndarray:
    return np.diff(self.offsets)

  def split(self, val_fraction: float) -> tuple["Documents", "Documents"]:
    """The first (1 - val_fraction) of the documents, and the rest."""
    n_val = int(len(self) * val_fraction)
    return self.select(0, len(self) - n_val), self.select(len(self) - n_val, len(self))

  def select(self, lo: int, hi: int) -> "Documents":
    """Documents lo..hi-1, sharing memory with this one."""
    a, b = int(self.offsets[lo]), int(self.offsets[hi])
    mask = None if self.loss_mask is None else self.loss_mask[a:b]
    return Documents(self.tokens[a:b], np.asarray(self.offsets[lo : hi + 1]) - a, mask)


def tokenizer_fingerprint(tokenizer) -> str:
  """Identity of a tokenizer: its full serialized form, special tokens and chat template."""
  backend = getattr(tokenizer, "backend_tokenizer", None)
  body = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
  extra = repr((tokenizer.bos_token_id, tokenizer.eos_token_id,
                getattr(tokenizer, "chat_template", None)))
  return hashlib.sha256((body + extra).encode()).hexdigest()[:24]


def settings(cfg, sft: bool = False) -> dict:
  """The data settings that change the tokens (part of the cache key)."""
  out = {"version": FORMAT_VERSION, "task": "sft" if sft else "lm", "add_bos": cfg.add_bos,
         "add_eos": cfg.add_eos}
  if sft:
    out.update(messages=cfg.messages_column, prompt=cfg.prompt_column,
               response=cfg.response_column)
  else:
    out["text_column"] = cfg.text_column
  return out


def special_ids(tokenizer, cfg) -> tuple[list[int], list[int]]:
  """The ids put before and after every document, as data.add_bos / data.add_eos ask."""
  def one(flag, token_id, name):
    if not flag:
      return []
    if token_id is None:
      raise ValueError(f"data.add_{name}=True but the tokenizer has no {name.upper()} token; "
                       f"set data.add_{name}=False")
    return [token_id]

  return one(cfg.add_bos, tokenizer.bos_token_id, "bos"), one(cfg.add_eos,
                                                            tokenizer.eos_token_id, "eos")


def encode_texts(tokenizer, texts: list[str], bos: list[int], eos: list[int]):
  """(flat int32 ids, int64 lengths) of the non-empty `texts`, each wrapped in bos/eos."""
  texts = [t for t in texts if t]
  ids = tok_lib.encode_batch(tokenizer, texts)
  lengths = np.fromiter(map(len, ids), np.int64, len(ids)) + len(bos) + len(eos)
  flat = np.fromiter(itertools.chain.from_iterable(bos + x + eos for x in ids), np.int32,
                     int(lengths.sum()))
  return flat, lengths, None


def tokenize_source(source, cfg, tokenizer, progress: bool = False, *,
                    sft: bool = False) -> tuple[Documents, bool]:
  """The tokenized documents of `source`, from the cache when there. Returns (docs, cache_hit).
  `sft`: chat examples rendered with the tokenizer's template, with a loss mask (jaxlm.data.sft).

  Raises:
    ValueError: when the source has no documents (or a named column is missing).
  """
  opened = sources_lib.open_source(source, cfg)
  entry = cache.key(opened.fingerprint, tokenizer_fingerprint(tokenizer), settings(cfg, sft))
  arrays = cache.load(cfg.cache_dir, entry)
  hit = arrays is not None
  if not hit:
    arrays = _encode_all(opened, cfg, tokenizer, source.describe(), progress, sft)
    info = {"source": source.describe(), "fingerprint": opened.fingerprint,
            "settings": settings(cfg, sft)}
    cache.save(cfg.cache_dir, entry, arrays, info)
  docs = Documents(arrays["tokens"], arrays["offsets"], arrays.get("loss_mask"))
  if len(docs) == 0:
    raise ValueError(f"the data source {source.describe()} is empty (no non-empty documents)")
  return docs, hit


def _encode_all(opened, cfg, tokenizer, name: str, progress: bool,
                sft: bool) -> dict[str, np.ndarray]:
  bos, eos = special_ids(tokenizer, cfg)
  if sft:
    from jaxlm.data import sft as sft_lib

    columns = sft_lib.columns(cfg)
    encode = lambda batch: sft_lib.encode_examples(tokenizer, batch, cfg, bos, eos)  # noqa: E731
  else:
    columns = [cfg.text_column]
    encode = lambda batch: encode_texts(tokenizer, batch[cfg.text_column], bos, eos)  # noqa: E731
  parts, bar = [], tqdm.tqdm(desc=f"tokenizing {name}", unit="doc", disable=not progress)
  for batch in opened.batches(columns, BATCH_DOCS):
    parts.append(encode(batch))
    bar.update(len(next(iter(batch.values()))))
  bar.close()
  tokens = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int32)
  lengths = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
  out = {"tokens": tokens, "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)}
  if sft:
    out["loss_mask"] = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.uint8)
  return out
