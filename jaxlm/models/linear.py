"""How a layer applies its kernel when LoRA is on: a kernel of the frozen base (boxed `Frozen`,
possibly quantized) is cast or dequantized where it is used, inside the layer, and recomputed
rather than kept for the backward pass; an adapter held beside the kernel adds its low-rank
branch, y = x W + (x A) B' with B' = scale * B (jaxlm.models.lora.Lora.unmerged). A step
therefore never builds a merged model, and only the adapters are differentiated.

Quantized kernels are Qwix's: int8 as a qwix QArray; int4 and NF4 (QLoRA's 4-bit NormalFloat)
quantized by qwix and stored as `Packed4`, two 4-bit codes a byte. qwix keeps them as int4 and
uint4 arrays, which XLA:CPU widens whole to int8 before a scan over the layers (a stacked int8
copy of every 4-bit kernel, measured in tests/test_lora.py) and TensorStore cannot save (uint4).
"""

import sys
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

LORA_A, LORA_B = "lora_a", "lora_b"


@flax.struct.dataclass
class Frozen:
  """A kernel of a LoRA run's frozen base as a step applies it: `value` is an array (of any float
  dtype) or a qwix QArray, and is never differentiated."""

  value: Any


@flax.struct.dataclass
class Packed4:
  """A 4-bit quantized kernel as stored: `codes` (uint8) holds the 4-bit codes of neighbours
  along `axis` two to a byte (the first in the low nibble); `scale` is qwix's (fp32, one per
  block along `axis` and per index of the other axes). Codes are int4 values + 8, or NF4 indices.
  `axis` counts from the end, so it survives slicing off the layers axis."""

  codes: jax.Array
  scale: jax.Array
  qtype: str = flax.struct.field(pytree_node=False)  # "int4" | "nf4"
  axis: int = flax.struct.field(pytree_node=False)  # < 0


def is_qarray(x) -> bool:
  qwix = sys.modules.get("qwix")  # no QArray exists before a base is quantized (imports qwix)
  return qwix is not None and isinstance(x, qwix.QArray)


def is_quantized(x) -> bool:
  return isinstance(x, Packed4) or is_qarray(x)


def quantize(x: jax.Array, qtype: str, *, channels: tuple, groups: dict | None = None):
  """x quantized by qwix as `qtype` ("int8", "int4" or "nf4") with fp32 absmax scales: one per
  index of the `channels` axes and per block of `groups[axis]` along each grouped axis. int8
  comes back as a qwix QArray; 4-bit as Packed4, packed along its one grouped axis (even-sized)."""
  import qwix  # here: qwix imports flax.nnx and optax, which generation never needs

  dtype = {"int8": jnp.int8, "int4": jnp.int4, "nf4": "nf4"}[qtype]
  q = qwix.quantize(x, dtype, channelwise_axes=channels, tiled_axes=groups or {},
                    scale_dtype=jnp.float32)
  if qtype == "int8":
    return q
  (axis,) = groups
  codes = (q.qvalue.astype(jnp.int8) + (0 if qtype == "nf4" else 8)).astype(jnp.uint8)
  low = jax.lax.slice_in_dim(codes, 0, None, 2, axis)
  high = jax.lax.slice_in_dim(codes, 1, None, 2, axis)
  return Packed4(low | (high << 4), q.scale, qtype, axis - x.ndim)


def dequantize(x):
  """A quantized kernel's values, in its scales' dtype (fp32); any other array as it is."""
  if isinstance(x, Packed4):
    axis = x.codes.ndim + x.axis
    codes = jnp.stack([x.codes & 0xF, x.codes >> 4], axis=axis + 1)
    shape = list(x.codes.shape)
    shape[axis] *= 2
    codes = codes.reshape(shape)
    qwix = sys.modules["qwix"]
    if x.qtype == "nf4":
      return qwix.dequantize(qwix.QArray(codes.astype(jnp.uint4), x.scale, qtype="nf4"))
    return qwix.dequantize(qwix.QArray(codes.astype(jnp.int8) - 8, x.scale))
  if is_qarray(x):
    return sys.modules["qwix"].dequantize(x)
  return x


def kernel_param(module: nn.Module, init, shape: tuple, dtype) -> Any:
  """The layer's kernel param: a Frozen box as the params hold it (flax's check of a param's
  shape would compare packed 4-bit codes with the kernel's), else module.param("kernel")."""
  if module.has_variable("params", "kernel"):
    kernel = module.get_variable("params", "kernel")
    if isinstance(kernel, Frozen):
      return kernel
  return module.param("kernel", init, shape, dtype)


def project(module: nn.Module, matmul, x: jax.Array, kernel, *, n_in: int, dtype) -> jax.Array:
  """`matmul(x, kernel)` in `dtype` as the layer `module` applies its kernel, plus the LoRA branch
  when the module's params hold an adapter (`lora_a` A [*I, R], `lora_b` B' [R, *O]).

  A trained kernel is used as flax's layers use it (input and kernel cast to `dtype`). A Frozen
  one is cast or dequantized inside a checkpoint that saves nothing: under scan a cast kernel kept
  for the backward pass would be stacked over the layers, a whole dequantized model; the stored
  kernel slice itself is the scan's input, which JAX passes to the backward pass uncopied (a
  stop_gradient here would make it a new value per layer, stacked: Lora.unmerged stops the
  gradient of the whole base once instead).

  Args:
    module: the layer (its params are read for the adapter).
    matmul: the layer's product of its input and kernel, both in `dtype`.
    x: the input; its last `n_in` dims are contracted with the kernel's first `n_in`.
    kernel: the module's kernel param: an array, or a Frozen box.
    n_in: how many leading kernel dims are inputs.
    dtype: the compute dtype.
  """
  if isinstance(kernel, Frozen):
    x = jnp.asarray(x, dtype)
    frozen = lambda x, w: matmul(x, dequantize(w).astype(dtype))
    y = jax.checkpoint(frozen, policy=jax.checkpoint_policies.nothing_saveable)(x, kernel.value)
  else:
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=dtype)
    y = matmul(x, kernel)
  if not module.has_variable("params", LORA_A):
    return y
  a = module.get_variable("params", LORA_A).astype(dtype)
  b = module.get_variable("params", LORA_B).astype(dtype)
  return y + jnp.tensordot(jnp.tensordot(x, a, axes=n_in), b, axes=1)
