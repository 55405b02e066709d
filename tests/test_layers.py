"""Tests jaxlm/models/layers.py: RoPE (norms, relative positions, the rotate-half convention,
Llama-3 and linear frequency scaling), the training, sliding-window and encoder masks, the
decode-time mask over the KV cache, grouped-query attention against a naive reference (with
soft-capping), the KV cache itself and a sliding layer's ring of the window, the kernel choice
for sliding layers, and Gemma's (1 + w) RMSNorm."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.models import kernels, layers
from jaxlm.models.config import ModelConfig
from jaxlm.models.layers import (
  QUERY_BLOCK,
  DecodeMask,
  KVCache,
  RMSNorm,
  activation,
  apply_rope,
  attend,
  attention_impl,
  attention_mask,
  bidirectional_mask,
  gelu_exact,
  grow_cache,
  query_blocks,
  rope_frequencies,
  sliding_mask,
)

# Llama 3.1's published settings: (factor, low_freq_factor, high_freq_factor, original_max_len)
LLAMA31_SCALING = (8.0, 1.0, 4.0, 8192)
LLAMA31_THETA = 500000.0

# jitted once each: one compile per shape instead of one per eager op keeps every test quick
rope = jax.jit(apply_rope, static_argnums=(2, 3))
attend_jit = jax.jit(attend)


def _normal(seed, shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _rope_reference(x_BTNE, positions_BT, inv_freq_F):
  """Rotate-half RoPE in float64: the pair (i, i + E/2) is rotated by position * inv_freq[i]."""
  x = np.asarray(x_BTNE, np.float64)
  half = x.shape[-1] // 2
  angles_BTF = np.asarray(positions_BT, np.float64)[..., None] * np.asarray(inv_freq_F, np.float64)
  cos, sin = np.cos(angles_BTF)[:, :, None, :], np.sin(angles_BTF)[:, :, None, :]
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _llama3_reference(inv_freq_F, factor, low, high, original_len):
  """Meta's published Llama 3.1 `apply_scaling`, written piecewise over wavelengths."""
  low_freq_wavelen = original_len / low
  high_freq_wavelen = original_len / high
  out = []
  for freq in np.asarray(inv_freq_F, np.float64):
    wavelen = 2 * np.pi / freq
    if wavelen < high_freq_wavelen:
      out.append(freq)
    elif wavelen > low_freq_wavelen:
      out.append(freq / factor)
    else:
      smooth = (original_len / wavelen - low) / (high - low)
      out.append((1 - smooth) * freq / factor + smooth * freq)
  return np.array(out)


# ---------------------------------------------------------------------------------------------
# RoPE


def test_rope_rotation_preserves_norms():
  x = _normal(0, (2, 6, 3, 16))
  positions = np.array([[0, 1, 2, 3, 4, 5], [7, 100, 3, 999, 12, 40]])
  out = np.asarray(rope(jnp.asarray(x), jnp.asarray(positions), 10000.0))
  assert out.shape == x.shape
  np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
  assert not np.allclose(out[:, 1:], x[:, 1:], atol=1e-3), "rope left nonzero positions unrotated"


def test_rope_at_position_zero_is_identity():
  x = _normal(1, (1, 3, 2, 8))
  out = rope(jnp.asarray(x), jnp.zeros((1, 3), jnp.int32), 10000.0)
  np.testing.assert_allclose(out, x, atol=1e-6)


def test_rope_dot_product_depends_only_on_relative_position():
  """<rope(q, m), rope(k, n)> is a function of m - n."""
  E = 16
  q = jnp.asarray(_normal(2, (1, 1, 1, E)))
  k = jnp.asarray(_normal(3, (1, 1, 1, E)))

  def dot(m, n):
    rq = rope(q, jnp.full((1, 1), m), 10000.0)
    rk = rope(k, jnp.full((1, 1), n), 10000.0)
    return float(jnp.sum(rq * rk))

  for offset in (0, 1, 5):
    values = [dot(n + offset, n) for n in (0, 3, 17, 250)]
    np.testing.assert_allclose(values, values[0], atol=1e-4, err_msg=f"offset {offset}")
  # and the offset matters, so the equalities above are not trivially true
  assert abs(dot(5, 0) - dot(0, 0)) > 1e-2


