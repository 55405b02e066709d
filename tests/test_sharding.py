"""Tests jaxlm/sharding.py: every parallelism strategy (data, FSDP, tensor, FSDP x tensor,
sequence, multi-slice, gradient accumulation, scanned and rematerialised layers) trains as one
device does, and splits what it says. (FSDP's per-device bytes from the compiled step's
memory_analysis() are checked in tests/test_plan.py, which compiles that step anyway.)"""

import math
import types

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxlm import sharding
from jaxlm.config import base_config
from jaxlm.models import heads
from jaxlm.models.config import ModelConfig
from jaxlm.models.transformer import stack_layers, unstack_layers
from jaxlm.train import objectives, optim
from jaxlm.train import step as step_lib
from jaxlm.train.state import TrainState

B, T, V = 16, 8, 64
# Llama-shaped (RoPE, SwiGLU, GQA, RMSNorm); 8 heads and an MLP of 64 divide 8 shards
TINY = {
  "vocab_size": V,
  "num_layers": 2,
  "embed_dim": 32,
  "num_heads": 8,
  "num_kv_heads": 4,
  "mlp_dim": 64,
  "max_seq_len": T,
  "norm": "rmsnorm",
  "position": "rope",
  "activation": "silu",
  "gated_mlp": True,
  "use_bias": False,
  "tie_embeddings": False,
}


def _mesh(devices=None, **sizes):
  return sharding.make_mesh(
    types.SimpleNamespace(**{"data": 1, "fsdp": 1, "tensor": 1, **sizes}), devices
  )


def _optimizer(name: str = "adamw"):
  c = base_config().optim
  c.update({"name": name, "lr": 0.1 if name == "sgd" else 3e-3, "warmup_steps": 0})
  return optim.make_optimizer(c, 100)[0]


def _batches(n: int = 3):
  """Counting rows (each token the previous plus one) from random starts: learnable in 3 steps."""
  starts = np.random.default_rng(0).integers(0, V, (n, B, 1))
  tokens = ((starts + np.arange(T + 1)) % V).astype(np.int32)
  return [{"inputs": t[:, :-1], "targets": t[:, 1:]} for t in tokens]


def _train(params, mesh, grad_accum: int = 1, **model_changes):
  """(losses, params in the unscanned layout) after 3 steps of SGD with momentum from `params`.

  SGD rather than AdamW: Adam's first steps are ~lr * sign(grad), so a gradient entry at rounding
  level (1e-9) flips its update between summation orders; that is Adam, not the strategy."""
  cfg = ModelConfig(**TINY, **model_changes)
  model, tx = heads.build_model(cfg), _optimizer("sgd")
  _, shardings = step_lib.abstract_state(model, tx, mesh)
  params = stack_layers(params, cfg.num_layers) if cfg.scan_layers else params
  state = TrainState.create(apply_fn=model.apply, params=params, tx=tx, rng=jax.random.PRNGKey(1))
  state = jax.device_put(state, shardings)
  train_fn = step_lib.jit_train_step(shardings, objectives.for_head("lm"), grad_accum=grad_accum)
  losses = []
  with sharding.mesh_rules(mesh):
    for local in _batches():
      state, metrics = train_fn(state, sharding.global_batch(local, mesh))
      losses.append(float(metrics["loss"]))
  params = jax.device_get(state.params)
  return losses, unstack_layers(params) if cfg.scan_layers else params


# Every strategy at least once, several to a mesh of 8 devices (a compile costs ~10 s on 2 cores;
# data x fsdp x tensor under AdamW is tests/test_train.py's 2x2x2 mesh test).
STRATEGIES = {
  "fsdp + scan + remat dots": ({"fsdp": 8}, {"scan_layers": True, "remat": "dots"}),
  "two slices (data) x sequence x tensor + remat attention + grad_accum": (
    {"slices": 2, "sequence": 2, "tensor": 2},
    {"remat": "attention", "grad_accum": 2},
  ),
}


def test_every_strategy_trains_as_one_device_does():
  model = heads.build_model(ModelConfig(**TINY))
  params = jax.device_get(jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, T), np.int32)))
  params = nn.unbox(params)["params"]
  ref_losses, ref_params = _train(params, _mesh(jax.devices()[:1]))
  assert ref_losses[-1] < ref_losses[0] - 0.1  # it trains
  for name, (mesh_sizes, changes) in STRATEGIES.items():
    mesh = _mesh(**mesh_sizes)
    assert math.prod(mesh.shape.values()) == 8, name
    losses, new_params = _train(params, mesh, **changes)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=name)
    diffs = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), new_params, ref_params)
    assert max(jax.tree.leaves(diffs)) <= 1e-5, (name, diffs)


def test_strategies_split_what_they_say():
  cfg = ModelConfig(**TINY)
  model = heads.build_model(cfg)
  tx = _optimizer()

  def shard(path, **sizes):
    """(shape of one device's shard of params[path], of its AdamW first moment)."""
    abstract, _ = step_lib.abstract_state(model, tx, _mesh(**sizes))
    leaves = [abstract.params, abstract.opt_state[1][0].mu]
    for key in path.split("/"):
      leaves = [leaf[key] for leaf in leaves]
    return tuple(leaf.sharding.shard_shape(leaf.shape) for leaf in leaves)

  D, F, H, E = 32, 64, 8, 4
  up, down, q = "block_0/mlp/up/kernel", "block_0/mlp/down/kernel", "block_0/attn/q/kernel"
  assert shard(up, data=8) == ((D, F),) * 2  # replicated
  assert shard(up, fsdp=8) == ((D // 8, F),) * 2  # params and optimizer state split alike
  assert shard(up, fsdp=4, tensor=2) == ((D // 4, F // 2),) * 2  # column split
  assert shard(down, fsdp=4, tensor=2) == ((F // 2, D // 4),) * 2  # row split
  assert shard(q, tensor=8) == ((D, H // 8, E),) * 2  # heads split
  # the residual stream at block boundaries: rows over (data, fsdp), its length over sequence
  with nn.logical_axis_rules(sharding.LOGICAL_RULES):
    residual = nn.logical_to_mesh_axes(("batch", "length", "embed"))
  assert residual == jax.sharding.PartitionSpec(("data", "fsdp", "expert"), "sequence", None)
  # sequence parallelism keeps no replica of the weights: they are split over it too
  assert shard(up, fsdp=2, sequence=4) == ((D // 8, F),) * 2


def test_two_slices_put_the_data_axis_across_the_slices():
  mesh = _mesh(slices=2, data=-1, fsdp=2)
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "expert": 1, "sequence": 1, "tensor": 1}
  ids = np.vectorize(lambda d: d.id)(mesh.devices)[:, :, 0, 0, 0]
  # the first half of the data axis is slice 0 (devices 0-3), the second slice 1 (4-7)
  assert set(ids[:2].ravel()) == {0, 1, 2, 3} and set(ids[2:].ravel()) == {4, 5, 6, 7}


def test_mesh_errors_name_the_sizes_and_the_fix():
  with pytest.raises(ValueError, match=r"needs 16 devices but 8 are present; set one of"):
    _mesh(data=2, fsdp=8)
  with pytest.raises(ValueError, match=r"mesh.slices=3 does not divide the 8 devices"):
    _mesh(slices=3)
