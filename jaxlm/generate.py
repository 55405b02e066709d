"""Sampling from a trained LM: greedy, temperature, top-k and top-p, jit-compiled as one loop.

The context is a sliding window of the model's `max_seq_len` tokens; the whole decode loop is a
single `lax.fori_loop`, so there is no Python loop per token.
"""

import functools

import jax
import jax.numpy as jnp


def sample_logits(logits_BV, rng, temperature: float, top_k: int, top_p: float):
  """Draws one token per row; temperature 0 is greedy. Returns int32 [B]."""
  if temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV / temperature
  if top_k > 0:
    kth = jax.lax.top_k(logits_BV, min(top_k, logits_BV.shape[-1]))[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth, -jnp.inf, logits_BV)
  if top_p < 1.0:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    cum_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
    # keep the smallest prefix whose mass reaches top_p (always at least the best token)
    cutoff_idx = jnp.sum(cum_BV < top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_BV, cutoff_idx, axis=-1)
    logits_BV = jnp.where(logits_BV < cutoff, -jnp.inf, logits_BV)
  return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


@functools.partial(
  jax.jit, static_argnames=("apply_fn", "window", "prompt_len", "max_new_tokens", "temperature",
                            "top_k", "top_p")
)
def _decode(params, prompt_B_P, rng, *, apply_fn, window, prompt_len, max_new_tokens,
            temperature, top_k, top_p):
  B = prompt_B_P.shape[0]
  total = max(prompt_len + max_new_tokens, window)
  buf_BL = jnp.zeros((B, total), jnp.int32).at[:, :prompt_len].set(prompt_B_P)

  def body(i, carry):
    buf_BL, rng = carry
    rng, key = jax.random.split(rng)
    start = jnp.clip(i - window, 0, total - window)
    ctx_BW = jax.lax.dynamic_slice_in_dim(buf_BL, start, window, axis=1)
    logits_BWV = apply_fn({"params": params}, ctx_BW)
    logits_BV = jax.lax.dynamic_index_in_dim(logits_BWV, i - 1 - start, axis=1, keepdims=False)
    token_B = sample_logits(logits_BV, key, temperature, top_k, top_p)
    return jax.lax.dynamic_update_index_in_dim(buf_BL, token_B, i, axis=1), rng

  buf_BL, _ = jax.lax.fori_loop(prompt_len, prompt_len + max_new_tokens, body, (buf_BL, rng))
  return buf_BL[:, prompt_len : prompt_len + max_new_tokens]


def generate(model, params, prompt_ids: list[int], rng, max_new_tokens: int = 100,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> list[int]:
  """Samples `max_new_tokens` ids continuing `prompt_ids` (at least one id)."""
  if not prompt_ids:
    raise ValueError("the prompt is empty: give at least one token (for example a newline)")
  window = model.cfg.max_seq_len
  prompt = jnp.asarray([prompt_ids[-window:]], jnp.int32)
  out = _decode(params, prompt, rng, apply_fn=model.apply, window=window,
                prompt_len=prompt.shape[1], max_new_tokens=max_new_tokens,
                temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
  return [int(t) for t in out[0]]
