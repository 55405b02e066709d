"""`jaxlm plan`: a config's parameter count, FLOPs per token, mesh and per-device memory on a
target (a device kind x hosts), worked out without allocating anything.

Two kinds of figure, labelled as such in the output:
  analytic   shapes from `jax.eval_shape` of the train state, split by the logical rules on the
             target's mesh (params, optimizer state, gradients: exact); activations estimated
             from the layer shapes and the remat policy (an estimate, see activation_bytes).
  compiled   XLA's own `memory_analysis()` of the train step compiled against abstract inputs,
             only when the devices present are the target (same kind and count): on a laptop a
             v5p-64 cannot be compiled for, so its figures stay analytic.

A LoRA config (lora.rank > 0) is planned as it trains: the frozen base (cast or quantized as
lora.base_dtype / lora.quantize say) beside the adapters, gradients and optimizer state of the
adapters alone, and the compiled step its own (adapters applied inside the layers).

  jaxlm plan --config configs/llama3_8b.py --device v5p-64
  jaxlm plan --config configs/llama3_8b.py --device h100 --hosts 4 --config.train.grad_accum=8
  jaxlm plan --config configs/llama3_8b.py --device h100 --json   (one JSON object)
"""

import dataclasses
import functools
import json
import math
import re

import jax
import jax.numpy as jnp
import ml_collections

from jaxlm import devices, rundir, sharding
from jaxlm.data import sources
from jaxlm.data import tokenizers as tok_lib
from jaxlm.data.batch import Batch
from jaxlm.models import heads
from jaxlm.models import lora as lora_lib
from jaxlm.models.config import ModelConfig
from jaxlm.train import objectives, optim
from jaxlm.train import step as step_lib

GiB = devices.GiB
# Of a device's memory, the share a plan counts as usable: XLA and the runtime keep the rest
# (GPU runs set XLA_PYTHON_CLIENT_MEM_FRACTION=0.9, launch/gpu.sh).
USABLE = 0.9
# Remat policies from least to most recomputation; the ladder `levers` climbs.
REMAT_LADDER = ("none", "dots", "attention", "full")


@dataclasses.dataclass(frozen=True)
class Target:
  """What to plan for: `chips` devices of `kind` in `hosts` hosts."""

  kind: devices.DeviceKind
  chips: int
  hosts: int

  @property
  def name(self) -> str:
    return f"{self.chips} x {self.kind.name} ({self.hosts} host{'s' * (self.hosts > 1)})"


def target(device: str, hosts: int | None = None) -> Target:
  """The target a `--device NAME[-N] [--hosts H]` pair names: NAME a kind of devices.DEVICE_KINDS;
  N as the vendor counts a slice (TPU v4/v5p: TensorCores, so v5p-64 is 32 chips; else chips);
  without N, H hosts of the kind's chips_per_host (cpu: the devices present)."""
  # a name's parts after the first hold a letter (h100-pcie, a100-40gb); a count is all digits
  match = re.fullmatch(r"([a-z0-9]+(?:-[a-z0-9]*[a-z][a-z0-9]*)*)(?:-(\d+))?", device.lower())
  if not match:
    raise ValueError(f"--device={device!r}: expected NAME or NAME-N, e.g. v5p, v5p-64, h100, "
                     "h100-pcie-8")
  kind = devices.named(match.group(1))
  per_host = jax.local_device_count() if kind.name == "cpu" else kind.chips_per_host
  if match.group(2):
    count = int(match.group(2))
    if count % kind.cores_per_chip:
      raise ValueError(
        f"--device={device}: {kind.name} slices count {kind.cores_per_chip} "
        "cores a chip; use an even size"
      )
    chips = count // kind.cores_per_chip
    needed = max(1, math.ceil(chips / per_host))
    if hosts not in (None, needed):
      raise ValueError(
        f"--device={device} is {chips} chips on {needed} hosts, not --hosts={hosts};"
        " give one of the two"
      )
    return Target(kind, chips, needed)
  hosts = hosts or 1
  return Target(kind, hosts * per_host, hosts)


def model_config(config) -> ModelConfig:
  """The ModelConfig a run of `config` would build: model.init_from's own when set; a vocabulary
  of 0 taken from data.tokenizer (a 'char' tokenizer reads the training text)."""
  values = dict(config.model)
  src = values.pop("init_from", "")
  if src:
    values = rundir.init_model_config(src, values).to_dict()
  if not values["vocab_size"]:
    name = config.data.tokenizer
    tok = (
      tok_lib.char_tokenizer("".join(sources.read_texts(config.data)))
      if name == "char"
      else tok_lib.load_tokenizer(name)
    )
    values["vocab_size"] = tok_lib.vocab_size(tok)
  return ModelConfig.from_dict(values)


