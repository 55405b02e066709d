"""PEFT LoRA adapters in and out: a jaxlm LoRA run's adapters as a PEFT adapter directory
(adapter_config.json + adapter_model.safetensors, loadable by `peft.PeftModel.from_pretrained`),
and a PEFT adapter directory as jaxlm adapters, both through the family's HF name table.

PEFT's lora_A.weight is [r, in] and lora_B.weight [out, r] for Linear and Conv1D alike; ours are
A [*I, r] and B [r, *O] with the kernel's input and output axes in the HF flattening order. A
fused HF projection (GPT-2's c_attn = q, k, v) gets one adapter of rank parts x r: A stacked,
B block-diagonal, its rank and alpha given per module in rank_pattern/alpha_pattern so the
scale is ours; imported, a shared-A adapter of rank r becomes one adapter per part.
"""

import json
import math
import os
import re

import numpy as np

from jaxlm.hf import convert, families
from jaxlm.models.lora import scale_of, unscanned_paths

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def _module(rule, fields) -> str:
  return convert.hf_name(rule, fields).removesuffix(".weight")


def _parts(rule) -> int:
  """How many kernels a fused HF tensor holds (the leading literal of its pattern's right side)."""
  return int(rule.pattern.split("->")[1].split()[0]) if rule.part is not None else 1


def _fan_in_fan_out(rule, n_in: int) -> bool:
  """True when the HF weight is stored [in, out] (Conv1D) rather than [out, in] (Linear)."""
  lhs, rhs = (s.strip() for s in rule.pattern.split("->"))
  if lhs == "...":
    return True
  rhs_names = rhs.split()[1:] if rule.part is not None else rhs.split()
  first = convert._parse_side(lhs)[0]
  return set(first) <= set(rhs_names[:n_in])


def _layer(path: str, stacked: bool, i: int, x: np.ndarray) -> np.ndarray:
  return x[i] if stacked else x


def _hf_modules(family, cfg) -> dict:
  """{HF module name: [(kernel path, rule)]} of every kernel of the (unscanned) model."""
  out = {}
  for path in convert.abstract_params(family, cfg):
    if path.endswith("/kernel"):
      rule, fields = convert.match(family.rules, path)
      out.setdefault(_module(rule, fields), []).append((path, rule))
  return out


# --- export -----------------------------------------------------------------------------------


