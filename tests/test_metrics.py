"""Tests jaxlm/train/metrics.py and jaxlm/devices.py: a run's MFU, goodput, compile time and
profile, the W&B sink (offline), and the model-FLOPs count that MFU rests on."""

import dataclasses
import glob
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_fault_tolerance import tiny_config

from jaxlm import config as config_lib
from jaxlm import devices, runtime
from jaxlm.models import config as model_config
from jaxlm.models import heads
from jaxlm.models import lora as lora_lib
from jaxlm.train import metrics, trainer
from jaxlm.train import step as step_lib


def test_goodput_charges_blocks_to_buckets_less_their_compilation():
  clock = metrics.Goodput()
  with clock.timing("eval"):
    time.sleep(0.05)
    jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.0)(jnp.arange(7.0)).block_until_ready()  # compiles
  with clock.timing("step"):
    time.sleep(0.1)
  s = clock.summary()
  assert clock.spent["compile"] > 0 and 0.05 <= clock.spent["eval"] < 0.05 + 0.5
  assert 0.1 <= clock.spent["step"] < 0.3
  assert s["goodput"] == pytest.approx(clock.spent["step"] / s["wall_seconds"], rel=0.05)
  assert s["goodput"] + sum(s[f"{b}_frac"] for b in clock.BUCKETS) <= 1.0


@pytest.mark.parametrize("causal", [False, True])
def test_model_flops_per_token_match_what_xla_counts_for_the_forward_pass(causal):
  """XLA's cost analysis of the compiled forward pass counts every matmul (and the elementwise
  ops, a few percent more). The xla attention path scores a causal block of queries against the
  keys before its end (devices.xla_attention_keys: 3/4 of T x T at T=256), where the model count
  halves T x T: so compare against the count with the keys the path scores."""
  cfg = model_config.ModelConfig(vocab_size=512, num_layers=2, embed_dim=64, num_heads=4,
                                 num_kv_heads=2, mlp_dim=192, gated_mlp=True, max_seq_len=256,
                                 causal=causal, head="lm" if causal else "mlm")
  model = heads.build_model(cfg)
  tokens = jnp.zeros((2, 256), jnp.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens))
  cost = jax.jit(model.apply).lower(params, tokens).compile().cost_analysis()
  full = devices.model_flops_per_token(dataclasses.replace(cfg, causal=False), 256,
                                       training=False)
  attention = 4 * cfg.num_layers * 256 * cfg.embed_dim  # H * E = D
  keys = devices.xla_attention_keys(256, causal)
  assert keys == (256 * 3 / 4 if causal else 256)  # 128-query blocks: 128 and 256 keys
  scored = full - attention * (1 - keys / 256)
  assert scored * tokens.size <= cost["flops"] < 1.15 * scored * tokens.size
  counted = devices.model_flops_per_token(cfg, 256, training=False)
  assert full - counted == (attention / 2 if causal else 0)
  assert devices.model_flops_per_token(cfg, 256) == 3 * counted
  assert devices.model_flops_per_token(cfg, 256, weight_grads=False) == 2 * counted  # LoRA


# Tiny blocks of the three layouts (GPT-2: learned positions, LayerNorm, biases, tied head;
# Llama: RoPE, RMSNorm, SwiGLU, grouped-query; BERT: post-norm encoder with an MLM head), sized so
# attention's two T x T matmuls are a third of the FLOPs: a count that missed them moves by 10%.
_FAMILIES = {
  "gpt2": dict(max_seq_len=512),
  "llama": dict(max_seq_len=512, norm="rmsnorm", position="rope", activation="silu",
                gated_mlp=True, use_bias=False, tie_embeddings=False, num_kv_heads=1),
  "bert": dict(model_config.PRESETS["bert-mini"], max_seq_len=512, head="mlm"),
}


def _train_step_cost(cfg, lora=None, compiled=False) -> float:
  """XLA's cost analysis of an AdamW step of `cfg` on [2, 512] tokens (the adapters of `lora`
  trained inside the layers beside the frozen base, when given): of the program as lowered (what
  jaxlm asks for), or as compiled for this CPU."""
  model = heads.build_model(cfg)
  tokens = jnp.zeros((2, 512), jnp.int32)
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens))["params"]
  params, frozen = nn.unbox(boxed), None
  if lora is not None:
    frozen, params = lora.freeze(params), nn.unbox(lora.init(jax.random.PRNGKey(0), boxed))
  tx = optax.adamw(1e-3)

  def step(params, opt_state, frozen, tokens):
    def loss(p):
      logits = model.apply({"params": p if lora is None else lora.unmerged(frozen, p)}, tokens)
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()

    grads = jax.grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  lowered = jax.jit(step).lower(params, jax.eval_shape(tx.init, params), frozen, tokens)
  return (lowered.compile() if compiled else lowered).cost_analysis()["flops"]


