"""Objectives: what a step minimises, as `forward_sums(apply_fn, params, batch, rng,
deterministic) -> (loss sum, weight sum)`, summed so micro-batches combine. The model's head
picks it: token cross entropy for `lm` (next token: pretraining, SFT) and `mlm` (masked tokens),
the task loss for classification, regression, token classification and QA.

A decoder whose config sets `loss_chunk` (models/config.py) is trained by a fused linear
cross entropy (`chunked_lm_loss_sums`): the model returns its final hidden states and the LM head
is applied here, `loss_chunk` positions at a time, so [B, T, V] fp32 logits never exist at once,
neither forward nor backward. DPO's per-token log-probs (`token_logps`) are chunked the same way.

A mixture-of-experts decoder (cfg.num_experts > 0) adds its router losses to the token loss:
router_aux_loss_coef times the load-balancing loss plus router_z_loss_coef times the z-loss
(models/moe.py), and reports them (moe/aux_loss, moe/z_loss, moe/expert_load/layer_i: the most
routed rows of an expert over the mean), in training and in eval alike.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxlm.data.batch import Batch
from jaxlm.models import moe


def lm_loss_sums(logits_BTV, targets_BT, weights_BT=None):
  """Returns (sum of weighted token losses, sum of weights) in fp32."""
  losses_BT = optax.softmax_cross_entropy_with_integer_labels(
    logits_BTV.astype(jnp.float32), targets_BT
  )
  if weights_BT is None:
    return losses_BT.sum(), jnp.asarray(losses_BT.size, jnp.float32)
  weights_BT = weights_BT.astype(jnp.float32)
  return (losses_BT * weights_BT).sum(), weights_BT.sum()


def chunked_lm_loss_sums(hidden_BTD, head_VD, targets_BT, weights_BT=None, *, chunk: int,
                         dtype=None):
  """lm_loss_sums(hidden_BTD @ head_VD.T, ...) computed `chunk` positions of every row at a
  time: only [B, chunk, V] fp32 logits exist at once. Its custom VJP computes the gradients of
  each chunk in the forward scan (softmax minus one-hot, times the weights), so the backward
  pass neither holds nor recomputes logits: three head matmuls in all, as the plain path.

  Args:
    hidden_BTD: final (normed) hidden states.
    head_VD: the LM head as [V, D] (the tied token embedding, or lm_head's kernel transposed).
    targets_BT, weights_BT: as lm_loss_sums (weights None = all ones).
    chunk: positions per chunk; T is padded (with zero weight) to a multiple of it.
    dtype: the matmul's input dtype (default hidden_BTD's); logits accumulate in fp32.

  Returns:
    (sum of weighted token losses, sum of weights) in fp32.
  """
  B, T = targets_BT.shape
  dtype = dtype or hidden_BTD.dtype
  if weights_BT is None:
    weights_BT = jnp.ones((B, T), jnp.float32)
  weights_BT = weights_BT.astype(jnp.float32)
  h_NBCD, targets_NBC, weights_NBC = _in_chunks(chunk, hidden_BTD.astype(dtype), targets_BT,
                                                weights_BT)
  total = _fused_ce(h_NBCD, head_VD.astype(dtype), targets_NBC, weights_NBC)
  return total, weights_BT.sum()


def chunked_token_logps(hidden_BTD, head_VD, targets_BT, *, chunk: int, dtype=None):
  """log p(target) at every position, [B, T] fp32, of the logits hidden_BTD @ head_VD.T computed
  `chunk` positions of every row at a time: only [B, chunk, V] logits exist at once. For
  objectives that combine token log-probs otherwise than by one weighted sum (DPO's per-sequence
  sums): the backward pass recomputes each chunk's logits (jax.checkpoint), a fourth head matmul
  where chunked_lm_loss_sums needs three.

  Args:
    hidden_BTD, head_VD, dtype: as chunked_lm_loss_sums.
    targets_BT: the token whose log-prob each position gives.
    chunk: positions per chunk; T is padded to a multiple of it (the padding dropped after).
  """
  B, T = targets_BT.shape
  dtype = dtype or hidden_BTD.dtype
  w_VD = head_VD.astype(dtype)

  @jax.checkpoint
  def body(_, xs):
    h_BCD, targets_BC = xs
    losses_BC, _, _ = _chunk_ce(h_BCD, w_VD, targets_BC)
    return None, -losses_BC

  _, logps_NBC = jax.lax.scan(body, None, _in_chunks(chunk, hidden_BTD.astype(dtype), targets_BT))
  return jnp.swapaxes(logps_NBC, 0, 1).reshape(B, -1)[:, :T]


def _in_chunks(chunk: int, *arrays_BT) -> list:
  """Each [B, T, ...] array zero-padded along T to a multiple of `chunk` (at most T) and split
  into [N, B, chunk, ...] chunks, the scan axis first."""
  B, T = arrays_BT[0].shape[:2]
  chunk = min(chunk, T)
  n = -(-T // chunk)
  pad = n * chunk - T
  chunks = []
  for x in arrays_BT:
    if pad:
      x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
    chunks.append(jnp.swapaxes(x.reshape(B, n, chunk, *x.shape[2:]), 0, 1))
  return chunks


def _chunk_ce(h_BCD, w_VD, targets_BC):
  """Token losses [B, C] of one chunk (unweighted), its fp32 logits and their logsumexp."""
  logits_BCV = jnp.einsum("bcd,vd->bcv", h_BCD, w_VD, preferred_element_type=jnp.float32)
  lse_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
  target_BC = jnp.take_along_axis(logits_BCV, targets_BC[..., None], axis=-1)[..., 0]
  return lse_BC - target_BC, logits_BCV, lse_BC


@jax.custom_vjp
def _fused_ce(h_NBCD, w_VD, targets_NBC, weights_NBC):
  def body(total, xs):
    h_BCD, targets_BC, weights_BC = xs
    losses_BC, _, _ = _chunk_ce(h_BCD, w_VD, targets_BC)
    return total + (losses_BC * weights_BC).sum(), None

  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (h_NBCD, targets_NBC, weights_NBC))
  return total


def _fused_ce_fwd(h_NBCD, w_VD, targets_NBC, weights_NBC):
  def body(carry, xs):
    total, dw_VD = carry
    h_BCD, targets_BC, weights_BC = xs
    losses_BC, logits_BCV, lse_BC = _chunk_ce(h_BCD, w_VD, targets_BC)
    dlogits_BCV = jnp.exp(logits_BCV - lse_BC[..., None])
    dlogits_BCV -= jax.nn.one_hot(targets_BC, w_VD.shape[0], dtype=jnp.float32)
    dlogits_BCV = (dlogits_BCV * weights_BC[..., None]).astype(h_BCD.dtype)
    dh_BCD = jnp.einsum("bcv,vd->bcd", dlogits_BCV, w_VD, preferred_element_type=jnp.float32)
    dw_VD += jnp.einsum("bcv,bcd->vd", dlogits_BCV, h_BCD, preferred_element_type=jnp.float32)
    return (total + (losses_BC * weights_BC).sum(), dw_VD), (dh_BCD.astype(h_BCD.dtype), losses_BC)

  init = (jnp.zeros((), jnp.float32), jnp.zeros(w_VD.shape, jnp.float32))
  (total, dw_VD), (dh_NBCD, losses_NBC) = jax.lax.scan(
    body, init, (h_NBCD, targets_NBC, weights_NBC))
  return total, (dh_NBCD, dw_VD.astype(w_VD.dtype), losses_NBC, targets_NBC)


def _fused_ce_bwd(residuals, g):
  dh_NBCD, dw_VD, losses_NBC, targets_NBC = residuals
  zero_targets = jnp.zeros(targets_NBC.shape, jax.dtypes.float0)
  dh_NBCD = (g * dh_NBCD).astype(dh_NBCD.dtype)
  return dh_NBCD, (g * dw_VD).astype(dw_VD.dtype), zero_targets, g * losses_NBC


_fused_ce.defvjp(_fused_ce_fwd, _fused_ce_bwd)


def lm_head_VD(cfg, params) -> jax.Array:
  """The LM head of a Transformer's params as [V, D]: the token embedding when tied, else
  lm_head's kernel transposed."""
  if cfg.tie_embeddings:
    return nn.unbox(params["embed"]["embedding"])
  return nn.unbox(params["lm_head"]["kernel"]).T


