"""Batched generation with a KV cache: greedy, temperature, top-k and top-p sampling, EOS stops.

Prompts of different lengths are left-padded into one [B, P] batch; the cache is sized once to
P + max_new_tokens - 1 (a sliding-window layer keeps a ring of its window's slots instead).
Without a callback one jitted program runs the prefill (the whole prompt in one call) and a
`lax.while_loop` decode that ends when every row has stopped or max_new_tokens are out. With a
host callback (streaming, stop strings) the host drives the loop over a jitted prefill and a
jitted one-token step, dispatching each step before the previous step's tokens reach the
callback; neither program holds a host callback, so both are stored in
(and on the next launch loaded from) the persistent compilation cache.
"""

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.models.layers import grow_cache
from jaxlm.models.transformer import unstack_layers

# on_step(step, tokens_B) -> bool [B] (rows to stop) or None; called on the host, in order
StepCallback = Callable[[int, np.ndarray], np.ndarray | None]


@dataclasses.dataclass(frozen=True)
class Sampler:
  """How each token is drawn: temperature 0 is greedy; top_k 0 and top_p 1 keep everything."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0 or self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
      raise ValueError(
        f"bad sampling settings temperature={self.temperature}, top_k={self.top_k}, "
        f"top_p={self.top_p}: need temperature >= 0 (0 is greedy), top_k >= 0, 0 < top_p <= 1"
      )


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


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int,
             multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [B, P], lengths [B]) with each prompt right-aligned after `pad_id` padding; P is
  the longest prompt rounded up to `multiple` (fewer shapes to compile across calls)."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("a prompt is empty: give every prompt at least one token "
                     "(for example a newline or the tokenizer's BOS token)")
  lengths_B = np.array([len(p) for p in prompts], np.int32)
  width = -(-int(lengths_B.max()) // multiple) * multiple
  tokens_BP = np.full((len(prompts), width), pad_id, np.int32)
  for row, ids in zip(tokens_BP, prompts):
    row[len(row) - len(ids):] = ids
  return tokens_BP, lengths_B


def _layerwise(params, model, unstack=unstack_layers):
  """Decoding runs layer by layer: a scanned stack is unstacked once (slicing it inside the
  decode loop would copy every layer's weights each step)."""
  if model.cfg.scan_layers:
    return unstack(params), model.clone(cfg=model.cfg.replace(scan_layers=False))
  return params, model


def _prefill(params, tokens_BP, lengths_B, rng, *, model, max_new_tokens, sampler):
  """The whole prompt in one call. Returns (cache sized P + N - 1, first token [B], rng).

  The model's first decode call keeps the prompt's keys and values as its cache (no cache to
  build beforehand, no attention over empty slots); `grow_cache` appends the N - 1 slots the
  decode steps fill. A scanned model prefills through its scanned stack (one layer to trace, not
  L: the start-up of a launch whose programs come from the compilation cache is mostly tracing)
  and hands back the cache layer by layer, as the decode step reads it.
  """
  if model.cfg.scan_layers and model.cfg.mixed_layers:  # sliding and full layers' caches
    params, model = _layerwise(params, model)  # differ in size: they cannot form one stack
  B, P = tokens_BP.shape
  valid_BP = jnp.arange(P)[None, :] >= (P - lengths_B)[:, None]
  positions_BP = jnp.maximum(jnp.cumsum(valid_BP, axis=1) - 1, 0)
  logits_B1V, variables = model.apply(
    {"params": params}, tokens_BP, segment_ids_BT=valid_BP.astype(jnp.int32),
    positions_BT=positions_BP, decode=True, last_only=True, mutable=["cache"])
  cache = grow_cache(variables["cache"], P + max_new_tokens - 1)
  cache = unstack_layers(cache) if model.cfg.scan_layers else cache
  rng, key = jax.random.split(rng)
  return cache, _sample(logits_B1V[:, 0], key, sampler), rng


def _decode(params, cache, token_B, positions_B, rng, *, model, sampler):
  """One cached step: feeds `token_B` at `positions_B`; returns (cache, next token [B], rng)."""
  logits_B1V, variables = model.apply(
    {"params": params, "cache": cache}, token_B[:, None],
    segment_ids_BT=jnp.ones((token_B.shape[0], 1), jnp.int32), positions_BT=positions_B[:, None],
    decode=True, mutable=["cache"])
  rng, key = jax.random.split(rng)
  return variables["cache"], _sample(logits_B1V[:, 0], key, sampler), rng


def _sample(logits_BV, key, sampler):
  return sample_logits(logits_BV, key, sampler.temperature, sampler.top_k, sampler.top_p)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "sampler"))
