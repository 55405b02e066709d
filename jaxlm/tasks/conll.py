"""CoNLL-2003 NER: the original 4-column IOB1 files or the `conll2003` hub dataset, labels on the
first sub-word of each word, and entity-level precision/recall/F1 with exact span matching.
"""

import os

import numpy as np

from jaxlm.tasks import metrics

# The hub dataset's IOB2 label ids; local IOB1 tags are converted to IOB2 on reading.
LABELS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")
IGNORE = -100  # label of sub-words after the first, and of special tokens
_FILES = {"train": "eng.train", "dev": "eng.testa", "test": "eng.testb"}
_HUB_SPLITS = {"train": "train", "dev": "validation", "test": "test"}


def iob1_to_iob2(tags: list[str]) -> list[str]:
  """An entity's first tag becomes B-X (IOB1 only writes B-X between two same-type entities)."""
  out, prev = [], "O"
  for tag in tags:
    prefix, _, label = tag.partition("-")
    if prefix == "I" and prev[2:] != label:
      tag = f"B-{label}"
    out.append(tag)
    prev = tag
  return out


def read_conll(path: str) -> dict[str, list]:
  """{"words": [[str]], "tags": [[IOB2 str]]} per sentence of a CoNLL-2003 file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"CoNLL file not found: {path!r}; set task.data_dir to the folder "
                            "holding eng.train / eng.testa / eng.testb (../shared/data/conll2003)")
  sentences, words, tags = [], [], []
  with open(path, encoding="utf-8") as f:
    for line in list(f) + [""]:
      cols = line.split()
      if cols and cols[0] != "-DOCSTART-":
        words.append(cols[0])
        tags.append(cols[-1])
      elif words:
        sentences.append((words, iob1_to_iob2(tags)))
        words, tags = [], []
  return {"words": [w for w, _ in sentences], "tags": [t for _, t in sentences]}


def load_split(split: str, data_dir: str = "", hub_dataset: str = "conll2003") -> dict[str, list]:
  """Sentences of `split` (train | dev | test) from `data_dir`, or from the hub when it is ''."""
  if split not in _FILES:
    raise ValueError(f"split={split!r} is not one of {sorted(_FILES)}")
  if data_dir:
    return read_conll(os.path.join(data_dir, _FILES[split]))
  import datasets

  ds = datasets.load_dataset(hub_dataset, split=_HUB_SPLITS[split])
  return {"words": list(ds["tokens"]), "tags": [[LABELS[i] for i in s] for s in ds["ner_tags"]]}


def encode(tokenizer, examples: dict[str, list], max_len: int) -> list[dict]:
  """Sub-word ids with each word's label on its first sub-word and IGNORE elsewhere."""
  enc = tokenizer(examples["words"], is_split_into_words=True, truncation=True,
                  max_length=max_len)
  label_id = {name: i for i, name in enumerate(LABELS)}
  features = []
  for i, tags in enumerate(examples["tags"]):
    word_ids = enc.word_ids(i)
    labels = [IGNORE if w is None or w == prev else label_id[tags[w]]
              for w, prev in zip(word_ids, [None] + word_ids[:-1])]
    features.append({"inputs": np.asarray(enc["input_ids"][i], np.int32),
                     "label": np.asarray(labels, np.int32)})
  return features


def word_predictions(pred_ids_T, labels_T, num_words: int) -> list[str]:
  """Tags per word from per-token predictions, read at the labelled (first) sub-words; words cut
  off by truncation are predicted O."""
  first = np.asarray(labels_T) != IGNORE
  tags = [LABELS[int(p)] for p in np.asarray(pred_ids_T)[first]]
  return (tags + ["O"] * num_words)[:num_words]


def score(true_tags: list[list[str]], pred_tags: list[list[str]]) -> dict:
  """Entity-level precision / recall / F1 in percent."""
  return {k: 100 * v for k, v in metrics.entity_prf(true_tags, pred_tags).items()}
