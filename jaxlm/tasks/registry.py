"""One interface over the fine-tuning tasks: load a split, encode it into features, score the
model's outputs with the task's official metric. `get_task(config.task)` picks one by name.
"""

import dataclasses

import numpy as np

from jaxlm.tasks import conll, glue, squad

TASK_NAMES = (*glue.TASKS, "conll2003", "squad")


@dataclasses.dataclass
class Task:
  """A fine-tuning task as the training loop sees it."""

  name: str
  head: str  # the model head: seq_cls | token_cls | qa
  num_labels: int
  cfg: object  # the `task` config section (data_dir, hub_dataset, max_len, doc_stride, ...)

  @property
  def token_labels(self) -> bool:
    return self.head == "token_cls"

  def load(self, split: str) -> dict[str, list]:
    c = self.cfg
    hub = c.hub_dataset
    if self.head == "seq_cls":
      return glue.load_split(glue.get_task(self.name), split, c.data_dir, hub or "glue")
    if self.head == "token_cls":
      return conll.load_split(split, c.data_dir, hub or "conll2003")
    return squad.load_split(split, c.data_dir, hub or "squad")

  def encode(self, tokenizer, examples: dict[str, list]) -> list[dict]:
    if self.head == "seq_cls":
      return glue.encode(tokenizer, examples, self.cfg.max_len)
    if self.head == "token_cls":
      return conll.encode(tokenizer, examples, self.cfg.max_len)
    return squad.encode(tokenizer, examples, self.cfg.max_len, self.cfg.doc_stride)

  def score(self, examples, features, outputs: list[np.ndarray]) -> dict:
    """The official metric(s) from each feature's outputs (trimmed to its length)."""
    if self.head == "seq_cls":
      if self.num_labels == 1:
        preds = [float(o[0]) for o in outputs]
      else:
        preds = [int(np.argmax(o)) for o in outputs]
      return glue.get_task(self.name).score(preds, [f["label"] for f in features])
    if self.head == "token_cls":
      pred_tags = [conll.word_predictions(np.argmax(o, -1), f["label"], len(words))
                   for o, f, words in zip(outputs, features, examples["words"])]
      return conll.score(examples["tags"], pred_tags)
    return squad.score(examples, squad.predictions(examples, features, outputs))


def head_of(name: str) -> tuple[str, int]:
  """(model head, number of labels) of task `name`."""
  if name in glue.TASKS:
    return "seq_cls", glue.TASKS[name].num_labels
  if name == "conll2003":
    return "token_cls", len(conll.LABELS)
  if name == "squad":
    return "qa", 2
  raise ValueError(f"task.name={name!r} is not one of {TASK_NAMES}")


def get_task(cfg) -> Task:
  """The Task named by cfg.name (sst2 | cola | mrpc | rte | stsb | conll2003 | squad)."""
  return Task(cfg.name, *head_of(cfg.name), cfg)
