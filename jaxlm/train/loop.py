"""The training loop: sharded steps, eval, metrics, checkpoints and a closing text sample."""

import math
import os
import time

import jax

from jaxlm import checkpoint, generate, sharding
from jaxlm.data import text
from jaxlm.data.iterators import background
from jaxlm.train import metrics as metrics_lib, run as run_lib, step as step_lib


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


def restore_or_init(run, ckpt, writer):
  """Resumes from the newest checkpoint in the run directory, or initialises a fresh state."""
  latest = ckpt.latest_step()
  if latest is None:
    return run.init_state()
  abstract, shardings = run.abstract_state()
  writer.message(f"resuming from checkpoint step {latest} in {ckpt.directory}")
  return ckpt.restore(latest, abstract), shardings


def _check_finite(step: int, loss: float, ckpt):
  if not math.isfinite(loss):
    ckpt.wait()
    raise FloatingPointError(
      f"loss is {loss} at step {step}; stopping. The last good checkpoint is step "
      f"{ckpt.latest_step()} in {ckpt.directory} (lower optim.lr or raise optim.warmup_steps)"
    )


def train(config, workdir: str) -> dict:
  """Trains as `config` says, writing everything into `workdir`. Returns the final metrics."""
  docs = text.load_documents(config.data)
  run = run_lib.build(config, workdir, docs)
  stream = run_lib.load_stream(config, run.tokenizer, docs)
  cfg_t = config.train
  is_main = jax.process_index() == 0
  ckpt = checkpoint.Checkpointer(
    os.path.join(workdir, "checkpoints"), config.checkpoint.keep, config.checkpoint.use_async
  )
  writer = metrics_lib.MetricsWriter(workdir, cfg_t.steps, enabled=is_main)
  state, shardings = restore_or_init(run, ckpt, writer)
  start = int(jax.device_get(state.step))
  writer.bar.reset(cfg_t.steps)
  writer.bar.update(start)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  writer.message(f"model: {n_params:,} parameters; mesh {dict(run.mesh.shape)}; "
                 f"{len(stream.train):,} train / {len(stream.val):,} val tokens")

  train_fn = step_lib.jit_train_step(shardings, run.mesh, grad_accum=cfg_t.grad_accum,
                                     dropout=config.model.dropout > 0)
  eval_fn = step_lib.jit_eval_step(run.model.apply, shardings.params, run.mesh)
  local_batch = cfg_t.batch_size // jax.process_count()
  eval_batches = stream.eval_batches("val", local_batch, cfg_t.eval_batches, jax.process_index())
  batches = background(
    (_device_batch(stream.train_batch(s, local_batch, jax.process_index()), run.mesh)
     for s in range(start, cfg_t.steps)), size=2,
  )
  if start == 0 and config.model.get("init_from"):  # the imported model's eval loss, before
    with sharding.mesh_rules(run.mesh):
      initial = evaluate(run, state.params, eval_fn, eval_batches)
    writer.write(0, initial)
    writer.message(f"step 0 (imported weights): eval_loss {initial['eval_loss']:.4f}")
  report = _Reporter(writer, ckpt, run.schedule, cfg_t.batch_size * config.data.seq_len,
                     cfg_t.log_every, start)
  final, step, pending = {}, start, None
  with sharding.mesh_rules(run.mesh):
    for step in range(start + 1, cfg_t.steps + 1):
      state, step_metrics = train_fn(state, next(batches))
      if pending is not None:  # fetch the previous step's metrics while this one runs
        report(*pending)
      pending = (step, step_metrics)
      if step % cfg_t.eval_every == 0 or step == cfg_t.steps:
        final = evaluate(run, state.params, eval_fn, eval_batches)
        writer.write(step, final)
        writer.message(f"step {step}: eval_loss {final['eval_loss']:.4f} "
                       f"ppl {final['eval_ppl']:.2f}")
      if step % config.checkpoint.every == 0 or step == cfg_t.steps:
        ckpt.save(step, state)
    if pending is not None:
      report(*pending)
  ckpt.wait()
  ckpt.close()
  writer.close()
  if is_main and config.sample.max_new_tokens > 0:
    print(sample_text(run, state.params, config.sample), flush=True)
  return {"step": step, **final}


class _Reporter:
  """Host side of each step: NaN guard, progress bar, and a metrics record every `log_every`."""

  def __init__(self, writer, ckpt, schedule, tokens_per_step, log_every, start_step):
    self.writer, self.ckpt, self.schedule = writer, ckpt, schedule
    self.tokens_per_step, self.log_every = tokens_per_step, log_every
    self.start_step, self.window = start_step, (start_step, time.perf_counter())

  def __call__(self, step: int, step_metrics):
    values = jax.device_get(step_metrics)
    loss = float(values["loss"])
    _check_finite(step, loss, self.ckpt)
    now = time.perf_counter()
    if step == self.start_step + 1:  # leave compilation out of the throughput
      self.window = (step, now)
      return
    last_step, last_time = self.window
    tokens_per_sec = self.tokens_per_step * (step - last_step) / max(now - last_time, 1e-9)
    self.writer.progress(step, loss, tokens_per_sec)
    if step % self.log_every == 0:
      self.writer.write(step, {
        "loss": loss, "lr": float(self.schedule(step - 1)),
        "grad_norm": float(values["grad_norm"]), "tokens_per_sec": tokens_per_sec,
      })
      self.window = (step, now)


def sample_text(run, params, sample_cfg) -> str:
  """A text sample from `params`, continuing `sample_cfg.prompt`."""
  prompt = run.tokenizer.encode(sample_cfg.prompt, add_special_tokens=False)
  ids = generate.generate(
    run.model, params, prompt, jax.random.PRNGKey(sample_cfg.seed),
    max_new_tokens=sample_cfg.max_new_tokens, temperature=sample_cfg.temperature,
    top_k=sample_cfg.top_k, top_p=sample_cfg.top_p,
  )
  return sample_cfg.prompt + run.tokenizer.decode(ids)
