"""The one trainer. Every kind of run (lm, sft, dpo, mlm, finetune) is set up here and goes through one
loop: a pure jitted step over a resumable batch iterator, with hooks for evaluation, metrics, the
NaN guard, checkpoints, preemption and a closing sample.

  jaxlm train --config configs/demo.py --workdir runs/demo
"""

import contextlib
import dataclasses
import functools
import math
import time

import jax
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from jaxlm import config as config_lib
from jaxlm import devices, rundir, sharding, textgen
from jaxlm import generate as gen
from jaxlm.data import sources
from jaxlm.data import tokenizers as tok_lib
from jaxlm.data.iterators import Prefetch, Stack
from jaxlm.models import heads, layers
from jaxlm.models import lora as lora_lib
from jaxlm.train import metrics as metrics_lib
from jaxlm.train import modes, objectives, optim, preemption
from jaxlm.train import step as step_lib


@dataclasses.dataclass
class Run:
  """A run resolved from its config: where it lives, its tokenizer, model, mesh, optimizer and
  mode (batches, evaluator, length)."""

  config: ml_collections.ConfigDict
  workdir: object  # etils.epath.Path
  tokenizer: object
  model: object
  mesh: jax.sharding.Mesh
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  mode: modes.Mode
  lora: lora_lib.Lora | None = None  # LoRA: the adapted kernels (None: every param trained)


def train(config, workdir) -> dict:
  """Trains as `config` says into `workdir`, resuming from its newest checkpoint if it has one.

  Returns:
    the final evaluation's metrics, the last step and `train_seconds` (wall time, compilation
    included).
  Raises:
    preemption.Preempted: after SIGTERM/SIGINT, once the checkpoint of the current step is saved.
  """
  clock = metrics_lib.Goodput()
  with clock.timing("startup"):
    run = setup(config, workdir)
    ckpt, step0 = rundir.open_run(config, run.workdir)
  writer = None
  try:
    with clock.timing("startup"):
      if jax.process_index() == 0:
        rundir.trim_metrics(run.workdir, step0 or 0)  # the resumed run writes them again
      writer = metrics_lib.MetricsWriter(run.workdir, run.mode.total_steps,
                                         enabled=jax.process_index() == 0,
                                         wandb_cfg=config.wandb, config=config)
    # float32 matmuls at the configured precision: jit reads it as it traces each program
    with preemption.PreemptionGuard() as guard, \
        jax.default_matmul_precision(run.model.cfg.matmul_precision):
      return Trainer(run, ckpt, writer, guard, clock).fit(step0)
  finally:
    ckpt.close()
    if writer is not None:
      writer.close()


def check_kind(config) -> str:
  if config.kind not in config_lib.KINDS:
    raise ValueError(f"kind={config.kind!r} is not one of {tuple(config_lib.KINDS)}")
  return config.kind


def check_model(kind: str, model_cfg) -> None:
  """A kind trains one sort of model: say so before anything is built."""
  wanted = {"lm": (True, "lm"), "sft": (True, "lm"), "dpo": (True, "lm"),
            "mlm": (False, "mlm")}.get(kind)
  if wanted and (model_cfg.causal, model_cfg.head) != wanted:
    what = "a decoder (model.causal=True, model.head='lm')" if wanted[0] else \
      "an encoder with model.causal=False and model.head='mlm'"
    raise ValueError(f"kind={kind!r} trains {what}; this model has causal={model_cfg.causal}, "
                     f"head={model_cfg.head!r} (fine-tuning an encoder on a task is "
                     "kind='finetune')")


