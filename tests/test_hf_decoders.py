"""Hugging Face import/export of decoders: logits parity with transformers on tiny random models
of every family, round trips through `to_hf`, the errors users can hit, and real SmolLM2 weights.
"""

import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_testing import random_hf_model

import jaxlm
from jaxlm.data import tokenizers as tok_lib
from jaxlm.hf import api, convert, families
from jaxlm.models.config import ACTIVATIONS, preset

V = 97
_SMALL = {"vocab_size": V, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
          "num_attention_heads": 4, "max_position_embeddings": 64}
_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16}


def _configs():
  t = transformers
  return {
    "gpt2-tied": t.GPT2Config(vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4),
    "gpt2-untied": t.GPT2Config(vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                tie_word_embeddings=False, activation_function="gelu"),
    "llama2-mha-tied": t.LlamaConfig(**_SMALL, tie_word_embeddings=True, rms_norm_eps=1e-5),
    "llama3-gqa-scaled": t.LlamaConfig(**_SMALL, num_key_value_heads=2,
                                       rope_parameters=_LLAMA3_ROPE),
    "mistral-gqa": t.MistralConfig(**_SMALL, num_key_value_heads=1, sliding_window=None,
                                   rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    "qwen2-qkv-bias": t.Qwen2Config(**_SMALL, num_key_value_heads=2, tie_word_embeddings=True),
  }


def _random_hf_model(config, seed=0):
  return random_hf_model(config, seed, std=0.1)


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


def _jax_logits(model, params, tokens):
  return np.asarray(model.apply({"params": params}, jnp.asarray(tokens)))


TOKENS = np.random.RandomState(0).randint(0, V, (2, 24))


@pytest.mark.parametrize("name", list(_configs()))
def test_import_and_export_match_transformers(name, tmp_path):
  hf_model = _random_hf_model(_configs()[name])
  src = str(tmp_path / "src")
  # one family saved sharded, to read the index JSON
  hf_model.save_pretrained(src, max_shard_size="40KB" if name == "llama3-gqa-scaled" else "1GB")
  ref = _hf_logits(hf_model, TOKENS[:, :16] if name.startswith("gpt2") else TOKENS)
  toks = TOKENS[:, : ref.shape[1]]

  model, params = jaxlm.from_hf(src)
  assert np.abs(_jax_logits(model, params, toks) - ref).max() <= 1e-4

  out = str(tmp_path / "out")
  # the family is inferred from the config (GPT-2, Qwen2, else Llama); Mistral is asked for
  family = "mistral" if name.startswith("mistral") else None
  jaxlm.to_hf(model, params, out, family=family, max_shard_size="20KB")
  assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(reloaded).__name__ == type(hf_model).__name__
  assert np.abs(_hf_logits(reloaded, toks) - ref).max() <= 1e-5


def test_config_fields_map_both_ways():
  cfg = api.model_config_from_hf(api.families.family_named("llama"),
                                 _configs()["llama3-gqa-scaled"])
  assert (cfg.num_kv_heads, cfg.rope_theta, cfg.rope_scaling_factor) == (2, 500000.0, 8.0)
  assert (cfg.rope_original_max_len, cfg.tie_embeddings, cfg.max_seq_len) == (16, False, 64)
  back = api.families.family_for(cfg).config_to_hf(cfg)
  assert back.rope_parameters["rope_type"] == "llama3"
  assert back.rope_parameters["original_max_position_embeddings"] == 16
  assert (back.num_key_value_heads, back.tie_word_embeddings) == (2, False)
  qwen = api.model_config_from_hf(api.families.family_named("qwen2"), _configs()["qwen2-qkv-bias"])
  assert qwen.qkv_bias and not qwen.use_bias
  assert api.families.family_for(qwen).config_to_hf(qwen).model_type == "qwen2"


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_every_activation_maps_to_hf_and_back(activation):
  assert set(families.HF_ACTIVATIONS.values()) == set(ACTIVATIONS)
  for name in ("gpt2", "llama2-7b", "bert-base"):  # configs only: no params are made
    cfg = preset(name, activation=activation)
    family = families.family_for_model(cfg)
    assert family.config_from_hf(family.config_to_hf(cfg)).activation == activation, name


def test_scanned_layers_and_bf16_import(tmp_path):
  hf_model = _random_hf_model(_configs()["qwen2-qkv-bias"])
  hf_model.save_pretrained(str(tmp_path))
  ref = _hf_logits(hf_model, TOKENS)
  model, params = jaxlm.from_hf(str(tmp_path), scan_layers=True)
  assert params["blocks"]["attn"]["q"]["kernel"].shape == (2, 32, 4, 8)
  assert np.abs(_jax_logits(model, params, TOKENS) - ref).max() <= 1e-4
  model16, params16 = jaxlm.from_hf(str(tmp_path), dtype=jnp.bfloat16)  # as JAX users pass it
  assert params16["embed"]["embedding"].dtype == jnp.bfloat16
  assert model16.cfg.dtype == model16.cfg.param_dtype == "bfloat16"
  assert jaxlm.from_hf(str(tmp_path), dtype="bfloat16")[0].cfg == model16.cfg
  assert np.abs(_jax_logits(model16, params16, TOKENS) - ref).max() <= 0.1


def test_pytorch_bin_checkpoint_is_read(tmp_path):
  hf_model = _random_hf_model(_configs()["llama2-mha-tied"])
  hf_model.config.save_pretrained(str(tmp_path))
  torch.save(hf_model.state_dict(), str(tmp_path / "pytorch_model.bin"))
  model, params = jaxlm.from_hf(str(tmp_path))
  ref = _hf_logits(hf_model, TOKENS)
  assert np.abs(_jax_logits(model, params, TOKENS) - ref).max() <= 1e-4


def test_gpt2_names_without_the_transformer_prefix_are_read(tmp_path):
  src = _saved(tmp_path, "gpt2-untied")
  _edit_weights(src, lambda t: t.update(
    {k.removeprefix("transformer."): t.pop(k) for k in list(t)}))
  _, params = jaxlm.from_hf(src)
  assert params["block_1"]["attn"]["q"]["kernel"].shape == (32, 4, 8)


def test_bias_free_model_trained_in_jaxlm_exports_as_gpt2(tmp_path):
  import jax
  from flax.linen import unbox

  from jaxlm.models import config as model_config
  from jaxlm.models.transformer import Transformer

  cfg = model_config.preset("nanogpt-char", vocab_size=V, num_layers=2, embed_dim=32,
                            max_seq_len=32)
  model = Transformer(cfg)
  params = unbox(model.init(jax.random.PRNGKey(0), TOKENS)["params"])
  params = jax.tree.map(lambda x: x + 0.05, params)  # norm scales away from 1 too
  jaxlm.to_hf(model, params, str(tmp_path))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  toks = TOKENS[:, :16]
  assert np.abs(_hf_logits(reloaded, toks) - _jax_logits(model, params, toks)).max() <= 1e-4


def _saved(tmp_path, name="llama2-mha-tied"):
  src = str(tmp_path / "src")
  _random_hf_model(_configs()[name]).save_pretrained(src)
  return src


def _edit_weights(src, edit):
  from safetensors.numpy import load_file, save_file

  path = os.path.join(src, "model.safetensors")
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path, metadata={"format": "pt"})


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
  transformers.GPTNeoXConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1,
                             num_attention_heads=4, intermediate_size=64,
                             architectures=["GPTNeoXForCausalLM"]).save_pretrained(str(tmp_path))
  with pytest.raises(ValueError, match=r"GPTNeoXForCausalLM.*GPT2LMHeadModel.*LlamaForCausalLM"):
    jaxlm.from_hf(str(tmp_path))