@pytest.mark.parametrize("remat", model_config.REMAT)
@pytest.mark.parametrize("family", list(_FAMILIES))
def test_hardware_flops_per_token_are_the_matmuls_xla_counts_in_a_train_step(family, remat):
  """XLA's count of a train step's FLOPs is the hardware count plus the elementwise work (norms,
  softmax, AdamW: 0.9-1.3% here), under every remat policy: dots recomputes attention's two
  batched matmuls, attention and full recompute all but the down projection (post-norm: that
  too). Counted on the program as lowered: XLA:CPU drops remat's optimization barriers and
  merges some recomputation back into the forward pass (docs/performance.md), so the compiled
  CPU program is compared only where nothing is rematerialised."""
  cfg = model_config.ModelConfig(**{**_FAMILIES[family], "vocab_size": 512, "num_layers": 2,
                                    "embed_dim": 256, "num_heads": 2, "mlp_dim": 256}, remat=remat)
  counted = devices.hardware_flops_per_token(cfg, 512) * 2 * 512
  assert 1.0 <= _train_step_cost(cfg) / counted < 1.02
  if remat == "none":
    assert 1.0 <= _train_step_cost(cfg, compiled=True) / counted < 1.02


@pytest.mark.parametrize("targets,remat", [("attention", "none"), ("mlp", "dots"),
                                           ("block_1/attn/(v|o)/kernel", "full"),
                                           ("block_0/attn/q/kernel", "attention")])
def test_hardware_flops_of_lora_count_only_the_gradients_and_recomputation_it_needs(targets,
                                                                                   remat):
  """A LoRA step computes no weight gradient of a kernel (the adapters sit beside the frozen
  kernels) and no input gradient below the first adapted kernel; remat recomputes only what that
  backward reads (mlp with dots: no attention recomputation in layer 0, no av in layer 1)."""
  cfg = model_config.ModelConfig(**{**_FAMILIES["llama"], "vocab_size": 512, "num_layers": 2,
                                    "embed_dim": 256, "num_heads": 2, "mlp_dim": 256}, remat=remat)
  section = config_lib.base_config().lora
  section.update({"rank": 4, "targets": targets})
  boxed = jax.eval_shape(lambda: heads.build_model(cfg).init(
    jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))["params"]
  lora = lora_lib.build(section, boxed, num_layers=2)
  counted = devices.hardware_flops_per_token(cfg, 512, trained=lora.trained_paths())
  # XLA's count also holds the adapters' own rank-4 matmuls, which the count leaves out (1.3% of
  # the step with every attention kernel adapted): 1.012 to 1.026 over these four
  assert 1.0 <= _train_step_cost(cfg, lora) / (counted * 2 * 512) < 1.03
  assert counted < 0.9 * devices.hardware_flops_per_token(cfg, 512)


def test_peaks_follow_the_matmul_precision_xla_runs_float32_at():
  h100, pcie, a100 = devices.named("h100"), devices.named("h100-pcie"), devices.named("a100")
  # GPUs: TF32 tensor cores at default and high, the float32 CUDA cores at highest
  assert devices.peak_flops(h100, "float32") == devices.peak_flops(h100, "float32", "high") \
    == 494.7e12
  assert devices.peak_flops(h100, "float32", "highest") == 67e12
  assert devices.peak_flops(pcie, "float32") == 378e12
  assert devices.peak_flops(pcie, "float32", "float32") == 51e12
  assert devices.peak_flops(a100, "float32") == 156e12
  assert devices.peak_flops(a100, "float32", "highest") == 19.5e12
  assert devices.peak_flops(devices.named("h200"), "float32") == 494.7e12
  # bf16/fp16 matmuls run at the bf16 peak whatever the precision
  assert devices.peak_flops(h100, "bfloat16", "highest") == 989e12
  assert devices.peak_flops(pcie, "float16") == 756e12
  assert devices.peak_flops(a100, "bfloat16") == 312e12
  # TPUs: float32 as 1, 3 or 6 bfloat16 passes
  v5p = devices.named("v5p")
  assert [devices.peak_flops(v5p, "float32", p) for p in ("default", "high", "highest")] == \
    [459e12, 459e12 / 3, 459e12 / 6]
  assert devices.peak_flops(v5p, "bfloat16", "highest") == 459e12
  cpu = devices.named("cpu")
  assert devices.peak_flops(cpu, "float32", "highest") == devices.peak_flops(cpu, "float32") > 0
  # the names are JAX's own, at the levels JAX gives them
  assert set(devices.PRECISION_LEVELS) == set(model_config.MATMUL_PRECISIONS)
  for name, level in devices.PRECISION_LEVELS.items():
    assert jax.lax.Precision(name).value == level
    with jax.default_matmul_precision(name):
      assert jax.config.jax_default_matmul_precision == name
  with pytest.raises(ValueError, match=r"matmul precision 'fast' is not one of \('default'"):
    devices.peak_flops(h100, "float32", "fast")
  with pytest.raises(ValueError, match=r"model.matmul_precision='fast' is not one of "):
    model_config.ModelConfig(matmul_precision="fast")