def _bytes_per_device(boxed_tree, axis_sizes) -> int:
  specs = sharding.partition_specs(boxed_tree, axis_sizes)
  leaves = jax.tree.leaves(sharding.strip_boxes(boxed_tree))
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  return sum(
    math.prod(sharding.shard_shape(leaf.shape, spec, axis_sizes)) * leaf.dtype.itemsize
    for leaf, spec in zip(leaves, spec_leaves)
  )


def activation_bytes(cfg: ModelConfig, rows: int, seq_len: int, axis_sizes) -> int:
  """Estimated bytes one device holds for the backward pass of one micro-batch of `rows` rows
  (its share) of `seq_len` tokens: what each layer keeps under cfg.remat, plus one layer's
  recomputation, plus the logits and their fp32 loss. A budgeting estimate (no fusion, no
  workspace), not XLA's figure; tensor shards heads and MLP, sequence shards tokens."""
  a = jnp.dtype(cfg.dtype).itemsize
  t, s = axis_sizes["tensor"], axis_sizes["sequence"]
  D, H, K, E, F, V = (
    cfg.embed_dim,
    cfg.num_heads,
    cfg.kv_heads,
    cfg.head_size,
    cfg.experts_per_token * cfg.expert_dim if cfg.num_experts else cfg.hidden_dim,
    cfg.vocab_size,
  )
  tokens = rows * seq_len // s
  qkv, attn_out = (H + 2 * K) * E / t, H * E / t
  mlp_hidden = (4 if cfg.gated_mlp else 2) * F / t  # up, gate, act, product | up, act
  scores = H / t * seq_len * (4 + a)  # fp32 logits and probabilities over every key, per query
  rope = (H + K) * E / t if cfg.position == "rope" else 0
  whole_layer = a * (4 * D + qkv + rope + attn_out + mlp_hidden + D) + scores
  kept = {
    "none": whole_layer,
    "dots": a * (D + qkv + D + mlp_hidden / 2 + D),  # block input + every weight matmul's output
    "attention": a * (D + attn_out),  # block input + the attention output
    "full": a * D,  # block input only
  }[cfg.remat]
  recompute = whole_layer if cfg.remat != "none" else 0
  head = a * 2 * D + V / t * (a + 4 + 4)  # final norm; logits, fp32 logits, their softmax
  return int(tokens * (cfg.num_layers * kept + recompute + head))


@dataclasses.dataclass
class Plan:
  """What `jaxlm plan` prints; bytes are per device."""

  target: Target
  model: ModelConfig
  params: int  # parameter count
  flops_per_token: float  # training (3x forward), causal attention counted as half
  tokens_per_step: int
  mesh: dict  # axis -> size
  slices: int  # mesh.slices: the data axis spans them
  rows_per_device: int  # of one micro-batch
  grad_accum: int
  params_bytes: int
  opt_bytes: int
  grads_bytes: int  # gradients, plus their accumulator when grad_accum > 1
  activation_bytes: int  # estimate
  active_params: int = 0  # the parameters a token's forward pass uses (MoE: its k experts)
  experts: str = ""  # a mixture of experts: how many, and how their weights are split
  compiled: dict | None = None  # memory_analysis() figures, when the devices present match
  compiled_note: str = ""
  lora: str = ""  # what LoRA trains and how the base is held ("" without LoRA)
  trainable: int = 0  # parameters trained (all of them without LoRA)

  @property
  def total_bytes(self) -> int:
    return self.params_bytes + self.opt_bytes + self.grads_bytes + self.activation_bytes

  @property
  def usable_bytes(self) -> int:
    return int(self.target.kind.memory_bytes * USABLE)

  @property
  def fits(self) -> bool:
    needed = self.compiled["total"] if self.compiled else self.total_bytes
    return needed <= self.usable_bytes


@functools.lru_cache(maxsize=8)
def _abstract_state(cfg: ModelConfig, optim_items: tuple, steps: int, lora=None):
  """The boxed abstract TrainState (shapes only; remat and dropout do not change them): cached,
  since `levers` plans the same model several times."""
  tx, _ = optim.make_optimizer(ml_collections.ConfigDict(dict(optim_items)), max(steps, 1))
  init = functools.partial(step_lib.init_state, model=heads.build_model(cfg), tx=tx, lora=lora)
  return jax.eval_shape(init, jax.random.PRNGKey(0))


