"""Fused attention kernels, chosen by platform, that honour packed documents (segment ids), the
causal mask and grouped-query heads without materialising [T, S] scores.

`model.attention` picks one (see ATTENTIONS in models/config.py):
  xla     two einsums and a softmax over materialised scores (layers.attend): every backend.
  splash  TPU splash attention (jax.experimental.pallas.ops.tpu.splash_attention), segment ids
          and GQA native; T a multiple of 128.
  cudnn   NVIDIA cuDNN flash attention (half precision); packed documents go to cuDNN's packed
          ("THD") layout through per-row segment offsets and lengths.
  triton  the Pallas Triton flash attention of jax.experimental.pallas.ops.gpu (GPU, any float
          dtype, segment ids native; kv heads repeated for GQA).
  auto    splash on TPU, cudnn on GPU for bf16/fp16, xla otherwise.
All run in Pallas interpret mode on a CPU (`interpret=True`) but cudnn, which needs the device.
Shape letters as in layers.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

KERNELS = ("splash", "cudnn", "triton")
_SPLASH_BLOCK = 128


def resolve(
  choice: str, *, dtype, causal: bool, decode: bool, length: int, backend: str | None = None
) -> str:
  """The attention implementation `choice` ("auto" or one of ATTENTIONS) means here.

  Kernels serve causal self-attention of whole sequences (training, scoring, prefill without a
  cache); encoders and KV-cache decoding use xla. "auto" also falls back to xla where the kernel
  would not apply (fp32 on GPU, T not a multiple of 128 on TPU).

  Raises:
    ValueError: when an explicitly chosen kernel cannot run these inputs.
  """
  backend = backend or jax.default_backend()
  if choice == "xla" or decode or not causal:
    return "xla"
  half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
  if choice == "auto":
    if backend == "tpu" and length % _SPLASH_BLOCK == 0:
      return "splash"
    if backend == "gpu" and half:
      return "cudnn"
    return "xla"
  if choice == "splash" and length % _SPLASH_BLOCK:
    raise ValueError(
      f"model.attention='splash' needs a length that is a multiple of "
      f"{_SPLASH_BLOCK}, got {length}; pad the sequences or use attention='xla'"
    )
  if choice == "cudnn" and not half:
    raise ValueError(
      "model.attention='cudnn' needs model.dtype bfloat16 or float16; set it or "
      "use attention='triton'"
    )
  return choice


def attend(impl: str, q_BTHE, k_BSKE, v_BSKE, segment_ids_BT=None, *, interpret=None):
  """Causal attention within segments by the kernel `impl` (one of KERNELS): [B, T, H, E].

  Args:
    impl: "splash", "cudnn" or "triton".
    q_BTHE, k_BSKE, v_BSKE: queries, keys and values; K divides H (grouped-query attention).
    segment_ids_BT: packed-document ids (contiguous runs); None = one document per row.
    interpret: run the Pallas kernel in interpret mode (default: on CPU).
  """
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  if impl == "splash":
    kernel = functools.partial(splash_attention, interpret=interpret)
  elif impl == "triton":
    kernel = functools.partial(triton_attention, interpret=interpret)
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

  batch = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
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


def triton_attention(q_BTHE, k_BSKE, v_BSKE, segment_ids_BT=None, *, interpret=False):
  """Pallas Triton flash attention (GPU): causal, segment ids; kv heads repeated for GQA."""
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention

  H, K, E = q_BTHE.shape[2], k_BSKE.shape[2], q_BTHE.shape[3]
  T = q_BTHE.shape[1]
  if K != H:
    k_BSKE = jnp.repeat(k_BSKE, H // K, axis=2)
    v_BSKE = jnp.repeat(v_BSKE, H // K, axis=2)
  block = min(128 if not interpret else 64, T)
  back = min(64 if not interpret else 32, T)
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
    k_BSKE,
    v_BSKE,
    segment_ids_BT,
    sm_scale=E**-0.5,
    causal=True,
    block_sizes=sizes,
    interpret=interpret,
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
  """cuDNN flash attention (GPU, bf16/fp16): causal; packed documents in cuDNN's packed layout."""
  E = q_BTHE.shape[-1]
  if segment_ids_BT is None:
    return jax.nn.dot_product_attention(
      q_BTHE, k_BSKE, v_BSKE, is_causal=True, implementation="cudnn"
    )
  from jax._src.cudnn.fused_attention_stablehlo import MaskType
  from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_dpa

  lengths_BM, starts_BM1 = segment_offsets(segment_ids_BT)
  return cudnn_dpa(
    q_BTHE,
    k_BSKE,
    v_BSKE,
    None,
    None,
    lengths_BM,
    lengths_BM,
    starts_BM1,
    starts_BM1,
    scale=float(E**-0.5),
    mask_type=MaskType.PADDING_CAUSAL,
    qkv_layout="BTNH",
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
