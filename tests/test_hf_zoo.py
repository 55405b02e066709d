"""The dense families beyond Llama against Hugging Face: Mistral's and Qwen's sliding windows,
Qwen3, Gemma 2, Gemma 3 and OLMo 2 as tiny random transformers models (eager attention) on
sequences longer than the window: logits, packed documents, greedy generation, the export back,
GGUF, the presets against the published configs, and the HF fields jaxlm refuses by name."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from hf_testing import random_hf_model

import jaxlm
from jaxlm import generate as gen
from jaxlm.hf import families
from jaxlm.models.config import preset
from jaxlm.models.transformer import Transformer

torch = pytest.importorskip("torch", reason="the HF parity tests build reference models in torch")
transformers = pytest.importorskip("transformers")

V, W, PAD = 97, 6, 0  # vocabulary, sliding window, padding id
_SMALL = {"vocab_size": V, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
_SLIDE_FULL = ["sliding_attention", "full_attention"]


def _configs():
  t = transformers
  return {
    "mistral": t.MistralConfig(**_SMALL, sliding_window=W),
    "qwen2-sliding": t.Qwen2Config(**_SMALL, use_sliding_window=True, sliding_window=W,
                                   max_window_layers=1),
    "qwen3": t.Qwen3Config(**_SMALL, head_dim=16, tie_word_embeddings=True),
    "qwen3-sliding": t.Qwen3Config(**_SMALL, head_dim=16, use_sliding_window=True,
                                   sliding_window=W, max_window_layers=1),
    # query_pre_attn_scalar != head_dim, final soft-capping, linear RoPE scaling of full layers
    # and a local base: every Gemma switch changes the logits
    "gemma3": t.Gemma3TextConfig(
      **_SMALL, head_dim=16, query_pre_attn_scalar=24, sliding_window=W, layer_types=_SLIDE_FULL,
      final_logit_softcapping=3.0,
      rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
                       "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}),
    "gemma2": t.Gemma2Config(**_SMALL, head_dim=16, query_pre_attn_scalar=24, sliding_window=W,
                             layer_types=_SLIDE_FULL, attn_logit_softcapping=2.0,
                             final_logit_softcapping=3.0),
    "olmo2": t.Olmo2Config(**_SMALL),
    # sparse: 4 experts, top 2, every layer sliding
    "mixtral": t.MixtralConfig(**_SMALL, sliding_window=W, num_local_experts=4,
                               num_experts_per_tok=2),
  }


def _saved(name, tmp_path, std=0.1):
  hf_model = random_hf_model(_configs()[name], std=std, attn_implementation="eager")
  src = str(tmp_path / name)
  hf_model.save_pretrained(src)
  return hf_model, src


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens))).logits.numpy()


def _jax_logits(model, params, tokens, **kwargs):
  return np.asarray(model.apply({"params": params}, jnp.asarray(tokens), **kwargs))


TOKENS = np.random.RandomState(0).randint(0, V, (2, 24))  # 4 windows long


@pytest.mark.parametrize("name", list(_configs()))
def test_logits_and_the_export_match_transformers_past_the_window(name, tmp_path):
  hf_model, src = _saved(name, tmp_path)
  ref = _hf_logits(hf_model, TOKENS)
  model, params = jaxlm.from_hf(src)
  assert families.family_for_model(model.cfg).name == name.split("-")[0]
  error = np.abs(_jax_logits(model, params, TOKENS) - ref).max()
  assert error <= 1e-4, error
  if model.cfg.sliding_window:  # the window is honoured, not just read
    wide = model.clone(cfg=model.cfg.replace(sliding_window=TOKENS.shape[1]))
    assert np.abs(_jax_logits(wide, params, TOKENS) - ref).max() > 1e-2

  out = str(tmp_path / "out")
  jaxlm.to_hf(model, params, out)  # the family inferred from the config
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
    out, attn_implementation="eager").eval()
  assert type(reloaded).__name__ == type(hf_model).__name__
  assert np.abs(_hf_logits(reloaded, TOKENS) - ref).max() <= 1e-5


@pytest.mark.parametrize("name", ["mistral", "qwen3-sliding", "gemma3", "gemma2", "olmo2"])
def test_packed_documents_match_transformers_run_on_each_alone(name, tmp_path):
  hf_model, src = _saved(name, tmp_path)
  model, params = jaxlm.from_hf(src)
  lengths = [10, 9, 5]  # the first two longer than the window
  seg = np.repeat(np.arange(1, 4), lengths)[None]
  pos = np.concatenate([np.arange(n) for n in lengths])[None]
  packed = _jax_logits(model, params, TOKENS[:1], segment_ids_BT=jnp.asarray(seg),
                       positions_BT=jnp.asarray(pos))
  start = 0
  for n in lengths:
    alone = _hf_logits(hf_model, TOKENS[:1, start:start + n])
    error = np.abs(packed[:, start:start + n] - alone).max()
    assert error <= 1e-4, (n, error)
    start += n


PROMPTS = [[11, 52, 3, 9, 44, 70, 81, 5, 17, 23], [7, 20, 33, 4]]  # 10 > W tokens, and 4


def _hf_greedy(model, prompts, n):
  """HF `generate` on the left-padded batch, greedy, no EOS."""
  model.generation_config.eos_token_id = None
  tokens_BP, lengths_B = gen.left_pad(prompts, PAD)
  mask_BP = np.arange(tokens_BP.shape[1])[None] >= (tokens_BP.shape[1] - lengths_B)[:, None]
  with torch.no_grad():
    out = model.generate(torch.tensor(tokens_BP), attention_mask=torch.tensor(mask_BP.astype(int)),
                         max_new_tokens=n, min_new_tokens=0, do_sample=False, pad_token_id=PAD,
                         eos_token_id=None)
  return out[:, tokens_BP.shape[1]:].tolist()


@pytest.mark.parametrize("name", ["mistral", "qwen3-sliding", "gemma3", "gemma2", "olmo2",
                                  "mixtral"])
def test_greedy_generation_past_the_window_matches_hf_generate(name, tmp_path):
  hf_model, src = _saved(name, tmp_path, std=0.2)
  expected = _hf_greedy(hf_model, PROMPTS, 20)  # 30 tokens in all: 5 windows
  assert len({t for row in expected for t in row}) > 6, "degenerate model: the test proves little"
  model, params = jaxlm.from_hf(src)
  assert gen.generate(model, params, PROMPTS, max_new_tokens=20, pad_id=PAD) == expected
  if model.cfg.sliding_window:
    cache = _decode_cache(model, params)
    ring = [v for k, v in cache.items() if k.endswith("ring_k")]
    assert ring and all(v.shape[1] == W for v in ring)  # sliding layers keep the window only
  if model.cfg.mixed_layers:  # a scanned stack of sliding and full layers decodes layer by layer
    scanned, stacked = jaxlm.from_hf(src, scan_layers=True)
    assert gen.generate(scanned, stacked, PROMPTS, max_new_tokens=20, pad_id=PAD) == expected


def _decode_cache(model, params) -> dict:
  """The flat cache collection after the prefill of PROMPTS, grown for 20 new tokens."""
  from flax import traverse_util

  tokens_BP, lengths_B = gen.left_pad(PROMPTS, PAD)
  cache, _, _ = gen._prefill(params, jnp.asarray(tokens_BP), jnp.asarray(lengths_B),
                             jax.random.PRNGKey(0), model=model, max_new_tokens=20,
                             sampler=gen.Sampler())
  return traverse_util.flatten_dict(cache, sep="/")


# --- GGUF: transformers reads qwen3 and gemma3 GGUF files (not olmo2's) ---

def _write_gguf(hf_model, arch: str, path: str):
  """A float32 GGUF file of `hf_model` as llama.cpp names and stores it (Gemma's norm weights
  as 1 + w)."""
  gguf = pytest.importorskip("gguf")
  cfg = hf_model.config
  w = gguf.GGUFWriter(path, arch)
  w.add_name("tiny")
  w.add_context_length(cfg.max_position_embeddings)
  w.add_block_count(cfg.num_hidden_layers)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_embedding_length(cfg.hidden_size)
  w.add_head_count(cfg.num_attention_heads)
  w.add_head_count_kv(cfg.num_key_value_heads)
  w.add_key_length(cfg.head_dim)
  w.add_value_length(cfg.head_dim)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_vocab_size(cfg.vocab_size)
  w.add_rope_freq_base(cfg.rope_parameters.get("full_attention", cfg.rope_parameters)["rope_theta"])
  if getattr(cfg, "sliding_window", None):
    w.add_sliding_window(cfg.sliding_window)
  names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), cfg.num_hidden_layers)
  for name, p in hf_model.state_dict().items():
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
      continue
    x = p.numpy().astype(np.float32)
    w.add_tensor(names.get_name(name, try_suffixes=(".weight",)),
                 x + 1 if arch == "gemma3" and name.endswith("norm.weight") else x)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_gguf_file_loads_as_transformers_loads_it(arch, tmp_path):
  t = transformers
  small = dict(_SMALL, num_attention_heads=2, num_key_value_heads=1)
  # transformers reads no head_dim from a qwen3 GGUF file (its default, 128, is Qwen3's), nor
  # Gemma 3's layer pattern (every sixth layer full): the tiny models use those values
  config = (t.Qwen3Config(**small, head_dim=128, tie_word_embeddings=False) if arch == "qwen3"
            else t.Gemma3TextConfig(**small, head_dim=16, sliding_window=W))
  hf_model = random_hf_model(config, attn_implementation="eager")
  path = str(tmp_path / "tiny.gguf")
  _write_gguf(hf_model, arch, path)
  from_gguf = t.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf",
                                                     attn_implementation="eager").eval()
  ref = _hf_logits(from_gguf, TOKENS)
  assert np.abs(_hf_logits(hf_model, TOKENS) - ref).max() <= 1e-5  # the file holds the model
  model, params = jaxlm.from_hf(path)
  assert families.family_for_model(model.cfg).name == arch
  assert np.abs(_jax_logits(model, params, TOKENS) - ref).max() <= 1e-4


# --- presets: the published configs, converted, and their parameter counts ---

_QWEN3 = dict(vocab_size=151936, head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6,
              rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
              use_sliding_window=False, hidden_act="silu", attention_bias=False)
_GEMMA3 = dict(head_dim=256, query_pre_attn_scalar=256, rms_norm_eps=1e-6,
               hidden_activation="gelu_pytorch_tanh", sliding_window_pattern=6,
               final_logit_softcapping=None, attn_logit_softcapping=None)
PUBLISHED = {  # config.json of the hub checkpoints (Gemma 3 4B: its text_config)
  "qwen3-0.6b": ("Qwen3Config", dict(
    _QWEN3, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
    num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True)),
  "qwen3-8b": ("Qwen3Config", dict(
    _QWEN3, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
    num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)),
  "gemma3-1b": ("Gemma3TextConfig", dict(
    _GEMMA3, vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
    num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=32768,
    sliding_window=512, rope_theta=1000000.0, rope_local_base_freq=10000.0)),
  "gemma3-4b": ("Gemma3TextConfig", dict(
    _GEMMA3, vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=131072,
    sliding_window=1024, rope_theta=1000000.0, rope_local_base_freq=10000.0,
    rope_scaling={"rope_type": "linear", "factor": 8.0})),
  "gemma2-2b": ("Gemma2Config", dict(
    vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
    query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=30.0,
    attn_logit_softcapping=50.0, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
    rope_theta=10000.0)),
  "olmo2-1b": ("Olmo2Config", dict(
    vocab_size=100352, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096,
    rope_theta=500000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False)),
  "mistral-7b": ("MistralConfig", dict(  # v0.1
    vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
    sliding_window=4096, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)),
}


def _resolved(cfg):
  """`cfg` with the sizes 0 derives (all kv heads, embed_dim / num_heads) written out."""
  return cfg.replace(head_dim=cfg.head_size, num_kv_heads=cfg.kv_heads)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_is_the_published_config_with_its_parameter_count(name):
  class_name, fields = PUBLISHED[name]
  hf_config = getattr(transformers, class_name)(**fields)
  cfg = preset(name)
  imported = families.family_for_hf_config(hf_config).config_from_hf(hf_config)
  assert _resolved(imported) == _resolved(cfg)
  with torch.device("meta"):  # counted without memory
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_config)
  hf_count = sum(p.numel() for p in hf_model.parameters())  # tied weights counted once
  shapes = jax.eval_shape(Transformer(cfg).init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, 8), jnp.int32))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes))) == hf_count


# --- what jaxlm does not implement is refused by name ---

def _refused():
  t = transformers
  text = dict(_SMALL, head_dim=8)
  return {
    "unknown rope_type": (lambda: t.LlamaConfig(**_SMALL, rope_parameters={
      "rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4,
      "original_max_position_embeddings": 32}), r"rope_parameters\.rope_type='yarn'"),
    "chunked attention layer": (lambda: t.Qwen3Config(
      **_SMALL, layer_types=["chunked_attention", "full_attention"]),
      r"layer_types has \['chunked_attention'\]"),
    "llama4 chunked attention": (lambda: t.Llama4TextConfig(**_SMALL), r"attention_chunk_size"),
    "deepseek mla": (lambda: t.DeepseekV3Config(**_SMALL), r"kv_lora_rank: multi-head latent"),
    "qwen3-moe dense layers": (lambda: t.Qwen3MoeConfig(**_SMALL, mlp_only_layers=[0]),
                               r"qwen3_moe mlp_only_layers=\[0\]"),
    "vision tower": (lambda: t.Gemma3Config(text_config=text, vision_config=dict(
      hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2)),
      r"vision_config: a vision tower"),
    "bidirectional gemma3": (lambda: t.Gemma3TextConfig(**text, use_bidirectional_attention=True),
                             r"use_bidirectional_attention=True"),
    "scaled local rope": (lambda: t.Gemma3TextConfig(**text, rope_parameters={
      "full_attention": {"rope_type": "default", "rope_theta": 1e6},
      "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}),
      r"rope_parameters\['sliding_attention'\]\.rope_type='linear'"),
    "qwen3 attention bias": (lambda: t.Qwen3Config(**_SMALL, attention_bias=True),
                             r"qwen3 attention_bias=True"),
    "olmo2 attention bias": (lambda: t.Olmo2Config(**_SMALL, attention_bias=True),
                             r"olmo2 attention_bias=True"),
  }


@pytest.mark.parametrize("case", list(_refused()))
def test_an_hf_field_jaxlm_does_not_implement_is_refused_by_name(case, tmp_path):
  make, message = _refused()[case]
  make().save_pretrained(str(tmp_path))  # the config alone: it is refused before any weight
  with pytest.raises(ValueError, match=message) as error:
    jaxlm.from_hf(str(tmp_path))
  assert "\n" not in str(error.value)


def test_a_model_is_never_written_as_a_family_without_its_switches(tmp_path):
  tiny = dict(vocab_size=V, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=8,
              max_seq_len=64)
  gemma3 = Transformer(preset("gemma3-1b", **tiny))
  params = nn.unbox(gemma3.init(jax.random.PRNGKey(0), TOKENS)["params"])
  with pytest.raises(ValueError, match=r"cannot be written as Llama: it sets "
                                       r"norm_position='sandwich', qk_norm='head'"):
    jaxlm.to_hf(gemma3, params, str(tmp_path / "llama"), family="llama")
  mixed = preset("qwen3-0.6b", **tiny, sliding_window=4,
                 layer_types=("sliding_attention", "full_attention"), qk_norm="none")
  assert families.family_for_model(mixed).name == "qwen2"
  with pytest.raises(ValueError, match="Mistral slides every layer or none"):
    families.family_named("mistral").config_to_hf(mixed)
  with pytest.raises(ValueError, match=r"cannot be written as Llama: it sets sliding_window=4"):
    families.family_named("llama").config_to_hf(mixed.replace(layer_types=()))


def test_jaxlm_convert_both_ways_keeps_sliding_and_full_layers(tmp_path):
  """`jaxlm convert --from-hf` then `--to-hf` (the functions the CLI calls) on Gemma 3: the
  run directory's JSON config keeps the layer pattern, and the export equals the original."""
  from jaxlm import rundir
  from jaxlm.data import tokenizers as tok_lib
  from jaxlm.hf import api
  from jaxlm.train import convert

  hf_model, src = _saved("gemma3", tmp_path)
  tok_lib.char_tokenizer("abcdefghijklmnopqrstuvwxyz .,").save_pretrained(src)
  workdir, out = str(tmp_path / "run"), str(tmp_path / "out")
  convert.convert_from_hf(src, workdir)
  saved, params = rundir.load_run(workdir, 0)
  assert saved.model_cfg.layer_types == ("sliding_attention", "full_attention")
  assert saved.model_cfg == api.config_from_hf(src)
  jaxlm.to_hf(saved.model, params, out, tokenizer=saved.tokenizer)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
    out, attn_implementation="eager").eval()
  assert np.abs(_hf_logits(reloaded, TOKENS) - _hf_logits(hf_model, TOKENS)).max() <= 1e-5