def _lora_note(lora, trainable: int, params: int) -> str:
  base = lora.quantize or lora.base_dtype or "unquantized"
  return (f"LoRA r={lora.rank} on {len(lora.targets)} kernels, {base} base: {trainable:,} "
          f"trainable parameters ({100 * trainable / params:.2f}%)")


def inactive_expert_params(cfg: ModelConfig) -> int:
  """The expert parameters a token does not use: X - k experts of every layer (0 when dense)."""
  if not cfg.num_experts:
    return 0
  idle = cfg.num_experts - cfg.experts_per_token
  return cfg.num_layers * idle * 3 * cfg.embed_dim * cfg.expert_dim


def _experts_note(cfg: ModelConfig, boxed_params, axis_sizes) -> str:
  """How many experts, top-k, and how one layer's expert weights split on this mesh."""
  if not cfg.num_experts:
    return ""
  from flax import traverse_util

  specs = traverse_util.flatten_dict(sharding.partition_specs(boxed_params, axis_sizes), sep="/")
  shapes = traverse_util.flatten_dict(sharding.strip_boxes(boxed_params), sep="/")
  path = next(p for p in specs if p.endswith("moe/gate"))
  shape = shapes[path].shape[-3:]
  spec = jax.sharding.PartitionSpec(*tuple(specs[path])[-3:])
  shard = sharding.shard_shape(shape, spec, axis_sizes)
  return (f"{cfg.num_experts} per layer, top {cfg.experts_per_token}, F={cfg.expert_dim}; "
          f"gate/up [X, D, F] {list(shape)} split {tuple(spec)} -> {list(shard)} per device")


def make_plan(config, tgt: Target, *, compile_step: bool = True) -> Plan:
  """The Plan of `config` on `tgt` (see the module docstring for which figures are analytic).

  Args:
    config: a run config (configs/*.py, overrides applied).
    tgt: from `target`.
    compile_step: compile the train step when the devices present are the target.
  """
  cfg = model_config(config)
  finetune = config.kind == "finetune"
  seq_len = config.task.max_len if finetune else config.data.seq_len
  axis_sizes = sharding.mesh_shape(config.mesh, tgt.chips)
  split = math.prod(axis_sizes[a] for a in sharding.BATCH_AXES)
  accum, batch = config.train.grad_accum, config.train.batch_size
  if batch % (split * accum):
    raise ValueError(
      f"train.batch_size={batch} does not split into {split} data-parallel shards "
      f"x train.grad_accum={accum}; change one of them"
    )
  model = heads.build_model(cfg)
  tx, _ = optim.make_optimizer(config.optim, max(config.train.steps, 1))
  shapes_model = heads.build_model(cfg.replace(remat="none", dropout=0.0))
  lora = lora_lib.for_model(config, shapes_model)
  boxed = _abstract_state(
    shapes_model.cfg,
    tuple(sorted(config.optim.to_dict().items())),
    config.train.steps,
    lora,
  )
  trainable_bytes = _bytes_per_device(boxed.params, axis_sizes)
  shapes = heads.param_shapes(model)
  params = sum(x.size for x in jax.tree.leaves(sharding.strip_boxes(shapes)))
  trainable = sum(x.size for x in jax.tree.leaves(sharding.strip_boxes(boxed.params)))
  rows = batch // split // accum
  plan = Plan(
    target=tgt,
    model=cfg,
    params=params,
    flops_per_token=devices.model_flops_per_token(cfg, seq_len, weight_grads=lora is None),
    tokens_per_step=batch * seq_len,
    mesh=axis_sizes,
    slices=int(config.mesh.get("slices", 1)),
    rows_per_device=rows,
    grad_accum=accum,
    params_bytes=trainable_bytes + (_bytes_per_device(boxed.frozen, axis_sizes) if lora else 0),
    opt_bytes=_bytes_per_device(boxed.opt_state, axis_sizes),
    grads_bytes=trainable_bytes * (2 if accum > 1 else 1),
    activation_bytes=activation_bytes(cfg, rows, seq_len, axis_sizes),
    lora=_lora_note(lora, trainable, params) if lora else "",
    trainable=trainable,
    active_params=params - inactive_expert_params(cfg),
    experts=_experts_note(cfg, shapes, axis_sizes),
  )
  present = jax.devices()
  kind = devices.kind_of(present[0].device_kind)
  if not compile_step:
    plan.compiled_note = "not compiled (compile_step=False)"
  elif cfg.head not in ("lm", "mlm"):
    plan.compiled_note = f"not compiled: model.head={cfg.head!r} steps take task batches"
  elif len(present) != tgt.chips or kind is None or kind.name != tgt.kind.name:
    plan.compiled_note = (
      f"not compiled: the target is {tgt.chips} x {tgt.kind.name}, this "
      f"machine has {len(present)} x {present[0].device_kind}; plan on a machine "
      "that has them for XLA's own figures"
    )
  else:
    plan.compiled = compiled_memory(config, model, tx, seq_len, lora)
    plan.compiled_note = (
      f"XLA memory_analysis() of the train step on the {len(present)} "
      f"{present[0].device_kind} devices present"
    )
  return plan


