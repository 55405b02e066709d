"""Attention kernels (jaxlm.models.kernels): splash (TPU) and Triton (GPU) flash attention run in
Pallas interpret mode on the CPU and must match the xla path with packed documents, the causal
mask and grouped-query heads; cuDNN's packed layout is checked through the offsets it is given.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from jaxlm import sharding
from jaxlm.models import kernels
from jaxlm.models.config import ModelConfig
from jaxlm.models.layers import attend, attention_mask
from jaxlm.models.transformer import Transformer

# three documents per row, boundaries away from the kernels' blocks, the last one padding (0)
SEGMENTS = [[1] * 50 + [2] * 70 + [0] * 8, [3] * 100 + [4] * 28]


def _qkv(B, T, H, K, E, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(keys[0], (B, T, H, E))
  k = jax.random.normal(keys[1], (B, T, K, E))
  v = jax.random.normal(keys[2], (B, T, K, E))
  ct = jax.random.normal(keys[3], (B, T, H, E))
  return q, k, v, ct


def _out_and_grads(fn, q, k, v, ct):
  out, vjp = jax.vjp(fn, q, k, v)
  return out, vjp(ct)


def test_splash_attention_matches_xla_with_segments_causal_and_gqa():
  q, k, v, ct = _qkv(2, 128, 2, 1, 64)
  seg = jnp.asarray(SEGMENTS, jnp.int32)
  mask = attention_mask(seg, causal=True)
  ref = jax.jit(lambda *a: _out_and_grads(lambda q, k, v: attend(q, k, v, mask), *a))
  got = jax.jit(
    lambda *a: _out_and_grads(
      lambda q, k, v: kernels.attend("splash", q, k, v, seg, interpret=True), *a
    )
  )
  (out_ref, grads_ref), (out, grads) = ref(q, k, v, ct), got(q, k, v, ct)
  np.testing.assert_allclose(out, out_ref, atol=1e-5, rtol=1e-5)
  for g, g_ref in zip(grads, grads_ref):  # dq, dk, dv (dk, dv summed over the query group)
    np.testing.assert_allclose(g, g_ref, atol=2e-5, rtol=1e-5)


def test_triton_attention_in_a_model_matches_xla_per_device_under_a_mesh():
  """A scanned GQA Llama-style model, packed rows, data-parallel over 2 devices: logits and
  gradients of attention="triton" (Pallas interpret mode, run per device) equal the xla path."""
  cfg = ModelConfig(
    vocab_size=64,
    num_layers=1,
    embed_dim=32,
    num_heads=2,
    num_kv_heads=1,
    norm="rmsnorm",
    position="rope",
    activation="silu",
    gated_mlp=True,
    use_bias=False,
    max_seq_len=64,
    scan_layers=True,
    attention="xla",
  )
  T = 64
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, T), 0, 64)
  seg = jnp.asarray([[1] * 20 + [2] * 44, [5] * 64], jnp.int32)
  positions = jnp.asarray([list(range(20)) + list(range(44)), list(range(64))], jnp.int32)
  shapes = jax.eval_shape(Transformer(cfg).init, jax.random.PRNGKey(0), tokens)["params"]
  rng = np.random.default_rng(0)  # random values without compiling an init
  params = jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32), shapes)

  def loss_and_grads(attention):
    model = Transformer(cfg.replace(attention=attention))

    def loss(p):
      logits = model.apply({"params": p}, tokens, segment_ids_BT=seg, positions_BT=positions)
      return (logits[..., 0] ** 2).mean(), logits

    return jax.value_and_grad(loss, has_aux=True)(params)

  mesh = Mesh(np.asarray(jax.devices()[:2]).reshape(2, 1, 1, 1), sharding.MESH_AXES)
  with sharding.mesh_rules(mesh):
    tokens, seg, positions = jax.device_put((tokens, seg, positions), sharding.batch_sharding(mesh))
    (_, logits), grads = jax.jit(loss_and_grads, static_argnums=0)("triton")
  (_, logits_ref), grads_ref = jax.jit(loss_and_grads, static_argnums=0)("xla")
  np.testing.assert_allclose(logits, logits_ref, atol=1e-5, rtol=1e-5)
  for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(g, g_ref, atol=1e-5, rtol=1e-4)


def test_segment_offsets_describe_the_causal_same_segment_mask():
  """cuDNN's packed layout (runs on a GPU only) gets lengths and starts that rebuild the mask."""
  seg = jnp.asarray(SEGMENTS + [[7] * 128], jnp.int32)
  lengths, starts = jax.jit(kernels.segment_offsets)(seg)
  assert lengths.shape == (3, 128) and starts.shape == (3, 129)
  np.testing.assert_array_equal(lengths[0, :4], [50, 70, 8, -1])
  np.testing.assert_array_equal(starts[1, :3], [0, 100, -1])
  rebuilt = kernels.segments_mask(lengths, starts, 128)
  np.testing.assert_array_equal(rebuilt, np.asarray(attention_mask(seg, causal=True))[:, 0])


@pytest.mark.parametrize(
  "backend, dtype, expected",
  [
    ("tpu", "float32", "splash"),
    ("gpu", "bfloat16", "cudnn"),
    ("gpu", "float32", "xla"),
    ("cpu", "bfloat16", "xla"),
  ],
)
def test_auto_attention_picks_the_platforms_kernel(backend, dtype, expected):
  got = kernels.resolve("auto", dtype=dtype, causal=True, decode=False, length=256, backend=backend)
  assert got == expected
  # decoding with a KV cache, encoders and lengths splash cannot tile use xla
  assert (
    kernels.resolve("auto", dtype=dtype, causal=True, decode=True, length=256, backend=backend)
    == "xla"
  )
  assert (
    kernels.resolve("auto", dtype=dtype, causal=False, decode=False, length=256, backend=backend)
    == "xla"
  )
  assert (
    kernels.resolve("auto", dtype=dtype, causal=True, decode=False, length=100, backend="tpu")
    == "xla"
  )


def test_explicit_kernel_that_cannot_run_names_the_fix():
  with pytest.raises(ValueError, match="multiple of 128"):
    kernels.resolve("splash", dtype="float32", causal=True, decode=False, length=100)
  with pytest.raises(ValueError, match="bfloat16"):
    kernels.resolve("cudnn", dtype="float32", causal=True, decode=False, length=128)
  with pytest.raises(ValueError, match="model.attention"):
    ModelConfig(attention="flash2")
