"""Multi-process runs for real: N `jaxlm` processes on localhost joined by jax.distributed (gloo
CPU collectives), each with its own CPU devices, against one process with 8 devices (the pytest
process): the same losses for a data mesh on 2 processes x 4 devices and an FSDP x tensor mesh
on 4 x 2 (and two steps per jitted call on 2 x 4), exact resumption after SIGKILL of every
process, SIGTERM to one process stopping all at one step (then resumed on one process).
Fine-tuning and `jaxlm eval` on several processes: tests/test_multihost_tasks.py.

These spawn real processes: the costliest tests of the suite, kept to a tiny model and few steps.
"""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import REPO

pytestmark = pytest.mark.slow  # the slow tier: python -m pytest tests -m slow

STEPS = 8
MESHES = {"data": (-1, 1, 1), "fsdp": (1, -1, 1), "fsdp_tensor": (1, -1, 2)}

CONFIG = '''
from jaxlm.config import base_config, model


def get_config():
  c = base_config()
  c.model = model(num_layers=2, embed_dim=32, num_heads=2, mlp_dim=64, max_seq_len=16,
                  param_dtype="float32", dtype="float32")
  c.data.update(source="file", path={text!r}, tokenizer="char", seq_len=16, packing={packing!r},
                truncate=True, add_eos=False, val_fraction=0.1, read_threads=1,
                cache_dir={cache!r})
  c.train.update(steps={steps}, batch_size=8, log_every=1, eval_every=4, eval_batches=1)
  c.optim.update(lr=3e-3, warmup_steps=0)
  c.checkpoint.update(every=2, use_async=True)
  c.sample.update(max_new_tokens=8, prompt="a")
  return c
'''


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(**extra) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") and k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO, **extra)
  return env


