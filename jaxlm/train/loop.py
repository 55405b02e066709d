"""The training loop: sharded steps, eval, metrics, checkpoints and a closing text sample."""

import contextlib
import math
import time

import jax

from jaxlm import generate, sharding, textgen
from jaxlm.data.iterators import Prefetch
from jaxlm.train import metrics as metrics_lib, preemption, resume, run as run_lib
from jaxlm.train import step as step_lib


def _device_batch(local: dict, mesh) -> dict:
  """Assembles each process's rows into global arrays sharded over (data, fsdp)."""
  shard = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(shard, v) for k, v in local.items()}


def evaluate(run, params, eval_fn, batches) -> dict:
  """Mean token loss and perplexity over fixed validation batches."""
  # fetched one by one: on CPU, many queued multi-device programs can stall XLA's collectives
  sums = [jax.device_get(eval_fn(params, _device_batch(b, run.mesh))) for b in batches]
  loss = sum(float(s["loss_sum"]) for s in sums) / max(sum(float(s["weight"]) for s in sums), 1)
  return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}


def _check_finite(step: int, values: dict, ckpt):
  bad = {k: float(values[k]) for k in ("loss", "grad_norm") if not math.isfinite(values[k])}
  if bad:
    ckpt.wait()
    raise FloatingPointError(
      f"non-finite {bad} at step {step}; stopping. The last good checkpoint is step "
      f"{ckpt.latest_step()} in {ckpt.directory} (lower optim.lr, raise optim.warmup_steps, or "
      "set train.skip_nonfinite=N to skip up to N such batches in a row)"
    )


def train(config, workdir: str) -> dict:
  """Trains as `config` says, writing everything into `workdir`. Returns the final metrics.

  Raises:
    preemption.Preempted: after SIGTERM/SIGINT, once the checkpoint of the current step is saved.
  """
  docs = run_lib.raw_documents(config)
  run = run_lib.build(config, workdir, docs)
  cfg_t = config.train
  ckpt, step0 = resume.start(config, workdir)
  writer = metrics_lib.MetricsWriter(workdir, cfg_t.steps, enabled=jax.process_index() == 0)
  try:
    with preemption.PreemptionGuard() as guard:
      return _train_loop(run, docs, ckpt, writer, guard, step0)
  finally:
    ckpt.close()
    writer.close()


def _train_loop(run, docs, ckpt, writer, guard, step0) -> dict:
  config, cfg_t = run.config, run.config.train
  state, shardings, data_state = resume.restore_or_init(run, ckpt, step0, writer)
  start = int(jax.device_get(state.step))
  # a checkpoint without an iterator state (none saved yet) replays the stream to `start`
  data = run_lib.load_data(config, run.tokenizer, docs, start if data_state is None else 0)
  writer.bar.reset(cfg_t.steps)
  writer.bar.update(start)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  writer.message(f"model: {n_params:,} parameters; mesh {dict(run.mesh.shape)}; "
                 f"{data.summary}")

  train_fn = step_lib.jit_train_step(shardings, run.mesh, grad_accum=cfg_t.grad_accum,
                                     dropout=config.model.dropout > 0)
  eval_fn = step_lib.jit_eval_step(run.model.apply, shardings.params, run.mesh)
  eval_batches = data.eval_batches
  # batches placed on the devices in a background thread; get_state() stays exact
  train_batches = Prefetch(data.train, lambda b: _device_batch(b, run.mesh), size=2)
  if data_state is not None:
    train_batches.set_state(data_state)
  if start == 0 and config.model.get("init_from"):  # the imported model's eval loss, before
    with sharding.mesh_rules(run.mesh):
      initial = evaluate(run, state.params, eval_fn, eval_batches)
    writer.write(0, initial)
    writer.message(f"step 0 (imported weights): eval_loss {initial['eval_loss']:.4f}")
  report = _Reporter(writer, ckpt, run.schedule, cfg_t.batch_size * config.data.seq_len,
                     cfg_t.log_every, start, cfg_t.skip_nonfinite)
  if cfg_t.skip_nonfinite:  # the count so far lives in optax.apply_if_finite's state
    report.skipped = int(jax.device_get(state.opt_state.total_notfinite))
  meta = resume.checkpoint_meta(run.config, run.tokenizer, run.config.data.tokenizer)
  final, step, pending = {}, start, None
  with sharding.mesh_rules(run.mesh), contextlib.closing(train_batches):
    for step in range(start + 1, cfg_t.steps + 1):
      wait_start = time.perf_counter()  # the previous step runs on the device meanwhile
      batch = next(train_batches, None)
      data_wait = time.perf_counter() - wait_start
      if batch is None:
        raise ValueError(f"the data iterator ran out at step {step} of train.steps={cfg_t.steps}")
      state, step_metrics = train_fn(state, batch)
      if pending is not None:  # fetch the previous step's metrics while this one runs
        report(*pending, data_wait)
      pending = (step, step_metrics)
      evaluated = None
      if step % cfg_t.eval_every == 0 or step == cfg_t.steps:
        final = evaluated = evaluate(run, state.params, eval_fn, eval_batches)
        writer.write(step, final)
        writer.message(f"step {step}: eval_loss {final['eval_loss']:.4f} "
                       f"ppl {final['eval_ppl']:.2f}")
      stop = guard.should_stop(step)
      if stop or step % config.checkpoint.every == 0 or step == cfg_t.steps:
        report(*pending)  # never save a state whose step was not finite
        pending = None
        ckpt.save(step, state, train_batches.get_state(), meta, evaluated)
      if stop:
        guard.stop(ckpt, step)
    if pending is not None:
      report(*pending)
  ckpt.wait()
  if jax.process_index() == 0 and config.sample.max_new_tokens > 0:
    print(sample_text(run, state.params, config.sample), flush=True)
  return {"step": step, **final}