@pytest.mark.parametrize("scaled", [False, True])
def test_rope_matches_rotate_half_numpy_reference(scaled):
  E = 8
  x = _normal(4, (2, 5, 3, E))
  positions = np.array([[0, 1, 2, 3, 4], [9, 2, 31, 6, 120]])
  scaling = LLAMA31_SCALING if scaled else None
  inv_freq = 1.0 / (LLAMA31_THETA ** (np.arange(0, E, 2, dtype=np.float64) / E))
  if scaled:
    inv_freq = _llama3_reference(inv_freq, *LLAMA31_SCALING)
  out = rope(jnp.asarray(x), jnp.asarray(positions), LLAMA31_THETA, scaling)
  np.testing.assert_allclose(out, _rope_reference(x, positions, inv_freq), atol=1e-5)

  # the interleaved (GPT-J / Meta checkpoint) convention pairs (2i, 2i + 1) instead: the
  # reference above must be telling the two apart on this input
  perm = np.concatenate([np.arange(0, E, 2), np.arange(1, E, 2)])
  interleaved = np.empty_like(x)
  interleaved[..., perm] = _rope_reference(x[..., perm], positions, inv_freq)
  assert not np.allclose(out, interleaved, atol=1e-3)


def test_rope_frequencies_without_scaling_are_the_standard_geometric_series():
  E, theta = 16, 10000.0
  expected = theta ** (-np.arange(0, E, 2, dtype=np.float64) / E)
  np.testing.assert_allclose(rope_frequencies(E, theta), expected, rtol=1e-6)


