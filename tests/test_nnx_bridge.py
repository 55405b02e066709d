"""Tests the README's research-use example: a jaxlm Transformer as a Flax NNX module through
flax.nnx.bridge.ToNNX, trained by nnx.Optimizer as the linen model is by optax, and given
parameters converted from Hugging Face. The README's two code blocks run here as written."""

import os
import re

import flax.linen as nn
import jax
import numpy as np
import optax
import torch
import transformers
from flax import nnx
from hf_testing import random_hf_model

from jaxlm.models import transformer

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
STEP = "loss = train_step(model, optimizer, tokens_BT)"


def _readme_blocks() -> list[str]:
  """The Python blocks of the README's research-use section."""
  text = open(README).read()
  section = text.split("## Research use: the model as a Flax NNX module", 1)[1].split("\n## ")[0]
  return re.findall(r"```python\n(.*?)```", section, re.DOTALL)


def _params(model) -> dict:
  """The NNX module's params as the linen param tree (copies, so later steps leave them)."""
  return jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_the_nnx_module_trains_a_step_exactly_as_the_linen_model_with_optax():
  train, _ = _readme_blocks()
  assert STEP in train
  ns = {}
  exec(train.split(STEP)[0], ns)  # the README's own example
  before = _params(ns["model"])
  exec(STEP, ns)
  after = _params(ns["model"])

  cfg, tokens_BT = ns["cfg"], ns["tokens_BT"]
  linen = transformer.Transformer(cfg)
  # the same names as the linen model's own params
  assert jax.tree.structure(before) == jax.tree.structure(nn.unbox(
    jax.eval_shape(lambda: linen.init(jax.random.key(0), tokens_BT)["params"])))

  def loss_fn(params):
    logits_BTV = linen.apply({"params": params}, tokens_BT[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, tokens_BT[:, 1:]).mean()

  tx = optax.adamw(1e-3)

  @jax.jit  # as the example's step: AdamW's first update, g / (|g| + eps), magnifies rounding
  def linen_step(params):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    return loss, optax.apply_updates(params, updates)

  loss, expected = linen_step(before)

  np.testing.assert_allclose(ns["loss"], loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), after,
               expected)
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), after, before)
  assert min(jax.tree.leaves(moved)) > 1e-4  # every param took AdamW's step (lr 1e-3)


def test_hf_converted_params_go_into_an_abstract_nnx_module(tmp_path):
  train, hf_import = _readme_blocks()
  config = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=48,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=64)
  hf_model = random_hf_model(config)
  hf_model.save_pretrained(tmp_path)
  ns = {"hf_dir": str(tmp_path)}
  exec(train.split(STEP)[0], ns)  # its imports and tokens_BT
  exec(hf_import, ns)
  tokens_BT = ns["tokens_BT"]
  with torch.no_grad():
    hf_logits = hf_model(torch.tensor(np.asarray(tokens_BT))).logits.numpy()
  np.testing.assert_allclose(ns["logits_BTV"], hf_logits, atol=1e-4)
  linen_logits = ns["linen_model"].apply({"params": ns["params"]}, tokens_BT)
  np.testing.assert_allclose(ns["logits_BTV"], linen_logits, rtol=1e-6, atol=1e-6)
  # the module holds the imported arrays, not a fresh init
  np.testing.assert_array_equal(_params(ns["model"])["block_1"]["mlp"]["down"]["kernel"],
                                ns["params"]["block_1"]["mlp"]["down"]["kernel"])
