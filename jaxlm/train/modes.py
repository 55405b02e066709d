"""The kinds of run as the one trainer sees them. A mode is the run's batches (a resumable
iterator of this process's rows), its evaluator and its length; the objective comes from the
model's head (jaxlm.train.objectives) unless the mode names its own (dpo). lm, sft and mlm read
the Grain pipeline (mlm masks its rows); dpo reads preference pairs packed into rows and trains
against the frozen reference; finetune reads task examples and scores the task's official metric;
distill reads what its student's head trains on (text, masked text or task examples) and trains
towards a frozen teacher (jaxlm.train.distill), whose own score joins each evaluation's.
"""

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxlm import config as config_lib
from jaxlm import sharding
from jaxlm.data import buckets as bucket_lib
from jaxlm.data import mlm as mlm_lib
from jaxlm.data import pipeline, preference
from jaxlm.data import tokenize as tokenize_lib
from jaxlm.data.batch import BatchIterator, process_rows
from jaxlm.tasks import registry
from jaxlm.train import distill, dpo, objectives
from jaxlm.train import step as step_lib


@dataclasses.dataclass
class Mode:
  """What the trainer needs from a kind of run."""

  batches: BatchIterator | None  # this process's rows; get_state() / set_state() resume it
  evaluate: Callable[..., dict]  # (params, reference=None) -> metrics on the eval split
  total_steps: int
  eval_every: int  # steps between evaluations
  summary: str  # one line about the data, printed at start-up
  record_prefix: str = ""  # what eval metrics are called in metrics.jsonl ("dev_" for tasks)
  eval_at_start: bool = False  # score the imported weights before the first step
  objective: Callable | None = None  # None: the model head's (objectives.for_head)
  reference: bool = False  # the objective and evaluator read the reference model (DPO)
  teacher: distill.Teacher | None = None  # the step passes its params to the objective (distill)


def build(config, tokenizer, model, mesh, params_shardings, *, eval_split: str | None = None,
          train: bool = True) -> Mode:
  """The mode of `config.kind` (lm | sft | mlm | finetune | dpo | distill); `train=False` reads
  only what evaluation needs (for `jaxlm eval`), `eval_split` overrides the split scored."""
  if config.kind == "distill":
    return _distill_mode(config, tokenizer, model, mesh, params_shardings, eval_split, train)
  if config.kind == "finetune":
    return _task_mode(config, tokenizer, model, mesh, params_shardings, eval_split, train)
  if config.kind == "dpo":
    return _dpo_mode(config, tokenizer, model, mesh, params_shardings)
  return _lm_mode(config, tokenizer, model, mesh, params_shardings)


def _positive(config, key: str) -> int:
  value = config.train[key]
  if value < 1:
    raise ValueError(f"train.{key}={value} must be >= 1 for kind={config.kind!r}")
  return value


def _mean_eval(eval_fn, params, batches: list[dict], mesh, *reference) -> dict:
  """The sums of `eval_fn` (step.jit_eval_step) over `batches` (this process's rows of each)
  divided by their summed weight: {"eval_loss", "eval_<name>" for each of the objective's other
  sums}; {} without batches. `reference`: the reference model's params (or None), for an
  eval_fn jitted with reference=True (DPO)."""
  if not batches:
    return {}
  # fetched one by one: on CPU, many queued multi-device programs can stall XLA's collectives
  sums = [jax.device_get(eval_fn(params, sharding.global_batch(b, mesh), *reference))
          for b in batches]
  weight = max(sum(float(s["weight"]) for s in sums), 1.0)
  return {f"eval_{'loss' if k == 'loss_sum' else k}": sum(float(s[k]) for s in sums) / weight
          for k in sums[0] if k != "weight"}


# --- lm, sft, mlm: token streams ------------------------------------------------------------------

