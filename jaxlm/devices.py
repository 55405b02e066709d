"""The one table of accelerator kinds (memory, peak FLOP/s per matmul precision) and the FLOPs
counts per token: model FLOPs (MFU) and the FLOPs the devices actually run (HFU).

Read by the trainer (MFU and hardware-FLOPs utilisation in every run) and by `jaxlm plan` (does a
model fit). Peaks are dense (no sparsity) per chip, from the vendors' data sheets.
"""

import dataclasses
import os
import re

# model.matmul_precision -> the lax.Precision level it names (jax/_src/lax/lax.py's
# _precision_strings: the names jax_default_matmul_precision accepts as Precision levels)
PRECISION_LEVELS = {"default": 0, "bfloat16": 0, "high": 1, "tensorfloat32": 1, "highest": 2,
                    "float32": 2}


@dataclasses.dataclass(frozen=True)
class DeviceKind:
  """One accelerator chip: its name in `jaxlm plan --device`, memory and peak FLOP/s."""

  name: str
  memory_bytes: int
  bf16_flops: float  # dense bf16/fp16 matmul peak per chip
  # float32 matmuls at precision default, high, highest (what XLA runs them as, see _gpu/_tpu)
  fp32_flops: tuple[float, float, float]
  match: str  # regex on jax.Device.device_kind
  chips_per_host: int = 8  # devices of one host (a TPU VM worker, a GPU node)
  cores_per_chip: int = 1  # TPU slice names count TensorCores: v5p-64 is 32 chips


def _tpu(name, memory, bf16, match, per_host, cores=1) -> DeviceKind:
  """A TPU: float32 matmuls run as 1 bfloat16 pass at precision default, 3 at high and 6 at
  highest (lax.Precision's docstring; docs.jax.dev/en/latest/201/precision.html)."""
  return DeviceKind(name, memory, bf16, (bf16, bf16 / 3, bf16 / 6), match, per_host, cores)


def _gpu(name, memory, bf16, tf32, fp32, match) -> DeviceKind:
  """An NVIDIA GPU (Ampere or later): float32 matmuls run on the tensor cores as TensorFloat-32
  at precision default and high, on the CUDA cores as float32 at highest (lax.Precision)."""
  return DeviceKind(name, memory, bf16, (tf32, tf32, fp32), match)