def test_device_kinds_are_found_by_their_jax_names():
  # jax.Device.device_kind on NVIDIA GPUs is the CUDA device name
  for kind, name in [("h100", "NVIDIA H100 80GB HBM3"), ("h100-pcie", "NVIDIA H100 PCIe"),
                     ("h100-nvl", "NVIDIA H100 NVL"), ("h200", "NVIDIA H200"),
                     ("h200-nvl", "NVIDIA H200 NVL"), ("a100", "NVIDIA A100-SXM4-80GB"),
                     ("a100", "NVIDIA A100 80GB PCIe"), ("a100-40gb", "NVIDIA A100-SXM4-40GB"),
                     ("a100-40gb", "NVIDIA A100-PCIE-40GB")]:
    assert devices.kind_of(name).name == kind, name
  assert devices.kind_of("TPU v5 lite").name == "v5e"
  assert devices.kind_of("TPU v5").name == "v5p"
  assert devices.kind_of("TPU v6 lite").name == "v6e"
  assert devices.kind_of("cpu").bf16_flops > 1e9
  assert devices.named("h200").memory_bytes > devices.named("h100").memory_bytes
  with pytest.raises(ValueError, match="unknown device 'v9'"):
    devices.named("v9")


def test_a_run_logs_mfu_goodput_and_compile_time_to_jsonl_and_wandb_and_profiles_steps(
    tmp_path, monkeypatch):
  data = tmp_path / "data.txt"
  data.write_text(" ".join(["alpha beta gamma delta"] * 400))
  config = tiny_config(str(data), **{"train.steps": 6, "train.log_every": 2,
                                     "profile.steps": "3-4", "wandb.project": "jaxlm-test",
                                     "wandb.mode": "offline", "model.matmul_precision": "highest"})
  traced_at = []  # the precision in force as the train step runs (and traces)
  jit_train_step = step_lib.jit_train_step

  def recording(*args, **kwargs):
    step = jit_train_step(*args, **kwargs)
    return lambda *a: traced_at.append(jax.config.jax_default_matmul_precision) or step(*a)

  monkeypatch.setattr(step_lib, "jit_train_step", recording)
  workdir = tmp_path / "run"
  result = trainer.train(config, str(workdir))

  assert traced_at == ["highest"] * 6
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  steps = [r for r in records if "tokens_per_sec" in r]
  peak, _ = devices.run_peak_flops("float32", precision="highest")
  # the run's first record says what MFU is measured against, once
  assert records[0]["step"] == 2 and records[0]["matmul_precision"] == "highest"
  assert records[0]["peak_flops_per_device"] == pytest.approx(peak / jax.device_count())
  assert not any("matmul_precision" in r for r in records[1:])
  cfg = trainer.setup(config, str(tmp_path / "x"), with_data=False).model.cfg
  per_token = devices.model_flops_per_token(cfg, 16)
  # XLA's attention computes all 16 x 16 scores, the model count the causal half
  hardware = devices.hardware_flops_per_token(cfg, 16)
  assert hardware > per_token
  for r in steps:  # MFU is tokens/s x model FLOPs per token over the devices' peak
    assert r["mfu"] == pytest.approx(r["tokens_per_sec"] * per_token / peak, rel=1e-6)
    assert 0 < r["mfu"] < 1 and r["hfu"] == pytest.approx(r["mfu"] * hardware / per_token)
  summary = records[-1]
  assert summary["step"] == 6 and summary["time_to_first_step"] > 0
  assert 0 < summary["compile_seconds"] < summary["wall_seconds"]
  assert 0 < summary["goodput"] < 1
  assert summary["xla_compiles"] + summary["compile_cache_hits"] > 0
  assert summary["goodput"] + sum(summary[f"{b}_frac"] for b in metrics.Goodput.BUCKETS) <= 1
  assert result["mean_mfu"] == summary["mean_mfu"] > 0

  events = EventAccumulator(str(workdir / "tensorboard"))
  events.Reload()
  assert [e.step for e in events.Scalars("mfu")] == [r["step"] for r in steps]
  assert events.Scalars("loss")[-1].value == pytest.approx(steps[-1]["loss"])
  assert glob.glob(str(workdir / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
  (wandb_file,) = glob.glob(str(workdir / "wandb" / "offline-run-*" / "run-*.wandb"))
  logged = open(wandb_file, "rb").read()
  assert all(key.encode() in logged for key in ("loss", "mfu", "goodput", "tokens_per_sec"))


def test_a_bad_profile_range_is_refused_before_training(tmp_path):
  data = tmp_path / "data.txt"
  data.write_text("alpha beta " * 100)
  config = tiny_config(str(data), **{"profile.steps": "three"})
  with pytest.raises(ValueError, match="profile.steps='three' is not a step range"):
    trainer.train(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_compile_stats_count_compilations_and_cache_hits(tmp_path):
  before = runtime.compile_stats()
  jax.jit(lambda x: jnp.cos(x) * 7.0)(jnp.arange(5.0)).block_until_ready()
  after = runtime.compile_stats()
  assert after["xla_compiles"] + after["cache_hits"] > before["xla_compiles"] + before["cache_hits"]
  assert after["seconds"] > before["seconds"]
