"""GLUE tasks (SST-2, CoLA, MRPC, RTE, STS-B): readers for the original TSVs or the `glue` hub
dataset, sentence(-pair) encoding, and each task's official metric.
"""

import csv
import dataclasses
import os

import numpy as np

from jaxlm.tasks import metrics


@dataclasses.dataclass(frozen=True)
class GlueTask:
  """Where a GLUE task's fields sit, and how it is scored."""

  name: str  # the `glue` hub config name
  folder: str  # the folder of the original distribution (glue_data/<folder>/{train,dev}.tsv)
  text_columns: tuple  # TSV header names (or column indices when the TSV has no header)
  label_column: str | int
  hub_columns: tuple  # the hub dataset's text columns
  label_names: tuple = ()  # TSV label strings in id order; () when labels are already ints
  num_labels: int = 2  # 1 = regression
  header: bool = True

  def score(self, preds, labels) -> dict:
    """The official metric(s), in percent."""
    if self.name == "stsb":
      return {"pearson": 100 * metrics.pearson(preds, labels),
              "spearman": 100 * metrics.spearman(preds, labels)}
    if self.name == "cola":
      return {"matthews_corr": 100 * metrics.matthews_corr(preds, labels)}
    scores = {"accuracy": 100 * metrics.accuracy(preds, labels)}
    if self.name == "mrpc":
      scores["f1"] = 100 * metrics.binary_f1(preds, labels)
    return scores


TASKS = {
  "sst2": GlueTask("sst2", "SST-2", ("sentence",), "label", ("sentence",)),
  "cola": GlueTask("cola", "CoLA", (3,), 1, ("sentence",), header=False),
  "mrpc": GlueTask("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality",
                   ("sentence1", "sentence2")),
  "rte": GlueTask("rte", "RTE", ("sentence1", "sentence2"), "label", ("sentence1", "sentence2"),
                  label_names=("entailment", "not_entailment")),
  "stsb": GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), "score",
                   ("sentence1", "sentence2"), num_labels=1),
}
_HUB_SPLITS = {"train": "train", "dev": "validation", "test": "test"}


def get_task(name: str) -> GlueTask:
  if name not in TASKS:
    raise ValueError(f"unknown GLUE task {name!r}; choose one of {sorted(TASKS)}")
  return TASKS[name]


def _label(task: GlueTask, value: str):
  if task.num_labels == 1:
    return float(value)
  if task.label_names:
    return task.label_names.index(value)
  return int(value)


def read_tsv(task: GlueTask, path: str) -> dict[str, list]:
  """{"text_a", "text_b" (or absent), "label"} columns of a GLUE TSV file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GLUE file not found: {path!r}; set task.data_dir to the folder "
                            "holding the GLUE task folders (e.g. ../shared/data/glue)")
  with open(path, encoding="utf-8-sig", newline="") as f:
    rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
  if task.header:
    header, rows = rows[0], rows[1:]
    index = {name: i for i, name in enumerate(header)}
    text_idx = [index[c] for c in task.text_columns]
    label_idx = index[task.label_column]
  else:
    text_idx, label_idx = list(task.text_columns), task.label_column
  out = {"text_a": [r[text_idx[0]] for r in rows],
         "label": [_label(task, r[label_idx]) for r in rows]}
  if len(text_idx) > 1:
    out["text_b"] = [r[text_idx[1]] for r in rows]
  return out


def read_hub(task: GlueTask, split: str, dataset: str = "glue") -> dict[str, list]:
  """The same columns from the `glue` dataset (hub id or a local copy) through `datasets`."""
  import datasets

  ds = datasets.load_dataset(dataset, task.name, split=_HUB_SPLITS[split])
  out = {"text_a": list(ds[task.hub_columns[0]]), "label": list(ds["label"])}
  if len(task.hub_columns) > 1:
    out["text_b"] = list(ds[task.hub_columns[1]])
  return out


def load_split(task: GlueTask, split: str, data_dir: str = "", hub_dataset: str = "glue"):
  """Examples of `split` (train | dev) from `data_dir`'s TSVs, or from the hub when it is ''."""
  if split not in _HUB_SPLITS:
    raise ValueError(f"split={split!r} is not one of {sorted(_HUB_SPLITS)}")
  if data_dir:
    return read_tsv(task, os.path.join(data_dir, task.folder, f"{split}.tsv"))
  return read_hub(task, split, hub_dataset)


def encode(tokenizer, examples: dict[str, list], max_len: int) -> list[dict]:
  """Per example: token ids and token types ([CLS] a [SEP] (b [SEP])), truncated to max_len."""
  enc = tokenizer(examples["text_a"], examples.get("text_b"), truncation=True,
                  max_length=max_len, return_token_type_ids=True)
  dtype = np.float32 if isinstance(examples["label"][0], float) else np.int32
  return [
    {"inputs": np.asarray(ids, np.int32), "token_types": np.asarray(types, np.int32),
     "label": np.asarray(label, dtype)}
    for ids, types, label in zip(enc["input_ids"], enc["token_type_ids"], examples["label"])
  ]
