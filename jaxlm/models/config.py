"""ModelConfig: every size and family switch of the one Transformer, plus named presets.

A family (GPT-2, Llama, Mistral, Qwen2/3, SmolLM, Gemma 2/3, OLMo 2, Mixtral, Qwen3-MoE, BERT,
RoBERTa, ModernBERT) is a
ModelConfig, never a copy of the model code (docs/models.md: which switch each family sets).
"""

import dataclasses
from typing import Any

NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope")
# The MLP nonlinearities, the one table of them: name -> (function, its keyword arguments), the
# function one of layers.py (exact GELU) or else of jax.nn. Configs are checked against its keys,
# layers.activation builds the functions from it; kept as data so this module imports neither jax
# nor layers (which imports it).
ACTIVATIONS = {
  "gelu_tanh": ("gelu", {"approximate": True}),
  "gelu": ("gelu_exact", {}),
  "silu": ("silu", {}),
  "relu": ("relu", {}),
}
# What a layer keeps for the backward pass (the rest is recomputed): everything | only its input |
# the outputs of its weight matmuls | the attention outputs (checkpoint name "attention_out").
REMAT = ("none", "full", "dots", "attention")
# Where a block's norms sit, f being attention or the MLP: pre x + f(norm(x)) (GPT-2, Llama) |
# post norm(x + f(x)) (BERT) | sandwich x + norm(f(norm(x))) (Gemma 2/3) | res_post x + norm(f(x))
# (OLMo 2's reordered norm, Swin v2's res-post-norm).
NORM_POSITIONS = ("pre", "post", "sandwich", "res_post")
# RMSNorm of queries and keys before RoPE: over each head's E features (Qwen3, Gemma 3) or over
# the whole H * E projection (OLMo 2).
QK_NORMS = ("none", "head", "full")
# HF's layer type names: attention over every earlier key, or over the sliding window's only.
FULL, SLIDING = "full_attention", "sliding_attention"
LAYER_TYPES = (FULL, SLIDING)
# RoPE frequency schedules (HF rope_type): default; linear (positions divided by the factor:
# Gemma 3 4B and up); llama3 (long wavelengths slowed, Llama 3.1).
ROPE_TYPES = ("default", "linear", "llama3")
ENCODER_HEADS = ("base", "mlm", "seq_cls", "token_cls", "qa")  # the task heads of models.heads
# What a seq_cls head reads (HF ModernBERT's classifier_pooling): the first ([CLS]) token, or the
# mean of the sequence's real tokens.
CLASSIFIER_POOLINGS = ("cls", "mean")
HEADS = ("lm", *ENCODER_HEADS)
DTYPES = ("float32", "bfloat16", "float16")
# How float32 matmuls run (jax_default_matmul_precision's Precision levels, aliases paired):
# default/bfloat16 = one bf16 pass on TPU, TF32 on Ampere+ GPUs; high/tensorfloat32 = 3 bf16
# passes on TPU, TF32 on GPUs; highest/float32 = 6 bf16 passes on TPU, full fp32 on GPUs.
MATMUL_PRECISIONS = ("default", "high", "highest", "bfloat16", "tensorfloat32", "float32")
# Attention implementations (models/kernels.py): auto picks the first kernel that runs on the device
# at hand (kernels.auto_order), else xla; an explicit kernel that cannot run is refused at trace.
ATTENTIONS = ("auto", "xla", "splash", "cudnn", "triton", "tokamax")
# Fields a run sets on top of the model it starts from (`model.init_from`); all others come from
# that checkpoint's own configuration.
RUN_FIELDS = ("dropout", "dtype", "param_dtype", "remat", "scan_layers", "head", "num_labels",
              "attention", "loss_chunk", "matmul_precision", "router_aux_loss_coef",
              "router_z_loss_coef")


