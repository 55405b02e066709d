"""Training: mesh equivalence, gradient accumulation, optimizer settings, overfitting."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxlm import sharding
from jaxlm.config import base_config
from jaxlm.models.config import ModelConfig
from jaxlm.models.transformer import Transformer
from jaxlm.train import objectives, optim
from jaxlm.train import step as step_lib

FAMILIES = {
  "gpt2": dict(vocab_size=64, num_layers=2, embed_dim=32, num_heads=4, max_seq_len=16),
  "llama": dict(vocab_size=64, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2,
                max_seq_len=16, norm="rmsnorm", position="rope", activation="silu",
                gated_mlp=True, use_bias=False, tie_embeddings=False, mlp_dim=64),
}


def _mesh(data, fsdp, tensor, n=None):
  devices = jax.devices()[: n or data * fsdp * tensor]
  return sharding.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor)),
                            devices)


def _batches(n, B=8, T=16, V=64):
  rng = np.random.default_rng(0)
  out = []
  for _ in range(n):
    chunk = rng.integers(0, V, (B, T + 1)).astype(np.int32)
    out.append({"inputs": chunk[:, :-1], "targets": chunk[:, 1:]})
  return out


def _train(model_cfg, mesh, batches, grad_accum=1, optim_cfg=None):
  model = Transformer(ModelConfig(**model_cfg))
  tx, _ = optim.make_optimizer(optim_cfg or base_config().optim, 1000)
  state, shardings = step_lib.sharded_init(model, tx, jax.random.PRNGKey(0), mesh)
  fn = step_lib.jit_train_step(shardings, objectives.for_head("lm"), grad_accum=grad_accum)
  losses = []
  with sharding.mesh_rules(mesh):
    for b in batches:
      state, metrics = fn(state, sharding.global_batch(b, mesh))
      losses.append(float(metrics["loss"]))
  return state, losses


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_2x2x2_mesh_matches_one_device(family):
  batches = _batches(3)
  mesh8 = _mesh(2, 2, 2)
  state8, losses8 = _train(FAMILIES[family], mesh8, batches)
  state1, losses1 = _train(FAMILIES[family], _mesh(1, 1, 1), batches)
  # the parameters really are split over the mesh
  q_sharding = state8.params["block_0"]["attn"]["q"]["kernel"].sharding
  assert q_sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  assert len(q_sharding.device_set) == 8
  np.testing.assert_allclose(losses8, losses1, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5),
               state8.params, state1.params)


def test_grad_accumulation_matches_the_full_batch():
  batches = _batches(2)
  mesh = _mesh(1, 1, 1)
  state_full, losses_full = _train(FAMILIES["gpt2"], mesh, batches)
  state_acc, losses_acc = _train(FAMILIES["gpt2"], mesh, batches, grad_accum=4)
  np.testing.assert_allclose(losses_acc, losses_full, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               state_acc.params, state_full.params)


def test_several_steps_in_one_call_match_one_step_per_call():
  """train_steps (lax.scan over a stacked batch, train.steps_per_call) = train_step, step by step:
  the same losses and the same params, on a data-parallel mesh."""
  batches, mesh = _batches(3), _mesh(2, 1, 1)
  state_one, losses_one = _train(FAMILIES["llama"], mesh, batches)
  model = Transformer(ModelConfig(**FAMILIES["llama"]))
  tx, _ = optim.make_optimizer(base_config().optim, 1000)
  state, shardings = step_lib.sharded_init(model, tx, jax.random.PRNGKey(0), mesh)
  fn = step_lib.jit_train_step(shardings, objectives.for_head("lm"), stacked=True)
  stacked = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
  with sharding.mesh_rules(mesh):
    state, metrics = fn(state, sharding.global_batch(stacked, mesh, stacked=True))
  assert metrics["loss"].shape == (3,)
  assert int(state.step) == 3
  np.testing.assert_allclose(np.asarray(metrics["loss"]), losses_one, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               state.params, state_one.params)


def test_a_bf16_models_train_state_keeps_its_dtypes_through_a_step():
  """The state a step returns has the dtypes of the one it took, as a checkpoint restores it: a
  bf16 gradient divided by the fp32 token count once made the AdamW moments fp32 after the first
  step, so a resumed bf16 run (its moments restored as bf16) left the one never stopped."""
  cfg = {**FAMILIES["llama"], "param_dtype": "bfloat16"}
  mesh = _mesh(1, 1, 1)
  model = Transformer(ModelConfig(**cfg))
  tx, _ = optim.make_optimizer(base_config().optim, 1000)
  before, _ = step_lib.abstract_state(model, tx, mesh)  # what a checkpoint restores into
  after, _ = _train(cfg, mesh, _batches(1))
  assert [x.dtype for x in jax.tree.leaves(after)] == [x.dtype for x in jax.tree.leaves(before)]
  assert {x.dtype for x in jax.tree.leaves(after.opt_state) if x.ndim} == {jnp.dtype("bfloat16")}


def test_optimizer_uses_every_config_field():
  cfg = base_config().optim
  cfg.update(dict(lr=3e-3, min_lr=3e-4, warmup_steps=10, b1=0.8, b2=0.99, eps=1e-6,
                  weight_decay=0.5, clip=0.0))
  tx, schedule = optim.make_optimizer(cfg, 100)
  assert float(schedule(0)) == 0.0
  assert float(schedule(10)) == pytest.approx(3e-3)
  assert float(schedule(100)) == pytest.approx(3e-4)
  params = {"dense": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones((3,))}}
  grads = jax.tree.map(lambda x: 0.1 * x, params)
  ref = optax.adamw(schedule, b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.5,
                    mask={"dense": {"kernel": True, "bias": False}})
  ours, theirs = params, params
  ours_state, theirs_state = tx.init(params), ref.init(params)
  for _ in range(12):  # past warmup, so the schedule, moments and decay all matter
    u, ours_state = tx.update(grads, ours_state, ours)
    ours = optax.apply_updates(ours, u)
    u, theirs_state = ref.update(grads, theirs_state, theirs)
    theirs = optax.apply_updates(theirs, u)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), ours, theirs)


def test_weight_decay_skips_biases_and_norm_scales():
  params = {"block": {"ln": {"scale": 1, "bias": 1}, "mlp": {"kernel": 1, "bias": 1}},
            "embed": {"embedding": 1}}
  mask = optim.decay_mask(params)
  assert mask == {"block": {"ln": {"scale": False, "bias": False},
                            "mlp": {"kernel": True, "bias": False}}, "embed": {"embedding": True}}


def test_clipping_bounds_the_update_norm():
  cfg = base_config().optim
  cfg.update(dict(name="sgd", lr=1.0, min_lr=1.0, warmup_steps=0, b1=0.0, clip=1.0))
  tx, _ = optim.make_optimizer(cfg, 10)
  grads = {"w": jnp.full((4,), 10.0)}
  updates, _ = tx.update(grads, tx.init(grads), grads)
  assert float(optax.global_norm(updates)) == pytest.approx(1.0, rel=1e-5)


def test_tiny_model_overfits_a_tiny_text():
  """A few hundred steps on one repeated sentence drive the loss from ln(V)~3.3 below 0.1."""
  text = "the quick brown fox jumps over the lazy dog. " * 4
  vocab = sorted(set(text))
  ids = np.array([vocab.index(c) for c in text], np.int32)
  cfg = dict(FAMILIES["gpt2"], vocab_size=len(vocab))
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(300):
    starts = rng.integers(0, len(ids) - 17, 8)
    chunk = ids[starts[:, None] + np.arange(17)]
    batches.append({"inputs": chunk[:, :-1], "targets": chunk[:, 1:]})
  optim_cfg = base_config().optim
  optim_cfg.update(dict(lr=3e-3, min_lr=3e-4, warmup_steps=20))
  _, losses = _train(cfg, _mesh(1, 1, 1), batches, optim_cfg=optim_cfg)
  assert losses[0] > 3.0
  assert np.mean(losses[-10:]) < 0.1, losses[-10:]
