"""Tests jaxlm/hf/adapters.py: LoRA adapters travel both ways between jaxlm and PEFT on tiny
random Llama and GPT-2 models (GPT-2's fused c_attn included): a jaxlm adapter loaded by
`peft.PeftModel` gives jaxlm's logits, a PEFT-made adapter imported into jaxlm gives PEFT's, and
an adapter made for another base is a one-line error."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from hf_testing import random_hf_model

import jaxlm
from jaxlm.config import base_config
from jaxlm.hf import adapters
from jaxlm.models import lora as lora_lib

V = 97
TOKENS = np.random.RandomState(0).randint(0, V, (2, 12))
FAMILIES = {
  "llama": {
    "config": lambda: transformers.LlamaConfig(
      vocab_size=V,
      hidden_size=32,
      intermediate_size=48,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      max_position_embeddings=64,
    ),
    "modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "scan": True,
    "rslora": False,
  },
  "gpt2": {
    "config": lambda: transformers.GPT2Config(
      vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4
    ),
    "modules": ["c_attn", "c_proj", "c_fc"],
    "scan": False,
    "rslora": True,
  },
}


def _hf_logits(model):
  with torch.no_grad():
    return model(torch.tensor(TOKENS)).logits.numpy()


def _lora(model, **settings):
  c = base_config().lora
  c.update({"rank": 4, "alpha": 8.0, "targets": "all", **settings})
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), "int32")))[
    "params"
  ]
  return lora_lib.build(c, boxed, num_layers=model.cfg.num_layers), boxed


def _jax_logits(model, lora, params, trainable):
  @jax.jit
  def logits(params, trainable):
    merged = lora.merge(lora.freeze(params), trainable)
    return model.apply({"params": merged}, jnp.asarray(TOKENS))

  return np.asarray(logits(params, trainable))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_adapters_travel_both_ways_between_jaxlm_and_peft(family, tmp_path):
  spec = FAMILIES[family]
  src = str(tmp_path / f"tiny-{family}")
  random_hf_model(spec["config"]()).save_pretrained(src)
  model, params = jaxlm.from_hf(src, scan_layers=spec["scan"])

  # jaxlm -> PEFT: random non-zero adapters, exported, loaded by peft alone
  lora, boxed = _lora(model, rslora=spec["rslora"])
  trainable = nn.unbox(lora.init(jax.random.PRNGKey(1), boxed))
  keys = iter(jax.random.split(jax.random.PRNGKey(2), 100))
  trainable = jax.tree_util.tree_map_with_path(
    lambda p, x: 0.1 * jax.random.normal(next(keys), x.shape) if p[-1].key == "lora_b" else x,
    trainable,
  )
  ours = _jax_logits(model, lora, params, trainable)
  out = str(tmp_path / "adapter")
  adapters.export_adapter(model.cfg, lora, trainable, out, base=src)
  config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  assert config["r"] == 4 and config["use_rslora"] == spec["rslora"]
  assert sorted(config["target_modules"]) == sorted(spec["modules"])
  loaded = peft.PeftModel.from_pretrained(
    transformers.AutoModelForCausalLM.from_pretrained(src), out
  ).eval()
  assert np.abs(_hf_logits(loaded) - ours).max() <= 1e-4
  assert (
    np.abs(
      _hf_logits(loaded) - _jax_logits(model, lora, params, jax.tree.map(jnp.zeros_like, trainable))
    ).max()
    > 1e-3
  ), "the adapter changes the model"
  # ... and read back into jaxlm, the same adapters (GPT-2's c_attn split from rank 3 x 4)
  again = adapters.import_adapter(out, model.cfg, lora)
  for x, y in zip(jax.tree.leaves(trainable), jax.tree.leaves(again)):
    np.testing.assert_allclose(np.asarray(x), y, atol=1e-7)

  # PEFT -> jaxlm: an adapter made by peft (random A and B), imported to continue training
  base = transformers.AutoModelForCausalLM.from_pretrained(src)
  made = peft.get_peft_model(
    base,
    peft.LoraConfig(
      r=8,
      lora_alpha=16,
      target_modules=spec["modules"][:2],
      init_lora_weights=False,
      use_rslora=spec["rslora"],
    ),
  ).eval()
  theirs = _hf_logits(made)
  peft_dir = str(tmp_path / "peft")
  made.save_pretrained(peft_dir)
  settings = adapters.adapter_settings(peft_dir, model.cfg, src)
  assert (settings["rank"], settings["alpha"]) == (8, 16.0)
  lora2, _ = _lora(model, **settings)
  imported = adapters.import_adapter(peft_dir, model.cfg, lora2)
  assert np.abs(_jax_logits(model, lora2, params, imported) - theirs).max() <= 1e-4


def test_an_adapter_for_another_base_is_a_one_line_error(tmp_path):
  spec = FAMILIES["llama"]
  src = str(tmp_path / "tiny-llama")
  random_hf_model(spec["config"]()).save_pretrained(src)
  model, _ = jaxlm.from_hf(src)
  lora, boxed = _lora(model, targets="attention")
  out = str(tmp_path / "adapter")
  adapters.export_adapter(
    model.cfg, lora, nn.unbox(lora.init(jax.random.PRNGKey(0), boxed)), out, base=src
  )
  with pytest.raises(
    ValueError,
    match=r"was made for '.*tiny-llama' but model.init_from="
    r"'/models/smollm2'; start from that base",
  ) as e:
    adapters.adapter_settings(out, model.cfg, "/models/smollm2")
  assert "\n" not in str(e.value)
  wider = model.cfg.replace(embed_dim=64, mlp_dim=96)  # same names, other shapes
  with pytest.raises(
    ValueError,
    match=r"block_0/attn/k/kernel has lora_A in=32, lora_B out=16 "
    r"but the base needs 64 and 16: it was made for a "
    r"different base model",
  ):
    adapters.import_adapter(
      out, wider, _lora(jaxlm.models.heads.build_model(wider), targets="attention")[0]
    )
  gpt2 = jaxlm.models.config.ModelConfig(
    vocab_size=V,
    num_layers=2,
    embed_dim=32,
    num_heads=4,
    norm="layernorm",
    position="learned",
    gated_mlp=False,
    activation="gelu_tanh",
    use_bias=True,
  )
  with pytest.raises(
    ValueError,
    match=r"adapts 'model.layers.0.self_attn.k_proj', which .* "
    r"\(gpt2\) does not have",
  ):
    adapters.adapter_settings(out, gpt2, src)