def make_tokenizer(config, workdir):
  """The run's tokenizer: 1. the one saved in the run directory (resume), 2. model.init_from's,
  when data.tokenizer is 'char' or empty, 3. data.tokenizer (a directory, a hub id, or 'char':
  the characters of the training text)."""
  if (rundir.path(workdir) / rundir.TOKENIZER_DIR).exists():
    return rundir.load_tokenizer(workdir)
  src, name = config.model.init_from, config.data.tokenizer
  if src and name in ("char", ""):
    return rundir.init_tokenizer(src)
  if name == "char":
    return tok_lib.char_tokenizer("".join(sources.read_texts(config.data)))
  return tok_lib.load_tokenizer(name)


def check_batch(config, mesh):
  per = sharding.batch_divisor(mesh) * config.train.grad_accum
  if config.train.batch_size % per:
    raise ValueError(
      f"train.batch_size={config.train.batch_size} must be divisible by the data-parallel "
      f"size {sharding.batch_divisor(mesh)} times train.grad_accum={config.train.grad_accum}"
    )
  per_call = config.train.steps_per_call
  if per_call < 1:
    raise ValueError(f"train.steps_per_call={per_call} must be >= 1")
  if per_call > 1 and config.kind == "finetune":
    raise ValueError(f"train.steps_per_call={per_call} stacks batches of one shape, and "
                     "kind='finetune' batches vary in shape (buckets, packed rows): set "
                     "train.steps_per_call=1")


