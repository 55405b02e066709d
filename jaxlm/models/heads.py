"""Task heads on the encoder: masked LM, sequence classification/regression, token
classification and extractive QA: `EncoderModel(cfg)` with cfg.head and cfg.num_labels.

Shape letters as in layers.py, plus C classes. The encoder stack is the one Transformer (run with
return_hidden=True) under the name "transformer"; heads sit beside it.
"""

import functools
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.models.config import ENCODER_HEADS, ModelConfig
from jaxlm.models.layers import activation, norm, param_init
from jaxlm.models.transformer import Transformer


def check_task(cfg: ModelConfig):
  if cfg.head not in ENCODER_HEADS:
    raise ValueError(f"model.head={cfg.head!r} is not an encoder head; choose one of "
                     f"{ENCODER_HEADS}")
  if cfg.causal:
    raise ValueError("an encoder task needs model.causal=False (bidirectional attention)")


def _zeros(axes: tuple):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def _dense(cfg: ModelConfig, features: int, name: str, out_axis=None,
           use_bias: bool = True) -> nn.Dense:
  return nn.Dense(
    features, use_bias=use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
    kernel_init=param_init(cfg.init_std, ("embed", out_axis)), bias_init=_zeros((out_axis,)),
    name=name,
  )


class Pooler(nn.Module):
  """tanh(dense(first token)): BERT's pooler, RoBERTa's classifier.dense."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, first_BD):
    return jnp.tanh(_dense(self.cfg, self.cfg.embed_dim, "dense")(first_BD))


def first_tokens(x_BTD: jax.Array, cls_index_N: jax.Array | None = None) -> jax.Array:
  """Each sequence's first ([CLS]) hidden state: [B, D] from row starts, or [N, D] at the flat
  indices (row * T + column) `cls_index_N` of examples packed several to a row."""
  if cls_index_N is None:
    return x_BTD[:, 0]
  return x_BTD.reshape(-1, x_BTD.shape[-1])[cls_index_N]


def mean_tokens(x_BTD: jax.Array, padding_mask_BT=None, segment_ids_BT=None,
                cls_index_N=None) -> jax.Array:
  """Each sequence's mean hidden state over its real tokens (HF ModernBERT's "mean" pooling):
  [B, D], or [N, D] for examples packed several to a row, each the tokens of its first token's
  segment."""
  B, T, _ = x_BTD.shape
  real_BT = jnp.ones((B, T), bool) if padding_mask_BT is None else padding_mask_BT.astype(bool)
  if cls_index_N is None:
    weight_NT, x_NTD = real_BT, x_BTD
  else:
    if segment_ids_BT is None:
      raise ValueError("mean pooling of packed examples (cls_index_N) needs segment_ids_BT")
    row_N = cls_index_N // T
    segment_N = segment_ids_BT.reshape(-1)[cls_index_N]
    weight_NT = real_BT[row_N] & (segment_ids_BT[row_N] == segment_N[:, None])
    x_NTD = x_BTD[row_N]
  weight_NT = weight_NT.astype(jnp.float32)  # summed in fp32, whatever the compute dtype
  total_ND = jnp.einsum("ntd,nt->nd", x_NTD.astype(jnp.float32), weight_NT)
  return (total_ND / jnp.maximum(weight_NT.sum(-1, keepdims=True), 1)).astype(x_BTD.dtype)


def pool(cfg: ModelConfig, x_BTD, padding_mask_BT=None, segment_ids_BT=None, cls_index_N=None):
  """What a seq_cls head reads of each sequence, by cfg.classifier_pooling."""
  if cfg.classifier_pooling == "mean":
    return mean_tokens(x_BTD, padding_mask_BT, segment_ids_BT, cls_index_N)
  return first_tokens(x_BTD, cls_index_N)


def _transform(cfg: ModelConfig, x_BTD, dense_name: str):
  """dense + activation + norm, as submodules of the calling module's compact method."""
  h_BTD = _dense(cfg, cfg.embed_dim, dense_name, use_bias=cfg.head_bias)(x_BTD)
  return norm(cfg, "norm")(activation(cfg.activation)(h_BTD))


class PredictionHead(nn.Module):
  """dense + activation + norm before a task head's classifier (cfg.prediction_head: HF
  ModernBERT's `head`); the MLM head starts with the same transform."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD):
    return _transform(self.cfg, x_BTD, "dense")


class MlmHead(nn.Module):
  """dense + activation + norm, then the decoder tied to the token embedding, plus a bias."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, embedding_VD):
    cfg = self.cfg
    h_BTD = _transform(cfg, x_BTD, "transform")
    bias_V = self.param("bias", _zeros(("vocab",)), (cfg.vocab_size,), cfg.param_dtype)
    logits_BTV = jnp.einsum("btd,vd->btv", h_BTD, embedding_VD.astype(h_BTD.dtype))
    return logits_BTV + bias_V.astype(logits_BTV.dtype)[None, None, :]