def _lm_mode(config, tokenizer, model, mesh, params_shardings, kind: str = "",
             teacher: distill.Teacher | None = None) -> Mode:
  cfg_t, kind = config.train, kind or config.kind
  masker = None
  if kind == "mlm":
    masker = mlm_lib.Masker(tokenizer, config.mlm.prob, config.mlm.whole_word,
                            position_offset=model.cfg.position_offset)
  shard = pipeline.Shard(jax.process_index(), jax.process_count())
  data = pipeline.build(config.data, tokenizer, batch_size=cfg_t.batch_size, seed=cfg_t.seed,
                        eval_batches=cfg_t.eval_batches, shard=shard, sft=kind == "sft",
                        mlm=masker)
  eval_fn = step_lib.jit_eval_step(model.apply, params_shardings,
                                   objectives.for_head(model.cfg.head))

  def scores(fn, params) -> dict:
    out = _mean_eval(fn, params, data.eval_batches, mesh)
    if out:
      out["eval_ppl"] = math.exp(min(out["eval_loss"], 50.0))
    return out

  def evaluate(params, reference=None) -> dict:
    """Mean token loss and perplexity over the fixed eval batches."""
    return scores(eval_fn, params)

  if teacher is not None:
    teacher_fn = step_lib.jit_eval_step(teacher.model.apply, None,
                                        _teacher_objective(teacher, objectives.for_head(
                                          teacher.cfg.head)))
    evaluate = _with_teacher(evaluate, lambda: scores(teacher_fn, teacher.params))

  at_start = bool(config.model.init_from) and config.train.get("eval_at_start", True)
  return Mode(data.train, evaluate, _positive(config, "steps"), _positive(config, "eval_every"),
              data.summary, eval_at_start=at_start)


# --- distill: a student and a frozen teacher ------------------------------------------------------

def _teacher_objective(teacher: distill.Teacher, objective):
  """`objective` applied to the teacher's params as held (cast or quantized kernels boxed for the
  layers, as a step applies them)."""
  def sums(apply_fn, params, batch, rng, deterministic):
    return objective(apply_fn, teacher.apply_params(params), batch, rng, deterministic)
  return sums


def _with_teacher(evaluate, teacher_scores):
  """`evaluate` with the teacher's own scores beside the student's, as teacher_<name>; the
  teacher is frozen, so it is scored once."""
  cache = {}

  def both(params, reference=None) -> dict:
    out = evaluate(params, reference)
    if "scores" not in cache:
      cache["scores"] = teacher_scores()
    return {**out, **{f"teacher_{k}": v for k, v in cache["scores"].items()}}

  return both


def _distill_mode(config, tokenizer, model, mesh, params_shardings, eval_split, train) -> Mode:
  teacher = distill.load_teacher(config, tokenizer, model.cfg, mesh)
  kind = config_lib.data_kind(config)
  if kind == "finetune":
    mode = _task_mode(config, tokenizer, model, mesh, params_shardings, eval_split, train,
                      teacher)
  else:
    mode = _lm_mode(config, tokenizer, model, mesh, params_shardings, kind, teacher)
  c = config.distill
  n = sum(x.size for x in jax.tree.leaves(teacher.params))
  held = c.teacher_quantize or c.teacher_dtype or teacher.cfg.param_dtype
  mode.summary += (f"; teacher {c.teacher} ({teacher.cfg.num_layers} layers, {n:,} parameters, "
                   f"held {held}); distill.divergence={c.divergence} alpha={c.alpha} "
                   f"T={c.temperature}")
  mode.objective = distill.objective(c, teacher, model.cfg)
  mode.teacher = teacher
  mode.eval_at_start = True  # where the student starts, against the teacher
  return mode


# --- dpo: preference pairs -----------------------------------------------------------------------

def _dpo_mode(config, tokenizer, model, mesh, params_shardings) -> Mode:
  cfg_d, cfg_t = config.data, config.train
  objective = dpo.objective(config.dpo)
  bos, eos = tokenize_lib.special_ids(tokenizer, cfg_d)
  rows = preference.read_rows(cfg_d.path)
  pairs, dropped = preference.encode_pairs(tokenizer, rows, row_len=cfg_d.seq_len, bos=bos,
                                           eos=eos, drop_long=cfg_d.truncate)
  n_val = int(len(pairs) * cfg_d.val_fraction)
  train_pairs, val_pairs = pairs[:len(pairs) - n_val], pairs[len(pairs) - n_val:]
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  batches = preference.PairBatches(train_pairs, cfg_t.batch_size, cfg_d.seq_len, pad_id,
                                   cfg_t.seed, jax.process_index(), jax.process_count())
  evals = preference.eval_batches(val_pairs, cfg_t.batch_size, cfg_d.seq_len, pad_id,
                                  cfg_t.eval_batches) if n_val else []
  eval_fn = step_lib.jit_eval_step(model.apply, params_shardings, objective, reference=True)
  evals = [process_rows(b, jax.process_index(), jax.process_count()) for b in evals]

  def evaluate(params, reference=None) -> dict:
    """Mean DPO loss and TRL's reward metrics over the held-out pairs."""
    return _mean_eval(eval_fn, params, evals, mesh, reference)

  summary = (f"{len(train_pairs):,} train / {len(val_pairs):,} eval preference pairs"
             + (f" ({dropped} longer than a row dropped)" if dropped else "")
             + f"; about {batches.per_epoch} steps per epoch; dpo.loss={config.dpo.loss}")
  return Mode(batches, evaluate, _positive(config, "steps"), _positive(config, "eval_every"),
              summary, objective=objective, reference=True)


