"""ModelConfig: every size and family switch of the one Transformer, plus named presets.

A family (GPT-2, Llama, Mistral, Qwen2, SmolLM, BERT, RoBERTa) is a ModelConfig, never a copy of
the model code.
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
NORM_POSITIONS = ("pre", "post")
ENCODER_HEADS = ("base", "mlm", "seq_cls", "token_cls", "qa")  # the task heads of models.heads
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
              "attention", "loss_chunk", "matmul_precision")


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
  rope_scaling_factor: float = 0.0  # Llama-3 RoPE scaling (rope_type llama3); 0 = off
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
  head: str = "lm"  # lm (decoders) | one of ENCODER_HEADS
  num_labels: int = 2  # classes of a seq_cls / token_cls head (1 = regression)

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
    ):
      if getattr(self, name) not in allowed:
        raise ValueError(f"model.{name}={getattr(self, name)!r} is not one of {allowed}")
    if self.embed_dim % self.num_heads and not self.head_dim:
      raise ValueError(
        f"model.embed_dim={self.embed_dim} is not divisible by model.num_heads={self.num_heads}; "
        "set model.head_dim explicitly"
      )
    if self.num_heads % self.kv_heads:
      raise ValueError(
        f"model.num_heads={self.num_heads} must be a multiple of model.num_kv_heads={self.kv_heads}"
      )

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def head_size(self) -> int:
    return self.head_dim or self.embed_dim // self.num_heads

  @property
  def hidden_dim(self) -> int:
    return self.mlp_dim or 4 * self.embed_dim

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
    return cls(**values)


_GPT2 = dict(norm="layernorm", position="learned", activation="gelu_tanh", use_bias=True)
_LLAMA = dict(
  norm="rmsnorm", position="rope", activation="silu", gated_mlp=True, use_bias=False
)

_BERT = dict(norm="layernorm", position="learned", activation="gelu", use_bias=True,
             causal=False, norm_position="post", embed_norm=True, type_vocab_size=2,
             norm_eps=1e-12, pooler=True, max_seq_len=512, head="base")
_ROBERTA = dict(_BERT, type_vocab_size=1, norm_eps=1e-5, position_offset=2, max_seq_len=514)

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
                     num_kv_heads=8, mlp_dim=14336, max_seq_len=32768, tie_embeddings=False),
  "qwen2-0.5b": dict(_LLAMA, vocab_size=151936, num_layers=24, embed_dim=896, num_heads=14,
                     num_kv_heads=2, mlp_dim=4864, max_seq_len=32768, rope_theta=1000000.0,
                     norm_eps=1e-6, qkv_bias=True),
  "smollm2-135m": dict(_LLAMA, vocab_size=49152, num_layers=30, embed_dim=576, num_heads=9,
                       num_kv_heads=3, mlp_dim=1536, max_seq_len=8192, rope_theta=100000.0),
  "bert-base": dict(_BERT, vocab_size=30522, num_layers=12, embed_dim=768, num_heads=12),
  "bert-large": dict(_BERT, vocab_size=30522, num_layers=24, embed_dim=1024, num_heads=16),
  # sentence-transformers/all-MiniLM-L6-v2 (nreimers/MiniLM-L6-H384-uncased)
  "minilm-l6": dict(_BERT, vocab_size=30522, num_layers=6, embed_dim=384, num_heads=12),
  # a 4-layer BERT for MLM pretraining from scratch on a CPU or one GPU
  "bert-mini": dict(_BERT, vocab_size=30522, num_layers=4, embed_dim=256, num_heads=4),
  "roberta-base": dict(_ROBERTA, vocab_size=50265, num_layers=12, embed_dim=768, num_heads=12),
  "roberta-large": dict(_ROBERTA, vocab_size=50265, num_layers=24, embed_dim=1024, num_heads=16),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
  """Returns the named preset, with `overrides` applied."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
  return ModelConfig(**{**PRESETS[name], **overrides})
