"""On-disk cache of tokenized corpora: flat token arrays and document offsets, keyed by a hash.

A key covers the source (files' sizes and mtimes, or a dataset's fingerprint), the tokenizer and
the settings, so a change to any of them tokenizes again. Entries are written to a temporary
directory and renamed into place, so a crash never leaves a half-written entry behind.
"""

import hashlib
import json
import os
import shutil
import uuid

import numpy as np

META_FILE = "meta.json"


def default_dir() -> str:
  return os.path.join(os.path.expanduser("~"), ".cache", "jaxlm")


def key(*parts) -> str:
  """A short stable hash of JSON-serializable `parts`."""
  blob = json.dumps(parts, sort_keys=True, default=str).encode()
  return hashlib.sha256(blob).hexdigest()[:24]


def entry_dir(cache_dir: str, entry_key: str) -> str:
  return os.path.join(cache_dir or default_dir(), f"tok-{entry_key}")


def load(cache_dir: str, entry_key: str) -> dict[str, np.ndarray] | None:
  """The arrays stored under `entry_key` (memory-mapped), or None when there is no entry."""
  path = entry_dir(cache_dir, entry_key)
  meta_path = os.path.join(path, META_FILE)
  if not os.path.isfile(meta_path):
    return None
  with open(meta_path) as f:
    names = json.load(f)["arrays"]
  return {n: np.load(os.path.join(path, f"{n}.npy"), mmap_mode="r") for n in names}


def save(cache_dir: str, entry_key: str, arrays: dict[str, np.ndarray], info: dict) -> str:
  """Writes `arrays` (and `info`, for people reading the cache) atomically; returns the entry."""
  final = entry_dir(cache_dir, entry_key)
  parent = os.path.dirname(final)
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".tmp-{os.path.basename(final)}-{uuid.uuid4().hex[:8]}")
  os.makedirs(tmp)
  try:
    for name, array in arrays.items():
      np.save(os.path.join(tmp, f"{name}.npy"), np.asarray(array))
    with open(os.path.join(tmp, META_FILE), "w") as f:  # written last: marks the entry complete
      json.dump({"arrays": sorted(arrays), **info}, f, indent=1, default=str)
    if os.path.isdir(final) and not os.path.isfile(os.path.join(final, META_FILE)):
      shutil.rmtree(final, ignore_errors=True)  # an incomplete entry left by an older crash
    os.rename(tmp, final)
  except OSError:
    if not os.path.isfile(os.path.join(final, META_FILE)):  # not another writer's finished entry
      raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return final
