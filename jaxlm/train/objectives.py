"""Losses: token-level cross entropy for language modelling, summed so micro-batches combine."""

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
