"""LoRA: low-rank adapters kept as a plain pytree beside a frozen base, applied unmerged inside
the layers during training (y = x W + scale (x A) B, jaxlm.models.linear), and merged into the
kernels (`Lora.merge`) only to export or generate.

For a kernel W whose leading dims are its inputs I and the rest its outputs O, the adapter is
A [*I, r] and B [r, *O] (a leading layers axis L first when layers are scanned), and the merged
kernel is W + scale * A @ B with PEFT's scale: alpha / r, or alpha / sqrt(r) with rsLoRA. A is
drawn as PEFT draws it (kaiming-uniform, bound 1 / sqrt(fan_in)) and B is zero, so at step 0 the
model is bitwise the base. The trainable tree mirrors the param paths:
`block_0/attn/q/lora_a`, `block_0/attn/q/lora_b` (and, for task heads, the head's own params,
trained in full). The frozen base may be cast (bf16) and its block kernels quantized by Qwix:
int8 (a scale per output channel), int4 or NF4 (QLoRA's 4-bit NormalFloat; a scale per block of
64 inputs). A step applies `Lora.unmerged(frozen, trainable)`: the base's block kernels boxed
`Frozen`, dequantized by each layer as it uses them, the adapters beside them; no merged model
and no gradient of a base weight exists in a step.

Shape letters as in layers.py, plus L layers, I inputs, O outputs, R rank.
"""

import dataclasses
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxlm.models import linear
from jaxlm.models.heads import param_shapes

# lora.targets presets: regexes over '/'-joined param paths (unscanned layout: block_{i}/...)
PRESETS = {  # an encoder's stack sits under transformer/
  "attention": r"(transformer/)?block_\d+/attn/(q|k|v|o)/kernel",
  "mlp": r"(transformer/)?block_\d+/mlp/(gate|up|down)/kernel",
  "all": r"(transformer/)?block_\d+/(attn/(q|k|v|o)|mlp/(gate|up|down))/kernel",
}
_STACKED = re.compile(r"(^|/)blocks/")
QUANTIZE = ("", "int8", "int4", "nf4")
# 4-bit kernels: one scale per block of this many inputs along the kernel's last input axis (the
# whole axis when it does not divide), as QLoRA's NF4 blocks of 64
GROUP = 64
BASE_DTYPES = ("", "float32", "bfloat16", "float16")
# kinds whose runs may use LoRA (they start from model.init_from); "dpo" joins when it lands
KINDS = ("lm", "sft", "finetune", "dpo", "distill")
LORA_A, LORA_B = linear.LORA_A, linear.LORA_B


def pattern(targets: str) -> re.Pattern:
  """The regex `lora.targets` names: a preset ("attention", "mlp", "all"), presets joined by
  commas ("attention,mlp"), or a regex over '/'-joined param paths."""
  names = [t.strip() for t in targets.split(",")]
  if targets and all(n in PRESETS for n in names):
    return re.compile("|".join(f"(?:{PRESETS[n]})" for n in names))
  try:
    return re.compile(targets)
  except re.error as e:
    raise ValueError(
      f"lora.targets={targets!r} is neither a preset {tuple(PRESETS)} nor a valid regex ({e})"
    ) from None


