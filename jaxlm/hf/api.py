"""`from_hf` and `to_hf`: a Hugging Face checkpoint in, a jaxlm (model, params) out, and back.

  model, params = jaxlm.from_hf("path/or/hub-id", dtype=jnp.bfloat16)  # or dtype="bfloat16"
  jaxlm.to_hf(model, params, "out_dir", tokenizer=tokenizer)
"""

import os

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from jaxlm.data import tokenizers as tok_lib
from jaxlm.hf import convert, families, io


def read_hf_config(src: str, gguf_file: str | None = None):
  """(family, HF config, local directory, gguf file) of a checkpoint; no weights are read.

  Args:
    src: a local HF model directory, a .gguf file, or a hub id.
    gguf_file: a GGUF file name inside the directory `src`.
  """
  directory, gguf_file = io.resolve_source(src, gguf_file)
  hf_config = io.read_config(directory, gguf_file)
  return families.family_for_hf_config(hf_config), hf_config, directory, gguf_file


def load_hf_checkpoint(src: str, gguf_file: str | None = None):
  """(family, HF config, numpy tensors, local directory, gguf file) of a checkpoint (arguments
  as in read_hf_config)."""
  family, hf_config, directory, gguf_file = read_hf_config(src, gguf_file)
  tensors = io.read_tensors(directory, hf_config, gguf_file)
  return family, hf_config, tensors, directory, gguf_file


def model_config_from_hf(family, hf_config, dtype: DTypeLike = "float32", **overrides):
  """The jaxlm config of an HF config: params and compute in `dtype` ("bfloat16", jnp.bfloat16,
  ...; stored by name), plus run-level overrides (dropout, remat, scan_layers, ...)."""
  cfg = family.config_from_hf(hf_config)
  return cfg.replace(**{"dtype": dtype, "param_dtype": dtype, **overrides})


def config_from_hf(src: str, dtype: DTypeLike = "float32", gguf_file: str | None = None,
                   **overrides):
  """The ModelConfig that `from_hf(src, dtype, gguf_file, **overrides)` would build, read from
  the checkpoint's config alone (no weights loaded)."""
  family, hf_config, _, _ = read_hf_config(src, gguf_file)
  return model_config_from_hf(family, hf_config, dtype, **overrides)


def import_params(src: str, cfg, gguf_file: str | None = None) -> dict:
  """Host numpy params of checkpoint `src` laid out for jaxlm config `cfg` (scanned or not, in
  cfg.param_dtype); an encoder imported for another task (cfg.head or cfg.num_labels differ
  from the checkpoint's) gets a new, initialised head on its encoder (a message names it)."""
  from jaxlm.models.config import RUN_FIELDS

  family, hf_config, tensors, _, _ = load_hf_checkpoint(src, gguf_file)
  stored = family.config_from_hf(hf_config).replace(
    **{k: getattr(cfg, k) for k in RUN_FIELDS if k not in ("head", "num_labels")})
  if (cfg.head, cfg.num_labels) == (stored.head, stored.num_labels):
    return convert.import_params(family, cfg, tensors)
  from jaxlm.models import heads

  return heads.with_new_head(cfg, convert.import_params(family, stored, tensors),
                             what=f"{src} ({stored.head} head)")


def from_hf(src: str, dtype: DTypeLike = "float32", gguf_file: str | None = None, **overrides):
  """Imports a Hugging Face causal LM (GPT-2, Llama 2/3, Mistral, Qwen2, SmolLM) or encoder
  (BERT, RoBERTa: base, masked-LM, sequence/token classification, QA).

  Overriding `head` (and `num_labels`) imports an encoder for another task: the encoder comes
  from the checkpoint, the new head is initialised (and a message names it).

  Args:
    src: a local HF model directory (safetensors, sharded or not; or PyTorch .bin), a .gguf
      file, or a hub id.
    dtype: parameter and compute dtype: float32 | bfloat16 | float16, as a name or a dtype
      (jnp.bfloat16, np.float32).
    gguf_file: GGUF file name inside `src`, when `src` is a directory.
    **overrides: ModelConfig fields to change (e.g. dropout=0.1, remat="full").

  Returns:
    (model, params): a flax module whose `.cfg` is the ModelConfig, and its param tree.
  """
  from jaxlm.models import heads

  cfg = config_from_hf(src, dtype, gguf_file, **overrides)
  params = import_params(src, cfg, gguf_file)
  return heads.build_model(cfg), jax.tree.map(jnp.asarray, params)


def to_hf(model, params, out_dir: str, tokenizer=None, family: str | None = None,
          max_shard_size: int | str = "5GB") -> str:
  """Writes a transformers-loadable directory: config.json, safetensors (sharded with an index
  beyond `max_shard_size`) and the tokenizer files.

  Args:
    model: a jaxlm model with `.cfg` (e.g. from `from_hf` or a run).
    params: its param tree (plain arrays, on any devices).
    out_dir: created if needed.
    tokenizer: a transformers tokenizer or a directory holding one; checked to fit the vocab.
    family: HF family to write (gpt2 | llama | mistral | qwen2); inferred from the config.
  Returns:
    out_dir.
  """
  cfg = model.cfg
  fam = families.family_for(cfg, family)
  hf_config = fam.config_to_hf(cfg)
  if isinstance(tokenizer, str):
    tokenizer = tok_lib.load_tokenizer(tokenizer)
  if tokenizer is not None:
    tok_lib.check_fits(tokenizer, cfg.vocab_size)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
      if getattr(tokenizer, name, None) is not None:
        setattr(hf_config, name, getattr(tokenizer, name))
  hf_config.dtype = cfg.param_dtype
  tensors = convert.export_params(fam, cfg, params)
  os.makedirs(out_dir, exist_ok=True)
  hf_config.save_pretrained(out_dir)
  io.write_safetensors(tensors, out_dir, max_shard_size)
  if tokenizer is not None:
    tokenizer.save_pretrained(out_dir)
  return out_dir