def test_missing_tensor_is_named_with_its_shape(tmp_path):
  src = _saved(tmp_path)
  _edit_weights(src, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(ValueError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight "
                                       r"\(shape \(48, 32\)"):
    jaxlm.from_hf(src)


def test_extra_tensor_is_named(tmp_path):
  src = _saved(tmp_path)
  _edit_weights(src, lambda t: t.update({"model.layers.0.mystery.weight": np.zeros((3, 5), "f4")}))
  with pytest.raises(ValueError, match=r"extra tensors: model\.layers\.0\.mystery\.weight "
                                       r"\(shape \(3, 5\)\)"):
    jaxlm.from_hf(src)


def test_misshaped_tensor_is_named_with_both_shapes(tmp_path):
  src = _saved(tmp_path)
  _edit_weights(src, lambda t: t.update({"model.norm.weight": np.ones((31,), "f4")}))
  with pytest.raises(ValueError, match=r"model\.norm\.weight has shape \(31,\) but the config "
                                       r"needs \(32,\)"):
    jaxlm.from_hf(src)


def test_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
  model, params = jaxlm.from_hf(_saved(tmp_path))
  tokenizer = tok_lib.char_tokenizer("".join(chr(0x4E00 + i) for i in range(V + 10)))
  with pytest.raises(ValueError, match=rf"tokenizer has {V + 10} tokens but the model's "
                                       rf"vocabulary has {V}"):
    jaxlm.to_hf(model, params, str(tmp_path / "out"), tokenizer=tokenizer)
  fits = tok_lib.char_tokenizer("abc")
  jaxlm.to_hf(model, params, str(tmp_path / "ok"), tokenizer=fits)
  assert os.path.isfile(str(tmp_path / "ok" / "tokenizer.json"))


def test_one_tokenizer_loader_and_one_fit_check(tmp_path):
  assert not hasattr(api, "load_tokenizer")  # one loader: jaxlm.data.tokenizers
  tok_lib.char_tokenizer("abc").save_pretrained(str(tmp_path / "tok"))
  tokenizer = tok_lib.load_tokenizer(str(tmp_path / "tok"))
  assert len(tokenizer) == 3
  tok_lib.check_fits(tokenizer, 3)
  with pytest.raises(ValueError, match=r"the tokenizer has 3 tokens but the model's vocabulary has "
                                       r"2: .* model.vocab_size=0"):
    tok_lib.check_fits(tokenizer, 2)
  for bad in (tmp_path / "missing.gguf", tmp_path / "tok" / "tokenizer.json"):
    with pytest.raises(ValueError, match=rf"cannot load tokenizer from '{bad}'"):
      tok_lib.load_tokenizer(str(bad))


def test_axis_patterns_invert():
  x = np.arange(2 * 3 * 4 * 5).reshape(4, 30)
  dims = {"d": 4, "h": 2, "e": 5}
  rule = convert.Rule("q", "c_attn", "d (3 h e) -> 3 d h e", part=1)
  parts = [convert.rearrange(x, rule.pattern, dims)[i] for i in range(3)]
  assert parts[1].shape == (4, 2, 5) and np.array_equal(convert.import_tensor(rule, x, dims),
                                                        parts[1])
  assert np.array_equal(convert.export_tensor(rule, parts, dims), x)


# --- real weights: SmolLM2-135M-Instruct (GGUF Q4_1, dequantised by transformers) ---

def test_smollm2_gguf_logits_match_transformers(smollm2):
  model, params, hf_model, tokenizer = smollm2
  assert model.cfg.num_layers == 30 and model.cfg.kv_heads == 3 and model.cfg.tie_embeddings
  text = ("The tower is 324 metres tall, about the same height as an 81-storey building, and "
          "the tallest structure in Paris. Its base is square, measuring 125 metres on each side.")
  ids = np.asarray([tokenizer(text)["input_ids"]])
  assert ids.shape[1] > 30
  diff = np.abs(_jax_logits(model, params, ids) - _hf_logits(hf_model, ids)).max()
  assert diff <= 1e-3, diff
