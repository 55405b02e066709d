"""The host side of the training loop: after each jitted call the NaN guard, the progress bar and
a metrics record (tokens/s, MFU, goodput) every `train.log_every` steps; the closing figures."""

import math
import time

import jax
import numpy as np

from jaxlm import config as config_lib
from jaxlm import devices
from jaxlm.models import layers
from jaxlm.train import metrics as metrics_lib


class Reporter:
  """Host side of each step: NaN guard, progress bar, and a metrics record every `log_every`."""

  def __init__(self, writer, ckpt, schedule, log_every, start_step, skip_nonfinite: int = 0, *,
               peak: float = 0.0, clock: metrics_lib.Goodput | None = None,
               hfu_factor: float = 1.0, first_record: dict | None = None):
    """`peak`: FLOP/s of all the run's devices (0: unknown, no MFU); `clock`: the run's
    Goodput, for time to first step and the running goodput; `first_record`: figures the first
    step record written carries (the matmul precision and peak MFU is measured against)."""
    self.writer, self.ckpt, self.log_every = writer, ckpt, log_every
    self.schedule = jax.jit(schedule)  # one small program, not a dozen eager ops each compiled
    self.start_step, self.window = start_step, (start_step, time.perf_counter())
    self.skip_nonfinite, self.skipped, self.skipped_in_row = skip_nonfinite, 0, 0
    self.peak, self.clock, self.hfu_factor = peak, clock or metrics_lib.Goodput(), hfu_factor
    self.first_record = dict(first_record or {})
    self.data_wait, self.tokens, self.flops = 0.0, 0, 0.0  # since the window started
    self.total = {"tokens": 0, "flops": 0.0, "seconds": 0.0}  # since the first step's end
    self.first_step_seconds = None
    # the lengths of the calls so far (a new one compiles: out of the throughput), when the last
    # ended, and the last tokens/s and MFU shown
    self.call_lengths, self.call_end, self.rate = set(), None, (0.0, None)

  def __call__(self, first: int, last: int, step_metrics, tokens: int, flops: float = 0.0,
               data_wait: float = 0.0):
    """Steps `first`..`last` (one jitted call) ran: `step_metrics` are theirs (stacked over the
    steps, or one step's scalars); `tokens`, `flops`: the call's batch in tokens and its model
    FLOPs; `data_wait`: seconds just spent getting a batch (since the previous call)."""
    fetched = {k: np.atleast_1d(v) for k, v in jax.device_get(step_metrics).items()}
    rows = [{k: float(v[i]) for k, v in fetched.items()} for i in range(last - first + 1)]
    now, previous = time.perf_counter(), self.call_end
    self.call_end = now
    timing = {}
    if first == self.start_step + 1:  # leave compilation out of the throughput
      self.first_step_seconds = now - self.clock.begin
      timing["time_to_first_step"] = self.first_step_seconds
      timing["first_step_unix_time"] = time.time()  # to time a whole process from its launch
      timing["compile_seconds"] = self.clock.compiled()["seconds"]
      self.window, self.data_wait, self.tokens, self.flops = (last, now), 0.0, 0, 0.0
    elif len(rows) not in self.call_lengths:  # a call of a new length compiled its program
      self._close_window(first - 1, previous)
      self.window = (last, now)
      self.writer.progress(last, rows[-1]["loss"], *self.rate)
    else:
      self.data_wait += data_wait
      self.tokens += tokens
      self.flops += flops
      last_step, last_time = self.window
      elapsed = max(now - last_time, 1e-9)
      timing["tokens_per_sec"] = self.tokens / elapsed
      timing["data_wait_ms"] = 1e3 * self.data_wait / max(last - last_step, 1)
      timing["data_wait_frac"] = self.data_wait / elapsed
      if self.peak:
        timing["mfu"] = self.flops / elapsed / self.peak
        timing["hfu"] = timing["mfu"] * self.hfu_factor
      self.rate = (timing["tokens_per_sec"], timing.get("mfu"))
      self.writer.progress(last, rows[-1]["loss"], *self.rate)
    self.call_lengths.add(len(rows))
    logged = {step for step in range(first, last + 1) if step % self.log_every == 0}
    if logged and "tokens_per_sec" in timing:
      timing["goodput"] = self.clock.summary()["goodput"]
    for step, values in enumerate(rows, first):  # in order: a bad step stops after those before
      self._guard(step, values)
      if step not in logged:
        continue
      record = {"loss": values["loss"], "lr": float(self.schedule(step - 1)),
                "grad_norm": values["grad_norm"],
                **{k: v for k, v in values.items() if "/" in k}}  # an objective's own (DPO's)
      if self.skip_nonfinite:
        record["skipped_nonfinite"] = self.skipped
      self.writer.write(step, {**record, **timing, **self.first_record})
      self.first_record = {}
      for once in ("time_to_first_step", "first_step_unix_time", "compile_seconds"):
        timing.pop(once, None)  # the first record of the run has them, once
    if logged:
      self._close_window(last, now)

  def _close_window(self, step: int, now: float):
    last_step, last_time = self.window
    if step > self.start_step + 1 and last_step > self.start_step:
      self.total["tokens"] += self.tokens
      self.total["flops"] += self.flops
      self.total["seconds"] += now - last_time
    self.window, self.data_wait, self.tokens, self.flops = (step, now), 0.0, 0, 0.0

  def summary(self, device: str) -> dict:
    """The run's closing figures: mean tokens/s and MFU over its steps (the first, which
    compiles, left out), compile seconds, time to first step, goodput and where the rest went."""
    if self.first_step_seconds is None:
      return {}
    self._close_window(self.window[0] + 1, time.perf_counter())
    compiled = self.clock.compiled()
    out = {"time_to_first_step": self.first_step_seconds, "compile_seconds": compiled["seconds"],
           "xla_compiles": compiled["xla_compiles"],
           "compile_cache_hits": compiled["cache_hits"], **self.clock.summary()}
    seconds = self.total["seconds"]
    if seconds > 0:
      out["mean_tokens_per_sec"] = self.total["tokens"] / seconds
      if self.peak:
        out["mean_mfu"] = self.total["flops"] / seconds / self.peak
        out["mean_hfu"] = out["mean_mfu"] * self.hfu_factor
    out["device"] = device
    return out

  def _guard(self, step: int, values: dict):
    """Stops on a non-finite loss, or counts it when skipping (optax.apply_if_finite)."""
    finite = math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])
    if finite:
      self.skipped_in_row = 0
      return
    if not self.skip_nonfinite:
      bad = {k: values[k] for k in ("loss", "grad_norm") if not math.isfinite(values[k])}
      self._stop(f"non-finite {bad} at step {step}; stopping", "lower optim.lr, raise "
                 "optim.warmup_steps, or set train.skip_nonfinite=N to skip up to N such "
                 "batches in a row")
    self.skipped += 1
    self.skipped_in_row += 1
    if self.skipped_in_row > self.skip_nonfinite:
      self._stop(f"{self.skipped_in_row} non-finite losses in a row up to step {step} (more "
                 f"than train.skip_nonfinite={self.skip_nonfinite}); stopping", "")
    self.writer.message(f"step {step}: non-finite loss, update skipped ({self.skipped} so far)")

  def _stop(self, what: str, advice: str):
    self.ckpt.wait()
    raise FloatingPointError(
      f"{what}. The last good checkpoint is step {self.ckpt.latest_step()} in "
      f"{self.ckpt.directory}" + (f" ({advice})" if advice else ""))


