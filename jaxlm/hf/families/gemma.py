"""Gemma 2 and Gemma 3 (text): the Llama parameter table with sandwich norms, and their configs.

Both: RMSNorm scaled by (1 + w), norms before and after attention and the MLP, embeddings times
sqrt(d), GeGLU with tanh GELU, scores scaled by query_pre_attn_scalar, sliding layers by
`layer_types`. Gemma 2 soft-caps attention scores and final logits; Gemma 3 adds per-head
qk-norm and gives sliding layers their own RoPE base (`rope_parameters` per layer type).
"""

from jaxlm.hf.convert import Rule
from jaxlm.hf.families.family import (
  Family,
  activation_from_hf,
  activation_to_hf,
  check_writable,
  layers_from_hf,
  rope_by_layer_type,
  rope_from_hf,
  rope_parameters,
  rope_to_hf,
)
from jaxlm.hf.families.llama import QK_NORM_RULES, RULES_WITHOUT_BLOCK_NORMS
from jaxlm.models.config import FULL, SLIDING, ModelConfig

_L = "model.layers.{i}"
_NORMS = {  # ours -> HF, in block order
  "attn_norm": "input_layernorm", "attn_post_norm": "post_attention_layernorm",
  "mlp_norm": "pre_feedforward_layernorm", "mlp_post_norm": "post_feedforward_layernorm",
}
GEMMA_RULES = RULES_WITHOUT_BLOCK_NORMS + tuple(
  Rule(f"block_{{i}}/{ours}/scale", f"{_L}.{theirs}.weight") for ours, theirs in _NORMS.items()
)
_WRITES = ("norm_position", "norm_offset", "embed_scale", "query_pre_attn_scalar",
           "sliding_window", "layer_types")


def _base_from_hf(hf) -> dict:
  """The fields Gemma 2 and 3 share, with refusals of what jaxlm does not implement."""
  kind = hf.model_type
  if getattr(hf, "attention_bias", False):
    raise ValueError(f"{kind} attention_bias=True is not supported by jaxlm")
  if getattr(hf, "use_bidirectional_attention", False):
    raise ValueError(f"{kind} use_bidirectional_attention=True is not supported: jaxlm's Gemma "
                     "is causal")
  heads = hf.num_attention_heads
  return dict(
    vocab_size=hf.vocab_size, num_layers=hf.num_hidden_layers, embed_dim=hf.hidden_size,
    num_heads=heads, num_kv_heads=hf.num_key_value_heads, head_dim=hf.head_dim,
    mlp_dim=hf.intermediate_size, max_seq_len=hf.max_position_embeddings, norm="rmsnorm",
    norm_eps=float(hf.rms_norm_eps), norm_offset=1.0, norm_position="sandwich",
    position="rope", activation=activation_from_hf(hf.hidden_activation,
                                                   f"{kind} hidden_activation"),
    gated_mlp=True, use_bias=False, embed_scale=True,
    tie_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
    query_pre_attn_scalar=float(hf.query_pre_attn_scalar),
    logit_softcap=float(hf.final_logit_softcapping or 0.0), **layers_from_hf(hf),
  )


def gemma2_from_hf(hf) -> ModelConfig:
  rope = rope_from_hf(rope_parameters(hf), "gemma2 rope_parameters")
  return ModelConfig(**_base_from_hf(hf), **rope,
                     attn_logit_softcap=float(hf.attn_logit_softcapping or 0.0))


def gemma3_from_hf(hf) -> ModelConfig:
  """Gemma 3's rope_parameters hold one dict per layer type; sliding layers' must be unscaled.
  Its attn_logit_softcapping is left unread: transformers' Gemma 3 never applies it."""
  return ModelConfig(**_base_from_hf(hf), **rope_by_layer_type(hf, "gemma3"), qk_norm="head")


def _hf_kwargs(cfg: ModelConfig, kind: str) -> dict:
  if cfg.norm != "rmsnorm" or cfg.position != "rope" or not cfg.gated_mlp or cfg.use_bias \
      or cfg.qkv_bias:
    raise ValueError(f"this model cannot be written as {kind}: it needs norm='rmsnorm', "
                     "position='rope', gated_mlp=True and no biases")
  scalar = cfg.query_pre_attn_scalar or cfg.head_size
  if scalar != int(scalar):
    raise ValueError(f"{kind}'s query_pre_attn_scalar is an integer, this model's is {scalar}: "
                     "round model.query_pre_attn_scalar to write it")
  return {
    "vocab_size": cfg.vocab_size, "hidden_size": cfg.embed_dim,
    "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.num_layers,
    "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.kv_heads,
    "head_dim": cfg.head_size,
    "hidden_activation": activation_to_hf(cfg.activation, gelu_tanh="gelu_pytorch_tanh"),
    "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
    "tie_word_embeddings": cfg.tie_embeddings,
    "query_pre_attn_scalar": int(scalar),
    "sliding_window": cfg.sliding_window or None, "layer_types": cfg.hf_layer_types(),
    "final_logit_softcapping": cfg.logit_softcap or None,
  }


_GEMMA = dict(norm_position="sandwich", norm_offset=1.0, embed_scale=True)


def gemma2_to_hf(cfg: ModelConfig):
  from transformers import Gemma2Config

  check_writable(cfg, "Gemma 2", (*_WRITES, "attn_logit_softcap", "logit_softcap", "rope_type"),
                 **_GEMMA)
  return Gemma2Config(**_hf_kwargs(cfg, "Gemma 2"), rope_parameters=rope_to_hf(cfg),
                      attn_logit_softcapping=cfg.attn_logit_softcap or None,
                      architectures=["Gemma2ForCausalLM"])


def gemma3_to_hf(cfg: ModelConfig):
  from transformers import Gemma3TextConfig

  check_writable(cfg, "Gemma 3", (*_WRITES, "qk_norm", "logit_softcap", "rope_type",
                                  "rope_local_theta"), qk_norm="head", **_GEMMA)
  local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}
  if not cfg.rope_local_theta and cfg.rope_type != "default" and any(cfg.local_layers):
    raise ValueError("Gemma 3 leaves its sliding layers' RoPE unscaled: set model.rope_local_theta "
                     "(Gemma 3 uses 10000) to write this model as Gemma 3")
  return Gemma3TextConfig(**_hf_kwargs(cfg, "Gemma 3"),
                          rope_parameters={FULL: rope_to_hf(cfg), SLIDING: local},
                          architectures=["Gemma3ForCausalLM"])


_COMMON = {"ignored": (r"rotary_emb\.", r"embed_scale$"), "tied": ("lm_head.weight",)}
GEMMA2 = Family(name="gemma2", architectures=("Gemma2ForCausalLM",), model_types=("gemma2",),
                rules=GEMMA_RULES, config_from_hf=gemma2_from_hf, config_to_hf=gemma2_to_hf,
                **_COMMON)
GEMMA3 = Family(name="gemma3", architectures=("Gemma3ForCausalLM",),
                model_types=("gemma3_text",), rules=GEMMA_RULES + QK_NORM_RULES,
                config_from_hf=gemma3_from_hf, config_to_hf=gemma3_to_hf, **_COMMON)
