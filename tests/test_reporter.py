"""Tests jaxlm/train/reporter.py, the host side of each jitted call, without training: records
every log_every steps (a stacked call's steps each), compilation left out of tokens/s and MFU,
the NaN guard stopping or counting skips, step FLOPs, and the closing summary line. End-to-end
runs through it are in test_trainer.py, test_metrics.py and test_fault_tolerance.py."""

import dataclasses
import types

import numpy as np
import pytest

from jaxlm.models.config import ModelConfig
from jaxlm.train import metrics, reporter


class _Writer:
  def __init__(self):
    self.records, self.messages = [], []

  def write(self, step, record):
    self.records.append({"step": step, **record})

  def progress(self, step, loss, tokens_per_sec, mfu=None):
    pass

  def message(self, text):
    self.messages.append(text)


class _Checkpoints:
  directory = "/runs/x/checkpoints"

  def wait(self):
    pass

  def latest_step(self):
    return 2


def _reporter(log_every=2, skip=0, peak=1e12):
  writer = _Writer()
  report = reporter.Reporter(writer, _Checkpoints(), lambda step: 1e-3 * (step + 1), log_every,
                             0, skip, peak=peak, clock=metrics.Goodput(), hfu_factor=1.5)
  return report, writer


def _metrics(losses, grad_norm=1.0):
  """A call's stacked step metrics, as the jitted train_steps returns them."""
  losses = np.asarray(losses, np.float32)
  return {"loss": losses, "grad_norm": np.full_like(losses, grad_norm),
          "rewards/margins": np.full_like(losses, 0.5)}


def test_records_every_log_every_step_and_leave_compilation_out_of_the_throughput():
  report, writer = _reporter()
  report(1, 4, _metrics([4.0, 3.5, 3.0, 2.5]), tokens=4 * 64, flops=4e9)  # compiles
  report(5, 8, _metrics([2.4, 2.3, 2.2, 2.1]), tokens=4 * 64, flops=4e9, data_wait=0.01)
  assert [r["step"] for r in writer.records] == [2, 4, 6, 8]
  first, _, timed, _ = writer.records
  assert first["loss"] == 3.5 and first["lr"] == pytest.approx(2e-3)  # the lr of step 2
  assert first["rewards/margins"] == 0.5  # an objective's own sums are logged too
  assert "time_to_first_step" in first and "tokens_per_sec" not in first
  assert sum("time_to_first_step" in r for r in writer.records) == 1
  assert timed["tokens_per_sec"] > 0 and timed["hfu"] == pytest.approx(1.5 * timed["mfu"])
  assert timed["mfu"] == pytest.approx(4e9 / (256 / timed["tokens_per_sec"]) / 1e12)
  summary = report.summary("a test device")
  assert summary["mean_tokens_per_sec"] > 0 and summary["device"] == "a test device"
  line = reporter.summary_line(8, summary)
  assert line.startswith("8 steps: time to first step") and "MFU" in line and "goodput" in line


def test_a_non_finite_loss_stops_naming_the_step_and_the_last_good_checkpoint():
  report, writer = _reporter(log_every=1)
  with pytest.raises(FloatingPointError, match=r"non-finite \{'loss': nan\} at step 3; stopping. "
                     "The last good checkpoint is step 2 in /runs/x/checkpoints"):
    report(1, 4, _metrics([3.0, 2.9, np.nan, 2.8]), tokens=256)
  assert [r["step"] for r in writer.records] == [1, 2]  # the steps before it, in its call


def test_skip_nonfinite_counts_skips_and_stops_past_n_in_a_row():
  report, writer = _reporter(log_every=1, skip=2)
  report(1, 4, _metrics([3.0, np.nan, 2.9, np.inf]), tokens=256)
  assert [r["skipped_nonfinite"] for r in writer.records] == [0, 1, 1, 2]
  with pytest.raises(FloatingPointError, match="3 non-finite losses in a row up to step 6"):
    report(5, 8, _metrics([np.nan, np.nan, 2.0, 2.0]), tokens=256)  # with step 4: 3 in a row


def test_step_flops_count_the_reference_forward_and_lora_s_missing_weight_grads():
  cfg = ModelConfig(vocab_size=128, num_layers=2, embed_dim=32, num_heads=2, max_seq_len=64)

  def flops(reference=False, lora=None, teacher=None):
    run = types.SimpleNamespace(model=types.SimpleNamespace(cfg=cfg), lora=lora,
                                mode=types.SimpleNamespace(reference=reference, teacher=teacher))
    return reporter.step_flops(run)((4, 64))

  full = flops()
  assert flops(reference=True) == pytest.approx(full * 4 / 3)  # 3 passes + 1 forward
  assert flops(lora=object()) == pytest.approx(full * 2 / 3)  # no frozen-weight gradients
  # distillation: a teacher twice the student's depth adds its forward pass, 2/3 of a student step
  teacher = types.SimpleNamespace(cfg=dataclasses.replace(cfg, num_layers=4))
  head = 2 * cfg.embed_dim * cfg.vocab_size * 4 * 64  # the LM head's forward, counted once a model
  assert flops(teacher=teacher) - full == pytest.approx(2 * (full / 3 - head) + head)
