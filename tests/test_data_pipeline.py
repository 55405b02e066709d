"""Document pipeline: packing properties, per-process shards, exact resume, the token cache,
file formats, and clear errors for bad input."""

import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxlm.config import base_config
from jaxlm.data import iterators, packing, pipeline, sources, tokenize
from jaxlm.data.tokenize import Documents

GPT2_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                        "shared", "data", "tokenizers", "gpt2")


def _docs(lengths, with_mask=False, seed=0) -> Documents:
  """Documents whose tokens name them: doc d holds d * 1000 + 0, 1, 2, ..."""
  tokens = np.concatenate([d * 1000 + np.arange(n) for d, n in enumerate(lengths)]).astype(
    np.int32)
  offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  mask = np.random.default_rng(seed).integers(0, 2, len(tokens)).astype(np.uint8) \
    if with_mask else None
  return Documents(tokens, offsets, mask)


def _cfg(**kw):
  cfg = base_config().data
  cfg.update({"packing": "concat", "prefetch": 2, "read_threads": 1, "best_fit_bins": 4})
  cfg.update(kw)
  return cfg


def _segments(rows):
  """(inputs, targets, weights, positions) of every (row, segment) in packed rows."""
  for row in rows:
    for s in np.unique(row["segment_ids"][row["segment_ids"] > 0]):
      sel = row["segment_ids"] == s
      assert np.all(np.flatnonzero(sel) == np.flatnonzero(sel)[0] + np.arange(sel.sum()))
      yield row["inputs"][sel], row["targets"][sel], row["weights"][sel], row["positions"][sel]


lengths_st = st.lists(st.integers(1, 40), min_size=1, max_size=12)


@settings(max_examples=30, deadline=None)
@given(lengths=lengths_st, seq_len=st.integers(2, 24), with_mask=st.booleans())
def test_concat_keeps_every_token_in_order(lengths, seq_len, with_mask):
  docs = _docs(lengths, with_mask)
  rows = [packing.ConcatRows(docs, seq_len)[i] for i in range(len(packing.ConcatRows(docs,
                                                                                     seq_len)))]
  if len(docs.tokens) < 2:
    assert not rows
    return
  n = len(docs.tokens) - 1
  live = np.concatenate([r["segment_ids"] > 0 for r in rows])
  assert live.sum() == n and np.all(live[:n])  # only the final row is padded
  inputs = np.concatenate([r["inputs"] for r in rows])[:n]
  targets = np.concatenate([r["targets"] for r in rows])[:n]
  np.testing.assert_array_equal(inputs, docs.tokens[:-1])
  np.testing.assert_array_equal(targets, docs.tokens[1:])
  for inp, tgt, w, pos in _segments(rows):
    doc = inp[0] // 1000
    assert np.all(inp // 1000 == doc)  # a segment is one document
    np.testing.assert_array_equal(pos, inp % 1000 - inp[0] % 1000)  # 0, 1, ... from the cut
    same = tgt // 1000 == doc
    assert np.all(same[:-1]) and np.all(w[~same] == 0)  # no loss across documents
    if docs.loss_mask is not None:
      idx = np.searchsorted(docs.tokens, inp) + 1  # tokens are sorted: index of the target
      np.testing.assert_array_equal(w[same], docs.loss_mask[idx][same])
    else:
      assert np.all(w[same] == 1)


@settings(max_examples=15, deadline=None)
@given(lengths=st.lists(st.integers(2, 17), min_size=1, max_size=10), with_mask=st.booleans())
def test_best_fit_keeps_whole_documents(lengths, with_mask):
  seq_len = 16
  docs = _docs(lengths, with_mask)
  stream = pipeline.batches([(1.0, docs)], _cfg(packing="best_fit", seq_len=seq_len), 1, 0,
                            pipeline.Shard(), num_epochs=1)
  rows = [{k: v[0] for k, v in b.items()} for b in stream]
  seen = []
  for inp, tgt, w, pos in _segments(rows):
    doc = np.concatenate([inp, tgt[-1:]])
    d = doc[0] // 1000
    np.testing.assert_array_equal(doc, docs.tokens[docs.offsets[d] : docs.offsets[d + 1]])
    np.testing.assert_array_equal(pos, np.arange(len(inp)))
    expect_w = docs.loss_mask[docs.offsets[d] + 1 : docs.offsets[d + 1]] \
      if with_mask else np.ones(len(inp))
    np.testing.assert_array_equal(w, expect_w)
    seen.append(d)
  assert sorted(seen) == list(range(len(lengths)))  # each document exactly once
  for r in rows:
    assert np.all(r["weights"][r["segment_ids"] == 0] == 0)


@pytest.mark.parametrize("mode", ["concat", "best_fit"])
def test_each_process_reads_its_block_of_the_one_global_batch_stream(mode):
  """Process p of 2 reads rows p*B/2:(p+1)*B/2 of exactly the global batches one process reads
  (packing included), and its iterator state equals the one process's."""
  docs = _docs([5, 9, 3, 14, 7, 2, 11, 6, 8, 4, 13, 10])
  cfg = _cfg(packing=mode, seq_len=16)
  whole = list(pipeline.batches([(1.0, docs)], cfg, 4, 7, pipeline.Shard(), num_epochs=3))
  assert len(whole) >= 2
  for p in range(2):
    halves = list(pipeline.batches([(1.0, docs)], cfg, 4, 7, pipeline.Shard(p, 2), num_epochs=3))
    assert len(halves) == len(whole)
    for w, h in zip(whole, halves):
      for k in packing.ROW_KEYS:
        np.testing.assert_array_equal(h[k], w[k][2 * p:2 * p + 2])
  one = iter(pipeline.batches([(1.0, docs)], cfg, 4, 7, pipeline.Shard()))
  two = iter(pipeline.batches([(1.0, docs)], cfg, 4, 7, pipeline.Shard(1, 2)))
  next(one), next(two)
  assert one.get_state() == two.get_state()


def _text_file(tmp_path, name="corpus.txt", n=400, seed=0):
  rng = np.random.default_rng(seed)
  words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "theta"]
  lines = [" ".join(rng.choice(words, rng.integers(1, 30))) + "\n" for _ in range(n)]
  path = tmp_path / name
  path.write_text("".join(lines))
  return str(path)


