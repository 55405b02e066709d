"""Where documents come from: local files and globs (text, JSON, JSONL, CSV, TSV, Parquet),
Hugging Face hub datasets (streamed or not), alone or as a weighted mixture named in the config,
and Python's own reference documentation (`pydoc`, shipped with every CPython: no download).

Each source yields its rows in batches of columns; a fingerprint (files' sizes and mtimes, or the
dataset's own fingerprint) lets the tokenization cache tell when the data changed.
"""

import dataclasses
import glob
import os
import sys
from collections.abc import Callable, Iterator

import ml_collections

FORMATS = {  # file extension -> Hugging Face `datasets` builder
  "txt": "text", "text": "text", "json": "json", "jsonl": "json", "csv": "csv", "tsv": "csv",
  "parquet": "parquet",
}
SAMPLE_BY = ("line", "paragraph", "document")
SOURCES = ("file", "hf", "pydoc")


def pydoc_text() -> str:
  """The Python language reference topics that ship with CPython (pydoc_data)."""
  from pydoc_data import topics

  return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


@dataclasses.dataclass(frozen=True)
class Source:
  """One source: `kind` "files" (a path or glob) or "hf" (a hub id), and its mixture weight."""

  kind: str
  name: str
  hf_config: str = ""
  split: str = "train"
  weight: float = 1.0

  def describe(self) -> str:
    return f"hf:{self.name}" + (f":{self.hf_config}" if self.hf_config else "") \
      if self.kind == "hf" else self.name


def parse_spec(spec: str, split: str) -> Source:
  """`PATH_OR_GLOB[=WEIGHT]` or `hf:ID[:CONFIG][=WEIGHT]` as a Source."""
  spec, _, weight = spec.strip().partition("=")
  try:
    w = float(weight) if weight else 1.0
  except ValueError:
    raise ValueError(f"bad mixture weight {weight!r} in data.mixture entry {spec!r}") from None
  if w <= 0:
    raise ValueError(f"data.mixture weights must be positive; {spec!r} has {w}")
  if spec.startswith("hf:"):
    name, _, hf_config = spec[3:].partition(":")
    return Source("hf", name, hf_config, split, w)
  return Source("files", spec, "", split, w)


def sources_from_config(cfg) -> list[Source]:
  """The sources the data config names: `data.mixture`, else source/path/hf_dataset."""
  if cfg.mixture:
    return [parse_spec(s, cfg.hf_split) for s in cfg.mixture.split(",") if s.strip()]
  if cfg.source == "hf":
    if not cfg.hf_dataset:
      raise ValueError("data.source='hf' needs data.hf_dataset (a hub id or a local path)")
    if os.path.exists(cfg.hf_dataset) or any(c in cfg.hf_dataset for c in "*?["):
      return [Source("files", cfg.hf_dataset, "", cfg.hf_split)]
    return [Source("hf", cfg.hf_dataset, cfg.hf_config, cfg.hf_split)]
  if cfg.source == "file":
    if not cfg.path:
      raise ValueError("data.source='file' needs data.path: set --config.data.path=FILE_OR_GLOB")
    return [Source("files", cfg.path)]
  if cfg.source == "pydoc":
    return [Source("pydoc", "pydoc")]
  raise ValueError(f"data.source={cfg.source!r} is not one of {SOURCES}")


def resolve_files(pattern: str) -> list[str]:
  """The files a path, directory or glob names, sorted.

  Raises:
    FileNotFoundError: when nothing matches.
  """
  if "://" in pattern:  # object storage (gs://...) through etils.epath
    files = _remote_files(pattern)
  else:
    if os.path.isdir(pattern):
      pattern = os.path.join(pattern, "*")
    files = sorted(f for f in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(f))
  if not files:
    raise FileNotFoundError(
      f"data file not found: {pattern!r} matches no file; set data.path / data.mixture to "
      "existing files or a glob"
    )
  return files


def _remote_files(pattern: str) -> list[str]:
  """The files a remote path, directory or glob (in its last component) names, sorted."""
  from etils import epath

  p = epath.Path(pattern)
  if p.is_dir():
    found = p.iterdir()
  elif any(c in p.name for c in "*?["):
    found = p.parent.glob(p.name)
  else:
    found = [p] if p.exists() else []
  return sorted(os.fspath(f) for f in found if not f.is_dir())


def _stat(f: str) -> tuple:
  """(path, size, mtime) of a local or remote file: the cache fingerprint."""
  if "://" in f:
    from etils import epath

    st = epath.Path(f).stat()
    return f, st.length, st.mtime
  return os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns


