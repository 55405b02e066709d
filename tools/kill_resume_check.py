"""Kill-and-resume check: SIGKILL `jaxlm train` at random steps, rerun it, compare with a clean run.

  PYTHONPATH=. python tools/kill_resume_check.py --rounds 10 [--steps 40] [--seed 0]

Each round trains a tiny model in a fresh directory, kills the process with SIGKILL once the
log reaches a random step, reruns the same command (which resumes from the newest checkpoint),
and checks that the final params and the logged loss curve equal an uninterrupted run's bitwise.
"""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
  "--config.model.num_layers=1", "--config.model.embed_dim=32", "--config.model.num_heads=2",
  "--config.data.seq_len=32", "--config.train.batch_size=4", "--config.train.eval_every=10",
  "--config.train.eval_batches=2", "--config.train.log_every=1", "--config.optim.warmup_steps=5",
  "--config.checkpoint.every=4", "--config.checkpoint.keep=2", "--config.sample.max_new_tokens=0",
]
CURVE_KEYS = ("step", "loss", "lr", "grad_norm", "eval_loss", "eval_ppl")


def train_command(workdir: str, steps: int, extra=()) -> list[str]:
  return [sys.executable, "-m", "jaxlm.cli", "train", "--config", "configs/demo.py",
          "--workdir", workdir, *TINY, f"--config.train.steps={steps}", *extra]


def env() -> dict:
  return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
              JAX_PLATFORMS="cpu", PYTHONPATH=REPO)


def run_to_end(workdir: str, steps: int, timeout: float = 300) -> None:
  result = subprocess.run(train_command(workdir, steps), capture_output=True, text=True,
                          check=False, timeout=timeout, cwd=REPO, env=env())
  if result.returncode:
    raise RuntimeError(f"train failed in {workdir}:\n{result.stderr[-3000:]}")


def logged_step(workdir: str) -> int:
  """The last step written to metrics.jsonl (0 if none yet)."""
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      lines = f.read().splitlines()
  except FileNotFoundError:
    return 0
  for line in reversed(lines):
    try:
      return int(json.loads(line)["step"])
    except (ValueError, KeyError):
      continue
  return 0


def kill_at(workdir: str, steps: int, kill_step: int, timeout: float = 300) -> int | None:
  """Starts training and SIGKILLs it once the log reaches `kill_step`.

  Returns the logged step seen at the kill, or None if the run ended first.
  """
  proc = subprocess.Popen(train_command(workdir, steps), cwd=REPO, env=env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + timeout
  while proc.poll() is None and time.monotonic() < deadline:
    seen = logged_step(workdir)
    if seen >= kill_step:
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      return seen
    time.sleep(0.002)
  proc.kill()
  proc.wait()
  return None


def curve(workdir: str) -> list[dict]:
  """The logged records without wall-clock fields."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [{k: r[k] for k in CURVE_KEYS if k in r} for r in records]


def final_params(workdir: str) -> dict:
  """{path: numpy array} of the newest checkpoint's params (restored params-only)."""
  import jax
  import numpy as np

  from jaxlm import rundir

  _, params = rundir.load_run(workdir)
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(params)}


def compare(reference: str, resumed: str) -> list[str]:
  """Differences between two run directories' loss curves and final params (empty if equal)."""
  problems = []
  ref_curve, res_curve = curve(reference), curve(resumed)
  if ref_curve != res_curve:
    diff = next((a, b) for a, b in zip(ref_curve + [None] * len(res_curve),
                                         res_curve + [None] * len(ref_curve)) if a != b)
    problems.append(f"metrics differ ({len(ref_curve)} vs {len(res_curve)} records); "
                    f"first difference: {diff}")
  ref_params, res_params = final_params(reference), final_params(resumed)
  bad = [k for k in ref_params if not (ref_params[k] == res_params.get(k)).all()]
  if bad or set(ref_params) != set(res_params):
    problems.append(f"final params differ in {bad or 'their keys'}")
  return problems


def one_round(root: str, reference: str, steps: int, rng: random.Random) -> dict:
  workdir = tempfile.mkdtemp(dir=root, prefix="killed-")
  kill_step = rng.randint(1, steps - 2)
  seen = kill_at(workdir, steps, kill_step)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  checkpoints = sorted(int(s) for s in os.listdir(ckpt_dir)
                       if s.isdigit()) if os.path.isdir(ckpt_dir) else []
  run_to_end(workdir, steps)
  problems = compare(reference, workdir)
  return {"kill_step": kill_step, "logged_at_kill": seen, "checkpoints_at_kill": checkpoints,
          "problems": problems}


def main():
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  rng = random.Random(args.seed)
  with tempfile.TemporaryDirectory() as root:
    # the runs compile the same programs: share one persistent XLA cache (reference fills it)
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(root, "xla_cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    reference = os.path.join(root, "reference")
    run_to_end(reference, args.steps)
    results = []
    for i in range(args.rounds):
      r = one_round(root, reference, args.steps, rng)
      results.append(r)
      status = "EQUAL" if not r["problems"] else "DIFFERENT: " + "; ".join(r["problems"])
      print(f"round {i + 1}: killed at logged step {r['logged_at_kill']} (target "
            f"{r['kill_step']}), checkpoints then {r['checkpoints_at_kill']} -> {status}",
            flush=True)
  killed = [r for r in results if r["logged_at_kill"] is not None]
  differing = [r for r in results if r["problems"]]
  print(f"summary: {len(results)} rounds, {len(killed)} killed mid-run, "
        f"{len(differing)} differing from the uninterrupted run")
  sys.exit(1 if differing else 0)


if __name__ == "__main__":
  main()
