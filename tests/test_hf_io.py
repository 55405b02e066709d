"""Tests jaxlm/hf/io.py: resolve_source (directories, .gguf paths, hub ids, and clear errors for
everything else), write_safetensors round trips (single file, and shards with their index),
PyTorch .bin reading (plain, bfloat16, sharded, and never running code from the pickle), and
read_config's error on a directory without a config."""

import json
import os
import pickle

import huggingface_hub
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

from jaxlm.hf import io


def _tensors():
  rng = np.random.default_rng(0)
  special = np.array([np.nan, -0.0, np.inf, -np.inf, 1e-45, 3.0], np.float32)
  return {
    "model.embed_tokens.weight": rng.standard_normal((10, 6)).astype(np.float32),
    "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((6, 6)).astype(np.float32).T,
    "model.layers.0.mlp.up_proj.weight": rng.standard_normal((8, 6)).astype(ml_dtypes.bfloat16),
    "model.norm.weight": rng.standard_normal(6).astype(np.float16),
    "special": special,
    "position_ids": np.arange(12, dtype=np.int64).reshape(1, 12),
  }


def _assert_bitwise_equal(got: dict, want: dict):
  assert sorted(got) == sorted(want)
  for name, array in want.items():
    assert got[name].dtype == array.dtype, name
    assert got[name].shape == array.shape, name
    assert np.ascontiguousarray(got[name]).tobytes() == np.ascontiguousarray(array).tobytes(), name


@pytest.fixture
def no_download(monkeypatch):
  """Fails the test if resolve_source reaches for the hub."""

  def refuse(*args, **kwargs):
    raise AssertionError(f"unexpected hub download {args} {kwargs}")

  monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)


# ---------------------------------------------------------------------------------------------
# resolve_source


def test_resolve_source_returns_a_directory_as_it_is(tmp_path, no_download):
  assert io.resolve_source(str(tmp_path)) == (str(tmp_path), None)
  assert io.resolve_source(str(tmp_path), "q8.gguf") == (str(tmp_path), "q8.gguf")


def test_resolve_source_splits_a_gguf_path_into_its_directory_and_file(
    tmp_path, monkeypatch, no_download):
  sub = tmp_path / "models"
  sub.mkdir()
  (sub / "tiny.Q8_0.gguf").write_bytes(b"GGUF")
  assert io.resolve_source(str(sub / "tiny.Q8_0.gguf")) == (str(sub), "tiny.Q8_0.gguf")
  monkeypatch.chdir(tmp_path)
  directory, name = io.resolve_source(os.path.join("models", "tiny.Q8_0.gguf"))
  assert name == "tiny.Q8_0.gguf"
  assert os.path.isabs(directory) and os.path.samefile(directory, sub)


@pytest.mark.parametrize("src", [
  "/no/such/model", "./missing-model", "../missing/model", "missing.gguf", "config.json",
])
def test_resolve_source_rejects_a_bad_local_path_naming_it(src, tmp_path, monkeypatch,
                                                            no_download):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "config.json").write_text("{}")  # exists, but is neither a directory nor .gguf
  with pytest.raises(FileNotFoundError, match="is not a Hugging Face model directory") as e:
    io.resolve_source(src)
  assert repr(src) in str(e.value)


@pytest.mark.parametrize("src", ["gpt2-but-not-here", "owner/name/extra", ""])
def test_resolve_source_rejects_a_string_that_is_no_hub_id_without_downloading(
    src, tmp_path, monkeypatch, no_download):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(FileNotFoundError, match="hub id") as e:
    io.resolve_source(src)
  assert repr(src) in str(e.value)


def test_resolve_source_downloads_a_hub_id_with_the_gguf_file_it_names(tmp_path, monkeypatch):
  calls = []

  def fake_download(repo_id, allow_patterns):
    calls.append((repo_id, allow_patterns))
    return str(tmp_path)

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
  monkeypatch.chdir(tmp_path)
  assert io.resolve_source("owner/model") == (str(tmp_path), None)
  assert io.resolve_source("owner/model", "m.Q4_K_M.gguf") == (str(tmp_path), "m.Q4_K_M.gguf")
  (repo, plain), (_, with_gguf) = calls
  assert repo == "owner/model"
  assert {"*.json", "*.safetensors"} <= set(plain) and "m.Q4_K_M.gguf" not in plain
  assert set(with_gguf) == set(plain) | {"m.Q4_K_M.gguf"}


def test_resolve_source_turns_a_failed_download_into_file_not_found(tmp_path, monkeypatch):
  def offline(repo_id, allow_patterns):
    raise ConnectionError("no network (simulated)")

  monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
  monkeypatch.chdir(tmp_path)
  with pytest.raises(FileNotFoundError, match="cannot download 'owner/model'") as e:
    io.resolve_source("owner/model")
  assert "simulated" in str(e.value) and "local directory" in str(e.value)


# ---------------------------------------------------------------------------------------------
# write_safetensors, read_tensors


def test_write_safetensors_single_file_round_trips_bitwise(tmp_path):
  tensors = _tensors()
  assert not tensors["model.layers.0.self_attn.q_proj.weight"].flags.c_contiguous
  written = io.write_safetensors(tensors, str(tmp_path))
  assert written == [io.SAFE_SINGLE]
  assert sorted(os.listdir(tmp_path)) == [io.SAFE_SINGLE]  # no index for a single file
  _assert_bitwise_equal(io.read_tensors(str(tmp_path), None), tensors)