def launch(n: int, devices: int, args: list[str], logdir) -> list[subprocess.Popen]:
  """`jaxlm ARGS` as `n` processes joined by jax.distributed, each with `devices` CPU devices
  (train; other commands take the run's saved count); output to logdir/proc-I.log."""
  port, procs = _free_port(), []
  for i in range(n):
    extra = {} if n == 1 else {"JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
                               "JAX_NUM_PROCESSES": str(n), "JAX_PROCESS_ID": str(i)}
    with open(os.path.join(logdir, f"proc-{i}.log"), "w") as log:  # the child keeps its copy
      procs.append(subprocess.Popen(
        [sys.executable, "-m", "jaxlm.cli", *args,
         *([f"--config.runtime.cpu_devices={devices}"] if args[0] == "train" else [])],
        env=_env(**extra), stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
  return procs


def wait(procs, logdir, timeout=1200, codes=(0,)) -> list[str]:
  """Waits for every process; returns their logs, failing with them on an unexpected code."""
  deadline, out = time.time() + timeout, []
  for p in procs:
    try:
      p.wait(max(deadline - time.time(), 1))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
  for i in range(len(procs)):
    with open(os.path.join(logdir, f"proc-{i}.log")) as f:
      out.append(f.read())
  for p, log in zip(procs, out):
    assert p.returncode in codes, f"exit {p.returncode}:\n{log[-3000:]}"
  return out


def train(n, devices, cfg_file, workdir, *overrides, timeout=1200):
  os.makedirs(workdir, exist_ok=True)
  args = ["train", "--config", cfg_file, "--workdir", workdir, *overrides]
  return wait(launch(n, devices, args, workdir), workdir, timeout)


def losses(workdir, key="loss") -> list[float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = f.read().splitlines()
  return [r[key] for r in map(json.loads, lines) if key in r]


def params(workdir):
  from jaxlm import rundir

  _, p = rundir.load_run(workdir)
  return [np.asarray(x) for x in jax.tree.leaves(p)]


def mesh_flags(mesh: str) -> list[str]:
  return [f"--config.mesh.{k}={v}" for k, v in zip(("data", "fsdp", "tensor"), MESHES[mesh])]


def write_config(tmp, text, packing, steps=STEPS) -> str:
  path = os.path.join(tmp, f"tiny_{packing}.py")
  with open(path, "w") as f:
    f.write(CONFIG.format(text=text, packing=packing, steps=steps,
                          cache=os.path.join(tmp, "cache")))
  return path


def in_process(cfg_file, workdir, mesh="data"):
  """The same run in this (pytest) process: one process, 8 devices."""
  from jaxlm.train import trainer

  spec = importlib.util.spec_from_file_location("tiny_config", cfg_file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.mesh.update(dict(zip(("data", "fsdp", "tensor"), MESHES[mesh])))
  return trainer.train(c, workdir)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A small text (char tokenizer): lines of words, so documents pack unevenly."""
  tmp = str(tmp_path_factory.mktemp("mh"))
  rng = np.random.default_rng(0)
  words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis"]
  text = "".join(" ".join(rng.choice(words, rng.integers(2, 9))) + "\n" for _ in range(600))
  path = os.path.join(tmp, "corpus.txt")
  with open(path, "w") as f:
    f.write(text)
  return tmp, path


@pytest.fixture(scope="module")
def packed_runs(corpus):
  """The packed-document (Grain best_fit) run on 1 process x 8 devices and 2 x 4 (data mesh)."""
  tmp, text = corpus
  cfg = write_config(tmp, text, "best_fit")
  one, two = os.path.join(tmp, "one"), os.path.join(tmp, "two")
  in_process(cfg, one)
  logs = train(2, 4, cfg, two)
  return cfg, one, two, logs


def _close(a, b, rel=1e-5):
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape and np.all(np.abs(a - b) <= rel * np.abs(b)), (a, b)


def test_two_processes_train_like_one_and_log_sample_only_on_process_0(packed_runs):
  _, one, two, logs = packed_runs
  assert len(losses(two)) == STEPS
  _close(losses(two), losses(one))
  _close(losses(two, "eval_loss"), losses(one, "eval_loss"))
  for x, y in zip(params(two), params(one)):
    np.testing.assert_allclose(x, y, atol=1e-5)
  assert "parameters; mesh" in logs[0] and "parameters; mesh" not in logs[1]
  # every process wrote its own data iterator state into the checkpoint
  names = set(os.listdir(os.path.join(two, "checkpoints", str(STEPS), "data")))
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= names
  assert not os.path.exists(os.path.join(REPO, "gs:"))


def test_two_processes_with_several_steps_per_call_train_like_one(packed_runs):
  """train.steps_per_call=2: each process stacks its rows of two steps ([2, rows, T]) and the
  global batch is split on its second axis; the same losses as one step a call on one process."""
  cfg, one, two, _ = packed_runs
  stacked = os.path.join(os.path.dirname(two), "two_per_call")
  train(2, 4, cfg, stacked, "--config.train.steps_per_call=2")
  assert len(losses(stacked)) == STEPS
  _close(losses(stacked), losses(one))
  _close(losses(stacked, "eval_loss"), losses(one, "eval_loss"))


@pytest.mark.parametrize("mesh,nproc", [("fsdp_tensor", 4)])  # fsdp alone: test_sharding
def test_sharded_meshes_on_several_processes_log_the_losses_of_one(corpus, mesh, nproc):
  tmp, text = corpus
  cfg = write_config(tmp, text, "none", steps=4)
  one, many = os.path.join(tmp, f"{mesh}-1"), os.path.join(tmp, f"{mesh}-{nproc}")
  in_process(cfg, one, mesh)
  train(nproc, 8 // nproc, cfg, many, *mesh_flags(mesh))
  _close(losses(many), losses(one))
  assert len(losses(many)) == 4


def test_a_killed_packed_run_relaunched_continues_exactly(packed_runs):
  """SIGKILL of both processes once a checkpoint is on disk; the same command again logs the
  uninterrupted run's losses and ends with bitwise-equal params."""
  cfg, _, two, _ = packed_runs
  cut = os.path.join(os.path.dirname(two), "cut")
  os.makedirs(cut)
  procs = launch(2, 4, ["train", "--config", cfg, "--workdir", cut], cut)
  ckpts, deadline = os.path.join(cut, "checkpoints"), time.time() + 1200
  while not (os.path.isdir(ckpts) and any(s.isdigit() for s in os.listdir(ckpts))):
    assert time.time() < deadline and all(p.poll() is None for p in procs)
    time.sleep(0.05)
  for p in procs:
    p.send_signal(signal.SIGKILL)
  [p.wait() for p in procs]
  saved = max(int(s) for s in os.listdir(ckpts) if s.isdigit())
  assert saved < STEPS
  train(2, 4, cfg, cut)
  assert losses(cut) == losses(two)
  assert losses(cut, "eval_loss") == losses(two, "eval_loss")
  for x, y in zip(params(cut), params(two)):
    np.testing.assert_array_equal(x, y)


def test_sigterm_to_one_process_stops_both_at_one_step_and_one_process_resumes(packed_runs):
  """JAX's preemption sync point: SIGTERM to process 1 alone; both save the same step and exit
  143; the run then resumes on 1 process x 8 devices (the data state is portable)."""
  cfg, _, two, _ = packed_runs
  cut = os.path.join(os.path.dirname(two), "term")
  os.makedirs(cut)
  procs = launch(2, 4, ["train", "--config", cfg, "--workdir", cut], cut)
  deadline = time.time() + 1200
  while not os.path.exists(os.path.join(cut, "metrics.jsonl")) or not losses(cut):
    assert time.time() < deadline and all(p.poll() is None for p in procs)
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)
  logs = wait(procs, cut, codes=(143,))
  stops = {line.split(" at step ")[1].split(":")[0] for log in logs
           for line in log.splitlines() if "preempted by" in line}
  assert len(stops) == 1, logs
  stop = int(stops.pop())
  assert stop < STEPS and os.path.isdir(os.path.join(cut, "checkpoints", str(stop)))
  in_process(cfg, cut)
  _close(losses(cut), losses(two))
  assert len(losses(cut)) == STEPS
