"""The one table of accelerator kinds (memory, peak FLOP/s) and the model-FLOPs count per token.

Read by the trainer (MFU and hardware-FLOPs utilisation in every run) and by `jaxlm plan` (does a
model fit). Peaks are dense (no sparsity) per chip, from the vendors' data sheets.
"""

import dataclasses
import os
import re


@dataclasses.dataclass(frozen=True)
class DeviceKind:
  """One accelerator chip: its name in `jaxlm plan --device`, memory and peak FLOP/s."""

  name: str
  memory_bytes: int
  bf16_flops: float  # dense peak per chip
  fp32_flops: float
  match: str  # regex on jax.Device.device_kind
  chips_per_host: int = 8  # devices of one host (a TPU VM worker, a GPU node)
  cores_per_chip: int = 1  # TPU slice names count TensorCores: v5p-64 is 32 chips


GiB = 1 << 30
DEVICE_KINDS = {
  d.name: d
  for d in (
    DeviceKind("v4", 32 * GiB, 275e12, 275e12 / 2, r"^TPU v4", 4, 2),
    DeviceKind("v5e", 16 * GiB, 197e12, 197e12 / 2, r"^TPU v5 ?(lite|e)", 4),
    DeviceKind("v5p", 95 * GiB, 459e12, 459e12 / 2, r"^TPU v5p?$", 4, 2),
    DeviceKind("v6e", 32 * GiB, 918e12, 918e12 / 2, r"^TPU v6", 4),
    DeviceKind("a100", 80 * GiB, 312e12, 19.5e12, r"A100"),
    DeviceKind("h100", 80 * GiB, 989e12, 67e12, r"H100"),
    DeviceKind("h200", 141 * GiB, 989e12, 67e12, r"H200"),
    # a laptop/server CPU: its peak is measured from the cores present (see cpu_kind)
    DeviceKind("cpu", 16 * GiB, 0.0, 0.0, r"^cpu$"),
  )
}


def cpu_kind(cores: int | None = None, ghz: float | None = None) -> DeviceKind:
  """The CPU of this machine as a DeviceKind: peak = cores x FMA lanes x 2 x clock (AVX2: two
  256-bit FMA units, 32 fp32 FLOPs a cycle; AVX-512: 64), memory = the machine's RAM."""
  cores = cores or (
    len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
  )
  flags, mhz, mem = "", 0.0, 16 * GiB
  try:
    with open("/proc/cpuinfo") as f:
      info = f.read()
    flags = re.search(r"^flags\s*:(.*)$", info, re.MULTILINE).group(1)
    mhz = float(re.search(r"^cpu MHz\s*:\s*([\d.]+)", info, re.MULTILINE).group(1))
    with open("/proc/meminfo") as f:
      mem = int(re.search(r"MemTotal:\s*(\d+)", f.read()).group(1)) * 1024
  except (OSError, AttributeError, ValueError):
    pass
  per_cycle = 64 if " avx512f" in flags else 32
  peak = cores * per_cycle * (ghz or (mhz / 1e3 if mhz else 2.5)) * 1e9
  return DeviceKind("cpu", mem, peak, peak, r"^cpu$")


def kind_of(device_kind: str) -> DeviceKind | None:
  """The table's entry for a `jax.Device.device_kind` string (None when unknown)."""
  if device_kind.lower() == "cpu":
    return cpu_kind()
  for d in DEVICE_KINDS.values():
    if re.search(d.match, device_kind):
      return d
  return None


def named(name: str) -> DeviceKind:
  """The entry for a `--device` name (v5p, h100, cpu, ...)."""
  if name == "cpu":
    return cpu_kind()
  if name not in DEVICE_KINDS:
    raise ValueError(f"unknown device {name!r}; one of {sorted(DEVICE_KINDS)}")
  return DEVICE_KINDS[name]


def peak_flops(kind: DeviceKind, dtype: str) -> float:
  """Peak FLOP/s of one chip for matmuls in `dtype` (bfloat16/float16 use the bf16 peak)."""
  return kind.fp32_flops if dtype == "float32" else kind.bf16_flops


def model_flops_per_token(cfg, seq_len: int, *, training: bool = True,
                          weight_grads: bool = True) -> float:
  """Model FLOPs per token of a ModelConfig (PaLM appendix B / MaxText): 2 per weight of every
  matmul (the LM head included, embedding lookups not) plus attention's QK^T and AV,
  4 * L * T * H * E, halved for causal models (only the lower triangle is needed). Training is 3x
  the forward pass (activations' and weights' gradients); 2x when the weights are frozen
  (`weight_grads=False`: LoRA, whose adapters' own FLOPs are left out, under 4% at rank 16)."""
  D, L, V = cfg.embed_dim, cfg.num_layers, cfg.vocab_size
  H = cfg.num_heads
  K = cfg.num_kv_heads or H
  E = cfg.head_dim or D // H
  F = cfg.mlp_dim or 4 * D
  attn_weights = D * H * E * 2 + D * K * E * 2  # q, o and k, v
  mlp_weights = D * F * (3 if cfg.gated_mlp else 2)
  matmul_weights = L * (attn_weights + mlp_weights) + (
    V * D if cfg.head == "lm" or cfg.head == "mlm" else 0
  )
  attention = 4 * L * seq_len * H * E * (0.5 if cfg.causal else 1.0)
  forward = 2 * matmul_weights + attention
  return (3 if weight_grads else 2) * forward if training else forward


def run_peak_flops(dtype: str, per_device: float = 0.0) -> tuple[float, str]:
  """(peak FLOP/s of all devices of the run, the device kind's name), for MFU.

  `per_device` overrides the table. CPU devices split one processor, so a CPU run's peak is that
  of each process's cores, whatever the number of simulated devices. 0.0 when unknown.
  """
  import jax  # here, so plan-time users of the table need no backend

  device = jax.devices()[0]
  kind = kind_of(device.device_kind) or kind_of(device.platform)
  name = kind.name if kind else device.device_kind
  if device.platform == "cpu":
    return (per_device or peak_flops(kind, dtype)) * jax.process_count(), name
  peak = per_device or (peak_flops(kind, dtype) if kind else 0.0)
  return peak * jax.device_count(), name


def hardware_flops_factor(remat: str, lora: bool = False, reference: bool = False) -> float:
  """Hardware FLOPs over model FLOPs of a training step: rematerialising the blocks runs their
  forward matmuls twice (one more forward pass); saving matmul outputs ("dots") or nothing
  recomputes none. LoRA's model FLOPs have no weight gradients (2 forward passes), but jaxlm
  merges the adapters into the weights before the matmuls, so the step computes each frozen
  weight's full gradient and projects it onto the adapters (3 forward passes' worth). DPO's
  reference model adds one forward pass to both."""
  passes = 3 + (0 if remat in ("none", "dots") else 1) + reference
  return passes / ((2 if lora else 3) + reference)
