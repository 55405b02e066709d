"""What a model family is for the Hugging Face import/export: a `Family` is data (its HF
architectures, parameter-name table and config mappings); jaxlm.hf.convert/io do the rest.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from jaxlm.hf.convert import Rule

# Hugging Face activation names (transformers' ACT2FN keys) -> ours (models.config.ACTIVATIONS),
# one map for every family. On export each of ours is written as the first HF name here that maps
# to it, unless the family prefers another (activation_to_hf).
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                  "relu": "relu", "silu": "silu", "swish": "silu"}


def activation_from_hf(name: str, what: str) -> str:
  """Our activation for the HF activation `name`; `what` names the HF field in the error."""
  if name not in HF_ACTIVATIONS:
    raise ValueError(f"{what} {name!r} is not supported; supported: {sorted(HF_ACTIVATIONS)}")
  return HF_ACTIVATIONS[name]


def activation_to_hf(activation: str, **preferred: str) -> str:
  """The HF name written for our `activation`: the family's `preferred` one (gelu_tanh=...),
  else the first in HF_ACTIVATIONS."""
  if activation in preferred:
    return preferred[activation]
  return next(hf for hf, ours in HF_ACTIVATIONS.items() if ours == activation)


def _build(cfg):
  from jaxlm.models.heads import build_model

  return build_model(cfg)


def decoder_dims(cfg) -> dict:
  """The axis letters of the decoder's tables: d model, h heads, k kv heads, e head dim, ..."""
  return {"d": cfg.embed_dim, "h": cfg.num_heads, "k": cfg.kv_heads, "e": cfg.head_size,
          "f": cfg.hidden_dim, "v": cfg.vocab_size}


@dataclasses.dataclass(frozen=True)
class Family:
  """Everything family-specific about converting to and from Hugging Face.

  Attributes:
    name: short name (gpt2, llama, ...).
    architectures: HF `architectures` class names read as this family; the first is written.
    model_types: HF `model_type`s read as this family (GGUF configs carry no architectures).
    rules: the parameter-name table; only rules for params the model has are used.
    config_from_hf: HF PretrainedConfig -> the jaxlm model config.
    config_to_hf: jaxlm model config -> HF PretrainedConfig.
    build_model: jaxlm model config -> flax module whose params the rules describe.
    dims: jaxlm model config -> sizes of the axis letters used in the rule patterns.
    ignored: regexes of HF tensors that carry no parameters (buffers such as masks).
    tied: HF tensors dropped on import and export when the config ties embeddings.
    optional_prefix: a prefix some checkpoints of the family omit (GPT-2's "transformer.").
    init_inputs: jaxlm model config -> example inputs for `model.init` (shapes only).
    export_config: jaxlm model config -> the config whose params the HF layout holds; params our
      model lacks (e.g. GPT-2 biases of a bias-free model) are written as zeros.
  """

  name: str
  architectures: tuple[str, ...]
  model_types: tuple[str, ...]
  rules: tuple[Rule, ...]
  config_from_hf: Callable[[Any], Any]
  config_to_hf: Callable[[Any], Any]
  build_model: Callable[[Any], Any] = _build
  dims: Callable[[Any], dict] = decoder_dims
  ignored: tuple[str, ...] = ()
  tied: tuple[str, ...] = ()
  optional_prefix: str = ""
  init_inputs: Callable[[Any], tuple] = lambda cfg: (jnp.zeros((1, 1), jnp.int32),)
  export_config: Callable[[Any], Any] = lambda cfg: cfg