def _generate(params, tokens_BP, lengths_B, rng, eos_E, pad_id, *, model, max_new_tokens,
              sampler):
  """Prefill + a `lax.while_loop` decode, all on the device. Returns (new tokens [B, N],
  number generated per row [B])."""
  B, N = tokens_BP.shape[0], max_new_tokens
  cache, token_B, rng = _prefill(params, tokens_BP, lengths_B, rng, model=model,
                                 max_new_tokens=N, sampler=sampler)
  params, model = _layerwise(params, model)
  out_BN = jnp.full((B, N), pad_id, jnp.int32).at[:, 0].set(token_B)
  done_B = jnp.isin(token_B, eos_E)

  def cond(carry):
    i, _, _, done_B, _, _ = carry
    return (i < N) & ~jnp.all(done_B)

  def body(carry):
    i, cache, rng, done_B, out_BN, count_B = carry
    cache, token_B, rng = _decode(params, cache, out_BN[:, i - 1], lengths_B + i - 1, rng,
                                  model=model, sampler=sampler)
    token_B = jnp.where(done_B, pad_id, token_B)
    count_B += jnp.where(done_B, 0, 1)
    return i + 1, cache, rng, done_B | jnp.isin(token_B, eos_E), out_BN.at[:, i].set(token_B), \
        count_B

  carry = (jnp.int32(1), cache, rng, done_B, out_BN, jnp.ones((B,), jnp.int32))
  _, _, _, _, out_BN, count_B = jax.lax.while_loop(cond, body, carry)
  return out_BN, count_B


# the streaming path: the host drives the loop, one jitted step per token, so that its programs
# hold no host callback and go to the persistent compilation cache like any other
_unstack_jit = jax.jit(unstack_layers)
_prefill_jit = jax.jit(_prefill, static_argnames=("model", "max_new_tokens", "sampler"))
_decode_jit = jax.jit(_decode, static_argnames=("model", "sampler"), donate_argnums=(1,))


def _stream(params, tokens_BP, lengths_B, rng, eos_ids, pad_id, on_step, *, model,
            max_new_tokens, sampler):
  """The decode loop run from the host, calling `on_step` with each step's tokens. The prefill's
  token goes to `on_step` at once (time to first token: the prefill alone, not the decode
  step's start-up); from then on step i + 1 is dispatched before step i's tokens are read back,
  so the device never waits on the host. A row the callback stops is masked on the host from
  then on. Returns what `_generate` does."""
  B, N = tokens_BP.shape[0], max_new_tokens
  cache, token_B, rng = _prefill_jit(params, tokens_BP, lengths_B, rng, model=model,
                                     max_new_tokens=N, sampler=sampler)
  out_BN = np.full((B, N), pad_id, np.int32)
  count_B, done_B, eos = np.zeros(B, np.int32), np.zeros(B, bool), np.asarray(list(eos_ids))
  step = None  # the decode step, built after the first token is handed over
  for i in range(N):
    if step is not None and i + 1 < N:  # dispatch step i + 1 before reading step i's tokens
      nxt = step(cache, token_B, jnp.asarray(lengths_B + i), rng)
    step_B = np.where(done_B, pad_id, np.asarray(token_B))
    out_BN[:, i] = step_B
    count_B += ~done_B
    done_B |= np.isin(step_B, eos)
    stop_B = on_step(i, step_B)
    if stop_B is not None:
      done_B |= np.asarray(stop_B, bool)
    if done_B.all() or i + 1 == N:
      break
    if step is None:  # after the first token: the decode step, layer by layer
      layer_params, layer_model = _layerwise(params, model, _unstack_jit)
      step = functools.partial(_decode_jit, layer_params, model=layer_model, sampler=sampler)
      nxt = step(cache, token_B, jnp.asarray(lengths_B + i), rng)
    cache, token_B, rng = nxt
  return out_BN, count_B


