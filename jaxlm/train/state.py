"""TrainState: params, optimizer state, step and the dropout RNG, as one donated pytree."""

import jax
from flax.training import train_state


class TrainState(train_state.TrainState):
  """flax's TrainState plus the RNG key that dropout draws from (split every step)."""

  rng: jax.Array
