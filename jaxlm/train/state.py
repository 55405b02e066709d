"""TrainState: params, optimizer state, step, the dropout RNG and any frozen parameters, as one
donated pytree."""

from typing import Any

import jax
from flax.training import train_state


class TrainState(train_state.TrainState):
  """flax's TrainState plus the RNG key that dropout draws from (split every step) and `frozen`:
  parameters the step reads but never trains (DPO's reference model), None when there are none."""

  rng: jax.Array
  frozen: Any = None