def step_flops(run):
  """For `run` (a trainer.Run), the FLOPs of a training step over a batch of `shape` [B, T]:
  model FLOPs per token (causal attention counted as half) times the tokens. A LoRA run computes
  no gradients of its frozen weights; DPO with a reference model adds the reference's forward
  pass, and distillation its teacher's forward pass."""
  cfg, cache = run.model.cfg, {}
  reference = bool(run.mode and run.mode.reference)
  teacher = run.mode.teacher.cfg if run.mode and run.mode.teacher is not None else None

  def flops(shape) -> float:
    if shape not in cache:
      per_token = devices.model_flops_per_token(cfg, shape[-1], weight_grads=run.lora is None)
      if reference:
        per_token += devices.model_flops_per_token(cfg, shape[-1], training=False)
      if teacher is not None:
        per_token += devices.model_flops_per_token(teacher, shape[-1], training=False)
      cache[shape] = per_token * math.prod(shape)
    return cache[shape]

  return flops


def hfu_factor(run) -> float:
  """Hardware over model FLOPs of the steps of `run` (a trainer.Run), by
  devices.hardware_flops_per_token: what the remat policy recomputes, all T x T scores under XLA's
  attention, LoRA's gradients reaching the adapters without weight gradients of the frozen
  kernels; at the run's sequence length (finetune: task.max_len, the longest bucket)."""
  cfg, config = run.model.cfg, run.config
  kind = config_lib.data_kind(config)
  seq_len = config.task.max_len if kind == "finetune" else config.data.seq_len
  trained = None if run.lora is None else run.lora.trained_paths()
  # the kernel a batch of the run gets: packed rows carry segment ids (sft, dpo and finetune
  # pack; lm and mlm when data.packing is not "none")
  packed = kind in ("sft", "dpo", "finetune") or config.data.packing != "none"
  hardware = devices.hardware_flops_per_token(
    cfg, seq_len, attention=layers.attention_impl(cfg, seq_len, packed), trained=trained,
    reference=bool(run.mode and run.mode.reference))
  if run.mode and run.mode.teacher is not None:  # the teacher's forward pass, as model FLOPs
    hardware += devices.model_flops_per_token(run.mode.teacher.cfg, seq_len, training=False)
  return hardware * seq_len / step_flops(run)((1, seq_len))


def summary_line(steps: int, s: dict) -> str:
  line = f"{steps} steps: time to first step {s['time_to_first_step']:.1f} s"
  if "mean_tokens_per_sec" in s:
    line += f", {s['mean_tokens_per_sec']:,.0f} tokens/s"
  if "mean_mfu" in s:
    line += f", MFU {100 * s['mean_mfu']:.1f}% of {s['device']}"
  spent = ", ".join(f"{b} {100 * s[b + '_frac']:.0f}%" for b in metrics_lib.Goodput.BUCKETS
                    if s[b + "_frac"] >= 0.005)
  return (f"{line}; goodput {100 * s['goodput']:.0f}% of {s['wall_seconds']:.0f} s wall "
          f"(compile {s['compile_seconds']:.1f} s: {s['xla_compiles']} programs compiled, "
          f"{s['compile_cache_hits']} loaded from the cache; {spent})")