@pytest.fixture
def gpt2():
  if not os.path.isdir(GPT2_DIR):
    pytest.skip(f"GPT-2 tokenizer not found at {GPT2_DIR} (../shared/data is absent)")
  from jaxlm.data import tokenizers

  return tokenizers.load_tokenizer(GPT2_DIR)


@pytest.mark.parametrize("mode", ["concat", "best_fit"])
def test_resume_yields_exactly_the_uninterrupted_batches(tmp_path, gpt2, mode):
  a, b = _text_file(tmp_path, "a.txt", seed=1), _text_file(tmp_path, "b.txt", seed=2)
  cfg = _cfg(packing=mode, mixture=f"{a}=0.7,{b}=0.3", seq_len=32, cache_dir=str(tmp_path / "c"),
             val_fraction=0.1, truncate=True)

  def build():
    return pipeline.build(cfg, gpt2, batch_size=4, seed=3, eval_batches=2,
                          shard=pipeline.Shard(1, 2))

  straight = build().train
  expected = [next(straight) for _ in range(12)]
  first = build().train
  for _ in range(5):
    next(first)
  state = json.loads(json.dumps(first.get_state()))  # what a checkpoint stores
  resumed = build().train
  resumed.set_state(state)
  for want in expected[5:]:
    got = next(resumed)
    for k in packing.ROW_KEYS:
      np.testing.assert_array_equal(got[k], want[k])
  one = pipeline.build(cfg, gpt2, batch_size=4, seed=3, eval_batches=2,
                       shard=pipeline.Shard()).train  # the run restarted as one process
  one.set_state(state)
  got = next(one)
  for k in packing.ROW_KEYS:
    np.testing.assert_array_equal(got[k][2:], expected[5][k])
  other = pipeline.build(cfg, gpt2, batch_size=8, seed=3, eval_batches=2,
                         shard=pipeline.Shard()).train
  with pytest.raises(ValueError, match="global batches of 4 rows"):
    other.set_state(state)
  for it in (straight, first, resumed, one, other):  # not from whichever thread collects them
    it.close()


def test_random_windows_are_one_global_sequence_for_any_process_count():
  """Row i of the window source depends on (seed, i) alone: one process and two processes see
  the same global batches (process p its block of rows), and a restored iterator continues."""
  tokens = np.arange(500, dtype=np.int32)
  cfg = _cfg(packing="none")
  one = iter(pipeline.window_batches(tokens, 8, 4, 0, pipeline.Shard(), cfg))
  two = [iter(pipeline.window_batches(tokens, 8, 4, 0, pipeline.Shard(p, 2), cfg))
         for p in range(2)]
  for _ in range(3):
    whole = next(one)
    halves = [next(it) for it in two]
    np.testing.assert_array_equal(whole["inputs"],
                                  np.concatenate([h["inputs"] for h in halves]))
    np.testing.assert_array_equal(whole["targets"][:, :-1], whole["inputs"][:, 1:])
  it = pipeline.DataIterator(pipeline.window_batches(tokens, 8, 4, 0, pipeline.Shard(), cfg), 0, 1)
  [next(it) for _ in range(3)]
  state = it.get_state()
  want = next(it)
  again = pipeline.DataIterator(pipeline.window_batches(tokens, 8, 4, 0, pipeline.Shard(), cfg), 0,
                                1)
  again.set_state(state)
  np.testing.assert_array_equal(next(again)["inputs"], want["inputs"])


