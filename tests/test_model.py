"""Model properties: causality, segment isolation, sliding windows, preset sizes, scan/remat
equivalence, for GPT-2, Llama, and the Gemma 3 and OLMo 2 switches (sliding and full layers
mixed, qk-norm, sandwich and res_post norms, soft-capping)."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.models.config import ModelConfig, preset
from jaxlm.models.transformer import Transformer

TINY = {
  "gpt2": dict(vocab_size=61, num_layers=2, embed_dim=32, num_heads=4, max_seq_len=16),
  "llama": dict(vocab_size=61, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2,
                max_seq_len=16, norm="rmsnorm", position="rope", activation="silu",
                gated_mlp=True, use_bias=False, tie_embeddings=False, mlp_dim=48),
  # every Gemma switch; one sliding layer (window 4 < T) then a full one
  "gemma3": dict(vocab_size=61, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2,
                 head_dim=8, max_seq_len=16, norm="rmsnorm", norm_offset=1.0,
                 norm_position="sandwich", position="rope", activation="gelu_tanh",
                 gated_mlp=True, use_bias=False, embed_scale=True, qk_norm="head",
                 query_pre_attn_scalar=12.0, attn_logit_softcap=3.0, logit_softcap=5.0,
                 sliding_window=4, layer_types=("sliding_attention", "full_attention"),
                 rope_local_theta=100.0, mlp_dim=48),
  "olmo2": dict(vocab_size=61, num_layers=2, embed_dim=32, num_heads=4, max_seq_len=16,
                norm="rmsnorm", norm_position="res_post", qk_norm="full", position="rope",
                activation="silu", gated_mlp=True, use_bias=False, mlp_dim=48),
}
T = 12


def _init(cfg):
  model = Transformer(cfg)
  return model, nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((2, T), jnp.int32))["params"])


def _apply_from_embeddings(model, params, x_BTD, **kwargs):
  """Runs the model with the token-embedding lookup's output replaced by `x_BTD`."""

  def interceptor(next_fun, args, kw, context):
    if context.module.name == "embed" and context.method_name == "__call__":
      return x_BTD
    return next_fun(*args, **kw)

  with nn.intercept_methods(interceptor):
    return model.apply({"params": params}, jnp.zeros(x_BTD.shape[:2], jnp.int32), **kwargs)


def _dependency_BTT(model, params, **kwargs):
  """dep[b, t, s] = max |d logits[b, t] / d embedding[b, s]|."""
  x_BTD = jax.random.normal(jax.random.PRNGKey(1), (2, T, model.cfg.embed_dim))

  def row(t):
    grad = jax.grad(lambda x: _apply_from_embeddings(model, params, x, **kwargs)[:, t].sum())
    return jnp.abs(grad(x_BTD)).max(axis=-1)  # [B, S]

  return np.stack([np.asarray(row(t)) for t in range(T)], axis=1)


@pytest.mark.parametrize("family", sorted(TINY))
def test_logits_never_depend_on_later_tokens(family):
  model, params = _init(ModelConfig(**TINY[family]))
  dep = _dependency_BTT(model, params)
  future = np.triu(np.ones((T, T), bool), k=1)
  assert np.all(dep[:, future] == 0.0), "a position's logits depend on a later token"
  assert np.all(dep[:, ~future] > 0.0), "a position's logits ignore an earlier token"


@pytest.mark.parametrize("family", sorted(TINY))
def test_packed_segments_do_not_attend_to_each_other(family):
  model, params = _init(ModelConfig(**TINY[family]))
  seg = np.array([[1] * 5 + [2] * 4 + [3] * 3, [1] * 12])
  pos = np.array([list(range(5)) + list(range(4)) + list(range(3)), list(range(12))])
  dep = _dependency_BTT(model, params, segment_ids_BT=jnp.asarray(seg),
                        positions_BT=jnp.asarray(pos))
  allowed = (seg[:, :, None] == seg[:, None, :]) & np.tril(np.ones((T, T), bool))[None]
  assert np.all(dep[~allowed] == 0.0)
  assert np.all(dep[allowed] > 0.0)