def test_llama3_scaling_divides_long_wavelengths_and_keeps_short_ones():
  E = 128
  factor, low, high, original_len = LLAMA31_SCALING
  plain = np.asarray(rope_frequencies(E, LLAMA31_THETA), np.float64)
  scaled = np.asarray(rope_frequencies(E, LLAMA31_THETA, LLAMA31_SCALING), np.float64)
  wavelen = 2 * np.pi / plain
  short = wavelen < original_len / high
  long = wavelen > original_len / low
  between = ~short & ~long
  assert short.sum() and long.sum() and between.sum(), "the test should cover all three bands"

  np.testing.assert_allclose(scaled[short], plain[short], rtol=1e-6)
  np.testing.assert_allclose(scaled[long], plain[long] / factor, rtol=1e-6)
  # the band between is interpolated: strictly inside (freq / factor, freq)
  assert np.all(scaled[between] < plain[between])
  assert np.all(scaled[between] > plain[between] / factor)
  np.testing.assert_allclose(scaled, _llama3_reference(plain, *LLAMA31_SCALING), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Masks used in training and in the encoder


def test_attention_mask_is_none_without_segment_ids():
  assert attention_mask(None, causal=True) is None
  assert attention_mask(None, causal=False) is None


def test_attention_mask_is_causal_within_segments_and_padding_is_its_own_segment():
  # two packed documents then right padding (segment 0)
  seg = jnp.asarray([[1, 1, 2, 2, 2, 0, 0]])
  mask = np.asarray(attention_mask(seg, causal=True))
  expected = np.array([
    [1, 0, 0, 0, 0, 0, 0],
    [1, 1, 0, 0, 0, 0, 0],
    [0, 0, 1, 0, 0, 0, 0],
    [0, 0, 1, 1, 0, 0, 0],
    [0, 0, 1, 1, 1, 0, 0],
    [0, 0, 0, 0, 0, 1, 0],  # padding attends (causally) to padding only
    [0, 0, 0, 0, 0, 1, 1],
  ], bool)
  assert mask.shape == (1, 1, 7, 7) and mask.dtype == bool
  np.testing.assert_array_equal(mask[0, 0], expected)


def test_attention_mask_left_padding_is_never_attended_by_real_tokens():
  seg = jnp.asarray([[0, 0, 1, 1], [1, 1, 1, 1]])
  mask = np.asarray(attention_mask(seg, causal=True))
  np.testing.assert_array_equal(mask[0, 0], np.array([
    [1, 0, 0, 0],
    [1, 1, 0, 0],
    [0, 0, 1, 0],
    [0, 0, 1, 1],
  ], bool))
  np.testing.assert_array_equal(mask[1, 0], np.tril(np.ones((4, 4), bool)))


def test_attention_mask_without_causality_is_same_segment_only():
  seg = jnp.asarray([[1, 1, 2, 0]])
  mask = np.asarray(attention_mask(seg, causal=False))
  np.testing.assert_array_equal(mask[0, 0], np.array([
    [1, 1, 0, 0],
    [1, 1, 0, 0],
    [0, 0, 1, 0],
    [0, 0, 0, 1],
  ], bool))


def test_sliding_mask_keeps_the_window_within_each_segment():
  seg = np.array([[1] * 7 + [2] * 5, [0, 0] + [1] * 10]).astype(np.int32)
  W = 3
  mask = np.asarray(sliding_mask(jnp.asarray(seg), W, 2, 12))[:, 0]
  i, j = np.arange(12)[:, None], np.arange(12)[None, :]
  expected = (seg[:, :, None] == seg[:, None, :]) & (j <= i) & (j > i - W)
  np.testing.assert_array_equal(mask, expected)
  assert mask.sum(-1).max() == W  # never more keys than the window
  np.testing.assert_array_equal(np.asarray(sliding_mask(None, W, 1, 12))[0, 0],
                                (j <= i) & (j > i - W))


def test_bidirectional_mask_hides_padding_keys_from_every_query():
  padding = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
  mask = np.asarray(bidirectional_mask(padding, None, 2, 5))
  assert mask.shape == (2, 1, 1, 5)
  np.testing.assert_array_equal(mask[:, 0, 0], np.asarray(padding, bool))
  full = np.asarray(bidirectional_mask(None, None, 3, 4))
  assert full.shape == (3, 1, 1, 4) and full.all()


def test_bidirectional_mask_keeps_segments_apart_and_padding_unattended():
  padding = jnp.asarray([[1, 1, 1, 1, 0, 0]])
  seg = jnp.asarray([[1, 1, 2, 2, 0, 0]])
  mask = np.asarray(bidirectional_mask(padding, seg, 1, 6))
  assert mask.shape == (1, 1, 6, 6)
  np.testing.assert_array_equal(mask[0, 0], np.array([
    [1, 1, 0, 0, 0, 0],
    [1, 1, 0, 0, 0, 0],
    [0, 0, 1, 1, 0, 0],
    [0, 0, 1, 1, 0, 0],
    [0, 0, 0, 0, 0, 0],  # padding queries see nothing (their rows are fully masked)
    [0, 0, 0, 0, 0, 0],
  ], bool))


# ---------------------------------------------------------------------------------------------
# Decoding: the mask over the KV cache, and the cache


def _decode_steps(segment_rows, cache_len):
  """Runs DecodeMask as generate.py does: a prefill (the first call, no cache), the cache grown
  to `cache_len` slots, then one-token steps. Returns the mask of every call, [B, T, S] each."""
  module = DecodeMask()
  apply = jax.jit(functools.partial(module.apply, mutable=["cache"]))
  (mask, _), variables = apply({}, jnp.asarray(segment_rows[0], jnp.int32))
  masks, cache = [np.asarray(mask)[:, 0]], grow_cache(variables["cache"], cache_len)
  for seg in segment_rows[1:]:
    (mask, _), variables = apply({"cache": cache}, jnp.asarray(seg, jnp.int32))
    cache = variables["cache"]
    masks.append(np.asarray(mask)[:, 0])
  return masks, cache


def test_decode_mask_left_padded_row_never_attends_its_padding():
  # row 0: two pad slots then a 2-token prompt; row 1: a 4-token prompt. 3 decode steps.
  prefill = [[0, 0, 1, 1], [1, 1, 1, 1]]  # generate.py passes valid_BP (1 real, 0 padding)
  steps = [[[1], [1]]] * 3
  S = 4 + 3
  masks, cache = _decode_steps([prefill, *steps], S)
  assert masks[0].shape == (2, 4, 4) and all(m.shape == (2, 1, S) for m in masks[1:])
  assert int(cache["index"]) == 4 + 3 and cache["segment_ids"].shape == (2, S)

  # prefill (over the prompt's own slots): causal, real tokens see the real prompt only
  np.testing.assert_array_equal(masks[0][0], np.array([
    [1, 0, 0, 0],
    [1, 1, 0, 0],
    [0, 0, 1, 0],
    [0, 0, 1, 1],
  ], bool))
  np.testing.assert_array_equal(masks[0][1], np.tril(np.ones((4, 4), bool)))

  # each new token (in slot 4 + i) sees every earlier real slot and itself, nothing later
  for i, mask in enumerate(masks[1:]):
    slot = 4 + i
    row0 = np.zeros(S, bool)
    row0[2:slot + 1] = True
    row1 = np.zeros(S, bool)
    row1[:slot + 1] = True
    np.testing.assert_array_equal(mask[0, 0], row0, err_msg=f"step {i}, left-padded row")
    np.testing.assert_array_equal(mask[1, 0], row1, err_msg=f"step {i}, unpadded row")


def test_decode_mask_first_call_is_the_training_mask():
  seg = jnp.asarray([[0, 1, 1, 1]])
  mask, local = DecodeMask().init_with_output(jax.random.PRNGKey(0), seg)[0]
  assert local is None  # no sliding layers
  np.testing.assert_array_equal(mask, attention_mask(seg, causal=True))


def test_kv_cache_keeps_the_prefill_then_writes_at_the_index():
  B, S, K, E = 2, 6, 2, 4
  module = KVCache()
  k1, v1 = _normal(5, (B, 3, K, E)), _normal(6, (B, 3, K, E))
  (k, v), variables = module.apply({}, jnp.asarray(k1), jnp.asarray(v1), mutable=["cache"])
  np.testing.assert_array_equal(k, k1)  # the prefill attends over its own keys and values
  np.testing.assert_array_equal(variables["cache"]["v"], v1)
  cache = grow_cache(variables["cache"], S)
  assert cache["k"].shape == (B, S, K, E) and int(cache["index"]) == 3
  np.testing.assert_array_equal(cache["k"][:, :3], k1)
  assert not np.any(cache["k"][:, 3:]) and not np.any(cache["v"][:, 3:])

  k2, v2 = _normal(7, (B, 1, K, E)), _normal(8, (B, 1, K, E))
  (k, v), variables = module.apply({"cache": cache}, jnp.asarray(k2), jnp.asarray(v2),
                                   mutable=["cache"])
  assert k.shape == (B, S, K, E) and int(variables["cache"]["index"]) == 4
  np.testing.assert_array_equal(k[:, :3], k1)
  np.testing.assert_array_equal(k[:, 3:4], k2)
  np.testing.assert_array_equal(v[:, 3:4], v2)
  assert not np.any(k[:, 4:])


def test_grow_cache_pads_the_slot_axis_of_a_scanned_stack():
  L, B, S, K, E = 3, 2, 4, 1, 2
  cache = {"blocks": {"attn": {"kv_cache": {"k": jnp.ones((L, B, S, K, E)),
                                            "v": jnp.ones((L, B, S, K, E)),
                                            "index": jnp.full((L,), S, jnp.int32)}}},
           "decode_mask": {"segment_ids": jnp.ones((B, S), jnp.int32),
                           "index": jnp.asarray(S, jnp.int32)}}
  grown = grow_cache(cache, 7)
  kv = grown["blocks"]["attn"]["kv_cache"]
  assert kv["k"].shape == (L, B, 7, K, E) and grown["decode_mask"]["segment_ids"].shape == (B, 7)
  assert not np.any(kv["v"][:, :, S:]) and not np.any(grown["decode_mask"]["segment_ids"][:, S:])
  np.testing.assert_array_equal(kv["index"], cache["blocks"]["attn"]["kv_cache"]["index"])


def test_a_ring_cache_of_the_window_decodes_as_the_full_cache_under_the_window():
  """A sliding layer's ring (W slots, token t in slot t mod W) and its mask give, step after
  step, the attention of the full cache under the sliding-window mask; a left-padded row's
  padding is never attended to."""
  B, P, K, E, W, steps = 2, 5, 1, 4, 3, 6
  S = P + steps
  prefill_seg = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], jnp.int32)
  k0, v0 = jnp.asarray(_normal(20, (B, P, K, E))), jnp.asarray(_normal(21, (B, P, K, E)))

  def apply(module, *args):
    return module.apply(*args, mutable=["cache"])

  (_, ring_mask), mask_vars = apply(DecodeMask(W), {}, prefill_seg)
  _, ring_vars = apply(KVCache(W), {}, k0, v0)
  _, full_vars = apply(KVCache(), {}, k0, v0)
  mask_cache = grow_cache(mask_vars["cache"], S)
  ring_cache, full_cache = grow_cache(ring_vars["cache"], S), grow_cache(full_vars["cache"], S)
  assert ring_cache["ring_k"].shape == (B, W, K, E)  # grow_cache leaves the ring as it is
  for step in range(steps):
    t = P + step
    seg = jnp.ones((B, 1), jnp.int32)
    (full_mask, ring_mask), mask_vars = apply(DecodeMask(W), {"cache": mask_cache}, seg)
    mask_cache = mask_vars["cache"]
    k, v = (jnp.asarray(_normal(seed + step, (B, 1, K, E))) for seed in (30, 40))
    (kr, vr), ring_vars = apply(KVCache(W), {"cache": ring_cache}, k, v)
    (kf, vf), full_vars = apply(KVCache(), {"cache": full_cache}, k, v)
    ring_cache, full_cache = ring_vars["cache"], full_vars["cache"]
    assert kr.shape == (B, W, K, E) and ring_mask.shape == (B, 1, 1, W)
    in_window = (jnp.arange(S) > t - W)[None, None, None]
    q = jnp.asarray(_normal(50 + step, (B, 1, 2, E)))
    np.testing.assert_allclose(attend(q, kr, vr, ring_mask),
                               attend(q, kf, vf, full_mask & in_window), atol=1e-6)
    assert int(ring_mask[0].sum()) == W  # the window is full of real tokens by now


