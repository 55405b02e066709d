"""Pure train/eval steps and their sharded jit wrappers.

`train_step(state, batch) -> (state, metrics)` over a `Batch`, with the objective plugged in, is
jitted with in/out shardings derived from the logical axis names of `jax.eval_shape(init)`, and
the state is donated.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxlm import sharding
from jaxlm.data.batch import Batch
from jaxlm.train.state import TrainState


def _split_micro(batch: Batch, num: int) -> Batch:
  return jax.tree.map(lambda x: x.reshape(num, x.shape[0] // num, *x.shape[1:]), batch)


def train_step(state: TrainState, batch: Batch, *, objective, grad_accum: int = 1,
               dropout: bool = False):
  """One optimizer step over `batch`, accumulating gradients over `grad_accum` micro-batches.

  `objective(apply_fn, params, batch, rng, deterministic) -> (loss sum, weight sum)`
  (jaxlm.train.objectives); the gradient is that of the loss sum over the weight sum.
  """
  rng, step_rng = jax.random.split(state.rng)

  def micro_grads(params, micro, key):
    def loss_fn(p):  # with LoRA, p are the adapters and the frozen base is merged in here
      return objective(state.apply_fn, state.model_params(p), micro, key, not dropout)

    (total, weight), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return total, weight, grads

  if grad_accum == 1:
    total, weight, grads = micro_grads(state.params, batch, step_rng)
  else:
    def body(carry, xs):
      micro, key = xs
      t, w, g = micro_grads(state.params, micro, key)
      return jax.tree.map(jnp.add, carry, (t, w, g)), None

    zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.params))
    keys = jax.random.split(step_rng, grad_accum)
    (total, weight, grads), _ = jax.lax.scan(body, zeros, (_split_micro(batch, grad_accum), keys))
  weight = jnp.maximum(weight, 1.0)
  grads = jax.tree.map(lambda g: g / weight, grads)
  new_state = state.apply_gradients(grads=grads, rng=rng)
  metrics = {"loss": total / weight, "grad_norm": optax.global_norm(grads), "tokens": weight}
  return new_state, metrics


def eval_step(params, batch: Batch, *, apply_fn, objective):
  """Summed loss and weight of one eval batch (combine across batches, then divide)."""
  total, weight = objective(apply_fn, params, batch, None, True)
  return {"loss_sum": total, "weight": weight}


def init_state(rng, model, tx, lora=None) -> TrainState:
  """A boxed TrainState (params carry logical axis names). With `lora` (jaxlm.models.lora.Lora)
  the params are the adapters (and any head trained in full), the optimizer state covers them
  alone, and `frozen` holds the base (cast or quantized as the Lora says)."""
  params_rng, dropout_rng = jax.random.split(rng)
  params = model.init(params_rng, jnp.zeros((1, 1), jnp.int32))["params"]
  if lora is None:
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx, rng=dropout_rng)
  adapters = lora.init(jax.random.fold_in(params_rng, 1), params)
  return TrainState.create(apply_fn=model.apply, params=adapters, tx=tx, rng=dropout_rng,
                           frozen=lora.freeze(params), lora=lora)


def abstract_state(model, tx, mesh, lora=None):
  """(ShapeDtypeStructs with shardings of the state, the shardings); nothing is allocated. The
  first is the target of a checkpoint restore."""
  return sharding.abstract_tree(functools.partial(init_state, model=model, tx=tx, lora=lora),
                                mesh)


def sharded_init(model, tx, rng, mesh, lora=None):
  """The state initialised directly into its shardings (no host holds the whole model).

  Returns:
    (state, state_shardings) with plain (unboxed) arrays.
  """
  _, shardings = abstract_state(model, tx, mesh, lora)
  with sharding.mesh_rules(mesh):
    state = jax.jit(lambda r: nn.unbox(init_state(r, model, tx, lora)),
                    out_shardings=shardings)(rng)
  return state, shardings


def jit_train_step(state_shardings, objective, *, grad_accum: int = 1, dropout: bool = False):
  """train_step jitted: the state in and out with its shardings (donated); the batch arrives as
  global arrays already placed on the mesh (jaxlm.sharding.global_batch)."""
  step = functools.partial(train_step, objective=objective, grad_accum=grad_accum,
                           dropout=dropout)
  return jax.jit(step, in_shardings=(state_shardings, None), out_shardings=(state_shardings, None),
                 donate_argnums=0)


def jit_eval_step(apply_fn, params_shardings, objective):
  return jax.jit(functools.partial(eval_step, apply_fn=apply_fn, objective=objective),
                 in_shardings=(params_shardings, None))
