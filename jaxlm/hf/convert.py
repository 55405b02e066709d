"""The generic, table-driven mapping between a jaxlm param tree and Hugging Face tensors.

A family's table lists `Rule`s: a jaxlm param path, an HF tensor name (both with `{i}` for the
layer) and an axis pattern such as "(h e) d -> d h e" that reshapes the HF tensor into ours.
Export runs the same pattern backwards, so one table serves both directions.
"""

import dataclasses
import math
import re

import numpy as np

from jaxlm.models.transformer import stack_layers, unstack_layers


@dataclasses.dataclass(frozen=True)
class Rule:
  """One parameter: `jax` path <-> `hf` name, via `pattern` (HF side -> jaxlm side).

  `part` picks one slice of a fused HF tensor whose pattern has a leading literal axis on the
  right, e.g. GPT-2's c_attn: "d (3 h e) -> 3 d h e" with part 0/1/2 for q/k/v.
  An `hf` name with `{j}` is one tensor per expert (Mixtral's experts.{j}.w1): the jaxlm param
  stacks them on its leading axis (of size dims["x"]); `pattern` maps one expert's tensor.
  """

  jax: str
  hf: str
  pattern: str = "... -> ..."
  part: int | None = None


# --- axis patterns: a tiny subset of einops' rearrange (groups, literals, "...") ---

def _parse_side(side: str) -> list[list[str]]:
  """'(h e) d' -> [['h', 'e'], ['d']]."""
  groups, tokens = [], re.findall(r"\(|\)|[A-Za-z_]\w*|\d+|\.\.\.", side)
  current = None
  for tok in tokens:
    if tok == "(":
      current = []
    elif tok == ")":
      groups.append(current)
      current = None
    elif current is not None:
      current.append(tok)
    else:
      groups.append([tok])
  return groups


def _size(name: str, dims: dict) -> int:
  return int(name) if name.isdigit() else dims[name]


def group_shape(side: str, dims: dict) -> tuple:
  """The array shape a pattern side describes, e.g. '(h e) d' with h=2, e=4, d=8 -> (8, 8)."""
  return tuple(math.prod(_size(n, dims) for n in g) for g in _parse_side(side))


def rearrange(x: np.ndarray, pattern: str, dims: dict) -> np.ndarray:
  """Reshapes/transposes `x` from the left side of `pattern` to its right side."""
  lhs, rhs = (s.strip() for s in pattern.split("->"))
  if lhs == rhs == "...":
    return x
  lhs_g, rhs_g = _parse_side(lhs), _parse_side(rhs)
  flat_l = [n for g in lhs_g for n in g]
  flat_r = [n for g in rhs_g for n in g]
  if sorted(flat_l) != sorted(flat_r):
    raise ValueError(f"axis pattern {pattern!r} names different axes on its two sides")
  x = x.reshape([_size(n, dims) for n in flat_l])
  x = x.transpose([flat_l.index(n) for n in flat_r])
  return x.reshape([math.prod(_size(n, dims) for n in g) for g in rhs_g])


def inverse(pattern: str) -> str:
  lhs, rhs = pattern.split("->")
  return f"{rhs.strip()} -> {lhs.strip()}"


# --- matching jaxlm paths to rules ---

def _template_regex(template: str) -> re.Pattern:
  return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


def match(rules: list[Rule], path: str) -> tuple[Rule, dict]:
  """The rule whose `jax` template matches `path`, and the fields ({i}) it captured."""
  for rule in rules:
    m = _template_regex(rule.jax).match(path)
    if m:
      return rule, m.groupdict()
  raise ValueError(f"no HF name known for jaxlm parameter {path!r}: the family table lacks it")


def hf_name(rule: Rule, fields: dict) -> str:
  return rule.hf.format(**fields)


def hf_names(rule: Rule, fields: dict, dims: dict) -> list[str]:
  """The HF tensor names of one jaxlm param: one, or one per expert for a `{j}` rule."""
  if "{j}" not in rule.hf:
    return [hf_name(rule, fields)]
  return [rule.hf.format(**fields, j=j) for j in range(dims["x"])]


def jax_to_hf_shape(rule: Rule, jax_shape: tuple, dims: dict) -> tuple:
  """The HF tensor shape that `rule` maps onto a jaxlm param of `jax_shape`."""
  lhs = rule.pattern.split("->")[0].strip()
  if lhs == "...":
    return tuple(jax_shape)
  return group_shape(lhs, dims)


def import_tensor(rule: Rule, x: np.ndarray, dims: dict) -> np.ndarray:
  """HF tensor -> jaxlm param (one slice of it when the HF tensor is fused)."""
  out = rearrange(x, rule.pattern, dims)
  return out if rule.part is None else out[rule.part]


def export_tensor(rule: Rule, parts: list[np.ndarray], dims: dict) -> np.ndarray:
  """jaxlm param(s) -> HF tensor; `parts` are the slices of a fused tensor in part order."""
  x = parts[0] if rule.part is None else np.stack(parts)
  return rearrange(x, inverse(rule.pattern), dims)


