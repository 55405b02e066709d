"""Fused attention kernels that honour packed documents (segment ids), the causal mask and
grouped-query heads without materialising [T, S] scores, and the choice among them.

`model.attention` names one (see ATTENTIONS in models/config.py):
  xla      two einsums and a softmax over materialised scores (layers.attend): every backend.
  splash   TPU splash attention (jax.experimental.pallas.ops.tpu.splash_attention), segment ids
           and GQA native; T a multiple of 128.
  cudnn    NVIDIA cuDNN flash attention (bf16/fp16) through jax.nn.dot_product_attention; packed
           documents go to cuDNN's packed ("THD") layout (models/cudnn_compat.py).
  triton   the Pallas Triton flash attention of jax.experimental.pallas.ops.gpu (any float dtype,
           segment ids native, kv heads repeated for GQA).
  tokamax  tokamax.dot_product_attention (its Mosaic GPU kernel on sm90/sm100, else its Triton
           one); packed documents as a dense [B, 1, T, T] mask, since its API has no segment ids.
  auto     the first kernel of `auto_order` that runs here (`why_not`), else xla.

The choice is a pure function (`choose`) of a small description of the device (`Device`) and of
the attention call (`Call`), so every row of docs/performance.md's table is tested on a CPU;
`device_at_hand` fills the description from JAX. On a CPU, splash and triton run in Pallas
interpret mode and tokamax runs its XLA implementation (tests). Shape letters as in layers.py.
"""

import dataclasses
import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.models import cudnn_compat

KERNELS = ("splash", "cudnn", "triton", "tokamax")
HALF = ("bfloat16", "float16")
_SPLASH_BLOCK = 128
# cuDNN's figures are JAX's own checks (jax/_src/cudnn/fused_attention_stablehlo.py,
# check_is_flash_attention and check_layout; jax 0.10.2) or the gates of its cuDNN attention tests
# (tests/fused_attention_stablehlo_test.py): flash attention from Ampere (8.0) and cuDNN 8.9.4;
# head dim a multiple of 8, at most 128 below Hopper and 256 from it; the packed layout needs
# Hopper (9.0) and cuDNN 9.6; compute capability 10.3 needs cuDNN 9.11.
_CUDNN_MIN, _CUDNN_PACKED_MIN, _CUDNN_SM103_MIN = 8904, 90600, 91100
# Triton's bf16/fp16 MMA needs Ampere; each Triton block must fit in the shared memory of every
# GPU from 8.0 on (99 KiB per block on 8.6 and 8.9), with two pipeline stages.
_TRITON_SMEM = 96 * 1024


@dataclasses.dataclass(frozen=True)
class Device:
  """What the choice needs to know of the device at hand."""

  platform: str  # "cpu" | "gpu" | "tpu" (jax.default_backend())
  capability: tuple[int, int] | None = None  # CUDA compute capability; None: not an NVIDIA GPU
  cudnn: int | None = None  # cuDNN version, JAX's encoding (9.6.0 -> 90600); None: not found
  tokamax: bool = False  # the tokamax package is installed


@dataclasses.dataclass(frozen=True)
class Call:
  """What the choice needs to know of one attention call."""

  dtype: str  # compute dtype name, e.g. "bfloat16"
  head_dim: int  # E
  length: int  # T (self-attention: S = T)
  packed: bool  # segment ids given (packed documents, or padding marked as its own segment)
  causal: bool = True  # False: an encoder
  decode: bool = False  # a KV-cache decoding step (or its prefill)


def auto_order(device: Device, call: Call) -> tuple[str, ...]:
  """The kernels "auto" tries, best first; xla after them. Never tokamax nor cuDNN's packed
  layout: both never ran on a GPU (MaxText #4476: a default cuDNN path that ignored segment ids),
  and the packed layout's softmax statistics are [B * T, H, T] fp32 here. Nor Triton in float32
  on a GPU: on an H200 its dq and dk were 1.7e-3 to 2.2e-3 off xla's float32 (T=1024, GQA 8/2;
  TF32-like products), where a float32 model asks for float32."""
  if device.platform == "tpu":
    return ("splash",)
  if device.platform == "gpu":
    if call.dtype == "float32":
      return ()
    return ("triton",) if call.packed else ("cudnn", "triton")
  return ()


