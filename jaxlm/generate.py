"""Batched generation with a KV cache: greedy, temperature, top-k and top-p sampling, EOS stops.

Prompts of different lengths are left-padded into one [B, P] batch; the cache is sized once to
P + max_new_tokens - 1; one jitted program runs the prefill (the whole prompt in one call) and
a `lax.while_loop` decode that ends when every row has stopped or max_new_tokens are out.
An optional host callback receives each step's tokens as they come (for streaming and stop
strings) and can stop rows.
"""

import dataclasses
import functools
import itertools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

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


def _init_cache(model, batch: int, length: int):
  """A zero KV cache of `length` slots; shapes from an abstract init (no parameters made)."""
  tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  abstract = jax.eval_shape(functools.partial(model.init, decode=True),
                            jax.random.PRNGKey(0), tokens)
  return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract["cache"])


# the callbacks of the generate calls in flight, by id: the compiled program takes the id as
# an argument, so each new callback (a TextStream per call) reuses the program
_CALLBACKS: dict[int, StepCallback] = {}
_next_id = itertools.count()


def _host_step(callback_id, step, tokens_B):
  stop_B = _CALLBACKS[int(callback_id)](int(step), np.asarray(tokens_B))
  return np.zeros(tokens_B.shape, bool) if stop_B is None else np.asarray(stop_B, bool)


def _emit(callback_id, step, tokens_B):
  """Hands a step's tokens to the host callback; its answer (rows to stop) comes back."""
  shape = jax.ShapeDtypeStruct(tokens_B.shape, jnp.bool_)
  return io_callback(_host_step, shape, callback_id, step, tokens_B, ordered=True)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "sampler", "stream"))
def _generate(params, tokens_BP, lengths_B, rng, eos_E, pad_id, callback_id, *, model,
              max_new_tokens, sampler, stream):
  """Prefill + cached decode loop. Returns (new tokens [B, N], number generated per row [B])."""
  B, P = tokens_BP.shape
  N = max_new_tokens
  if model.cfg.scan_layers:  # a scanned stack slices (copies) every layer's weights each step
    params = unstack_layers(params)
    model = model.clone(cfg=model.cfg.replace(scan_layers=False))
  sample = functools.partial(sample_logits, temperature=sampler.temperature,
                             top_k=sampler.top_k, top_p=sampler.top_p)
  valid_BP = jnp.arange(P)[None, :] >= (P - lengths_B)[:, None]
  positions_BP = jnp.maximum(jnp.cumsum(valid_BP, axis=1) - 1, 0)
  cache = _init_cache(model, B, P + N - 1)
  logits_BPV, variables = model.apply(
    {"params": params, "cache": cache}, tokens_BP, segment_ids_BT=valid_BP.astype(jnp.int32),
    positions_BT=positions_BP, decode=True, mutable=["cache"])

  def finish_step(i, logits_BV, rng, done_B, out_BN):
    rng, key = jax.random.split(rng)
    token_B = jnp.where(done_B, pad_id, sample(logits_BV, key))
    stop_B = jnp.isin(token_B, eos_E)
    if stream:
      stop_B |= _emit(callback_id, i, token_B)
    count_B = jnp.where(done_B, 0, 1)
    return rng, done_B | stop_B, out_BN.at[:, i].set(token_B), count_B

  out_BN = jnp.full((B, N), pad_id, jnp.int32)
  rng, done_B, out_BN, count_B = finish_step(
    0, logits_BPV[:, -1], rng, jnp.zeros((B,), bool), out_BN)

  def cond(carry):
    i, _, _, done_B, _, _ = carry
    return (i < N) & ~jnp.all(done_B)

  def body(carry):
    i, cache, rng, done_B, out_BN, count_B = carry
    last_B1 = jax.lax.dynamic_slice_in_dim(out_BN, i - 1, 1, axis=1)
    logits_B1V, variables = model.apply(
      {"params": params, "cache": cache}, last_B1, segment_ids_BT=jnp.ones((B, 1), jnp.int32),
      positions_BT=(lengths_B + i - 1)[:, None], decode=True, mutable=["cache"])
    rng, done_B, out_BN, step_B = finish_step(i, logits_B1V[:, 0], rng, done_B, out_BN)
    return i + 1, variables["cache"], rng, done_B, out_BN, count_B + step_B

  carry = (jnp.int32(1), variables["cache"], rng, done_B, out_BN, count_B)
  _, _, _, _, out_BN, count_B = jax.lax.while_loop(cond, body, carry)
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
  callback_id = next(_next_id)
  if on_step is not None:
    _CALLBACKS[callback_id] = on_step
  try:
    out_BN, count_B = jax.device_get(_generate(
      params, tokens_BP, lengths_B, rng, eos_E, jnp.int32(pad_id), jnp.int32(callback_id),
      model=model, max_new_tokens=max_new_tokens, sampler=sampler, stream=on_step is not None))
  finally:
    _CALLBACKS.pop(callback_id, None)
  return [row[:n].tolist() for row, n in zip(out_BN, count_B)]


def generate_one(model, params, prompt: Sequence[int], rng=None, *, max_new_tokens: int = 100,
                 sampler: Sampler | None = None, eos_ids: Sequence[int] = (), pad_id: int = 0,
                 on_step: StepCallback | None = None) -> list[int]:
  """Continues one prompt, past the model's max_seq_len if need be.

  When prompt + new tokens outgrow the model's positions, the context slides: each chunk starts
  a fresh cache from the last max_seq_len // 2 ids (so a few chunk shapes are compiled, never
  one program per token). Arguments as in `generate`; returns the new ids.
  """
  window = model.cfg.max_seq_len
  rng = jax.random.PRNGKey(0) if rng is None else rng
  ids, new, chunk = list(prompt), [], 0
  while len(new) < max_new_tokens:
    remaining = max_new_tokens - len(new)
    context = ids[-(window // 2):] if len(ids) + remaining > window else ids
    n = min(remaining, window - len(context))
    out = generate(model, params, [context], jax.random.fold_in(rng, chunk), max_new_tokens=n,
                   sampler=sampler, eos_ids=eos_ids, pad_id=pad_id, on_step=on_step)[0]
    ids, new, chunk = ids + out, new + out, chunk + 1
    if len(out) < n or (out and out[-1] in eos_ids):  # stopped by EOS or by the callback
      break
  return new
