"""The tasks' official metrics: accuracy, F1, Matthews correlation, Pearson/Spearman, entity-level
precision/recall/F1 (exact spans, conlleval's chunking) and SQuAD exact match / F1.
"""

import collections
import re
import string

import numpy as np


def accuracy(preds, labels) -> float:
  return float(np.mean(np.asarray(preds) == np.asarray(labels)))


def binary_f1(preds, labels) -> float:
  """F1 of the positive class (label 1), as GLUE reports for MRPC."""
  preds, labels = np.asarray(preds), np.asarray(labels)
  tp = float(np.sum((preds == 1) & (labels == 1)))
  fp = float(np.sum((preds == 1) & (labels != 1)))
  fn = float(np.sum((preds != 1) & (labels == 1)))
  return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def matthews_corr(preds, labels) -> float:
  """Matthews correlation of binary predictions (0 when a row or column of the table is empty)."""
  preds, labels = np.asarray(preds) == 1, np.asarray(labels) == 1
  tp, tn = float(np.sum(preds & labels)), float(np.sum(~preds & ~labels))
  fp, fn = float(np.sum(preds & ~labels)), float(np.sum(~preds & labels))
  denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
  return float((tp * tn - fp * fn) / denom) if denom else 0.0


def pearson(x, y) -> float:
  return float(np.corrcoef(np.asarray(x, np.float64), np.asarray(y, np.float64))[0, 1])


def _average_ranks(x) -> np.ndarray:
  """1-based ranks, ties sharing the mean of their ranks."""
  x = np.asarray(x, np.float64)
  order = np.argsort(x, kind="mergesort")
  ranks = np.empty(len(x))
  ranks[order] = np.arange(1, len(x) + 1)
  _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
  sums = np.bincount(inverse, weights=ranks)
  return sums[inverse] / counts[inverse]


def spearman(x, y) -> float:
  return pearson(_average_ranks(x), _average_ranks(y))


def entity_spans(tags: list[str]) -> set[tuple[str, int, int]]:
  """(type, start, end-exclusive) of each entity in an IOB1 or IOB2 tag sequence.

  An entity starts at B-X, or at I-X after anything but an X tag (conlleval's rule, which reads
  both IOB1 and IOB2).
  """
  spans, kind, start = set(), None, 0
  for i, tag in enumerate(list(tags) + ["O"]):
    prefix, _, label = tag.partition("-")
    begins = prefix == "B" or (prefix == "I" and label != kind)
    if kind is not None and (prefix == "O" or begins):
      spans.add((kind, start, i))
      kind = None
    if begins:
      kind, start = label, i
  return spans


def entity_prf(true_tags: list[list[str]], pred_tags: list[list[str]]) -> dict:
  """Micro precision, recall and F1 over entities whose type and span match exactly."""
  n_true = n_pred = n_hit = 0
  for truth, pred in zip(true_tags, pred_tags, strict=True):
    t, p = entity_spans(truth), entity_spans(pred)
    n_true, n_pred, n_hit = n_true + len(t), n_pred + len(p), n_hit + len(t & p)
  precision = n_hit / n_pred if n_pred else 0.0
  recall = n_hit / n_true if n_true else 0.0
  f1 = 2 * precision * recall / (precision + recall) if n_hit else 0.0
  return {"precision": precision, "recall": recall, "f1": f1}


def squad_normalize(text: str) -> str:
  """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
  text = "".join(c for c in text.lower() if c not in set(string.punctuation))
  text = re.sub(r"\b(a|an|the)\b", " ", text)
  return " ".join(text.split())


def squad_f1_one(prediction: str, truth: str) -> float:
  pred_tokens, true_tokens = squad_normalize(prediction).split(), squad_normalize(truth).split()
  common = collections.Counter(pred_tokens) & collections.Counter(true_tokens)
  same = sum(common.values())
  if same == 0:
    return 0.0
  precision, recall = same / len(pred_tokens), same / len(true_tokens)
  return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: dict[str, str], answers: dict[str, list[str]]) -> dict:
  """SQuAD v1.1 exact match and F1 (percent), each the max over an example's gold answers."""
  em = f1 = 0.0
  for qid, golds in answers.items():
    pred = predictions.get(qid, "")
    em += max(float(squad_normalize(pred) == squad_normalize(g)) for g in golds)
    f1 += max(squad_f1_one(pred, g) for g in golds)
  n = max(len(answers), 1)
  return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n}
