"""Tests jaxlm/models/moe.py and the MoE families: tiny random Mixtral and Qwen3-MoE transformers
models (4 experts, top 2) give the same logits and load-balancing loss, and come back through the
export; the grouped matmul's FLOPs scale with the active experts; a sharded data x fsdp x expert
run trains as one device does; the presets count HF's parameters; LoRA refuses the experts."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_testing import random_hf_model

import jaxlm
from jaxlm import devices, plan, sharding
from jaxlm.config import base_config
from jaxlm.hf import families
from jaxlm.models import heads, moe
from jaxlm.models import lora as lora_lib
from jaxlm.models.config import ModelConfig, preset
from jaxlm.models.transformer import stack_layers
from jaxlm.train import objectives, optim
from jaxlm.train import step as step_lib
from jaxlm.train.state import TrainState

torch = pytest.importorskip("torch", reason="the HF parity tests build reference models in torch")
transformers = pytest.importorskip("transformers")

V, T = 128, 16
_SMALL = {"vocab_size": V, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
          "num_experts_per_tok": 2}
TOKENS = np.random.RandomState(0).randint(0, V, (2, T))


def _hf_config(name):
  if name == "mixtral":
    return transformers.MixtralConfig(**_SMALL, num_local_experts=4)
  # norm_topk_prob=False: the top-k weights as the softmax gives them (Mixtral renormalises)
  return transformers.Qwen3MoeConfig(**_SMALL, head_dim=16, num_experts=4,
                                     moe_intermediate_size=24, norm_topk_prob=False)


def _hf_outputs(model, tokens):
  """HF's logits, aux loss (load balancing), training loss (next-token cross entropy +
  router_aux_loss_coef * aux loss) and the z-loss of its router logits (the mean over layers and
  tokens of logsumexp^2)."""
  with torch.no_grad():
    out = model(torch.tensor(tokens), labels=torch.tensor(tokens), output_router_logits=True)
  lse = torch.logsumexp(torch.cat(out.router_logits).double(), dim=-1)
  return out.logits.numpy(), float(out.aux_loss), float(out.loss), float((lse**2).mean())


def _batch(tokens):
  """The LM batch of HF's labels=tokens: targets shifted, the last position weighted 0."""
  weights = np.ones(tokens.shape, np.float32)
  weights[:, -1] = 0
  return types.SimpleNamespace(inputs=tokens, targets=np.roll(tokens, -1, axis=1),
                               weights=weights, segment_ids=None, positions=None,
                               padding_mask=None)


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe"])
def imported(request, tmp_path_factory):
  """(name, HF model, its logits and aux loss, jaxlm model, params, its logits and stats)."""
  name = request.param
  hf_model = random_hf_model(_hf_config(name), attn_implementation="eager")
  src = str(tmp_path_factory.mktemp(name))
  hf_model.save_pretrained(src)
  ref_logits, ref_aux, ref_loss, ref_z = _hf_outputs(hf_model, TOKENS)
  model, params = jaxlm.from_hf(src)
  z_model = model.clone(cfg=model.cfg.replace(router_z_loss_coef=0.01))

  @jax.jit
  def forward(p):  # one compile: the logits and router statistics, and the LM objective's sums
    logits, state = model.apply({"params": p}, TOKENS, mutable=["intermediates"])
    return logits, state, objectives.token_sums(z_model.apply, p, _batch(TOKENS), None, True)

  logits, state, (total, sums) = forward(params)
  return types.SimpleNamespace(name=name, hf_model=hf_model, ref_logits=ref_logits,
                               ref_aux=ref_aux, ref_loss=ref_loss, ref_z=ref_z, model=model,
                               params=params, logits=np.asarray(logits),
                               stats=moe.collect_stats(state["intermediates"]),
                               total=float(total), sums=jax.device_get(sums))


