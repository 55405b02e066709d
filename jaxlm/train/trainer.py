"""The one trainer. Every kind of run (lm, sft, dpo, mlm, finetune, distill) is set up here and goes
through one loop: a pure jitted step over a resumable batch iterator, with hooks for evaluation,
metrics, the NaN guard, checkpoints, preemption and a closing sample.

  jaxlm train --config configs/demo.py --workdir runs/demo
"""

import contextlib
import copy
import dataclasses
import functools
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
from jaxlm.data.batch import BatchIterator
from jaxlm.data.iterators import Prefetch, Stack
from jaxlm.models import heads
from jaxlm.models import lora as lora_lib
from jaxlm.train import distill, modes, objectives, optim, preemption, reporter, startup
from jaxlm.train import metrics as metrics_lib
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
    ckpt, step0 = rundir.open_run(run.config, run.workdir)
  writer = None
  try:
    with clock.timing("startup"):
      if jax.process_index() == 0:
        rundir.trim_metrics(run.workdir, step0 or 0)  # the resumed run writes them again
      writer = metrics_lib.MetricsWriter(run.workdir, run.mode.total_steps,
                                         enabled=jax.process_index() == 0,
                                         wandb_cfg=run.config.wandb, config=run.config)
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
  """The run's tokenizer: 1. the one saved in the run directory (resume), 2. model.init_from's
  (distill: the teacher's) when data.tokenizer is 'char' or empty (distill: '' alone, unless
  distill.init_layers),
  3. data.tokenizer (a directory, a hub id, or 'char': the characters of the training text)."""
  if (rundir.path(workdir) / rundir.TOKENIZER_DIR).exists():
    return rundir.load_tokenizer(workdir)
  src, name = config.model.init_from, config.data.tokenizer
  if not src and config.kind == "distill" and (config.distill.init_layers or name == ""):
    src = config.distill.teacher  # the teacher's tokenizer (its sizes, with init_layers)
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
  if per_call > 1 and config_lib.data_kind(config) == "finetune":
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
  """Resolves tokenizer, model, mesh, mode and optimizer. Writes nothing: the run directory is
  written once the state is settled; nor changes `config`: Run.config is a resolved copy (an
  imported model's fields in its model section, a PEFT adapter's settings in its lora section)."""
  config = copy.deepcopy(config)
  kind = check_kind(config)
  _Profile.parse(config.profile.steps)
  workdir = rundir.path(workdir)
  tokenizer = make_tokenizer(config, workdir)
  seq_len = config.task.max_len if config_lib.data_kind(config) == "finetune" else \
    config.data.seq_len
  if distill.from_teacher_layers(config):
    with config.unlocked():  # the student: the teacher's config with the chosen layers
      config.model.update(distill.student_config(config))
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
    """(state, shardings, data iterator state) by startup's precedence (resume > init_from >
    scratch); then the run directory records the config and tokenizer."""
    run, cfg = self.run, self.run.config
    # full-parameter DPO keeps the starting weights as its reference (with LoRA: the base)
    copy_ref = bool(run.mode and run.mode.reference) and run.lora is None
    abstract, shardings = step_lib.abstract_state(run.model, run.tx, run.mesh, run.lora,
                                                  copy_ref)

    def scratch(params=None):
      return step_lib.sharded_init(run.model, run.tx, jax.random.PRNGKey(cfg.train.seed),
                                   run.mesh, run.lora, copy_ref, shardings, params)[0]

    state, data_state = startup.initial_state(self.ckpt, step0, cfg, run.model.cfg,
                                              abstract=abstract, init=scratch,
                                              message=self.writer.message)
    if copy_ref and step0 is None:  # the starting weights (a resume restores them)
      state = state.replace(frozen=jax.tree.map(lambda x: x.copy(), state.params))
    if step0 is None and distill.from_teacher_layers(cfg):  # DistilBERT: from its layers
      state = startup.with_trainable(state, distill.layer_init_params(cfg, run.model), abstract)
      self.writer.message(f"student initialised from teacher layers "
                          f"{list(cfg.distill.init_layers)} of {cfg.distill.teacher}")
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
                                       reference=mode.reference, stacked=stacked,
                                       teacher=mode.teacher is not None)
    if mode.teacher is not None:  # the frozen teacher's params: an argument, not in the state
      train_fn = functools.partial(_with_teacher, train_fn, mode.teacher.params)
    precision = run.model.cfg.matmul_precision
    peak, device = devices.run_peak_flops(run.model.cfg.dtype, run.config.runtime.peak_flops,
                                          precision)
    report = reporter.Reporter(self.writer, self.ckpt, run.schedule, cfg_t.log_every, start,
                       cfg_t.skip_nonfinite, peak=peak, clock=self.clock,
                       hfu_factor=reporter.hfu_factor(run), first_record={
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
      self.writer.message(reporter.summary_line(step - start, summary))
    return {"step": step, **final, **summary,
            "train_seconds": time.perf_counter() - self.clock.begin}

  def loop(self, state, train_fn, batches: BatchIterator, report, meta, start: int, ends):
    """The training loop: one jitted call per item of `ends` (the last step of each; one step a
    call unless train.steps_per_call). A call's metrics are fetched while the next call runs, so
    the device never waits for the host; evaluation, checkpoints and preemption act between
    calls."""
    mode, every = self.run.mode, self.run.config.checkpoint.every
    final, pending = {}, None
    clock, flops = self.clock, reporter.step_flops(self.run)
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


def _with_teacher(train_fn, teacher_params, state, batch):
  return train_fn(state, batch, teacher_params)


def _nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
