"""Fine-tuning an encoder on a task (GLUE, CoNLL-2003 NER, SQuAD): epochs of bucketed batches, the
task's official metric on the eval split after each epoch, the final params saved for
`jaxlm eval --workdir DIR --split dev`. `jaxlm train` runs this for configs with a `task` section.
"""

import dataclasses
import math
import os
import time

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxlm import sharding
from jaxlm.data import buckets as bucket_lib
from jaxlm.data import tokenizers as tok_lib
from jaxlm.models.config import ModelConfig
from jaxlm.models.heads import EncoderModel
from jaxlm.tasks import registry
from jaxlm.train import metrics as metrics_lib
from jaxlm.train import objectives, optim, preemption, resume
from jaxlm.train import run as run_lib
from jaxlm.train import step as step_lib
from jaxlm.train.state import TrainState

PARAMS_DIR = "params"
# ModelConfig fields a run may set on top of an imported checkpoint's own configuration
_RUN_FIELDS = ("head", "num_labels", "dropout", "remat", "scan_layers")


def load_model(config, task, weights: bool = True) -> tuple:
  """(tokenizer, ModelConfig, params or None): from model.init_from (an HF encoder directory or
  hub id; its sizes win over the config's; `weights=False` reads only its config, for a run
  that resumes from its own checkpoint) or, without it, a fresh model of config.model."""
  values = dict(config.model)
  init_from = values.pop("init_from", "")
  values.update(head=task.head, num_labels=task.num_labels)
  if not init_from:
    tokenizer = tok_lib.load_tokenizer(config.data.tokenizer)
    values["vocab_size"] = values["vocab_size"] or tok_lib.vocab_size(tokenizer)
    return tokenizer, ModelConfig.from_dict(values), None
  from jaxlm.hf import api

  tokenizer = api.load_tokenizer(init_from)
  run_fields = {k: values[k] for k in _RUN_FIELDS}
  if weights:
    model, params = api.from_hf(init_from, values["param_dtype"], **run_fields)
    model_cfg = model.cfg
  else:
    model_cfg, params = api.config_from_hf(init_from, values["param_dtype"], **run_fields), None
  if model_cfg.causal:
    raise ValueError(f"model.init_from={init_from!r} is a decoder; fine-tuning tasks need an "
                     "encoder (BERT, RoBERTa)")
  return tokenizer, model_cfg.replace(dtype=values["dtype"]), params


def init_state(model, tx, params, mesh, seed: int):
  """The sharded TrainState: `params` placed on the mesh, or a fresh init when None."""
  example = np.zeros((1, 8), np.int32)
  rng = jax.random.PRNGKey(seed)
  if params is None:
    return step_lib.sharded_init(model, tx, rng, example, mesh)
  _, shardings = step_lib.abstract_state(model, tx, example, mesh)
  params = jax.device_put(params, shardings.params)

  def create(p):
    return TrainState.create(apply_fn=model.apply, params=p, tx=tx, rng=rng)

  with sharding.mesh_rules(mesh):
    return jax.jit(create, out_shardings=shardings)(params), shardings


def device_batch(batch: dict, mesh) -> dict:
  """This process's rows of a global host batch, assembled into arrays sharded over the mesh.
  (Every process builds the same global batch; packed batches have more examples than rows.)"""
  n, i = jax.process_count(), jax.process_index()
  return {k: jax.make_array_from_process_local_data(
            sharding.batch_sharding(mesh, v.ndim), np.array_split(v, n)[i])
          for k, v in batch.items()}


def features(task, tokenizer, split: str, limit: int = 0):
  """(examples, features) of `split`; `limit` > 0 keeps the first `limit` examples."""
  examples = task.load(split)
  if limit:
    examples = {k: v[:limit] for k, v in examples.items()}
  return examples, task.encode(tokenizer, examples)


def evaluate(task, params, eval_fn, feats, examples, batch_size, buckets, pad_id, mesh) -> dict:
  """The task's official metric(s) over `feats`."""
  outputs = []
  for n, batch in bucket_lib.eval_batches(feats, batch_size, buckets, pad_id, task.token_labels):
    out = np.asarray(multihost_utils.process_allgather(
      eval_fn(params, device_batch(batch, mesh)), tiled=True))
    outputs.extend(out[:n])
  if task.head != "seq_cls":  # per-token outputs: drop the bucket padding
    outputs = [o[:len(f["inputs"])] for o, f in zip(outputs, feats)]
  return task.score(examples, feats, outputs)


