"""Text in, text out: tokenize a prompt, generate, stream the decoded text, stop on stop strings.

`TextStream` is the host callback of the decode loop (`generate`): it decodes each row's
growing ids, prints the new text of row 0 as it comes, and stops rows that hit a stop string.
"""

import sys
import time
from collections.abc import Sequence
from typing import TextIO

import jax
import numpy as np

from jaxlm import generate as gen


class TextStream:
  """Host callback for `generate`: per-row text so far, stop strings, optional printing.

  Each step decodes the row's whole id sequence again and prints the new suffix, so BPE pieces
  and partial UTF-8 characters appear only once they are complete. The last len(stop) - 1
  characters are held back so that a stop string is never printed in part. Each row is decoded
  after the last few ids of its prompt (`contexts`), so tokenizers that drop a leading space at
  the start of a text (SentencePiece) keep it.
  """

  def __init__(self, tokenizer, contexts: Sequence[Sequence[int]], eos_ids: Sequence[int] = (),
               stop: Sequence[str] = (), out: TextIO | None = None):
    self.tokenizer, self.eos_ids, self.stop, self.out = tokenizer, set(eos_ids), tuple(stop), out
    self.contexts = [list(c)[-4:] for c in contexts]
    self.skip = [len(self._decode(c)) for c in self.contexts]
    batch = len(contexts)
    self.ids = [[] for _ in range(batch)]
    self.texts = [""] * batch
    self.done = [False] * batch
    self.printed = 0
    self.holdback = max((len(s) for s in self.stop), default=1) - 1
    self.started, self.steps = time.perf_counter(), 0
    self.first_token_at = self.second_token_at = self.last_token_at = 0.0

  @property
  def time_to_first_token(self) -> float:
    """Seconds from this stream's creation to the first generated token (compilation included)."""
    return self.first_token_at - self.started

  @property
  def decode_tokens_per_sec(self) -> float:
    """Tokens per second of all rows after the second token (the first comes from the prefill,
    the second also waits for the decode step to be built)."""
    elapsed = self.last_token_at - self.second_token_at
    return (self.steps - 2) * len(self.ids) / elapsed if elapsed > 0 else 0.0

  def __call__(self, step: int, tokens_B: np.ndarray) -> np.ndarray:
    self.last_token_at = time.perf_counter()
    self.steps += 1
    if self.steps == 1:
      self.first_token_at = self.last_token_at
    elif self.steps == 2:
      self.second_token_at = self.last_token_at
    for b, token in enumerate(tokens_B.tolist()):
      if self.done[b]:
        continue
      if token in self.eos_ids:
        self.done[b] = True
        continue
      self.ids[b].append(token)
      self.texts[b] = self._decode(self.contexts[b] + self.ids[b])[self.skip[b]:]
      cut = min((i for i in (self.texts[b].find(s) for s in self.stop) if i >= 0), default=-1)
      if cut >= 0:
        self.texts[b], self.done[b] = self.texts[b][:cut], True
    self._print(final=self.done[0])
    return np.asarray(self.done, bool)

  def _decode(self, ids: list[int]) -> str:
    return self.tokenizer.decode(ids, skip_special_tokens=True)

  def _print(self, final: bool):
    if self.out is None:
      return
    text = self.texts[0]
    end = len(text) if final else len(text.rstrip("\ufffd")) - self.holdback
    if end > self.printed:
      self.out.write(text[self.printed:end])
      self.out.flush()
      self.printed = end

  def close(self) -> list[str]:
    """Prints what was held back; returns each row's text (cut before any stop string)."""
    self._print(final=True)
    return self.texts


def eos_ids_of(tokenizer) -> list[int]:
  """The tokenizer's end-of-sequence id(s), if it has any."""
  eos = getattr(tokenizer, "eos_token_id", None)
  return [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]


def complete(model, params, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 100,
             sampler: gen.Sampler | None = None, seed: int = 0, stop: Sequence[str] = (),
             out: TextIO | None = None, pad_multiple: int = 1,
             timing: dict | None = None) -> list[str]:
  """Generated continuations of `prompts` (without the prompts), cut at EOS and stop strings.

  With `out` (e.g. sys.stdout) the first prompt's continuation is printed as it is generated.
  A single prompt may run past the model's max_seq_len (the context slides). Several prompts
  are padded to a multiple of `pad_multiple` tokens (fewer programs to compile across calls).
  `timing`, when given, receives time_to_first_token and decode_tokens_per_sec.
  """
  prompt_ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
  eos_ids = eos_ids_of(tokenizer)
  stream = TextStream(tokenizer, prompt_ids, eos_ids, stop, out)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  kwargs = {"max_new_tokens": max_new_tokens, "sampler": sampler, "eos_ids": eos_ids,
            "pad_id": pad_id, "on_step": stream}
  rng = jax.random.PRNGKey(seed)
  if len(prompts) == 1:
    gen.generate_one(model, params, prompt_ids[0], rng, **kwargs)
  else:
    gen.generate(model, params, prompt_ids, rng, pad_multiple=pad_multiple, **kwargs)
  if timing is not None:
    timing.update(time_to_first_token=stream.time_to_first_token,
                  decode_tokens_per_sec=stream.decode_tokens_per_sec)
  return stream.close()


def print_completion(model, params, tokenizer, prompt: str, out: TextIO = sys.stdout,
                     **kwargs) -> str:
  """Prints `prompt` then streams its continuation to `out`; returns prompt + continuation."""
  out.write(prompt)
  out.flush()
  text = complete(model, params, tokenizer, [prompt], out=out, **kwargs)[0]
  out.write("\n")
  out.flush()
  return prompt + text
