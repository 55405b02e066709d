"""The one Transformer: token (+ learned position) embeddings, a stack of blocks, an LM head.

`logits_BTV = Transformer(cfg).apply({"params": params}, tokens_BT)` over a plain pytree.
Encoders (cfg.causal=False) run the same stack; `return_hidden=True` skips the LM head and
jaxlm.models.heads puts task heads on top.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.models.config import ModelConfig
from jaxlm.models.layers import (
  ATTENTION_OUT,
  Block,
  DecodeMask,
  attention_impl,
  attention_mask,
  bidirectional_mask,
  norm,
  param_init,
  sliding_mask,
)

# model.remat -> what the backward pass keeps of each block (None: only the block's input)
_REMAT_POLICIES = {
  "full": None,
  "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
  "attention": jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT),
}


def _block_class(cfg: ModelConfig):
  """Block, wrapped in remat and/or scan as the config asks. A scanned stack of sliding and
  full layers reads each layer's kind as a scanned flag (its last input)."""
  block = Block
  if cfg.remat != "none":
    block = nn.remat(block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
  if cfg.scan_layers:
    block = nn.scan(
      block,
      variable_axes={"params": 0, "cache": 0, "intermediates": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0 if cfg.mixed_layers else nn.broadcast),
      length=cfg.num_layers,
      metadata_params={nn.PARTITION_NAME: "layers"},
    )
  return block


def _masks(cfg: ModelConfig, segment_ids_BT, padding_mask_BT, B: int, T: int):
  """(mask of full layers, mask of sliding layers) for the xla attention path; either None
  where no layer needs it (None for full layers: causal, or a kernel reads the segment ids)."""
  local = cfg.local_layers
  local_mask = None
  if any(local):  # an encoder's window is two-sided, under its padding mask
    local_mask = sliding_mask(segment_ids_BT, cfg.sliding_window, B, T, cfg.causal,
                              padding_mask_BT)
  if all(local):
    return None, local_mask
  packed = segment_ids_BT is not None
  if attention_impl(cfg, T, packed, local=cfg.scan_layers and cfg.mixed_layers) != "xla":
    return None, local_mask  # the kernel reads the segment ids
  if cfg.causal:
    if segment_ids_BT is None and cfg.scan_layers and cfg.mixed_layers:  # chosen on the device
      segment_ids_BT = jnp.ones((B, T), jnp.int32)  # per layer: both masks must be arrays
    return attention_mask(segment_ids_BT, causal=True), local_mask
  return bidirectional_mask(padding_mask_BT, segment_ids_BT, B, T), local_mask


def default_positions(cfg: ModelConfig, padding_mask_BT, batch: int, length: int) -> jax.Array:
  """0..T-1, shifted by cfg.position_offset. With an offset (RoBERTa), positions count real
  tokens only and padding sits at offset - 1 (its padding_idx), as Hugging Face numbers them."""
  positions_BT = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  if not cfg.position_offset:
    return positions_BT
  if padding_mask_BT is None:
    return positions_BT + cfg.position_offset
  real_BT = padding_mask_BT.astype(jnp.int32)
  return jnp.cumsum(real_BT, axis=1) * real_BT + (cfg.position_offset - 1)


class Transformer(nn.Module):
  """Decoder-only Transformer LM (GPT-2, Llama, Qwen, Gemma, OLMo families), or an encoder
  (BERT, RoBERTa, ModernBERT), by configuration."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BT, *, segment_ids_BT=None, positions_BT=None, deterministic=True,
               token_types_BT=None, padding_mask_BT=None, return_hidden=False,
               decode=False, last_only=False):
    """Returns fp32 logits [B, T, V] (or the final hidden states [B, T, D] if return_hidden).

    Args (all but tokens_BT keyword-only: EncoderModel's second argument would be the padding
    mask, so a positional one is ambiguous):
      tokens_BT: int token ids.
      segment_ids_BT: packed-document ids; tokens attend only within their segment.
      positions_BT: position of each token in its document (default 0..T-1).
      deterministic: False enables dropout (needs a "dropout" rng).
      decode: extend the KV cache in the mutable "cache" collection and attend over all of it.
        `init` with decode=True sizes the cache from the input length (see jaxlm/generate.py);
        segment id 0 marks padding there.
      token_types_BT: sentence A/B ids for cfg.type_vocab_size > 0 (default zeros).
      padding_mask_BT: encoders: True for real tokens, False for padding (never attended to).
      return_hidden: skip the LM head.
      last_only: the LM head on the last position only, logits [B, 1, V] (a prefill needs no
        more; with [B, T, V] fp32 logits of a large vocabulary it is most of the memory).
    """
    cfg = self.cfg
    B, T = tokens_BT.shape
    if positions_BT is None:
      positions_BT = default_positions(cfg, padding_mask_BT, B, T)
    embed = nn.Embed(
      cfg.vocab_size,
      cfg.embed_dim,
      dtype=cfg.dtype,
      param_dtype=cfg.param_dtype,
      embedding_init=param_init(cfg.init_std, ("vocab", "embed")),
      name="embed",
    )
    x_BTD = embed(tokens_BT)
    if cfg.embed_scale:  # sqrt(D) rounded to the param dtype first, as Hugging Face's Gemma does
      x_BTD = x_BTD * jnp.asarray(cfg.embed_dim**0.5, cfg.param_dtype).astype(x_BTD.dtype)
    if cfg.position == "learned":
      pos_embed = nn.Embed(
        cfg.max_seq_len,
        cfg.embed_dim,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        embedding_init=param_init(cfg.init_std, ("pos", "embed")),
        name="pos_embed",
      )
      x_BTD = x_BTD + pos_embed(positions_BT)
    if cfg.type_vocab_size:
      if token_types_BT is None:
        token_types_BT = jnp.zeros((B, T), jnp.int32)
      x_BTD = x_BTD + nn.Embed(
        cfg.type_vocab_size, cfg.embed_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        embedding_init=param_init(cfg.init_std, ("pos", "embed")), name="type_embed",
      )(token_types_BT)
    if cfg.embed_norm:
      x_BTD = norm(cfg, "embed_norm")(x_BTD)
    x_BTD = nn.Dropout(cfg.dropout, deterministic=deterministic)(x_BTD)
    x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "length", "embed"))
    if decode:
      if segment_ids_BT is None:
        segment_ids_BT = jnp.ones((B, T), jnp.int32)
      window = cfg.sliding_window if any(cfg.local_layers) else 0
      masks = DecodeMask(window, name="decode_mask")(segment_ids_BT)
    else:
      masks = _masks(cfg, segment_ids_BT, padding_mask_BT, B, T)

    block = _block_class(cfg)
    local_L = cfg.local_layers
    if cfg.scan_layers:
      # mixed layers: one flag per layer, scanned; else every layer is the first one's kind
      flags = jnp.asarray(local_L) if cfg.mixed_layers else None
      stack = block(cfg, deterministic, decode, None if cfg.mixed_layers else local_L[0],
                    name="blocks")
      x_BTD, _ = stack(x_BTD, positions_BT, masks, segment_ids_BT, flags)
    else:
      for i in range(cfg.num_layers):
        x_BTD, _ = block(cfg, deterministic, decode, local_L[i],
                         attn_norm=i > 0 or cfg.first_attn_norm, name=f"block_{i}")(
          x_BTD, positions_BT, masks, segment_ids_BT)

    if cfg.norm_position != "post":  # post-norm blocks already end in a norm
      x_BTD = norm(cfg, "final_norm")(x_BTD)
    if return_hidden:
      return x_BTD
    if last_only:
      x_BTD = x_BTD[:, -1:]
    if cfg.tie_embeddings:
      logits_BTV = embed.attend(x_BTD)
    else:
      head = nn.Dense(
        cfg.vocab_size,
        use_bias=False,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=param_init(cfg.init_std, ("embed", "vocab")),
        name="lm_head",
      )
      logits_BTV = head(x_BTD)
    logits_BTV = nn.with_logical_constraint(logits_BTV, ("batch", "length", "vocab"))
    logits_BTV = logits_BTV.astype(jnp.float32)
    if cfg.logit_softcap:
      logits_BTV = cfg.logit_softcap * jnp.tanh(logits_BTV / cfg.logit_softcap)
    return logits_BTV


def stack_layers(params: dict, num_layers: int) -> dict:
  """block_0..block_{L-1} -> `blocks` with a leading layer axis (the nn.scan layout)."""
  blocks = [params[f"block_{i}"] for i in range(num_layers)]
  rest = {k: v for k, v in params.items() if not k.startswith("block_")}
  return {**rest, "blocks": jax.tree.map(lambda *xs: np.stack(xs), *blocks)}


def unstack_layers(params: dict) -> dict:
  """`blocks` with a leading layer axis -> block_0..block_{L-1}."""
  blocks = params["blocks"]
  n = jax.tree.leaves(blocks)[0].shape[0]
  rest = {k: v for k, v in params.items() if k != "blocks"}
  layers = {f"block_{i}": jax.tree.map(lambda x, i=i: x[i], blocks) for i in range(n)}
  return {**rest, **layers}


def match_layer_layout(params: dict, cfg: ModelConfig) -> dict:
  """`params` in the layout `cfg` builds: stacked for scan_layers, one block each otherwise."""
  if "blocks" in params and not cfg.scan_layers:
    return unstack_layers(params)
  if cfg.scan_layers and "blocks" not in params:
    return stack_layers(params, cfg.num_layers)
  return params
