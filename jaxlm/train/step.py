"""Pure train/eval steps and their sharded jit wrappers.

`train_step(state, batch) -> (state, metrics)` is jitted with in/out shardings derived from the
logical axis names of `jax.eval_shape(init)`, and the state is donated.
"""

import functools

import jax
import jax.numpy as jnp
import flax.linen as nn
import optax

from jaxlm import sharding
from jaxlm.train import objectives
from jaxlm.train.state import TrainState



def _forward_sums(apply_fn, params, batch, rng, deterministic):
  """(loss sum, weight sum) of one (micro-)batch."""
  logits = apply_fn(
    {"params": params},
    batch["inputs"],
    segment_ids_BT=batch.get("segment_ids"),
    positions_BT=batch.get("positions"),
    deterministic=deterministic,
    rngs=None if deterministic else {"dropout": rng},
  )
  return objectives.lm_loss_sums(logits, batch["targets"], batch.get("weights"))


def _split_micro(batch, num: int):
  return jax.tree.map(lambda x: x.reshape(num, x.shape[0] // num, *x.shape[1:]), batch)


def train_step(state: TrainState, batch, *, grad_accum: int = 1, dropout: bool = False,
               forward_sums=None):
  """One optimizer step over `batch`, accumulating gradients over `grad_accum` micro-batches.

  `forward_sums(apply_fn, params, batch, rng, deterministic) -> (loss sum, weight sum)` is the
  objective: next-token LM by default, a task's loss for fine-tuning (jaxlm.train.objectives).
  """
  forward_sums = forward_sums or _forward_sums
  rng, step_rng = jax.random.split(state.rng)

  def micro_grads(params, micro, key):
    def loss_fn(p):
      total, weight = forward_sums(state.apply_fn, p, micro, key, not dropout)
      return total, weight

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


def eval_step(params, batch, *, apply_fn):
  """Summed loss and weight of one eval batch (combine across batches, then divide)."""
  total, weight = _forward_sums(apply_fn, params, batch, None, True)
  return {"loss_sum": total, "weight": weight}


def init_state(model, tx, rng, example_tokens) -> TrainState:
  """Builds a boxed TrainState (params carry logical axis names)."""
  params_rng, dropout_rng = jax.random.split(rng)
  params = model.init(params_rng, example_tokens)["params"]
  return TrainState.create(apply_fn=model.apply, params=params, tx=tx, rng=dropout_rng)


def abstract_state(model, tx, example_tokens, mesh):
  """ShapeDtypeStructs (with shardings) of the state, and the shardings themselves.

  The first is the target for a checkpoint restore; nothing is allocated.
  """
  init = functools.partial(init_state, model, tx, example_tokens=example_tokens)
  with sharding.mesh_rules(mesh):
    boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
    shardings = sharding.logical_sharding(boxed, mesh)
  abstract = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), sharding.strip_boxes(boxed),
    shardings,
  )
  return abstract, shardings


def sharded_init(model, tx, rng, example_tokens, mesh):
  """Initialises the state directly into its shardings: no host holds the whole model.

  Returns:
    (state, state_shardings) with plain (unboxed) arrays.
  """
  _, shardings = abstract_state(model, tx, example_tokens, mesh)
  init = functools.partial(init_state, model, tx, example_tokens=example_tokens)
  with sharding.mesh_rules(mesh):
    state = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(rng)
  return state, shardings


def jit_train_step(state_shardings, mesh, *, grad_accum: int = 1, dropout: bool = False):
  """train_step jitted over `mesh`: state in and out with its shardings (donated)."""
  step = functools.partial(train_step, grad_accum=grad_accum, dropout=dropout)
  return jax.jit(
    step,
    in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
    out_shardings=(state_shardings, None),
    donate_argnums=0,
  )


def jit_eval_step(apply_fn, params_shardings, mesh):
  return jax.jit(
    functools.partial(eval_step, apply_fn=apply_fn),
    in_shardings=(params_shardings, sharding.batch_sharding(mesh)),
  )
