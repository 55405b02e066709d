"""Tests jaxlm/plan.py (`jaxlm plan`): parameter counts equal the real models', targets parse as
the vendors name slices, fit / does-not-fit decisions with the lever that fixes them, and the
analytic per-device bytes agree with XLA's memory_analysis() of the compiled step (which also
shows FSDP over 8 devices keeping 1/8 of the state on each)."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import pytest
from conftest import REPO

from jaxlm import cli, plan
from jaxlm.config import base_config
from jaxlm.models import heads

GiB = 1 << 30


def _config(name: str):
  path = os.path.join(REPO, "configs", name)
  spec = importlib.util.spec_from_file_location(name[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_targets_parse_as_the_vendors_name_slices():
  t = plan.target("v5p-64")  # v5p counts TensorCores: 32 chips, 4 a host
  assert (t.kind.name, t.chips, t.hosts) == ("v5p", 32, 8)
  t = plan.target("h100", hosts=4)
  assert (t.chips, t.hosts) == (32, 4)
  assert plan.target("v6e-16").chips == 16
  with pytest.raises(ValueError, match=r"v5p-64 is 32 chips on 8 hosts, not --hosts=2"):
    plan.target("v5p-64", hosts=2)
  with pytest.raises(ValueError, match=r"unknown device 'tpu9'"):
    plan.target("tpu9")
  # h100 stays the SXM card; the PCIe and NVL cards have names (and peaks) of their own
  t = plan.target("h100-pcie-16")
  assert (t.kind.name, t.chips, t.hosts) == ("h100-pcie", 16, 2)
  assert t.kind.bf16_flops < plan.target("h100").kind.bf16_flops
  assert plan.target("h100-nvl").kind.name == "h100-nvl"
  assert (plan.target("a100-40gb-8").kind.memory_bytes, plan.target("a100").chips) == (40 << 30, 8)


def test_parameter_counts_equal_the_real_models():
  c = base_config()
  c.model.update(vocab_size=100, num_layers=2, embed_dim=64, num_heads=4, max_seq_len=32)
  c.data.seq_len, c.train.batch_size = 32, 8
  model = heads.build_model(plan.model_config(c))
  real = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))  # allocated
  assert plan.make_plan(c, plan.target("v5p-8")).params == sum(
    x.size for x in jax.tree.leaves(real)
  )
  assert plan.make_plan(_config("gpt2_124m.py"), plan.target("h100")).params == 124_439_808
  assert plan.make_plan(_config("llama3_8b.py"), plan.target("v5p-64")).params == 8_030_261_248


def test_llama3_8b_fits_a_v5p_64_and_says_which_lever_fits_8_h100():
  config = _config("llama3_8b.py")
  p = plan.make_plan(config, plan.target("v5p-64"))
  assert p.fits and p.mesh == {"data": 1, "fsdp": 32, "expert": 1, "sequence": 1, "tensor": 1}
  # FSDP over 32: each chip holds 1/32 of the fp32 params (+ 2 AdamW moments)
  assert p.params_bytes == pytest.approx(8_030_261_248 * 4 / 32, rel=0.01)
  assert p.opt_bytes == pytest.approx(2 * p.params_bytes, rel=0.01)
  assert 5e10 < p.flops_per_token < 5.3e10  # 6N + attention

  h100 = plan.target("h100")  # one node: 8 GPUs, 4x the rows per GPU
  p = plan.make_plan(config, h100)
  assert not p.fits
  tried = plan.levers(config, h100)
  assert tried[-1][1].fits and tried[-1][0].startswith("--config.train.grad_accum=")
  assert tried[-1][1].rows_per_device < p.rows_per_device


def test_a_data_parallel_8b_model_does_not_fit_and_fsdp_is_the_first_lever():
  config = _config("llama3_8b.py")
  config.mesh.update(data=-1, fsdp=1)
  target = plan.target("v5p-64")
  p = plan.make_plan(config, target)
  assert not p.fits and p.params_bytes + p.opt_bytes > 85 * GiB  # 8B x 12 bytes, replicated
  tried = plan.levers(config, target)
  assert tried[0][0] == "--config.mesh.fsdp=-1 --config.mesh.data=1"
  text = plan.report(p, "configs/llama3_8b.py", tried)
  assert "fits         NO" in text and "lever: --config.mesh.fsdp=-1" in text


def test_analytic_bytes_match_the_compiled_step_on_the_devices_present(capsys):
  """On the 8 CPU devices of the tests, a CPU plan compiles the step: XLA's argument bytes
  (state + batch) agree with the analytic params + optimizer state."""
  c = base_config()
  c.model.update(vocab_size=256, num_layers=2, embed_dim=128, num_heads=4, max_seq_len=32)
  c.data.seq_len, c.train.batch_size = 32, 16
  c.mesh.update(data=1, fsdp=-1)
  p = plan.make_plan(c, plan.target("cpu"))
  assert p.compiled is not None and p.mesh["fsdp"] == 8
  batch_bytes = 2 * 16 * 32 * 4 // 8
  held = p.compiled["argument"] - batch_bytes  # XLA's figure: the state on each device
  assert held == pytest.approx(p.params_bytes + p.opt_bytes, rel=0.05)
  # FSDP over 8: each device holds at most 1/8 of the params + AdamW moments (fp32), plus 5%
  assert held <= p.params * 4 * 3 / 8 * 1.05
  assert p.fits
  # and the command line prints both kinds of figure, saying which is which
  cli.main(
    [
      "jaxlm",
      "plan",
      "--config",
      os.path.join(REPO, "configs", "gpt2_124m.py"),
      "--device",
      "v5p-64",
    ]
  )
  out = capsys.readouterr().out
  assert "124,439,808 parameters" in out and "analytic" in out
  assert "not compiled: the target is 32 x v5p" in out and "fits         yes" in out


def test_a_qlora_plan_counts_the_frozen_base_and_prints_one_json_object(tmp_path, capsys):
  """LoRA and QLoRA configs are planned as they train: gradients and optimizer state of the
  adapters alone, the base held quantized, and the compiled step (on the 8 CPU devices present)
  the LoRA one; `--json` prints the same plan, compiled figures included, as one object."""
  import json

  transformers = pytest.importorskip("transformers")
  from hf_testing import random_hf_model

  from jaxlm.data import tokenizers as tok_lib

  base = str(tmp_path / "tiny-llama")
  random_hf_model(transformers.LlamaConfig(
    vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
  )).save_pretrained(base)
  tok_lib.char_tokenizer("the quick brown fox").save_pretrained(base)
  c = base_config()
  c.model.update(init_from=base, scan_layers=True)
  c.data.update(seq_len=32, tokenizer=base)
  c.train.batch_size = 8
  plans = {}
  for quantize in (None, "", "int8", "nf4"):
    if quantize is not None:
      c.lora.update(rank=4, targets="all", quantize=quantize)
    plans[quantize] = plan.make_plan(c, plan.target("cpu"))
  full, lora, int8, nf4 = plans.values()
  assert full.params == lora.params == nf4.params and not full.lora
  assert lora.trainable < full.params / 10 and lora.lora.startswith("LoRA r=4 on 7 kernels")
  assert lora.grads_bytes * 10 < full.grads_bytes and lora.opt_bytes * 10 < full.opt_bytes
  assert nf4.params_bytes < int8.params_bytes < lora.params_bytes <= full.params_bytes * 1.1
  assert lora.flops_per_token < full.flops_per_token  # no weight gradients: 2 x forward
  totals = [p.compiled["total"] for p in (full, lora, int8, nf4)]
  assert totals == sorted(totals, reverse=True) and len(set(totals)) == 4, totals
  config_file = tmp_path / "qlora.py"
  config_file.write_text(
    "from jaxlm.config import base_config\n\n\ndef get_config():\n  c = base_config()\n"
    f"  c.model.update(init_from={base!r}, scan_layers=True)\n"
    f"  c.data.update(seq_len=32, tokenizer={base!r})\n  c.train.batch_size = 8\n"
    "  c.lora.update(rank=4, targets='all', quantize='nf4')\n  return c\n")
  capsys.readouterr()
  cli.main(["jaxlm", "plan", "--config", str(config_file), "--json"])
  out = json.loads(capsys.readouterr().out)
  assert out["lora"].startswith("LoRA r=4 on 7 kernels, nf4 base")  # scanned: 7 stacked
  assert set(out["compiled"]) == {"argument", "output", "temp", "alias", "total"}
  assert out["compiled"]["total"] > 0 and out["analytic"]["gradients"] < out["analytic"]["params"]
  assert out["fits"] is True and out["target"]["kind"] == "cpu"
  assert out["compiled"] == nf4.compiled and out["analytic"]["params"] == nf4.params_bytes