class _Counter:
  """A resumable iterator whose state is how many items it gave."""

  def __init__(self):
    self.step = 0

  def __iter__(self):
    return self

  def __next__(self):
    self.step += 1
    return {"inputs": np.full((4, 8), self.step - 1)}

  def get_state(self):
    return {"step": self.step}

  def set_state(self, state):
    self.step = state["step"]


def test_prefetch_reports_the_state_of_the_last_batch_taken():
  import time

  ahead = iterators.Prefetch(_Counter(), size=3)
  ahead.set_state({"step": 5})  # a restore, before the first batch
  first = next(ahead)
  time.sleep(0.2)  # the thread fills its queue meanwhile
  assert ahead.get_state() == {"step": 6}
  assert (first["inputs"] == 5).all()
  with pytest.raises(RuntimeError, match="before the first batch"):
    ahead.set_state({"step": 0})
  assert ahead._thread.is_alive()  # blocked on its full queue
  ahead.close()
  assert not ahead._thread.is_alive() and ahead._queue.empty()


def test_stack_gives_each_call_its_steps_batches_and_an_exact_state():
  counter = _Counter()
  counter.set_state({"step": 2})  # a restore
  stacked = iterators.Stack(counter, [3, 1, 2])
  first = next(stacked)
  assert first["inputs"].shape == (3, 4, 8)
  assert [int(x[0, 0]) for x in first["inputs"]] == [2, 3, 4]  # the next three steps, in order
  assert stacked.get_state() == {"step": 5}
  assert next(stacked)["inputs"].shape == (1, 4, 8) and stacked.get_state() == {"step": 6}

  class Varying(_Counter):
    def __next__(self):
      return {"inputs": np.zeros((4, 8 + super().__next__()["inputs"][0, 0]))}

  with pytest.raises(ValueError, match="set train.steps_per_call=1 for data whose batch shapes"):
    next(iterators.Stack(Varying(), [2]))


def test_cache_is_reused_and_invalidated(tmp_path, gpt2, monkeypatch):
  path = _text_file(tmp_path)
  cfg = _cfg(path=path, cache_dir=str(tmp_path / "cache"))
  src = sources.sources_from_config(cfg)[0]
  docs, hit = tokenize.tokenize_source(src, cfg, gpt2)
  assert not hit and len(docs) == 400
  calls = []
  real = tokenize.encode_texts
  monkeypatch.setattr(tokenize, "encode_texts", lambda *a: calls.append(1) or real(*a))
  again, hit = tokenize.tokenize_source(src, cfg, gpt2)
  assert hit and not calls  # the second run does no tokenization
  np.testing.assert_array_equal(again.tokens, docs.tokens)
  cfg.add_eos = False  # settings changed
  no_eos, hit = tokenize.tokenize_source(src, cfg, gpt2)
  assert not hit and calls and len(no_eos.tokens) == len(docs.tokens) - 400
  gpt2.add_tokens(["<extra_token>"])  # tokenizer changed
  assert not tokenize.tokenize_source(src, cfg, gpt2)[1]
  with open(path, "a") as f:  # data changed
    f.write("one more line\n")
  changed, hit = tokenize.tokenize_source(src, cfg, gpt2)
  assert not hit and len(changed) == 401
  assert not [p for p in os.listdir(tmp_path / "cache") if p.startswith(".tmp")]


