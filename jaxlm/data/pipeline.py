"""The data pipeline of language-model runs (lm, sft, mlm): sources -> cached tokens -> rows
(random windows, or packed documents) -> [masked-LM masking] -> this process's batches.

Built on Grain: random-access sources are shuffled globally (a new order each epoch), mixed by
weight, packed, batched and prefetched in background threads; Grain's iterator state (a few
integers) makes the stream resumable to the batch.

Topology independence: every process builds the same stream of *global* batches (a function of
the config and seed alone) and keeps its own contiguous block of rows (process p of P: rows
p*B/P to (p+1)*B/P), so 1 process x 4 devices and 2 processes x 2 devices train on the same
global batches, and the iterator state (a position counted in global batches) is the same on
every process: a run resumes exactly with any number of processes.
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
from jaxlm.data.batch import process_rows

# how rows are dealt to processes; states saved under another layout are not portable
LAYOUT = "global-batch-blocks"


class DataIterator:
  """This process's batches, a jaxlm.data.batch.BatchIterator: next() -> dict of numpy arrays
  (the local batch), get_state() -> JSON-serializable dict, set_state(dict).

  The state is a position in the stream of global batches of `batch_size` rows, identical on
  every process, so a state saved by any process of any process count continues this one.
  """

  def __init__(self, dataset: grain.IterDataset, process_index: int, process_count: int,
               batch_size: int = 0):
    self.process_index, self.process_count = process_index, process_count
    self.batch_size = batch_size
    self._holder = [iter(dataset)]
    # close and drop Grain's iterators at exit, before the interpreter tears its modules down
    weakref.finalize(self, _close_all, self._holder)

  @property
  def _it(self):
    return self._holder[0]

  def close(self):
    """Stops Grain's prefetch threads now (see `_take`); the iterator is spent after."""
    _close_all(self._holder)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return next(self._it)

  def get_state(self) -> dict:
    return {"grain": self._it.get_state(), "process_index": self.process_index,
            "process_count": self.process_count, "batch_size": self.batch_size,
            "layout": LAYOUT}

  def set_state(self, state: dict):
    """Continues from `state` (get_state of any process of a run with the same data config).

    Raises:
      ValueError: when the state counts global batches of another size, or was saved by an
        older layout whose batches depended on the process count.
    """
    saved = (state.get("process_index"), state.get("process_count"))
    same_process = saved == (self.process_index, self.process_count)
    if state.get("layout") != LAYOUT and not (same_process or saved[1] == 1):
      raise ValueError(
        f"the data iterator state was saved by process {saved[0]} of {saved[1]} with an older "
        "row layout that depends on the process count, but this is process "
        f"{self.process_index} of {self.process_count}: resume with {saved[1]} processes, or "
        "start the data afresh in a new run directory")
    if state.get("batch_size", self.batch_size) != self.batch_size:
      raise ValueError(
        f"the data iterator state counts global batches of {state['batch_size']} rows, but "
        f"train.batch_size={self.batch_size}: resume with train.batch_size="
        f"{state['batch_size']}, or start the data afresh in a new run directory")
    self._it.set_state(state["grain"])


def _close_all(holder: list):
  while holder:
    it = holder.pop()
    if hasattr(it, "close"):
      it.close()


def _take(stream: grain.IterDataset, n: int) -> list:
  """The first `n` elements of `stream`, its iterator closed at once. Left to the garbage
  collector, a Grain iterator's close joins its prefetch threads from whichever thread collects
  it; inside ThreadPoolExecutor.submit (which holds a global lock that the prefetch threads
  also take) that deadlocks."""
  holder = [iter(stream)]
  try:
    return list(itertools.islice(holder[0], n))
  finally:
    _close_all(holder)


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


def _own_rows(ds: grain.IterDataset, shard: Shard) -> grain.IterDataset:
  """`ds`'s global batches cut to this process's contiguous block of rows."""
  if shard.count == 1:
    return ds
  return ds.map(lambda batch: process_rows(batch, shard.index, shard.count))


