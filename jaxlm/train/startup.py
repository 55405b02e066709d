"""Where a run's train state comes from, in one precedence (`initial_state`): 1. resume from the
run's own checkpoint, 2. model.init_from's weights, 3. scratch; and placing imported weights.
"""

import jax
import numpy as np
from flax import traverse_util

from jaxlm import rundir
from jaxlm.models.config import ModelConfig


def initial_state(ckpt, step: int | None, config, model_cfg: ModelConfig, *, abstract, init,
                  message=print) -> tuple:
  """(train state, data iterator state or None): where a run's state comes from, in this order:

    1. resume: checkpoint `step` of the run's own directory (with its data position), once its
       saved config is checked to describe the same state;
    2. model.init_from: the imported weights (an HF checkpoint or another run), a fresh optimizer;
    3. scratch: `init()`, the random initialisation from train.seed.

  `abstract` is the state's ShapeDtypeStructs with shardings (the restore target); `init()`
  returns a fresh sharded state, `init(params)` one around the given full params (placed).
  """
  if step is not None:
    check_same_model(config, ckpt.restore_meta(step).get("config", {}), step)
    message(f"resuming from checkpoint step {step} in {ckpt.directory}")
    state, data_state, _ = ckpt.restore(step, abstract)
    return state, data_state
  if not config.model.init_from:
    return init(), None
  params = rundir.init_params(config.model.init_from, model_cfg)
  state = init(placed(params, abstract))
  if state.lora is not None and config.lora.init_adapter:
    from jaxlm.hf import adapters as peft_adapters

    adapters = peft_adapters.import_adapter(config.lora.init_adapter, model_cfg, state.lora)
    message(f"LoRA adapters from {config.lora.init_adapter}")
    state = with_trainable(state, adapters, abstract)
  return state, None


def _shardings(abstract_tree):
  return jax.tree.map(lambda a: a.sharding, abstract_tree)


def placed(params, abstract):
  """Imported host `params` on the devices: without LoRA in the trainable params' shardings;
  with LoRA (the params the frozen base is made of) in the frozen base's where a leaf keeps its
  shape, else replicated until the state's program casts or quantizes it."""
  if abstract.lora is None:
    return jax.device_put(params, _shardings(abstract.params))
  targets = {**traverse_util.flatten_dict(abstract.frozen, sep="/"),
             **traverse_util.flatten_dict(abstract.params, sep="/")}  # trained ones first
  out = {}
  for path, x in traverse_util.flatten_dict(params, sep="/").items():
    target = targets.get(path)  # a quantized leaf is no ShapeDtypeStruct: replicated
    same = isinstance(target, jax.ShapeDtypeStruct) and target.shape == tuple(x.shape)
    out[path] = jax.device_put(x, target.sharding if same else None)
  return traverse_util.unflatten_dict(out, sep="/")


def with_trainable(state, values: dict, abstract):
  """`state` with some trainable leaves (a nested dict of host arrays, by param path) replaced."""
  flat = traverse_util.flatten_dict(state.params, sep="/")
  where = traverse_util.flatten_dict(_shardings(abstract.params), sep="/")
  for p, x in traverse_util.flatten_dict(values, sep="/").items():
    if p not in flat:
      raise ValueError(f"no trainable parameter {p!r} in this run to load into")
    if tuple(x.shape) != tuple(flat[p].shape):
      raise ValueError(f"{p} has shape {tuple(x.shape)} but the run's is {tuple(flat[p].shape)}")
    flat[p] = jax.device_put(np.asarray(x, flat[p].dtype), where[p])
  return state.replace(params=traverse_util.unflatten_dict(flat, sep="/"))


# config keys that change the shapes or structure of the saved train state
_STATE_KEYS = {
  "model": ("vocab_size", "num_layers", "embed_dim", "num_heads", "num_kv_heads", "head_dim",
            "mlp_dim", "max_seq_len", "position", "use_bias", "qkv_bias", "gated_mlp",
            "tie_embeddings", "norm", "param_dtype", "scan_layers", "head", "num_labels"),
  "optim": ("name",),
  "lora": ("rank", "targets", "base_dtype", "quantize"),
}


def check_same_model(config, saved: dict, step: int):
  """Fails clearly when the config changed what the checkpoint's state looks like."""
  changes = [
    f"{section}.{k}={saved[section][k]!r} there but {config[section][k]!r} now"
    for section, keys in _STATE_KEYS.items() for k in keys
    if k in saved.get(section, {}) and saved[section][k] != config[section][k]
  ]
  was_skip = bool(saved.get("train", {}).get("skip_nonfinite", 0))
  if "train" in saved and was_skip != bool(config.train.skip_nonfinite):
    changes.append("train.skip_nonfinite on/off differs (it wraps the optimizer state)")
  if changes:
    raise ValueError(
      f"checkpoint step {step} was written with a different config ({'; '.join(changes)}); "
      "resume with the same settings, or start over with --config.checkpoint.fresh=True"
    )