def dtype_name(dtype: Any, what: str = "dtype") -> str:
  """The canonical name in DTYPES of a dtype given as JAX users pass it: "bfloat16", jnp.bfloat16,
  np.float32 or a np.dtype. Configs keep the name, so they stay JSON-serialisable.

  Raises:
    ValueError: naming `what` when `dtype` is not one of DTYPES.
  """
  if isinstance(dtype, str):
    name = dtype
  else:
    import numpy as np  # jnp.bfloat16 and friends carry a numpy dtype (ml_dtypes for bfloat16)

    try:
      name = np.dtype(dtype).name
    except TypeError:
      name = None
  if name not in DTYPES:
    raise ValueError(f"{what}={dtype!r} is not one of {DTYPES}")
  return name


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Sizes and family switches of a decoder (or, with causal=False, encoder) Transformer.

  Zero for `num_kv_heads`, `head_dim` and `mlp_dim` means "derive it": all heads,
  embed_dim // num_heads and 4 * embed_dim. Zero `vocab_size` means "take it from the tokenizer".
  """

  vocab_size: int = 0  # V; 0 = set from the tokenizer at train time
  num_layers: int = 4  # L
  embed_dim: int = 128  # D
  num_heads: int = 4  # H
  num_kv_heads: int = 0  # K; < H is grouped-query attention
  head_dim: int = 0  # E
  mlp_dim: int = 0  # F
  max_seq_len: int = 1024  # longest sequence the positions support
  norm: str = "layernorm"  # layernorm (GPT-2) | rmsnorm (Llama)
  norm_eps: float = 1e-5
  position: str = "learned"  # learned (GPT-2) | rope (Llama)
  rope_theta: float = 10000.0
  rope_type: str = "default"  # one of ROPE_TYPES; linear and llama3 use rope_scaling_factor
  rope_scaling_factor: float = 0.0  # the linear or Llama-3 RoPE scaling factor; 0 = off
  rope_low_freq_factor: float = 1.0  # Llama-3 scaling: wavelengths above orig_len/low are scaled
  rope_high_freq_factor: float = 4.0  # Llama-3 scaling: wavelengths below orig_len/high are kept
  rope_original_max_len: int = 8192  # Llama-3 scaling: the context length trained before scaling
  activation: str = "gelu_tanh"  # MLP nonlinearity
  gated_mlp: bool = False  # True: act(x W_gate) * (x W_up), SwiGLU with silu
  use_bias: bool = True  # biases on every dense layer and norm
  qkv_bias: bool = False  # biases on q/k/v only (Qwen2)
  tie_embeddings: bool = True  # the LM head reuses the token embedding
  dropout: float = 0.0  # on embeddings and residual branches
  init_std: float = 0.02
  dtype: str = "float32"  # compute dtype; params stay in param_dtype (jnp.bfloat16 etc. accepted)
  param_dtype: str = "float32"
  # float32 matmuls' precision for a training run (one of MATMUL_PRECISIONS); MFU's peak follows
  matmul_precision: str = "default"
  remat: str = "none"  # none | full | dots (save matmul outputs) | attention (save attn outputs)
  scan_layers: bool = False  # nn.scan over layers: faster compiles for deep models
  attention: str = "auto"  # one of ATTENTIONS: the attention kernel (models/kernels.py)
  # LM loss over chunks of this many tokens, the head matmul fused in (train/objectives.py):
  # [B, T, V] logits never exist at once; 0 = whole logits.
  loss_chunk: int = 0
  # Encoder switches (BERT, RoBERTa); the defaults leave the decoder exactly as it is.
  causal: bool = True  # False: bidirectional attention under a padding mask
  norm_position: str = "pre"  # pre (GPT-2, Llama) | post (BERT: norm after each residual add)
  embed_norm: bool = False  # LayerNorm on the summed embeddings (BERT)
  type_vocab_size: int = 0  # token-type (sentence A/B) embeddings; 0 = none
  position_offset: int = 0  # first position id (RoBERTa: padding_idx + 1 = 2)
  pooler: bool = False  # dense + tanh on the first token in the base encoder (BERT's pooler)
  # ModernBERT's switches (the defaults leave BERT as it is). False: the first block has no
  # attn_norm, its attention reads the embeddings as embed_norm left them (an Identity in HF)
  first_attn_norm: bool = True
  # True: the seq_cls / token_cls / qa heads start with the prediction head (dense + activation +
  # norm, HF ModernBERT's `head`) instead of BERT's pooler (dense + tanh, seq_cls only)
  prediction_head: bool = False
  head_bias: bool = True  # bias on the heads' dense transform (HF ModernBERT's classifier_bias)
  classifier_pooling: str = "cls"  # one of CLASSIFIER_POOLINGS: what a seq_cls head reads
  head: str = "lm"  # lm (decoders) | one of ENCODER_HEADS
  num_labels: int = 2  # classes of a seq_cls / token_cls head (1 = regression)
  # Dense-family switches (Mistral, Qwen3, Gemma 2/3, OLMo 2); the defaults leave the model as is.
  qk_norm: str = "none"  # one of QK_NORMS
  norm_offset: float = 0.0  # RMSNorm scales by (norm_offset + w): Gemma stores w around 0 (1.0)
  embed_scale: bool = False  # token embeddings times sqrt(embed_dim) (Gemma)
  query_pre_attn_scalar: float = 0.0  # attention scores scaled by its -1/2 power; 0 = head_dim
  attn_logit_softcap: float = 0.0  # scores -> c tanh(scores / c) before the mask (Gemma 2); 0 = off
  logit_softcap: float = 0.0  # final logits -> c tanh(logits / c) (Gemma 2); 0 = off
  # W: a sliding layer's query sees the W latest keys, itself included; in an encoder
  # (causal=False) the keys j with |i - j| <= W // 2 (HF ModernBERT's local_attention)
  sliding_window: int = 0
  # per layer FULL or SLIDING, a pattern repeated over the layers (Gemma 3: five sliding, one
  # full; cut where the layers end); () = every layer sliding when sliding_window > 0 (Mistral),
  # else every layer full
  layer_types: tuple = ()
  rope_local_theta: float = 0.0  # sliding layers' RoPE base, unscaled (Gemma 3); 0 = as full layers
  # Sparse mixture of experts (Mixtral, Qwen3-MoE; models/moe.py): every layer's MLP is
  # num_experts SwiGLU experts, each token sent to its experts_per_token (top-k) best by a
  # softmax router. 0 experts = the dense MLP.
  num_experts: int = 0  # X; HF num_local_experts / num_experts
  experts_per_token: int = 0  # k; HF num_experts_per_tok
  moe_intermediate_size: int = 0  # F of one expert; 0 = mlp_dim
  norm_topk_prob: bool = True  # renormalise the top-k router weights to sum to 1 (Mixtral: always)
  router_aux_loss_coef: float = 0.0  # times the load-balancing loss (Switch Transformer), training
  router_z_loss_coef: float = 0.0  # times the router z-loss (ST-MoE) in training

  def __post_init__(self):
    for name in ("dtype", "param_dtype"):  # frozen: normalised in place, once, here
      object.__setattr__(self, name, dtype_name(getattr(self, name), f"model.{name}"))
    for name, allowed in (
      ("norm", NORMS),
      ("position", POSITIONS),
      ("activation", tuple(ACTIVATIONS)),
      ("remat", REMAT),
      ("norm_position", NORM_POSITIONS),
      ("head", HEADS),
      ("attention", ATTENTIONS),
      ("matmul_precision", MATMUL_PRECISIONS),
      ("qk_norm", QK_NORMS),
      ("rope_type", ROPE_TYPES),
      ("classifier_pooling", CLASSIFIER_POOLINGS),
    ):
      if getattr(self, name) not in allowed:
        raise ValueError(f"model.{name}={getattr(self, name)!r} is not one of {allowed}")
    self._check_zoo_fields()
    if self.embed_dim % self.num_heads and not self.head_dim:
      raise ValueError(
        f"model.embed_dim={self.embed_dim} is not divisible by model.num_heads={self.num_heads}; "
        "set model.head_dim explicitly"
      )
    if self.num_heads % self.kv_heads:
      raise ValueError(
        f"model.num_heads={self.num_heads} must be a multiple of model.num_kv_heads={self.kv_heads}"
      )

  def _check_zoo_fields(self):
    """The dense-family switches make sense together (each error names the field and the fix)."""
    types = tuple(self.layer_types)  # a list when read back from JSON
    bad = [t for t in types if t not in LAYER_TYPES]
    if bad:
      raise ValueError(f"model.layer_types has {bad[0]!r}, not one of {LAYER_TYPES}")
    if self.sliding_window < 0 or (SLIDING in types and not self.sliding_window):
      raise ValueError(f"model.sliding_window={self.sliding_window} with layer_types {types}: "
                       "sliding layers need a window size > 0")
    object.__setattr__(self, "layer_types", _canonical_types(types, self.sliding_window))
    if (self.rope_type == "default") != (not self.rope_scaling_factor):
      raise ValueError(f"model.rope_type={self.rope_type!r} with rope_scaling_factor="
                       f"{self.rope_scaling_factor}: a linear or llama3 rope_type needs a factor, "
                       "'default' none")
    if self.logit_softcap and self.loss_chunk:
      raise ValueError("model.loss_chunk's fused LM head does not apply model.logit_softcap; set "
                       "loss_chunk=0")
    if self.num_experts:
      if not 0 < self.experts_per_token <= self.num_experts:
        raise ValueError(f"model.experts_per_token={self.experts_per_token} must be in 1.."
                         f"model.num_experts={self.num_experts}")
      if not self.gated_mlp or self.use_bias:
        raise ValueError("model.num_experts > 0: the experts are SwiGLU MLPs without biases; set "
                         "gated_mlp=True and use_bias=False")
    elif self.experts_per_token or self.router_aux_loss_coef or self.router_z_loss_coef:
      raise ValueError("model.experts_per_token and the router loss coefficients need "
                       "model.num_experts > 0")
    if not self.first_attn_norm and self.norm_position not in ("pre", "sandwich"):
      raise ValueError(f"model.first_attn_norm=False drops a norm before attention, which "
                       f"norm_position={self.norm_position!r} has not; set first_attn_norm=True")
    if self.scan_layers and not self.first_attn_norm:
      raise ValueError("model.scan_layers=True cannot scan a first block without attn_norm "
                       "(model.first_attn_norm=False, ModernBERT); set scan_layers=False")
    if self.norm_offset and self.norm != "rmsnorm":
      raise ValueError(f"model.norm_offset={self.norm_offset} scales RMSNorm only; set "
                       "norm='rmsnorm' or norm_offset=0")

  @property
  def local_layers(self) -> tuple[bool, ...]:
    """For each layer, whether it attends over the sliding window only."""
    if not self.sliding_window:
      return (False,) * self.num_layers
    if not self.layer_types:
      return (True,) * self.num_layers
    n = len(self.layer_types)
    return tuple(self.layer_types[i % n] == SLIDING for i in range(self.num_layers))

  @property
  def mixed_layers(self) -> bool:
    """Some layers slide and some attend fully: scanned, they differ by a per-layer flag."""
    return len(set(self.local_layers)) > 1

  def hf_layer_types(self) -> list[str]:
    """One HF layer type per layer."""
    return [SLIDING if local else FULL for local in self.local_layers]

  @property
  def expert_dim(self) -> int:
    """F of one expert."""
    return self.moe_intermediate_size or self.hidden_dim

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def head_size(self) -> int:
    return self.head_dim or self.embed_dim // self.num_heads

  @property
  def hidden_dim(self) -> int:
    return self.mlp_dim or 4 * self.embed_dim

  def weight_count(self) -> int:
    """About how many parameters the model has: its embeddings and weight matrices (norms, biases
    and heads left out), counted from the config alone, for choices made before JAX starts."""
    D, E, H = self.embed_dim, self.head_size, self.num_heads
    attention = D * E * (H + 2 * self.kv_heads) + H * E * D
    experts = max(self.num_experts, 1)
    mlp = (3 if self.gated_mlp else 2) * D * self.expert_dim * experts
    embeddings = self.vocab_size * D * (1 if self.tie_embeddings else 2)
    if self.position == "learned":
      embeddings += self.max_seq_len * D
    return self.num_layers * (attention + mlp) + embeddings

  def replace(self, **changes: Any) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict) -> "ModelConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
      raise ValueError(f"unknown model config keys {unknown}; valid keys: {sorted(names)}")
    if values.get("rope_scaling_factor") and "rope_type" not in values:
      values = {**values, "rope_type": "llama3"}  # saved before rope_type: a factor was Llama 3's
    return cls(**values)


def _canonical_types(types: tuple, window: int) -> tuple:
  """The shortest pattern that repeats into `types`, () when every layer is what () means: so
  a config read from HF's per-layer list equals the preset written as a pattern."""
  if set(types) == {SLIDING if window else FULL}:
    return ()
  for n in range(1, len(types)):
    if all(t == types[i % n] for i, t in enumerate(types)):
      return types[:n]
  return types


