"""The data pipeline of language-model runs (lm, sft, mlm): sources -> cached tokens -> rows
(random windows, or packed documents) -> [masked-LM masking] -> this process's batches.

Built on Grain: random-access sources are shuffled globally (a new order each epoch), mixed by
weight, sharded by process (rows p, p + P, ...), packed, batched and prefetched in background
threads; Grain's iterator state (a few integers) makes the stream resumable to the batch.
"""

import dataclasses
import itertools
import weakref

import grain
import grain.experimental as grain_exp
import ml_collections
import numpy as np

from jaxlm.data import packing, tokenize
from jaxlm.data import sources as sources_lib


class DataIterator:
  """This process's batches. The loop's protocol: next() -> dict of numpy arrays (the local
  batch), get_state() -> JSON-serializable dict, set_state(dict)."""

  def __init__(self, dataset: grain.IterDataset, process_index: int, process_count: int):
    self.process_index, self.process_count = process_index, process_count
    self._holder = [iter(dataset)]
    # close and drop Grain's iterators at exit, before the interpreter tears its modules down
    weakref.finalize(self, _close_all, self._holder)

  @property
  def _it(self):
    return self._holder[0]

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return next(self._it)

  def get_state(self) -> dict:
    return {"grain": self._it.get_state(), "process_index": self.process_index,
            "process_count": self.process_count}

  def set_state(self, state: dict):
    """Continues from `state` (from get_state of the same process in the same data setup).

    Raises:
      ValueError: when the state was saved by a different number of processes.
    """
    saved = state.get("process_count")
    if saved != self.process_count or state.get("process_index") != self.process_index:
      raise ValueError(
        f"the data iterator state was saved by process {state.get('process_index')} of {saved}, "
        f"but this is process {self.process_index} of {self.process_count}: each process's "
        f"position in its shard is only defined for the same process count. Resume with {saved} "
        "processes, or start the data afresh in a new run directory"
      )
    self._it.set_state(state["grain"])


def _close_all(holder: list):
  while holder:
    it = holder.pop()
    if hasattr(it, "close"):
      it.close()


@dataclasses.dataclass
class Shard:
  """Where this process reads: its index among `count` processes."""

  index: int = 0
  count: int = 1


def load_parts(cfg, tokenizer, progress: bool = False, *,
               sft: bool = False) -> list[tuple[float, tokenize.Documents]]:
  """(mixture weight, tokenized documents) of each source the data config names; `sft` renders
  chat examples with a loss mask on the responses."""
  out = []
  for source in sources_lib.sources_from_config(cfg):
    docs, _ = tokenize.tokenize_source(source, cfg, tokenizer, progress=progress, sft=sft)
    if cfg.packing == "best_fit" and cfg.truncate:
      docs = packing.truncate(docs, cfg.seq_len + 1)
    out.append((source.weight, docs))
  return out


def _source_dataset(docs, cfg) -> grain.MapDataset:
  if cfg.packing == "concat":
    return grain.MapDataset.source(packing.ConcatRows(docs, cfg.seq_len))
  if cfg.packing == "best_fit":
    return grain.MapDataset.source(packing.DocumentElements(docs, cfg.seq_len))
  raise ValueError(f"data.packing={cfg.packing!r} is not one of {packing.MODES}")


def _masked(ds, transform, seed: int):
  """`ds` with `transform(rows, rng)` applied to each batch (a per-batch deterministic rng)."""
  return ds if transform is None else ds.random_map(transform, seed=seed)


def batches(parts, cfg, local_batch: int, seed: int, shard: Shard, *, shuffle: bool = True,
            num_epochs: int | None = None, transform=None) -> grain.IterDataset:
  """This shard's stream of `local_batch`-row batches of packed documents over weighted `parts`.

  Args:
    parts: (weight, Documents) per source.
    num_epochs: passes over the data (None: forever).
    transform: `transform(rows, rng) -> rows` applied to each batch (masked-LM masking).
  """
  datasets = []
  for i, (_, docs) in enumerate(parts):
    ds = _source_dataset(docs, cfg)
    if shuffle:
      ds = ds.shuffle(seed=seed + i)  # a fresh permutation each epoch
    datasets.append(ds.repeat(num_epochs))
  ds = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(
    datasets, [w for w, _ in parts])
  ds = ds[shard.index :: shard.count]
  read = grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch)
  if cfg.packing == "concat":
    return _masked(ds.batch(local_batch, drop_remainder=True).to_iter_dataset(read), transform,
                   seed)
  elements = ds.to_iter_dataset(read)
  packed = packing.best_fit(elements, cfg.seq_len, cfg.best_fit_bins, seed)
  packed = _masked(packed.batch(local_batch, drop_remainder=True), transform, seed)
  return grain_exp.ThreadPrefetchIterDataset(packed, prefetch_buffer_size=cfg.prefetch)


