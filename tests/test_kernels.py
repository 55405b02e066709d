"""Attention kernels and their choice (jaxlm.models.kernels, jaxlm.models.cudnn_compat): the
selection table of docs/performance.md row by row; splash (TPU) and Triton (GPU) flash attention in
Pallas interpret mode, tokamax through its XLA path and cuDNN's packed path with the cuDNN call
replaced must match the xla path with packed documents, the causal mask and grouped-query heads.
"""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from jaxlm import sharding
from jaxlm.models import cudnn_compat, kernels
from jaxlm.models.config import ATTENTIONS, ModelConfig
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


def test_splash_kernel_is_reused_by_a_second_trace():
  """The kernel is cached per shape: a second program (an eval step after the train step) must
  not find the first trace's tracers in it."""
  q, k, v, _ = _qkv(1, 128, 2, 1, 8)
  splash = lambda q, k, v: kernels.attend("splash", q, k, v, None, interpret=True)
  first = jax.jit(splash)(q, k, v)
  second = jax.jit(lambda q, k, v: splash(q, k, v) * 2.0)(q, k, v)
  np.testing.assert_allclose(second, 2.0 * first, rtol=1e-6)
  np.testing.assert_allclose(first, attend(q, k, v), atol=1e-5, rtol=1e-5)


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

  mesh = Mesh(np.asarray(jax.devices()[:2]).reshape(2, 1, 1, 1, 1), sharding.MESH_AXES)
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



def _segment_reference(q_BTHE, k_BSHE, v_BSHE, lengths_BM, starts_BM1, *, scale):
  """Stands in for cuDNN's packed-layout call: attends causally within the segments it is handed
  (lengths, starts), with the heads it is handed (cuDNN's packed path needs kv heads = q heads)."""
  assert k_BSHE.shape[2] == q_BTHE.shape[2] == v_BSHE.shape[2]
  T = q_BTHE.shape[1]
  t_11T = jnp.arange(T)[None, None, :]
  starts_BM1_ = starts_BM1[:, :-1, None]
  in_BMT = (t_11T >= starts_BM1_) & (t_11T < starts_BM1_ + lengths_BM[:, :, None])
  in_BMT &= lengths_BM[:, :, None] >= 0
  same_BTS = jnp.einsum("bmt,bms->bts", in_BMT.astype(jnp.float32), in_BMT.astype(jnp.float32)) > 0
  mask_BTS = same_BTS & jnp.tril(jnp.ones((T, T), bool))[None]
  logits_BHTS = jnp.einsum("bthe,bshe->bhts", q_BTHE, k_BSHE) * scale
  logits_BHTS = jnp.where(mask_BTS[:, None], logits_BHTS, jnp.finfo(jnp.float32).min)
  return jnp.einsum("bhts,bshe->bthe", jax.nn.softmax(logits_BHTS, axis=-1), v_BSHE)


def test_cudnn_packed_path_hands_cudnn_the_segments_and_heads_that_give_the_xla_result(
  monkeypatch,
):
  """cuDNN runs on a GPU only: with its packed-layout call replaced by a reference attending within
  the segments it is given, jaxlm's side (offsets, lengths, repeated kv heads, scale) gives the
  xla path's output and gradients."""
  monkeypatch.setattr(cudnn_compat, "packed_attention", _segment_reference)
  q, k, v, ct = _qkv(2, 128, 4, 2, 16)
  seg = jnp.asarray(SEGMENTS, jnp.int32)
  mask = attention_mask(seg, causal=True)
  ref = jax.jit(lambda *a: _out_and_grads(lambda q, k, v: attend(q, k, v, mask), *a))

  def cudnn(q, k, v):
    return kernels.cudnn_attention(q, k, v, seg)

  got = jax.jit(lambda *a: _out_and_grads(cudnn, *a))
  (out_ref, grads_ref), (out, grads) = ref(q, k, v, ct), got(q, k, v, ct)
  np.testing.assert_allclose(out, out_ref, atol=1e-5, rtol=1e-5)
  for g, g_ref in zip(grads, grads_ref):
    np.testing.assert_allclose(g, g_ref, atol=2e-5, rtol=1e-5)


