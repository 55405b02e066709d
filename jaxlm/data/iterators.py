"""Iterator helpers: background prefetch so the accelerator never waits on the host."""

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
