"""Run metrics: one JSON object per line in metrics.jsonl, TensorBoard events, optionally Weights &
Biases, a progress bar; and where the wall time goes (compilation, goodput).

Object storage (gs://) has no append: for a remote run directory, metrics.jsonl is rewritten
whole and the TensorBoard events (written to a local temporary directory) are copied up, at most
every SYNC_SECONDS and when the writer closes.
"""

import collections
import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import time

import tqdm

from jaxlm import rundir, runtime


class Goodput:
  """Splits a run's wall time into train steps (the productive part) and the rest: start-up,
  compilation, data waits, evaluation, checkpoint saves, the closing sample.

  `with goodput.timing("eval"): ...` charges a block to a bucket, less the compilation inside it;
  step time is what is left of the loop's time.
  """

  BUCKETS = ("startup", "compile", "data", "eval", "checkpoint", "sample")

  def __init__(self, begin: float | None = None):
    self.begin = time.perf_counter() if begin is None else begin
    self.spent = collections.Counter()
    self.compiled_before = runtime.compile_stats()  # and counting from here

  def compiled(self) -> dict:
    """Compilation since this clock started: seconds, xla_compiles, cache_hits."""
    now = runtime.compile_stats()
    return {k: now[k] - self.compiled_before[k] for k in now}

  @contextlib.contextmanager
  def timing(self, bucket: str):
    start, compiled = time.perf_counter(), runtime.compile_stats()["seconds"]
    try:
      yield
    finally:
      compiling = runtime.compile_stats()["seconds"] - compiled
      self.spent["compile"] += compiling
      self.spent[bucket] += time.perf_counter() - start - compiling

  def add(self, bucket: str, seconds: float):
    self.spent[bucket] += seconds

  def summary(self) -> dict:
    """{"wall_seconds", "goodput" (share in train steps), "<bucket>_frac" for each bucket}."""
    wall = max(time.perf_counter() - self.begin, 1e-9)
    out = {"wall_seconds": wall, "goodput": self.spent["step"] / wall}
    out.update({f"{b}_frac": self.spent[b] / wall for b in self.BUCKETS})
    return out

SYNC_SECONDS = 10.0


class _RemoteLog:
  """metrics.jsonl and TensorBoard events of a run directory on object storage: appended to in
  memory and a local temporary directory, written up whole by sync()."""

  def __init__(self, p):
    self.file, self.tb_dest = p / rundir.METRICS_FILE, p / rundir.TENSORBOARD_DIR
    self.text = self.file.read_text() if self.file.exists() else ""
    self.tb_local = tempfile.mkdtemp(prefix="jaxlm-tb-")
    self.last = 0.0

  def write(self, line: str):
    self.text += line

  def flush(self):
    if time.monotonic() - self.last >= SYNC_SECONDS:
      self.sync()

  def sync(self):
    self.file.write_text(self.text)
    for name in os.listdir(self.tb_local):
      with open(os.path.join(self.tb_local, name), "rb") as f:
        (self.tb_dest / name).write_bytes(f.read())
    self.last = time.monotonic()

  def close(self):
    self.sync()
    shutil.rmtree(self.tb_local, ignore_errors=True)


class MetricsWriter:
  """Writes step and eval records to `<workdir>/metrics.jsonl` and TensorBoard (process 0 only)."""

  def __init__(self, workdir, total_steps: int, start_step: int = 0, enabled: bool = True,
               wandb_cfg=None, config=None):
    """`wandb_cfg`: the config's `wandb` section; with a project set, records also go to W&B
    (one W&B run per run directory, resumed with it). `config`: logged there as the run's."""
    self.enabled = enabled
    p = rundir.path(workdir)
    self.jsonl = self.tb = self.wandb = None
    if enabled:
      p.mkdir(parents=True, exist_ok=True)
      if rundir.is_local(p):
        self.jsonl = (p / rundir.METRICS_FILE).open("a")
        self.tb = _TensorBoard(os.fspath(p / rundir.TENSORBOARD_DIR))
      else:
        self.jsonl = _RemoteLog(p)
        self.tb = _TensorBoard(self.jsonl.tb_local)
      if wandb_cfg is not None and wandb_cfg.project:
        self.wandb = _wandb_run(p, wandb_cfg, config)
    self.bar = tqdm.tqdm(
      total=total_steps, initial=start_step, disable=not enabled, dynamic_ncols=True,
      unit="step", mininterval=0.5,
    )

  def write(self, step: int, record: dict):
    """Appends `{"step": step, **record}` and mirrors scalars to TensorBoard."""
    if not self.enabled:
      return
    record = {"step": step, **{k: _plain(v) for k, v in record.items()}}
    self.jsonl.write(json.dumps(record) + "\n")
    self.jsonl.flush()
    for key, value in record.items():
      if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
        self.tb.add_scalar(key, value, step)
    if self.wandb is not None:
      self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)

  def progress(self, step: int, loss: float, tokens_per_sec: float, mfu: float | None = None):
    shown = dict(loss=f"{loss:.4f}", tok_s=f"{tokens_per_sec:,.0f}")
    if mfu is not None:
      shown["mfu"] = f"{100 * mfu:.1f}%"
    self.bar.set_postfix(shown, refresh=False)
    self.bar.update(step - self.bar.n)

  def message(self, text: str):
    if self.enabled:
      self.bar.write(text)

  def close(self):
    if self.enabled:
      self.bar.close()
      self.tb.close()
      self.jsonl.close()
      if self.wandb is not None:
        self.wandb.finish()


class _TensorBoard:
  """Scalars as TensorBoard event files, through the `tensorboard` package's own writer (which
  needs neither TensorFlow nor PyTorch; tensorboardX imports PyTorch whenever it is installed,
  costing seconds and 200 MB a run)."""

  def __init__(self, logdir: str):
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    self._event, self._summary = event_pb2.Event, summary_pb2.Summary
    self._writer = EventFileWriter(logdir)

  def add_scalar(self, tag: str, value: float, step: int):
    value = self._summary.Value(tag=tag, simple_value=value)
    self._writer.add_event(self._event(wall_time=time.time(), step=step,
                                       summary=self._summary(value=[value])))

  def close(self):
    self._writer.close()


def _wandb_run(workdir, cfg, config):
  """A W&B run for this run directory: its id is derived from the directory, so a resumed run
  continues the same W&B run. mode: online | offline (written under the run directory, sync it
  later with `wandb sync`) | disabled."""
  try:
    import wandb
  except ImportError as e:
    raise ImportError("wandb.project is set but wandb is not installed; pip install wandb, or "
                      "set --config.wandb.project=''") from e
  run_id = hashlib.sha1(str(workdir).encode()).hexdigest()[:16]
  local = None if str(workdir).startswith("gs://") else os.fspath(workdir)
  return wandb.init(project=cfg.project, entity=cfg.entity or None, name=cfg.name or None,
                    mode=cfg.mode, id=run_id, resume="allow", dir=local,
                    config=config.to_dict() if config is not None else None)


def _plain(value):
  """Device or numpy scalars become Python floats; ints and strings stay as they are."""
  if isinstance(value, (int, str, bool)):
    return value
  return float(value)
