"""Sparse mixture of experts (Mixtral, Qwen3-MoE): a softmax router picks each token's top-k
experts; the routed rows, sorted by expert, go through one grouped matmul per projection (dropless:
no capacity, no token dropped); the router's statistics feed the load-balancing and z losses.

Shape letters (besides layers.py's): N tokens (B * T), X experts, C experts chosen per token (the
top k), M = N * C routed rows, G row tiles of the CPU grouped matmul, R rows per tile.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.models import linear
from jaxlm.models.config import ModelConfig

# the name under which each MoE layer sows its router statistics ("intermediates" collection)
STATS = "moe_stats"


def route(logits_NX, k: int, normalize: bool):
  """The top-`k` experts of each token and their weights, as Hugging Face's routers compute them:
  softmax over all experts in fp32, top k, divided by their sum when `normalize` (Mixtral always,
  Qwen3-MoE's norm_topk_prob).

  Returns:
    (weights_NC fp32, experts_NC int32, probs_NX fp32).
  """
  probs_NX = jax.nn.softmax(logits_NX.astype(jnp.float32), axis=-1)
  weights_NC, experts_NC = jax.lax.top_k(probs_NX, k)
  if normalize:
    weights_NC = weights_NC / weights_NC.sum(-1, keepdims=True)
  return weights_NC, experts_NC.astype(jnp.int32), probs_NX


def grouped_impl() -> str:
  """How the experts' grouped matmul runs here: `jax.lax.ragged_dot` on GPU and TPU; on CPU,
  where ragged_dot lowers to a dense product over every expert, row tiles of one expert each."""
  return "tiled" if jax.default_backend() == "cpu" else "ragged"


def _tile_rows(M: int, X: int) -> int:
  """Rows per tile: a power of two in [8, 128] with at most M / 2 padding rows (X * R)."""
  R = 8
  while R < 128 and X * R * 2 <= M // 2:
    R *= 2
  return R


def _tiled_swiglu(xs_MD, experts_M, sizes_X, gate_XDF, up_XDF, down_XFD, act):
  """SwiGLU experts over rows sorted by expert, each expert's rows padded to whole tiles of R rows:
  one batched matmul over G <= M / R + X tiles, each with its expert's weights. The FLOPs count the
  routed rows (and the padding), not N * X as a dense product over every expert would; the
  weights are gathered per tile (G copies of an expert's matrices), a cost meant for CPU runs of
  small models."""
  M, D = xs_MD.shape
  X = sizes_X.shape[0]
  R = _tile_rows(M, X)
  G = (M + X * (R - 1)) // R
  padded_X = (sizes_X + R - 1) // R * R
  start_X = jnp.cumsum(sizes_X) - sizes_X
  padded_end_X = jnp.cumsum(padded_X)
  dest_M = (padded_end_X - padded_X)[experts_M] + jnp.arange(M) - start_X[experts_M]
  x_GRD = jnp.zeros((G * R, D), xs_MD.dtype).at[dest_M].set(xs_MD).reshape(G, R, D)
  tile_expert_G = jnp.minimum(jnp.searchsorted(padded_end_X, jnp.arange(G) * R, side="right"),
                              X - 1)
  h_GRF = act(jnp.einsum("grd,gdf->grf", x_GRD, gate_XDF[tile_expert_G]))
  h_GRF = h_GRF * jnp.einsum("grd,gdf->grf", x_GRD, up_XDF[tile_expert_G])
  y_GRD = jnp.einsum("grf,gfd->grd", h_GRF, down_XFD[tile_expert_G])
  return y_GRD.reshape(G * R, D)[dest_M]


def _ragged_swiglu(xs_MD, sizes_X, gate_XDF, up_XDF, down_XFD, act):
  """SwiGLU experts over rows sorted by expert, by jax.lax.ragged_dot (one call a projection)."""
  h_MF = act(jax.lax.ragged_dot(xs_MD, gate_XDF, sizes_X))
  h_MF = h_MF * jax.lax.ragged_dot(xs_MD, up_XDF, sizes_X)
  return jax.lax.ragged_dot(h_MF, down_XFD, sizes_X)


def experts_swiglu(x_ND, weights_NC, experts_NC, gate_XDF, up_XDF, down_XFD, act, *,
                   impl: str | None = None):
  """sum over each token's C experts of weight * down(act(x gate) * (x up)), dropless.

  The N * C routed rows are sorted by expert (a stable sort: rows keep token order within an
  expert), pass through the grouped matmul (`impl` "ragged" or "tiled", default grouped_impl()),
  and are added back to their tokens, weighted, in fp32.
  """
  N, D = x_ND.shape
  C, X = experts_NC.shape[1], gate_XDF.shape[0]
  experts_M = experts_NC.reshape(-1)
  order_M = jnp.argsort(experts_M, stable=True)
  token_M = order_M // C
  sorted_experts_M = experts_M[order_M]
  sizes_X = jnp.zeros((X,), jnp.int32).at[experts_M].add(1)
  xs_MD = x_ND[token_M]
  if (impl or grouped_impl()) == "ragged":
    ys_MD = _ragged_swiglu(xs_MD, sizes_X, gate_XDF, up_XDF, down_XFD, act)
  else:
    ys_MD = _tiled_swiglu(xs_MD, sorted_experts_M, sizes_X, gate_XDF, up_XDF, down_XFD, act)
  w_M = weights_NC.reshape(-1)[order_M]
  out_ND = jnp.zeros((N, D), jnp.float32).at[token_M].add(ys_MD.astype(jnp.float32) * w_M[:, None])
  return out_ND.astype(x_ND.dtype)


def router_stats(logits_NX, probs_NX, experts_NC) -> dict:
  """One layer's router statistics, sums over its tokens (fp32): routed rows per expert
  (`tokens` [X]), router probabilities per expert (`probs` [X]), squared logsumexp of the logits
  (`z`) and the token count (`rows`). Sums, so layers and micro-batches combine by adding."""
  X = probs_NX.shape[-1]
  tokens_X = jax.nn.one_hot(experts_NC, X, dtype=jnp.float32).sum((0, 1))
  lse_N = jax.nn.logsumexp(logits_NX.astype(jnp.float32), axis=-1)
  return {"tokens": jax.lax.stop_gradient(tokens_X), "probs": probs_NX.sum(0),
          "z": jnp.sum(lse_N**2), "rows": jnp.asarray(probs_NX.shape[0], jnp.float32)}


def _init(std: float, axes: tuple):
  return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


class Router(nn.Module):
  """The router's logits [N, X] = x [N, D] @ kernel [D, X] (no bias), in cfg.dtype."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_ND):
    cfg = self.cfg
    shape = (cfg.embed_dim, cfg.num_experts)
    kernel = linear.kernel_param(self, _init(cfg.init_std, ("embed", None)), shape,
                                 cfg.param_dtype)
    return linear.project(self, jnp.matmul, x_ND, kernel, n_in=1, dtype=cfg.dtype)


class MoeMlp(nn.Module):
  """A sparse MoE MLP: a bias-free router [D, X] and X SwiGLU experts (gate, up [X, D, F], down
  [X, F, D]) whose leading axis has the logical name "expert"; `act` is the gate's nonlinearity.
  Sows its router statistics in the "intermediates" collection (STATS) when that collection is
  mutable."""

  cfg: ModelConfig
  num_layers_scale: float = 1.0

  @nn.compact
  def __call__(self, x_BTD, act):
    cfg = self.cfg
    B, T, D = x_BTD.shape
    X, C, F = cfg.num_experts, cfg.experts_per_token, cfg.expert_dim
    x_ND = x_BTD.reshape(B * T, D)
    logits_NX = Router(cfg, name="router")(x_ND)
    weights_NC, experts_NC, probs_NX = route(logits_NX, C, cfg.norm_topk_prob)
    std = cfg.init_std
    gate_XDF = self.param("gate", _init(std, ("expert", "embed", "mlp")), (X, D, F),
                          cfg.param_dtype)
    up_XDF = self.param("up", _init(std, ("expert", "embed", "mlp")), (X, D, F), cfg.param_dtype)
    down_XFD = self.param("down", _init(std / self.num_layers_scale, ("expert", "mlp", "embed")),
                          (X, F, D), cfg.param_dtype)
    cast = lambda w: jnp.asarray(w, cfg.dtype)
    y_ND = experts_swiglu(jnp.asarray(x_ND, cfg.dtype), weights_NC, experts_NC, cast(gate_XDF),
                          cast(up_XDF), cast(down_XFD), act)
    self.sow("intermediates", STATS, router_stats(logits_NX, probs_NX, experts_NC))
    return y_ND.reshape(B, T, D)


# --- the losses over a forward pass's statistics (every layer's) ---

def collect_stats(intermediates) -> dict | None:
  """The router statistics the MoE layers sowed, stacked over the layers in layer order
  ({name: [L, ...]}), from a Transformer's "intermediates" (scanned or not); None if none."""
  found = []

  def visit(tree, path):
    for key, value in tree.items():
      if key == STATS:
        found.append((path, value[0]))
      elif isinstance(value, dict) or hasattr(value, "items"):
        visit(value, f"{path}/{key}")

  visit(intermediates, "")
  if not found:
    return None
  if len(found) == 1 and "/blocks" in found[0][0]:  # scanned: already [L, ...]
    return dict(found[0][1])
  found.sort(key=lambda e: int(re.search(r"block_(\d+)", e[0]).group(1)))
  return {k: jnp.stack([s[k] for _, s in found]) for k in found[0][1]}


def load_balancing_loss(stats: dict) -> jax.Array:
  """Switch Transformer's load-balancing loss as transformers' `load_balancing_loss_func`
  computes it over all layers at once: X * sum_x f_x P_x, f_x the routed rows of expert x per
  token, P_x its mean router probability, both pooled over layers and tokens."""
  rows = stats["rows"].sum()
  X = stats["probs"].shape[-1]
  return X * jnp.sum(stats["tokens"].sum(0) / rows * stats["probs"].sum(0) / rows)


def router_z_loss(stats: dict) -> jax.Array:
  """ST-MoE's router z-loss: the mean over layers and tokens of logsumexp(router logits)^2."""
  return stats["z"].sum() / stats["rows"].sum()


def expert_load(stats: dict) -> jax.Array:
  """Per layer, the most routed rows of an expert over the mean per expert ([L]; 1 = balanced)."""
  tokens_LX = stats["tokens"]
  return tokens_LX.max(-1) / jnp.maximum(tokens_LX.mean(-1), 1e-9)
