"""Objectives (jaxlm.train.objectives): the chunked linear cross entropy, and the chunked token
log-probs DPO sums, equal the plain logits path in value and gradients, for tied and untied heads,
and never hold the whole logits.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.data.batch import Batch
from jaxlm.models.config import ModelConfig
from jaxlm.models.transformer import Transformer
from jaxlm.train import objectives


def _plain_sums(hidden_BTD, head_VD, targets_BT, weights_BT):
  logits_BTV = jnp.einsum("btd,vd->btv", hidden_BTD, head_VD)
  return objectives.lm_loss_sums(logits_BTV, targets_BT, weights_BT)


def _arrays(B=2, T=50, D=16, V=96):
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  hidden = jax.random.normal(keys[0], (B, T, D))
  head = jax.random.normal(keys[1], (V, D)) * 0.3
  targets = jax.random.randint(keys[2], (B, T), 0, V)
  weights = (jax.random.uniform(keys[3], (B, T)) > 0.3).astype(jnp.float32)
  return hidden, head, targets, weights


def test_chunked_loss_and_its_gradients_equal_the_plain_path():
  """T = 50 in chunks of 16 (the last one padded), weighted tokens; grads of hidden states,
  head and weights."""
  hidden, head, targets, weights = _arrays()
  chunked = lambda h, w, wt: objectives.chunked_lm_loss_sums(h, w, targets, wt, chunk=16)
  plain = lambda h, w, wt: _plain_sums(h, w, targets, wt)
  ((loss, weight), grads), ((loss_ref, _), grads_ref) = [
    jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2), has_aux=True))(hidden, head, weights)
    for fn in (chunked, plain)
  ]
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
  assert weight == weights.sum()
  for g, g_ref in zip(grads, grads_ref):
    np.testing.assert_allclose(g, g_ref, atol=1e-5, rtol=1e-5)


def test_chunked_loss_never_holds_the_whole_logits():
  """Compiled train-time memory (loss and grads) of B=2, T=256, V=8192: the plain path holds
  [B, T, V] fp32 logits (16 MiB) and their gradient; chunks of 32 positions hold an eighth."""
  B, T, D, V = 2, 256, 32, 8192
  args = (
    jax.ShapeDtypeStruct((B, T, D), jnp.float32),
    jax.ShapeDtypeStruct((V, D), jnp.float32),
    jax.ShapeDtypeStruct((B, T), jnp.int32),
  )

  def temp_bytes(fn):
    grad_fn = jax.grad(lambda h, w, t: fn(h, w, t, None)[0], argnums=(0, 1))
    return jax.jit(grad_fn).lower(*args).compile().memory_analysis().temp_size_in_bytes

  plain = temp_bytes(_plain_sums)
  chunked = temp_bytes(lambda *a: objectives.chunked_lm_loss_sums(*a, chunk=32))
  logits_bytes = B * T * V * 4
  assert plain >= logits_bytes
  assert chunked < logits_bytes / 2, (plain, chunked)


def _plain_logps(hidden_BTD, head_VD, targets_BT):
  logits_BTV = jnp.einsum("btd,vd->btv", hidden_BTD, head_VD)
  return jnp.take_along_axis(jax.nn.log_softmax(logits_BTV), targets_BT[..., None], -1)[..., 0]


def test_chunked_token_logps_and_their_gradients_equal_the_plain_path():
  """T = 50 in chunks of 16 (the last one padded); the gradients of a nonlinear function of the
  log-probs (as DPO's loss of per-sequence sums is), for the hidden states and the head."""
  hidden, head, targets, weights = _arrays()
  chunked = lambda h, w: objectives.chunked_token_logps(h, w, targets, chunk=16)
  plain = lambda h, w: _plain_logps(h, w, targets)
  logps = jax.jit(chunked)(hidden, head)
  assert logps.shape == targets.shape and logps.dtype == jnp.float32
  np.testing.assert_allclose(logps, plain(hidden, head), rtol=1e-5, atol=1e-5)
  loss = lambda fn: lambda h, w: jax.nn.log_sigmoid((fn(h, w) * weights).sum(-1) / 10).sum()
  grads = jax.jit(jax.grad(loss(chunked), argnums=(0, 1)))(hidden, head)
  grads_ref = jax.jit(jax.grad(loss(plain), argnums=(0, 1)))(hidden, head)
  for g, g_ref in zip(grads, grads_ref):
    np.testing.assert_allclose(g, g_ref, atol=1e-5, rtol=1e-5)


def test_chunked_token_logps_never_hold_the_whole_logits():
  """As test_chunked_loss_never_holds_the_whole_logits, for the log-probs' gradients."""
  B, T, D, V = 2, 256, 32, 8192
  args = (jax.ShapeDtypeStruct((B, T, D), jnp.float32), jax.ShapeDtypeStruct((V, D), jnp.float32),
          jax.ShapeDtypeStruct((B, T), jnp.int32))

  def temp_bytes(fn):
    grad_fn = jax.grad(lambda h, w, t: jax.nn.log_sigmoid(fn(h, w, t).sum(-1)).sum(), (0, 1))
    return jax.jit(grad_fn).lower(*args).compile().memory_analysis().temp_size_in_bytes

  plain = temp_bytes(_plain_logps)
  chunked = temp_bytes(lambda h, w, t: objectives.chunked_token_logps(h, w, t, chunk=32))
  logits_bytes = B * T * V * 4
  assert plain >= logits_bytes
  assert chunked < logits_bytes / 2, (plain, chunked)


def test_model_with_loss_chunk_trains_on_the_same_loss_and_gradients():
  """token_sums of a decoder with model.loss_chunk (the head applied chunk by chunk on its
  hidden states) equals the logits path, packed rows and loss weights included: loss and
  gradients with the tied embedding as head, the loss with an untied lm_head."""
  cfg = ModelConfig(vocab_size=128, num_layers=1, embed_dim=32, num_heads=2, max_seq_len=24)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 128, (2, 24)).astype(np.int32)
  batch = Batch(
    inputs=tokens,
    targets=np.roll(tokens, -1, axis=1),
    weights=(rng.random((2, 24)) > 0.2).astype(np.float32),
    segment_ids=np.repeat([[1, 2]], 12, axis=1).astype(np.int32).repeat(2, 0),
    positions=np.tile(np.arange(12), (2, 2)).astype(np.int32),
  )

  def params_of(cfg):
    shapes = jax.eval_shape(Transformer(cfg).init, jax.random.PRNGKey(0), tokens)["params"]
    return jax.tree.map(lambda s: rng.normal(0, 0.2, s.shape).astype(np.float32), shapes)

  def sums_fn(cfg, loss_chunk):
    model = Transformer(cfg.replace(loss_chunk=loss_chunk))
    return lambda p: objectives.token_sums(model.apply, p, batch, None, True)

  params = params_of(cfg)
  (loss, weight), grads = jax.jit(jax.value_and_grad(sums_fn(cfg, 10), has_aux=True))(params)
  (loss_ref, weight_ref), grads_ref = jax.jit(jax.value_and_grad(sums_fn(cfg, 0), has_aux=True))(
    params
  )
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
  assert weight == weight_ref == batch.weights.sum()
  for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(g, g_ref, atol=1e-5, rtol=1e-5)

  untied = cfg.replace(tie_embeddings=False)
  params = params_of(untied)
  loss, _ = jax.jit(sums_fn(untied, 10))(params)
  loss_ref, _ = jax.jit(sums_fn(untied, 0))(params)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
