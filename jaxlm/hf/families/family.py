"""What a model family is for the Hugging Face import/export: a `Family` is data (its HF
architectures, parameter-name table and config mappings); jaxlm.hf.convert/io do the rest.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from jaxlm.hf.convert import Rule
from jaxlm.models.config import FULL, LAYER_TYPES, SLIDING, ModelConfig

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


# The family switches that not every family writes: a family's config_to_hf refuses a model
# that sets one it cannot write (check_writable) instead of dropping it.
SWITCHES = ("norm_position", "qk_norm", "norm_offset", "embed_scale", "query_pre_attn_scalar",
            "attn_logit_softcap", "logit_softcap", "sliding_window", "layer_types",
            "rope_local_theta", "rope_type", "num_experts")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig)}


def check_writable(cfg, kind: str, writes: tuple = (), **fixed):
  """Raises naming every family switch `cfg` sets that the HF family `kind` cannot write: the
  switches not in `writes` must keep their defaults, those in `fixed` the values given."""
  wanted = {name: _DEFAULTS[name] for name in SWITCHES if name not in writes}
  wanted.update(fixed)
  bad = [f"{name}={getattr(cfg, name)!r}" for name, value in wanted.items()
         if getattr(cfg, name) != value]
  if bad:
    raise ValueError(f"this model cannot be written as {kind}: it sets {', '.join(bad)}, which "
                     f"{kind} does not have; export it as a family that does (see docs/models.md)")


def rope_from_hf(params: dict, what: str) -> dict:
  """rope_theta, rope_type and the scaling of an HF rope parameters dict (transformers 5's
  `rope_parameters`, 4.x's `rope_scaling` plus `rope_theta`); `what` names the HF field.

  Raises:
    ValueError: for a rope_type jaxlm does not implement (yarn, dynamic, longrope, ...).
  """
  rope_type = params.get("rope_type", params.get("type", "default"))
  fields = {"rope_theta": float(params.get("rope_theta", 10000.0)), "rope_type": rope_type}
  if rope_type == "llama3":
    fields.update(
      rope_scaling_factor=float(params["factor"]),
      rope_low_freq_factor=float(params["low_freq_factor"]),
      rope_high_freq_factor=float(params["high_freq_factor"]),
      rope_original_max_len=int(params["original_max_position_embeddings"]),
    )
  elif rope_type == "linear":
    fields["rope_scaling_factor"] = float(params["factor"])
  elif rope_type != "default":
    raise ValueError(f"{what}.rope_type={rope_type!r} is not supported; jaxlm implements "
                     "'default', 'linear' and 'llama3'")
  return fields


def rope_by_layer_type(hf, family: str) -> dict:
  """The RoPE fields of a model whose `rope_parameters` hold one dict per layer type (Gemma 3,
  ModernBERT): the full layers' theta and scaling, and the sliding layers' theta as
  rope_local_theta.

  Raises:
    ValueError: for scaled RoPE on the sliding layers (jaxlm scales the full layers only).
  """
  params = hf.rope_parameters
  local = rope_from_hf(params[SLIDING], f"{family} rope_parameters['sliding_attention']")
  if local["rope_type"] != "default":
    raise ValueError(f"{family} rope_parameters['sliding_attention'].rope_type="
                     f"{local['rope_type']!r} is not supported; jaxlm scales full layers only")
  rope = rope_from_hf(params[FULL], f"{family} rope_parameters['full_attention']")
  return {**rope, "rope_local_theta": local["rope_theta"]}


def rope_parameters(hf) -> dict:
  """The one rope parameters dict of an HF config (transformers 5 or 4.x fields)."""
  params = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
  params.setdefault("rope_theta", getattr(hf, "rope_theta", 10000.0))
  return params


def rope_to_hf(cfg) -> dict:
  """HF rope parameters of the full layers of `cfg`."""
  rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
  if cfg.rope_type != "default":
    rope["factor"] = cfg.rope_scaling_factor
  if cfg.rope_type == "llama3":
    rope.update(low_freq_factor=cfg.rope_low_freq_factor,
                high_freq_factor=cfg.rope_high_freq_factor,
                original_max_position_embeddings=cfg.rope_original_max_len)
  return rope


def layers_from_hf(hf) -> dict:
  """sliding_window and layer_types of an HF config with per-layer attention types.

  Raises:
    ValueError: naming layer_types when it holds a type jaxlm does not implement (Llama 4's
      chunked attention, ...), or sliding layers without a window.
  """
  types = list(getattr(hf, "layer_types", None) or [])
  bad = sorted({t for t in types if t not in LAYER_TYPES})
  if bad:
    raise ValueError(f"{hf.model_type} layer_types has {bad}, which jaxlm does not implement; "
                     f"it reads {list(LAYER_TYPES)}")
  window = getattr(hf, "sliding_window", None) or 0
  if SLIDING in types and not window:
    raise ValueError(f"{hf.model_type} layer_types has sliding layers but sliding_window is "
                     f"{hf.sliding_window!r}; set the window or make every layer {FULL!r}")
  if SLIDING not in types:
    return {"sliding_window": 0, "layer_types": ()}
  return {"sliding_window": int(window), "layer_types": tuple(types)}


def _build(cfg):
  from jaxlm.models.heads import build_model

  return build_model(cfg)


def decoder_dims(cfg) -> dict:
  """The axis letters of the decoder's tables: d model, h heads, k kv heads, e head dim, f mlp
  dim, v vocab, x experts, m one expert's mlp dim."""
  return {"d": cfg.embed_dim, "h": cfg.num_heads, "k": cfg.kv_heads, "e": cfg.head_size,
          "f": cfg.hidden_dim, "v": cfg.vocab_size, "x": getattr(cfg, "num_experts", 0),
          "m": cfg.expert_dim if getattr(cfg, "num_experts", 0) else 0}


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