def _jit_steps(model, shardings, dropout: bool):
  train_fn = jax.jit(
    lambda state, batch: step_lib.train_step(
      state, batch, dropout=dropout, forward_sums=objectives.task_forward_sums(model.cfg.head)),
    in_shardings=(shardings, None), out_shardings=(shardings, None), donate_argnums=0)
  eval_fn = jax.jit(lambda p, b: objectives.encoder_outputs(model.apply, p, b),
                    in_shardings=(shardings.params, None))
  return train_fn, eval_fn


def _save_run(config, workdir, tokenizer, model_cfg):
  with config.unlocked():
    for key, value in model_cfg.to_dict().items():
      config.model[key] = value
  if jax.process_index() == 0:
    tokenizer.save_pretrained(os.path.join(workdir, run_lib.TOKENIZER_DIR))
    with open(os.path.join(workdir, run_lib.CONFIG_FILE), "w") as f:
      f.write(config.to_json_best_effort(indent=2))


def _buckets(task_cfg) -> tuple:
  return tuple(task_cfg.buckets) or bucket_lib.default_buckets(task_cfg.max_len)


def _packing(task, model_cfg, mesh) -> dict | None:
  """pack_batch's settings when training batches are packed (task.pack; not for QA, whose
  windows are already full), else None."""
  if not task.cfg.pack or task.head == "qa":
    return None
  return {"row_len": task.cfg.max_len, "position_offset": model_cfg.position_offset,
          "row_multiple": math.lcm(task.cfg.pack_row_multiple, sharding.batch_divisor(mesh))}


def train(config, workdir: str) -> dict:
  """Fine-tunes as `config` says into `workdir`, resuming from its newest checkpoint if it has
  one; returns the final eval scores, step count and training wall time (compilation included).

  Raises:
    preemption.Preempted: after SIGTERM/SIGINT, once the checkpoint of the current step is saved.
  """
  os.makedirs(workdir, exist_ok=True)
  ckpt, step0 = resume.start(config, workdir)
  try:
    job, state = _prepare(config, workdir, ckpt, step0)
    try:
      with preemption.PreemptionGuard() as guard:
        state, scores, seconds = _loop(job, state, ckpt, guard)
    finally:
      job.writer.close()
  finally:
    ckpt.close()
  save_params(workdir, state.params)
  return {"step": int(jax.device_get(state.step)), "train_seconds": seconds, **scores}


@dataclasses.dataclass
class _Job:
  """A prepared fine-tuning run: its task and features, compiled steps, schedule and writer."""

  config: object
  task: registry.Task
  mesh: object
  writer: metrics_lib.MetricsWriter
  schedule: object
  train_fn: object
  eval_fn: object
  train_feats: list
  eval_feats: list
  eval_examples: dict
  pad_id: int
  pack: dict | None
  per_epoch: int
  total: int
  meta: dict

  def batches(self, epoch: int, skip: int):
    c = self.config
    return bucket_lib.train_batches(self.train_feats, c.train.batch_size, _buckets(c.task),
                                    self.pad_id, self.task.token_labels, c.train.seed, epoch,
                                    self.pack, skip=skip)

  def evaluate(self, params, step: int) -> dict:
    c = self.config
    scores = evaluate(self.task, params, self.eval_fn, self.eval_feats, self.eval_examples,
                      c.train.batch_size, _buckets(c.task), self.pad_id, self.mesh)
    self.writer.write(step, {f"{c.task.eval_split}_{k}": v for k, v in scores.items()})
    self.writer.message(f"step {step} ({step / self.per_epoch:.2f} epochs): " + _fmt(scores))
    return scores

  def log(self, step: int, step_metrics):
    self.writer.bar.update(1)
    if step % self.config.train.log_every == 0:
      loss = float(jax.device_get(step_metrics["loss"]))
      self.writer.write(step, {"loss": loss, "lr": float(self.schedule(step - 1))})
      self.writer.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)


