"""Run metrics: one JSON object per line in metrics.jsonl, TensorBoard events, a progress bar.

Object storage (gs://) has no append: for a remote run directory, metrics.jsonl is rewritten
whole and the TensorBoard events (written to a local temporary directory) are copied up, at most
every SYNC_SECONDS and when the writer closes.
"""

import json
import math
import os
import shutil
import tempfile
import time

import tqdm

from jaxlm import rundir

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

  def __init__(self, workdir, total_steps: int, start_step: int = 0, enabled: bool = True):
    self.enabled = enabled
    p = rundir.path(workdir)
    self.jsonl = self.tb = None
    if enabled:
      from tensorboardX import SummaryWriter

      p.mkdir(parents=True, exist_ok=True)
      if rundir.is_local(p):
        self.jsonl = (p / rundir.METRICS_FILE).open("a")
        self.tb = SummaryWriter(os.fspath(p / rundir.TENSORBOARD_DIR))
      else:
        self.jsonl = _RemoteLog(p)
        self.tb = SummaryWriter(self.jsonl.tb_local)
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

  def progress(self, step: int, loss: float, tokens_per_sec: float):
    self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_sec:,.0f}", refresh=False)
    self.bar.update(step - self.bar.n)

  def message(self, text: str):
    if self.enabled:
      self.bar.write(text)

  def close(self):
    if self.enabled:
      self.bar.close()
      self.tb.close()
      self.jsonl.close()


def _plain(value):
  """Device or numpy scalars become Python floats; ints and strings stay as they are."""
  if isinstance(value, (int, str, bool)):
    return value
  return float(value)