def test_tokamax_attention_matches_xla_with_segments_causal_and_gqa():
  """tokamax's GPU kernels cannot run on a CPU: its XLA path checks jaxlm's side of the call (the
  dense same-segment mask, the scale, grouped-query heads)."""
  q, k, v, ct = _qkv(2, 128, 4, 2, 16)
  seg = jnp.asarray(SEGMENTS, jnp.int32)
  mask = attention_mask(seg, causal=True)
  ref = jax.jit(lambda *a: _out_and_grads(lambda q, k, v: attend(q, k, v, mask), *a))
  got = jax.jit(
    lambda *a: _out_and_grads(
      lambda q, k, v: kernels.attend("tokamax", q, k, v, seg, interpret=True), *a
    )
  )
  (out_ref, grads_ref), (out, grads) = ref(q, k, v, ct), got(q, k, v, ct)
  np.testing.assert_allclose(out, out_ref, atol=1e-5, rtol=1e-5)
  for g, g_ref in zip(grads, grads_ref):
    np.testing.assert_allclose(g, g_ref, atol=2e-5, rtol=1e-5)


def test_segment_offsets_describe_the_causal_same_segment_mask_with_one_segment_rows():
  seg = jnp.asarray([[5] * 16, [1] * 3 + [2] * 13], jnp.int32)
  lengths, starts = jax.jit(kernels.segment_offsets)(seg)
  np.testing.assert_array_equal(lengths[:, :3], [[16, -1, -1], [3, 13, -1]])
  rebuilt = kernels.segments_mask(lengths, starts, 16)
  np.testing.assert_array_equal(rebuilt, np.asarray(attention_mask(seg, causal=True))[:, 0])


# ------------------------------------------------------------------------------- the choice
_DOC = os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "performance.md")
_TABLE = re.compile(r"<!-- attention-selection-table -->\n(.*?)<!-- /attention-selection-table -->",
                    re.DOTALL)


def _version(cell: str) -> int | None:
  """cuDNN "9.6" -> 90600, "8.9.4" -> 8904 (JAX's encoding); "–" -> None."""
  parts = [int(x) for x in re.findall(r"\d+", cell)]
  if not parts:
    return None
  major, minor, patch = (parts + [0, 0])[:3]
  return major * 10000 + minor * 100 + patch if major >= 9 else major * 1000 + minor * 100 + patch


def _table_rows():
  """docs/performance.md's selection table: (row text, Device, Call, auto's pick, refused set)."""
  with open(_DOC) as f:
    body = _TABLE.search(f.read()).group(1)
  rows = []
  for line in body.strip().splitlines()[2:]:
    cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
    platform, cap, cudnn, dtype, head_dim, length, batch, auto, refused = cells
    match = re.match(r"(\d+)\.(\d+)", cap)
    device = kernels.Device(
      platform, (int(match[1]), int(match[2])) if match else None, _version(cudnn), tokamax=True
    )
    call = kernels.Call(
      dtype, int(head_dim), int(length), packed=batch in ("packed", "decode"),
      causal=batch != "encoder", decode=batch == "decode",
    )
    refused = set() if refused == "–" else {r.strip() for r in refused.split(",")}
    rows.append(pytest.param(device, call, auto, refused, id=line.strip()))
  return rows


def test_the_selection_table_is_in_the_docs_and_covers_every_platform():
  rows = _table_rows()
  assert len(rows) >= 25
  assert {p.values[0].platform for p in rows} == {"cpu", "gpu", "tpu"}
  assert ATTENTIONS == ("auto", "xla", *kernels.KERNELS)


@pytest.mark.parametrize("device, call, auto, refused", _table_rows())
def test_selection_table_row(device, call, auto, refused):
  """`auto` picks the row's kernel; each kernel is refused, with the fix, exactly where listed."""
  assert kernels.choose("auto", device, call) == auto
  assert kernels.choose("xla", device, call) == "xla"
  for kernel in kernels.KERNELS:
    if kernel in refused:
      with pytest.raises(ValueError, match=f"model.attention='{kernel}' cannot run here: .*; set "
                                           f"model.attention='auto' \\(here: '{auto}'\\)"):
        kernels.choose(kernel, device, call)
    else:
      kernel_runs = call.causal and not call.decode
      assert kernels.choose(kernel, device, call) == (kernel if kernel_runs else "xla")


