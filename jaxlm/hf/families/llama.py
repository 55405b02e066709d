"""Llama 2/3, Mistral, Qwen2, Qwen3 and SmolLM (Llama architecture): one parameter-name table,
four config mappings.

HF stores Linear weights [out, in]; the patterns transpose them and split the head axes.
Qwen2 differs by its q/k/v biases (and layer types that may slide), Mistral by its sliding
window on every layer, Qwen3 by its per-head RMSNorm of queries and keys.
"""

from jaxlm.hf.convert import Rule
from jaxlm.hf.families.family import (
  SWITCHES,
  Family,
  activation_from_hf,
  activation_to_hf,
  check_writable,
  layers_from_hf,
  rope_from_hf,
  rope_parameters,
  rope_to_hf,
)
from jaxlm.models.config import ModelConfig

_L = "model.layers.{i}"
RULES = (
  Rule("embed/embedding", "model.embed_tokens.weight"),
  Rule("block_{i}/attn_norm/scale", f"{_L}.input_layernorm.weight"),
  Rule("block_{i}/attn/q/kernel", f"{_L}.self_attn.q_proj.weight", "(h e) d -> d h e"),
  Rule("block_{i}/attn/k/kernel", f"{_L}.self_attn.k_proj.weight", "(k e) d -> d k e"),
  Rule("block_{i}/attn/v/kernel", f"{_L}.self_attn.v_proj.weight", "(k e) d -> d k e"),
  Rule("block_{i}/attn/q/bias", f"{_L}.self_attn.q_proj.bias", "(h e) -> h e"),
  Rule("block_{i}/attn/k/bias", f"{_L}.self_attn.k_proj.bias", "(k e) -> k e"),
  Rule("block_{i}/attn/v/bias", f"{_L}.self_attn.v_proj.bias", "(k e) -> k e"),
  Rule("block_{i}/attn/o/kernel", f"{_L}.self_attn.o_proj.weight", "d (h e) -> h e d"),
  Rule("block_{i}/attn/o/bias", f"{_L}.self_attn.o_proj.bias"),
  Rule("block_{i}/mlp_norm/scale", f"{_L}.post_attention_layernorm.weight"),
  Rule("block_{i}/mlp/gate/kernel", f"{_L}.mlp.gate_proj.weight", "f d -> d f"),
  Rule("block_{i}/mlp/up/kernel", f"{_L}.mlp.up_proj.weight", "f d -> d f"),
  Rule("block_{i}/mlp/down/kernel", f"{_L}.mlp.down_proj.weight", "d f -> f d"),
  Rule("block_{i}/mlp/gate/bias", f"{_L}.mlp.gate_proj.bias"),
  Rule("block_{i}/mlp/up/bias", f"{_L}.mlp.up_proj.bias"),
  Rule("block_{i}/mlp/down/bias", f"{_L}.mlp.down_proj.bias"),
  Rule("final_norm/scale", "model.norm.weight"),
  Rule("lm_head/kernel", "lm_head.weight", "v d -> d v"),
)
# the table less the blocks' norms: families that place their norms elsewhere (Gemma, OLMo 2)
RULES_WITHOUT_BLOCK_NORMS = tuple(
  r for r in RULES if "_norm/" not in r.jax or r.jax.startswith("final"))


def _base_from_hf(hf, qkv_bias: bool) -> dict:
  attention_bias = bool(getattr(hf, "attention_bias", False))
  mlp_bias = bool(getattr(hf, "mlp_bias", False))
  if attention_bias != mlp_bias:
    raise ValueError(f"{hf.model_type} attention_bias={attention_bias} with mlp_bias={mlp_bias} "
                     "is not supported: jaxlm puts biases on all dense layers or only on q/k/v")
  activation = activation_from_hf(hf.hidden_act, f"{hf.model_type} hidden_act")
  heads = hf.num_attention_heads
  return dict(
    vocab_size=hf.vocab_size, num_layers=hf.num_hidden_layers, embed_dim=hf.hidden_size,
    num_heads=heads, num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
    head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
    mlp_dim=hf.intermediate_size, max_seq_len=hf.max_position_embeddings, norm="rmsnorm",
    norm_eps=float(hf.rms_norm_eps), position="rope", activation=activation,
    gated_mlp=True, use_bias=attention_bias, qkv_bias=qkv_bias and not attention_bias,
    tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
    **rope_from_hf(rope_parameters(hf), f"{hf.model_type} rope_parameters"),
  )


def llama_from_hf(hf) -> ModelConfig:
  return ModelConfig(**_base_from_hf(hf, qkv_bias=False))


def mistral_from_hf(hf) -> ModelConfig:
  """Every Mistral layer slides when sliding_window is set (transformers ignores layer_types)."""
  window = int(getattr(hf, "sliding_window", None) or 0)
  return ModelConfig(**_base_from_hf(hf, False), sliding_window=window)


def qwen2_from_hf(hf) -> ModelConfig:
  return ModelConfig(**_base_from_hf(hf, qkv_bias=True), **layers_from_hf(hf))


