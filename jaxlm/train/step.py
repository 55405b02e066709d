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


def train_step(state: TrainState, batch: Batch, teacher=None, *, objective, grad_accum: int = 1,
               dropout: bool = False, reference: bool = False):
  """One optimizer step over `batch`, accumulating gradients over `grad_accum` micro-batches.

  `objective(apply_fn, params, batch, rng, deterministic) -> (loss sum, weight sum)`
  (jaxlm.train.objectives); the gradient is that of the loss sum over the weight sum. An
  objective may return `(loss sum, {"weight": weight sum, name: sum, ...})` instead: each named
  sum is then reported divided by the weight (DPO's rewards). With `reference`, the objective
  also receives the reference model's params as `reference=` (DPO: the starting weights, or with
  LoRA the base with the adapters off). A `teacher` (distillation: the frozen teacher's params,
  an argument beside the state, never in it) is passed to the objective as `teacher=`.
  """
  rng, step_rng = jax.random.split(state.rng)
  if reference:
    objective = functools.partial(objective, reference=state.apply_reference())
  if teacher is not None:
    objective = functools.partial(objective, teacher=teacher)

  def micro_grads(params, micro, key):
    def loss_fn(p):  # with LoRA, p are the adapters, applied unmerged beside the frozen base
      total, aux = objective(state.apply_fn, state.apply_params(p), micro, key, not dropout)
      return total, (aux if isinstance(aux, dict) else {"weight": aux})

    (total, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return total, aux, grads

  if grad_accum == 1:
    total, aux, grads = micro_grads(state.params, batch, step_rng)
  else:
    def body(carry, xs):
      micro, key = xs
      return jax.tree.map(jnp.add, carry, micro_grads(state.params, micro, key)), None

    micro_shapes = jax.eval_shape(micro_grads, state.params, jax.tree.map(
      lambda x: x[0], _split_micro(batch, grad_accum)), step_rng)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), micro_shapes)
    keys = jax.random.split(step_rng, grad_accum)
    (total, aux, grads), _ = jax.lax.scan(body, zeros, (_split_micro(batch, grad_accum), keys))
  weight = jnp.maximum(aux.pop("weight"), 1.0)
  # in the params' dtype: a bf16 gradient over the fp32 weight would turn the optimizer state
  # fp32 after the first step, while a checkpoint restores it as initialised (bf16): a resumed
  # run would then differ from one never stopped
  grads = jax.tree.map(lambda g: (g / weight).astype(g.dtype), grads)
  new_state = state.apply_gradients(grads=grads, rng=rng)
  metrics = {"loss": total / weight, "grad_norm": optax.global_norm(grads), "tokens": weight,
             **{k: v / weight for k, v in aux.items()}}
  return new_state, metrics


def train_steps(state: TrainState, batches: Batch, teacher=None, **step_kwargs):
  """`train_step` over a stacked batch (`[steps, rows, ...]`, one step's batch per leading
  index) in one `lax.scan`: the state after the last step and each step's metrics, stacked."""
  def one(s, batch):
    return train_step(s, batch, teacher, **step_kwargs)

  return jax.lax.scan(one, state, batches)


def eval_step(params, batch: Batch, reference=None, *, apply_fn, objective):
  """Summed loss and weight of one eval batch (combine across batches, then divide), with the
  objective's other sums when it returns them (DPO's rewards); `reference`: the reference
  model's params, for objectives that need them."""
  if reference is not None:
    objective = functools.partial(objective, reference=reference)
  total, aux = objective(apply_fn, params, batch, None, True)
  aux = dict(aux) if isinstance(aux, dict) else {"weight": aux}
  return {"loss_sum": total, **aux}


