"""Tests jaxlm/train/metrics.py and jaxlm/devices.py: a run's MFU, goodput, compile time and
profile, the W&B sink (offline), and the model-FLOPs count that MFU rests on."""

import dataclasses
import glob
import json
import os
import time

import jax
import jax.numpy as jnp
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_fault_tolerance import tiny_config

from jaxlm import devices, runtime
from jaxlm.models import config as model_config
from jaxlm.models import heads
from jaxlm.train import metrics, trainer


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
  ops, a few percent more). It computes the full T x T scores even when causal, which the model
  count halves: so compare against the count with attention in full."""
  cfg = model_config.ModelConfig(vocab_size=512, num_layers=2, embed_dim=64, num_heads=4,
                                 num_kv_heads=2, mlp_dim=192, gated_mlp=True, max_seq_len=256,
                                 causal=causal, head="lm" if causal else "mlm")
  model = heads.build_model(cfg)
  tokens = jnp.zeros((2, 256), jnp.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens))
  cost = jax.jit(model.apply).lower(params, tokens).compile().cost_analysis()
  full = devices.model_flops_per_token(dataclasses.replace(cfg, causal=False), 256,
                                       training=False)
  assert full * tokens.size <= cost["flops"] < 1.15 * full * tokens.size
  counted = devices.model_flops_per_token(cfg, 256, training=False)
  attention = 4 * cfg.num_layers * 256 * cfg.embed_dim  # H * E = D
  assert full - counted == (attention / 2 if causal else 0)
  assert devices.model_flops_per_token(cfg, 256) == 3 * counted
  assert devices.model_flops_per_token(cfg, 256, weight_grads=False) == 2 * counted  # LoRA
  # LoRA merged into the weights computes the frozen weights' gradients too; remat adds a pass
  assert devices.hardware_flops_factor("none", lora=True) == 3 / 2
  assert devices.hardware_flops_factor("full", lora=True, reference=True) == 5 / 3
  assert devices.hardware_flops_factor("full") == 4 / 3


def test_device_kinds_are_found_by_their_jax_names():
  assert devices.kind_of("NVIDIA H100 80GB HBM3").name == "h100"
  assert devices.kind_of("TPU v5 lite").name == "v5e"
  assert devices.kind_of("TPU v5").name == "v5p"
  assert devices.kind_of("TPU v6 lite").name == "v6e"
  assert devices.kind_of("cpu").bf16_flops > 1e9
  assert devices.named("h200").memory_bytes > devices.named("h100").memory_bytes
  with pytest.raises(ValueError, match="unknown device 'v9'"):
    devices.named("v9")


def test_a_run_logs_mfu_goodput_and_compile_time_to_jsonl_and_wandb_and_profiles_steps(tmp_path):
  data = tmp_path / "data.txt"
  data.write_text(" ".join(["alpha beta gamma delta"] * 400))
  config = tiny_config(str(data), **{"train.steps": 6, "train.log_every": 2,
                                     "profile.steps": "3-4", "wandb.project": "jaxlm-test",
                                     "wandb.mode": "offline"})
  workdir = tmp_path / "run"
  result = trainer.train(config, str(workdir))

  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  steps = [r for r in records if "tokens_per_sec" in r]
  peak, _ = devices.run_peak_flops("float32")
  per_token = devices.model_flops_per_token(trainer.setup(config, str(tmp_path / "x"),
                                                          with_data=False).model.cfg, 16)
  for r in steps:  # MFU is tokens/s x model FLOPs per token over the devices' peak
    assert r["mfu"] == pytest.approx(r["tokens_per_sec"] * per_token / peak, rel=1e-6)
    assert 0 < r["mfu"] < 1 and r["hfu"] == r["mfu"]  # no remat: hardware FLOPs = model FLOPs
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