def _ce(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def task_loss_sums(head: str, outputs, batch: Batch):
  """(sum of weighted example losses, sum of weights) of an encoder task.

  batch.weights is 1 for real examples and 0 for the rows that pad the last batch.
  seq_cls: cross entropy, or squared error when there is one output (regression);
  token_cls: cross entropy over labelled tokens (label -100: none); qa: the mean of the start
  and end cross entropies.
  """
  weights_B = batch.weights.astype(jnp.float32)
  labels = batch.labels
  if head == "seq_cls" and outputs.shape[-1] == 1:
    losses_B = (outputs[:, 0] - labels.astype(jnp.float32)) ** 2
  elif head == "seq_cls":
    losses_B = _ce(outputs, labels)
  elif head == "token_cls":
    labelled_BT = (labels >= 0).astype(jnp.float32) * weights_B[:, None]
    losses_BT = _ce(outputs, jnp.maximum(labels, 0))
    return (losses_BT * labelled_BT).sum(), labelled_BT.sum()
  elif head == "qa":
    real_BT = batch.padding_mask.astype(bool)[:, :, None]
    logits_BT2 = jnp.where(real_BT, outputs, -1e9)
    losses_B = 0.5 * (_ce(logits_BT2[..., 0], labels[:, 0]) + _ce(logits_BT2[..., 1], labels[:, 1]))
  else:
    raise ValueError(f"no task loss for model.head={head!r}")
  return (losses_B * weights_B).sum(), weights_B.sum()


def model_outputs(apply_fn, params, batch: Batch, rng=None, deterministic=True, **kwargs):
  """The model's outputs for `batch`: LM logits, or an encoder head's outputs (the task fields
  token_types, padding_mask and cls_index are passed when the batch has them); `kwargs` go to
  `apply_fn` (mutable=...)."""
  task_fields = {}
  if batch.padding_mask is not None:
    task_fields = dict(padding_mask_BT=batch.padding_mask, token_types_BT=batch.token_types,
                       cls_index_N=batch.cls_index)
  return apply_fn(
    {"params": params}, batch.inputs, segment_ids_BT=batch.segment_ids,
    positions_BT=batch.positions, deterministic=deterministic,
    rngs=None if deterministic else {"dropout": rng}, **task_fields, **kwargs,
  )


def _chunked_loss_cfg(apply_fn):
  """The ModelConfig of a decoder LM whose `apply_fn` (its bound Module.apply) asks for the
  chunked loss (cfg.loss_chunk > 0); None otherwise."""
  cfg = getattr(getattr(apply_fn, "__self__", None), "cfg", None)
  if cfg is None or cfg.head != "lm" or not cfg.causal or not cfg.loss_chunk:
    return None
  return cfg


def _final_hidden(apply_fn, params, batch: Batch, rng, deterministic, **kwargs):
  """A decoder's final (normed) hidden states for `batch`, its LM head left to the objective."""
  return apply_fn(
    {"params": params}, batch.inputs, segment_ids_BT=batch.segment_ids,
    positions_BT=batch.positions, deterministic=deterministic,
    rngs=None if deterministic else {"dropout": rng}, return_hidden=True, **kwargs,
  )


def _moe_cfg(apply_fn):
  """The ModelConfig of a mixture-of-experts model's `apply_fn`; None for a dense one."""
  cfg = getattr(getattr(apply_fn, "__self__", None), "cfg", None)
  return cfg if getattr(cfg, "num_experts", 0) else None


def router_loss_sums(cfg, intermediates, total, weight):
  """(total + the router losses times their coefficients, times `weight`; the sums to report):
  the token loss `total` over `weight` gains coef * loss, and each reported sum over the weight
  is the loss itself, so micro-batches combine by adding as the token losses do."""
  stats = moe.collect_stats(intermediates)
  aux, z = moe.load_balancing_loss(stats), moe.router_z_loss(stats)
  total = total + (cfg.router_aux_loss_coef * aux + cfg.router_z_loss_coef * z) * weight
  sums = {"weight": weight, "moe/aux_loss": aux * weight, "moe/z_loss": z * weight}
  for i, load in enumerate(moe.expert_load(stats)):
    sums[f"moe/expert_load/layer_{i}"] = load * weight
  return total, sums


def token_sums(apply_fn, params, batch: Batch, rng, deterministic):
  """Cross entropy at the batch's targets (next tokens, or the tokens under MLM masks); fused
  with the LM head, chunk by chunk, when the decoder's cfg.loss_chunk asks for it."""
  cfg, moe_cfg = _chunked_loss_cfg(apply_fn), _moe_cfg(apply_fn)
  kwargs = {"mutable": ["intermediates"]} if moe_cfg else {}
  if cfg is None:
    out = model_outputs(apply_fn, params, batch, rng, deterministic, **kwargs)
    logits_BTV, state = out if moe_cfg else (out, None)
    total, weight = lm_loss_sums(logits_BTV, batch.targets, batch.weights)
  else:
    out = _final_hidden(apply_fn, params, batch, rng, deterministic, **kwargs)
    hidden_BTD, state = out if moe_cfg else (out, None)
    total, weight = chunked_lm_loss_sums(hidden_BTD, lm_head_VD(cfg, params), batch.targets,
                                         batch.weights, chunk=cfg.loss_chunk,
                                         dtype=jnp.dtype(cfg.dtype))
  if moe_cfg is None:
    return total, weight
  return router_loss_sums(moe_cfg, state["intermediates"], total, weight)


def token_logps(apply_fn, params, batch: Batch, rng=None, deterministic=True):
  """log p(target) of a decoder at every position of the batch, [B, T] fp32 (DPO sums them per
  sequence); the LM head applied chunk by chunk when the decoder's cfg.loss_chunk asks for it."""
  cfg = _chunked_loss_cfg(apply_fn)
  if cfg is None:
    logits_BTV = model_outputs(apply_fn, params, batch, rng, deterministic)
    return -_ce(logits_BTV, batch.targets)
  hidden_BTD = _final_hidden(apply_fn, params, batch, rng, deterministic)
  return chunked_token_logps(hidden_BTD, lm_head_VD(cfg, params), batch.targets,
                             chunk=cfg.loss_chunk, dtype=jnp.dtype(cfg.dtype))


def for_head(head: str):
  """The `forward_sums` that trains a model with this head."""
  if head in ("lm", "mlm"):
    return token_sums

  def task_sums(apply_fn, params, batch, rng, deterministic):
    outputs = model_outputs(apply_fn, params, batch, rng, deterministic)
    return task_loss_sums(head, outputs, batch)

  return task_sums
