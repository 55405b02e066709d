"""`jaxlm convert` both ways (jaxlm/train/convert.py makes the run directory) and
`model.init_from`, on a tiny random Llama with a char tokenizer: the run directory generates what
transformers generates, and exports back unchanged."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from conftest import REPO

from jaxlm import config as config_lib
from jaxlm.data import tokenizers as tok_lib
from jaxlm.train import trainer

TEXT = "the quick brown fox jumps over the lazy dog. " * 40


def jaxlm(*args):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run([sys.executable, "-m", "jaxlm.cli", *args], check=False,
                        capture_output=True, text=True, timeout=300, cwd=REPO, env=env)


@pytest.fixture(scope="module")
def hf_src(tmp_path_factory):
  """A tiny random LlamaForCausalLM saved with a char tokenizer."""
  src = str(tmp_path_factory.mktemp("hf_src"))
  tokenizer = tok_lib.char_tokenizer(TEXT)
  config = transformers.LlamaConfig(
    vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.2 * torch.randn_like(p))
  model.save_pretrained(src)
  tokenizer.save_pretrained(src)
  return src, model, tokenizer


def _saved_model(workdir):
  with open(os.path.join(workdir, "config.json")) as f:
    return json.load(f)["model"]


def _logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor([ids])).logits.numpy()


def test_convert_generate_and_export(hf_src, tmp_path):
  src, hf_model, tokenizer = hf_src
  workdir, out = str(tmp_path / "run"), str(tmp_path / "out")
  made = jaxlm("convert", "--from-hf", src, "--workdir", workdir)
  assert made.returncode == 0, made.stderr[-3000:]
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["0"]
  saved = _saved_model(workdir)
  assert (saved["num_kv_heads"], saved["mlp_dim"], saved["tie_embeddings"]) == (2, 48, False)
  from jaxlm import checkpoint

  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), use_async=False)
  meta = ckpt.restore_meta(0)  # like a trained run's: what check_same_model compares on resume
  ckpt.close()
  assert meta["config"]["model"]["mlp_dim"] == 48 and meta["tokenizer"]["source"] == src

  prompt = "the quick "
  ids = tokenizer.encode(prompt, add_special_tokens=False)
  with torch.no_grad():
    hf_ids = hf_model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0]
  expected = prompt + tokenizer.decode(hf_ids[len(ids):].tolist())
  gen = jaxlm("generate", "--workdir", workdir, "--prompt", prompt, "--max_new_tokens", "12",
              "--temperature", "0")
  assert gen.returncode == 0, gen.stderr[-3000:]
  assert gen.stdout.rstrip("\n") == expected

  back = jaxlm("convert", "--workdir", workdir, "--to-hf", out, "--step", "0")
  assert back.returncode == 0, back.stderr[-3000:]
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert np.abs(_logits(reloaded, ids) - _logits(hf_model, ids)).max() <= 1e-5
  assert transformers.AutoTokenizer.from_pretrained(out).encode(prompt) == ids


def test_convert_needs_one_direction(tmp_path):
  result = jaxlm("convert", "--workdir", str(tmp_path))
  assert result.returncode == 2
  assert "exactly one of --from-hf=SRC or --to-hf=OUT" in result.stderr


def test_training_starts_from_the_imported_weights(hf_src, tmp_path):
  src, hf_model, tokenizer = hf_src
  text_path = tmp_path / "text.txt"
  text_path.write_text(TEXT)
  c = config_lib.base_config()
  c.model.init_from = src
  c.model.dropout = 0.0
  c.data.path = str(text_path)
  c.data.seq_len = 32
  c.train.update(steps=2, batch_size=8, eval_every=2, eval_batches=1, log_every=1)
  c.optim.update(lr=0.0, min_lr=0.0, warmup_steps=0)  # params stay exactly the imported ones
  c.sample.max_new_tokens = 0
  workdir = str(tmp_path / "ft")
  final = trainer.train(c, workdir)
  saved = _saved_model(workdir)
  assert saved["num_kv_heads"] == 2 and saved["init_from"] == src

  out = str(tmp_path / "out")
  assert jaxlm("convert", "--workdir", workdir, "--to-hf", out).returncode == 0
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  ids = tokenizer.encode("lazy dog", add_special_tokens=False)
  assert np.abs(_logits(reloaded, ids) - _logits(hf_model, ids)).max() <= 1e-5
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    evals = [r for r in map(json.loads, f) if "eval_loss" in r]
  assert [r["step"] for r in evals] == [0, 2]  # step 0: the imported weights, before training
  assert abs(evals[0]["eval_loss"] - final["eval_loss"]) < 1e-5  # lr 0: nothing moved