def file_format(files: list[str], fmt: str) -> str:
  """The file format: `fmt` if set, else the (common) extension of `files`."""
  exts = {os.path.splitext(f)[1].lstrip(".").lower() for f in files}
  fmt = fmt or (exts.pop() if len(exts) == 1 else "")
  if fmt not in FORMATS:
    raise ValueError(
      f"cannot tell the format of {files[:3]} (extensions {sorted(exts)}); set data.format to "
      f"one of {sorted(FORMATS)}"
    )
  return fmt


@dataclasses.dataclass
class Opened:
  """A source ready to read: its fingerprint, and a function yielding column batches."""

  fingerprint: dict
  batches: Callable[[list[str], int], Iterator[dict[str, list]]]


def open_source(source: Source, cfg) -> Opened:
  """Opens `source` lazily: local files are fingerprinted without being read."""
  if source.kind == "files":
    return _open_files(source, cfg)
  if source.kind == "pydoc":
    return Opened({"pydoc": sys.version},
                  lambda columns, size: iter([{columns[0]: [pydoc_text()]}]))
  return _open_hub(source, cfg)


def read_texts(cfg) -> list[str]:
  """The raw text of every source the data config names (each text file whole), e.g. to build a
  character vocabulary from.

  Raises:
    ValueError: when the sources hold no text at all.
  """
  whole = {**cfg.to_dict(), "sample_by": "document"}
  texts = []
  for source in sources_from_config(cfg):
    opened = open_source(source, ml_collections.ConfigDict(whole))
    for batch in opened.batches([cfg.text_column], 2048):
      texts.extend(t for t in batch[cfg.text_column] if t)
  if not texts:
    names = ", ".join(s.describe() for s in sources_from_config(cfg))
    raise ValueError(f"the data source ({cfg.source}: {names}) is empty")
  return texts



def _open_files(source: Source, cfg) -> Opened:
  files = resolve_files(source.name)
  fmt = file_format(files, cfg.format)
  stats = [_stat(f) for f in files]
  fingerprint = {"files": stats, "format": fmt}
  if FORMATS[fmt] == "text":
    if cfg.sample_by not in SAMPLE_BY:
      raise ValueError(f"data.sample_by={cfg.sample_by!r} is not one of {SAMPLE_BY}")
    fingerprint["sample_by"] = cfg.sample_by
    return Opened(fingerprint,
                  lambda columns, size: _text_batches(files, cfg.sample_by, columns, size))

  def batches(columns, size):
    import datasets

    kwargs = {"delimiter": "\t"} if fmt == "tsv" else {}
    ds = datasets.load_dataset(FORMATS[fmt], data_files=files, split="train",
                               streaming=cfg.streaming, **kwargs)
    return _column_batches(ds, columns, size, source.describe())

  return Opened(fingerprint, batches)


def _open_hub(source: Source, cfg) -> Opened:
  import datasets

  ds = datasets.load_dataset(source.name, source.hf_config or None, split=source.split,
                             streaming=cfg.streaming)
  if cfg.streaming:  # a stream has no fingerprint: keyed by its name (clear the cache to refresh)
    fingerprint = {"hub": source.name, "config": source.hf_config, "split": source.split}
  else:
    fingerprint = {"hub": source.name, "dataset_fingerprint": ds._fingerprint}
  return Opened(fingerprint, lambda columns, size: _column_batches(ds, columns, size,
                                                                   source.describe()))


def _text_batches(files: list[str], sample_by: str, columns: list[str], size: int):
  """Documents of plain-text files (as column `columns[0]`): lines with their newline,
  paragraphs, or whole files."""
  for path in files:
    if "://" in path:
      from etils import epath

      text = epath.Path(path).read_text(encoding="utf-8")
    else:
      with open(path, encoding="utf-8") as f:
        text = f.read()
    if sample_by == "line":
      docs = text.splitlines(keepends=True)
    elif sample_by == "paragraph":
      docs = [p for p in text.split("\n\n") if p.strip()]
    else:
      docs = [text]
    for i in range(0, len(docs), size):
      yield {columns[0]: docs[i : i + size]}


def _column_batches(ds, columns: list[str], size: int, name: str) -> Iterator[dict[str, list]]:
  names = ds.column_names
  if names is None:  # a stream without declared features: look at its first row
    first = next(iter(ds), None)
    names = list(first) if first is not None else []
  missing = [c for c in columns if c not in names]
  if missing:
    raise ValueError(
      f"column(s) {missing} not in {name}; its columns are {names}. Set data.text_column "
      "(or data.messages_column / data.prompt_column / data.response_column for SFT)"
    )
  yield from ds.select_columns(columns).iter(batch_size=size)