def window_batches(tokens: np.ndarray, seq_len: int, local_batch: int, seed: int, shard: Shard,
                   cfg, transform=None) -> grain.IterDataset:
  """This shard's batches of random windows of `tokens` (global row i depends on (seed, i)
  alone, so the global batch of a step is the same set of rows for any number of processes)."""
  ds = grain.MapDataset.source(packing.RandomWindows(tokens, seq_len, seed))
  ds = ds[shard.index :: shard.count].batch(local_batch, drop_remainder=True)
  read = grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch)
  return _masked(ds.to_iter_dataset(read), transform, seed)


def stream_tokens(cfg, tokenizer) -> np.ndarray:
  """All sources' tokens as one stream (each text file whole; EOS between documents when the
  tokenizer has one): what random windows are drawn from."""
  whole = ml_collections.ConfigDict({**cfg.to_dict(), "sample_by": "document", "add_bos": False,
                                     "add_eos": tokenizer.eos_token_id is not None})
  return np.concatenate([np.asarray(docs.tokens) for _, docs in load_parts(whole, tokenizer)])


@dataclasses.dataclass
class Pipeline:
  """A run's data: the resumable train iterator, fixed eval batches, and a summary line."""

  train: DataIterator
  eval_batches: list[dict]
  summary: str


def build(cfg, tokenizer, *, batch_size: int, seed: int, eval_batches: int, shard: Shard,
          sft: bool = False, mlm=None) -> Pipeline:
  """The train iterator and eval batches for data config `cfg`.

  Args:
    sft: chat examples (the tokenizer's template; loss on the responses only).
    mlm: a jaxlm.data.mlm.Masker for masked-LM training, applied to every batch.
  Raises:
    ValueError: when the batch does not split over processes or a split is too small.
  """
  if batch_size % shard.count:
    raise ValueError(f"train.batch_size={batch_size} must be divisible by the {shard.count} "
                     "processes")
  local = batch_size // shard.count
  if cfg.packing == "none":
    if sft:
      raise ValueError("kind='sft' trains on whole examples: set data.packing to 'best_fit' or "
                       "'concat' (random windows would cut examples and their loss masks)")
    return _windows(cfg, tokenizer, local, seed, eval_batches, shard, mlm)
  if mlm is not None:
    mlm = dataclasses.replace(mlm, wrap=False)
  parts = load_parts(cfg, tokenizer, sft=sft)
  splits = [(w, *docs.split(cfg.val_fraction)) for w, docs in parts]
  train = [(w, tr) for w, tr, _ in splits]
  val = [(w, va) for w, _, va in splits if len(va)]
  evals = []
  if val and eval_batches:
    stream = batches(val[:1], cfg, local, seed, shard, shuffle=False, num_epochs=1, transform=mlm)
    evals = list(itertools.islice(iter(stream), eval_batches))
    if not evals:
      raise ValueError(f"the validation split is smaller than one batch of {local} rows of "
                       f"{cfg.seq_len}; raise data.val_fraction or lower train.batch_size")
  n_train = sum(len(tr.tokens) for _, tr in train)
  summary = (f"{n_train:,} train tokens in {sum(len(tr) for _, tr in train):,} documents, "
             f"{len(parts)} source(s); packing={cfg.packing}")
  it = DataIterator(batches(train, cfg, local, seed, shard, transform=mlm), shard.index,
                    shard.count)
  return Pipeline(it, evals, summary)


def _windows(cfg, tokenizer, local: int, seed: int, eval_batches: int, shard: Shard, mlm):
  """Random windows of the sources' token stream: the first (1 - val_fraction) for training,
  the rest for a fixed set of eval windows. Masked-LM windows are 2 shorter, for [CLS] [SEP]."""
  tokens = stream_tokens(cfg, tokenizer)
  seq_len = cfg.seq_len
  if mlm is not None:
    mlm, seq_len = dataclasses.replace(mlm, wrap=True), seq_len - 2
  n_val = int(len(tokens) * cfg.val_fraction)
  train, val = tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]
  for name, part in (("train", train), ("val", val)):
    if len(part) <= seq_len and (name == "train" or n_val):
      raise ValueError(f"the {name} split has {len(part)} tokens, not more than a window of "
                       f"seq_len={seq_len}; use more data or a smaller data.seq_len")
  evals = []
  if n_val and eval_batches:
    stream = window_batches(val, seq_len, local, seed + 1, shard, cfg, mlm)
    evals = list(itertools.islice(iter(stream), eval_batches))
  it = DataIterator(window_batches(train, seq_len, local, seed, shard, cfg, mlm), shard.index,
                    shard.count)
  return Pipeline(it, evals, f"{len(train):,} train / {len(val):,} val tokens; random windows")
