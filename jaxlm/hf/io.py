"""Reading and writing Hugging Face checkpoints as numpy tensors: safetensors (single or sharded,
no torch), PyTorch .bin (torch, weights only), GGUF (via transformers, dequantised to fp32).

Nothing here knows a model family; names and shapes are mapped in jaxlm.hf.convert.
"""

import json
import os

import numpy as np

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"]


def resolve_source(src: str, gguf_file: str | None = None) -> tuple[str, str | None]:
  """(local directory, GGUF file name or None) for a directory, a .gguf file or a hub id.

  Raises:
    FileNotFoundError: when `src` is neither a local path nor a reachable hub id.
  """
  if os.path.isfile(src) and src.endswith(".gguf"):
    return os.path.dirname(os.path.abspath(src)), os.path.basename(src)
  if os.path.isdir(src):
    return src, gguf_file
  if os.path.exists(src) or src.startswith((".", "/")) or src.count("/") != 1:
    raise FileNotFoundError(f"{src!r} is not a Hugging Face model directory, a .gguf file or a "
                            "hub id (owner/name)")
  from huggingface_hub import snapshot_download

  patterns = _DOWNLOAD_PATTERNS + ([gguf_file] if gguf_file else [])
  try:
    return snapshot_download(src, allow_patterns=patterns), gguf_file
  except Exception as e:  # noqa: BLE001 (offline, missing repo, gated repo: all end the same way for the user)
    raise FileNotFoundError(f"cannot download {src!r} from the Hugging Face hub ({e}); pass a "
                            "local directory instead") from None


def read_config(directory: str, gguf_file: str | None = None):
  """The transformers PretrainedConfig of a checkpoint (remote code is never trusted)."""
  from transformers import AutoConfig

  kwargs = {"gguf_file": gguf_file} if gguf_file else {}
  try:
    return AutoConfig.from_pretrained(directory, trust_remote_code=False, **kwargs)
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot read the Hugging Face config in {directory!r}: {e}") from None


def read_tensors(directory: str, hf_config, gguf_file: str | None = None) -> dict:
  """All tensors of the checkpoint in `directory`, by HF name, as numpy arrays."""
  if gguf_file:
    return _read_gguf(directory, gguf_file, hf_config)
  for index, single, reader in ((SAFE_INDEX, SAFE_SINGLE, _read_safetensors),
                                (BIN_INDEX, BIN_SINGLE, _read_torch_bin)):
    index_path = os.path.join(directory, index)
    if os.path.isfile(index_path):
      with open(index_path) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
      return {k: v for name in files for k, v in reader(os.path.join(directory, name)).items()}
    if os.path.isfile(os.path.join(directory, single)):
      return reader(os.path.join(directory, single))
  raise FileNotFoundError(
    f"no weights in {directory!r}: expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or "
    f"{BIN_INDEX} (or pass a .gguf file)"
  )


def _read_safetensors(path: str) -> dict:
  from safetensors import safe_open

  with safe_open(path, framework="np") as f:
    return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is no dict)


def _torch_to_numpy(t) -> np.ndarray:
  import torch

  t = t.detach().cpu()
  if t.dtype == torch.bfloat16:
    import ml_dtypes

    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def _read_torch_bin(path: str) -> dict:
  try:
    import torch
  except ImportError:
    raise ValueError(f"{path} is a PyTorch checkpoint: reading it needs torch installed "
                     "(or convert it to safetensors)") from None
  # weights_only: unpickling a checkpoint must never run code from it
  state = torch.load(path, map_location="cpu", weights_only=True)
  return {name: _torch_to_numpy(t) for name, t in state.items()}


def _read_gguf(directory: str, gguf_file: str, hf_config) -> dict:
  """GGUF tensors through transformers' own loader (dequantised to fp32, llama.cpp's q/k
  permutation undone), named as the transformers model of `hf_config` names them."""
  try:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
  except ImportError as e:
    raise ValueError(f"reading GGUF needs torch and the gguf package ({e})") from None
  with torch.device("meta"):  # only the names are needed, not the memory
    skeleton = AutoModelForCausalLM.from_config(hf_config)
  path = os.path.join(directory, gguf_file)
  loaded = load_gguf_checkpoint(path, return_tensors=True, model_to_load=skeleton)
  return {name: _torch_to_numpy(t) for name, t in loaded["tensors"].items()}


def write_safetensors(tensors: dict, directory: str, max_shard_size: int | str = "5GB") -> list:
  """Writes `tensors` as model.safetensors, or as numbered shards plus the index JSON when they
  exceed `max_shard_size`. Returns the file names written."""
  from huggingface_hub import split_state_dict_into_shards_factory
  from safetensors.numpy import save_file

  split = split_state_dict_into_shards_factory(
    tensors, get_storage_size=lambda a: a.nbytes, max_shard_size=max_shard_size,
    filename_pattern="model{suffix}.safetensors",
  )
  for filename, names in split.filename_to_tensors.items():
    shard = {name: np.ascontiguousarray(tensors[name]) for name in names}
    save_file(shard, os.path.join(directory, filename), metadata={"format": "pt"})
  if split.is_sharded:
    index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    with open(os.path.join(directory, SAFE_INDEX), "w") as f:
      json.dump(index, f, indent=2, sort_keys=True)
  return sorted(split.filename_to_tensors)