def init_state(rng, model, tx, lora=None, reference: bool = False, params=None) -> TrainState:
  """A boxed TrainState (params carry logical axis names). With `lora` (jaxlm.models.lora.Lora)
  the params are the adapters (and any head trained in full), the optimizer state covers them
  alone, and `frozen` holds the base (cast or quantized as the Lora says). Without LoRA,
  `reference` keeps a copy of the params in `frozen` (DPO's reference model; with LoRA the base
  is the reference). `params`: the model's full params to start from (imported weights), in
  place of drawn ones; LoRA's adapters are drawn all the same."""
  params_rng, dropout_rng = jax.random.split(rng)
  if params is None:
    params = model.init(params_rng, jnp.zeros((1, 1), jnp.int32))["params"]
  if lora is None:
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx, rng=dropout_rng,
                             frozen=params if reference else None)
  adapters = lora.init(jax.random.fold_in(params_rng, 1), params)
  return TrainState.create(apply_fn=model.apply, params=adapters, tx=tx, rng=dropout_rng,
                           frozen=lora.freeze(params), lora=lora)


def abstract_state(model, tx, mesh, lora=None, reference: bool = False):
  """(ShapeDtypeStructs with shardings of the state, the shardings); nothing is allocated. The
  first is the target of a checkpoint restore."""
  return sharding.abstract_tree(functools.partial(init_state, model=model, tx=tx, lora=lora,
                                                  reference=reference), mesh)


# The initialisation runs once, so on CPU XLA compiles it at its lowest optimisation level: the
# 0.8M-parameter recipe's init (53 random streams, 361 fused loops) compiles in 2.1 s, not 3.3 s.
# Its random normals then differ from an optimised compile's in the last bit (1 ulp) of some
# values; the program is deterministic either way.
_INIT_COMPILER_OPTIONS = {"cpu": {"xla_backend_optimization_level": 0}}


def sharded_init(model, tx, rng, mesh, lora=None, reference: bool = False, shardings=None,
                 params=None):
  """The state initialised directly into its shardings (no host holds the whole model).
  `shardings`: the state's, when the caller has them (abstract_state) already. `params`: the
  model's full params to start from (imported weights, best placed in their shardings already:
  params returned unchanged are then forwarded, not copied). Nothing of the model is drawn but
  LoRA's adapters, so the program is a fresh optimizer state around them, with no random stream
  per weight to compile (SmolLM2-135M's drawn init compiled in 21.7 s on a 2-core CPU).

  Returns:
    (state, state_shardings) with plain (unboxed) arrays.
  """
  if shardings is None:
    _, shardings = abstract_state(model, tx, mesh, lora, reference)
  options = _INIT_COMPILER_OPTIONS.get(mesh.devices.flat[0].platform)
  with sharding.mesh_rules(mesh):
    state = jax.jit(lambda r, p: nn.unbox(init_state(r, model, tx, lora, reference, p)),
                    out_shardings=shardings, compiler_options=options)(rng, params)
  return state, shardings


def jit_train_step(state_shardings, objective, *, grad_accum: int = 1, dropout: bool = False,
                   reference: bool = False, stacked: bool = False, teacher: bool = False):
  """train_step jitted (train_steps when `stacked`): the state in and out with its shardings
  (donated); the batch arrives as global arrays already placed on the mesh
  (jaxlm.sharding.global_batch). With `teacher`, the step takes the teacher's params third, as
  they are placed."""
  step = functools.partial(train_steps if stacked else train_step, objective=objective,
                           grad_accum=grad_accum, dropout=dropout, reference=reference)
  extra = (None,) if teacher else ()
  return jax.jit(step, in_shardings=(state_shardings, None, *extra),
                 out_shardings=(state_shardings, None), donate_argnums=0)


def jit_eval_step(apply_fn, params_shardings, objective, *, reference: bool = False):
  """eval_step jitted: the params in their shardings, the batch as global arrays. With
  `reference`, the step takes the reference model's params third, as they are placed (the state's
  frozen weights), or None when a params-only restore has none: the objective then says so."""
  in_shardings = (params_shardings, None) + ((None,) if reference else ())
  return jax.jit(functools.partial(eval_step, apply_fn=apply_fn, objective=objective),
                 in_shardings=in_shardings)
