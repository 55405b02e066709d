"""ModernBERT as an encoder configuration of the one Transformer: parity with transformers on
tiny random models (every head, cls and mean pooling, a padded batch on sequences longer than
the local window), the export back, the preset's size, the fields jaxlm refuses by name, and a
short SST-2 fine-tune through the one trainer.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import minilm_model_dir
from flax import linen as nn

import jaxlm
from jaxlm.hf import families
from jaxlm.models import heads
from jaxlm.models.config import FULL, SLIDING, preset

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


def test_modernbert_base_preset_is_transformers_default_config():
  """The preset is what jaxlm reads from ModernBertConfig(), and has its parameter count."""
  hf_config = transformers.ModernBertConfig()
  cfg = preset("modernbert-base")
  assert families.family_for_hf_config(hf_config).config_from_hf(hf_config) == cfg
  shapes = jax.eval_shape(heads.build_model(cfg).init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 8), jnp.int32))
  ours = sum(x.size for x in jax.tree.leaves(nn.unbox(shapes)))
  with torch.device("meta"):  # shapes only: nothing allocated
    theirs = sum(p.numel() for p in transformers.ModernBertModel(hf_config).parameters())
  assert ours == theirs == 149_014_272


def _packed_and_alone(model, params):
  """seq_cls logits of two examples packed in one row (twice: the parity tests' [2, T] shape,
  whose compiled ops are reused), and of each run alone, right-padded."""
  rng = np.random.default_rng(1)
  a, b = rng.integers(3, V, 13), rng.integers(3, V, 9)
  row = np.concatenate([a, b, np.zeros(2, np.int64)])
  segments = np.array([1] * 13 + [2] * 9 + [0] * 2)
  positions = np.concatenate([np.arange(13), np.arange(9), np.zeros(2, np.int64)])
  packed = model.apply({"params": params}, jnp.asarray(np.stack([row, row])),
                       segment_ids_BT=jnp.asarray(np.stack([segments, segments])),
                       positions_BT=jnp.asarray(np.stack([positions, positions])),
                       padding_mask_BT=jnp.asarray(np.stack([segments, segments]) > 0),
                       cls_index_N=jnp.asarray([0, 13]))
  alone = np.zeros((2, T), np.int64)
  alone[0, :13], alone[1, :9] = a, b
  return np.asarray(packed), _jax_out(model, params, "seq_cls", alone, alone > 0)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_packed_examples_score_as_if_alone(pooling, tmp_path):
  """Packed rows (as fine-tuning trains): the two-sided window stays inside each example and
  mean pooling averages each example's own tokens."""
  _hf_model("seq_cls", classifier_pooling=pooling).save_pretrained(str(tmp_path))
  model, params = jaxlm.from_hf(str(tmp_path))
  packed, alone = _packed_and_alone(model, params)
  assert np.abs(packed - alone).max() <= 1e-5
  assert np.abs(alone[0] - alone[1]).max() > 1e-3  # the two examples differ


def _refusal(**changes):
  hf_config = _hf_config(**changes)
  with pytest.raises(ValueError) as err:
    families.family_for_hf_config(hf_config).config_from_hf(hf_config)
  return str(err.value)


def test_unimplemented_fields_are_refused_by_name():
  assert "mlp_bias" in _refusal(mlp_bias=True)
  assert "decoder_bias=False" in _refusal(decoder_bias=False)
  assert "classifier_activation='silu'" in _refusal(classifier_activation="silu")
  assert "tie_word_embeddings=False" in _refusal(tie_word_embeddings=False)
  assert "ModernBertForMultipleChoice" in _refusal(architectures=["ModernBertForMultipleChoice"])
  scaled = {"rope_type": "linear", "factor": 2.0, "rope_theta": 50.0}
  assert "sliding_attention" in _refusal(rope_parameters={
    "full_attention": {"rope_type": "default", "rope_theta": 1e3}, "sliding_attention": scaled})
  with pytest.raises(ValueError, match="scan_layers=True"):
    preset("modernbert-base", scan_layers=True)
  cfg = preset("modernbert-base", first_attn_norm=True)
  with pytest.raises(ValueError, match="first_attn_norm=False"):
    families.family_for_model(cfg).config_to_hf(cfg)


@pytest.fixture(scope="module")
def tiny_modernbert(tmp_path_factory):
  """A tiny random ModernBERT for SST-2 (mean pooling) with the real uncased WordPiece
  tokenizer: its head fits the task, so no new head is initialised (one compile fewer)."""
  path = str(tmp_path_factory.mktemp("tiny_modernbert"))
  tok = transformers.AutoTokenizer.from_pretrained(minilm_model_dir())
  config = _hf_config(vocab_size=len(tok), num_hidden_layers=2, pad_token_id=tok.pad_token_id,
                      cls_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id,
                      bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                      classifier_pooling="mean", num_labels=2)
  torch.manual_seed(0)
  transformers.ModernBertForSequenceClassification(config).save_pretrained(path)
  tok.save_pretrained(path)
  return path


def test_sst2_finetune_through_the_one_trainer_lowers_the_loss(tiny_modernbert, tmp_path):
  from jaxlm.config import finetune_config
  from jaxlm.train import trainer

  data_dir = os.path.join(SHARED_DATA, "glue")
  if not os.path.isdir(data_dir):
    pytest.skip(f"{data_dir} not found (../shared/data is absent)")
  c = finetune_config("sst2", data_dir, 32, epochs=1, lr=3e-3, batch_size=8, warmup_steps=1,
                      max_train_examples=16, max_eval_examples=8, buckets=(32,))
  c.model.init_from = tiny_modernbert
  c.task.pack = False  # one padded [8, 32] shape: one compiled step
  c.train.steps, c.train.eval_every, c.train.log_every = 8, 8, 1
  result = trainer.train(c, str(tmp_path))
  assert result["step"] == 8 and np.isfinite(result["accuracy"])
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in records if "loss" in r]
  assert len(losses) == 8
  assert np.mean(losses[-2:]) < 0.7 * np.mean(losses[:2]), losses  # 16 examples seen 4 times