class _Reporter:
  """Host side of each step: NaN guard, progress bar, and a metrics record every `log_every`."""

  def __init__(self, writer, ckpt, schedule, tokens_per_step, log_every, start_step,
               skip_nonfinite: int = 0):
    self.writer, self.ckpt, self.schedule = writer, ckpt, schedule
    self.tokens_per_step, self.log_every = tokens_per_step, log_every
    self.start_step, self.window = start_step, (start_step, time.perf_counter())
    self.skip_nonfinite, self.skipped, self.skipped_in_row = skip_nonfinite, 0, 0
    self.data_wait = 0.0  # seconds the host waited for batches since the window started

  def __call__(self, step: int, step_metrics, data_wait: float = 0.0):
    """`data_wait`: seconds just spent getting a batch (since the previous call)."""
    values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
    self._guard(step, values)
    now = time.perf_counter()
    record = {"loss": values["loss"], "lr": float(self.schedule(step - 1)),
              "grad_norm": values["grad_norm"]}
    if self.skip_nonfinite:
      record["skipped_nonfinite"] = self.skipped
    if step == self.start_step + 1:  # leave compilation out of the throughput
      self.window, self.data_wait = (step, now), 0.0
    else:
      self.data_wait += data_wait
      last_step, last_time = self.window
      elapsed = max(now - last_time, 1e-9)
      record["tokens_per_sec"] = self.tokens_per_step * (step - last_step) / elapsed
      record["data_wait_ms"] = 1e3 * self.data_wait / max(step - last_step, 1)
      record["data_wait_frac"] = self.data_wait / elapsed
      self.writer.progress(step, values["loss"], record["tokens_per_sec"])
    if step % self.log_every == 0:
      self.writer.write(step, record)
      self.window, self.data_wait = (step, now), 0.0

  def _guard(self, step: int, values: dict):
    """Stops on a non-finite loss, or counts it when skipping (optax.apply_if_finite)."""
    finite = math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])
    if finite or not self.skip_nonfinite:
      self.skipped_in_row = 0
      _check_finite(step, values, self.ckpt)
      return
    self.skipped += 1
    self.skipped_in_row += 1
    if self.skipped_in_row > self.skip_nonfinite:
      self.ckpt.wait()
      raise FloatingPointError(
        f"{self.skipped_in_row} non-finite losses in a row up to step {step} (more than "
        f"train.skip_nonfinite={self.skip_nonfinite}); stopping. The last good checkpoint is "
        f"step {self.ckpt.latest_step()} in {self.ckpt.directory}")
    self.writer.message(f"step {step}: non-finite loss, update skipped ({self.skipped} so far)")


def sample_text(run, params, sample_cfg) -> str:
  """A text sample from `params`, continuing `sample_cfg.prompt`."""
  sampler = generate.Sampler(sample_cfg.temperature, sample_cfg.top_k, sample_cfg.top_p)
  text = textgen.complete(run.model, params, run.tokenizer, [sample_cfg.prompt],
                          max_new_tokens=sample_cfg.max_new_tokens, sampler=sampler,
                          seed=sample_cfg.seed)[0]
  return sample_cfg.prompt + text