def export_adapter(model_cfg, lora, trainable, out_dir: str, *, base: str, tokenizer=None) -> str:
  """Writes a PEFT adapter directory for a jaxlm LoRA decoder.

  Args:
    model_cfg: the run's ModelConfig (its family picks the HF names).
    lora: the run's jaxlm.models.lora.Lora.
    trainable: its trainable params (the adapters), any arrays.
    out_dir: created if needed.
    base: base_model_name_or_path to record (the run's model.init_from).
    tokenizer: saved beside the adapter when given.
  Returns:
    out_dir.
  """
  import jax
  from flax import traverse_util

  if lora.full or not model_cfg.causal:
    raise ValueError(
      "only decoder LoRA runs export as a PEFT adapter; write the merged model "
      "with `jaxlm convert --to-hf OUT --merge`"
    )
  family = families.family_for(model_cfg)
  flat = traverse_util.flatten_dict(jax.device_get(trainable), sep="/")
  modules = {}  # HF module -> {part: (A [I, r], B [r, O])}, and its rule
  for t in lora.targets:
    base_path = t.path.rsplit("/", 1)[0]
    a, b = np.asarray(flat[f"{base_path}/lora_a"]), np.asarray(flat[f"{base_path}/lora_b"])
    for i, path in enumerate(unscanned_paths(t.path, model_cfg.num_layers)):
      rule, fields = convert.match(family.rules, path)
      a_i, b_i = _layer(path, t.stacked, i, a), _layer(path, t.stacked, i, b)
      entry = modules.setdefault(_module(rule, fields), {"rule": rule, "n_in": t.n_in, "parts": {}})
      entry["parts"][rule.part or 0] = (a_i.reshape(-1, lora.rank), b_i.reshape(lora.rank, -1))
  tensors, rank_pattern, alpha_pattern = {}, {}, {}
  for name, entry in modules.items():
    a_t, b_t = _fuse(entry["rule"], entry["parts"])
    tensors[f"{_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a_t, np.float32)
    tensors[f"{_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b_t, np.float32)
    rank = a_t.shape[0]
    if rank != lora.rank:  # a fused module: rank parts x r, alpha keeping our scale
      short = name.rsplit(".", 1)[-1]
      rank_pattern[short] = rank
      alpha_pattern[short] = lora.scale * (math.sqrt(rank) if lora.rslora else rank)
  fan = {_fan_in_fan_out(e["rule"], e["n_in"]) for e in modules.values()}
  config = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "base_model_name_or_path": base,
    "r": lora.rank,
    "lora_alpha": lora.alpha,
    "use_rslora": lora.rslora,
    "lora_dropout": 0.0,
    "target_modules": _target_modules(family, model_cfg, set(modules)),
    "rank_pattern": rank_pattern,
    "alpha_pattern": alpha_pattern,
    "bias": "none",
    "fan_in_fan_out": fan == {True},
    "inference_mode": True,
    "init_lora_weights": True,
    "modules_to_save": None,
    "layers_to_transform": None,
    "use_dora": False,
  }
  from safetensors.numpy import save_file

  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
    json.dump(config, f, indent=2)
  save_file(tensors, os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
  if tokenizer is not None:
    tokenizer.save_pretrained(out_dir)
  return out_dir


def _fuse(rule, parts: dict) -> tuple[np.ndarray, np.ndarray]:
  """PEFT's (lora_A [R, I], lora_B [O_total, R]) of one HF module from our parts' (A, B)."""
  if rule.part is None:
    a, b = parts[0]
    return a.T, b.T
  n, (a0, b0) = _parts(rule), next(iter(parts.values()))
  r, o = a0.shape[1], b0.shape[1]
  a_t = np.zeros((n * r, a0.shape[0]), a0.dtype)  # a part not adapted: zero A and B blocks
  b_t = np.zeros((n * o, n * r), b0.dtype)
  for p, (a, b) in parts.items():
    a_t[p * r : (p + 1) * r] = a.T
    b_t[p * o : (p + 1) * o, p * r : (p + 1) * r] = b.T
  return a_t, b_t


def _target_modules(family, cfg, names: set) -> list[str]:
  """Short module names (q_proj, c_attn) when every layer's module of that name is adapted,
  else the full module names."""
  short = {n.rsplit(".", 1)[-1] for n in names}
  every = {
    n for n in _hf_modules(family, cfg.replace(scan_layers=False)) if n.rsplit(".", 1)[-1] in short
  }
  return sorted(short) if every == names else sorted(names)


# --- import -----------------------------------------------------------------------------------


def read_adapter(path: str) -> tuple[dict, dict]:
  """(adapter_config.json, {module name: {"A": lora_A, "B": lora_B}}) of a PEFT adapter dir."""
  cfg_file, weights = os.path.join(path, CONFIG_FILE), os.path.join(path, WEIGHTS_FILE)
  if not (os.path.isfile(cfg_file) and os.path.isfile(weights)):
    raise FileNotFoundError(
      f"lora.init_adapter={path!r} is not a PEFT adapter directory (it "
      f"needs {CONFIG_FILE} and {WEIGHTS_FILE})"
    )
  with open(cfg_file) as f:
    config = json.load(f)
  if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
    raise ValueError(
      f"{path} holds a {config.get('peft_type')} adapter"
      f"{' with DoRA' if config.get('use_dora') else ''}; jaxlm reads plain LoRA"
    )
  from safetensors.numpy import load_file

  modules = {}
  for name, x in load_file(weights).items():
    m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight", name)
    if m is None:
      raise ValueError(
        f"{path}: tensor {name!r} is not a LoRA weight (lora_A / lora_B); "
        "modules_to_save and biases are not read"
      )
    modules.setdefault(m.group(1), {})[m.group(2)] = x
  return config, modules


def _base_name(src: str) -> str:
  """The model's name in a path or hub id, a GGUF file's quantization suffix dropped:
  'HuggingFaceTB/SmolLM2-135M-Instruct' and '.../SmolLM2-135M-Instruct.Q4_1.gguf' agree."""
  name = os.path.basename(os.path.normpath(src or "")).lower()
  return re.sub(r"(\.(q\d\w*|f16|f32|bf16))?\.gguf$", "", name)


def adapter_settings(path: str, model_cfg, init_from: str) -> dict:
  """The `lora` config values of a PEFT adapter over `init_from`'s model: rank, alpha, rslora and
  targets (a regex naming exactly its kernels).

  Raises:
    ValueError: an adapter made for another base (name, module or shape), or one jaxlm cannot
      express (one line each).
  """
  config, modules = read_adapter(path)
  base = config.get("base_model_name_or_path") or ""
  if base and init_from and _base_name(base) != _base_name(init_from):
    raise ValueError(
      f"the adapter {path} was made for {base!r} but model.init_from="
      f"{init_from!r}; start from that base (or fix base_model_name_or_path in "
      f"{CONFIG_FILE} if it is the same model under another name)"
    )
  family = families.family_for(model_cfg)
  known = _hf_modules(family, model_cfg.replace(scan_layers=False))
  paths = []
  for name in sorted(modules):
    if name not in known:
      raise ValueError(
        f"the adapter {path} adapts {name!r}, which {init_from!r} "
        f"({family.name}) does not have: it was made for another base model"
      )
    paths += [p for p, _ in known[name]]
  return {
    "rank": int(config["r"]),
    "alpha": float(config["lora_alpha"]),
    "rslora": bool(config.get("use_rslora", False)),
    "dropout": 0.0,
    "targets": "|".join(re.escape(p) for p in sorted(paths)),
  }


def _pattern_value(patterns: dict, name: str, default):
  for key, value in (patterns or {}).items():
    if re.match(rf"(.*\.)?({key})$", name):
      return value
  return default


def import_adapter(path: str, model_cfg, lora) -> dict:
  """A PEFT adapter directory as jaxlm trainable params ({module/lora_a, module/lora_b}, scanned
  layers stacked), scaled to `lora`'s alpha and rank (read by adapter_settings).

  Raises:
    ValueError: a tensor whose shape does not fit the base model, or ranks jaxlm cannot hold.
  """
  from flax import traverse_util

  config, modules = read_adapter(path)
  family = families.family_for(model_cfg)
  out, shapes = {}, _kernel_shapes(model_cfg)
  for t in lora.targets:
    a_layers, b_layers = [], []
    for i, upath in enumerate(unscanned_paths(t.path, model_cfg.num_layers)):
      rule, fields = convert.match(family.rules, upath)
      name = _module(rule, fields)
      a, b = _split(name, modules[name], rule, config, lora, path)
      a_layers.append(a)
      b_layers.append(b)
    shape = shapes[unscanned_paths(t.path, model_cfg.num_layers)[0]]
    in_shape, out_shape = shape[: t.n_in], shape[t.n_in :]
    a = np.stack(a_layers) if t.stacked else a_layers[0]
    b = np.stack(b_layers) if t.stacked else b_layers[0]
    lead = a.shape[:1] if t.stacked else ()
    want_a, want_b = math.prod(in_shape), math.prod(out_shape)
    if a.shape[-2] != want_a or b.shape[-1] != want_b:
      raise ValueError(
        f"the adapter {path} for {t.path} has lora_A in={a.shape[-2]}, lora_B "
        f"out={b.shape[-1]} but the base needs {want_a} and {want_b}: it was "
        "made for a different base model"
      )
    module = t.path.rsplit("/", 1)[0]
    out[f"{module}/lora_a"] = a.reshape(*lead, *in_shape, lora.rank)
    out[f"{module}/lora_b"] = b.reshape(*lead, lora.rank, *out_shape)
  return traverse_util.unflatten_dict(out, sep="/")


def _kernel_shapes(model_cfg) -> dict:
  """{unscanned kernel path: shape} of the model."""
  family = families.family_for(model_cfg)
  return {p: x.shape for p, x in convert.abstract_params(family, model_cfg).items()}


def _split(name: str, ab: dict, rule, config: dict, lora, path: str):
  """Our (A [I, r], B [r, O]) of one kernel from PEFT's module `name` (one part of it when fused),
  with B rescaled from the module's PEFT scale to ours."""
  a_t, b_t = ab["A"], ab["B"]
  rank = a_t.shape[0]
  r_m = int(_pattern_value(config.get("rank_pattern"), name, config["r"]))
  alpha_m = float(_pattern_value(config.get("alpha_pattern"), name, config["lora_alpha"]))
  if rank != r_m:
    raise ValueError(f"the adapter {path}: {name}.lora_A has rank {rank} but its config says {r_m}")
  fold = scale_of(r_m, alpha_m, lora.rslora) / lora.scale
  if rule.part is None:
    if rank != lora.rank:
      raise ValueError(
        f"the adapter {path}: {name} has rank {rank}, others {lora.rank}; jaxlm "
        "adapters share one rank"
      )
    return a_t.T, fold * b_t.T
  n = _parts(rule)
  o = b_t.shape[0] // n
  b_part = b_t[rule.part * o : (rule.part + 1) * o]  # [O, R]
  if rank == lora.rank:  # one A shared by the parts: each part keeps it
    return a_t.T, fold * b_part.T
  if rank == n * lora.rank:  # ours, exported block-diagonal: take the part's block
    r = lora.rank
    block = b_part[:, rule.part * r : (rule.part + 1) * r]
    if np.any(np.delete(b_part, np.s_[rule.part * r : (rule.part + 1) * r], axis=1)):
      raise ValueError(
        f"the adapter {path}: {name} of rank {rank} is not block-diagonal over "
        f"its {n} parts; jaxlm cannot split it at rank {r}"
      )
    return a_t[rule.part * r : (rule.part + 1) * r].T, fold * block.T
  raise ValueError(
    f"the adapter {path}: {name} has rank {rank}, which is neither r={lora.rank} "
    f"nor {n} x r for its {n} fused parts"
  )