def compiled_memory(config, model, tx, seq_len: int, lora=None) -> dict:
  """XLA's per-device figures for the train step of `config` compiled (not run) on the devices
  present, against abstract state and batch: argument, output, temp, alias and their total.
  With `lora` (a jaxlm.models.lora.Lora) the step of a LoRA run: base frozen, adapters trained."""
  mesh = sharding.make_mesh(config.mesh)
  abstract, shardings = step_lib.abstract_state(model, tx, mesh, lora)
  train_fn = step_lib.jit_train_step(
    shardings,
    objectives.for_head(model.cfg.head),
    grad_accum=config.train.grad_accum,
    dropout=model.cfg.dropout > 0,
  )
  shape = (config.train.batch_size, seq_len)
  as_batch = functools.partial(jax.ShapeDtypeStruct, sharding=sharding.batch_sharding(mesh))
  batch = Batch(inputs=as_batch(shape, jnp.int32), targets=as_batch(shape, jnp.int32))
  with sharding.mesh_rules(mesh):
    stats = train_fn.lower(abstract, batch).compile().memory_analysis()
  out = {
    k: int(getattr(stats, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")
  }
  out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def levers(config, tgt: Target) -> list[tuple[str, Plan]]:
  """When `config` does not fit `tgt`: the overrides tried in turn, each added to the last, until
  one fits (the last entry is the first that fits, or the last tried). First FSDP over the whole
  data-parallel width when the state alone is too big, then remat up the ladder, then smaller
  micro-batches (train.grad_accum doubled) down to one row per device."""
  cfg = config.copy_and_resolve_references()
  tried, plan = [], make_plan(cfg, tgt, compile_step=False)

  def step(flag: str, **changes) -> bool:
    nonlocal plan
    for key, value in changes.items():
      section, name = key.split(".")
      cfg[section][name] = value
    plan = make_plan(cfg, tgt, compile_step=False)
    tried.append((flag, plan))
    return plan.fits

  state = plan.params_bytes + plan.opt_bytes + plan.grads_bytes
  fsdp = {"mesh.fsdp": -1, "mesh.data": 1}
  if (
    state > plan.usable_bytes
    and plan.mesh["data"] > plan.slices
    and step("--config.mesh.fsdp=-1 --config.mesh.data=1", **fsdp)
  ):
    return tried
  remat = plan.model.remat
  for policy in REMAT_LADDER[REMAT_LADDER.index(remat) + 1 :]:
    if step(f"--config.model.remat={policy}", **{"model.remat": policy}):
      return tried
  while plan.rows_per_device > 1 and plan.rows_per_device % 2 == 0:
    accum = cfg.train.grad_accum * 2
    if step(f"--config.train.grad_accum={accum}", **{"train.grad_accum": accum}):
      return tried
  return tried


def _gib(n: float) -> str:
  return f"{n / GiB:8.2f} GiB"


def report(plan: Plan, config_name: str = "", lever_plans=None) -> str:
  """The plan as the lines `jaxlm plan` prints."""
  cfg, t = plan.model, plan.target
  mesh = " ".join(f"{k}={v}" for k, v in plan.mesh.items())
  step_flops = plan.flops_per_token * plan.tokens_per_step
  peak = devices.peak_flops(t.kind, cfg.dtype, cfg.matmul_precision) * t.chips
  lines = [
    f"jaxlm plan {config_name} on {t.name}, {t.kind.memory_bytes / GiB:.0f} GiB each",
    (
      f"model        {plan.params:,} parameters (L={cfg.num_layers} D={cfg.embed_dim} "
      f"H={cfg.num_heads} K={cfg.kv_heads} F={cfg.hidden_dim} V={cfg.vocab_size}), "
      f"{cfg.dtype} compute, {cfg.param_dtype} params, remat={cfg.remat}"
      + (f", matmul_precision={cfg.matmul_precision}" if cfg.dtype == "float32" else "")
    ),
    (
      f"FLOPs        {plan.flops_per_token:.3e} per token (training = {2 if plan.lora else 3} x "
      f"forward, causal attention counted as half); {step_flops:.3e} per step of "
      f"{plan.tokens_per_step:,} tokens"
    ),
  ]
  if plan.experts:
    lines.append(f"experts      {plan.experts}; {plan.active_params:,} active parameters a "
                 "token (FLOPs), all of them in memory")
  if plan.lora:
    lines.append(f"LoRA         {plan.lora.removeprefix('LoRA ')}")
  if peak:
    lines.append(
      f"step time    {step_flops / peak:.2f} s at the {t.kind.name} peak "
      f"({peak / 1e15:.1f} PFLOP/s for {t.chips}); {step_flops / peak / 0.4:.2f} s "
      "at 40% MFU"
    )
  over = f" (data over {plan.slices} slices)" if plan.slices > 1 else ""
  lines += [
    f"mesh         {mesh}{over}",
    f"micro-batch  {plan.rows_per_device} rows per device x {plan.grad_accum} (train.grad_accum)",
    "per device   analytic: eval_shape shapes split by the logical rules on this mesh",
    f"  params           {_gib(plan.params_bytes)}"
    + ("  (frozen base + adapters)" if plan.lora else ""),
    f"  optimizer state  {_gib(plan.opt_bytes)}",
    f"  gradients        {_gib(plan.grads_bytes)}"
    + ("  (with the grad_accum accumulator)" if plan.grad_accum > 1 else ""),
    (
      f"  activations      {_gib(plan.activation_bytes)}  (estimate: remat={cfg.remat}, logits "
      "and loss in fp32)"
    ),
    (
      f"  total            {_gib(plan.total_bytes)}  of {plan.usable_bytes / GiB:.1f} GiB usable "
      f"({USABLE:.0%} of {t.kind.memory_bytes / GiB:.0f} GiB)"
    ),
  ]
  if plan.compiled:
    c = plan.compiled
    lines.append(
      f"compiled     {plan.compiled_note}: arguments {c['argument'] / GiB:.3f} GiB, "
      f"outputs {c['output'] / GiB:.3f}, aliased {c['alias'] / GiB:.3f}, temporaries "
      f"{c['temp'] / GiB:.3f}; total {c['total'] / GiB:.3f} GiB"
    )
  else:
    lines.append(f"compiled     {plan.compiled_note}")
  basis = "compiled" if plan.compiled else "analytic"
  if plan.fits:
    lines.append(f"fits         yes ({basis} total within {plan.usable_bytes / GiB:.1f} GiB)")
    return "\n".join(lines)
  lines.append(f"fits         NO ({basis} total over {plan.usable_bytes / GiB:.1f} GiB)")
  for flag, p in lever_plans or ():
    lines.append(
      f"  lever: {flag:<45} -> {p.total_bytes / GiB:7.2f} GiB {'fits' if p.fits else 'still over'}"
    )
  if lever_plans and lever_plans[-1][1].fits:
    flags = dict(f.split("=", 1) for flag, _ in lever_plans for f in flag.split())  # last wins
    lines.append("  pass: " + " ".join(f"{k}={v}" for k, v in flags.items()))
  else:
    lines.append(
      "  no lever here is enough: add devices (--hosts), or split heads with --config.mesh.tensor=N"
    )
  return "\n".join(lines)


def to_json(plan: Plan, lever_plans=None) -> str:
  """The plan as one JSON object (`jaxlm plan --json`): the figures `report` prints, bytes per
  device, the compiled ones (XLA's memory_analysis: argument, output, temp, alias, total) or
  null with the note saying why, and the levers tried when it does not fit."""
  t = plan.target
  out = {
    "target": {"kind": t.kind.name, "chips": t.chips, "hosts": t.hosts,
               "memory_bytes": t.kind.memory_bytes},
    "model": plan.model.to_dict(),
    "params": plan.params,
    "active_params": plan.active_params,
    "experts": plan.experts or None,
    "trainable": plan.trainable,
    "lora": plan.lora or None,
    "flops_per_token": plan.flops_per_token,
    "tokens_per_step": plan.tokens_per_step,
    "mesh": plan.mesh,
    "slices": plan.slices,
    "rows_per_device": plan.rows_per_device,
    "grad_accum": plan.grad_accum,
    "analytic": {"params": plan.params_bytes, "optimizer": plan.opt_bytes,
                 "gradients": plan.grads_bytes, "activations": plan.activation_bytes,
                 "total": plan.total_bytes},
    "compiled": plan.compiled,
    "compiled_note": plan.compiled_note,
    "usable_bytes": plan.usable_bytes,
    "fits": plan.fits,
    "levers": [{"flags": flag, "total": p.total_bytes, "fits": p.fits}
               for flag, p in lever_plans or ()],
  }
  return json.dumps(out)
