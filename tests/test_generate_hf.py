"""Greedy generation equals Hugging Face `generate` token for token: tiny random GPT-2, Llama
(GQA) and Qwen2 on a left-padded batch, and real SmolLM2-135M weights (GGUF)."""


import numpy as np
import pytest
import torch
import transformers
from hf_testing import random_hf_model

import jaxlm
from jaxlm import generate as gen

V = 97
PAD = 0
_SMALL = {"vocab_size": V, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
          "num_attention_heads": 4, "max_position_embeddings": 64}
PROMPTS = [[11, 52, 3, 9, 44, 70, 81], [7, 20], [12, 30, 2, 95, 8]]


def _configs():
  t = transformers
  return {
    "gpt2": t.GPT2Config(vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4),
    "llama-gqa": t.LlamaConfig(**_SMALL, num_key_value_heads=2),
    "qwen2": t.Qwen2Config(**_SMALL, num_key_value_heads=2, tie_word_embeddings=True),
  }


def _random_hf_model(config, seed=0):
  return random_hf_model(config, seed, std=0.2)


def _hf_greedy(model, prompts, n, eos_id=None):
  """HF `generate` on the left-padded batch; each row cut after its first EOS (if any)."""
  model.generation_config.eos_token_id = None  # only the EOS given here stops a row
  tokens_BP, lengths_B = gen.left_pad(prompts, PAD)
  mask_BP = np.arange(tokens_BP.shape[1])[None] >= (tokens_BP.shape[1] - lengths_B)[:, None]
  with torch.no_grad():
    out = model.generate(torch.tensor(tokens_BP), attention_mask=torch.tensor(mask_BP.astype(int)),
                         max_new_tokens=n, min_new_tokens=0, do_sample=False, pad_token_id=PAD,
                         eos_token_id=eos_id)
  rows = out[:, tokens_BP.shape[1]:].tolist()
  return [row[:row.index(eos_id) + 1] if eos_id in row else row for row in rows]


@pytest.mark.parametrize("name", list(_configs()))
def test_greedy_matches_hf_generate_on_a_left_padded_batch(name, tmp_path):
  hf_model = _random_hf_model(_configs()[name])
  hf_model.save_pretrained(str(tmp_path))
  model, params = jaxlm.from_hf(str(tmp_path))
  free = _hf_greedy(hf_model, PROMPTS, 10)
  assert len({t for row in free for t in row}) > 6, "degenerate model: the test would prove little"
  eos = free[1][4]  # a token that some row emits: stops that row early
  expected = _hf_greedy(hf_model, PROMPTS, 10, eos_id=eos)
  assert gen.generate(model, params, PROMPTS, max_new_tokens=10, eos_ids=[eos],
                      pad_id=PAD) == expected
  assert len(expected[1]) <= 5


def test_smollm2_32_greedy_tokens_match_hf(smollm2):
  model, params, hf_model, tokenizer = smollm2
  texts = ["The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci"]
  prompts = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
  assert len(prompts[0]) != len(prompts[1])
  expected = _hf_greedy(hf_model, prompts, 32)  # left-padded batch, EOS off: 32 tokens a row
  out = gen.generate(model, params, prompts, max_new_tokens=32, pad_id=PAD)
  assert [len(r) for r in expected] == [32, 32]
  assert out == expected, [tokenizer.decode(r) for r in out + expected]


def test_cli_generates_from_an_hf_directory(tmp_path):
  from test_cli import jaxlm as run_cli

  from jaxlm.data import tokenizers as tok_lib

  hf_model = _random_hf_model(_configs()["llama-gqa"], seed=1)
  hf_model.save_pretrained(str(tmp_path))
  tokenizer = tok_lib.char_tokenizer("abcdefghijklmnopqrstuvwxyz .,")
  tokenizer.save_pretrained(str(tmp_path))
  prompt = "the cat"
  ids = tokenizer.encode(prompt, add_special_tokens=False)
  expected = tokenizer.decode(_hf_greedy(hf_model, [ids], 12)[0])
  result = run_cli("generate", "--hf", str(tmp_path), "--prompt", prompt, "--temperature", "0",
                   "--max_new_tokens", "12", timeout=200)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout == prompt + expected + "\n"