def call_ends(start: int, total: int, per_call: int, *every: int):
  """The last step of each jitted call after step `start`: `per_call` steps at a time, cut at
  the multiples of `per_call` and of each `every` (evaluations, checkpoints) and at `total`, so
  those act between calls."""
  cuts = [e for e in (per_call, *every) if e > 0]
  step = start
  while step < total:
    step = min([total] + [(step // e + 1) * e for e in cuts])
    yield step


def _optimizer(config, total_steps: int):
  """The optimizer and its schedule; with train.skip_nonfinite=N, updates from non-finite
  gradients are dropped (up to N in a row)."""
  tx, schedule = optim.make_optimizer(config.optim, total_steps)
  skip = config.train.skip_nonfinite
  if skip < 0:
    raise ValueError(f"train.skip_nonfinite={skip} must be >= 0 (0: stop at NaN/Inf)")
  return (optax.apply_if_finite(tx, skip) if skip else tx), schedule


def setup(config, workdir, *, with_data: bool = True) -> Run:
  """Resolves tokenizer, model (recording an imported model's fields in config.model), mesh,
  mode and optimizer. Writes nothing: the run directory is written once the state is settled."""
  kind = check_kind(config)
  _Profile.parse(config.profile.steps)
  workdir = rundir.path(workdir)
  tokenizer = make_tokenizer(config, workdir)
  seq_len = config.task.max_len if kind == "finetune" else config.data.seq_len
  model_cfg = rundir.resolve_model_config(config, tokenizer, seq_len)
  check_model(kind, model_cfg)
  with config.unlocked():
    config.model.update(model_cfg.to_dict())  # init_from stays: it says where weights came from
  mesh = sharding.make_mesh(config.mesh)
  check_batch(config, mesh)
  model = heads.build_model(model_cfg)
  lora = make_lora(config, model)
  mode = None
  if with_data:
    params_shardings = jax.tree.map(lambda a: a.sharding, rundir.abstract_params(model, mesh))
    mode = modes.build(config, tokenizer, model, mesh, params_shardings)
  tx, schedule = _optimizer(config, mode.total_steps if mode else max(config.train.steps, 1))
  return Run(config, workdir, tokenizer, model, mesh, tx, schedule, mode, lora)


def make_lora(config, model) -> lora_lib.Lora | None:
  """The run's Lora when lora.rank > 0 (None otherwise). A PEFT adapter named by
  lora.init_adapter sets rank, alpha, rslora and targets (recorded in the config); a task head
  new to the imported encoder is trained in full beside the adapters."""
  if not config.lora.rank and not config.lora.init_adapter:
    return None
  if config.lora.init_adapter:
    from jaxlm.hf import adapters

    with config.unlocked():
      config.lora.update(adapters.adapter_settings(config.lora.init_adapter, model.cfg,
                                               config.model.init_from))
  return lora_lib.for_model(config, model)


class Trainer:
  """The loop and its hooks over a set-up Run."""

  def __init__(self, run: Run, ckpt, writer, guard, clock: metrics_lib.Goodput | None = None):
    self.run, self.ckpt, self.writer, self.guard = run, ckpt, writer, guard
    self.clock = clock or metrics_lib.Goodput()
    self.profile = _Profile(run.config.profile.steps, run.workdir)
    merged = None
    if run.lora is not None:  # placed as the evaluator's jit expects the params
      merged = jax.tree.map(lambda a: a.sharding, rundir.abstract_params(run.model, run.mesh))
    self._merge = jax.jit(lambda state: state.model_params(), out_shardings=merged)

  def model_params(self, state):
    """The params the model applies (LoRA: the adapters merged into the frozen base)."""
    return state.params if state.lora is None else self._merge(state)

  def parameter_summary(self, state) -> str:
    """'N parameters', or with LoRA the trainable share and the optimizer state's bytes against
    a full fine-tune's."""
    n_train = sum(x.size for x in jax.tree.leaves(state.params))
    if state.lora is None:
      return f"{n_train:,} parameters"
    full = jax.eval_shape(self._merge, state)
    n_full = sum(x.size for x in jax.tree.leaves(full))
    opt_bytes = _nbytes(state.opt_state)
    full_opt_bytes = _nbytes(jax.eval_shape(self.run.tx.init, full))
    return (f"LoRA r={state.lora.rank} on {len(state.lora.targets)} kernels: {n_train:,} trainable "
            f"parameters ({100 * n_train / n_full:.2f}% of {n_full:,}); optimizer state "
            f"{opt_bytes / 2**20:.2f} MiB ({100 * opt_bytes / max(full_opt_bytes, 1):.2f}% of a "
            f"full fine-tune's {full_opt_bytes / 2**20:.2f} MiB)")

  def start_state(self, step0: int | None):
    """(state, shardings, data iterator state) by rundir's precedence (resume > init_from >
    scratch); then the run directory records the config and tokenizer."""
    run, cfg = self.run, self.run.config
    # full-parameter DPO keeps the starting weights as its reference (with LoRA: the base)
    copy_ref = bool(run.mode and run.mode.reference) and run.lora is None
    abstract, shardings = step_lib.abstract_state(run.model, run.tx, run.mesh, run.lora,
                                                  copy_ref)

    def scratch():
      return step_lib.sharded_init(run.model, run.tx, jax.random.PRNGKey(cfg.train.seed),
                                   run.mesh, run.lora, copy_ref, shardings)[0]

    state, data_state = rundir.initial_state(self.ckpt, step0, cfg, run.model.cfg,
                                             abstract=abstract, init=scratch,
                                             message=self.writer.message)
    if copy_ref and step0 is None:  # the starting weights (a resume restores them)
      state = state.replace(frozen=jax.tree.map(lambda x: x.copy(), state.params))
    if jax.process_index() == 0:
      rundir.write_config(run.workdir, cfg)
      if not (run.workdir / rundir.TOKENIZER_DIR).exists():
        rundir.save_tokenizer(run.workdir, run.tokenizer)
    return state, shardings, data_state

  def fit(self, step0: int | None) -> dict:
    """Steps from the state's step to mode.total_steps; returns the final metrics."""
    run, mode, cfg_t = self.run, self.run.mode, self.run.config.train
    with self.clock.timing("startup"):
      state, shardings, data_state = self.start_state(step0)
      start = int(jax.device_get(state.step))
      if data_state is not None:
        mode.batches.set_state(data_state)
      else:  # a checkpoint without an iterator state: replay the deterministic stream to `start`
        for _ in range(start):
          next(mode.batches)
    stacked = cfg_t.steps_per_call > 1  # each call's steps' batches as one [steps, rows, ...]
    ends = functools.partial(call_ends, start, mode.total_steps, cfg_t.steps_per_call,
                             mode.eval_every, run.config.checkpoint.every)
    source = Stack(mode.batches, np.diff([start, *ends()])) if stacked else mode.batches
    # batches placed on the devices in a background thread; get_state() stays exact
    batches = Prefetch(source, lambda b: sharding.global_batch(b, run.mesh, stacked),
                       size=1 if stacked else 2)  # a stacked call's batch is K steps' batches
    self.writer.bar.reset(mode.total_steps)
    self.writer.bar.update(start)
    self.writer.message(f"{run.config.kind}: {self.parameter_summary(state)}; mesh "
                        f"{dict(run.mesh.shape)}; {mode.summary}")
    objective = mode.objective or objectives.for_head(run.model.cfg.head)
    train_fn = step_lib.jit_train_step(shardings, objective, grad_accum=cfg_t.grad_accum,
                                       dropout=run.model.cfg.dropout > 0,
                                       reference=mode.reference, stacked=stacked)
    precision = run.model.cfg.matmul_precision
    peak, device = devices.run_peak_flops(run.model.cfg.dtype, run.config.runtime.peak_flops,
                                          precision)
    report = _Reporter(self.writer, self.ckpt, run.schedule, cfg_t.log_every, start,
                       cfg_t.skip_nonfinite, peak=peak, clock=self.clock,
                       hfu_factor=_hfu_factor(run), first_record={
                         "matmul_precision": precision,
                         "peak_flops_per_device": peak / jax.device_count()})
    if cfg_t.skip_nonfinite:  # the count so far lives in optax.apply_if_finite's state
      report.skipped = int(jax.device_get(state.opt_state.total_notfinite))
    meta = rundir.checkpoint_meta(run.config, run.tokenizer,
                                  run.config.model.init_from or run.config.data.tokenizer)
    final = {}
    with sharding.mesh_rules(run.mesh), contextlib.closing(batches):
      if start == 0 and mode.eval_at_start:  # the imported model's score, before training
        self.evaluate(state, 0, "(imported weights)")
      state, final = self.loop(state, train_fn, batches, report, meta, start, ends())
      if not final:  # no evaluation since the last start (e.g. resumed at the end)
        final = self.evaluate(state, int(jax.device_get(state.step)))
    with self.clock.timing("checkpoint"):
      self.ckpt.wait()
    with self.clock.timing("sample"):
      self.sample(self.model_params(state))
    step = int(jax.device_get(state.step))
    summary = report.summary(device)
    if summary:
      self.writer.write(step, summary)
      self.writer.message(_summary_line(step - start, summary))
    return {"step": step, **final, **summary,
            "train_seconds": time.perf_counter() - self.clock.begin}

  def loop(self, state, train_fn, batches, report, meta, start: int, ends):
    """The training loop: one jitted call per item of `ends` (the last step of each; one step a
    call unless train.steps_per_call). A call's metrics are fetched while the next call runs, so
    the device never waits for the host; evaluation, checkpoints and preemption act between
    calls."""
    mode, every = self.run.mode, self.run.config.checkpoint.every
    final, pending = {}, None
    clock, flops = self.clock, _step_flops(self.run)
    first = start + 1
    for calls, step in enumerate(ends, 1):  # this call runs steps first..step
      wait_start = time.perf_counter()  # the previous call runs on the device meanwhile
      batch = next(batches, None)
      data_wait = time.perf_counter() - wait_start
      clock.add("data", data_wait)
      if batch is None:
        raise ValueError(f"the data ran out at step {first} of {mode.total_steps}"
                         + (f" (in the call of steps {first}-{step})" if step > first else ""))
      self.profile.before(first, step)
      with clock.timing("step"):
        state, step_metrics = train_fn(state, batch)
        if pending is not None:
          report(*pending, data_wait)
      pending = (first, step, step_metrics, batch.inputs.size, flops(batch.inputs.shape))
      first = step + 1
      evaluated = None
      if step % mode.eval_every == 0 or step == mode.total_steps:
        final = evaluated = self.evaluate(state, step)
      stop = self.guard.should_stop(start + calls)  # a counter of calls, the same on all hosts
      if stop or evaluated is not None or step % every == 0 or step == mode.total_steps:
        with clock.timing("step"):
          report(*pending)  # never save a state whose step was not finite
        pending = None
        with clock.timing("checkpoint"):
          self.ckpt.save(step, state, batches.get_state(), meta, evaluated or None)
      self.profile.after(step, state)
      if stop:
        self.guard.stop(self.ckpt, step)
    if pending is not None:
      with clock.timing("step"):
        report(*pending)
    self.profile.close()
    return state, final

  def evaluate(self, state, step: int, note: str = "") -> dict:
    """Scores the state's model params (the mode's evaluator; DPO's also reads the reference),
    logs the record and a line."""
    with self.clock.timing("eval"):
      reference = state.reference_params() if self.run.mode.reference else None
      scores = self.run.mode.evaluate(self.model_params(state), reference)
    if scores:
      prefix = self.run.mode.record_prefix
      self.writer.write(step, {f"{prefix}{k}": v for k, v in scores.items()})
      self.writer.message(f"step {step}{' ' + note if note else ''}: "
                          + " ".join(f"{prefix}{k} {v:.4f}" for k, v in scores.items()))
    return scores

  def sample(self, params):
    """The closing text sample (decoders, when sample.max_new_tokens > 0), printed by process 0;
    on several processes the params are gathered to process 0's first device for it."""
    c = self.run.config.sample
    if c.max_new_tokens <= 0 or not self.run.model.cfg.causal:
      return
    if jax.process_count() > 1:  # every process joins the gather; process 0 samples on its device
      params = multihost_utils.process_allgather(params, tiled=True)
      if jax.process_index():
        return
      params = jax.device_put(params, jax.local_devices()[0])
    sampler = gen.Sampler(c.temperature, c.top_k, c.top_p)
    text = textgen.complete(self.run.model, params, self.run.tokenizer, [c.prompt],
                            max_new_tokens=c.max_new_tokens, sampler=sampler, seed=c.seed)[0]
    print(c.prompt + text, flush=True)


class _Reporter:
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
      timing.pop("time_to_first_step", None)  # the first record of the run has them, once
      timing.pop("compile_seconds", None)
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


def _step_flops(run: Run):
  """FLOPs of a training step over a batch of `shape` [B, T]: model FLOPs per token (causal
  attention counted as half) times the tokens. A LoRA run computes no gradients of its frozen
  weights; DPO with a reference model adds the reference's forward pass."""
  cfg, cache = run.model.cfg, {}
  reference = bool(run.mode and run.mode.reference)

  def flops(shape) -> float:
    if shape not in cache:
      per_token = devices.model_flops_per_token(cfg, shape[-1], weight_grads=run.lora is None)
      if reference:
        per_token += devices.model_flops_per_token(cfg, shape[-1], training=False)
      cache[shape] = per_token * math.prod(shape)
    return cache[shape]

  return flops


def _hfu_factor(run: Run) -> float:
  """Hardware over model FLOPs of the run's steps (devices.hardware_flops_per_token: what the
  remat policy recomputes, all T x T scores under XLA's attention, a merged LoRA's full kernel
  gradients), at the run's sequence length (finetune: task.max_len, the longest bucket)."""
  cfg, config = run.model.cfg, run.config
  seq_len = config.task.max_len if config.kind == "finetune" else config.data.seq_len
  trained = None if run.lora is None else [t.path for t in run.lora.targets] + list(run.lora.full)
  # the kernel a batch of the run gets: packed rows carry segment ids (sft, dpo and finetune
  # pack; lm and mlm when data.packing is not "none")
  packed = config.kind in ("sft", "dpo", "finetune") or config.data.packing != "none"
  hardware = devices.hardware_flops_per_token(
    cfg, seq_len, attention=layers.attention_impl(cfg, seq_len, packed), trained=trained,
    reference=bool(run.mode and run.mode.reference))
  return hardware * seq_len / _step_flops(run)((1, seq_len))


def _summary_line(steps: int, s: dict) -> str:
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


class _Profile:
  """profile.steps="A-B": a JAX profiler trace of steps A to B (of the calls holding them, with
  train.steps_per_call) in WORKDIR/profile (process 0), for TensorBoard's profile plugin or
  Perfetto."""

  def __init__(self, steps: str, workdir):
    self.first, self.last = self.parse(steps)
    self.active = False
    self.directory = str(rundir.path(workdir) / "profile")

  @staticmethod
  def parse(steps: str) -> tuple:
    """(first, last) of "A-B" or "A"; (None, None) for ""."""
    if not steps:
      return None, None
    try:
      first, _, last = str(steps).partition("-")
      first, last = int(first), int(last or first)
    except ValueError:
      raise ValueError(f"profile.steps={steps!r} is not a step range like '10-12'") from None
    if not 1 <= first <= last:
      raise ValueError(f"profile.steps={steps!r}: want 1 <= first <= last")
    return first, last

  def before(self, first: int, last: int):
    """Steps first..last are about to run (one call)."""
    if self.first is not None and first <= self.first <= last and jax.process_index() == 0:
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after(self, last: int, state):
    if self.active and last >= self.last:
      jax.block_until_ready(state)  # the trace holds the steps' device work
      self.close()

  def close(self):
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
def _nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def convert_from_hf(src: str, workdir) -> str:
  """Makes `workdir` a jaxlm run directory (config.json, tokenizer/, a step-0 checkpoint) holding
  the HF checkpoint `src`, so `jaxlm generate`, `jaxlm convert --to-hf` and
  `model.init_from=WORKDIR` work on it."""
  p = rundir.path(workdir)
  if (p / rundir.CHECKPOINT_DIR).exists():
    raise ValueError(f"{p} already holds checkpoints; convert into a new directory")
  config = config_lib.base_config()
  stored = rundir.init_model_config(src, {})
  config.kind = "lm" if stored.causal else ("mlm" if stored.head == "mlm" else "finetune")
  config.model.update(head=stored.head, num_labels=stored.num_labels, init_from=src)
  config.data.seq_len = min(config.data.seq_len, stored.max_seq_len)
  config.train.batch_size = jax.device_count()
  config.optim.name, config.optim.b1 = "sgd", 0.0  # plain SGD keeps no optimizer state
  run = setup(config, p, with_data=False)
  ckpt = rundir.open_checkpoints(config, p)
  try:
    quiet = metrics_lib.MetricsWriter(p, 0, enabled=False)
    state, _, _ = Trainer(run, ckpt, quiet, None).start_state(None)
    ckpt.save(0, state, meta=rundir.checkpoint_meta(config, run.tokenizer, src))
    ckpt.wait()
  finally:
    ckpt.close()
  return str(p)


def evaluate_run(workdir, split: str = "dev") -> dict:
  """Scores the newest checkpoint of the run in `workdir` with its kind's evaluator: the task's
  metrics on `split` for finetune runs, the eval loss for language models (`jaxlm eval`)."""
  config = rundir.read_config(workdir)
  mesh = sharding.make_mesh(config.mesh)
  saved, params = rundir.load_run(workdir, mesh=mesh)
  shardings = jax.tree.map(lambda x: x.sharding, params)
  mode = modes.build(config, saved.tokenizer, saved.model, mesh, shardings,
                     eval_split=split if config.kind == "finetune" else None, train=False)
  with sharding.mesh_rules(mesh):
    return mode.evaluate(params)
