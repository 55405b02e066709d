"""Encoder configuration of the one Transformer: bidirectional attention, padding, heads."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.models.config import preset
from jaxlm.models.heads import EncoderModel

TINY = dict(vocab_size=61, num_layers=2, embed_dim=32, num_heads=4, max_seq_len=16)
T = 10


def _init(task="base", family="bert-base", num_labels=3):
  model = EncoderModel(preset(family, **TINY, head=task, num_labels=num_labels))
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((2, T), jnp.int32))
  return model, nn.unbox(variables["params"])


@pytest.mark.parametrize("family", ["bert-base", "roberta-base"])
def test_every_token_sees_every_real_token_and_no_padding(family):
  model, params = _init(family=family)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, T), 3, 61)
  mask = jnp.asarray([[True] * T, [True] * 6 + [False] * 4])

  def hidden(tok):
    return model.apply({"params": params}, tok, padding_mask_BT=mask)["hidden"]

  ref = hidden(tokens)
  changed_pad = hidden(tokens.at[1, 7].set(5))
  np.testing.assert_allclose(changed_pad[1, :6], ref[1, :6], atol=1e-6)  # padding is invisible
  changed_first = hidden(tokens.at[:, 5].set(7))
  # a change to token 5 reaches every real position, earlier ones too (bidirectional)
  assert np.all(np.abs(np.asarray(changed_first - ref))[0].max(-1) > 1e-6)
  assert np.all(np.abs(np.asarray(changed_first - ref))[1, :6].max(-1) > 1e-6)


@pytest.mark.parametrize("task,shape", [("mlm", (2, T, 61)), ("seq_cls", (2, 3)),
                                        ("token_cls", (2, T, 3)), ("qa", (2, T, 2))])
def test_head_output_shapes(task, shape):
  model, params = _init(task)
  out = model.apply({"params": params}, jnp.ones((2, T), jnp.int32))
  assert out.shape == shape and out.dtype == jnp.float32


@pytest.mark.parametrize("family,head_dropouts", [("bert-base", 1), ("roberta-base", 2)])
def test_classification_head_drops_out_where_hf_does(family, head_dropouts):
  """BertForSequenceClassification: dropout(pooler(h)); RobertaClassificationHead:
  dropout(tanh(dense(dropout(h))))."""
  cfg = preset(family, **TINY, head="seq_cls", num_labels=3, dropout=0.1)
  model = EncoderModel(cfg)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((2, T), jnp.int32))["params"])
  shapes = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Dropout):
      shapes.append(args[0].shape)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    model.apply({"params": params}, jnp.ones((2, T), jnp.int32), deterministic=False,
                rngs={"dropout": jax.random.PRNGKey(1)})
  assert shapes.count((2, TINY["embed_dim"])) == head_dropouts


def test_mlm_decoder_is_tied_to_the_token_embedding():
  model, params = _init("mlm")
  assert "decoder" not in params["mlm_head"]
  tokens = jnp.ones((1, T), jnp.int32)
  bumped = jax.tree.map(lambda x: x, params)
  direction_D = jax.random.normal(jax.random.PRNGKey(2), (TINY["embed_dim"],))
  bumped["transformer"]["embed"]["embedding"] = params["transformer"]["embed"]["embedding"].at[
    7].add(direction_D)
  a = model.apply({"params": params}, tokens)
  b = model.apply({"params": bumped}, tokens)
  assert np.abs(np.asarray(a - b))[..., 7].min() > 1e-4  # id 7's logit moves though 7 is absent


def test_bert_base_has_bert_base_parameter_count():
  model = EncoderModel(preset("bert-base"))
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes)))
  assert n == 109_482_240  # Hugging Face BertModel (with pooler)


def test_unknown_task_and_causal_encoder_are_rejected():
  with pytest.raises(ValueError, match="model.head='ner' is not one of"):
    _init("ner")
  with pytest.raises(ValueError, match="model.head='lm' is not an encoder head"):
    EncoderModel(preset("bert-base", **TINY, head="lm")).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
  model = EncoderModel(preset("bert-base", **TINY, causal=True))
  with pytest.raises(ValueError, match="causal=False"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))


def test_the_padding_mask_is_keyword_only():
  model, params = _init()
  tokens = jnp.ones((2, T), jnp.int32)
  with pytest.raises(TypeError, match="positional argument"):
    model.apply({"params": params}, tokens, jnp.ones((2, T), bool))


def _features(rng, n, max_len, token_labels):
  lengths = rng.integers(3, max_len + 1, n)
  return [{"inputs": rng.integers(3, 61, k).astype(np.int32),
           "token_types": (np.arange(k) >= k // 2).astype(np.int32),
           "label": (rng.integers(0, 3, k).astype(np.int32) if token_labels
                     else np.int32(rng.integers(0, 3)))} for k in lengths]


@pytest.mark.parametrize("family", ["bert-base", "roberta-base"])
@pytest.mark.parametrize("task", ["seq_cls", "token_cls"])
def test_packed_examples_score_as_if_alone(family, task):
  """Examples packed several to a row give the outputs and the loss they give padded one per
  row: segment ids keep them apart, positions (RoBERTa's offset too) restart, [CLS] is found."""
  from jaxlm.data import buckets
  from jaxlm.data.batch import Batch
  from jaxlm.train import objectives

  model, params = _init(task, family)
  offset = model.cfg.position_offset
  feats = _features(np.random.default_rng(0), 7, T, task == "token_cls")
  packed = buckets.pack_batch(feats, 8, T, 0, task == "token_cls", row_multiple=2,
                              position_offset=offset)
  padded = buckets.pad_batch(feats, 8, (T,), 0, task == "token_cls")
  assert len(packed["inputs"]) % 2 == 0 and len(packed["inputs"]) < 7
  def apply(batch):
    return np.asarray(objectives.model_outputs(model.apply, params,
                                               Batch(**jax.tree.map(jnp.asarray, batch))))

  out_packed, out_padded = apply(packed), apply(padded)
  if task == "seq_cls":
    np.testing.assert_allclose(out_packed[:7], out_padded[:7], atol=1e-5)
  else:
    _, starts = buckets.pack_starts([len(f["inputs"]) for f in feats], T)
    flat = out_packed.reshape(-1, out_packed.shape[-1])
    for i, f in enumerate(feats):
      n = len(f["inputs"])
      np.testing.assert_allclose(flat[starts[i]:starts[i] + n], out_padded[i, :n], atol=1e-5)
  def loss(batch, out):
    sums = objectives.task_loss_sums(task, jnp.asarray(out),
                                     Batch(**jax.tree.map(jnp.asarray, batch)))
    return [float(x) for x in sums]

  np.testing.assert_allclose(loss(packed, out_packed), loss(padded, out_padded), rtol=1e-5)
