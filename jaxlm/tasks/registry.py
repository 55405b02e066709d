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


def get_task(cfg) -> Task:
  """The Task named by cfg.name (sst2 | cola | mrpc | rte | stsb | conll2003 | squad)."""
  name = cfg.name
  if name in glue.TASKS:
    return Task(name, "seq_cls", glue.TASKS[name].num_labels, cfg)
  if name == "conll2003":
    return Task(name, "token_cls", len(conll.LABELS), cfg)
  if name == "squad":
    return Task(name, "qa", 2, cfg)
  raise ValueError(f"task.name={name!r} is not one of {TASK_NAMES}")


def task_config(name: str, data_dir: str, max_len: int, **overrides):
  """The `task` config section of a fine-tuning config (see configs/finetune/*.py)."""
  import ml_collections

  return ml_collections.ConfigDict({
    "name": name,  # sst2 | cola | mrpc | rte | stsb | conll2003 | squad
    "data_dir": data_dir,  # local files; "" reads the hub dataset (hub_dataset)
    "hub_dataset": "",  # hub id or local dataset dir; "" = glue / conll2003 / squad
    "max_len": max_len,  # tokens per example (window for squad)
    "buckets": (),  # padded lengths; () = powers of two up to max_len
    "pack": True,  # train on each step's examples packed into rows of max_len (not squad)
    "pack_row_multiple": 4,  # packed row counts are multiples of this: fewer shapes compile
    "doc_stride": 128,  # squad: tokens shared by consecutive windows
    "eval_split": "dev",
    "max_train_examples": 0,  # 0 = all
    "max_eval_examples": 0,
    **overrides,
  })


def finetune_config(name: str, data_dir: str, max_len: int, *, epochs: int = 3, lr: float = 2e-5,
                    batch_size: int = 32, warmup_steps: int = 0, **task_overrides):
  """A whole fine-tuning run config: BERT-style AdamW with linear decay, an encoder imported from
  model.init_from (an HF directory or hub id) with the task's new head."""
  from jaxlm.config import base_config, model

  c = base_config()
  task = get_task(task_config(name, data_dir, max_len))
  c.model = model("bert-base", head=task.head, num_labels=task.num_labels, dropout=0.1)
  c.model.init_from = "google-bert/bert-base-uncased"  # HF encoder dir or hub id; sizes from it
  c.task = task_config(name, data_dir, max_len, **task_overrides)
  c.train.epochs = epochs  # used when train.steps is 0
  c.train.steps = 0  # 0: epochs x full batches per epoch
  c.train.batch_size = batch_size
  c.train.log_every = 50
  c.optim.update(dict(lr=lr, min_lr=0.0, schedule="linear", warmup_steps=warmup_steps, b1=0.9,
                      b2=0.999, eps=1e-8, weight_decay=0.01, clip=1.0))
  c.sample.max_new_tokens = 0
  # on a CPU, one device: splitting the cores data-parallel would replicate the AdamW update and
  # all-reduce every gradient of a 20M+ parameter model each step, costing more than it saves
  c.runtime.cpu_devices = 1
  return c