def test_logits_and_load_balancing_loss_match_transformers(imported):
  r = imported
  assert families.family_for_model(r.model.cfg).name == r.name
  assert r.model.cfg.num_experts == 4 and r.model.cfg.experts_per_token == 2
  assert r.model.cfg.norm_topk_prob == (r.name == "mixtral")
  error = np.abs(r.logits - r.ref_logits).max()
  assert error <= 1e-4, error
  aux = float(moe.load_balancing_loss(r.stats))
  assert abs(aux - r.ref_aux) <= 1e-5, (aux, r.ref_aux)
  assert r.stats["tokens"].shape == (2, 4) and np.all(r.stats["tokens"].sum(-1) == 2 * T * 2)
  if r.name == "mixtral":
    return
  # the routing matters: renormalising the top-k weights (Qwen3-MoE's off) changes the logits
  flipped = r.model.clone(cfg=r.model.cfg.replace(norm_topk_prob=not r.model.cfg.norm_topk_prob))
  other = np.asarray(jax.jit(flipped.apply)({"params": r.params}, TOKENS))
  assert np.abs(other - r.ref_logits).max() > 1e-3


def test_the_training_loss_adds_the_router_losses_as_transformers_does(imported):
  """The LM objective's loss is HF's `loss` with labels (cross entropy + router_aux_loss_coef *
  aux loss), plus router_z_loss_coef * the z-loss of HF's router logits."""
  r = imported
  assert r.model.cfg.router_aux_loss_coef == 0.001  # read from the HF config
  weight = float(r.sums["weight"])
  assert weight == TOKENS.size - TOKENS.shape[0]
  np.testing.assert_allclose(r.total / weight, r.ref_loss + 0.01 * r.ref_z, rtol=1e-5)
  np.testing.assert_allclose(float(r.sums["moe/aux_loss"]) / weight, r.ref_aux, rtol=1e-5)
  np.testing.assert_allclose(float(r.sums["moe/z_loss"]) / weight, r.ref_z, rtol=1e-5)


def test_scanned_rematerialised_layers_sow_the_same_router_statistics(imported):
  r = imported
  if r.name != "mixtral":  # one family is enough: the stack is shared
    return
  scanned = r.model.clone(cfg=r.model.cfg.replace(scan_layers=True, remat="full"))
  params = stack_layers(r.params, r.model.cfg.num_layers)
  logits, state = jax.jit(lambda p: scanned.apply({"params": p}, TOKENS,
                                                  mutable=["intermediates"]))(params)
  stats = moe.collect_stats(state["intermediates"])
  assert np.abs(np.asarray(logits) - r.logits).max() <= 1e-5
  for key, value in r.stats.items():
    np.testing.assert_allclose(np.asarray(stats[key]), np.asarray(value), atol=1e-5, err_msg=key)


def test_the_export_loads_in_transformers_with_the_same_logits(imported, tmp_path):
  r = imported
  jaxlm.to_hf(r.model, r.params, str(tmp_path))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
    str(tmp_path), attn_implementation="eager").eval()
  assert type(reloaded).__name__ == type(r.hf_model).__name__
  logits, aux, _, _ = _hf_outputs(reloaded, TOKENS)
  assert np.abs(logits - r.ref_logits).max() <= 1e-5
  assert abs(aux - r.ref_aux) <= 1e-6


def _experts(N, X, D, F, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)
  w = [jnp.asarray(rng.normal(size=s) * 0.1, jnp.float32) for s in ((X, D, F), (X, D, F),
                                                                    (X, F, D))]
  return x, jnp.asarray(rng.normal(size=(N, X)), jnp.float32), w


def test_ragged_dot_and_expert_tiles_agree_with_a_loop_over_experts():
  N, X, D, F, C = 40, 5, 16, 24, 2
  x_ND, logits_NX, (gate, up, down) = _experts(N, X, D, F)
  weights_NC, experts_NC, _ = moe.route(logits_NX, C, True)
  x, w, g, u, d = map(np.asarray, (x_ND, weights_NC, gate, up, down))
  expected = np.zeros((N, D), np.float32)
  for n in range(N):
    for c in range(C):
      e = int(experts_NC[n, c])
      a, b = x[n] @ g[e], x[n] @ u[e]
      expected[n] += w[n, c] * ((a / (1 + np.exp(-a)) * b) @ d[e])
  both = jax.jit(lambda *args: [moe.experts_swiglu(*args, jax.nn.silu, impl=impl)
                                 for impl in ("tiled", "ragged")])
  for impl, got in zip(("tiled", "ragged"), both(x_ND, weights_NC, experts_NC, gate, up, down)):
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, err_msg=impl)