def test_auto_never_picks_a_path_never_run_on_a_gpu():
  """Over a grid of devices and calls: auto picks neither tokamax nor cuDNN's packed layout, and
  only kernels why_not lets through."""
  devices = [kernels.Device("cpu", tokamax=True), kernels.Device("tpu", tokamax=True)] + [
    kernels.Device("gpu", cap, version, tokamax=True)
    for cap in [None, (7, 5), (8, 0), (8, 9), (9, 0), (10, 0), (10, 3), (12, 0)]
    for version in [None, 8904, 90500, 90600, 91100]
  ]
  for device in devices:
    for dtype in ("float32", "bfloat16", "float16"):
      for head_dim, length, packed in [(64, 2048, False), (64, 2048, True), (256, 1000, True)]:
        call = kernels.Call(dtype, head_dim, length, packed)
        pick = kernels.choose("auto", device, call)
        assert pick != "tokamax" and not (pick == "cudnn" and packed), (device, call)
        assert pick == "xla" or kernels.why_not(pick, device, call) is None


def test_tokamax_not_installed_is_refused_with_the_install_command():
  device = kernels.Device("gpu", (9, 0), 91000, tokamax=False)
  with pytest.raises(ValueError, match=r"pip install tokamax\); set model.attention='auto'"):
    kernels.choose("tokamax", device, kernels.Call("bfloat16", 128, 2048, packed=True))


def test_device_at_hand_on_the_test_cpu():
  assert kernels.device_at_hand() == kernels.Device("cpu", tokamax=True)


@pytest.mark.parametrize(
  "attention, length", [("cudnn", 64), ("splash", 64), ("triton", 100)]
)
def test_explicit_kernel_that_cannot_run_is_refused_while_the_model_is_traced(attention, length):
  """Refused at the first trace (eval_shape: nothing compiled), in one line naming the fix."""
  cfg = ModelConfig(vocab_size=32, num_layers=1, embed_dim=16, num_heads=2, max_seq_len=128,
                    attention=attention)
  tokens = jnp.zeros((2, length), jnp.int32)
  seg = jnp.ones((2, length), jnp.int32)

  def init(rng):
    return Transformer(cfg).init(rng, tokens, segment_ids_BT=seg)

  with pytest.raises(ValueError, match=f"model.attention='{attention}' cannot run here") as err:
    jax.eval_shape(init, jax.random.PRNGKey(0))
  assert "\n" not in str(err.value) and "set model.attention='auto' (here: 'xla')" in str(err.value)
  with pytest.raises(ValueError, match="model.attention"):
    ModelConfig(attention="flash2")


# --------------------------------------------------------------------- the private-API adapter
def test_private_jax_is_named_only_by_cudnn_compat():
  package = os.path.join(os.path.dirname(os.path.dirname(__file__)), "jaxlm")
  naming = []
  for folder, _, files in os.walk(package):
    for name in files:
      if name.endswith(".py"):
        with open(os.path.join(folder, name)) as f:
          if re.search(r"\bjax\._src\b|from jax import _src", f.read()):
            naming.append(os.path.relpath(os.path.join(folder, name), package))
  assert naming == [os.path.join("models", "cudnn_compat.py")]


def test_cudnn_compat_refuses_a_jax_outside_the_range_it_was_written_for(monkeypatch):
  assert cudnn_compat.in_range("0.10.2") and not cudnn_compat.in_range("0.11.0")
  assert not cudnn_compat.in_range("0.9.2")
  monkeypatch.setattr(cudnn_compat, "WRITTEN_FOR", ((0, 1, 0), (0, 2, 0)))
  q = jnp.zeros((1, 8, 2, 8), jnp.bfloat16)
  lengths, starts = -jnp.ones((1, 8), jnp.int32), -jnp.ones((1, 9), jnp.int32)
  with pytest.raises(ValueError, match=r"use model.attention='triton' .* or pin jax>=0\.1,<0\.2"):
    cudnn_compat.packed_attention(q, q, q, lengths, starts, scale=1.0)


def test_cudnn_version_outside_the_range_comes_from_the_cudnn_wheel(monkeypatch):
  import importlib.metadata

  monkeypatch.setattr(cudnn_compat, "WRITTEN_FOR", ((0, 1, 0), (0, 2, 0)))
  wheels = {}

  def version(name):
    if name in wheels:
      return wheels[name]
    raise importlib.metadata.PackageNotFoundError(name)

  monkeypatch.setattr(importlib.metadata, "version", version)
  assert cudnn_compat.cudnn_version() is None
  wheels["nvidia-cudnn-cu12"] = "9.10.2.21"
  assert cudnn_compat.cudnn_version() == 91002
  wheels["nvidia-cudnn-cu12"] = "8.9.4.25"
  assert cudnn_compat.cudnn_version() == 8904
