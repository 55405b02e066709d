"""TrainState: trainable params, optimizer state, step, the dropout RNG and a frozen part, as one
donated pytree. The optimizer sees only `params`; `frozen` (a LoRA base, or a reference model's
weights) is an argument of the jitted step that `apply_gradients` never touches."""

from typing import Any

import jax
from flax import struct
from flax.training import train_state


class TrainState(train_state.TrainState):
  """flax's TrainState plus the RNG key that dropout draws from (split every step), the frozen
  params and the static transform that combines them with the trainable ones.

  Attributes:
    frozen: None for full fine-tuning; with LoRA the frozen base (bf16 leaves, and int8 or 4-bit
      qwix QArrays, possible).
    lora: a jaxlm.models.lora.Lora (static) or None.
  """

  rng: jax.Array
  frozen: Any = None
  lora: Any = struct.field(pytree_node=False, default=None)

  def apply_params(self, params=None):
    """The params tree the model applies in a train step: with LoRA the frozen base with the
    adapters beside the kernels they adapt (Lora.unmerged: never merged, so a step
    differentiates the adapters alone), else `params` themselves (default: the trainable ones).
    Pure: call it inside the jitted step with the traced params."""
    params = self.params if params is None else params
    return params if self.lora is None else self.lora.unmerged(self.frozen, params)

  def model_params(self, params=None):
    """The whole model's params, merged with LoRA (W + scale A B, the base dequantized): for
    evaluation, sampling and export, not for a train step (apply_params)."""
    params = self.params if params is None else params
    return params if self.lora is None else self.lora.merge(self.frozen, params)

  def apply_reference(self):
    """The reference model (DPO) as a train step applies it: with LoRA the base with the
    adapters off, its kernels left frozen (and quantized) for the layers; otherwise `frozen`."""
    ref = self.frozen if self.lora is None else self.lora.unmerged(self.frozen)
    return self._checked_reference(ref)

  def reference_params(self):
    """The reference model's params as a whole-model tree (evaluation): with LoRA the base with
    adapters switched off, dequantized; otherwise `frozen` (the starting weights, when a mode
    keeps them there)."""
    ref = self.frozen if self.lora is None else self.lora.base(self.frozen)
    return self._checked_reference(ref)

  @staticmethod
  def _checked_reference(ref):
    if ref is None:
      raise ValueError("this run keeps no reference weights: TrainState.frozen is None")
    return jax.lax.stop_gradient(ref)
