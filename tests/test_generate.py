"""Cached generation: equal to full-forward greedy decoding, left padding, sampling, stops, text."""

import io

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import generate as gen
from jaxlm import textgen
from jaxlm.models.config import ModelConfig
from jaxlm.models.transformer import Transformer

TINY = {  # a large init_std so that greedy continuations vary from token to token
  "gpt2": dict(vocab_size=61, num_layers=2, embed_dim=32, num_heads=4, max_seq_len=24,
               init_std=0.3),
  "llama": dict(vocab_size=61, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2,
                max_seq_len=24, norm="rmsnorm", position="rope", activation="silu",
                gated_mlp=True, use_bias=False, tie_embeddings=False, mlp_dim=48, init_std=0.3,
                scan_layers=True),
}
PROMPTS = [[5, 17, 3, 9, 44], [7], [12, 30, 2, 2, 8, 51, 60, 1]]
N = 8


def _model(family):
  model = Transformer(ModelConfig(**TINY[family]))
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
  return model, nn.unbox(params)


def _greedy_by_full_forward(model, params, prompts, n):
  """Greedy decoding the slow way: each whole sequence through the model for every token.

  Sequences are right-padded to max_seq_len (causal attention never sees the padding), so
  the forward compiles once.
  """
  forward = jax.jit(lambda tokens_BT: model.apply({"params": params}, tokens_BT))
  seqs = [list(p) for p in prompts]
  for _ in range(n):
    tokens_BT = np.zeros((len(seqs), model.cfg.max_seq_len), np.int32)
    for row, seq in zip(tokens_BT, seqs):
      row[:len(seq)] = seq
    logits_BTV = np.asarray(forward(tokens_BT))
    for b, seq in enumerate(seqs):
      seq.append(int(np.argmax(logits_BTV[b, len(seq) - 1])))
  return [seq[len(p):] for seq, p in zip(seqs, prompts)]


@pytest.mark.parametrize("family", sorted(TINY))
def test_cached_greedy_equals_full_forward_on_a_left_padded_batch(family):
  model, params = _model(family)
  out = gen.generate(model, params, PROMPTS, max_new_tokens=N)
  expected = _greedy_by_full_forward(model, params, PROMPTS, N)
  assert out == expected
  assert len({t for row in out for t in row}) > 5, "degenerate model: the test would prove little"


def test_batch_rows_equal_prompts_run_alone():
  model, params = _model("llama")
  sampler = gen.Sampler(temperature=0.0)
  batch = gen.generate(model, params, PROMPTS, max_new_tokens=N, sampler=sampler, pad_id=3)
  alone = [gen.generate(model, params, [p], max_new_tokens=N)[0] for p in PROMPTS]
  assert batch == alone


def test_sampling_is_reproducible_with_a_fixed_key():
  model, params = _model("gpt2")
  sampler = gen.Sampler(temperature=1.0, top_k=20, top_p=0.9)

  def run(seed):
    return gen.generate(model, params, PROMPTS, jax.random.PRNGKey(seed), max_new_tokens=N,
                        sampler=sampler)

  assert run(1) == run(1)
  assert run(1) != run(2)


def test_top_k_and_top_p_never_sample_outside_the_allowed_set():
  logits_V = jnp.log(jnp.array([0.30, 0.25, 0.20, 0.10, 0.08, 0.05, 0.02]))
  logits_BV = jnp.broadcast_to(logits_V, (4000, 7))
  draw = jax.jit(gen.sample_logits, static_argnums=(2, 3, 4))
  top_k = np.asarray(draw(logits_BV, jax.random.PRNGKey(0), 1.0, 3, 1.0))
  assert set(top_k.tolist()) == {0, 1, 2}
  # mass 0.30 + 0.25 = 0.55 < 0.6 <= 0.75: the smallest set reaching 0.6 is the top three
  top_p = np.asarray(draw(logits_BV, jax.random.PRNGKey(1), 1.0, 0, 0.6))
  assert set(top_p.tolist()) == {0, 1, 2}
  both = np.asarray(draw(logits_BV, jax.random.PRNGKey(2), 2.0, 5, 0.3))
  assert set(both.tolist()) <= {0, 1} and np.mean(both == 0) < 0.7
  everything = np.asarray(draw(logits_BV, jax.random.PRNGKey(3), 1.0, 0, 1.0))
  assert set(everything.tolist()) == set(range(7))


def test_top_k_of_one_is_greedy():
  model, params = _model("llama")
  greedy = gen.generate(model, params, PROMPTS, max_new_tokens=N)
  top1 = gen.generate(model, params, PROMPTS, jax.random.PRNGKey(5), max_new_tokens=N,
                      sampler=gen.Sampler(temperature=1.5, top_k=1))
  assert top1 == greedy


def test_eos_stops_its_row_only():
  model, params = _model("gpt2")
  free = gen.generate(model, params, PROMPTS, max_new_tokens=N)
  eos = free[0][2]
  stopped = gen.generate(model, params, PROMPTS, max_new_tokens=N, eos_ids=[eos])
  for row, full in zip(stopped, free):
    cut = full.index(eos) + 1 if eos in full else N
    assert row == full[:cut]
  assert len(stopped[0]) <= 3


