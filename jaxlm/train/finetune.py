"""Fine-tuning an encoder on a task (GLUE, CoNLL-2003 NER, SQuAD): epochs of bucketed batches, the
task's official metric on the eval split after each epoch, the final params saved for
`jaxlm eval --workdir DIR --split dev`. `jaxlm train` runs this for configs with a `task` section.
"""

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
from jaxlm.train import objectives, optim
from jaxlm.train import run as run_lib
from jaxlm.train import step as step_lib
from jaxlm.train.state import TrainState

PARAMS_DIR = "params"
# ModelConfig fields a run may set on top of an imported checkpoint's own configuration
_RUN_FIELDS = ("head", "num_labels", "dropout", "remat", "scan_layers")


def load_model(config, task) -> tuple:
  """(tokenizer, ModelConfig, params or None): from model.init_from (an HF encoder directory or
  hub id; its sizes win over the config's) or, without it, a fresh model of config.model."""
  values = dict(config.model)
  init_from = values.pop("init_from", "")
  values.update(head=task.head, num_labels=task.num_labels)
  if not init_from:
    tokenizer = tok_lib.load_tokenizer(config.data.tokenizer)
    values["vocab_size"] = values["vocab_size"] or tok_lib.vocab_size(tokenizer)
    return tokenizer, ModelConfig.from_dict(values), None
  from jaxlm.hf import api

  tokenizer = api.load_tokenizer(init_from)
  model, params = api.from_hf(init_from, values["param_dtype"],
                              **{k: values[k] for k in _RUN_FIELDS})
  if model.cfg.causal:
    raise ValueError(f"model.init_from={init_from!r} is a decoder; fine-tuning tasks need an "
                     "encoder (BERT, RoBERTa)")
  return tokenizer, model.cfg.replace(dtype=values["dtype"]), params


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
  """This process's rows of a global host batch, assembled into arrays sharded over the mesh."""
  n, i = jax.process_count(), jax.process_index()
  rows = len(batch["inputs"]) // n
  return {k: jax.make_array_from_process_local_data(
            sharding.batch_sharding(mesh, v.ndim), v[i * rows:(i + 1) * rows])
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


def train(config, workdir: str) -> dict:
  """Fine-tunes as `config` says into `workdir`; returns the final eval scores, step count and
  training wall time (compilation included)."""
  os.makedirs(workdir, exist_ok=True)
  task = registry.get_task(config.task)
  tokenizer, model_cfg, params = load_model(config, task)
  _save_run(config, workdir, tokenizer, model_cfg)
  model = EncoderModel(model_cfg)
  _, train_feats = features(task, tokenizer, "train", config.task.max_train_examples)
  eval_examples, eval_feats = features(task, tokenizer, config.task.eval_split,
                                       config.task.max_eval_examples)
  bs, buckets, pad_id = config.train.batch_size, _buckets(config.task), tokenizer.pad_token_id
  per_epoch = len(train_feats) // bs
  if not per_epoch:
    raise ValueError(f"{len(train_feats)} training features do not fill one batch of "
                     f"train.batch_size={bs}")
  total = config.train.steps or per_epoch * config.train.epochs
  tx, schedule = optim.make_optimizer(config.optim, total)
  mesh = sharding.make_mesh(config.mesh)
  run_lib.check_batch(config, mesh)
  state, shardings = init_state(model, tx, params, mesh, config.train.seed)
  train_fn, eval_fn = _jit_steps(model, shardings, model_cfg.dropout > 0)
  writer = metrics_lib.MetricsWriter(workdir, total, enabled=jax.process_index() == 0)
  writer.message(f"{task.name}: {len(train_feats):,} train / {len(eval_feats):,} "
                 f"{config.task.eval_split} features; {total} steps of {bs}; buckets {buckets}")
  step, scores, start = 0, {}, time.perf_counter()
  with sharding.mesh_rules(mesh):
    for epoch in range((total + per_epoch - 1) // per_epoch):
      for batch in bucket_lib.train_batches(train_feats, bs, buckets, pad_id, task.token_labels,
                                            config.train.seed, epoch):
        if step == total:
          break
        state, step_metrics = train_fn(state, device_batch(batch, mesh))
        step += 1
        writer.bar.update(1)
        if step % config.train.log_every == 0:
          loss = float(jax.device_get(step_metrics["loss"]))
          writer.write(step, {"loss": loss, "lr": float(schedule(step - 1))})
          writer.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
      scores = evaluate(task, state.params, eval_fn, eval_feats, eval_examples, bs, buckets,
                        pad_id, mesh)
      writer.write(step, {f"{config.task.eval_split}_{k}": v for k, v in scores.items()})
      writer.message(f"epoch {epoch + 1} step {step}: " + _fmt(scores))
  seconds = time.perf_counter() - start
  save_params(workdir, state.params)
  writer.close()
  return {"step": step, "train_seconds": seconds, **scores}


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