GiB = 1 << 30
# Listed most specific first: kind_of takes the first whose pattern matches.
DEVICE_KINDS = {
  d.name: d
  for d in (
    _tpu("v4", 32 * GiB, 275e12, r"^TPU v4", 4, 2),
    _tpu("v5e", 16 * GiB, 197e12, r"^TPU v5 ?(lite|e)", 4),
    _tpu("v5p", 95 * GiB, 459e12, r"^TPU v5p?$", 4, 2),
    _tpu("v6e", 32 * GiB, 918e12, r"^TPU v6", 4),
    # "NVIDIA A100-SXM4-40GB", "NVIDIA A100-PCIE-40GB": the PCIe and SXM cards have one peak
    _gpu("a100-40gb", 40 * GiB, 312e12, 156e12, 19.5e12, r"A100.*40GB"),
    _gpu("a100", 80 * GiB, 312e12, 156e12, 19.5e12, r"A100"),
    _gpu("h100-pcie", 80 * GiB, 756e12, 378e12, 51e12, r"H100 PCIe"),  # "NVIDIA H100 PCIe"
    _gpu("h100-nvl", 94 * GiB, 835.5e12, 417.5e12, 60e12, r"H100 NVL"),  # "NVIDIA H100 NVL"
    _gpu("h100", 80 * GiB, 989e12, 494.7e12, 67e12, r"H100"),  # SXM: "NVIDIA H100 80GB HBM3"
    _gpu("h200-nvl", 141 * GiB, 835.5e12, 417.5e12, 60e12, r"H200 NVL"),  # "NVIDIA H200 NVL"
    _gpu("h200", 141 * GiB, 989e12, 494.7e12, 67e12, r"H200"),  # SXM: "NVIDIA H200"
    # a laptop/server CPU: its peak is measured from the cores present (see cpu_kind)
    DeviceKind("cpu", 16 * GiB, 0.0, (0.0, 0.0, 0.0), r"^cpu$"),
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
  return DeviceKind("cpu", mem, peak, (peak, peak, peak), r"^cpu$")


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


def peak_flops(kind: DeviceKind, dtype: str, precision: str = "default") -> float:
  """Peak FLOP/s of one chip for matmuls in `dtype` at `precision` (model.matmul_precision).

  bfloat16/float16 matmuls run at the bf16 peak whatever the precision; float32 ones at the peak
  of what XLA runs them as: TensorFloat-32 on the GPU's tensor cores (default, high) or its
  float32 cores (highest); one, three or six bfloat16 passes on a TPU.
  """
  if precision not in PRECISION_LEVELS:
    raise ValueError(f"matmul precision {precision!r} is not one of {tuple(PRECISION_LEVELS)}")
  if dtype != "float32":
    return kind.bf16_flops
  return kind.fp32_flops[PRECISION_LEVELS[precision]]


def model_flops_per_token(cfg, seq_len: int, *, training: bool = True,
                          weight_grads: bool = True) -> float:
  """Model FLOPs per token of a ModelConfig (PaLM appendix B / MaxText): 2 per weight of every
  matmul (the LM head included, embedding lookups not) plus attention's QK^T and AV,
  4 * L * T * H * E, halved for causal models (only the lower triangle is needed). Training is 3x
  the forward pass (activations' and weights' gradients); 2x when the weights are frozen
  (`weight_grads=False`: LoRA, whose adapters' own FLOPs are left out, under 4% at rank 16).
  A mixture of experts counts its active weights: the router and each token's k experts."""
  D, L, V = cfg.embed_dim, cfg.num_layers, cfg.vocab_size
  H = cfg.num_heads
  K = cfg.num_kv_heads or H
  E = cfg.head_dim or D // H
  F = cfg.mlp_dim or 4 * D
  attn_weights = D * H * E * 2 + D * K * E * 2  # q, o and k, v
  mlp_weights = D * F * (3 if cfg.gated_mlp else 2)
  if getattr(cfg, "num_experts", 0):  # the router, and the k experts a token goes through
    mlp_weights = D * cfg.num_experts + cfg.experts_per_token * 3 * D * cfg.expert_dim
  matmul_weights = L * (attn_weights + mlp_weights) + (
    V * D if cfg.head == "lm" or cfg.head == "mlm" else 0
  )
  attention = 4 * L * seq_len * H * E * (0.5 if cfg.causal else 1.0)
  forward = 2 * matmul_weights + attention
  return (3 if weight_grads else 2) * forward if training else forward


def run_peak_flops(dtype: str, per_device: float = 0.0,
                   precision: str = "default") -> tuple[float, str]:
  """(peak FLOP/s of all devices of the run, the device kind's name), for MFU.

  `per_device` overrides the table. CPU devices split one processor, so a CPU run's peak is that
  of each process's cores, whatever the number of simulated devices. 0.0 when unknown.
  """
  import jax  # here, so plan-time users of the table need no backend

  device = jax.devices()[0]
  kind = kind_of(device.device_kind) or kind_of(device.platform)
  name = kind.name if kind else device.device_kind
  if device.platform == "cpu":
    return (per_device or peak_flops(kind, dtype, precision)) * jax.process_count(), name
  peak = per_device or (peak_flops(kind, dtype, precision) if kind else 0.0)
  return peak * jax.device_count(), name


# A block's values (models/layers.py): the matmuls' outputs and "mid", the residual stream between
# attention and MLP (no matmul of its own: its norm's input or, post-norm, output), each with the
# values it is computed from. "qk" and "av" are attention's batched matmuls (the scores, and the
# probabilities times the values); "k" and "q" include RoPE.
_INPUTS = {"qk": ("q", "k"), "av": ("qk", "v"), "o": ("av",), "mid": ("o",), "gate": ("mid",),
           "up": ("mid",), "down": ("gate", "up")}
# What each model.remat policy keeps of a block for the backward pass (models/transformer.py);
# the backward recomputes the rest of what it reads. dots: the outputs of dots without batch
# dimensions, i.e. every weight matmul and neither qk nor av; attention: the attention output.
_SAVED = {"dots": frozenset({"q", "k", "v", "o", "gate", "up", "down"}),
          "attention": frozenset({"av"}), "full": frozenset()}


def hardware_flops_per_token(cfg, seq_len: int, *, attention: str = "xla", trained=None,
                             reference: bool = False) -> float:
  """FLOPs the devices run per token of a training step over rows of `seq_len` tokens: the
  matmuls of the forward pass, of the backward pass (a matmul's gradient for each operand that
  needs one: a trained weight, or an input with trained params upstream) and of what model.remat
  makes the backward pass recompute (the values it reads that the policy did not keep, and what
  they are computed from). Elementwise work (norms, softmax, the optimizer) is left out, as in
  model FLOPs.

  For attention="xla", which scores each block of queries against the keys before the block's
  end (causal) or all keys (`xla_attention_keys`), this is the program jaxlm gives XLA, matmul
  for matmul (tests/test_metrics.py checks it against XLA's cost analysis
  per remat policy, and with LoRA). For a kernel (splash, cudnn, triton), which cost analysis
  cannot see into, an estimate: the causally masked half of the scores skipped, the backward
  recomputing the scores (as FlashAttention-2's does), the kernel's forward recomputed under any
  remat policy (its softmax statistics are not among what a policy keeps).

  Args:
    cfg: the ModelConfig.
    attention: the attention implementation the run uses (models.layers.attention_impl).
    trained: '/'-joined paths (or path prefixes) of the params the step trains; None = all. A
      LoRA run passes its adapters' paths (`block_0/attn/q/lora_a`): the adapters sit beside
      their frozen kernels, never merged into them, so an adapted layer needs the gradient of its
      output but its kernel gets no weight gradient (the adapters' own rank-r matmuls are left
      out: about 3 r (I + O) / (I O) of those kernels' forward FLOPs).
    reference: DPO's reference model: one more forward pass.
  """
  L, kernel = cfg.num_layers, attention != "xla"
  prefix = "" if cfg.causal else "transformer/"  # an encoder's stack sits under its heads

  def trains(*paths) -> bool:
    return trained is None or any(
      p == t or p.startswith(t + "/") or t.startswith(p + "/") for t in trained for p in paths)

  f = _block_matmuls(cfg, seq_len / 2 if kernel and cfg.causal
                     else xla_attention_keys(seq_len, cfg.causal))
  forward, extra = L * sum(f.values()), 0.0
  flowing = trains(*(prefix + n for n in ("embed", "pos_embed", "type_embed", "embed_norm")))
  for i in range(L):
    block_extra, flowing = _block_backward(
      f, lambda name, i=i: trains(f"{prefix}block_{i}/{name}", f"{prefix}blocks/{name}"),
      flowing, cfg, kernel)
    extra += block_extra
  flowing = flowing or trains(prefix + "final_norm")
  for flops, path in _head_matmuls(cfg, seq_len):
    forward += flops
    extra += flops * (flowing + trains(path))
    flowing = flowing or trains(path.split("/")[0])
  return (1 + reference) * forward + extra


def xla_attention_keys(seq_len: int, causal: bool) -> float:
  """Keys scored per query, on average, by the xla attention path (models.layers.query_blocks):
  `seq_len` unless causal, where a block of queries scores only the keys before its end."""
  from jaxlm.models import layers  # the model code (jax, flax) only when FLOPs are counted

  blocks = layers.query_blocks(seq_len, seq_len, causal)
  return sum((end - start) * keys for start, end, keys in blocks) / seq_len


def _block_matmuls(cfg, keys: float) -> dict:
  """Forward FLOPs per token of each matmul of one block, attending to `keys` keys a query."""
  D, H, K, E, F = cfg.embed_dim, cfg.num_heads, cfg.kv_heads, cfg.head_size, cfg.hidden_dim
  out = {"q": 2 * D * H * E, "k": 2 * D * K * E, "v": 2 * D * K * E, "qk": 2 * keys * H * E,
         "av": 2 * keys * H * E, "o": 2 * H * E * D, "up": 2 * D * F, "down": 2 * F * D}
  if cfg.gated_mlp:
    out["gate"] = 2 * D * F
  if getattr(cfg, "num_experts", 0):  # k experts a token; the router's matmul counted with gate
    F = cfg.experts_per_token * cfg.expert_dim
    out.update(up=2 * D * F, down=2 * F * D, gate=2 * D * F + 2 * D * cfg.num_experts)
  return out


def _block_backward(f: dict, trains, flowing: bool, cfg, kernel: bool) -> tuple[float, bool]:
  """(backward and recomputed FLOPs per token of one block, whether its input needs a gradient)
  for a block whose input needs a gradient when `flowing` (a trained param upstream);
  `trains(name)` says whether the block's params under `name` train."""
  pre = cfg.norm_position == "pre"
  into = flowing or (pre and trains("attn_norm"))  # a gradient for q, k and v's input
  q, k, v = (into or trains(f"attn/{n}") for n in "qkv")
  attn = q or k or v  # a gradient for the attention output
  w = {n: trains(f"{'attn' if n in 'qkvo' else 'mlp'}/{n}/kernel")  # trained weights
       for n in f if n not in ("qk", "av")}
  total = sum(f[n] * (into + w[n]) for n in "qkv") + f["o"] * (attn + w["o"])
  total += f["qk"] * (q + k + (kernel and attn)) + f["av"] * ((q or k) + v)
  mid = flowing or attn or trains("attn/o") or trains("attn_norm")
  into_mlp = mid or (pre and trains("mlp_norm"))
  mlp_in = [n for n in ("gate", "up") if n in f]
  total += sum(f[n] * (into_mlp + w[n]) for n in mlp_in)
  hidden = into_mlp or any(trains(f"mlp/{n}") for n in mlp_in)
  total += f["down"] * (hidden + w["down"])
  out = mid or hidden or trains("mlp/down") or trains("mlp_norm")
  if cfg.remat == "none":
    return total, out
  # what the backward reads: each matmul's other operand, the softmax's probabilities, the MLP
  # activation's inputs, the weight gradients' inputs, each norm's input
  acts = into_mlp or any(w[n] for n in mlp_in) or w["down"]
  reads = {"k": q, "q": k, "qk": attn, "v": q or k, "av": w["o"], "gate": acts, "up": acts,
           "mid": into_mlp or any(w[n] for n in mlp_in) or (not pre and out)}
  if not pre:  # the norms' inputs: x + o's output, mid + down's output
    reads.update(o=mid, down=out)
  saved = _SAVED[cfg.remat] - ({"qk", "av"} if kernel else set())
  if kernel and attn:  # the kernel's backward reads q, k, v and its output
    reads.update(q=True, k=True, v=True, av=True)
  todo, recomputed = [n for n, read in reads.items() if read], set()
  while todo:
    name = todo.pop()
    if name not in saved and name not in recomputed:
      recomputed.add(name)
      todo.extend(_INPUTS.get(name, ()))
  return total + sum(f.get(n, 0.0) for n in recomputed), out


def _head_matmuls(cfg, seq_len: int) -> list:
  """(forward FLOPs per token, the weight's param path) of each matmul of the head, in order."""
  D, V, C = cfg.embed_dim, cfg.vocab_size, cfg.num_labels
  if cfg.head == "lm":
    return [(2 * D * V, "embed/embedding" if cfg.tie_embeddings else "lm_head/kernel")]
  if cfg.head == "mlm":  # dense transform, then the decoder tied to the token embedding
    return [(2 * D * D, "mlm_head/transform/kernel"), (2 * D * V, "transformer/embed/embedding")]
  row = 1 / seq_len  # a sequence head reads one token a row
  # ModernBERT's prediction head (dense + act + norm) before every task head's output layer
  pre = [(2 * D * D, "head/dense/kernel")] if cfg.prediction_head else []
  pool = "head/dense/kernel" if cfg.prediction_head else "pooler/dense/kernel"
  return {"token_cls": [*pre, (2 * D * C, "classifier/kernel")],
          "qa": [*pre, (4 * D, "qa_outputs/kernel")],
          "seq_cls": [(2 * D * D * row, pool), (2 * D * C * row, "classifier/kernel")],
          "base": [(2 * D * D * row, "pooler/dense/kernel")] if cfg.pooler else []}[cfg.head]
