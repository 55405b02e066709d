"""Objectives: what a step minimises, as `forward_sums(apply_fn, params, batch, rng,
deterministic) -> (loss sum, weight sum)`, summed so micro-batches combine. The model's head
picks it: token cross entropy for `lm` (next token: pretraining, SFT) and `mlm` (masked tokens),
the task loss for classification, regression, token classification and QA.
"""

import jax.numpy as jnp
import optax

from jaxlm.data.batch import Batch


def lm_loss_sums(logits_BTV, targets_BT, weights_BT=None):
  """Returns (sum of weighted token losses, sum of weights) in fp32."""
  losses_BT = optax.softmax_cross_entropy_with_integer_labels(
    logits_BTV.astype(jnp.float32), targets_BT
  )
  if weights_BT is None:
    return losses_BT.sum(), jnp.asarray(losses_BT.size, jnp.float32)
  weights_BT = weights_BT.astype(jnp.float32)
  return (losses_BT * weights_BT).sum(), weights_BT.sum()


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


def model_outputs(apply_fn, params, batch: Batch, rng=None, deterministic=True):
  """The model's outputs for `batch`: LM logits, or an encoder head's outputs (the task fields
  token_types, padding_mask and cls_index are passed when the batch has them)."""
  task_fields = {}
  if batch.padding_mask is not None:
    task_fields = dict(padding_mask_BT=batch.padding_mask, token_types_BT=batch.token_types,
                       cls_index_N=batch.cls_index)
  return apply_fn(
    {"params": params}, batch.inputs, segment_ids_BT=batch.segment_ids,
    positions_BT=batch.positions, deterministic=deterministic,
    rngs=None if deterministic else {"dropout": rng}, **task_fields,
  )


def token_sums(apply_fn, params, batch: Batch, rng, deterministic):
  """Cross entropy at the batch's targets (next tokens, or the tokens under MLM masks)."""
  logits_BTV = model_outputs(apply_fn, params, batch, rng, deterministic)
  return lm_loss_sums(logits_BTV, batch.targets, batch.weights)


def for_head(head: str):
  """The `forward_sums` that trains a model with this head."""
  if head in ("lm", "mlm"):
    return token_sums

  def task_sums(apply_fn, params, batch, rng, deterministic):
    outputs = model_outputs(apply_fn, params, batch, rng, deterministic)
    return task_loss_sums(head, outputs, batch)

  return task_sums
