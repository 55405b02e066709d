"""Losses, summed so micro-batches combine: token-level cross entropy for language modelling, and
the encoder tasks (classification, regression, token classification, QA, masked LM).
"""

import jax.numpy as jnp
import optax


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


def task_loss_sums(head: str, outputs, batch):
  """(sum of weighted example losses, sum of weights) of an encoder task.

  batch["weights"] is 1 for real examples and 0 for the rows that pad the last batch.
  seq_cls: cross entropy, or squared error when there is one output (regression);
  token_cls: cross entropy over labelled tokens (label -100: none); qa: the mean of the start
  and end cross entropies; mlm: cross entropy at the chosen tokens.
  """
  if head == "mlm":
    return lm_loss_sums(outputs, batch["targets"], batch["weights"])
  weights_B = batch["weights"].astype(jnp.float32)
  labels = batch["labels"]
  if head == "seq_cls" and outputs.shape[-1] == 1:
    losses_B = (outputs[:, 0] - labels.astype(jnp.float32)) ** 2
  elif head == "seq_cls":
    losses_B = _ce(outputs, labels)
  elif head == "token_cls":
    labelled_BT = (labels >= 0).astype(jnp.float32) * weights_B[:, None]
    losses_BT = _ce(outputs, jnp.maximum(labels, 0))
    return (losses_BT * labelled_BT).sum(), labelled_BT.sum()
  elif head == "qa":
    real_BT = batch["padding_mask"].astype(bool)[:, :, None]
    logits_BT2 = jnp.where(real_BT, outputs, -1e9)
    losses_B = 0.5 * (_ce(logits_BT2[..., 0], labels[:, 0]) + _ce(logits_BT2[..., 1], labels[:, 1]))
  else:
    raise ValueError(f"no task loss for model.head={head!r}")
  return (losses_B * weights_B).sum(), weights_B.sum()


def encoder_outputs(apply_fn, params, batch, rng=None, deterministic=True):
  """The encoder model's head outputs for a task batch (inputs, padding_mask, token_types; and
  segment_ids, positions, cls_index when examples are packed)."""
  return apply_fn(
    {"params": params}, batch["inputs"], padding_mask_BT=batch["padding_mask"],
    token_types_BT=batch.get("token_types"), deterministic=deterministic,
    positions_BT=batch.get("positions"), segment_ids_BT=batch.get("segment_ids"),
    cls_index_N=batch.get("cls_index"),
    rngs=None if deterministic else {"dropout": rng},
  )


def task_forward_sums(head: str):
  """A `forward_sums` for jaxlm.train.step.train_step that trains an encoder task."""

  def forward_sums(apply_fn, params, batch, rng, deterministic):
    outputs = encoder_outputs(apply_fn, params, batch, rng, deterministic)
    return task_loss_sums(head, outputs, batch)

  return forward_sums
