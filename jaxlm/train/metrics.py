"""Run metrics: one JSON object per line in metrics.jsonl, TensorBoard events, a progress bar."""

import json
import math
import os

import tqdm


class MetricsWriter:
  """Writes step and eval records to `<workdir>/metrics.jsonl` and TensorBoard (process 0 only)."""

  def __init__(self, workdir: str, total_steps: int, start_step: int = 0, enabled: bool = True):
    self.enabled = enabled
    self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a") if enabled else None
    self.tb = None
    if enabled:
      from tensorboardX import SummaryWriter

      self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
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


def drop_records_after(workdir: str, step: int) -> int:
  """Rewrites `<workdir>/metrics.jsonl` (atomically) without records past `step`, so a resumed
  run's log continues from its checkpoint. Returns how many records were dropped."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    return 0
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  kept = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= step:
        kept.append(line)
    except (ValueError, KeyError):  # a line cut short by a kill
      continue
  if len(kept) != len(lines):
    with open(path + ".tmp", "w") as f:
      f.writelines(kept)
    os.replace(path + ".tmp", path)
  return len(lines) - len(kept)


def _plain(value):
  """Device or numpy scalars become Python floats; ints and strings stay as they are."""
  if isinstance(value, (int, str, bool)):
    return value
  return float(value)