# --- finetune: task examples ----------------------------------------------------------------------

def features(task, tokenizer, split: str, limit: int = 0):
  """(examples, features) of `split`; `limit` > 0 keeps the first `limit` examples."""
  examples = task.load(split)
  if limit:
    examples = {k: v[:limit] for k, v in examples.items()}
  return examples, task.encode(tokenizer, examples)


def _buckets(task_cfg) -> tuple:
  return tuple(task_cfg.buckets) or bucket_lib.default_buckets(task_cfg.max_len)


def _make_batch(task, model_cfg, mesh, batch_size: int, pad_id: int):
  """How one step's examples become a batch: packed into rows (task.pack; not for QA, whose
  windows are already full), else padded to a bucket length."""
  c = task.cfg
  if c.pack and task.head != "qa":
    multiple = math.lcm(c.pack_row_multiple, sharding.batch_divisor(mesh))
    return functools.partial(bucket_lib.pack_batch, batch_size=batch_size, row_len=c.max_len,
                             pad_id=pad_id, token_labels=task.token_labels,
                             row_multiple=multiple, position_offset=model_cfg.position_offset)
  return functools.partial(bucket_lib.pad_batch, batch_size=batch_size, buckets=_buckets(c),
                           pad_id=pad_id, token_labels=task.token_labels)


def check_head(task, model_cfg):
  if (model_cfg.head, model_cfg.num_labels) != (task.head, task.num_labels) or model_cfg.causal:
    raise ValueError(
      f"task {task.name!r} needs an encoder with model.head={task.head!r} and "
      f"model.num_labels={task.num_labels}; the model has head={model_cfg.head!r}, "
      f"num_labels={model_cfg.num_labels}, causal={model_cfg.causal}")


def _task_mode(config, tokenizer, model, mesh, params_shardings, eval_split, train,
               teacher: distill.Teacher | None = None) -> Mode:
  task = registry.get_task(config.task)
  check_head(task, model.cfg)
  cfg_t, split = config.train, eval_split or config.task.eval_split
  batches, total, per_epoch, summary = None, 0, 0, ""
  if train:
    _, train_feats = features(task, tokenizer, "train", config.task.max_train_examples)
    make = _make_batch(task, model.cfg, mesh, cfg_t.batch_size, tokenizer.pad_token_id)
    batches = bucket_lib.TaskBatches(train_feats, cfg_t.batch_size, make, cfg_t.seed,
                                     jax.process_index(), jax.process_count())
    per_epoch = batches.per_epoch
    total = cfg_t.steps or per_epoch * cfg_t.epochs
    if total < 1:
      raise ValueError("kind='finetune' needs train.steps >= 1 or train.epochs >= 1")
    summary = (f"{task.name}: {len(train_feats):,} train features; {total} steps of "
               f"{cfg_t.batch_size} ({per_epoch} per epoch); "
               + ("packed rows" if make.func is bucket_lib.pack_batch else "padded buckets"))
  examples, feats = features(task, tokenizer, split, config.task.max_eval_examples)
  outputs_fn = jax.jit(functools.partial(objectives.model_outputs, model.apply),
                       in_shardings=(params_shardings, None))

  def scores(fn, params) -> dict:
    outputs = []
    for n, batch in bucket_lib.eval_batches(feats, cfg_t.batch_size, _buckets(config.task),
                                            tokenizer.pad_token_id, task.token_labels):
      rows = process_rows(batch, jax.process_index(), jax.process_count())
      out = fn(params, sharding.global_batch(rows, mesh))
      outputs.extend(np.asarray(multihost_utils.process_allgather(out, tiled=True))[:n])
    if task.head != "seq_cls":  # per-token outputs: drop the bucket padding
      outputs = [o[:len(f["inputs"])] for o, f in zip(outputs, feats)]
    return task.score(examples, feats, outputs)

  def evaluate(params, reference=None) -> dict:
    """The task's official metric(s) over the eval split."""
    return scores(outputs_fn, params)

  if teacher is not None:
    teacher_fn = jax.jit(lambda p, b: objectives.model_outputs(
      teacher.model.apply, teacher.apply_params(p), b))
    evaluate = _with_teacher(evaluate, lambda: scores(teacher_fn, teacher.params))

  return Mode(batches, evaluate, total, cfg_t.eval_every or per_epoch, summary,
              record_prefix=f"{split}_")