def test_step_callback_sees_tokens_in_order_and_can_stop_rows():
  model, params = _model("llama")
  seen = []

  def on_step(step, tokens_B):
    seen.append((step, tokens_B.tolist()))
    return np.array([step >= 3, False, False])

  out = gen.generate(model, params, PROMPTS, max_new_tokens=N, on_step=on_step)
  assert [s for s, _ in seen] == list(range(N))
  assert [t[1] for _, t in seen] == out[1]
  assert len(out[0]) == 4 and len(out[1]) == N


def test_streaming_equals_the_device_loop_and_reuses_its_programs():
  """The host-driven streaming loop gives the device loop's tokens (greedy and sampled, scanned
  layers too), and a new callback (a TextStream per call in jaxlm.textgen) compiles nothing."""
  for family, sampler in (("gpt2", None), ("llama", gen.Sampler(1.0, top_k=5))):
    model, params = _model(family)
    rng = jax.random.PRNGKey(3)
    plain = gen.generate(model, params, PROMPTS, rng, max_new_tokens=N, sampler=sampler)
    streams, outs = [[], []], []
    for seen in streams:
      outs.append(gen.generate(model, params, PROMPTS, rng, max_new_tokens=N, sampler=sampler,
                               on_step=lambda step, tokens_B, seen=seen: seen.append(step)))
      if len(outs) == 1:
        compiled = gen._prefill_jit._cache_size(), gen._decode_jit._cache_size()
    assert (gen._prefill_jit._cache_size(), gen._decode_jit._cache_size()) == compiled
    assert streams[0] == streams[1] == list(range(N))
    assert outs[0] == outs[1] == plain


def test_streaming_hands_over_the_prefill_token_before_building_the_decode_step():
  """Time to first token is the prefill's: the first token reaches the callback before the
  decode step is traced (a cached launch spends seconds tracing a many-layer step)."""
  model = Transformer(ModelConfig(**{**TINY["gpt2"], "vocab_size": 53}))  # programs of its own
  params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"])
  before, seen = gen._decode_jit._cache_size(), []
  gen.generate(model, params, PROMPTS, max_new_tokens=3,
               on_step=lambda step, tokens_B: seen.append(gen._decode_jit._cache_size()))
  assert seen == [before, before + 1, before + 1]


def test_too_long_and_empty_prompts_fail_clearly():
  model, params = _model("gpt2")
  with pytest.raises(ValueError, match="exceeds the model's max_seq_len=24"):
    gen.generate(model, params, PROMPTS, max_new_tokens=20)
  with pytest.raises(ValueError, match="prompt is empty"):
    gen.generate(model, params, [[1], []], max_new_tokens=2)


def test_one_prompt_slides_past_max_seq_len():
  model, params = _model("gpt2")
  out = gen.generate_one(model, params, PROMPTS[0], max_new_tokens=40)
  assert len(out) == 40
  assert out[:19] == gen.generate(model, params, PROMPTS[:1], max_new_tokens=19)[0]


def test_every_slid_chunk_runs_one_shape_and_streams_exactly_the_tokens_asked():
  """The last chunk of a sliding sample runs the slid chunks' shape, cut where the tokens run
  out: a sample of another length compiles no new prefill; the stream gets exactly the returned
  tokens, which are the device loop's."""
  model, params = _model("gpt2")  # max_seq_len 24: chunks of 19, then 12, 12, and the rest
  streamed = []
  out = gen.generate_one(model, params, PROMPTS[0], max_new_tokens=45,
                         on_step=lambda step, tokens_B: streamed.append(int(tokens_B[0])))
  assert len(out) == 45 and streamed == out
  assert out == gen.generate_one(model, params, PROMPTS[0], max_new_tokens=45)
  before = gen._prefill_jit._cache_size()
  assert len(gen.generate_one(model, params, PROMPTS[0], max_new_tokens=50,
                              on_step=lambda step, tokens_B: None)) == 50  # last chunk 7, not 2
  assert gen._prefill_jit._cache_size() == before


class _ByteTokenizer:
  """Ids are UTF-8 bytes; 0 is EOS. Enough of a tokenizer to test streaming."""

  eos_token_id = 0
  pad_token_id = 0

  def decode(self, ids, skip_special_tokens=True):
    return bytes(i for i in ids if i).decode("utf-8", errors="replace")


def test_text_stream_prints_whole_characters_and_cuts_at_stop_strings():
  out = io.StringIO()
  pieces = list("héllo wörld\nmore".encode())
  stream = textgen.TextStream(_ByteTokenizer(), [[1]], eos_ids=[0], stop=["\nm"], out=out)
  writes = []
  for step, token in enumerate(pieces):
    stop = stream(step, np.array([token]))
    writes.append(out.getvalue())
    if stop[0]:
      break
  assert stream.close() == ["héllo wörld"]
  assert out.getvalue() == "héllo wörld"
  assert all("\ufffd" not in w for w in writes), "a partial UTF-8 character was printed"
  # one character is held back (the stop string's length - 1); é is two bytes
  assert writes[:4] == ["", "", "h", "hé"]