_GPT2 = dict(norm="layernorm", position="learned", activation="gelu_tanh", use_bias=True)
_LLAMA = dict(
  norm="rmsnorm", position="rope", activation="silu", gated_mlp=True, use_bias=False
)

_QWEN3 = dict(_LLAMA, qk_norm="head", norm_eps=1e-6, rope_theta=1000000.0, head_dim=128)
_OLMO2 = dict(_LLAMA, norm_position="res_post", qk_norm="full", norm_eps=1e-6,
              rope_theta=500000.0, tie_embeddings=False)
_GEMMA = dict(norm="rmsnorm", norm_offset=1.0, norm_eps=1e-6, norm_position="sandwich",
              position="rope", activation="gelu_tanh", gated_mlp=True, use_bias=False,
              embed_scale=True, head_dim=256, query_pre_attn_scalar=256.0)
_GEMMA2 = dict(_GEMMA, layer_types=(SLIDING, FULL), attn_logit_softcap=50.0, logit_softcap=30.0)
_GEMMA3 = dict(_GEMMA, qk_norm="head", layer_types=(SLIDING,) * 5 + (FULL,),
               rope_theta=1000000.0, rope_local_theta=10000.0)

_MIXTRAL = dict(_LLAMA, num_experts=8, experts_per_token=2, norm_topk_prob=True,
                router_aux_loss_coef=0.001, tie_embeddings=False)
