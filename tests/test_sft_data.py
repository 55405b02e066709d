"""Instruction SFT data: chat-template rendering, loss on assistant tokens only, and packing of
examples with their loss masks."""

import json
import os

import numpy as np
import pytest

from jaxlm.config import base_config
from jaxlm.data import pipeline, sft, sources, tokenize

CHATS = [
  [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
   {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Spain?"},
   {"role": "assistant", "content": "Madrid, of course."}],
  [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi there!"}],
  [{"role": "user", "content": "Count to three"}, {"role": "assistant", "content": "1, 2, 3"}],
]


def _cfg(tmp_path, **kw):
  cfg = base_config().data
  cfg.update({"packing": "best_fit", "seq_len": 64, "add_eos": False,
              "cache_dir": str(tmp_path / "cache"), "prefetch": 2, "read_threads": 1,
              "best_fit_bins": 4, "val_fraction": 0.0})
  cfg.update(kw)
  return cfg


def _responses(messages):
  return "".join(m["content"] + "<|im_end|>\n" for m in messages if m["role"] == "assistant")


def test_loss_mask_covers_exactly_the_assistant_turns(chat_tokenizer, tmp_path):
  cfg = _cfg(tmp_path)
  flat, lengths, mask = sft.encode_examples(chat_tokenizer, {"messages": CHATS}, cfg, [], [])
  assert len(flat) == len(mask) == lengths.sum()
  starts = np.concatenate([[0], np.cumsum(lengths)])
  for i, chat in enumerate(CHATS):
    ids, m = flat[starts[i] : starts[i + 1]], mask[starts[i] : starts[i + 1]]
    assert chat_tokenizer.decode(ids) == chat_tokenizer.apply_chat_template(chat, tokenize=False)
    assert chat_tokenizer.decode(ids[m == 1]) == _responses(chat)
    assert 0 < m.sum() < len(m)


def test_packed_sft_rows_train_on_responses_only(chat_tokenizer, tmp_path):
  pairs = tmp_path / "pairs.jsonl"
  rows = [{"prompt": f"question {i}?", "response": f"answer number {i}."} for i in range(12)]
  pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
  cfg = _cfg(tmp_path, path=str(pairs), messages_column="")
  parts = pipeline.load_parts(cfg, chat_tokenizer, sft=True)
  stream = pipeline.batches(parts, cfg, 2, 0, pipeline.Shard(), num_epochs=1)
  seen = []
  for batch in stream:
    for b in range(2):
      seg, tgt, w = batch["segment_ids"][b], batch["targets"][b], batch["weights"][b]
      assert np.all(w[seg == 0] == 0)
      for s in np.unique(seg[seg > 0]):
        sel = seg == s
        seen.append(chat_tokenizer.decode(tgt[sel & (w == 1)]))
        np.testing.assert_array_equal(batch["positions"][b][sel], np.arange(sel.sum()))
  assert sorted(seen) == sorted(f"answer number {i}.<|im_end|>\n" for i in range(12))


def test_messages_jsonl_through_the_cache(chat_tokenizer, tmp_path):
  path = tmp_path / "chats.jsonl"
  path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
  cfg = _cfg(tmp_path, path=str(path))
  src = sources.sources_from_config(cfg)[0]
  docs, hit = tokenize.tokenize_source(src, cfg, chat_tokenizer, sft=True)
  assert not hit and len(docs) == 3 and docs.loss_mask is not None
  again, hit = tokenize.tokenize_source(src, cfg, chat_tokenizer, sft=True)
  assert hit
  np.testing.assert_array_equal(again.loss_mask, docs.loss_mask)
  template = chat_tokenizer.chat_template
  chat_tokenizer.chat_template = template.replace("\n{{", "\n\n{{")  # a changed template
  assert not tokenize.tokenize_source(src, cfg, chat_tokenizer, sft=True)[1]


def test_sft_errors_are_clear(chat_tokenizer, tmp_path):
  cfg = _cfg(tmp_path)
  with pytest.raises(ValueError, match="no assistant message"):
    sft.render(chat_tokenizer, CHATS[0][:2])
  chat_tokenizer.chat_template = None
  with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
    sft.encode_examples(chat_tokenizer, {"messages": CHATS}, cfg, [], [])
  path = tmp_path / "pairs.jsonl"
  path.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
  cfg = _cfg(tmp_path, path=str(path), messages_column="")
  with pytest.raises(ValueError, match=r"\['prompt', 'response'\] not in"):
    tokenize.tokenize_source(sources.sources_from_config(cfg)[0], cfg, chat_tokenizer,
                            sft=True)


def test_sft_config_describes_a_packed_chat_finetune():
  import importlib.util

  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "sft_smollm2.py")
  spec = importlib.util.spec_from_file_location("sft_smollm2", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  assert c.kind == "sft" and c.data.packing == "best_fit" and c.model.init_from