def why_not(kernel: str, device: Device, call: Call) -> str | None:
  """Why `kernel` cannot run `call` on `device` (one clause), or None when it can."""
  check = {"splash": _splash, "cudnn": _cudnn, "triton": _triton, "tokamax": _tokamax}[kernel]
  return check(device, call)


def choose(choice: str, device: Device, call: Call) -> str:
  """The implementation `choice` ("auto", "xla" or one of KERNELS) means for `call` on `device`.

  Kernels serve causal self-attention of whole sequences (training, scoring); encoders and
  KV-cache decoding use xla whatever the choice.

  Raises:
    ValueError: when an explicitly chosen kernel cannot run `call` on `device`, naming the fix.
  """
  if choice == "xla" or call.decode or not call.causal:
    return "xla"
  if choice == "auto":
    return next((k for k in auto_order(device, call) if why_not(k, device, call) is None), "xla")
  if choice not in KERNELS:
    raise ValueError(f"model.attention={choice!r} is not one of {('auto', 'xla', *KERNELS)}")
  reason = why_not(choice, device, call)
  if reason:
    raise ValueError(
      f"model.attention={choice!r} cannot run here: {reason}; set model.attention='auto' "
      f"(here: {choose('auto', device, call)!r})"
    )
  return choice


def _gpu_text(device: Device) -> str:
  cap = device.capability
  return f"this GPU has compute capability {cap[0]}.{cap[1]}" if cap else "this GPU is not CUDA"


