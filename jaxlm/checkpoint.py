"""Orbax checkpoints of a run: train state, data iterator state and run metadata, per step.

Every process writes its own data iterator state (`data/process_I-of-N.json`, as Grain's Orbax
handler does) while the train state is written cooperatively by all processes. Async saves,
keep-last-N / best-N / every-Kth retention, restore onto any mesh, params-only restore for
inference, and clear errors for unreadable checkpoints or failed saves.
"""

import dataclasses
import json
import os
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

BEST_MODES = ("min", "max")
# Orbax writes an array that several devices hold whole (a replicated param) cooperatively, each
# replica a slice, which compiles a slicing program per array shape at the first save: 16 of them
# for a 0.8M-parameter model, 0.5-0.9 s. Below this many bytes per slice one replica writes it all.
MIN_REPLICA_SLICE_BYTES = 8 << 20


def _type_handlers():
  """Orbax's standard type handlers, with replica-parallel writes only for slices of at least
  MIN_REPLICA_SLICE_BYTES."""
  handlers = ocp.type_handlers
  try:  # the default jax.Array handler keeps per-array metadata in this store
    from orbax.checkpoint._src.metadata import array_metadata_store
    store = {"array_metadata_store": array_metadata_store.Store()}
  except ImportError:
    return None
  return handlers.create_type_handler_registry(
    (int, handlers.ScalarHandler()), (float, handlers.ScalarHandler()),
    (bytes, handlers.ScalarHandler()), (np.number, handlers.ScalarHandler()),
    (np.ndarray, handlers.NumpyHandler()), (str, handlers.StringHandler()),
    (jax.Array, handlers.ArrayHandler(
      min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES, **store)),
  )


def _preservation(keep: int, keep_best: int, best_metric: str, best_mode: str, keep_period: int):
  """The union of: the newest `keep`, the best `keep_best` by `best_metric`, every Kth step."""
  if best_mode not in BEST_MODES:
    raise ValueError(f"checkpoint.best_mode={best_mode!r} is not one of {BEST_MODES}")
  for name, value in (("keep", keep), ("keep_best", keep_best), ("keep_period", keep_period)):
    if value < 0:
      raise ValueError(f"checkpoint.{name}={value} must be >= 0 (0 turns it off)")
  if keep_best and not best_metric:
    raise ValueError("checkpoint.keep_best needs checkpoint.best_metric, e.g. 'eval_loss'")
  kept = [policies.LatestN(keep or None)]
  if keep_best:
    kept.append(policies.BestN(
      get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min", n=keep_best,
      keep_checkpoints_without_metrics=False,
    ))
  if keep_period:
    kept.append(policies.EveryNSteps(keep_period))
  return policies.AnyPreservationPolicy(kept)


class ProcessJsonHandler(ocp.JsonCheckpointHandler):
  """Each process saves its own JSON dict as `process_I-of-N.json`; restore returns this
  process's (same I and N), else process 0's of the saving run (its iterator decides whether a
  state from another process count continues it), else a single-file `metadata` (older runs)."""

  async def _save_fn(self, x, directory):
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    (directory / name).write_text(json.dumps(x))

  def restore(self, directory: epath.Path, item=None, args=None) -> dict:
    del item, args
    own = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if own.exists():
      return json.loads(own.read_text())
    first = sorted(f for f in directory.iterdir()
                   if re.fullmatch(r"process_0-of-\d+\.json", f.name))
    if first:
      return json.loads(first[0].read_text())
    return super().restore(directory)


