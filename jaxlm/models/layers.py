"""Transformer building blocks: norms, rotary positions, attention (MHA/GQA) and MLPs.

Shape letters: B batch, T query length, S key length, D model dim, H heads, K kv heads,
E head dim, F mlp dim, V vocab. Every parameter carries logical axis names (see sharding.py).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxlm.models import kernels
from jaxlm.models.config import ACTIVATIONS, ModelConfig

# checkpoint_name of each attention's output (before its out-projection), kept by model.remat=
# "attention"
ATTENTION_OUT = "attention_out"


def gelu_exact(x):
  """Exact GELU, x/2 (1 + erf(x/sqrt 2)), the formula of PyTorch's `nn.GELU()`.

  `jax.nn.gelu(approximate=False)` computes it through erfc, which XLA:CPU evaluates piecewise
  with an exp; through erf an MLP's forward and backward pass runs 2.7x faster on the CPU
  (docs/performance.md), and the values stay within 2e-6 of erfc's.
  """
  return x * 0.5 * (1.0 + jax.lax.erf(x * jnp.asarray(0.5 ** 0.5, x.dtype)))


def activation(name: str):
  """The function of the MLP nonlinearity `name`, a key of models.config.ACTIVATIONS."""
  function, kwargs = ACTIVATIONS[name]
  return functools.partial(_OWN_ACTIVATIONS.get(function) or getattr(jax.nn, function), **kwargs)


_OWN_ACTIVATIONS = {"gelu_exact": gelu_exact}  # ACTIVATIONS' functions that are not jax.nn's


def param_init(std: float, axes: tuple):
  return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def _zeros(axes: tuple):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def dense(cfg: ModelConfig, eq: str, shape: tuple, axes: tuple, name: str, use_bias: bool,
          std: float | None = None) -> nn.Einsum:
  """A learned linear map `eq` (an einsum with the kernel on the right) whose kernel of `shape`
  and bias carry logical axis names `axes`."""
  out_letters = eq.split("->")[1]
  kernel_letters = eq.split(",")[1].split("->")[0]
  bias_axes = tuple(a for a, letter in zip(axes, kernel_letters) if letter in out_letters)
  return nn.Einsum(
    shape,
    eq,
    use_bias=use_bias,
    dtype=cfg.dtype,
    param_dtype=cfg.param_dtype,
    kernel_init=param_init(cfg.init_std if std is None else std, axes),
    bias_init=_zeros(bias_axes),
    name=name,
  )


def norm(cfg: ModelConfig, name: str) -> nn.Module:
  """LayerNorm (GPT-2) or RMSNorm (Llama), as the config says."""
  ones = nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",))
  if cfg.norm == "rmsnorm":
    return nn.RMSNorm(
      epsilon=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, scale_init=ones, name=name
    )
  return nn.LayerNorm(
    epsilon=cfg.norm_eps,
    use_bias=cfg.use_bias,
    dtype=cfg.dtype,
    param_dtype=cfg.param_dtype,
    scale_init=ones,
    bias_init=_zeros(("norm",)),
    name=name,
  )


def rope_scaling(cfg: ModelConfig) -> tuple | None:
  """Llama-3 RoPE scaling as (factor, low_freq_factor, high_freq_factor, original_max_len), or
  None when the config leaves it off."""
  if not cfg.rope_scaling_factor:
    return None
  return (cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
          cfg.rope_original_max_len)


def rope_frequencies(E: int, theta: float, scaling: tuple | None = None) -> jax.Array:
  """Inverse frequencies [E/2]; with Llama-3 `scaling`, long wavelengths are slowed by `factor`,
  short ones kept, and the band between interpolated smoothly."""
  inv_freq_F = 1.0 / (theta ** (jnp.arange(0, E, 2, dtype=jnp.float32) / E))
  if scaling is None:
    return inv_freq_F
  factor, low, high, original_len = scaling
  wavelen_F = 2 * jnp.pi / inv_freq_F
  smooth_F = jnp.clip((original_len / wavelen_F - low) / (high - low), 0.0, 1.0)
  return (1 - smooth_F) * inv_freq_F / factor + smooth_F * inv_freq_F


def apply_rope(x_BTNE: jax.Array, positions_BT: jax.Array, theta: float,
               scaling: tuple | None = None) -> jax.Array:
  """Rotary embedding in the rotate-half convention (as Hugging Face Llama stores q/k)."""
  E = x_BTNE.shape[-1]
  inv_freq_F = rope_frequencies(E, theta, scaling)
  angles_BTF = positions_BT[..., None].astype(jnp.float32) * inv_freq_F[None, None, :]
  angles_BTE = jnp.concatenate([angles_BTF, angles_BTF], axis=-1)[:, :, None, :]
  x = x_BTNE.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  out = x * jnp.cos(angles_BTE) + rotated * jnp.sin(angles_BTE)
  return out.astype(x_BTNE.dtype)


def attention_mask(segment_ids_BT: jax.Array | None, causal: bool) -> jax.Array | None:
  """Boolean [B, 1, T, T] mask: causal and/or same-segment. None when neither applies."""
  if segment_ids_BT is None:
    return None
  mask_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  if causal:
    T = segment_ids_BT.shape[1]
    mask_BTS &= jnp.tril(jnp.ones((T, T), dtype=bool))[None]
  return mask_BTS[:, None]


def bidirectional_mask(padding_mask_BT: jax.Array | None, segment_ids_BT: jax.Array | None,
                       batch: int, length: int) -> jax.Array:
  """Boolean encoder mask: [B, 1, 1, S] (keys that are not padding), or [B, 1, T, S] when
  segment ids also keep packed sequences apart."""
  if padding_mask_BT is None:
    padding_mask_BT = jnp.ones((batch, length), bool)
  mask_B11S = padding_mask_BT.astype(bool)[:, None, None, :]
  if segment_ids_BT is None:
    return mask_B11S
  return mask_B11S & (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])[:, None]


def attend(q_BTHE, k_BSKE, v_BSKE, mask_B1TS=None, *, impl="xla", segment_ids_BT=None):
  """Causal (or `mask`ed) softmax attention with grouped-query heads; softmax in fp32.

  impl "xla" (see models/kernels.resolve) writes it as two einsums over materialised scores
  (rather than jax.nn.dot_product_attention's XLA path, which is slower to differentiate on
  CPU) under `mask_B1TS` (default causal). A kernel impl (see kernels.KERNELS) attends
  causally within `segment_ids_BT` without materialising scores; it ignores `mask_B1TS`.
  """
  if impl != "xla":
    return kernels.attend(impl, q_BTHE, k_BSKE, v_BSKE, segment_ids_BT)
  B, T, H, E = q_BTHE.shape
  S, K = k_BSKE.shape[1], k_BSKE.shape[2]
  q_BTKGE = q_BTHE.reshape(B, T, K, H // K, E)
  if T == 1 and mask_B1TS is not None:  # one decode step: multiply-and-sum over the cache
    return _attend_one(q_BTKGE, k_BSKE, v_BSKE, mask_B1TS).reshape(B, T, H, E)
  logits_BKGTS = jnp.einsum("btkge,bske->bkgts", q_BTKGE, k_BSKE,
                            preferred_element_type=jnp.float32) * (E**-0.5)
  if mask_B1TS is None:
    mask_B1TS = jnp.tril(jnp.ones((T, S), bool))[None, None]
  logits_BKGTS = jnp.where(mask_B1TS[:, :, None], logits_BKGTS, jnp.finfo(jnp.float32).min)
  probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BSKE.dtype)
  out_BTKGE = jnp.einsum("bkgts,bske->btkge", probs_BKGTS, v_BSKE)
  return out_BTKGE.reshape(B, T, H, E)


def _attend_one(q_B1KGE, k_BSKE, v_BSKE, mask_B11S):
  """`attend` for one query per row (a decode step) as broadcast multiplies and sums, which
  read the KV cache in its stored [B, S, K, E] layout. As two einsums, XLA's CPU backend copied
  the whole cache into a head-major layout for its dot kernels at every layer of every step."""
  E = q_B1KGE.shape[-1]
  q_BKGE = q_B1KGE[:, 0].astype(jnp.float32)
  logits_BSKG = jnp.sum(q_BKGE[:, None] * k_BSKE[:, :, :, None].astype(jnp.float32), -1)
  logits_BSKG = jnp.where(mask_B11S[:, 0, 0, :, None, None], logits_BSKG * (E**-0.5),
                          jnp.finfo(jnp.float32).min)
  probs_BSKG = jax.nn.softmax(logits_BSKG, axis=1)
  out_BKGE = jnp.sum(probs_BSKG[..., None] * v_BSKE[:, :, :, None].astype(jnp.float32), 1)
  return out_BKGE[:, None].astype(v_BSKE.dtype)


def attention_impl(cfg: ModelConfig, length: int, packed: bool, decode: bool = False) -> str:
  """The attention implementation cfg.attention means for this model, length, batch (`packed`:
  segment ids given) and device; an explicit kernel that cannot run here raises ValueError."""
  return kernels.resolve(cfg.attention, dtype=cfg.dtype, head_dim=cfg.head_size, length=length,
                         packed=packed, causal=cfg.causal, decode=decode)


class DecodeMask(nn.Module):
  """Attention mask while decoding with a KV cache: causal over cache slots, and only within
  the same segment (left padding is segment 0, so real tokens never attend to it).

  The first call (the prefill: no cache yet) keeps its segment ids as the cache and returns the
  training mask over them; `grow_cache` then adds empty slots (segment 0: never attended to).
  Later calls write their segment ids at the cache index and return a [B, 1, T, S] mask over all
  S cache slots.
  """

  @nn.compact
  def __call__(self, segment_ids_BT):
    T = segment_ids_BT.shape[1]
    ready = self.has_variable("cache", "segment_ids")
    seg_BS = self.variable("cache", "segment_ids", lambda: segment_ids_BT.astype(jnp.int32))
    index = self.variable("cache", "index", lambda: jnp.asarray(T, jnp.int32))
    if not ready:
      return attention_mask(segment_ids_BT, causal=True)
    i = index.value
    seg_BS.value = jax.lax.dynamic_update_slice(seg_BS.value, segment_ids_BT.astype(jnp.int32),
                                                (0, i))
    index.value = i + T
    S = seg_BS.value.shape[1]
    causal_TS = jnp.arange(S)[None, :] <= (i + jnp.arange(T))[:, None]
    mask_BTS = (segment_ids_BT[:, :, None] == seg_BS.value[:, None, :]) & causal_TS[None]
    return mask_BTS[:, None]


class KVCache(nn.Module):
  """Keys and values of the tokens decoded so far, [B, S, K, E].

  The first call (the prefill: no cache yet) keeps its keys and values as the cache (S = its
  length, see `grow_cache`); later calls write theirs at the cache index and return all S slots.
  """

  @nn.compact
  def __call__(self, k_BTKE, v_BTKE):
    """Writes the new keys/values at the cache index; returns the whole cache (k, v)."""
    ready = self.has_variable("cache", "k")
    k_cache = self.variable("cache", "k", lambda: k_BTKE)
    v_cache = self.variable("cache", "v", lambda: v_BTKE)
    index = self.variable("cache", "index", lambda: jnp.asarray(k_BTKE.shape[1], jnp.int32))
    if not ready:  # the prefill: attend over the prompt itself
      return k_BTKE, v_BTKE
    i = index.value
    at = (0, i, 0, 0)
    update = lambda cache, new: jax.lax.dynamic_update_slice(cache, new.astype(cache.dtype), at)
    k_cache.value = update(k_cache.value, k_BTKE)
    v_cache.value = update(v_cache.value, v_BTKE)
    index.value = i + k_BTKE.shape[1]
    return k_cache.value, v_cache.value


def grow_cache(cache, length: int):
  """A prefill's "cache" collection (DecodeMask's and KVCache's variables, S slots, any leading
  layer axis) with empty slots appended up to `length`: zero keys and values, segment 0."""
  def grow(path, x):
    name = path[-1].key
    if name == "index":
      return x
    axis = x.ndim - (3 if name in ("k", "v") else 1)  # k, v [..., B, S, K, E]; ids [..., B, S]
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, pad)

  return jax.tree_util.tree_map_with_path(grow, cache)


class Attention(nn.Module):
  """Multi-head / grouped-query self-attention with optional RoPE (and a KV cache to decode)."""

  cfg: ModelConfig
  num_layers_scale: float = 1.0  # std divisor for the output projection (GPT-2 init)
  decode: bool = False  # read and extend the "cache" collection (see KVCache)

  @nn.compact
  def __call__(self, x_BTD, positions_BT, mask, segment_ids_BT=None):
    """`mask` [B, 1, T, S] for the xla path (None: causal); a kernel (cfg.attention) reads
    `segment_ids_BT` instead."""
    cfg = self.cfg
    H, K, E = cfg.num_heads, cfg.kv_heads, cfg.head_size
    qkv_bias = cfg.use_bias or cfg.qkv_bias
    D = cfg.embed_dim
    q_BTHE = dense(cfg, "btd,dhe->bthe", (D, H, E), ("embed", "heads", "head_dim"), "q",
                   qkv_bias)(x_BTD)
    k_BTKE = dense(cfg, "btd,dke->btke", (D, K, E), ("embed", "kv_heads", "head_dim"), "k",
                   qkv_bias)(x_BTD)
    v_BTKE = dense(cfg, "btd,dke->btke", (D, K, E), ("embed", "kv_heads", "head_dim"), "v",
                   qkv_bias)(x_BTD)
    if cfg.position == "rope":
      q_BTHE = apply_rope(q_BTHE, positions_BT, cfg.rope_theta, rope_scaling(cfg))
      k_BTKE = apply_rope(k_BTKE, positions_BT, cfg.rope_theta, rope_scaling(cfg))
    q_BTHE = nn.with_logical_constraint(q_BTHE, ("batch", "length", "heads", "head_dim"))
    if self.decode:
      k_BTKE, v_BTKE = KVCache(name="kv_cache")(k_BTKE, v_BTKE)
    else:  # every query block needs every key: gathered whole when the length is sharded
      k_BTKE = nn.with_logical_constraint(k_BTKE, ("batch", None, "kv_heads", "head_dim"))
      v_BTKE = nn.with_logical_constraint(v_BTKE, ("batch", None, "kv_heads", "head_dim"))
    impl = attention_impl(cfg, x_BTD.shape[1], segment_ids_BT is not None, self.decode)
    out_BTHE = attend(q_BTHE, k_BTKE, v_BTKE, mask, impl=impl, segment_ids_BT=segment_ids_BT)
    out_BTHE = checkpoint_name(out_BTHE, ATTENTION_OUT)
    std = cfg.init_std / self.num_layers_scale
    return OutProjection(cfg, std, name="o")(out_BTHE)


class OutProjection(nn.Module):
  """Attention's output projection, kernel [H, E, D] (the "o" of `dense`'s layout), applied as
  one [H * E, D] matmul: as an einsum contracting (h, e), XLA's CPU backend transposed the
  kernel into [E, H, D] at every call (a copy of every layer's kernel per decode step)."""

  cfg: ModelConfig
  std: float

  @nn.compact
  def __call__(self, x_BTHE):
    cfg = self.cfg
    H, E, D = cfg.num_heads, cfg.head_size, cfg.embed_dim
    kernel = self.param("kernel", param_init(self.std, ("heads", "head_dim", "embed")),
                        (H, E, D), cfg.param_dtype)
    x_BTX, kernel = nn.dtypes.promote_dtype(x_BTHE, kernel, dtype=cfg.dtype)
    y_BTD = x_BTX.reshape(*x_BTX.shape[:-2], H * E) @ kernel.reshape(H * E, D)
    if cfg.use_bias:
      bias = self.param("bias", _zeros(("embed",)), (D,), cfg.param_dtype)
      y_BTD = y_BTD + bias.astype(y_BTD.dtype).reshape((1,) * (y_BTD.ndim - 1) + (D,))
    return y_BTD


class Mlp(nn.Module):
  """GELU MLP (GPT-2) or gated MLP (SwiGLU for Llama)."""

  cfg: ModelConfig
  num_layers_scale: float = 1.0

  @nn.compact
  def __call__(self, x_BTD):
    cfg = self.cfg
    act = activation(cfg.activation)
    D, F = cfg.embed_dim, cfg.hidden_dim
    up = dense(cfg, "btd,df->btf", (D, F), ("embed", "mlp"), "up", cfg.use_bias)
    if cfg.gated_mlp:
      gate = dense(cfg, "btd,df->btf", (D, F), ("embed", "mlp"), "gate", cfg.use_bias)
      h_BTF = act(gate(x_BTD)) * up(x_BTD)
    else:
      h_BTF = act(up(x_BTD))
    h_BTF = nn.with_logical_constraint(h_BTF, ("batch", "length", "mlp"))
    std = cfg.init_std / self.num_layers_scale
    return dense(cfg, "btf,fd->btd", (F, D), ("mlp", "embed"), "down", cfg.use_bias, std)(h_BTF)


class Block(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)).

  With cfg.norm_position="post" (BERT): norm(x + attn(x)), then norm(x + mlp(x)).
  """

  cfg: ModelConfig
  deterministic: bool = True
  decode: bool = False

  @nn.compact
  def __call__(self, x_BTD, positions_BT, mask, segment_ids_BT=None):
    cfg = self.cfg
    scale = (2 * cfg.num_layers) ** 0.5
    drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
    if cfg.norm_position == "post":
      h = Attention(cfg, scale, self.decode, name="attn")(x_BTD, positions_BT, mask,
                                                                segment_ids_BT)
      x_BTD = norm(cfg, "attn_norm")(x_BTD + drop(h))
      h = Mlp(cfg, scale, name="mlp")(x_BTD)
      x_BTD = norm(cfg, "mlp_norm")(x_BTD + drop(h))
      return nn.with_logical_constraint(x_BTD, ("batch", "length", "embed")), None
    h = Attention(cfg, scale, self.decode, name="attn")(
      norm(cfg, "attn_norm")(x_BTD), positions_BT, mask, segment_ids_BT
    )
    x_BTD = x_BTD + drop(h)
    h = Mlp(cfg, scale, name="mlp")(norm(cfg, "mlp_norm")(x_BTD))
    x_BTD = x_BTD + drop(h)
    x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "length", "embed"))
    return x_BTD, None