# --- whole param trees ---

def abstract_params(family, cfg) -> dict:
  """Flat {path: ShapeDtypeStruct} of the params `family.build_model(cfg)` has, one entry per
  layer (scanned layers are mapped as separate blocks)."""
  import jax
  from flax import traverse_util

  from jaxlm.sharding import strip_boxes

  flat_cfg = cfg.replace(scan_layers=False) if getattr(cfg, "scan_layers", False) else cfg
  model = family.build_model(flat_cfg)
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.PRNGKey(0), *family.init_inputs(flat_cfg)))["params"]
  return traverse_util.flatten_dict(strip_boxes(shapes), sep="/")


def _listing(items: list[str], limit: int = 8) -> str:
  more = f" and {len(items) - limit} more" if len(items) > limit else ""
  return "; ".join(items[:limit]) + more


def _canonical_names(family, tensors: dict, wanted: set) -> dict:
  """Adds the family's optional prefix to names stored without it (GPT-2 hub checkpoints)."""
  p = family.optional_prefix
  if not p:
    return tensors
  return {(p + k if k not in wanted and p + k in wanted else k): v for k, v in tensors.items()}


def import_params(family, cfg, tensors: dict) -> dict:
  """The nested numpy param tree of `cfg`'s model, from HF `tensors` by the family's table.

  Raises:
    ValueError: naming every missing, extra or mis-shaped tensor, with the shapes.
  """
  from flax import traverse_util

  dims = family.dims(cfg)
  abstract = abstract_params(family, cfg)
  plan = {path: match(family.rules, path) for path in abstract}
  names = {path: hf_names(rule, fields, dims) for path, (rule, fields) in plan.items()}
  wanted = {n for group in names.values() for n in group}
  tensors = _canonical_names(family, tensors, wanted)
  missing, misshaped, out = [], [], {}
  for path, leaf in abstract.items():
    rule = plan[path][0]
    want = jax_to_hf_shape(rule, leaf.shape, dims)
    parts = []
    for name in names[path]:
      if name not in tensors:
        missing.append(f"{name} (shape {want}, for {path})")
      elif tuple(tensors[name].shape) != want:
        misshaped.append(f"{name} has shape {tuple(tensors[name].shape)} but the config needs "
                         f"{want}")
      else:
        parts.append(import_tensor(rule, tensors[name], dims))
    if len(parts) == len(names[path]):
      out[path] = np.asarray(parts[0] if "{j}" not in rule.hf else np.stack(parts), leaf.dtype)
  skip = set(family.tied) if getattr(cfg, "tie_embeddings", False) else set()
  extra = [f"{n} (shape {tuple(tensors[n].shape)})"
           for n in sorted(set(tensors) - wanted)
           if n not in skip and not any(re.search(p, n) for p in family.ignored)]
  problems = [f"{label}: {_listing(items)}" for label, items in (
    ("missing tensors", missing), ("mis-shaped tensors", misshaped), ("extra tensors", extra))
    if items]
  if problems:
    raise ValueError(f"the checkpoint does not match its {family.name} config: "
                     + " | ".join(problems))
  params = traverse_util.unflatten_dict(out, sep="/")
  return stack_layers(params, cfg.num_layers) if getattr(cfg, "scan_layers", False) else params


def export_params(family, cfg, params) -> dict:
  """HF tensors {name: numpy array} of a jaxlm param tree, by the family's table."""
  import jax
  from flax import traverse_util

  params = jax.device_get(params)
  if "blocks" in params:
    params = unstack_layers(params)
  dims = family.dims(cfg)
  flat = traverse_util.flatten_dict(params, sep="/")
  for path, leaf in abstract_params(family, family.export_config(cfg)).items():
    if path not in flat:  # a bias the HF layout has and this model does not: zero is the same
      if not path.endswith("bias"):
        raise ValueError(f"the model has no parameter {path!r}, which {family.name} needs")
      flat[path] = np.zeros(leaf.shape, leaf.dtype)
  groups: dict[str, list] = {}
  for path, x in flat.items():
    rule, fields = match(family.rules, path)
    names = hf_names(rule, fields, dims)
    slices = [np.asarray(x)] if "{j}" not in rule.hf else list(np.asarray(x))
    for name, piece in zip(names, slices, strict=True):
      groups.setdefault(name, []).append((rule, piece))
  tensors = {}
  for name, entries in groups.items():
    entries.sort(key=lambda e: e[0].part or 0)
    rule = entries[0][0]
    if rule.part is not None and [e[0].part for e in entries] != list(range(len(entries))):
      parts = [e[0].part for e in entries]
      raise ValueError(f"{name} is fused from parts {parts}; some are missing")
    tensors[name] = np.ascontiguousarray(export_tensor(rule, [e[1] for e in entries], dims))
  return tensors
