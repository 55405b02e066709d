"""Transformer building blocks: norms, rotary positions, attention (MHA/GQA) and MLPs.

Shape letters: B batch, T query length, S key length, D model dim, H heads, K kv heads,
E head dim, F mlp dim, V vocab. Every parameter carries logical axis names (see sharding.py).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from jaxlm.models import kernels, linear, moe
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
          std: float | None = None) -> "Dense":
  """A learned linear map `eq` (an einsum with the kernel on the right) whose kernel of `shape`
  and bias carry logical axis names `axes`."""
  return Dense(cfg, eq, shape, axes, use_bias, cfg.init_std if std is None else std, name=name)


class Dense(nn.Module):
  """nn.Einsum's linear map (the same params, the same values), its kernel applied through
  linear.project: with LoRA a frozen (maybe quantized) kernel is dequantized as it is used and
  an adapter beside it adds its low-rank branch."""

  cfg: ModelConfig
  eq: str
  shape: tuple
  axes: tuple
  use_bias: bool
  std: float

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    kernel_letters, out_letters = self.eq.split(",")[1].split("->")
    kernel = linear.kernel_param(self, param_init(self.std, self.axes), self.shape,
                                 cfg.param_dtype)
    y = linear.project(self, functools.partial(jnp.einsum, self.eq), x, kernel,
                       n_in=sum(c not in out_letters for c in kernel_letters), dtype=cfg.dtype)
    if not self.use_bias:
      return y
    kept = [i for i, c in enumerate(kernel_letters) if c in out_letters]
    bias = self.param("bias", _zeros(tuple(self.axes[i] for i in kept)),
                      tuple(self.shape[i] for i in kept), cfg.param_dtype)
    to_out = tuple(self.shape[kernel_letters.index(c)] if c in kernel_letters else 1
                   for c in out_letters)
    return y + jnp.asarray(bias, cfg.dtype).reshape(to_out)


def norm(cfg: ModelConfig, name: str) -> nn.Module:
  """LayerNorm (GPT-2) or RMSNorm (Llama; scaled by 1 + w for Gemma), as the config says."""
  ones = nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",))
  if cfg.norm == "rmsnorm":
    if cfg.norm_offset:
      return RMSNorm(cfg, ("norm",), name=name)
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


class RMSNorm(nn.Module):
  """RMSNorm over the trailing len(axes) axes (their logical names), scaled by
  (cfg.norm_offset + w) in fp32 before the cast back, as Hugging Face's Gemma computes it; w
  starts at 1 - offset, so every variant starts as the plain normalisation."""

  cfg: ModelConfig
  axes: tuple = ("norm",)

  @nn.compact
  def __call__(self, x):
    cfg, n = self.cfg, len(self.axes)
    init = nn.with_logical_partitioning(nn.initializers.constant(1.0 - cfg.norm_offset), self.axes)
    scale = self.param("scale", init, x.shape[-n:], cfg.param_dtype)
    x32 = x.astype(jnp.float32)
    ms = jnp.mean(x32 * x32, axis=tuple(range(-n, 0)), keepdims=True)
    scale = (cfg.norm_offset + scale.astype(jnp.float32)).reshape((1,) * (x.ndim - n) + scale.shape)
    return (x32 * jax.lax.rsqrt(ms + cfg.norm_eps) * scale).astype(cfg.dtype)


def qk_norm(cfg: ModelConfig, name: str, heads_axis: str) -> RMSNorm:
  """cfg.qk_norm's RMSNorm of queries or keys [B, T, heads, E]: over E (per head) or over
  heads and E together (the whole projection)."""
  axes = ("head_dim",) if cfg.qk_norm == "head" else (heads_axis, "head_dim")
  return RMSNorm(cfg, axes, name=name)


def rope_scaling(cfg: ModelConfig) -> tuple | None:
  """The config's RoPE scaling of full layers: (factor,) linear, (factor, low_freq_factor,
  high_freq_factor, original_max_len) Llama 3, or None."""
  if cfg.rope_type == "linear":
    return (cfg.rope_scaling_factor,)
  if cfg.rope_type == "llama3":
    return (cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
            cfg.rope_original_max_len)
  return None


def rope_frequencies(E: int, theta: float, scaling: tuple | None = None) -> jax.Array:
  """Inverse frequencies [E/2]; linear `scaling` divides them all by its factor; Llama-3
  `scaling` slows long wavelengths by `factor`, keeps short ones, and interpolates between."""
  inv_freq_F = 1.0 / (theta ** (jnp.arange(0, E, 2, dtype=jnp.float32) / E))
  if scaling is None:
    return inv_freq_F
  if len(scaling) == 1:
    return inv_freq_F / scaling[0]
  factor, low, high, original_len = scaling
  wavelen_F = 2 * jnp.pi / inv_freq_F
  smooth_F = jnp.clip((original_len / wavelen_F - low) / (high - low), 0.0, 1.0)
  return (1 - smooth_F) * inv_freq_F / factor + smooth_F * inv_freq_F


def layer_rope_frequencies(cfg: ModelConfig, local) -> jax.Array:
  """A layer's inverse frequencies: sliding layers use rope_local_theta unscaled when it is
  set. `local` is a bool, or a traced one in a scanned stack of mixed layers."""
  full_F = rope_frequencies(cfg.head_size, cfg.rope_theta, rope_scaling(cfg))
  if not cfg.rope_local_theta:
    return full_F
  local_F = rope_frequencies(cfg.head_size, cfg.rope_local_theta)
  return pick(local, local_F, full_F)


def pick(local, if_local, if_full):
  """`if_local` for a sliding layer, else `if_full`: chosen in Python for a static `local`,
  on the device in a scanned stack (where it is a traced flag)."""
  if isinstance(local, bool):
    return if_local if local else if_full
  return jnp.where(local, if_local, if_full)


def apply_rope(x_BTNE: jax.Array, positions_BT: jax.Array, theta: float,
               scaling: tuple | None = None) -> jax.Array:
  """Rotary embedding in the rotate-half convention (as Hugging Face Llama stores q/k)."""
  return rotate(x_BTNE, positions_BT, rope_frequencies(x_BTNE.shape[-1], theta, scaling))


def rotate(x_BTNE: jax.Array, positions_BT: jax.Array, inv_freq_F: jax.Array) -> jax.Array:
  """`apply_rope` with the inverse frequencies given."""
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


def sliding_mask(segment_ids_BT: jax.Array | None, window: int, batch: int, length: int,
                 causal: bool = True, padding_mask_BT: jax.Array | None = None) -> jax.Array:
  """Boolean [B, 1, T, T] mask of a sliding layer: same-segment, and key j within the query i's
  window: causal, j > i - window, as Hugging Face's sliding-window mask; else (an encoder, under
  `padding_mask_BT`) two-sided, |i - j| <= window // 2, as Hugging Face's ModernBERT."""
  i = jnp.arange(length)
  if not causal:
    mask_B1TS = bidirectional_mask(padding_mask_BT, segment_ids_BT, batch, length)
    return mask_B1TS & (jnp.abs(i[None, :] - i[:, None]) <= window // 2)[None, None]
  if segment_ids_BT is None:
    segment_ids_BT = jnp.ones((batch, length), jnp.int32)
  in_window_TS = i[None, :] > i[:, None] - window
  return attention_mask(segment_ids_BT, causal=True) & in_window_TS[None, None]


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


# the xla path scores queries QUERY_BLOCK at a time (more for long sequences: at most
# MAX_QUERY_BLOCKS blocks a layer), each against only the keys it can see (causal: those before
# the block's end), with heads leading: on a CPU it ran 3x (T 128) to 5x (T 4,096) faster than one
# [B, K, G, T, S] einsum in the [B, T, H, E] layout, and skips the masked half of the scores
QUERY_BLOCK = 128
MAX_QUERY_BLOCKS = 16


def attend(q_BTHE, k_BSKE, v_BSKE, mask_B1TS=None, *, impl="xla", segment_ids_BT=None,
           scale=None, softcap=0.0, causal=False):
  """Causal (or `mask`ed) softmax attention with grouped-query heads; softmax in fp32.

  impl "xla" (see models/kernels.resolve) materialises the scores of one block of queries at a
  time (`query_blocks`) in a heads-first layout, under `mask_B1TS` (default causal; `causal`
  says the mask is causal too, so a block skips the keys after it), rather than calling
  jax.nn.dot_product_attention, whose XLA path is slower to differentiate on CPU. A kernel impl
  (see kernels.KERNELS) attends causally within `segment_ids_BT` without materialising scores;
  it ignores `mask_B1TS`.
  Scores are scaled by `scale` (default E^-1/2) and, with `softcap` c > 0, capped to
  c tanh(s / c) before the mask (Gemma 2; xla only).
  """
  E = q_BTHE.shape[-1]
  scale = E**-0.5 if scale is None else scale
  if impl != "xla":
    if scale != E**-0.5:  # the kernels scale by E^-1/2
      q_BTHE = q_BTHE * jnp.asarray(scale * E**0.5, q_BTHE.dtype)
    return kernels.attend(impl, q_BTHE, k_BSKE, v_BSKE, segment_ids_BT)
  B, T, H, E = q_BTHE.shape
  S, K = k_BSKE.shape[1], k_BSKE.shape[2]
  q_BTKGE = q_BTHE.reshape(B, T, K, H // K, E)
  if T == 1 and mask_B1TS is not None:  # one decode step: multiply-and-sum over the cache
    return _attend_one(q_BTKGE, k_BSKE, v_BSKE, mask_B1TS, scale, softcap).reshape(B, T, H, E)
  q_BKGTE = q_BTKGE.transpose(0, 2, 3, 1, 4)
  k_BKSE, v_BKSE = k_BSKE.transpose(0, 2, 1, 3), v_BSKE.transpose(0, 2, 1, 3)
  causal = causal or mask_B1TS is None
  out = []
  for start, end, keys in query_blocks(T, S, causal and S == T, _length_is_split()):
    logits_BKGtS = jnp.einsum("bkgte,bkse->bkgts", q_BKGTE[:, :, :, start:end],
                              k_BKSE[:, :, :keys], preferred_element_type=jnp.float32) * scale
    logits_BKGtS = _softcap(logits_BKGtS, softcap)
    if mask_B1TS is None:
      mask_B1tS = (jnp.arange(keys)[None, :] <= jnp.arange(start, end)[:, None])[None, None]
    else:  # a [B, 1, 1, S] mask (an encoder's padding) holds for every query
      rows = slice(None) if mask_B1TS.shape[2] == 1 else slice(start, end)
      mask_B1tS = mask_B1TS[:, :, rows, :keys]
    logits_BKGtS = jnp.where(mask_B1tS[:, :, None], logits_BKGtS, jnp.finfo(jnp.float32).min)
    probs_BKGtS = jax.nn.softmax(logits_BKGtS, axis=-1).astype(v_BSKE.dtype)
    out.append(jnp.einsum("bkgts,bkse->bkgte", probs_BKGtS, v_BKSE[:, :, :keys]))
  out_BKGTE = out[0] if len(out) == 1 else jnp.concatenate(out, axis=3)
  return out_BKGTE.transpose(0, 3, 1, 2, 4).reshape(B, T, H, E)


def query_blocks(length: int, keys: int, causal: bool, whole: bool = False) -> list[tuple]:
  """(start, end, keys seen) of each block of queries the xla path scores together:
  QUERY_BLOCK queries (more when that would make over MAX_QUERY_BLOCKS blocks), each seeing the
  keys before its end when `causal` (self-attention), else all `keys`; one block when `whole`."""
  size = length if whole else max(QUERY_BLOCK, -(-length // MAX_QUERY_BLOCKS))
  return [(start, min(length, start + size), min(length, start + size) if causal else keys)
          for start in range(0, length, size)]


def _length_is_split() -> bool:
  """Whether the mesh in use splits activations along their length (sequence parallelism): the
  xla path then scores all queries together, as blocks of them would each sit on one device."""
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and dict(mesh.shape).get("sequence", 1) > 1


def _softcap(x, cap: float):
  """c tanh(x / c): x bounded to (-c, c), about x where |x| << c; cap 0 leaves x."""
  return cap * jnp.tanh(x / cap) if cap else x


def _attend_one(q_B1KGE, k_BSKE, v_BSKE, mask_B11S, scale, softcap):
  """`attend` for one query per row (a decode step) as broadcast multiplies and sums, which
  read the KV cache in its stored [B, S, K, E] layout. As two einsums, XLA's CPU backend copied
  the whole cache into a head-major layout for its dot kernels at every layer of every step."""
  q_BKGE = q_B1KGE[:, 0].astype(jnp.float32)
  logits_BSKG = jnp.sum(q_BKGE[:, None] * k_BSKE[:, :, :, None].astype(jnp.float32), -1)
  logits_BSKG = _softcap(logits_BSKG * scale, softcap)
  logits_BSKG = jnp.where(mask_B11S[:, 0, 0, :, None, None], logits_BSKG,
                          jnp.finfo(jnp.float32).min)
  probs_BSKG = jax.nn.softmax(logits_BSKG, axis=1)
  out_BKGE = jnp.sum(probs_BSKG[..., None] * v_BSKE[:, :, :, None].astype(jnp.float32), 1)
  return out_BKGE[:, None].astype(v_BSKE.dtype)


def attention_impl(cfg: ModelConfig, length: int, packed: bool, decode: bool = False,
                   local: bool = False) -> str:
  """The attention implementation cfg.attention means for this model, length, batch (`packed`:
  segment ids given) and device, on a sliding layer when `local` (a scanned stack of mixed
  layers passes True for all of them).

  Sliding windows and attention soft-capping run on xla: the kernels do neither.

  Raises:
    ValueError: when model.attention names a kernel and the layer needs one of those.
  """
  needs = [why for why, on in (("sliding-window layers (model.sliding_window)", local),
                               ("model.attn_logit_softcap", cfg.attn_logit_softcap)) if on]
  if needs:
    if cfg.attention not in ("auto", "xla"):
      raise ValueError(f"model.attention={cfg.attention!r} does not support {needs[0]}; use "
                       "attention='auto' or 'xla'")
    return "xla"
  return kernels.resolve(cfg.attention, dtype=cfg.dtype, head_dim=cfg.head_size, length=length,
                         packed=packed, causal=cfg.causal, decode=decode)


class DecodeMask(nn.Module):
  """Attention masks while decoding with a KV cache: causal over cache slots, and only within
  the same segment (left padding is segment 0, so real tokens never attend to it).

  The first call (the prefill: no cache yet) keeps its segment ids as the cache and returns the
  training masks over them; `grow_cache` then adds empty slots (segment 0: never attended to).
  Later calls write their segment ids at the cache index and return a [B, 1, T, S] mask over all
  S cache slots. With a `window`, each call also returns the mask of the sliding layers, whose
  caches are rings of `window` slots (see KVCache); else that second mask is None.
  """

  window: int = 0

  @nn.compact
  def __call__(self, segment_ids_BT):
    B, T = segment_ids_BT.shape
    ready = self.has_variable("cache", "segment_ids")
    seg_BS = self.variable("cache", "segment_ids", lambda: segment_ids_BT.astype(jnp.int32))
    index = self.variable("cache", "index", lambda: jnp.asarray(T, jnp.int32))
    if not ready:
      local = sliding_mask(segment_ids_BT, self.window, B, T) if self.window else None
      return attention_mask(segment_ids_BT, causal=True), local
    i = index.value
    seg_BS.value = jax.lax.dynamic_update_slice(seg_BS.value, segment_ids_BT.astype(jnp.int32),
                                                (0, i))
    index.value = i + T
    S = seg_BS.value.shape[1]
    causal_TS = jnp.arange(S)[None, :] <= (i + jnp.arange(T))[:, None]
    mask_BTS = (segment_ids_BT[:, :, None] == seg_BS.value[:, None, :]) & causal_TS[None]
    return mask_BTS[:, None], self._ring_mask(seg_BS.value, segment_ids_BT, i)

  def _ring_mask(self, seg_BS, segment_ids_BT, i):
    """[B, 1, 1, W] over a sliding layer's ring: slot s holds the latest token t' <= the query
    t = i with t' = s (mod W), always inside the window; it is seen if it exists and shares the
    query's segment."""
    if not self.window:
      return None
    if segment_ids_BT.shape[1] != 1:
      raise ValueError("a sliding-window layer's ring cache takes one token per decode step, got "
                       f"{segment_ids_BT.shape[1]}; feed the tokens after the prefill one by one")
    W = self.window
    held_W = i - jnp.mod(i - jnp.arange(W), W)  # the token index each slot holds, < 0: none yet
    seg_BW = jnp.take(seg_BS, jnp.maximum(held_W, 0), axis=1)
    mask_BW = (held_W >= 0)[None] & (seg_BW == segment_ids_BT)
    return mask_BW[:, None, None, :]


def ring_slots(length: int, window: int) -> tuple[np.ndarray, np.ndarray]:
  """(token index per ring slot, whether it holds one): the `window` latest of `length` tokens,
  token t in slot t mod window."""
  held_W = (length - 1) - np.mod(length - 1 - np.arange(window), window)
  return np.maximum(held_W, 0), held_W >= 0


class KVCache(nn.Module):
  """Keys and values of the tokens decoded so far, [B, S, K, E].

  The first call (the prefill: no cache yet) keeps its keys and values as the cache (S = its
  length, see `grow_cache`); later calls write theirs at the cache index and return all S slots.
  With a `window` (a sliding layer) the cache is a ring of `window` slots, token t in slot
  t mod window ("ring_k", "ring_v", which grow_cache leaves as they are): the layer never needs
  more, however long the sequence grows.
  """

  window: int = 0

  @nn.compact
  def __call__(self, k_BTKE, v_BTKE):
    """Writes the new keys/values at the cache index; returns the whole cache (k, v)."""
    names = ("ring_k", "ring_v") if self.window else ("k", "v")
    ready = self.has_variable("cache", names[0])
    k_cache = self.variable("cache", names[0], lambda: self._first(k_BTKE))
    v_cache = self.variable("cache", names[1], lambda: self._first(v_BTKE))
    index = self.variable("cache", "index", lambda: jnp.asarray(k_BTKE.shape[1], jnp.int32))
    if not ready:  # the prefill: attend over the prompt itself
      return k_BTKE, v_BTKE
    i = index.value
    at = (0, jnp.mod(i, self.window) if self.window else i, 0, 0)
    update = lambda cache, new: jax.lax.dynamic_update_slice(cache, new.astype(cache.dtype), at)
    k_cache.value = update(k_cache.value, k_BTKE)
    v_cache.value = update(v_cache.value, v_BTKE)
    index.value = i + k_BTKE.shape[1]
    return k_cache.value, v_cache.value

  def _first(self, x_BTKE):
    """The prefill's keys or values as the cache: all of them, or the ring of the latest."""
    if not self.window:
      return x_BTKE
    held_W, valid_W = ring_slots(x_BTKE.shape[1], self.window)
    return jnp.where(valid_W[None, :, None, None], x_BTKE[:, held_W], 0).astype(x_BTKE.dtype)


def grow_cache(cache, length: int):
  """A prefill's "cache" collection (DecodeMask's and KVCache's variables, S slots, any leading
  layer axis) with empty slots appended up to `length`: zero keys and values, segment 0. A
  sliding layer's ring keeps its size."""
  def grow(path, x):
    name = path[-1].key
    if name not in ("k", "v", "segment_ids"):
      return x
    axis = x.ndim - (3 if name in ("k", "v") else 1)  # k, v [..., B, S, K, E]; ids [..., B, S]
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, pad)

  return jax.tree_util.tree_map_with_path(grow, cache)


class Attention(nn.Module):
  """Multi-head / grouped-query self-attention with optional RoPE and qk-norm, over every
  earlier key or a sliding window of them (and a KV cache to decode)."""

  cfg: ModelConfig
  num_layers_scale: float = 1.0  # std divisor for the output projection (GPT-2 init)
  decode: bool = False  # read and extend the "cache" collection (see KVCache)
  local: bool | None = False  # a sliding layer; None: the call's `local` flag says (scan)

  @nn.compact
  def __call__(self, x_BTD, positions_BT, mask, segment_ids_BT=None, local=None):
    """`mask` [B, 1, T, S] for the xla path (None: causal); a kernel (cfg.attention) reads
    `segment_ids_BT` instead. `local`: a traced per-layer flag when self.local is None."""
    cfg = self.cfg
    local = self.local if self.local is not None else local
    H, K, E = cfg.num_heads, cfg.kv_heads, cfg.head_size
    qkv_bias = cfg.use_bias or cfg.qkv_bias
    D = cfg.embed_dim
    q_BTHE = dense(cfg, "btd,dhe->bthe", (D, H, E), ("embed", "heads", "head_dim"), "q",
                   qkv_bias)(x_BTD)
    k_BTKE = dense(cfg, "btd,dke->btke", (D, K, E), ("embed", "kv_heads", "head_dim"), "k",
                   qkv_bias)(x_BTD)
    v_BTKE = dense(cfg, "btd,dke->btke", (D, K, E), ("embed", "kv_heads", "head_dim"), "v",
                   qkv_bias)(x_BTD)
    if cfg.qk_norm != "none":
      q_BTHE = qk_norm(cfg, "q_norm", "heads")(q_BTHE)
      k_BTKE = qk_norm(cfg, "k_norm", "kv_heads")(k_BTKE)
    if cfg.position == "rope":
      inv_freq_F = layer_rope_frequencies(cfg, local)
      q_BTHE = rotate(q_BTHE, positions_BT, inv_freq_F)
      k_BTKE = rotate(k_BTKE, positions_BT, inv_freq_F)
    q_BTHE = nn.with_logical_constraint(q_BTHE, ("batch", "length", "heads", "head_dim"))
    if self.decode:
      if not isinstance(local, bool):
        raise ValueError("decoding a scanned stack of sliding and full layers: their caches "
                         "differ in size; decode with model.scan_layers=False (generate does)")
      window = cfg.sliding_window if local else 0
      k_BTKE, v_BTKE = KVCache(window, name="kv_cache")(k_BTKE, v_BTKE)
    else:  # every query block needs every key: gathered whole when the length is sharded
      k_BTKE = nn.with_logical_constraint(k_BTKE, ("batch", None, "kv_heads", "head_dim"))
      v_BTKE = nn.with_logical_constraint(v_BTKE, ("batch", None, "kv_heads", "head_dim"))
    impl = attention_impl(cfg, x_BTD.shape[1], segment_ids_BT is not None, self.decode,
                          local=local is not False)
    scale = cfg.query_pre_attn_scalar**-0.5 if cfg.query_pre_attn_scalar else None
    out_BTHE = attend(q_BTHE, k_BTKE, v_BTKE, mask, impl=impl, segment_ids_BT=segment_ids_BT,
                      scale=scale, softcap=cfg.attn_logit_softcap, causal=cfg.causal)
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
    kernel = linear.kernel_param(self, param_init(self.std, ("heads", "head_dim", "embed")),
                                 (H, E, D), cfg.param_dtype)
    matmul = lambda x_BTHE, w_HED: x_BTHE.reshape(*x_BTHE.shape[:-2], H * E) @ w_HED.reshape(-1, D)
    y_BTD = linear.project(self, matmul, x_BTHE, kernel, n_in=2, dtype=cfg.dtype)
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
  """Residual block with its norms where cfg.norm_position puts them, f being attention, then
  the MLP: pre x + f(norm(x)); post norm(x + f(x)) (BERT); sandwich x + norm(f(norm(x)))
  (Gemma); res_post x + norm(f(x)) (OLMo 2).

  `local` (the attribute) makes a sliding layer, which attends under the second of `masks`;
  `attn_norm` False drops the norm before attention (pre-norm blocks only: ModernBERT's first);
  None leaves it to the call's `local` flag, traced per layer in a scanned stack of mixed layers.
  """

  cfg: ModelConfig
  deterministic: bool = True
  decode: bool = False
  local: bool | None = False
  attn_norm: bool = True  # False: no norm before attention (ModernBERT's first block)

  @nn.compact
  def __call__(self, x_BTD, positions_BT, masks, segment_ids_BT=None, local=None):
    cfg = self.cfg
    scale = (2 * cfg.num_layers) ** 0.5
    drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
    flag = self.local if self.local is not None else local
    mask = masks[0] if masks[1] is None else pick(flag, masks[1], masks[0])
    attn = Attention(cfg, scale, self.decode, self.local, name="attn")
    if cfg.num_experts:
      experts = moe.MoeMlp(cfg, scale, name="moe")
      mlp = lambda x: experts(x, activation(cfg.activation))
    else:
      mlp = Mlp(cfg, scale, name="mlp")
    if cfg.norm_position == "post":
      x_BTD = norm(cfg, "attn_norm")(x_BTD + drop(attn(x_BTD, positions_BT, mask, segment_ids_BT,
                                                       local)))
      x_BTD = norm(cfg, "mlp_norm")(x_BTD + drop(mlp(x_BTD)))
      return nn.with_logical_constraint(x_BTD, ("batch", "length", "embed")), None
    before = cfg.norm_position in ("pre", "sandwich")
    after = cfg.norm_position in ("sandwich", "res_post")
    h = norm(cfg, "attn_norm")(x_BTD) if before and self.attn_norm else x_BTD
    h = attn(h, positions_BT, mask, segment_ids_BT, local)
    x_BTD = x_BTD + drop(norm(cfg, "attn_post_norm")(h) if after else h)
    h = mlp(norm(cfg, "mlp_norm")(x_BTD) if before else x_BTD)
    x_BTD = x_BTD + drop(norm(cfg, "mlp_post_norm")(h) if after else h)
    x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "length", "embed"))
    return x_BTD, None
