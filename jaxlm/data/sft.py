"""Instruction / chat examples for supervised fine-tuning: rendered with the tokenizer's chat
template, with a loss mask that is 1 on the assistant's tokens and 0 on everything else.

An example is a list of messages ({role, content}) in `data.messages_column`, or a prompt /
response pair (`data.prompt_column`, `data.response_column`) read as one user and one assistant
turn. The mask is computed on characters (each assistant turn's span in the rendered text) and
mapped onto tokens through the fast tokenizer's offsets, so it does not depend on how the
template's pieces happen to tokenize.
"""

import numpy as np


def columns(cfg) -> list[str]:
  """The columns an SFT source must have: the messages column, else prompt and response."""
  return [cfg.messages_column] if cfg.messages_column else [cfg.prompt_column,
                                                             cfg.response_column]


def to_messages(batch: dict[str, list], cfg) -> list[list[dict]]:
  """Each row of `batch` as a list of chat messages."""
  if cfg.messages_column:
    return batch[cfg.messages_column]
  return [[{"role": "user", "content": p}, {"role": "assistant", "content": r}]
          for p, r in zip(batch[cfg.prompt_column], batch[cfg.response_column])]


def render(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
  """The chat-template text of `messages` and the character spans of the assistant turns.

  Raises:
    ValueError: when the tokenizer has no chat template, or the template is not
      prefix-consistent (a conversation's rendering must extend its prefixes' renderings).
  """
  if not getattr(tokenizer, "chat_template", None):
    raise ValueError("kind='sft' needs a tokenizer with a chat template (tokenizer."
                     "chat_template is empty); use an instruct model's tokenizer")
  text = tokenizer.apply_chat_template(messages, tokenize=False)
  spans = []
  for i, message in enumerate(messages):
    if message["role"] != "assistant":
      continue
    before = tokenizer.apply_chat_template(messages[:i], tokenize=False,
                                           add_generation_prompt=True) if i else ""
    through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
    if not (text.startswith(through) and through.startswith(before)):
      raise ValueError("the tokenizer's chat template does not render conversations as "
                       "extensions of their prefixes, so assistant turns cannot be located")
    spans.append((len(before), len(through)))
  if not spans:
    raise ValueError(f"an SFT example has no assistant message (roles: "
                     f"{[m['role'] for m in messages]}); every example needs a response")
  return text, spans


def encode_examples(tokenizer, batch: dict[str, list], cfg, bos: list[int], eos: list[int]):
  """(flat int32 ids, int64 lengths, flat uint8 loss mask) of a batch of examples.

  A token is trained on (mask 1) when its first character lies in an assistant span; bos/eos
  added around the example get mask 0 and 1 respectively (EOS ends the response).
  """
  rendered = [render(tokenizer, m) for m in to_messages(batch, cfg)]
  encodings = tokenizer.backend_tokenizer.encode_batch([t for t, _ in rendered],
                                                       add_special_tokens=False)
  ids, masks = [], []
  for (_, spans), enc in zip(rendered, encodings):
    starts = np.array([s for s, _ in enc.offsets], np.int64)
    mask = np.zeros(len(starts), np.uint8)
    for lo, hi in spans:
      mask[(starts >= lo) & (starts < hi)] = 1
    ids.append(np.concatenate([bos, enc.ids, eos]).astype(np.int32))
    masks.append(np.concatenate([np.zeros(len(bos)), mask, np.ones(len(eos))]).astype(np.uint8))
  lengths = np.array([len(x) for x in ids], np.int64)
  if not ids:
    return np.zeros(0, np.int32), lengths, np.zeros(0, np.uint8)
  return np.concatenate(ids), lengths, np.concatenate(masks)
