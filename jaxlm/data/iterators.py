"""Iterator helpers: background prefetch so the accelerator never waits on the host, and
several steps' batches stacked for one jitted call."""

import queue
import threading

import numpy as np

from jaxlm.data.batch import BatchIterator

_DONE = object()


class Prefetch:
  """Runs `transform(next(iterator))` up to `size` batches ahead in a daemon thread, keeping the
  iterator protocol exact: get_state() is the state after the last batch *returned*, not the
  last one produced, so a checkpoint taken now resumes at the right batch.

  set_state() is allowed before the first next() (when a run restores), not after.
  """

  def __init__(self, iterator: BatchIterator, transform=lambda x: x, size: int = 2):
    self.iterator, self.transform, self.size = iterator, transform, size
    self._state = iterator.get_state()
    self._queue: queue.Queue | None = None
    self._stop = threading.Event()

  def __iter__(self):
    return self

  def _start(self):
    self._queue = q = queue.Queue(maxsize=self.size)

    def produce():
      try:
        for item in self.iterator:
          if self._stop.is_set():
            return
          q.put((self.transform(item), self.iterator.get_state()))
        q.put(_DONE)
      except BaseException as e:  # surfaced in the consumer
        q.put(e)

    self._thread = threading.Thread(target=produce, daemon=True)
    self._thread.start()

  def __next__(self):
    if self._queue is None:
      self._start()
    item = self._queue.get()
    if item is _DONE:
      self._queue.put(_DONE)
      raise StopIteration
    if isinstance(item, BaseException):
      raise item
    batch, self._state = item
    return batch

  def get_state(self) -> dict:
    return self._state

  def close(self):
    """Stops the background thread (which may be waiting on a full queue) and drops the batches
    it prepared, so a finished run holds no device memory through it; then closes the iterator
    (Grain's prefetch threads, see jaxlm.data.pipeline._take) when the thread has stopped."""
    self._stop.set()
    if self._queue is not None:
      for _ in range(2):  # drain, let a producer blocked on put() see the stop, drain its last
        while not self._queue.empty():
          self._queue.get_nowait()
        self._thread.join(timeout=5)
      if self._thread.is_alive():
        return
    if hasattr(self.iterator, "close"):
      self.iterator.close()

  def set_state(self, state: dict):
    if self._queue is not None:
      raise RuntimeError("Prefetch.set_state must come before the first batch is taken")
    self.iterator.set_state(state)
    self._state = self.iterator.get_state()


class Stack:
  """Batches (dicts of numpy arrays) stacked `lengths` at a time: each item is `[n, rows, ...]`
  for the next n of `lengths`, the batches of n consecutive steps (jaxlm.train.step.train_steps).
  get_state() / set_state() are the iterator's own, exact between stacks.
  """

  def __init__(self, iterator: BatchIterator, lengths):
    self.iterator, self.lengths = iterator, iter(lengths)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    n = next(self.lengths)
    batches = [next(self.iterator) for _ in range(n)]  # StopIteration: the data ran out
    expected = {k: v.shape for k, v in batches[0].items()}
    for b in batches[1:]:
      shapes = {k: v.shape for k, v in b.items()}
      if shapes != expected:
        raise ValueError(
          f"train.steps_per_call={n} stacks batches of one shape, but they vary here "
          f"({expected} then {shapes}); set train.steps_per_call=1 for data whose batch shapes "
          "vary (bucketed or packed tasks)")
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}

  def get_state(self) -> dict:
    return self.iterator.get_state()

  def set_state(self, state: dict):
    self.iterator.set_state(state)

  def close(self):
    if hasattr(self.iterator, "close"):
      self.iterator.close()
