"""Iterator helpers: background prefetch, and a resumable step-indexed batch iterator."""

import queue
import threading
from typing import Iterable, Iterator

_DONE = object()


def background(items: Iterable, size: int = 2) -> Iterator:
  """Yields from `items`, produced up to `size` ahead by a daemon thread (errors re-raised)."""
  q: queue.Queue = queue.Queue(maxsize=size)

  def produce():
    try:
      for item in items:
        q.put(item)
      q.put(_DONE)
    except BaseException as e:  # surfaced in the consumer
      q.put(e)

  threading.Thread(target=produce, daemon=True).start()
  while True:
    item = q.get()
    if item is _DONE:
      return
    if isinstance(item, BaseException):
      raise item
    yield item


class StepIterator:
  """This process's training batches as a resumable iterator: batch n depends only on
  (seed, n, process), so the whole position is {"step": n}.

  Protocol used by the train loop: `next()` gives a dict of numpy arrays, `get_state()` a
  JSON-serializable dict, `set_state(state)` moves back to it.
  """

  def __init__(self, stream, local_batch: int, process: int = 0, step: int = 0):
    self.stream, self.local_batch, self.process, self.step = stream, local_batch, process, step

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = self.stream.train_batch(self.step, self.local_batch, self.process)
    self.step += 1
    return batch

  def get_state(self) -> dict:
    return {"step": self.step}

  def set_state(self, state: dict) -> None:
    self.step = int(state["step"])