@pytest.mark.parametrize("family", sorted(TINY))
def test_packed_document_matches_it_alone(family):
  """A document packed after another gives the same logits as the document on its own."""
  model, params = _init(ModelConfig(**TINY[family]))
  tokens = jax.random.randint(jax.random.PRNGKey(3), (1, T), 0, 61)
  seg = jnp.asarray([[1] * 5 + [2] * 7])
  pos = jnp.asarray([list(range(5)) + list(range(7))])
  packed = model.apply({"params": params}, tokens, segment_ids_BT=seg, positions_BT=pos)
  alone = model.apply({"params": params}, tokens[:, 5:])
  np.testing.assert_allclose(packed[:, 5:], alone, atol=1e-5)


def test_a_sliding_layer_sees_only_its_window():
  """One sliding layer of window 4: a position's logits depend on it and the 3 tokens before it,
  nothing earlier (a full layer above would see all of them again)."""
  cfg = ModelConfig(**{**TINY["llama"], "num_layers": 1, "sliding_window": 4})
  model, params = _init(cfg)
  dep = _dependency_BTT(model, params)
  t, s = np.arange(T)[:, None], np.arange(T)[None, :]
  window = (s <= t) & (s > t - 4)
  assert np.all(dep[:, ~window] == 0.0) and np.all(dep[:, window] > 0.0)


EXPECTED_PARAMS = {
  "gpt2": 124_439_808,
  "gpt2-medium": 354_823_168,
  "llama2-7b": 6_738_415_616,
  "llama3-8b": 8_030_261_248,
  "mistral-7b": 7_241_732_096,
  "qwen2-0.5b": 494_032_768,
  "smollm2-135m": 134_515_008,
}


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_preset_parameter_counts_without_allocating(name):
  model = Transformer(preset(name))
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes)))
  assert n == EXPECTED_PARAMS[name]
  # the count from the config alone (norms and biases left out) that sizes the CPU device split
  assert 0.99 * n <= preset(name).weight_count() <= n


@pytest.mark.parametrize("family", sorted(TINY))
def test_scan_and_remat_give_the_same_logits_and_grads(family):
  cfg = ModelConfig(**TINY[family])
  model, params = _init(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(4), (2, T), 0, 61)
  stacked = {k: v for k, v in params.items() if not k.startswith("block_")}
  stacked["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs),
                                   *[params[f"block_{i}"] for i in range(cfg.num_layers)])

  def loss(m, p):
    return m.apply({"params": p}, tokens).mean()

  ref_loss, ref_grads = jax.value_and_grad(lambda p: loss(model, p))(params)
  for variant in (dict(scan_layers=True), dict(scan_layers=True, remat="full"),
                  dict(remat="dots"), dict(remat="attention")):
    m = Transformer(cfg.replace(**variant))
    p = stacked if variant.get("scan_layers") else params
    val, grads = jax.value_and_grad(lambda q: loss(m, q))(p)
    np.testing.assert_allclose(val, ref_loss, rtol=1e-6, err_msg=str(variant))
    if variant.get("scan_layers"):
      np.testing.assert_allclose(grads["blocks"]["mlp"]["up"]["kernel"][1],
                                 ref_grads["block_1"]["mlp"]["up"]["kernel"], atol=1e-6)
    else:
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, ref_grads)


def test_dropout_is_active_only_when_not_deterministic():
  cfg = ModelConfig(**TINY["gpt2"], dropout=0.5)
  model, params = _init(cfg)
  tokens = jnp.ones((2, T), jnp.int32)
  a = model.apply({"params": params}, tokens)
  b = model.apply({"params": params}, tokens)
  c = model.apply({"params": params}, tokens, deterministic=False,
                  rngs={"dropout": jax.random.PRNGKey(0)})
  np.testing.assert_array_equal(a, b)
  assert np.abs(np.asarray(a - c)).max() > 1e-3


def test_arguments_after_the_tokens_are_keyword_only():
  # EncoderModel's second argument is a padding mask, the Transformer's was segment ids: neither
  # may be passed positionally, so one cannot be mistaken for the other
  model, params = _init(ModelConfig(**TINY["gpt2"]))
  tokens = jnp.ones((2, T), jnp.int32)
  with pytest.raises(TypeError, match="positional argument"):
    model.apply({"params": params}, tokens, jnp.ones((2, T), jnp.int32))


