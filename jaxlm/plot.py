"""Loss curves of a run (train loss and eval loss against step) drawn to a PNG; the run and the
PNG may be local or remote (gs://), both through etils.epath."""

import io
import json
import os

from jaxlm import rundir


def read_metrics(workdir: str) -> list[dict]:
  path = rundir.path(workdir) / rundir.METRICS_FILE
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: is {workdir!r} a jaxlm run directory?")
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(workdir: str, out: str | None = None) -> str:
  """Writes the loss curves of `workdir` to `out` (default WORKDIR/loss.png); returns the path."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  records = read_metrics(workdir)
  run = rundir.path(workdir)
  dest = rundir.path(out) if out else run / "loss.png"
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for key, label in (("loss", "train loss"), ("eval_loss", "val loss")):
    points = [(r["step"], r[key]) for r in records if key in r]
    if points:
      ax.plot(*zip(*points), label=label, marker="o" if key == "eval_loss" else None)
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats/token)")
  ax.set_title(run.name)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  png = io.BytesIO()  # matplotlib writes local files; epath writes these bytes to gs:// too
  fig.savefig(png, format="png", dpi=120)
  plt.close(fig)
  dest.write_bytes(png.getvalue())
  return os.fspath(dest)
