"""SQuAD v1.1 extractive QA: JSON or hub reader, overflowing windows with a document stride,
answer post-processing back to text, and the official exact match / F1.

The local copy (../shared/data/squad_v1.1) is the official dev set in two halves by article:
split "train" reads test-v1.1.json (5,609 questions), "dev" reads dev-v1.1.json (4,961).
"""

import json
import os

import numpy as np

from jaxlm.tasks import metrics

_FILES = {"train": "test-v1.1.json", "dev": "dev-v1.1.json"}
_HUB_SPLITS = {"train": "train", "dev": "validation"}


def read_json(path: str) -> dict[str, list]:
  """Flat columns id / question / context / answers (texts) / answer_start of a SQuAD file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"SQuAD file not found: {path!r}; set task.data_dir to the folder "
                            "holding the SQuAD v1.1 JSON files (../shared/data/squad_v1.1)")
  with open(path, encoding="utf-8") as f:
    articles = json.load(f)["data"]
  out = {k: [] for k in ("id", "question", "context", "answers", "answer_start")}
  for article in articles:
    for paragraph in article["paragraphs"]:
      for qa in paragraph["qas"]:
        out["id"].append(qa["id"])
        out["question"].append(qa["question"])
        out["context"].append(paragraph["context"])
        out["answers"].append([a["text"] for a in qa["answers"]])
        out["answer_start"].append(qa["answers"][0]["answer_start"])
  return out


def load_split(split: str, data_dir: str = "", hub_dataset: str = "squad") -> dict[str, list]:
  if split not in _FILES:
    raise ValueError(f"split={split!r} is not one of {sorted(_FILES)}")
  if data_dir:
    return read_json(os.path.join(data_dir, _FILES[split]))
  import datasets

  ds = datasets.load_dataset(hub_dataset, split=_HUB_SPLITS[split])
  answers = list(ds["answers"])
  return {"id": list(ds["id"]), "question": list(ds["question"]), "context": list(ds["context"]),
          "answers": [a["text"] for a in answers],
          "answer_start": [a["answer_start"][0] for a in answers]}


def _answer_positions(offsets, seq_ids, start_char: int, end_char: int) -> tuple[int, int]:
  """Token span of the answer in this window, or (0, 0) (the [CLS] token) when it is not inside."""
  context = [i for i, s in enumerate(seq_ids) if s == 1]
  first, last = context[0], context[-1]
  if offsets[first][0] > start_char or offsets[last][1] < end_char:
    return 0, 0
  start = next(i for i in range(first, last + 1) if offsets[i][1] > start_char)
  end = next(i for i in range(last, first - 1, -1) if offsets[i][0] < end_char)
  return start, end


def encode(tokenizer, examples: dict[str, list], max_len: int, doc_stride: int) -> list[dict]:
  """Windows of (question, context) with `doc_stride` overlapping tokens. Each feature keeps its
  example index and its context tokens' character offsets for post-processing."""
  enc = tokenizer(examples["question"], examples["context"], truncation="only_second",
                  max_length=max_len, stride=doc_stride, return_overflowing_tokens=True,
                  return_offsets_mapping=True, return_token_type_ids=True)
  features = []
  for i, ids in enumerate(enc["input_ids"]):
    ex = enc["overflow_to_sample_mapping"][i]
    seq_ids = enc.sequence_ids(i)
    offsets = enc["offset_mapping"][i]
    start_char = examples["answer_start"][ex]
    end_char = start_char + len(examples["answers"][ex][0])
    start, end = _answer_positions(offsets, seq_ids, start_char, end_char)
    context_offsets = np.asarray([o if s == 1 else (-1, -1) for o, s in zip(offsets, seq_ids)],
                                 np.int32)
    features.append({"inputs": np.asarray(ids, np.int32),
                     "token_types": np.asarray(enc["token_type_ids"][i], np.int32),
                     "label": np.asarray([start, end], np.int32),
                     "example": ex, "offsets": context_offsets})
  return features


def best_answer(context: str, windows, n_best: int = 20, max_answer_len: int = 30) -> str:
  """The highest-scoring valid span over an example's windows, as text.

  Args:
    windows: (start_logits_T, end_logits_T, offsets_T2) per window; offsets are -1 outside the
      context.
  """
  best, best_score = "", -np.inf
  for start_T, end_T, offsets_T2 in windows:
    n = len(offsets_T2)
    starts = np.argsort(start_T[:n])[::-1][:n_best]
    ends = np.argsort(end_T[:n])[::-1][:n_best]
    for s in starts:
      for e in ends:
        if offsets_T2[s][0] < 0 or offsets_T2[e][0] < 0 or e < s or e - s + 1 > max_answer_len:
          continue
        if start_T[s] + end_T[e] > best_score:
          best_score = start_T[s] + end_T[e]
          best = context[offsets_T2[s][0]:offsets_T2[e][1]]
  return best


def predictions(examples, features, logits) -> dict[str, str]:
  """{question id: answer text} from each feature's [T, 2] start/end logits."""
  windows: dict[int, list] = {}
  for feature, logits_T2 in zip(features, logits):
    windows.setdefault(feature["example"], []).append(
      (logits_T2[:, 0], logits_T2[:, 1], feature["offsets"]))
  return {examples["id"][ex]: best_answer(examples["context"][ex], w) for ex, w in windows.items()}


def score(examples, preds: dict[str, str]) -> dict:
  """Official SQuAD v1.1 exact match and F1 (percent)."""
  return metrics.squad_scores(preds, dict(zip(examples["id"], examples["answers"])))