def test_bad_model_config_names_the_key_and_choices():
  with pytest.raises(ValueError, match=r"model.norm='batchnorm' is not one of"):
    ModelConfig(norm="batchnorm")
  with pytest.raises(ValueError, match="num_heads=6 must be a multiple of model.num_kv_heads=4"):
    ModelConfig(embed_dim=48, num_heads=6, num_kv_heads=4)
  with pytest.raises(ValueError, match="unknown model preset 'gpt5'"):
    preset("gpt5")


@pytest.mark.parametrize("fields, message", [
  (dict(layer_types=("chunked_attention",)), r"layer_types has 'chunked_attention', not one of"),
  (dict(layer_types=("sliding_attention",)), r"sliding_window=0 .* need a window size > 0"),
  (dict(rope_type="linear"), r"rope_type='linear' with rope_scaling_factor=0.0"),
  (dict(rope_scaling_factor=8.0), r"rope_type='default' with rope_scaling_factor=8.0"),
  (dict(logit_softcap=30.0, loss_chunk=128), r"loss_chunk's fused LM head does not apply"),
  (dict(qk_norm="layer"), r"model.qk_norm='layer' is not one of"),
  (dict(norm_offset=1.0), r"norm_offset=1.0 scales RMSNorm only"),
  (dict(first_attn_norm=False, norm_position="post"), r"first_attn_norm=False drops a norm"),
  (dict(first_attn_norm=False, scan_layers=True), r"scan_layers=True cannot scan a first block"),
  (dict(classifier_pooling="max"), r"model.classifier_pooling='max' is not one of"),
])
def test_bad_family_switches_name_the_field(fields, message):
  with pytest.raises(ValueError, match=message):
    ModelConfig(**fields)


def test_layer_types_are_kept_as_their_shortest_pattern_and_survive_json():
  per_layer = ["sliding_attention"] * 5 + ["full_attention"]
  cfg = preset("gemma3-1b", layer_types=per_layer * 4 + per_layer[:2])  # HF's list of 26
  assert cfg == preset("gemma3-1b") and cfg.layer_types == tuple(per_layer)
  assert cfg.local_layers[:7] == (True,) * 5 + (False, True) and sum(cfg.local_layers) == 22
  assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # lists -> tuples
  hash(ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))))  # jit keys need it
  every = dict(sliding_window=4, num_layers=3)  # () when every layer is what () means
  assert ModelConfig(**every, layer_types=["sliding_attention"] * 3).layer_types == ()
  assert ModelConfig(**every).local_layers == (True,) * 3  # Mistral
  assert not any(ModelConfig(num_layers=3).local_layers)
  old = {k: v for k, v in preset("llama2-7b", rope_type="llama3", rope_scaling_factor=8.0)
         .to_dict().items() if k != "rope_type"}  # saved before rope_type existed
  assert ModelConfig.from_dict(old).rope_type == "llama3"


@pytest.mark.parametrize("given, name", [
  (jnp.bfloat16, "bfloat16"), (np.float32, "float32"), (np.dtype("float16"), "float16"),
  (jnp.dtype("bfloat16"), "bfloat16"), ("bfloat16", "bfloat16"),
])
def test_dtypes_are_accepted_as_jax_users_pass_them_and_stored_by_name(given, name):
  cfg = ModelConfig(**TINY["gpt2"], dtype=given, param_dtype=given)
  assert cfg.dtype == cfg.param_dtype == name
  assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
  assert cfg.replace(dtype=jnp.float32).dtype == "float32"
  _, params = _init(cfg)
  assert params["embed"]["embedding"].dtype == jnp.dtype(name)


def test_unknown_dtype_names_the_field_and_choices():
  with pytest.raises(ValueError, match=r"model.param_dtype=<class 'numpy.int32'> is not one of"):
    ModelConfig(param_dtype=np.int32)
  with pytest.raises(ValueError, match=r"model.dtype='fp8' is not one of \('float32'"):
    ModelConfig(dtype="fp8")