@ocp.args.register_with_handler(ProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class ProcessJsonSave(ocp.args.CheckpointArgs):
  """This process's JSON dict (e.g. its data iterator state)."""

  item: dict


@ocp.args.register_with_handler(ProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class ProcessJsonRestore(ocp.args.CheckpointArgs):
  """Restores the JSON dict this process saved (see ProcessJsonHandler)."""

  item: dict | None = None


class SaveError(OSError):
  """A checkpoint could not be written (disk full, permissions); older ones are untouched."""


def _state_handler():
  registry = _type_handlers()
  return ocp.PyTreeCheckpointHandler(**({"type_handler_registry": registry} if registry else {}))


def _pytree_restore(target, **kwargs):
  """Restore args placing every leaf as `target`'s ShapeDtypeStructs say."""
  return ocp.args.PyTreeRestore(
    item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), **kwargs)


class Checkpointer:
  """A CheckpointManager for `<workdir>/checkpoints` with items "state", "data" and "meta".

  Orbax writes each step into a temporary directory and renames it when complete, so a crash
  or SIGKILL at any moment leaves the last finished checkpoint usable and the partial one unlisted.
  """

  def __init__(self, directory, keep: int = 0, use_async: bool = True, *, keep_best: int = 0,
               best_metric: str = "", best_mode: str = "min", keep_period: int = 0,
               read_only: bool = False):
    """`directory`: a local path or any etils.epath (gs://...). `read_only`: never create or
    write anything there (for reading a run: generate, export, evaluation)."""
    options = ocp.CheckpointManagerOptions(
      enable_async_checkpointing=use_async,
      create=not read_only,
      read_only=read_only,
      preservation_policy=_preservation(keep, keep_best, best_metric, best_mode, keep_period),
    )
    self.directory = _absolute(directory)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_handlers={"state": _state_handler(),
                                                        "data": ProcessJsonHandler(),
                                                        "meta": ocp.JsonCheckpointHandler()})
    self._saving = None

  @classmethod
  def from_config(cls, cfg, directory: str):
    """A Checkpointer set up from the `checkpoint` config section."""
    return cls(directory, cfg.keep, cfg.use_async, keep_best=cfg.keep_best,
               best_metric=cfg.best_metric, best_mode=cfg.best_mode, keep_period=cfg.keep_period)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def set_aside_after(self, step: int) -> list[int]:
    """Moves checkpoints newer than `step` to `<directory>.after-<step>/`, so a run resumed from
    an older step can write those steps again. Returns the steps moved."""
    newer = [s for s in self.all_steps() if s > step]
    if newer and jax.process_index() == 0:
      aside = self.directory.parent / f"{self.directory.name}.after-{step}"
      aside.mkdir(parents=True, exist_ok=True)
      for s in newer:
        (self.directory / str(s)).rename(aside / str(s))
    self.manager.reload()
    return newer

  def save(self, step: int, state, data: dict | None = None, meta: dict | None = None,
           metrics: dict | None = None) -> None:
    """Starts saving `state` (and the data iterator state, run metadata) as `step`.

    In the background when async; a failure of the previous async save is raised here or at
    `wait`. `metrics` (e.g. eval_loss) rank the checkpoint for keep_best.
    """
    self._check_previous()
    items = {"state": ocp.args.PyTreeSave(state), "data": ProcessJsonSave(data or {}),
             "meta": ocp.args.JsonSave(meta or {})}
    self._saving = step
    try:
      self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
    except (OSError, ValueError) as e:
      raise self._save_error(step, e) from e

  def wait(self):
    """Blocks until the pending save is on disk; raises SaveError if it failed."""
    self._check_previous()

  def _check_previous(self):
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # orbax re-raises the background thread's error
      raise self._save_error(self._saving, e) from e
    self._saving = None

  def _save_error(self, step, err) -> SaveError:
    good = [s for s in self.manager.all_steps() if s != step]
    return SaveError(
      f"saving checkpoint step {step} to {self.directory} failed ({type(err).__name__}: "
      f"{_first_line(err)}); older checkpoints are intact: steps {sorted(good)}. Free disk "
      "space or fix the directory's permissions, then resume"
    )

  def restore(self, step: int, abstract_state):
    """(state, data iterator state, meta) of `step`, the state placed as `abstract_state` says
    (its shapes, dtypes and shardings: any mesh, resharded while loading); the data iterator
    state is this process's (see ProcessJsonHandler)."""
    args = ocp.args.Composite(state=_pytree_restore(abstract_state),
                              data=ProcessJsonRestore(), meta=ocp.args.JsonRestore())
    out = self._restore(step, args)
    data = dict(out["data"]) if out["data"] else None  # None: saved without an iterator state
    return out["state"], data, dict(out["meta"] or {})

  def restore_meta(self, step: int) -> dict:
    """Only the "meta" item of `step` (the config and tokenizer it was written with)."""
    return dict(self._restore(step, ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"] or {})

  def restore_params(self, step: int, abstract_params):
    """Only the params of `step` (no optimizer state read), e.g. for sampling or export."""
    return self.restore_fields(step, {"params": abstract_params})["params"]

  def restore_fields(self, step: int, target: dict) -> dict:
    """Only the state fields named by `target`'s keys (e.g. params and a LoRA run's frozen base),
    placed as its ShapeDtypeStructs say; nothing else is read."""
    args = ocp.args.Composite(state=_pytree_restore(target, partial_restore=True))
    return dict(self._restore(step, args)["state"])

  def _restore(self, step: int, args):
    steps = self.all_steps()
    if step not in steps:
      raise ValueError(
        f"no checkpoint step {step} in {self.directory}; steps present: {steps}. Set "
        "checkpoint.restore_step to one of them (-1: the newest)"
      )
    try:
      return self.manager.restore(step, args=args)
    except Exception as e:  # orbax / tensorstore errors of many types: name the broken step
      path = self.directory / str(step)
      others = [s for s in steps if s != step]
      offer = (f"restore another with --config.checkpoint.restore_step=N (N in {others})"
               if others else "start over with --config.checkpoint.fresh=True")
      raise ValueError(
        f"checkpoint {path} is corrupt or incomplete ({type(e).__name__}: {_first_line(e)}); "
        f"{offer}"
      ) from e

  def close(self):
    try:
      self.wait()
    finally:
      self.manager.close()


def _absolute(directory) -> epath.Path:
  """An epath for `directory`; local paths made absolute (Orbax wants absolute paths)."""
  text = os.fspath(directory)
  return epath.Path(text if "://" in text else os.path.abspath(text))


def _first_line(err: BaseException, limit: int = 300) -> str:
  text = str(err).strip().splitlines()
  return (text[0] if text else "")[:limit]
