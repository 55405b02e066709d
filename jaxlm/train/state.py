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
    frozen: None for full fine-tuning; with LoRA the frozen base (bf16 or int8 leaves possible).
    lora: a jaxlm.models.lora.Lora (static) or None.
  """

  rng: jax.Array
  frozen: Any = None
  lora: Any = struct.field(pytree_node=False, default=None)

  def model_params(self, params=None):
    """The full params the model applies: `params` (default: the trainable ones) merged into the
    frozen base with LoRA, else `params` themselves. Pure: call it inside the jitted step with the
    traced params to differentiate through the merge."""
    params = self.params if params is None else params
    return params if self.lora is None else self.lora.merge(self.frozen, params)

  def reference_params(self):
    """The reference model's params (DPO): with LoRA the base with adapters switched off (no
    second copy of the weights); otherwise `frozen` (the starting weights, when a mode keeps
    them there)."""
    ref = self.frozen if self.lora is None else self.lora.base(self.frozen)
    if ref is None:
      raise ValueError("this run keeps no reference weights: TrainState.frozen is None")
    return jax.lax.stop_gradient(ref)
