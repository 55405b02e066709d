"""Preference objectives (kind='dpo'): DPO (sigmoid), IPO and SimPO on per-sequence summed
response log-probs of the policy and the reference, and the metrics TRL's DPOTrainer logs.

Pairs arrive packed (jaxlm.data.preference): in each row, pair k is segment 2k + 1 (chosen) and
segment 2k + 2 (rejected); a token's log-prob counts towards its segment's sum where its weight
is 1 (response tokens). With model.loss_chunk the log-probs come from the LM head applied chunk by
chunk (objectives.token_logps). Shape letters: B rows, T tokens, P pair slots per row.
"""

import jax
import jax.numpy as jnp

from jaxlm.data.batch import Batch
from jaxlm.train import objectives

LOSSES = ("sigmoid", "ipo", "simpo")


def sequence_logps(logp_BT, batch: Batch):
  """Per pair slot, from the token log-probs `logp_BT` (objectives.token_logps): (chosen logp
  sums, rejected logp sums, chosen response tokens, rejected response tokens, slot holds a pair),
  each [B, P] with P = ceil(T / 2)."""
  B, T = batch.inputs.shape
  weights_BT = batch.weights.astype(jnp.float32)
  P = (T + 1) // 2
  slots = 2 * P + 1  # segment ids 0 (padding) .. 2P
  ids_BT = batch.segment_ids + slots * jnp.arange(B)[:, None]

  def per_segment(values_BT):
    sums = jax.ops.segment_sum(values_BT.reshape(-1), ids_BT.reshape(-1), B * slots)
    return sums.reshape(B, slots)

  logps_BS = per_segment(logp_BT * weights_BT)
  counts_BS = per_segment(weights_BT)
  present_BS = per_segment(jnp.ones_like(weights_BT)) > 0
  chosen, rejected = slice(1, slots, 2), slice(2, slots, 2)
  valid_BP = present_BS[:, chosen] & present_BS[:, rejected]
  return (
    logps_BS[:, chosen],
    logps_BS[:, rejected],
    counts_BS[:, chosen],
    counts_BS[:, rejected],
    valid_BP,
  )


def preference_loss(
  policy_chosen,
  policy_rejected,
  ref_chosen,
  ref_rejected,
  chosen_len,
  rejected_len,
  *,
  loss_type: str = "sigmoid",
  beta: float = 0.1,
  label_smoothing: float = 0.0,
  gamma: float = 0.5,
):
  """Per-pair losses and rewards, TRL's definitions (all arguments of one shape).

  Args:
    policy_chosen, policy_rejected, ref_chosen, ref_rejected: summed response log-probs.
    chosen_len, rejected_len: response token counts (IPO and SimPO average over them).
    loss_type: sigmoid (DPO; label_smoothing > 0 is conservative DPO), ipo (TRL's per-token
      averaged log ratios), simpo (reference-free, length-normalised, margin `gamma`).
  Returns:
    (losses, chosen rewards, rejected rewards); rewards are beta x the log ratio (DPO, IPO) or
    beta x the average log-prob (SimPO), as TRL's DPOTrainer and CPOTrainer log them.
  """
  if loss_type == "simpo":
    chosen_score = policy_chosen / jnp.maximum(chosen_len, 1.0)
    rejected_score = policy_rejected / jnp.maximum(rejected_len, 1.0)
    logits = chosen_score - rejected_score - gamma / beta
    losses = (
      -jax.nn.log_sigmoid(beta * logits) * (1 - label_smoothing)
      - jax.nn.log_sigmoid(-beta * logits) * label_smoothing
    )
    return losses, beta * chosen_score, beta * rejected_score
  chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
  if loss_type == "sigmoid":
    delta = chosen_ratio - rejected_ratio
    losses = (
      -jax.nn.log_sigmoid(beta * delta) * (1 - label_smoothing)
      - jax.nn.log_sigmoid(-beta * delta) * label_smoothing
    )
  elif loss_type == "ipo":
    delta = chosen_ratio / jnp.maximum(chosen_len, 1.0) - rejected_ratio / jnp.maximum(
      rejected_len, 1.0
    )
    losses = (delta - 1 / (2 * beta)) ** 2
  else:
    raise ValueError(f"dpo.loss={loss_type!r} is not one of {LOSSES}")
  return losses, beta * chosen_ratio, beta * rejected_ratio


def check_config(cfg) -> None:
  """Fails at start-up on a bad `dpo` section."""
  if cfg.loss not in LOSSES:
    raise ValueError(f"dpo.loss={cfg.loss!r} is not one of {LOSSES}")
  if cfg.beta <= 0:
    raise ValueError(f"dpo.beta={cfg.beta} must be > 0")
  if not 0.0 <= cfg.label_smoothing < 0.5:
    raise ValueError(f"dpo.label_smoothing={cfg.label_smoothing} must be in [0, 0.5)")


def objective(cfg):
  """The `forward_sums` of a preference run: `(apply_fn, params, batch, rng, deterministic, *,
  reference) -> (loss sum, {"weight": pairs, metric sums})`, summed over pairs so that
  micro-batches combine; the step divides every sum by the number of pairs. `reference`: the
  reference model's params (in a step TrainState.apply_reference, in evaluation
  reference_params: the starting weights, or with LoRA the base with the adapters off); SimPO
  needs none."""
  check_config(cfg)

  def sums(apply_fn, params, batch: Batch, rng, deterministic, *, reference=None):
    logp_BT = objectives.token_logps(apply_fn, params, batch, rng, deterministic)
    pc, pr, nc, nr, valid_BP = sequence_logps(logp_BT, batch)
    if cfg.loss == "simpo":  # reference-free: no second forward pass
      rc, rr = jnp.zeros_like(pc), jnp.zeros_like(pr)
    else:
      if reference is None:
        raise ValueError(
          f"dpo.loss={cfg.loss!r} needs the reference model's params, which a "
          "params-only restore lacks; use the run's own eval records"
        )
      ref = jax.lax.stop_gradient(reference)
      ref_logp_BT = objectives.token_logps(apply_fn, ref, batch, None, True)
      rc, rr, _, _, _ = jax.lax.stop_gradient(sequence_logps(ref_logp_BT, batch))
    losses, chosen_r, rejected_r = preference_loss(
      pc,
      pr,
      rc,
      rr,
      nc,
      nr,
      loss_type=cfg.loss,
      beta=cfg.beta,
      label_smoothing=cfg.label_smoothing,
      gamma=cfg.simpo_gamma,
    )
    w = valid_BP.astype(jnp.float32)
    chosen_r, rejected_r = jax.lax.stop_gradient((chosen_r, rejected_r))
    aux = {
      "weight": w.sum(),
      "rewards/chosen": (chosen_r * w).sum(),
      "rewards/rejected": (rejected_r * w).sum(),
      "rewards/margins": ((chosen_r - rejected_r) * w).sum(),
      "rewards/accuracies": ((chosen_r > rejected_r) * w).sum(),
      "logps/chosen": jax.lax.stop_gradient(pc * w).sum(),
      "logps/rejected": jax.lax.stop_gradient(pr * w).sum(),
    }
    return (losses * w).sum(), aux

  return sums