def test_grouped_matmul_flops_scale_with_the_active_experts():
  """XLA's cost analysis of the CPU path: the expert matmuls cost the routed rows (plus at most
  half as many padding rows), not every token times every expert."""
  N, X, D, F = 512, 16, 32, 64
  x_ND, logits_NX, (gate, up, down) = _experts(N, X, D, F)

  def flops(C):
    def layer(x, logits):
      weights, experts, _ = moe.route(logits, C, True)
      return moe.experts_swiglu(x, weights, experts, gate, up, down, jax.nn.silu, impl="tiled")

    return jax.jit(layer).lower(x_ND, logits_NX).cost_analysis()["flops"]

  per_row = 2 * 3 * D * F  # gate, up and down of one routed row
  dense = N * X * per_row  # every token through every expert
  for C in (1, 4):
    active = N * C * per_row
    assert active <= flops(C) <= 1.6 * active, (C, flops(C), active)
  assert flops(4) / flops(1) > 3.0 and flops(1) < dense / 8 and flops(4) < dense / 2


# --- training: router losses in the objective, and the expert mesh axis ---

TINY = dict(vocab_size=V, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, mlp_dim=48,
            max_seq_len=T, norm="rmsnorm", position="rope", activation="silu", gated_mlp=True,
            use_bias=False, tie_embeddings=False, num_experts=4, experts_per_token=2,
            router_aux_loss_coef=0.1, router_z_loss_coef=0.01)


_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _train(params, mesh, **changes):
  """(per-step metrics, params) after 3 steps of SGD from `params` on `mesh`."""
  cfg = ModelConfig(**{**TINY, **changes})
  model = heads.build_model(cfg)
  c = base_config().optim
  c.update({"name": "sgd", "lr": 0.1, "warmup_steps": 0})
  tx = optim.make_optimizer(c, 100)[0]
  _, shardings = step_lib.abstract_state(model, tx, mesh)
  state = TrainState.create(apply_fn=model.apply, params=params, tx=tx, rng=jax.random.PRNGKey(1))
  state = jax.device_put(state, shardings)
  train_fn = step_lib.jit_train_step(shardings, objectives.for_head("lm"), stacked=True)
  starts = np.random.default_rng(0).integers(0, V, (3, 8, 1))
  tokens = ((starts + np.arange(T + 1)) % V).astype(np.int32)
  batches = {"inputs": tokens[:, :, :-1], "targets": tokens[:, :, 1:]}
  with sharding.mesh_rules(mesh):
    batch = sharding.global_batch(batches, mesh, stacked=True)
    # compiled at XLA:CPU's lowest optimisation level: half the compile time of these 3 steps
    step = train_fn.lower(state, batch).compile(compiler_options=_FAST_COMPILE)
    state, metrics = step(state, batch)
  return jax.device_get(metrics), jax.device_get(state.params), shardings