def batches(parts, cfg, batch_size: int, seed: int, shard: Shard, *, shuffle: bool = True,
            num_epochs: int | None = None, transform=None) -> grain.IterDataset:
  """This shard's rows of the stream of global `batch_size`-row batches of packed documents over
  weighted `parts` (the same global stream for any shard count).

  Args:
    parts: (weight, Documents) per source.
    num_epochs: passes over the data (None: forever).
    transform: `transform(rows, rng) -> rows` applied to each global batch (masked-LM masking).
  """
  if batch_size % shard.count:
    raise ValueError(f"train.batch_size={batch_size} must be divisible by the {shard.count} "
                     "processes")
  datasets = []
  for i, (_, docs) in enumerate(parts):
    ds = _source_dataset(docs, cfg)
    if shuffle:
      ds = ds.shuffle(seed=seed + i)  # a fresh permutation each epoch
    datasets.append(ds.repeat(num_epochs))
  ds = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(
    datasets, [w for w, _ in parts])
  read = grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch)
  if cfg.packing == "concat":
    whole = _masked(ds.batch(batch_size, drop_remainder=True).to_iter_dataset(read), transform,
                    seed)
    return _own_rows(whole, shard)
  # every process packs the whole stream (the same bins for any process count), keeps its rows
  elements = ds.to_iter_dataset(read)
  packed = packing.best_fit(elements, cfg.seq_len, cfg.best_fit_bins, seed)
  packed = _masked(packed.batch(batch_size, drop_remainder=True), transform, seed)
  return grain_exp.ThreadPrefetchIterDataset(_own_rows(packed, shard),
                                             prefetch_buffer_size=cfg.prefetch)


def window_batches(tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, shard: Shard,
                   cfg, transform=None) -> grain.IterDataset:
  """This shard's rows of global `batch_size`-row batches of random windows of `tokens` (global
  row i depends on (seed, i) alone; the global batch of step s is rows s*B to (s+1)*B - 1)."""
  if batch_size % shard.count:
    raise ValueError(f"train.batch_size={batch_size} must be divisible by the {shard.count} "
                     "processes")
  ds = grain.MapDataset.source(packing.RandomWindows(tokens, seq_len, seed))
  ds = ds.batch(batch_size, drop_remainder=True)
  read = grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch)
  return _own_rows(_masked(ds.to_iter_dataset(read), transform, seed), shard)


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
  if cfg.packing == "none":
    if sft:
      raise ValueError("kind='sft' trains on whole examples: set data.packing to 'best_fit' or "
                       "'concat' (random windows would cut examples and their loss masks)")
    return _windows(cfg, tokenizer, batch_size, seed, eval_batches, shard, mlm)
  if mlm is not None:
    mlm = dataclasses.replace(mlm, wrap=False)
  parts = load_parts(cfg, tokenizer, sft=sft)
  splits = [(w, *docs.split(cfg.val_fraction)) for w, docs in parts]
  train = [(w, tr) for w, tr, _ in splits]
  val = [(w, va) for w, _, va in splits if len(va)]
  evals = []
  if val and eval_batches:
    stream = batches(val[:1], cfg, batch_size, seed, shard, shuffle=False, num_epochs=1,
                     transform=mlm)
    evals = _take(stream, eval_batches)
    if not evals:
      raise ValueError(f"the validation split is smaller than one batch of {batch_size} rows of "
                       f"{cfg.seq_len}; raise data.val_fraction or lower "
                       "train.batch_size")
  n_train = sum(len(tr.tokens) for _, tr in train)
  summary = (f"{n_train:,} train tokens in {sum(len(tr) for _, tr in train):,} documents, "
             f"{len(parts)} source(s); packing={cfg.packing}")
  it = DataIterator(batches(train, cfg, batch_size, seed, shard, transform=mlm), shard.index,
                    shard.count, batch_size)
  return Pipeline(it, evals, summary)


def _windows(cfg, tokenizer, batch_size: int, seed: int, eval_batches: int, shard: Shard, mlm):
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
    stream = window_batches(val, seq_len, batch_size, seed + 1, shard, cfg, mlm)
    evals = _take(stream, eval_batches)
  it = DataIterator(window_batches(train, seq_len, batch_size, seed, shard, cfg, mlm),
                    shard.index, shard.count, batch_size)
  return Pipeline(it, evals, f"{len(train):,} train / {len(val):,} val tokens; random windows")