def generate(model, params, prompts: Sequence[Sequence[int]], rng=None, *,
             max_new_tokens: int = 100, sampler: Sampler | None = None,
             eos_ids: Sequence[int] = (), pad_id: int = 0,
             on_step: StepCallback | None = None, pad_multiple: int = 1) -> list[list[int]]:
  """Continues each prompt (a list of token ids) by up to `max_new_tokens` ids.

  Args:
    model: a Transformer; params: its parameters (a plain pytree).
    prompts: B token-id lists, of any lengths (left-padded into one batch).
    rng: PRNG key for sampling (unused when greedy).
    eos_ids: ids that end a row (the EOS id is kept as the row's last token).
    pad_id: filler for the padding and for rows that have stopped.
    on_step: host callback `on_step(step, tokens_B)` called in order as tokens come; it returns
      a bool [B] of rows to stop (for stop strings) or None. Needs the host every step.
    pad_multiple: the padded prompt length is a multiple of this, so that calls with prompts of
      similar lengths share one compiled program.

  Returns:
    Each row's new ids, up to and including its EOS id.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
  tokens_BP, lengths_B = left_pad(prompts, pad_id, pad_multiple)
  limit = model.cfg.max_seq_len
  if tokens_BP.shape[1] + max_new_tokens > limit:
    raise ValueError(
      f"the prompt ({tokens_BP.shape[1]} tokens) plus max_new_tokens={max_new_tokens} exceeds "
      f"the model's max_seq_len={limit}: shorten the prompt or lower max_new_tokens"
    )
  rng = jax.random.PRNGKey(0) if rng is None else rng
  sampler = Sampler() if sampler is None else sampler
  eos_E = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
  model = model.clone(cfg=model.cfg.replace(remat="none", dropout=0.0))
  kwargs = {"model": model, "max_new_tokens": max_new_tokens, "sampler": sampler}
  if on_step is None:
    out_BN, count_B = jax.device_get(_generate(
      params, tokens_BP, lengths_B, rng, eos_E, jnp.int32(pad_id), **kwargs))
  else:
    out_BN, count_B = _stream(params, tokens_BP, lengths_B, rng, eos_ids, pad_id, on_step,
                              **kwargs)
  return [row[:n].tolist() for row, n in zip(out_BN, count_B)]


def generate_one(model, params, prompt: Sequence[int], rng=None, *, max_new_tokens: int = 100,
                 sampler: Sampler | None = None, eos_ids: Sequence[int] = (), pad_id: int = 0,
                 on_step: StepCallback | None = None) -> list[int]:
  """Continues one prompt, past the model's max_seq_len if need be.

  When prompt + new tokens outgrow the model's positions, the context slides: each chunk starts
  a fresh cache from the last max_seq_len // 2 ids. Every slid chunk runs the same shapes, the
  last one too (cut where the tokens run out), so a long sample compiles the first chunk's
  programs and one more prefill and decode step, never one program per token. Arguments as in
  `generate`; returns the new ids.
  """
  window = model.cfg.max_seq_len
  rng = jax.random.PRNGKey(0) if rng is None else rng
  ids, new, chunk = list(prompt), [], 0
  while len(new) < max_new_tokens:
    remaining = max_new_tokens - len(new)
    slid = len(ids) + remaining > window
    context = ids[-(window // 2):] if slid else ids
    n = min(remaining, window - len(context))
    run_n = window - len(context) if slid else n  # the slid chunks' one shape
    out = generate(model, params, [context], jax.random.fold_in(rng, chunk), max_new_tokens=run_n,
                   sampler=sampler, eos_ids=eos_ids, pad_id=pad_id,
                   on_step=_first(n, on_step) if on_step and run_n > n else on_step)[0][:n]
    ids, new, chunk = ids + out, new + out, chunk + 1
    if len(out) < n or (out and out[-1] in eos_ids):  # stopped by EOS or by the callback
      break
  return new


def _first(n: int, on_step: StepCallback) -> StepCallback:
  """`on_step` for the first `n` steps only, then every row stopped."""
  def capped(step, tokens_B):
    stop_B = on_step(step, tokens_B)
    if step + 1 < n:
      return stop_B
    return np.ones(len(tokens_B), bool)
  return capped