def test_sharded_data_fsdp_expert_training_matches_one_device():
  # numpy params drawn from the abstract init (no init to compile); one layer keeps the compile
  # short (the per-layer stacking of the router statistics is tested above on two)
  shapes = sharding.strip_boxes(heads.param_shapes(heads.build_model(ModelConfig(**TINY))))
  shapes = {k: v for k, v in shapes.items() if k != "block_1"}
  rng = np.random.default_rng(0)
  draw = lambda path, x: (np.ones(x.shape) if path[-1].key == "scale"
                          else 0.02 * rng.normal(size=x.shape)).astype(np.float32)
  params = jax.tree_util.tree_map_with_path(draw, shapes)
  one = sharding.make_mesh(types.SimpleNamespace(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  ref, ref_params, _ = _train(params, one, num_layers=1)
  assert ref["loss"][-1] < ref["loss"][0] - 0.1  # it trains
  for key in ("moe/aux_loss", "moe/z_loss", "moe/expert_load/layer_0"):
    assert ref[key].shape == (3,) and np.all(np.isfinite(ref[key])), key
  assert np.all(ref["moe/aux_loss"] >= 1.0 - 1e-6)  # X sum f P >= 1, = 1 when balanced
  assert np.all(ref["moe/expert_load/layer_0"] >= 1.0)

  mesh = sharding.make_mesh(types.SimpleNamespace(data=2, fsdp=2, expert=2, tensor=1))
  metrics, new_params, shardings = _train(params, mesh, num_layers=1)
  gate = shardings.params["block_0"]["moe"]["gate"].spec
  assert gate[0] == "expert" and gate[1] == "fsdp", gate  # experts split, then their D
  for key in ("loss", "moe/aux_loss", "moe/z_loss"):
    np.testing.assert_allclose(metrics[key], ref[key], rtol=1e-5, err_msg=key)
  diffs = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), new_params, ref_params)
  assert max(jax.tree.leaves(diffs)) <= 1e-5, diffs


# --- presets, FLOPs, plan, LoRA ---

def _param_count(cfg) -> int:
  shapes = heads.param_shapes(heads.build_model(cfg.replace(scan_layers=True)))
  return sum(x.size for x in jax.tree.leaves(sharding.strip_boxes(shapes)))


@pytest.mark.parametrize("name", ["mixtral-8x7b", "qwen3-30b-a3b"])
def test_presets_count_the_parameters_transformers_builds(name):
  cfg = preset(name)
  hf_config = families.family_for_model(cfg).config_to_hf(cfg)
  with torch.device("meta"):
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_config)
  hf_count = sum(p.numel() for p in hf_model.parameters())
  published = {"mixtral-8x7b": 46_702_792_704, "qwen3-30b-a3b": 30_532_122_624}[name]
  assert _param_count(cfg) == hf_count == published
  assert 0.99 * published <= cfg.weight_count() <= published  # from the config alone
  # FLOPs count the active parameters: all but the X - k experts a token does not go through
  experts = sum(p.numel() for n, p in hf_model.named_parameters() if ".experts." in n)
  active = published - plan.inactive_expert_params(cfg)
  assert active == hf_count - experts + experts * cfg.experts_per_token // cfg.num_experts
  D, V_ = cfg.embed_dim, cfg.vocab_size
  matmul_weights = active - V_ * D  # the token embedding is a lookup, not a matmul
  forward = devices.model_flops_per_token(cfg, 1, training=False)
  assert abs(forward - 2 * matmul_weights) <= 4 * cfg.num_layers * cfg.num_heads * cfg.head_size


def test_lora_on_a_moe_model_adapts_the_attention_and_refuses_the_experts():
  model = heads.build_model(ModelConfig(**TINY))
  boxed = heads.param_shapes(model)
  c = base_config().lora
  c.update({"rank": 4, "targets": "attention"})
  built = lora_lib.build(c, boxed, num_layers=2)
  assert {t.path.split("/")[-2] for t in built.targets} == {"q", "k", "v", "o"}
  for targets in ("mlp", "all", r"block_\d+/moe/router/kernel"):
    c.targets = targets
    with pytest.raises(ValueError, match=r"mixture-of-experts.*lora.targets='attention'"):
      lora_lib.build(c, boxed, num_layers=2)


def test_plan_says_how_the_expert_weights_split():
  cfg = ModelConfig(**TINY)
  boxed = heads.param_shapes(heads.build_model(cfg))
  sizes = {"data": 1, "fsdp": 2, "expert": 2, "sequence": 1, "tensor": 1}
  note = plan._experts_note(cfg, boxed, sizes)
  assert "4 per layer, top 2, F=48" in note
  assert "[4, 32, 48] split ('expert', 'fsdp', None) -> [2, 16, 48] per device" in note, note
  assert plan.inactive_expert_params(cfg) == 2 * (4 - 2) * 3 * 32 * 48