def _prepare(config, workdir: str, ckpt, step0: int | None) -> tuple[_Job, TrainState]:
  """The run's model, data, optimizer and compiled steps, and its state: restored from
  checkpoint `step0`, or the imported (or fresh) model's."""
  task = registry.get_task(config.task)
  tokenizer, model_cfg, params = load_model(config, task, weights=step0 is None)
  _save_run(config, workdir, tokenizer, model_cfg)
  model = EncoderModel(model_cfg)
  _, train_feats = features(task, tokenizer, "train", config.task.max_train_examples)
  eval_examples, eval_feats = features(task, tokenizer, config.task.eval_split,
                                       config.task.max_eval_examples)
  bs = config.train.batch_size
  per_epoch = len(train_feats) // bs
  if not per_epoch:
    raise ValueError(f"{len(train_feats)} training features do not fill one batch of "
                     f"train.batch_size={bs}")
  total = config.train.steps or per_epoch * config.train.epochs
  tx, schedule = optim.make_optimizer(config.optim, total)
  mesh = sharding.make_mesh(config.mesh)
  run_lib.check_batch(config, mesh)
  meta = resume.checkpoint_meta(config, tokenizer, config.model.init_from or config.data.tokenizer)
  writer = metrics_lib.MetricsWriter(workdir, total, enabled=jax.process_index() == 0)
  if step0 is None:
    state, shardings = init_state(model, tx, params, mesh, config.train.seed)
  else:
    abstract, shardings = step_lib.abstract_state(model, tx, np.zeros((1, 8), np.int32), mesh)
    state, _ = resume.restore(ckpt, step0, config, abstract, writer)
  train_fn, eval_fn = _jit_steps(model, shardings, model_cfg.dropout > 0)
  pack = _packing(task, model_cfg, mesh)
  writer.message(f"{task.name}: {len(train_feats):,} train / {len(eval_feats):,} "
                 f"{config.task.eval_split} features; {total} steps of {bs}; "
                 + (f"packed into rows of {pack['row_len']}" if pack
                    else f"buckets {_buckets(config.task)}"))
  job = _Job(config, task, mesh, writer, schedule, train_fn, eval_fn, train_feats, eval_feats,
             eval_examples, tokenizer.pad_token_id, pack, per_epoch, total, meta)
  return job, state


def _loop(job: _Job, state, ckpt, guard) -> tuple[TrainState, dict, float]:
  """Epochs of steps from the state's step on (the batches before it skipped, so the data
  resumes exactly), the eval split scored after each epoch, checkpoints every
  checkpoint.every steps, at each epoch's end and on preemption."""
  every = job.config.checkpoint.every
  step, scores, start = int(jax.device_get(state.step)), {}, time.perf_counter()
  job.writer.bar.update(step)
  previous = None
  with sharding.mesh_rules(job.mesh):
    for epoch in range(step // job.per_epoch, -(-job.total // job.per_epoch)):
      for batch in job.batches(epoch, skip=step - epoch * job.per_epoch):
        state, step_metrics = job.train_fn(state, device_batch(batch, job.mesh))
        # at most one step queued ahead: the bar tells the truth and a SIGTERM is acted on
        # within a step, not after every step dispatched since the last log
        jax.block_until_ready(previous)
        previous = step_metrics
        step += 1
        job.log(step, step_metrics)
        stop = guard.should_stop(step)
        if stop or step % every == 0:
          ckpt.save(step, state, meta=job.meta)
        if stop:
          guard.stop(ckpt, step)
        if step == job.total:
          break
      scores = job.evaluate(state.params, step)
      if step % every:
        ckpt.save(step, state, meta=job.meta)
    if not scores:  # resumed at the last step: score it all the same
      scores = job.evaluate(state.params, step)
  ckpt.wait()
  return state, scores, time.perf_counter() - start


def _fmt(scores: dict) -> str:
  return " ".join(f"{k} {v:.2f}" for k, v in scores.items())


def save_params(workdir: str, params):
  path = os.path.abspath(os.path.join(workdir, PARAMS_DIR))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, params, force=True)


def evaluate_run(workdir: str, split: str = "dev") -> dict:
  """Scores the params a fine-tuning run saved on `split` of its task (`jaxlm eval`)."""
  config = run_lib.load_config(workdir)
  if "task" not in config:
    raise ValueError(f"{workdir!r} is not a fine-tuning run (its config has no task section)")
  task = registry.get_task(config.task)
  tokenizer = tok_lib.load_tokenizer(os.path.join(workdir, run_lib.TOKENIZER_DIR))
  values = {k: v for k, v in dict(config.model).items() if k != "init_from"}
  model = EncoderModel(ModelConfig.from_dict(values))
  path = os.path.abspath(os.path.join(workdir, PARAMS_DIR))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no saved params at {path}: has the run in {workdir!r} finished?")
  mesh = sharding.make_mesh(config.mesh)
  abstract, shardings = step_lib.abstract_state(model, optax.identity(),
                                                np.zeros((1, 8), np.int32), mesh)
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                        abstract.params)
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(path, target)
  examples, feats = features(task, tokenizer, split, config.task.max_eval_examples)
  _, eval_fn = _jit_steps(model, shardings, False)
  with sharding.mesh_rules(mesh):
    return evaluate(task, params, eval_fn, feats, examples, config.train.batch_size,
                    _buckets(config.task), tokenizer.pad_token_id, mesh)