def test_ring_cache_refuses_several_tokens_a_step():
  module = DecodeMask(3)
  _, variables = module.apply({}, jnp.ones((1, 4), jnp.int32), mutable=["cache"])
  cache = grow_cache(variables["cache"], 8)
  with pytest.raises(ValueError, match="ring cache takes one token per decode step, got 2"):
    module.apply({"cache": cache}, jnp.ones((1, 2), jnp.int32), mutable=["cache"])


def test_sliding_layers_and_soft_capping_run_on_xla_and_refuse_an_explicit_kernel(monkeypatch):
  monkeypatch.setattr(kernels, "resolve", lambda choice, **kw: "splash")  # as on a TPU
  cfg = ModelConfig(sliding_window=8, position="rope", norm="rmsnorm")
  assert attention_impl(cfg, 128, True) == "splash"  # a full layer may use the kernel
  assert attention_impl(cfg, 128, True, local=True) == "xla"
  assert attention_impl(cfg.replace(attn_logit_softcap=50.0), 128, True) == "xla"
  for kernel in ("splash", "cudnn", "triton"):
    with pytest.raises(ValueError, match=rf"model.attention='{kernel}' does not support "
                                         r"sliding-window layers .* use attention='auto' or 'xla'"):
      attention_impl(cfg.replace(attention=kernel), 128, True, local=True)
  with pytest.raises(ValueError, match=r"does not support model.attn_logit_softcap"):
    attention_impl(cfg.replace(attention="splash", attn_logit_softcap=50.0), 128, True)