_QWEN3_MOE = dict(_QWEN3, num_experts=128, experts_per_token=8, router_aux_loss_coef=0.001,
                  tie_embeddings=False)

_BERT = dict(norm="layernorm", position="learned", activation="gelu", use_bias=True,
             causal=False, norm_position="post", embed_norm=True, type_vocab_size=2,
             norm_eps=1e-12, pooler=True, max_seq_len=512, head="base")
_ROBERTA = dict(_BERT, type_vocab_size=1, norm_eps=1e-5, position_offset=2, max_seq_len=514)
# ModernBERT: pre-norm, bias-free LayerNorm, GeGLU, RoPE with a local base for the sliding layers
# (every third layer global, the others see 64 keys each side), the normed embeddings entering
# the first block without another norm
_MODERNBERT = dict(norm="layernorm", norm_eps=1e-5, position="rope", rope_theta=160000.0,
                   rope_local_theta=10000.0, activation="gelu", gated_mlp=True, use_bias=False,
                   causal=False, embed_norm=True, first_attn_norm=False, prediction_head=True,
                   head_bias=False, sliding_window=128, layer_types=(FULL, SLIDING, SLIDING),
                   max_seq_len=8192, head="base")

PRESETS: dict[str, dict[str, Any]] = {
  # nanoGPT's character-level Shakespeare model (CPU recipe).
  "nanogpt-char": dict(_GPT2, num_layers=4, embed_dim=128, num_heads=4, max_seq_len=64,
                       use_bias=False, activation="gelu"),
  "gpt2": dict(_GPT2, vocab_size=50257, num_layers=12, embed_dim=768, num_heads=12),
  "gpt2-medium": dict(_GPT2, vocab_size=50257, num_layers=24, embed_dim=1024, num_heads=16),
  "gpt2-large": dict(_GPT2, vocab_size=50257, num_layers=36, embed_dim=1280, num_heads=20),
  "gpt2-xl": dict(_GPT2, vocab_size=50257, num_layers=48, embed_dim=1600, num_heads=25),
  "llama2-7b": dict(_LLAMA, vocab_size=32000, num_layers=32, embed_dim=4096, num_heads=32,
                    mlp_dim=11008, max_seq_len=4096, norm_eps=1e-5, tie_embeddings=False),
  "llama3-8b": dict(_LLAMA, vocab_size=128256, num_layers=32, embed_dim=4096, num_heads=32,
                    num_kv_heads=8, mlp_dim=14336, max_seq_len=8192, rope_theta=500000.0,
                    tie_embeddings=False),
  "mistral-7b": dict(_LLAMA, vocab_size=32000, num_layers=32, embed_dim=4096, num_heads=32,
                     num_kv_heads=8, mlp_dim=14336, max_seq_len=32768, sliding_window=4096,
                     tie_embeddings=False),
  "qwen2-0.5b": dict(_LLAMA, vocab_size=151936, num_layers=24, embed_dim=896, num_heads=14,
                     num_kv_heads=2, mlp_dim=4864, max_seq_len=32768, rope_theta=1000000.0,
                     norm_eps=1e-6, qkv_bias=True),
  "qwen3-0.6b": dict(_QWEN3, vocab_size=151936, num_layers=28, embed_dim=1024, num_heads=16,
                     num_kv_heads=8, mlp_dim=3072, max_seq_len=40960),
  "qwen3-8b": dict(_QWEN3, vocab_size=151936, num_layers=36, embed_dim=4096, num_heads=32,
                   num_kv_heads=8, mlp_dim=12288, max_seq_len=40960, tie_embeddings=False),
  "gemma2-2b": dict(_GEMMA2, vocab_size=256000, num_layers=26, embed_dim=2304, num_heads=8,
                    num_kv_heads=4, mlp_dim=9216, max_seq_len=8192, sliding_window=4096),
  "gemma3-1b": dict(_GEMMA3, vocab_size=262144, num_layers=26, embed_dim=1152, num_heads=4,
                    num_kv_heads=1, mlp_dim=6912, max_seq_len=32768, sliding_window=512),
  # the text model of Gemma 3 4B (its vision tower is not implemented)
  "gemma3-4b": dict(_GEMMA3, vocab_size=262208, num_layers=34, embed_dim=2560, num_heads=8,
                    num_kv_heads=4, mlp_dim=10240, max_seq_len=131072, sliding_window=1024,
                    rope_type="linear", rope_scaling_factor=8.0),
  "olmo2-1b": dict(_OLMO2, vocab_size=100352, num_layers=16, embed_dim=2048, num_heads=16,
                   mlp_dim=8192, max_seq_len=4096),
  "smollm2-135m": dict(_LLAMA, vocab_size=49152, num_layers=30, embed_dim=576, num_heads=9,
                       num_kv_heads=3, mlp_dim=1536, max_seq_len=8192, rope_theta=100000.0),
  "mixtral-8x7b": dict(_MIXTRAL, vocab_size=32000, num_layers=32, embed_dim=4096, num_heads=32,
                       num_kv_heads=8, mlp_dim=14336, max_seq_len=32768, rope_theta=1e6),
  "qwen3-30b-a3b": dict(_QWEN3_MOE, vocab_size=151936, num_layers=48, embed_dim=2048,
                        num_heads=32, num_kv_heads=4, mlp_dim=6144, moe_intermediate_size=768,
                        max_seq_len=40960, norm_topk_prob=True),
  "bert-base": dict(_BERT, vocab_size=30522, num_layers=12, embed_dim=768, num_heads=12),
  "bert-large": dict(_BERT, vocab_size=30522, num_layers=24, embed_dim=1024, num_heads=16),
  # sentence-transformers/all-MiniLM-L6-v2 (nreimers/MiniLM-L6-H384-uncased)
  "minilm-l6": dict(_BERT, vocab_size=30522, num_layers=6, embed_dim=384, num_heads=12),
  # a 4-layer BERT for MLM pretraining from scratch on a CPU or one GPU
  "bert-mini": dict(_BERT, vocab_size=30522, num_layers=4, embed_dim=256, num_heads=4),
  "roberta-base": dict(_ROBERTA, vocab_size=50265, num_layers=12, embed_dim=768, num_heads=12),
  "roberta-large": dict(_ROBERTA, vocab_size=50265, num_layers=24, embed_dim=1024, num_heads=16),
  # answerdotai/ModernBERT-base (transformers' ModernBertConfig() defaults)
  "modernbert-base": dict(_MODERNBERT, vocab_size=50368, num_layers=22, embed_dim=768,
                          num_heads=12, mlp_dim=1152),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
  """Returns the named preset, with `overrides` applied."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
  return ModelConfig(**{**PRESETS[name], **overrides})
