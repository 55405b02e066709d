"""Run metrics: one JSON object per line in metrics.jsonl, TensorBoard events, a progress bar."""

import json
import math
import os

import tqdm

from jaxlm import rundir


class MetricsWriter:
  """Writes step and eval records to `<workdir>/metrics.jsonl` and TensorBoard (process 0 only)."""

  def __init__(self, workdir, total_steps: int, start_step: int = 0, enabled: bool = True):
    self.enabled = enabled
    p = rundir.path(workdir)
    self.jsonl = self.tb = None
    if enabled:
      from tensorboardX import SummaryWriter

      p.mkdir(parents=True, exist_ok=True)
      self.jsonl = (p / rundir.METRICS_FILE).open("a")
      self.tb = SummaryWriter(os.fspath(p / rundir.TENSORBOARD_DIR))
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
      self.jsonl.close()
      self.tb.close()


def _plain(value):
  """Device or numpy scalars become Python floats; ints and strings stay as they are."""
  if isinstance(value, (int, str, bool)):
    return value
  return float(value)
