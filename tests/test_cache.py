"""Tests jaxlm/data/cache.py: stable keys, save/load round trips (memory-mapped), entries that
read as absent (missing key, no meta.json), and atomic saves (no temporary directory left behind,
even when a save fails midway; a second save of a key leaves one complete entry)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxlm.data import cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _arrays():
  return {
    "tokens": np.arange(17, dtype=np.int32) * 3,
    "offsets": np.array([0, 5, 11, 17], np.int64),
    "ids16": np.array([[1, 65535], [7, 0]], np.uint16),
  }


def _tmp_dirs(cache_dir):
  return [n for n in os.listdir(cache_dir) if n.startswith(".tmp-")]


def test_key_is_a_short_hex_digest_that_differs_with_its_parts():
  k = cache.key("corpus", {"seq_len": 128}, 3)
  assert len(k) == 24 and all(c in "0123456789abcdef" for c in k)
  assert cache.key("corpus", {"seq_len": 128}, 3) == k
  assert cache.key("corpus", {"seq_len": 256}, 3) != k
  assert cache.key("corpus", {"seq_len": 128}, 4) != k
  assert cache.key({"seq_len": 128}, "corpus", 3) != k  # positional parts are ordered


def test_key_ignores_dict_insertion_order_at_any_depth():
  a = {"tokenizer": "gpt2", "settings": {"seq_len": 128, "eos": True}, "files": [["a", 1]]}
  b = {"files": [["a", 1]], "settings": {"eos": True, "seq_len": 128}, "tokenizer": "gpt2"}
  assert list(a) != list(b)
  assert cache.key(a) == cache.key(b)
  assert cache.key("x", a) == cache.key("x", b)


def test_key_is_the_same_in_a_fresh_interpreter_with_another_hash_seed():
  parts = ("corpus", {"seq_len": 128, "tok": "gpt2"}, [1, 2.5, None])
  code = (
    "import json, sys; from jaxlm.data import cache; "
    "print(cache.key(*json.loads(sys.argv[1])))"
  )
  env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=REPO)
  out = subprocess.run([sys.executable, "-c", code, json.dumps(parts)], env=env, check=True,
                       capture_output=True, text=True, timeout=60)
  assert out.stdout.strip() == cache.key(*parts)


def test_save_then_load_round_trips_arrays_memory_mapped(tmp_path):
  arrays = _arrays()
  path = cache.save(str(tmp_path), "k1", arrays, {"documents": 3, "source": tmp_path})
  assert path == cache.entry_dir(str(tmp_path), "k1") and os.path.isdir(path)
  loaded = cache.load(str(tmp_path), "k1")
  assert sorted(loaded) == sorted(arrays)
  for name, array in arrays.items():
    assert isinstance(loaded[name], np.memmap), f"{name} was read into memory"
    assert loaded[name].dtype == array.dtype and loaded[name].shape == array.shape
    np.testing.assert_array_equal(loaded[name], array)
  with open(os.path.join(path, cache.META_FILE)) as f:
    meta = json.load(f)
  assert meta["arrays"] == sorted(arrays)
  assert meta["documents"] == 3 and meta["source"] == str(tmp_path)  # info kept, as text


def test_load_of_a_missing_key_returns_none(tmp_path):
  assert cache.load(str(tmp_path), "never-saved") is None
  assert cache.load(str(tmp_path / "no-such-dir"), "never-saved") is None
  cache.save(str(tmp_path), "other", _arrays(), {})
  assert cache.load(str(tmp_path), "never-saved") is None


def test_entry_without_meta_json_reads_as_absent(tmp_path):
  """meta.json is written last: an entry without it (a crashed write) must not be read."""
  path = cache.save(str(tmp_path), "k", _arrays(), {})
  os.remove(os.path.join(path, cache.META_FILE))
  assert os.path.isfile(os.path.join(path, "tokens.npy"))
  assert cache.load(str(tmp_path), "k") is None


def test_an_incomplete_entry_left_behind_is_replaced_by_the_next_save(tmp_path):
  path = cache.entry_dir(str(tmp_path), "k")
  os.makedirs(path)
  np.save(os.path.join(path, "tokens.npy"), np.arange(3))  # a crash before meta.json
  cache.save(str(tmp_path), "k", {"tokens": np.arange(5)}, {})
  np.testing.assert_array_equal(cache.load(str(tmp_path), "k")["tokens"], np.arange(5))


def test_save_leaves_no_temporary_directory(tmp_path):
  cache.save(str(tmp_path), "k", _arrays(), {})
  assert os.listdir(tmp_path) == [os.path.basename(cache.entry_dir(str(tmp_path), "k"))]


@pytest.mark.parametrize("error", [RuntimeError, OSError])
def test_save_failing_midway_leaves_no_entry_and_no_temporary_directory(
    tmp_path, monkeypatch, error):
  real_save = np.save
  calls = []

  def save_then_fail(path, array, *args, **kwargs):
    calls.append(path)
    if len(calls) > 1:
      raise error("disk full (simulated)")
    real_save(path, array, *args, **kwargs)

  monkeypatch.setattr(cache.np, "save", save_then_fail)
  with pytest.raises(error, match="simulated"):
    cache.save(str(tmp_path), "k", _arrays(), {})
  assert len(calls) == 2, "the failure should come after one array was written"
  assert _tmp_dirs(tmp_path) == []
  assert not os.path.exists(cache.entry_dir(str(tmp_path), "k"))
  monkeypatch.undo()
  assert cache.load(str(tmp_path), "k") is None
  # and the key can still be saved afterwards
  cache.save(str(tmp_path), "k", _arrays(), {})
  np.testing.assert_array_equal(cache.load(str(tmp_path), "k")["tokens"], _arrays()["tokens"])


def test_two_saves_of_the_same_key_leave_one_complete_entry(tmp_path):
  first = _arrays()
  second = {name: array[::-1].copy() for name, array in first.items()}
  p1 = cache.save(str(tmp_path), "k", first, {"writer": 1})
  p2 = cache.save(str(tmp_path), "k", second, {"writer": 2})  # e.g. a second process racing
  assert p1 == p2
  assert os.listdir(tmp_path) == [os.path.basename(p1)]
  loaded = cache.load(str(tmp_path), "k")
  assert sorted(loaded) == sorted(first)
  # the entry is one writer's whole output, never a mix of the two
  matches = [all(np.array_equal(loaded[n], want[n]) for n in want) for want in (first, second)]
  assert any(matches), "the entry mixes the two saves"
  with open(os.path.join(p1, cache.META_FILE)) as f:
    writer = json.load(f)["writer"]
  assert matches[writer - 1], "meta.json comes from a different save than the arrays"


def test_empty_cache_dir_means_the_default_under_home(tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path))
  assert cache.default_dir() == os.path.join(str(tmp_path), ".cache", "jaxlm")
  path = cache.save("", "k", _arrays(), {})
  assert path.startswith(os.path.join(str(tmp_path), ".cache", "jaxlm"))
  np.testing.assert_array_equal(cache.load(None, "k")["offsets"], _arrays()["offsets"])