def _version_text(version: int) -> str:
  major, rest = (version // 10000, version % 10000) if version >= 10000 else divmod(version, 1000)
  return f"{major}.{rest // 100}.{rest % 100}"


def _nvidia(device: Device, what: str, interpreted: str = "") -> str | None:
  """Why `what` cannot run on `device` for want of an NVIDIA GPU of compute capability 8.0+ (a
  CPU passes when `interpreted` says how it runs there)."""
  if device.platform == "cpu" and interpreted:
    return None
  if device.platform != "gpu":
    where = f" ({interpreted} on a CPU)" if interpreted else ""
    return f"{what} runs on NVIDIA GPUs{where}, not on a {device.platform}"
  if device.capability is None or device.capability < (8, 0):
    return f"{what} needs an NVIDIA GPU of compute capability 8.0+, {_gpu_text(device)}"
  return None


def _splash(device: Device, call: Call) -> str | None:
  if device.platform not in ("tpu", "cpu"):
    return f"splash attention runs on a TPU (interpreted on a CPU), not on a {device.platform}"
  if call.length % _SPLASH_BLOCK:
    return f"splash tiles the length in blocks of {_SPLASH_BLOCK}, got {call.length}"
  return None


def _cudnn(device: Device, call: Call) -> str | None:
  reason = _nvidia(device, "cuDNN flash attention")
  if reason:
    return reason
  cap, version = device.capability, device.cudnn
  if version is None or version < _CUDNN_MIN:
    found = f"found {_version_text(version)}" if version else "none found"
    return f"cuDNN flash attention needs cuDNN {_version_text(_CUDNN_MIN)}+, {found}"
  if cap == (10, 3) and version < _CUDNN_SM103_MIN:
    return f"compute capability 10.3 needs cuDNN 9.11+, found {_version_text(version)}"
  if call.dtype not in HALF:
    return f"cuDNN flash attention takes bfloat16 or float16, model.dtype is {call.dtype}"
  most = 256 if cap >= (9, 0) else 128
  if call.head_dim > most or call.head_dim % 8:
    return (
      f"cuDNN's head dim must be a multiple of 8 and at most {most} on compute capability "
      f"{cap[0]}.{cap[1]}, got {call.head_dim}"
    )
  if call.packed and cap < (9, 0):
    return f"cuDNN's packed layout (segment ids) needs compute capability 9.0+, {_gpu_text(device)}"
  if call.packed and version < _CUDNN_PACKED_MIN:
    return f"cuDNN's packed layout (segment ids) needs cuDNN 9.6+, found {_version_text(version)}"
  return None


def _triton(device: Device, call: Call) -> str | None:
  reason = _nvidia(device, "Pallas Triton attention", interpreted="interpreted")
  if reason:
    return reason
  itemsize = jnp.dtype(call.dtype).itemsize
  if triton_blocks(call.length, call.head_dim, itemsize, device.platform == "cpu") is None:
    return f"Triton tiles the length in blocks of 16 to 128, got {call.length}"
  return None


def _tokamax(device: Device, call: Call) -> str | None:
  reason = _nvidia(device, "tokamax attention", interpreted="its XLA path")
  if reason:
    return reason
  if not device.tokamax:
    return "the tokamax package is not installed (pip install tokamax)"
  return None


def triton_blocks(length: int, head_dim: int, itemsize: int, interpret: bool):
  """(forward block, backward block) for the Triton kernel, or None when none tiles `length`.

  On a GPU the largest power of two whose tiles, by an estimate (two pipeline stages of K and V
  blocks beside the Q block), fit _TRITON_SMEM; interpreted, 64 and 32 (or the whole length).
  """
  if interpret:
    fwd, bwd = min(64, length), min(32, length)
    return (fwd, bwd) if length % fwd == 0 and length % bwd == 0 else None
  row = int(2 ** np.ceil(np.log2(max(head_dim, 1)))) * itemsize  # Triton pads E to a power of 2

  def fits(block, tiles):
    return length % block == 0 and tiles * block * row <= _TRITON_SMEM

  fwd = next((b for b in (128, 64, 32, 16) if fits(b, 5)), None)
  bwd = next((b for b in (64, 32, 16) if fits(b, 6)), None)
  return (fwd, bwd) if fwd and bwd else None


@functools.cache
def _device(backend: str) -> Device:
  tokamax = importlib.util.find_spec("tokamax") is not None
  if backend != "gpu":
    return Device(backend, tokamax=tokamax)
  try:
    major, minor = jax.devices("gpu")[0].compute_capability.split(".")
    capability = (int(major), int(minor))
  except (AttributeError, ValueError):  # ROCm reports no CUDA compute capability
    capability = None
  return Device("gpu", capability, cudnn_compat.cudnn_version() if capability else None, tokamax)


def device_at_hand(backend: str | None = None) -> Device:
  """The Device of `backend` (default: JAX's default backend), read from JAX once."""
  return _device(backend or jax.default_backend())


def resolve(
  choice: str,
  *,
  dtype,
  head_dim: int,
  length: int,
  packed: bool,
  causal: bool = True,
  decode: bool = False,
  device: Device | None = None,
) -> str:
  """`choose` on the device at hand (or `device`), called as the model is traced, so an explicit
  kernel that cannot run is refused before anything compiles."""
  call = Call(jnp.dtype(dtype).name, head_dim, length, packed, causal, decode)
  return choose(choice, device or device_at_hand(), call)


def attend(impl: str, q_BTHE, k_BSKE, v_BSKE, segment_ids_BT=None, *, interpret=None):
  """Causal attention within segments by the kernel `impl` (one of KERNELS): [B, T, H, E].

  Args:
    impl: "splash", "cudnn", "triton" or "tokamax".
    q_BTHE, k_BSKE, v_BSKE: queries, keys and values; K divides H (grouped-query attention).
    segment_ids_BT: packed-document ids (contiguous runs); None = one document per row.
    interpret: run Pallas kernels in interpret mode, tokamax's XLA path (default: on a CPU).
  """
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  if impl == "splash":
    kernel = functools.partial(splash_attention, interpret=interpret)
  elif impl == "triton":
    kernel = functools.partial(triton_attention, interpret=interpret)
  elif impl == "tokamax":
    kernel = functools.partial(tokamax_attention, interpret=interpret)
  elif impl == "cudnn":
    kernel = cudnn_attention
  else:
    raise ValueError(f"unknown attention kernel {impl!r}; choose one of {KERNELS}")
  return _per_shard(kernel, q_BTHE, k_BSKE, v_BSKE, segment_ids_BT)


def _per_shard(kernel, q_BTHE, k_BSKE, v_BSKE, segment_ids_BT):
  """Runs `kernel` on each device's rows (and heads) under the mesh of jax.set_mesh, if any: a
  Pallas or cuDNN call is opaque to XLA's partitioner, which would otherwise gather its inputs."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return kernel(q_BTHE, k_BSKE, v_BSKE, segment_ids_BT)
  from jax.sharding import PartitionSpec as P

  batch = tuple(a for a in ("data", "fsdp", "expert") if a in mesh.axis_names)
  rows = 1
  for a in batch:
    rows *= mesh.shape[a]
  batch = batch if q_BTHE.shape[0] % rows == 0 else None
  heads = "tensor" if "tensor" in mesh.axis_names else None
  if heads and (q_BTHE.shape[2] % mesh.shape[heads] or k_BSKE.shape[2] % mesh.shape[heads]):
    heads = None
  qkv = P(batch, None, heads, None)
  if segment_ids_BT is None:
    fn = lambda q, k, v: kernel(q, k, v, None)
    return jax.shard_map(fn, in_specs=(qkv, qkv, qkv), out_specs=qkv, check_vma=False)(
      q_BTHE, k_BSKE, v_BSKE
    )
  return jax.shard_map(
    kernel, in_specs=(qkv, qkv, qkv, P(batch, None)), out_specs=qkv, check_vma=False
  )(q_BTHE, k_BSKE, v_BSKE, segment_ids_BT)


@functools.lru_cache(maxsize=32)
def _splash_kernel(heads: int, length: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  mask = sm.MultiHeadMask([sm.CausalMask((length, length)) for _ in range(heads)])
  block = next(b for b in (512, 256, 128) if length % b == 0)
  sizes = sk.BlockSizes(
    block_q=block,
    block_kv=block,
    block_kv_compute=block,
    block_q_dkv=block,
    block_kv_dkv=block,
    block_kv_dkv_compute=block,
    block_q_dq=block,
    block_kv_dq=block,
  )
  # cached across traces, so its mask arrays must be constants, not the first trace's tracers
  with jax.ensure_compile_time_eval():
    return sk.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret)


def splash_attention(q_BTHE, k_BSKE, v_BSKE, segment_ids_BT=None, *, interpret=False):
  """TPU splash attention (causal, segment ids, GQA native), one kernel call per batch row."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

  B, T, H, E = q_BTHE.shape
  kernel = _splash_kernel(H, T, interpret)
  if segment_ids_BT is None:
    segment_ids_BT = jnp.ones((B, T), jnp.int32)
  q_BHTE = (q_BTHE * jnp.asarray(E**-0.5, q_BTHE.dtype)).transpose(0, 2, 1, 3)

  def row(q_HTE, k_SKE, v_SKE, seg_T):
    seg = sk.SegmentIds(q=seg_T.astype(jnp.int32), kv=seg_T.astype(jnp.int32))
    return kernel(q_HTE, k_SKE.transpose(1, 0, 2), v_SKE.transpose(1, 0, 2), segment_ids=seg)

  out_BHTE = jax.vmap(row)(q_BHTE, k_BSKE, v_BSKE, segment_ids_BT)
  return out_BHTE.transpose(0, 2, 1, 3).astype(q_BTHE.dtype)


def _repeat_kv(q_BTHE, k_BSKE, v_BSKE):
  H, K = q_BTHE.shape[2], k_BSKE.shape[2]
  if K == H:
    return k_BSKE, v_BSKE
  return jnp.repeat(k_BSKE, H // K, axis=2), jnp.repeat(v_BSKE, H // K, axis=2)


def triton_attention(q_BTHE, k_BSKE, v_BSKE, segment_ids_BT=None, *, interpret=False):
  """Pallas Triton flash attention (GPU): causal, segment ids; kv heads repeated for GQA."""
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention

  T, E = q_BTHE.shape[1], q_BTHE.shape[3]
  k_BSHE, v_BSHE = _repeat_kv(q_BTHE, k_BSKE, v_BSKE)
  blocks = triton_blocks(T, E, q_BTHE.dtype.itemsize, interpret)
  if blocks is None:
    raise ValueError(f"Triton tiles the length in blocks of 16 to 128, got {T}; use xla")
  block, back = blocks
  sizes = gpu_attention.BlockSizes(
    block_q=block,
    block_k=block,
    block_q_dkv=back,
    block_kv_dkv=back,
    block_q_dq=back,
    block_kv_dq=back,
  )
  if segment_ids_BT is not None:
    segment_ids_BT = segment_ids_BT.astype(jnp.int32)
  return gpu_attention.mha(
    q_BTHE,
    k_BSHE,
    v_BSHE,
    segment_ids_BT,
    sm_scale=E**-0.5,
    causal=True,
    block_sizes=sizes,
    interpret=interpret,
  )


def tokamax_attention(q_BTHE, k_BSKE, v_BSKE, segment_ids_BT=None, *, interpret=False):
  """tokamax.dot_product_attention: its Mosaic GPU kernel (sm90, sm100), else its Triton kernel,
  never its XLA fallback; on a CPU (`interpret`) its XLA path. GQA native; segment ids become a
  dense [B, 1, T, T] mask (B T^2 bytes), its API having none."""
  import tokamax
  from absl import flags

  if not flags.FLAGS.is_parsed():  # else tokamax parses sys.argv, the host program's arguments,
    flags.FLAGS.mark_as_parsed()  # for its absl flags, and fails on any it does not know
  mask_B1TS = None
  if segment_ids_BT is not None:
    mask_B1TS = (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])[:, None]
  with jax.numpy_rank_promotion("allow"):  # tokamax's own code broadcasts across ranks
    return tokamax.dot_product_attention(
      q_BTHE,
      k_BSKE,
      v_BSKE,
      mask=mask_B1TS,
      is_causal=True,
      scale=q_BTHE.shape[-1] ** -0.5,
      implementation="xla" if interpret else ("mosaic", "triton"),
    )


def segment_offsets(segment_ids_BT, max_segments: int | None = None):
  """cuDNN's packed layout of contiguous segments: (lengths [B, M], starts [B, M + 1]), each
  row's real entries first and -1 after them; M = max_segments (default T, never too few)."""
  B, T = segment_ids_BT.shape
  M = max_segments or T
  new_BT = jnp.concatenate(
    [jnp.ones((B, 1), bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1
  )
  starts_BM = jax.vmap(lambda n: jnp.nonzero(n, size=M, fill_value=-1)[0])(new_BT)
  count_B1 = new_BT.sum(axis=1, keepdims=True)
  slot_M = jnp.arange(M)[None, :]
  next_BM = jnp.concatenate([starts_BM[:, 1:], jnp.full((B, 1), -1, starts_BM.dtype)], axis=1)
  next_BM = jnp.where(slot_M + 1 < count_B1, next_BM, T)
  lengths_BM = jnp.where(slot_M < count_B1, next_BM - starts_BM, -1)
  starts_BM1 = jnp.concatenate([starts_BM, jnp.full((B, 1), -1, starts_BM.dtype)], axis=1)
  return lengths_BM.astype(jnp.int32), starts_BM1.astype(jnp.int32)


def cudnn_attention(q_BTHE, k_BSKE, v_BSKE, segment_ids_BT=None):
  """cuDNN flash attention (GPU, bf16/fp16), causal. One document per row: the public
  jax.nn.dot_product_attention (GQA native). Packed documents: cuDNN's packed layout through
  models/cudnn_compat.py, kv heads repeated (JAX strides the kv offsets by the query heads)."""
  E = q_BTHE.shape[-1]
  if segment_ids_BT is None:
    return jax.nn.dot_product_attention(
      q_BTHE, k_BSKE, v_BSKE, is_causal=True, implementation="cudnn"
    )
  k_BSHE, v_BSHE = _repeat_kv(q_BTHE, k_BSKE, v_BSKE)
  lengths_BM, starts_BM1 = segment_offsets(segment_ids_BT)
  return cudnn_compat.packed_attention(
    q_BTHE, k_BSHE, v_BSHE, lengths_BM, starts_BM1, scale=float(E**-0.5)
  )


def segments_mask(lengths_BM, starts_BM1, length: int) -> np.ndarray:
  """The [B, T, T] causal same-segment mask that segment_offsets' output describes (tests)."""
  lengths_BM, starts_BM1 = np.asarray(lengths_BM), np.asarray(starts_BM1)
  B = lengths_BM.shape[0]
  mask = np.zeros((B, length, length), bool)
  for b in range(B):
    for start, n in zip(starts_BM1[b], lengths_BM[b]):
      if n < 0:
        break
      mask[b, start : start + n, start : start + n] = np.tril(np.ones((n, n), bool))
  return mask