class EncoderModel(nn.Module):
  """An encoder Transformer with one task head, cfg.head:

  base (returns {"hidden": [B,T,D], "pooled": [B,D] or None}), mlm ([B,T,V]),
  seq_cls ([B,C]; C=1 is regression), token_cls ([B,T,C]) or qa ([B,T,2]: start, end).
  seq_cls reads the first token or the mean (cfg.classifier_pooling) through BERT's pooler, or
  with cfg.prediction_head (ModernBERT) through dense + activation + norm, as token_cls and qa.
  Packed rows (several examples per row) pass segment_ids and positions; seq_cls then also
  takes cls_index_N and returns [N, C], one row per example.
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BT, *, padding_mask_BT=None, token_types_BT=None, deterministic=True,
               positions_BT=None, segment_ids_BT=None, cls_index_N=None):
    """Runs the encoder and the head; fp32 outputs. Args as in Transformer.__call__ (keyword-only
    there and here, since a positional second argument means different things in the two)."""
    cfg = self.cfg
    check_task(cfg)
    backbone = Transformer(cfg, name="transformer")
    x_BTD = backbone(tokens_BT, segment_ids_BT=segment_ids_BT, positions_BT=positions_BT,
                     deterministic=deterministic, token_types_BT=token_types_BT,
                     padding_mask_BT=padding_mask_BT, return_hidden=True)
    drop = nn.Dropout(cfg.dropout, deterministic=deterministic)
    if cfg.head == "base":
      pooled_BD = Pooler(cfg, name="pooler")(first_tokens(x_BTD)) if cfg.pooler else None
      return {"hidden": _fp32(x_BTD), "pooled": _fp32(pooled_BD)}
    if cfg.head == "mlm":
      embedding_VD = nn.unbox(backbone.variables["params"]["embed"]["embedding"])
      return _fp32(MlmHead(cfg, name="mlm_head")(x_BTD, embedding_VD))
    if cfg.head == "seq_cls":
      first_BD = pool(cfg, x_BTD, padding_mask_BT, segment_ids_BT, cls_index_N)
      if cfg.position_offset:  # RoBERTa's classification head drops out its input as well
        first_BD = drop(first_BD)
      transform = PredictionHead(cfg, name="head") if cfg.prediction_head else Pooler(
        cfg, name="pooler")
      return _fp32(_dense(cfg, cfg.num_labels, "classifier")(drop(transform(first_BD))))
    if cfg.prediction_head:  # ModernBERT: token_cls and qa read the prediction head, dropped out
      x_BTD = drop(PredictionHead(cfg, name="head")(x_BTD))
    elif cfg.head == "token_cls":
      x_BTD = drop(x_BTD)
    if cfg.head == "token_cls":
      return _fp32(_dense(cfg, cfg.num_labels, "classifier")(x_BTD))
    return _fp32(_dense(cfg, 2, "qa_outputs")(x_BTD))


def _fp32(x: jax.Array | None):
  return None if x is None else x.astype(jnp.float32)


def with_new_head(cfg: ModelConfig, pretrained: dict, what: str = "the checkpoint",
                  seed: int = 0) -> dict:
  """Params of EncoderModel(cfg): the encoder (and any head part of the same shape, such as
  BERT's pooler) from `pretrained`, the rest freshly initialised. Prints what was initialised."""
  from flax import traverse_util

  model = EncoderModel(cfg)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(seed), jnp.zeros((1, 1), jnp.int32))
  target = traverse_util.flatten_dict(nn.unbox(shapes)["params"], sep="/")
  have = traverse_util.flatten_dict(pretrained, sep="/")
  fresh = sorted(k for k, v in target.items() if k not in have or have[k].shape != v.shape)
  init = jax.jit(lambda r: nn.unbox(model.init(r, jnp.zeros((1, 1), jnp.int32)))["params"])
  new = traverse_util.flatten_dict(jax.device_get(init(jax.random.PRNGKey(seed))), sep="/")
  out = {k: (new[k] if k in fresh else have[k]) for k in target}
  print(f"jaxlm: {what} has no {cfg.head!r} head with {cfg.num_labels} labels; initialised "
        f"{', '.join(fresh)}", file=sys.stderr)
  return traverse_util.unflatten_dict(out, sep="/")


@functools.lru_cache(maxsize=16)
def param_shapes(model: nn.Module) -> dict:
  """`model`'s params as ShapeDtypeStructs boxed with their logical axis names, from one
  abstract init (nothing allocated), traced once per model: loading a run needs them several
  times, and a launch whose programs come from the compilation cache is mostly tracing. Shared:
  do not modify the result."""
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]


def build_model(cfg: ModelConfig) -> nn.Module:
  """The one Transformer as `cfg` configures it: a decoder LM, or (causal=False) an encoder with
  its cfg.head."""
  return Transformer(cfg) if cfg.causal else EncoderModel(cfg)