def test_offset_rmsnorm_scales_by_one_plus_w_and_starts_as_the_plain_norm():
  x = jnp.asarray(_normal(60, (2, 3, 8)))
  plain = x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)
  cfg = ModelConfig(norm="rmsnorm", norm_offset=1.0, norm_eps=1e-6)
  params = nn.unbox(RMSNorm(cfg).init(jax.random.PRNGKey(0), x)["params"])
  assert not np.any(params["scale"])  # w = 0: a scale of 1
  w = jnp.asarray(_normal(61, (8,)))
  out = RMSNorm(cfg).apply({"params": {"scale": w}}, x)
  np.testing.assert_allclose(out, np.asarray(plain) * (1 + np.asarray(w)), atol=1e-5)
  full = RMSNorm(cfg.replace(norm_offset=0.0), ("heads", "head_dim"))  # over two axes at once
  y = x.reshape(2, 3, 2, 4)
  out = full.apply({"params": {"scale": jnp.ones((2, 4))}}, y)
  np.testing.assert_allclose(out.reshape(2, 3, 8), plain, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# attend


def _attend_reference(q_BTHE, k_BSKE, v_BSKE, mask_BTS):
  """Naive softmax(q k^T / sqrt(E)) v in float64; query head h reads kv head h // (H / K)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q_BTHE, k_BSKE, v_BSKE))
  B, T, H, E = q.shape
  G = H // k.shape[2]
  out = np.zeros((B, T, H, E))
  for b in range(B):
    for h in range(H):
      logits = q[b, :, h] @ k[b, :, h // G].T / np.sqrt(E)
      logits = np.where(mask_BTS[b], logits, -np.inf)
      with np.errstate(invalid="ignore"):  # a fully masked row comes out NaN here
        probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
      out[b, :, h] = probs @ v[b, :, h // G]
  return out


@pytest.mark.parametrize("H,K", [(4, 4), (4, 2), (6, 1)])
def test_attend_matches_naive_reference_with_default_causal_mask(H, K):
  B, T, E = 2, 5, 8
  q, k, v = _normal(10, (B, T, H, E)), _normal(11, (B, T, K, E)), _normal(12, (B, T, K, E))
  out = attend_jit(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
  causal = np.broadcast_to(np.tril(np.ones((T, T), bool)), (B, T, T))
  np.testing.assert_allclose(out, _attend_reference(q, k, v, causal), atol=1e-5)


def test_attend_matches_naive_reference_with_explicit_mask_and_gqa():
  """A decode-shaped call: T=2 queries over S=6 cache slots, a ragged mask, 4 q heads on 2 kv."""
  B, T, S, H, K, E = 2, 2, 6, 4, 2, 8
  q, k, v = _normal(13, (B, T, H, E)), _normal(14, (B, S, K, E)), _normal(15, (B, S, K, E))
  mask_BTS = np.array([
    [[0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0]],
    [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]],
  ], bool)
  out = attend_jit(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask_BTS)[:, None])
  np.testing.assert_allclose(out, _attend_reference(q, k, v, mask_BTS), atol=1e-5)


def test_attend_fully_masked_rows_stay_finite_and_leave_other_rows_alone():
  """An encoder's padding queries (see bidirectional_mask) have no key to attend: their rows
  must come out finite, in value and gradient, without disturbing the real rows."""
  B, T, H, E = 1, 4, 2, 8
  q, k, v = _normal(16, (B, T, H, E)), _normal(17, (B, T, H, E)), _normal(18, (B, T, H, E))
  mask_BTS = np.array([[[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]], bool)
  mask = jnp.asarray(mask_BTS)[:, None]
  out = np.asarray(attend_jit(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask))
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out[:, :2], _attend_reference(q, k, v, mask_BTS)[:, :2], atol=1e-5)
  loss = lambda q, k, v: attend(q, k, v, mask).sum()
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
  assert all(np.all(np.isfinite(g)) for g in grads)


@pytest.mark.parametrize("kind", ["causal", "packed", "sliding", "encoder_padding", "decode"])
def test_attend_in_query_blocks_equals_the_whole_scores(kind, monkeypatch):
  """The xla path scores QUERY_BLOCK queries at a time, a causal block only against the keys
  before its end: values and gradients equal the naive reference and the one-block path, under
  every mask the model passes (several blocks, the last one ragged)."""
  B, T, H, K, E = 2, 2 * QUERY_BLOCK + 37, 4, 2, 8
  S = T + 5 if kind == "decode" else T  # decode: a T-token step over an S-slot cache
  q = _normal(90, (B, T, H, E))
  k, v = _normal(91, (B, S, K, E)), _normal(92, (B, S, K, E))
  seg_BT = np.where(np.arange(T) < 150, 1, 2)[None].repeat(B, 0)
  causal_TS = np.arange(S)[None, :] <= np.arange(S - T, S)[:, None]
  mask_BTS, causal = {
    "causal": (np.broadcast_to(causal_TS, (B, T, S)), True),
    "packed": (np.asarray(attention_mask(jnp.asarray(seg_BT), True))[:, 0], True),
    "sliding": (np.asarray(sliding_mask(None, 40, B, T))[:, 0], True),
    "encoder_padding": (np.broadcast_to(np.arange(S) < S - 20, (B, T, S)), False),
    "decode": (np.broadcast_to(causal_TS, (B, T, S)), True),
  }[kind]
  mask = jnp.asarray(mask_BTS)[:, None]
  if kind == "encoder_padding":
    mask = mask[:, :, :1]  # bidirectional_mask's [B, 1, 1, S]
  if kind == "causal":
    mask = None
  args = tuple(jnp.asarray(a) for a in (q, k, v))
  loss = lambda q, k, v: (attend(q, k, v, mask, causal=causal) ** 2).sum()
  blocked = jax.jit(lambda *a: (attend(*a, mask, causal=causal),
                                jax.grad(loss, argnums=(0, 1, 2))(*a)))
  out, grads = blocked(*args)
  assert len(query_blocks(T, S, causal and S == T)) == 3
  np.testing.assert_allclose(out, _attend_reference(q, k, v, mask_BTS), atol=1e-5)
  monkeypatch.setattr(layers, "QUERY_BLOCK", T)  # one block: every query against every key
  whole_out, whole_grads = jax.jit(lambda *a: (attend(*a, mask, causal=causal),
                                               jax.grad(loss, argnums=(0, 1, 2))(*a)))(*args)
  np.testing.assert_allclose(out, whole_out, atol=1e-6)
  for g, w in zip(grads, whole_grads):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


def test_attend_soft_caps_scores_before_the_mask_and_scales_by_the_given_scalar():
  B, T, H, E = 1, 5, 2, 8
  q, k, v = (_normal(70 + i, (B, T, H, E)) * 3 for i in range(3))
  mask_BTS = np.tril(np.ones((T, T), bool))[None]
  cap, scale = 2.0, 0.2
  scores = np.einsum("bthe,bshe->bhts", q, k) * scale
  scores = np.where(mask_BTS[:, None], cap * np.tanh(scores / cap), -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  expected = np.einsum("bhts,bshe->bthe", probs / probs.sum(-1, keepdims=True), v)
  out = attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask_BTS)[:, None],
               scale=scale, softcap=cap)
  np.testing.assert_allclose(out, expected, atol=1e-5)
  one = attend(jnp.asarray(q[:, -1:]), jnp.asarray(k), jnp.asarray(v),
               jnp.ones((B, 1, 1, T), bool), scale=scale, softcap=cap)  # a decode step
  np.testing.assert_allclose(one, expected[:, -1:], atol=1e-5)


def test_linear_rope_scaling_divides_every_frequency():
  np.testing.assert_allclose(rope_frequencies(16, 1e4, (8.0,)), rope_frequencies(16, 1e4) / 8,
                             rtol=1e-6)


def test_exact_gelu_is_pytorchs_erf_formula_in_value_and_gradient():
  """models.layers.gelu_exact (x/2 (1 + erf(x/sqrt 2)), what torch.nn.GELU() computes) against
  PyTorch and against jax.nn.gelu(approximate=False) (erfc), fp32 over [-12, 12]."""
  torch = pytest.importorskip("torch")
  x = np.linspace(-12, 12, 24001, dtype=np.float32)
  hlo = jax.jit(activation("gelu")).lower(x).as_text()
  assert "erf" in hlo and "erfc" not in hlo  # erfc's backward pass is 2.7x slower on XLA:CPU
  ours = np.asarray(jax.jit(activation("gelu"))(jnp.asarray(x)))
  np.testing.assert_allclose(ours, torch.nn.functional.gelu(torch.from_numpy(x)).numpy(),
                             atol=2e-6, rtol=0)
  np.testing.assert_allclose(ours, jax.nn.gelu(jnp.asarray(x), approximate=False), atol=2e-6,
                             rtol=0)
  x_t = torch.from_numpy(x).requires_grad_()
  torch.nn.functional.gelu(x_t).sum().backward()
  grad = jax.jit(jax.vmap(jax.grad(gelu_exact)))(jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(grad), x_t.grad.numpy(), atol=1e-6, rtol=0)
