"""Mixtral and Qwen3-MoE: the Llama and Qwen3 tables with each layer's MLP replaced by a sparse
mixture of experts (jaxlm.models.moe), one router and X SwiGLU experts.

Checkpoints store one tensor per expert (Mixtral's `block_sparse_moe.experts.{j}.w1/w3/w2`,
Qwen3-MoE's `mlp.experts.{j}.gate_proj/up_proj/down_proj`), as transformers' save_pretrained
writes them (in memory transformers 5 fuses them into `experts.gate_up_proj` [X, 2F, D] and
`experts.down_proj` [X, D, F]); jaxlm stacks them into [X, D, F] and [X, F, D].
"""

from jaxlm.hf.convert import Rule
from jaxlm.hf.families.family import Family, check_writable
from jaxlm.hf.families.llama import (
  _COMMON,
  _L,
  QK_NORM_RULES,
  RULES,
  _base_from_hf,
  _hf_kwargs,
)
from jaxlm.models.config import ModelConfig

_DENSE_ATTENTION = tuple(r for r in RULES if "/mlp/" not in r.jax)


def _expert_rules(block: str, gate: str, up: str, down: str) -> tuple:
  """The router and the stacked experts of a layer whose MoE block is `{_L}.{block}`."""
  at = f"{_L}.{block}"
  return (
    Rule("block_{i}/moe/router/kernel", f"{at}.gate.weight", "x d -> d x"),
    Rule("block_{i}/moe/gate", f"{at}.experts.{{j}}.{gate}.weight", "m d -> d m"),
    Rule("block_{i}/moe/up", f"{at}.experts.{{j}}.{up}.weight", "m d -> d m"),
    Rule("block_{i}/moe/down", f"{at}.experts.{{j}}.{down}.weight", "d m -> m d"),
  )


MIXTRAL_RULES = _DENSE_ATTENTION + _expert_rules("block_sparse_moe", "w1", "w3", "w2")
QWEN3_MOE_RULES = (_DENSE_ATTENTION + QK_NORM_RULES
                   + _expert_rules("mlp", "gate_proj", "up_proj", "down_proj"))


def _experts_from_hf(hf, num_experts: int) -> dict:
  return dict(num_experts=int(num_experts), experts_per_token=int(hf.num_experts_per_tok),
              router_aux_loss_coef=float(getattr(hf, "router_aux_loss_coef", 0.0) or 0.0))


def mixtral_from_hf(hf) -> ModelConfig:
  """Mixtral: Mistral (every layer sliding when sliding_window is set) with experts whose size
  is intermediate_size; the top-k weights are always renormalised."""
  if getattr(hf, "router_jitter_noise", 0.0):
    raise ValueError(f"mixtral router_jitter_noise={hf.router_jitter_noise} (multiplicative noise "
                     "on the router's inputs in training) is not implemented; set it to 0")
  window = int(getattr(hf, "sliding_window", None) or 0)
  return ModelConfig(**_base_from_hf(hf, qkv_bias=False), sliding_window=window,
                     norm_topk_prob=True, **_experts_from_hf(hf, hf.num_local_experts))


def qwen3_moe_from_hf(hf) -> ModelConfig:
  """Qwen3-MoE: Qwen3 with every layer's MLP a mixture of experts of moe_intermediate_size."""
  if getattr(hf, "attention_bias", False):
    raise ValueError("qwen3_moe attention_bias=True is not supported by jaxlm")
  if getattr(hf, "use_sliding_window", False):
    raise ValueError("qwen3_moe use_sliding_window=True is not supported by jaxlm's Qwen3-MoE; "
                     "set it to False")
  if getattr(hf, "mlp_only_layers", None) or getattr(hf, "decoder_sparse_step", 1) != 1:
    raise ValueError(f"qwen3_moe mlp_only_layers={hf.mlp_only_layers} / decoder_sparse_step="
                     f"{hf.decoder_sparse_step}: dense layers among the MoE ones are not "
                     "implemented; jaxlm reads mlp_only_layers=[] and decoder_sparse_step=1")
  return ModelConfig(**_base_from_hf(hf, qkv_bias=False), qk_norm="head",
                     moe_intermediate_size=int(hf.moe_intermediate_size),
                     norm_topk_prob=bool(hf.norm_topk_prob),
                     **_experts_from_hf(hf, getattr(hf, "num_experts", None)
                                        or hf.num_local_experts))


def _check_moe(cfg: ModelConfig, kind: str):
  if not cfg.num_experts:
    raise ValueError(f"this model has no experts (model.num_experts=0): it cannot be written as "
                     f"{kind}; export it as a dense family (llama, qwen3, ...)")
  if cfg.use_bias or cfg.qkv_bias:
    raise ValueError(f"{kind} has no biases: it needs use_bias=False and qkv_bias=False")


def mixtral_to_hf(cfg: ModelConfig):
  from transformers import MixtralConfig

  _check_moe(cfg, "Mixtral")
  if not cfg.norm_topk_prob:
    raise ValueError("Mixtral always renormalises the top-k router weights: it needs "
                     "norm_topk_prob=True (export as 'qwen3_moe' otherwise)")
  if cfg.mixed_layers:
    raise ValueError("Mixtral slides every layer or none, this model only some")
  kwargs = _hf_kwargs(cfg, "Mixtral", ("sliding_window", "layer_types", "num_experts"))
  kwargs["intermediate_size"] = cfg.expert_dim
  window = cfg.sliding_window if any(cfg.local_layers) else None
  return MixtralConfig(**kwargs, sliding_window=window, num_local_experts=cfg.num_experts,
                       num_experts_per_tok=cfg.experts_per_token,
                       router_aux_loss_coef=cfg.router_aux_loss_coef,
                       architectures=["MixtralForCausalLM"])


def qwen3_moe_to_hf(cfg: ModelConfig):
  from transformers import Qwen3MoeConfig

  _check_moe(cfg, "Qwen3-MoE")
  kwargs = _hf_kwargs(cfg, "Qwen3-MoE", ("qk_norm", "num_experts"))
  check_writable(cfg, "Qwen3-MoE", ("num_experts", "rope_type"), qk_norm="head")
  return Qwen3MoeConfig(**kwargs, use_sliding_window=False, attention_bias=False,
                        moe_intermediate_size=cfg.expert_dim, num_experts=cfg.num_experts,
                        num_experts_per_tok=cfg.experts_per_token,
                        norm_topk_prob=cfg.norm_topk_prob,
                        router_aux_loss_coef=cfg.router_aux_loss_coef, decoder_sparse_step=1,
                        mlp_only_layers=[], architectures=["Qwen3MoeForCausalLM"])


MIXTRAL = Family(name="mixtral", architectures=("MixtralForCausalLM",), model_types=("mixtral",),
                 config_from_hf=mixtral_from_hf, config_to_hf=mixtral_to_hf,
                 **{**_COMMON, "rules": MIXTRAL_RULES})
QWEN3_MOE = Family(name="qwen3_moe", architectures=("Qwen3MoeForCausalLM",),
                   model_types=("qwen3_moe",), config_from_hf=qwen3_moe_from_hf,
                   config_to_hf=qwen3_moe_to_hf, **{**_COMMON, "rules": QWEN3_MOE_RULES})