def qwen3_from_hf(hf) -> ModelConfig:
  """Qwen3: Llama with per-head RMSNorm of queries and keys; q/k/v/o biases are refused."""
  if getattr(hf, "attention_bias", False):
    raise ValueError("qwen3 attention_bias=True (biases on q/k/v/o, none on the MLP) is not "
                     "supported by jaxlm")
  return ModelConfig(**_base_from_hf(hf, qkv_bias=False), **layers_from_hf(hf), qk_norm="head")


def _hf_kwargs(cfg: ModelConfig, kind: str, writes: tuple = ()) -> dict:
  if cfg.norm != "rmsnorm" or cfg.position != "rope" or not cfg.gated_mlp:
    raise ValueError(f"this model cannot be written as {kind}: it needs norm='rmsnorm', "
                     "position='rope' and gated_mlp=True")
  check_writable(cfg, kind, ("rope_type", *writes))
  return {
    "vocab_size": cfg.vocab_size, "hidden_size": cfg.embed_dim,
    "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.num_layers,
    "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.kv_heads,
    "head_dim": cfg.head_size,
    "hidden_act": activation_to_hf(cfg.activation, gelu_tanh="gelu_pytorch_tanh"),
    "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
    "tie_word_embeddings": cfg.tie_embeddings, "rope_parameters": rope_to_hf(cfg),
  }


def _window_kwargs(cfg: ModelConfig) -> dict:
  """Qwen's sliding-window fields: layer_types says which layers slide."""
  if not any(cfg.local_layers):
    return {"use_sliding_window": False, "sliding_window": None}
  return {"use_sliding_window": True, "sliding_window": cfg.sliding_window,
          "layer_types": cfg.hf_layer_types(), "max_window_layers": cfg.local_layers.index(True)}


def llama_to_hf(cfg: ModelConfig):
  from transformers import LlamaConfig

  if cfg.qkv_bias and not cfg.use_bias:
    raise ValueError("q/k/v-only biases are Qwen2's layout: export with family 'qwen2'")
  return LlamaConfig(**_hf_kwargs(cfg, "Llama"), attention_bias=cfg.use_bias,
                     mlp_bias=cfg.use_bias, architectures=["LlamaForCausalLM"])


def mistral_to_hf(cfg: ModelConfig):
  from transformers import MistralConfig

  if cfg.use_bias or cfg.qkv_bias:
    raise ValueError("Mistral has no biases: export this model as 'llama' or 'qwen2'")
  if cfg.mixed_layers:
    raise ValueError("Mistral slides every layer or none, this model only some: export it as "
                     "'qwen2' or 'qwen3', whose layer_types say which")
  window = cfg.sliding_window if any(cfg.local_layers) else None
  return MistralConfig(**_hf_kwargs(cfg, "Mistral", ("sliding_window", "layer_types")),
                       sliding_window=window, architectures=["MistralForCausalLM"])


def qwen2_to_hf(cfg: ModelConfig):
  from transformers import Qwen2Config

  if cfg.use_bias or not cfg.qkv_bias:
    raise ValueError("Qwen2 has biases on q/k/v only: it needs qkv_bias=True, use_bias=False")
  return Qwen2Config(**_hf_kwargs(cfg, "Qwen2", ("sliding_window", "layer_types")),
                     **_window_kwargs(cfg), architectures=["Qwen2ForCausalLM"])


def qwen3_to_hf(cfg: ModelConfig):
  from transformers import Qwen3Config

  if cfg.use_bias or cfg.qkv_bias:
    raise ValueError("Qwen3 has no biases: it needs use_bias=False and qkv_bias=False")
  kwargs = _hf_kwargs(cfg, "Qwen3", ("sliding_window", "layer_types", "qk_norm"))
  check_writable(cfg, "Qwen3", SWITCHES, qk_norm="head")
  return Qwen3Config(**kwargs, **_window_kwargs(cfg), attention_bias=False,
                     architectures=["Qwen3ForCausalLM"])


_COMMON = {"rules": RULES, "ignored": (r"rotary_emb\.inv_freq$",), "tied": ("lm_head.weight",)}
LLAMA = Family(name="llama", architectures=("LlamaForCausalLM",), model_types=("llama",),
               config_from_hf=llama_from_hf, config_to_hf=llama_to_hf, **_COMMON)
MISTRAL = Family(name="mistral", architectures=("MistralForCausalLM",), model_types=("mistral",),
                 config_from_hf=mistral_from_hf, config_to_hf=mistral_to_hf, **_COMMON)
QWEN2 = Family(name="qwen2", architectures=("Qwen2ForCausalLM",), model_types=("qwen2",),
               config_from_hf=qwen2_from_hf, config_to_hf=qwen2_to_hf, **_COMMON)
QK_NORM_RULES = (
  Rule("block_{i}/attn/q_norm/scale", f"{_L}.self_attn.q_norm.weight"),
  Rule("block_{i}/attn/k_norm/scale", f"{_L}.self_attn.k_norm.weight"),
)
QWEN3 = Family(name="qwen3", architectures=("Qwen3ForCausalLM",), model_types=("qwen3",),
               config_from_hf=qwen3_from_hf, config_to_hf=qwen3_to_hf,
               **{**_COMMON, "rules": RULES + QK_NORM_RULES})