def scale_of(rank: int, alpha: float, rslora: bool) -> float:
  """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
  return alpha / (math.sqrt(rank) if rslora else rank)


@dataclasses.dataclass(frozen=True)
class Target:
  """One adapted kernel: its '/'-joined path, how many of its leading dims are inputs, whether it
  carries a leading layers axis, and its logical axis names (without the layers axis)."""

  path: str
  n_in: int
  stacked: bool
  names: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Lora:
  """What a LoRA run adapts and how; hashable, so it can be a static field of the TrainState.

  Attributes:
    targets: the adapted kernels.
    rank, alpha, rslora: as PEFT's r, lora_alpha, use_rslora.
    full: param paths trained in full beside the adapters (a new task head), as PEFT's
      modules_to_save.
    base_dtype: "" keeps the base in the model's param dtype; else the frozen base's dtype.
    quantize: "" | "int8" | "int4" | "nf4": the frozen base's block kernels stored quantized
      (Qwix; int8 per output channel, 4-bit per block of GROUP inputs) and dequantized by each
      layer as it uses them.
  """

  targets: tuple[Target, ...]
  rank: int
  alpha: float
  rslora: bool = False
  full: tuple[str, ...] = ()
  base_dtype: str = ""
  quantize: str = ""

  @property
  def scale(self) -> float:
    return scale_of(self.rank, self.alpha, self.rslora)

  def init(self, rng, boxed_params) -> dict:
    """The trainable tree: A kaiming-uniform, B zero, boxed with logical axis names (the
    sharding rules place them like their kernels, the rank axis replicated); plus the `full`
    params, as initialised."""
    flat = traverse_util.flatten_dict(boxed_params, sep="/")
    out = {}
    for i, t in enumerate(self.targets):
      box = flat[t.path]
      shape = box.value.shape if isinstance(box, nn.meta.AxisMetadata) else box.shape
      dtype = (box.value if isinstance(box, nn.meta.AxisMetadata) else box).dtype
      lead, core = (shape[:1], shape[1:]) if t.stacked else ((), shape)
      lead_names = ("layers",) if t.stacked else ()
      in_shape, out_shape = core[: t.n_in], core[t.n_in :]
      bound = 1.0 / math.sqrt(math.prod(in_shape))
      a = jax.random.uniform(
        jax.random.fold_in(rng, i), (*lead, *in_shape, self.rank), dtype, -bound, bound
      )
      b = jnp.zeros((*lead, self.rank, *out_shape), dtype)
      module = t.path.rsplit("/", 1)[0]
      out[f"{module}/{LORA_A}"] = nn.LogicallyPartitioned(
        a, (*lead_names, *t.names[: t.n_in], "lora_rank")
      )
      out[f"{module}/{LORA_B}"] = nn.LogicallyPartitioned(
        b, (*lead_names, "lora_rank", *t.names[t.n_in :])
      )
    for path, leaf in flat.items():
      if self.is_full(path):
        out[path] = leaf
    return traverse_util.unflatten_dict(out, sep="/")

  def trained_paths(self) -> list[str]:
    """'/'-joined paths of what a step trains: each adapter (`block_0/attn/q/lora_a`; its
    kernel stays frozen) and the `full` params."""
    return [f"{t.path.rsplit('/', 1)[0]}/{LORA_A}" for t in self.targets] + list(self.full)

  def is_full(self, path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in self.full)

  def freeze(self, params) -> dict:
    """The frozen base of full `params` (boxed or not): the `full` params left out, cast to
    base_dtype, block kernels quantized when `quantize` says."""
    flat = traverse_util.flatten_dict(params, sep="/")
    out = {}
    for path, leaf in flat.items():
      if self.is_full(path):
        continue
      out[path] = _map_boxed(lambda x, path=path: self._freeze_leaf(path, x), leaf)
    return traverse_util.unflatten_dict(out, sep="/")

  def _freeze_leaf(self, path: str, x):
    if not (self.quantize and _is_block_kernel(path)):
      return x.astype(self.base_dtype) if self.base_dtype else x
    # quantized from the full-precision kernel, fp32 scales per output channel (and layer)
    n_in = self._n_in(path, x.ndim)
    lead = 1 if _STACKED.search(path) else 0
    channels = tuple(a for a in range(x.ndim) if not lead <= a < lead + n_in)
    if self.quantize == "int8":
      return linear.quantize(x, "int8", channels=channels)
    last_in = lead + n_in - 1  # 4-bit: the other inputs per channel, blocks along the last
    group = GROUP if x.shape[last_in] % GROUP == 0 else x.shape[last_in]
    channels += tuple(range(lead, last_in))
    return linear.quantize(x, self.quantize, channels=channels, groups={last_in: group})

  def _n_in(self, path: str, ndim: int) -> int:
    for t in self.targets:
      if t.path == path:
        return t.n_in
    # a kernel that is not adapted: its inputs by the model's layout (o: heads, head_dim in)
    return 2 if path.endswith("attn/o/kernel") else 1

  def base(self, frozen) -> dict:
    """The base params with the adapters switched off, dequantized: the reference model as a
    whole-model tree (evaluation)."""
    return jax.tree.map(linear.dequantize, frozen, is_leaf=linear.is_quantized)

  def unmerged(self, frozen, trainable=None) -> dict:
    """The params a train step applies, never merged: the frozen base with its block kernels
    boxed linear.Frozen (cast or dequantized by each layer as it uses them), each adapter beside
    the kernel it adapts as `lora_a` = A and `lora_b` = scale * B, and the `full` params from
    `trainable`. Without `trainable`: the base alone, adapters off (DPO's reference)."""
    flat = traverse_util.flatten_dict(jax.lax.stop_gradient(frozen), sep="/")
    flat = {p: linear.Frozen(x) if _is_block_kernel(p) else x for p, x in flat.items()}
    train = traverse_util.flatten_dict(trainable or {}, sep="/")
    for path, leaf in train.items():
      flat[path] = self.scale * leaf if path.endswith(f"/{LORA_B}") else leaf
    return traverse_util.unflatten_dict(flat, sep="/")

  def merge(self, frozen, trainable) -> dict:
    """The full params with each adapted kernel W + scale * A @ B (in the adapters' dtype), the
    `full` params from `trainable`, the rest of the base as it is: export and generation."""
    flat = traverse_util.flatten_dict(self.base(frozen), sep="/")
    train = traverse_util.flatten_dict(trainable, sep="/")
    for t in self.targets:
      module = t.path.rsplit("/", 1)[0]
      a, b = train[f"{module}/{LORA_A}"], train[f"{module}/{LORA_B}"]
      w = flat[t.path]
      flat[t.path] = w.astype(a.dtype) + self.scale * delta(a, b, t.n_in, t.stacked)
    for path, leaf in train.items():
      if not path.endswith((LORA_A, LORA_B)):
        flat[path] = leaf
    return traverse_util.unflatten_dict(flat, sep="/")


def delta(a, b, n_in: int, stacked: bool) -> jax.Array:
  """A @ B over the rank axis, shaped as the kernel: [L?, *I, R] x [L?, R, *O] -> [L?, *I, *O]."""
  lead = a.shape[:1] if stacked else ()
  in_shape, out_shape = a.shape[len(lead) : -1], b.shape[len(lead) + 1 :]
  r = a.shape[-1]
  a_2 = a.reshape(*lead, math.prod(in_shape), r)
  b_2 = b.reshape(*lead, r, math.prod(out_shape))
  return jnp.matmul(a_2, b_2, precision=jax.lax.Precision.HIGHEST).reshape(
    *lead, *in_shape, *out_shape
  )


def _is_block_kernel(path: str) -> bool:
  return path.endswith("/kernel") and re.search(r"(^|/)blocks?(_\d+)?/", path) is not None


def _map_boxed(fn, leaf):
  """`fn` of a leaf's value, boxed again with the same logical names (a quantized leaf's
  values and scales all named like the kernel)."""
  if not isinstance(leaf, nn.meta.AxisMetadata):
    return fn(leaf)
  out = fn(leaf.value)
  if linear.is_quantized(out):
    return jax.tree.map(leaf.replace_boxed, out)
  return leaf.replace_boxed(out)


def kernel_inputs(names: tuple[str, ...]) -> int:
  """How many leading dims of a kernel with logical axis `names` are its inputs: every dim but
  the last when it maps into the residual stream (attention o: heads, head_dim -> embed), else
  the first (q: embed -> heads, head_dim; up: embed -> mlp)."""
  return len(names) - 1 if names[-1] == "embed" else 1


def unscanned_paths(path: str, num_layers: int) -> list[str]:
  """A param path per layer: `blocks/...` (scanned, stacked) -> block_0/..., block_1/..."""
  if _STACKED.search(path):
    return [_STACKED.sub(rf"\g<1>block_{i}/", path, count=1) for i in range(num_layers)]
  return [path]


def build(lora_cfg, boxed_params, *, num_layers: int, full: tuple[str, ...] = ()) -> Lora:
  """The Lora of a `lora` config section over a model's boxed (abstract) params.

  Raises:
    ValueError: a pattern matching no kernel, a rank above a kernel's dims, scanned layers
      matched only in part, a bad quantize/base_dtype/dropout value (one line each).
  """
  c = lora_cfg
  if c.dropout:
    raise ValueError(
      f"lora.dropout={c.dropout}: jaxlm does not drop the adapters' inputs; set lora.dropout=0 "
      "(model.dropout still drops activations)"
    )
  if c.quantize not in QUANTIZE:
    raise ValueError(f"lora.quantize={c.quantize!r} is not one of {QUANTIZE}")
  if c.base_dtype not in BASE_DTYPES:
    raise ValueError(f"lora.base_dtype={c.base_dtype!r} is not one of {BASE_DTYPES}")
  if c.alpha <= 0:
    raise ValueError(f"lora.alpha={c.alpha} must be > 0 (PEFT's lora_alpha; scale alpha/rank)")
  regex = pattern(c.targets)
  flat = traverse_util.flatten_dict(boxed_params, sep="/")
  _refuse_experts(c.targets, regex, flat, num_layers)
  if c.quantize in ("int4", "nf4"):
    _check_packable(c.quantize, flat)
  targets = []
  for path, box in flat.items():
    if not path.endswith("/kernel") or any(path.startswith(p + "/") for p in full):
      continue
    hits = [bool(regex.fullmatch(p)) for p in unscanned_paths(path, num_layers)]
    if not any(hits):
      continue
    if not all(hits):
      raise ValueError(
        f"lora.targets={c.targets!r} matches only some layers of the scanned "
        f"{path}; with model.scan_layers=True adapt all layers or none"
      )
    stacked = _STACKED.search(path) is not None
    names = tuple(box.names[1:] if stacked else box.names)
    n_in = kernel_inputs(names)
    core = box.value.shape[1:] if stacked else box.value.shape
    fan_in, fan_out = math.prod(core[:n_in]), math.prod(core[n_in:])
    if c.rank > min(fan_in, fan_out):
      raise ValueError(
        f"lora.rank={c.rank} exceeds {path}'s dims ({fan_in} in, {fan_out} "
        f"out); use a rank of at most {min(fan_in, fan_out)}"
      )
    targets.append(Target(path, n_in, stacked, names))
  if not targets:
    kernels = sorted({re.sub(r"block_\d+", "block_{i}", p) for p in flat if p.endswith("kernel")})
    raise ValueError(
      f"lora.targets={c.targets!r} matches no layer; presets: {tuple(PRESETS)}, "
      f"or a regex over paths such as {', '.join(kernels[:6])}"
    )
  return Lora(
    tuple(targets), c.rank, float(c.alpha), bool(c.rslora), tuple(full), c.base_dtype, c.quantize
  )


def _refuse_experts(targets: str, regex, flat: dict, num_layers: int) -> None:
  """Raises when `targets` would adapt a mixture of experts' router or experts (the mlp and all
  presets, or a regex over their paths): adapters beside stacked expert weights are not
  implemented."""
  moe_paths = [p for p in flat if "/moe/" in p]
  if not moe_paths:
    return
  presets = {t.strip() for t in targets.split(",")} & {"mlp", "all"}
  if presets or any(regex.fullmatch(u) for p in moe_paths for u in unscanned_paths(p, num_layers)):
    raise ValueError(f"lora.targets={targets!r}: LoRA adapters on mixture-of-experts layers "
                     "(router, experts) are not supported; adapt the attention projections "
                     "(lora.targets='attention')")


def _check_packable(quantize: str, flat: dict) -> None:
  """4-bit codes are packed two a byte along each block kernel's last input axis: refuse an odd
  one (one line)."""
  for path, box in flat.items():
    if not _is_block_kernel(path):
      continue
    lead = 1 if _STACKED.search(path) else 0
    axis = lead + kernel_inputs(tuple(box.names[lead:])) - 1
    if box.value.shape[axis] % 2:
      raise ValueError(
        f"lora.quantize={quantize!r} packs two 4-bit codes a byte along {path}'s input axis, "
        f"of odd size {box.value.shape[axis]}; use lora.quantize='int8'"
      )


def check_allowed(config) -> None:
  """LoRA tunes an imported model: refuse it on kinds and runs that do not start from
  model.init_from (one line)."""
  if config.lora.rank < 0:
    raise ValueError(f"lora.rank={config.lora.rank} must be >= 0 (0: LoRA off)")
  if config.kind not in KINDS:
    raise ValueError(
      f"lora.rank={config.lora.rank} on kind={config.kind!r}: LoRA tunes a "
      f"pretrained model, kinds {KINDS}; set lora.rank=0"
    )
  if not config.model.init_from:
    raise ValueError(
      f"lora.rank={config.lora.rank} needs model.init_from (the base model to "
      "adapt: an HF checkpoint or a jaxlm run); set it, or lora.rank=0"
    )


def for_model(config, model) -> Lora | None:
  """The Lora of a run's config (its `lora` section resolved, as config.json records it) over
  `model`; None when the run has no LoRA (lora.rank=0 or no section: older runs)."""
  section = config.get("lora")
  if not section or not section.get("rank"):
    return None
  check_allowed(config)
  boxed = param_shapes(model)
  task = config.kind == "finetune" or (config.kind == "distill" and model.cfg.head == "seq_cls")
  full = tuple(k for k in boxed if k != "transformer") if task else ()
  return build(section, boxed, num_layers=model.cfg.num_layers, full=full)
