"""OLMo 2: the Llama parameter table with its norms moved onto the attention and MLP outputs
inside the residual branch, and RMSNorm of the whole query and key projections (qk-norm over
H * E, not per head)."""

from jaxlm.hf.convert import Rule
from jaxlm.hf.families.family import (
  Family,
  activation_from_hf,
  activation_to_hf,
  check_writable,
  rope_from_hf,
  rope_parameters,
  rope_to_hf,
)
from jaxlm.hf.families.llama import RULES_WITHOUT_BLOCK_NORMS
from jaxlm.models.config import ModelConfig

_L = "model.layers.{i}"
OLMO2_RULES = RULES_WITHOUT_BLOCK_NORMS + (
  Rule("block_{i}/attn_post_norm/scale", f"{_L}.post_attention_layernorm.weight"),
  Rule("block_{i}/mlp_post_norm/scale", f"{_L}.post_feedforward_layernorm.weight"),
  Rule("block_{i}/attn/q_norm/scale", f"{_L}.self_attn.q_norm.weight", "(h e) -> h e"),
  Rule("block_{i}/attn/k_norm/scale", f"{_L}.self_attn.k_norm.weight", "(k e) -> k e"),
)


def olmo2_from_hf(hf) -> ModelConfig:
  if getattr(hf, "attention_bias", False):
    raise ValueError("olmo2 attention_bias=True (biases on q/k/v/o, none on the MLP) is not "
                     "supported by jaxlm")
  heads = hf.num_attention_heads
  return ModelConfig(
    vocab_size=hf.vocab_size, num_layers=hf.num_hidden_layers, embed_dim=hf.hidden_size,
    num_heads=heads, num_kv_heads=hf.num_key_value_heads or heads,
    mlp_dim=hf.intermediate_size, max_seq_len=hf.max_position_embeddings, norm="rmsnorm",
    norm_eps=float(hf.rms_norm_eps), norm_position="res_post", qk_norm="full",
    position="rope", activation=activation_from_hf(hf.hidden_act, "olmo2 hidden_act"),
    gated_mlp=True, use_bias=False, tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
    **rope_from_hf(rope_parameters(hf), "olmo2 rope_parameters"),
  )


def olmo2_to_hf(cfg: ModelConfig):
  from transformers import Olmo2Config

  if cfg.norm != "rmsnorm" or cfg.position != "rope" or not cfg.gated_mlp or cfg.use_bias \
      or cfg.qkv_bias or cfg.head_size * cfg.num_heads != cfg.embed_dim:
    raise ValueError("this model cannot be written as OLMo 2: it needs norm='rmsnorm', "
                     "position='rope', gated_mlp=True, no biases and head_dim=embed_dim/num_heads")
  check_writable(cfg, "OLMo 2", ("norm_position", "qk_norm", "rope_type"),
                 norm_position="res_post", qk_norm="full")
  return Olmo2Config(
    vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim, intermediate_size=cfg.hidden_dim,
    num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
    num_key_value_heads=cfg.kv_heads, hidden_act=activation_to_hf(cfg.activation),
    max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
    tie_word_embeddings=cfg.tie_embeddings, rope_parameters=rope_to_hf(cfg),
    attention_bias=False, architectures=["Olmo2ForCausalLM"],
  )


OLMO2 = Family(name="olmo2", architectures=("Olmo2ForCausalLM",), model_types=("olmo2",),
               rules=OLMO2_RULES, config_from_hf=olmo2_from_hf, config_to_hf=olmo2_to_hf,
               ignored=(r"rotary_emb\.inv_freq$",), tied=("lm_head.weight",))