def test_file_formats_give_the_same_documents(tmp_path, gpt2):
  import pandas as pd

  lines = ["first document", "second, with a comma", "third \"quoted\" one"]
  (tmp_path / "d.txt").write_text("\n".join(lines) + "\n")
  frame = pd.DataFrame({"text": lines, "label": [0, 1, 0]})
  frame.to_json(tmp_path / "d.jsonl", orient="records", lines=True)
  frame.to_csv(tmp_path / "d.csv", index=False)
  frame.to_csv(tmp_path / "d.tsv", index=False, sep="\t")
  frame.to_parquet(tmp_path / "d.parquet")
  want = None
  for ext in ("jsonl", "csv", "tsv", "parquet"):
    cfg = _cfg(path=str(tmp_path / f"d.{ext}"), cache_dir=str(tmp_path / "c"))
    docs, _ = tokenize.tokenize_source(sources.sources_from_config(cfg)[0], cfg, gpt2)
    want = docs.tokens if want is None else want
    assert len(docs) == 3
    np.testing.assert_array_equal(docs.tokens, want)
  cfg = _cfg(path=str(tmp_path / "d.jsonl"), streaming=True, cache_dir=str(tmp_path / "s"))
  docs, _ = tokenize.tokenize_source(sources.sources_from_config(cfg)[0], cfg, gpt2)
  np.testing.assert_array_equal(docs.tokens, want)  # streamed rows, same documents
  frame.to_json(tmp_path / "d2.jsonl", orient="records", lines=True)
  cfg = _cfg(path=str(tmp_path / "d*.jsonl"), cache_dir=str(tmp_path / "c"))  # a glob
  docs, _ = tokenize.tokenize_source(sources.sources_from_config(cfg)[0], cfg, gpt2)
  np.testing.assert_array_equal(docs.tokens, np.concatenate([want, want]))


def test_bad_input_gives_clear_errors(tmp_path, gpt2):
  def tok(**kw):
    cfg = _cfg(cache_dir=str(tmp_path / "c"), **kw)
    return tokenize.tokenize_source(sources.sources_from_config(cfg)[0], cfg, gpt2)

  with pytest.raises(FileNotFoundError, match="data file not found"):
    tok(path=str(tmp_path / "missing.txt"))
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(ValueError, match="is empty"):
    tok(path=str(tmp_path / "empty.txt"))
  (tmp_path / "rows.jsonl").write_text('{"body": "hello"}\n')
  with pytest.raises(ValueError, match=r"column\(s\) \['text'\] not in .*\['body'\]"):
    tok(path=str(tmp_path / "rows.jsonl"))
  with pytest.raises(ValueError, match="longer than data.seq_len=8"):
    packing.DocumentElements(_docs([5, 20]), 8)
  with pytest.raises(ValueError, match="data.packing='sideways'"):
    pipeline.batches([(1.0, _docs([5]))], _cfg(packing="sideways"), 1, 0, pipeline.Shard())


def _tiny_run_config(tmp_path, steps):
  c = base_config()
  c.model.update({"vocab_size": 0, "num_layers": 1, "embed_dim": 32, "num_heads": 2,
                  "max_seq_len": 32})
  c.data.update({"source": "file", "path": _text_file(tmp_path), "tokenizer": "char",
                 "packing": "best_fit", "seq_len": 32, "truncate": True, "add_eos": False,
                 "cache_dir": str(tmp_path / "c")})
  c.train.update({"steps": steps, "batch_size": 8, "log_every": 2, "eval_every": 6,
                  "eval_batches": 2})
  c.optim.update({"warmup_steps": 2, "decay_steps": 6})
  c.checkpoint.update({"every": 3, "use_async": False})
  c.sample.max_new_tokens = 0
  return c


def test_training_on_packed_documents_logs_data_wait_and_resumes_exactly(tmp_path):
  from jaxlm.train import trainer

  final = trainer.train(_tiny_run_config(tmp_path, 6), str(tmp_path / "straight"))
  assert final["step"] == 6 and np.isfinite(final["eval_loss"])
  with open(tmp_path / "straight" / "metrics.jsonl") as f:
    records = [json.loads(x) for x in f]
  waits = [r["data_wait_frac"] for r in records if "data_wait_frac" in r]
  assert waits and all(0 <= w < 1 for w in waits)
  trainer.train(_tiny_run_config(tmp_path, 3), str(tmp_path / "split"))  # stops at step 3
  resumed = trainer.train(_tiny_run_config(tmp_path, 6), str(tmp_path / "split"))
  assert resumed["step"] == 6
  np.testing.assert_allclose(resumed["eval_loss"], final["eval_loss"], rtol=1e-6)


def test_a_truncation_saved_with_the_tokenizer_never_cuts_documents(gpt2):
  from jaxlm.data import tokenize

  text = "the quick brown fox jumps over the lazy dog " * 10
  full = tokenize.encode_texts(gpt2, [text], [], [])[0]
  gpt2.backend_tokenizer.enable_truncation(8)  # as BERT-style tokenizer.json files ship
  flat, lengths, _ = tokenize.encode_texts(gpt2, [text], [], [])
  assert len(full) > 8 and np.array_equal(flat, full) and list(lengths) == [len(full)]
