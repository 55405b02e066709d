"""Tests jaxlm/models/linear.py: the Dense layer is nn.Einsum's map bitwise; 4-bit kernels pack
two codes a byte and dequantize exactly as qwix's own int4 / NF4 arrays do (NF4 the closer for
normal weights); under a scan over layers packed codes keep XLA:CPU from widening every layer's
int4 kernel to int8 up front, which qwix's int4 arrays do not."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix

from jaxlm.models import linear
from jaxlm.models.config import ModelConfig
from jaxlm.models.layers import dense


@pytest.mark.parametrize("eq, shape, axes", [
  ("btd,dhe->bthe", (16, 2, 8), ("embed", "heads", "head_dim")),
  ("btf,fd->btd", (24, 16), ("mlp", "embed")),
])
def test_dense_is_flax_einsum_bitwise(eq, shape, axes):
  cfg = ModelConfig(vocab_size=8, num_layers=1, embed_dim=16, num_heads=2)
  ours = dense(cfg, eq, shape, axes, "proj", use_bias=True)
  theirs = nn.Einsum(shape, eq, use_bias=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, shape[0]))
  params = nn.unbox(ours.init(jax.random.PRNGKey(1), x))
  params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.PRNGKey(2), p.shape), params)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, theirs.init(
    jax.random.PRNGKey(1), x))
  assert (np.asarray(ours.apply(params, x)) == np.asarray(theirs.apply(params, x))).all()


@pytest.mark.parametrize("qtype", ["int4", "nf4"])
def test_4bit_codes_pack_two_a_byte_and_dequantize_as_qwixs_own(qtype):
  w = jax.random.normal(jax.random.PRNGKey(0), (3, 128, 96))  # [layers, inputs, outputs]
  packed = linear.quantize(w, qtype, channels=(0, 2), groups={1: 64})
  theirs = qwix.quantize(w, jnp.int4 if qtype == "int4" else "nf4", channelwise_axes=(0, 2),
                         tiled_axes={1: 64}, scale_dtype=jnp.float32)
  assert packed.codes.dtype == jnp.uint8 and packed.codes.shape == (3, 64, 96)
  assert packed.axis == -2 and packed.scale.shape == (3, 2, 96)  # a scale per 64 inputs
  ours = linear.dequantize(packed)
  assert (np.asarray(ours) == np.asarray(qwix.dequantize(theirs))).all()
  assert (np.asarray(linear.dequantize(jax.tree.map(lambda x: x[1], packed)))
          == np.asarray(ours[1])).all(), "a layer's slice unpacks alone (axis counted from the end)"


def test_nf4_is_closer_than_int4_for_normally_distributed_weights():
  w = jax.random.normal(jax.random.PRNGKey(0), (256, 256))
  err = {q: float(jnp.abs(linear.dequantize(linear.quantize(w, q, channels=(1,), groups={0: 64}))
                          - w).mean()) for q in ("int4", "nf4")}
  assert err["nf4"] < 0.9 * err["int4"] and err["int4"] < 0.1, err


def test_packed_codes_keep_xla_cpu_from_widening_every_layers_int4_kernel_before_a_scan():
  """The gradient of a scan over 8 layers of int4 [512, 512] kernels, each dequantized in its
  layer inside a checkpoint (as linear.project does): with qwix's int4 arrays XLA:CPU converts the
  whole stack to int8 before the loop (2 MiB more temporaries here); with packed codes it does
  not, and the temporaries are a few MiB of one layer's values and the activations."""
  layers, d = 8, 512
  w = jax.random.normal(jax.random.PRNGKey(0), (layers, d, d))
  x = jnp.ones((16, d))

  def temp_bytes(kernels) -> int:
    def loss(x, kernels):
      def body(h, k):
        matmul = lambda h, k: h @ linear.dequantize(k)
        return jnp.tanh(jax.checkpoint(matmul)(h, k)), None
      return jax.lax.scan(body, x, kernels)[0].sum()

    compiled = jax.jit(jax.grad(loss)).lower(x, kernels).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  packed = temp_bytes(linear.quantize(w, "int4", channels=(0, 2), groups={1: 64}))
  int4 = temp_bytes(qwix.quantize(w, jnp.int4, channelwise_axes=(0, 2), tiled_axes={1: 64},
                                  scale_dtype=jnp.float32))
  stack_as_int8 = layers * d * d  # 2 MiB; measured: packed 1.56 MiB, qwix's int4 3.56 MiB
  assert packed < stack_as_int8 and int4 - packed >= 0.9 * stack_as_int8, (packed, int4)