def test_write_safetensors_shards_with_an_index_over_max_shard_size(tmp_path):
  rng = np.random.default_rng(1)
  tensors = {f"layers.{i}.weight": rng.standard_normal((10, 10)).astype(np.float32)
             for i in range(5)}  # 400 bytes each
  tensors["special"] = _tensors()["special"]
  written = io.write_safetensors(tensors, str(tmp_path), max_shard_size=1000)
  assert len(written) >= 3 and io.SAFE_SINGLE not in written
  assert sorted(os.listdir(tmp_path)) == sorted([*written, io.SAFE_INDEX])

  with open(tmp_path / io.SAFE_INDEX) as f:
    index = json.load(f)
  weight_map = index["weight_map"]
  assert sorted(weight_map) == sorted(tensors), "the index must map every tensor"
  assert set(weight_map.values()) == set(written)
  assert index["metadata"]["total_size"] == sum(a.nbytes for a in tensors.values())
  for shard in written:
    with safe_open(str(tmp_path / shard), framework="np") as f:
      held = set(f.keys())  # noqa: SIM118 (safe_open is no dict)
    assert held == {n for n, s in weight_map.items() if s == shard}, shard
    assert sum(tensors[n].nbytes for n in held) <= 1000, f"{shard} is over max_shard_size"
  _assert_bitwise_equal(io.read_tensors(str(tmp_path), None), tensors)


def test_read_tensors_of_a_directory_without_weights_names_what_it_expected(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match=io.SAFE_SINGLE) as e:
    io.read_tensors(str(tmp_path), None)
  assert repr(str(tmp_path)) in str(e.value)


# ---------------------------------------------------------------------------------------------
# PyTorch .bin


def _torch_state():
  import torch

  gen = torch.Generator().manual_seed(0)
  return {
    "embed.weight": torch.randn(10, 6, generator=gen),
    "q.weight": torch.randn(6, 6, generator=gen).t(),  # a non-contiguous view
    "up.weight": torch.randn(8, 6, generator=gen).to(torch.bfloat16),
    "norm.weight": torch.randn(6, generator=gen).to(torch.float16),
    "position_ids": torch.arange(12).reshape(1, 12),
  }


def _assert_same_as_torch(got: dict, state: dict):
  import torch

  assert sorted(got) == sorted(state)
  for name, t in state.items():
    assert got[name].shape == tuple(t.shape), name
    if t.dtype == torch.bfloat16:
      assert got[name].dtype == ml_dtypes.bfloat16, name
      bits = t.contiguous().view(torch.int16).numpy()
      np.testing.assert_array_equal(got[name].view(np.int16), bits, err_msg=name)
    else:
      assert got[name].dtype == t.numpy().dtype, name
      np.testing.assert_array_equal(got[name], t.numpy(), err_msg=name)


def test_read_tensors_reads_a_pytorch_bin_as_the_same_numpy_arrays(tmp_path):
  torch = pytest.importorskip("torch")
  state = _torch_state()
  torch.save(state, tmp_path / io.BIN_SINGLE)
  _assert_same_as_torch(io.read_tensors(str(tmp_path), None), state)


def test_read_tensors_reads_sharded_pytorch_bins_through_their_index(tmp_path):
  torch = pytest.importorskip("torch")
  state = _torch_state()
  names = sorted(state)
  shards = {"pytorch_model-00001-of-00002.bin": names[:2],
            "pytorch_model-00002-of-00002.bin": names[2:]}
  for shard, held in shards.items():
    torch.save({n: state[n] for n in held}, tmp_path / shard)
  index = {"metadata": {}, "weight_map": {n: s for s, held in shards.items() for n in held}}
  (tmp_path / io.BIN_INDEX).write_text(json.dumps(index))
  _assert_same_as_torch(io.read_tensors(str(tmp_path), None), state)


def test_read_tensors_prefers_safetensors_to_a_pytorch_bin(tmp_path):
  torch = pytest.importorskip("torch")
  torch.save({"w": torch.zeros(3)}, tmp_path / io.BIN_SINGLE)
  io.write_safetensors({"w": np.ones(3, np.float32)}, str(tmp_path))
  np.testing.assert_array_equal(io.read_tensors(str(tmp_path), None)["w"], np.ones(3))


_UNPICKLED_CODE_RAN = []


def _record_code_ran():
  _UNPICKLED_CODE_RAN.append(True)
  return 0


class _Payload:
  def __reduce__(self):
    return (_record_code_ran, ())


def test_reading_a_pytorch_bin_never_runs_code_from_its_pickle(tmp_path):
  torch = pytest.importorskip("torch")
  torch.save({"w": torch.zeros(3), "payload": _Payload()}, tmp_path / io.BIN_SINGLE)
  _UNPICKLED_CODE_RAN.clear()
  with pytest.raises(pickle.UnpicklingError):
    io.read_tensors(str(tmp_path), None)
  assert not _UNPICKLED_CODE_RAN


# ---------------------------------------------------------------------------------------------
# read_config


def test_read_config_without_config_json_is_a_clear_value_error(tmp_path):
  (tmp_path / io.SAFE_SINGLE).write_bytes(b"")  # weights but no config
  with pytest.raises(ValueError, match="cannot read the Hugging Face config") as e:
    io.read_config(str(tmp_path))
  assert repr(str(tmp_path)) in str(e.value)


def test_read_config_reads_a_local_config_json(tmp_path):
  config = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
            "num_hidden_layers": 2, "vocab_size": 97}
  (tmp_path / "config.json").write_text(json.dumps(config))
  hf_config = io.read_config(str(tmp_path))
  assert hf_config.model_type == "llama"
  assert (hf_config.hidden_size, hf_config.num_hidden_layers) == (64, 2)
