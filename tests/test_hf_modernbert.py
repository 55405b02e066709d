"""ModernBERT as an encoder configuration of the one Transformer: parity with transformers on
tiny random models (every head, cls and mean pooling, a padded batch on sequences longer than
the local window), the export back, the preset's size, the fields jaxlm refuses by name, and a
short SST-2 fine-tune through the one trainer.
"""

import os

import jax.numpy as jnp
import numpy as np
import pytest

import jaxlm
from jaxlm.models.config import FULL, SLIDING

torch = pytest.importorskip("torch", reason="the HF parity tests build reference models in torch")
transformers = pytest.importorskip("transformers")

V, T, WINDOW = 97, 24, 8  # vocabulary, sequence length, local_attention (|i - j| <= 4)
HEADS = {"base": "Model", "mlm": "ForMaskedLM", "seq_cls": "ForSequenceClassification",
         "token_cls": "ForTokenClassification", "qa": "ForQuestionAnswering"}
SHARED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
  os.path.abspath(__file__)))), "shared", "data")


def _hf_config(**changes):
  """4 layers (global, local, local, global) with distinct RoPE bases for the two kinds."""
  small = dict(vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=4,
               num_attention_heads=4, max_position_embeddings=64, local_attention=WINDOW,
               global_attn_every_n_layers=3, global_rope_theta=1000.0, local_rope_theta=50.0,
               pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
               num_labels=3)
  return transformers.ModernBertConfig(**{**small, **changes})


def _hf_model(head, seed=0, **changes):
  """A tiny transformers ModernBERT with `head` and every weight random (norm scales near 1)."""
  config = _hf_config(**changes, num_labels=2) if head == "qa" else _hf_config(**changes)
  torch.manual_seed(seed)
  model = getattr(transformers, "ModernBert" + HEADS[head])._from_config(
    config, attn_implementation="eager").eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      is_scale = name.endswith("norm.weight")
      p.copy_(1 + 0.1 * torch.randn_like(p) if is_scale else 0.2 * torch.randn_like(p))
  return model


def _inputs():
  """Two rows: one full, one right-padded after 15 tokens."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, V, (2, T))
  mask = np.ones((2, T), np.int64)
  mask[1, 15:] = 0
  tokens[1, 15:] = 0
  return tokens, mask


def _hf_out(model, head, tokens, mask):
  with torch.no_grad():
    out = model(torch.tensor(tokens), attention_mask=torch.tensor(mask))
  if head == "base":
    return out.last_hidden_state.numpy()
  if head == "qa":
    return np.stack([out.start_logits.numpy(), out.end_logits.numpy()], -1)
  return out.logits.numpy()


def _jax_out(model, params, head, tokens, mask):
  out = model.apply({"params": params}, jnp.asarray(tokens),
                    padding_mask_BT=jnp.asarray(mask, bool))
  return np.asarray(out["hidden"] if head == "base" else out)


def _max_err(a, b, mask):
  """Largest difference; per-token outputs only at real tokens (padding carries nothing)."""
  if a.ndim == 3:
    return np.abs(a - b)[mask.astype(bool)].max()
  return np.abs(a - b).max()


CASES = [("base", {}), ("mlm", {}), ("seq_cls", {}), ("seq_cls", {"classifier_pooling": "mean"}),
         ("token_cls", {}), ("qa", {})]


@pytest.mark.parametrize("head,changes", CASES, ids=[f"{h}-{'-'.join(c.values()) or 'cls'}"
                                                      for h, c in CASES])
def test_import_and_export_match_transformers(head, changes, tmp_path):
  hf_model = _hf_model(head, **changes)
  src = str(tmp_path / "src")
  hf_model.save_pretrained(src)
  tokens, mask = _inputs()
  ref = _hf_out(hf_model, head, tokens, mask)

  model, params = jaxlm.from_hf(src)
  cfg = model.cfg
  assert (cfg.head, cfg.sliding_window, cfg.layer_types) == (head, WINDOW, (FULL, SLIDING, SLIDING))
  assert cfg.classifier_pooling == changes.get("classifier_pooling", "cls")
  ours = _jax_out(model, params, head, tokens, mask)
  assert _max_err(ours, ref, mask) <= 1e-4

  out = str(tmp_path / "out")
  jaxlm.to_hf(model, params, out)
  reloaded = getattr(transformers, "ModernBert" + HEADS[head]).from_pretrained(
    out, attn_implementation="eager").eval()
  assert _max_err(_hf_out(reloaded, head, tokens, mask), ours, mask) <= 1e-5
