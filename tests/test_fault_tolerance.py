"""Fault tolerance with real faults: SIGKILL and resume, SIGKILL mid-save, SIGTERM, restore onto
other meshes, NaN guards, corrupt checkpoints, a full disk, and bad input with clear messages."""

import dataclasses
import importlib.util
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from jaxlm import checkpoint, rundir, runtime, sharding
from jaxlm.config import base_config
from jaxlm.data import pipeline
from jaxlm.train import objectives, trainer
from jaxlm.train import step as step_lib

_spec = importlib.util.spec_from_file_location(
  "kill_resume_check", os.path.join(REPO, "tools", "kill_resume_check.py"))
krc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(krc)


# --- helpers -------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def shared_compilation_cache(tmp_path_factory):
  """The training subprocesses of this module share one persistent XLA cache (compile once)."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.mktemp("xla_cache")))
    mp.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    mp.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    yield


@pytest.fixture
def text_file(tmp_path):
  rng = random.Random(0)
  words = ["alpha", "beta", "gamma", "delta", "kappa", "sigma", "omega", "\n"]
  path = tmp_path / "data.txt"
  path.write_text(" ".join(rng.choice(words) for _ in range(3000)))
  return str(path)


def tiny_config(data_path: str, **overrides):
  """A 1-layer, 32-dim model on a small text file; overrides as {"section.key": value}."""
  c = base_config()
  c.model.update({"num_layers": 1, "embed_dim": 32, "num_heads": 2, "max_seq_len": 64})
  c.data.update({"source": "file", "path": data_path, "seq_len": 16})
  c.train.update({"steps": 6, "batch_size": 8, "log_every": 1, "eval_every": 100,
                  "eval_batches": 1})
  c.optim.warmup_steps = 2
  c.checkpoint.update({"every": 1, "keep": 0})
  c.sample.max_new_tokens = 0
  for key, value in overrides.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


def records(workdir) -> list[dict]:
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def steps_on_disk(workdir) -> list[int]:
  return checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).all_steps()


def popen_train(workdir, *args):
  return subprocess.Popen(krc.train_command(str(workdir), *args), cwd=REPO, env=krc.env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# --- real processes ------------------------------------------------------------------------------

@pytest.mark.slow  # real processes killed and relaunched: the slow tier (pytest -m slow)
def test_sigkill_at_a_random_step_then_resume_equals_an_uninterrupted_run(tmp_path):
  steps = 16
  reference = str(tmp_path / "reference")
  krc.run_to_end(reference, steps)
  result = krc.one_round(str(tmp_path), reference, steps, random.Random(1))
  assert result["logged_at_kill"] is not None, "the run ended before it could be killed"
  assert result["problems"] == []
  assert len(krc.curve(reference)) >= steps


def test_sigkill_during_an_async_save_keeps_the_previous_checkpoint(tmp_path):
  """A bigger state so a save takes long enough to be caught with its temporary directory."""
  workdir = tmp_path / "run"
  ckpt_dir = workdir / "checkpoints"
  proc = popen_train(workdir, 400, ["--config.model.embed_dim=512", "--config.model.num_layers=2",
                                    "--config.checkpoint.every=3", "--config.checkpoint.keep=0"])
  partial, deadline = None, time.monotonic() + 240
  while proc.poll() is None and time.monotonic() < deadline and partial is None:
    names = os.listdir(ckpt_dir) if ckpt_dir.is_dir() else []
    finished = [n for n in names if n.isdigit()]
    partial = next((n for n in names if "tmp" in n and finished), None)
    if partial:
      proc.send_signal(signal.SIGKILL)
    time.sleep(0.001)
  proc.kill()
  proc.wait()
  assert partial, "never saw a save in progress"
  leftover = [n for n in os.listdir(ckpt_dir) if "tmp" in n]
  steps = steps_on_disk(workdir)
  assert steps and all(str(s) not in partial.split(".")[0] or str(s) != partial.split(".")[0]
                       for s in steps), (partial, steps)
  assert leftover, "the partial save should still be on disk, unlisted"
  _, params = rundir.load_run(str(workdir))  # the newest complete step restores
  assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(params))


def test_sigterm_finishes_the_step_saves_and_exits_with_a_resume_hint(tmp_path):
  workdir = tmp_path / "run"
  # the demo's 50 steps a call (no evaluation to cut them): SIGTERM stops at the end of a call
  proc = popen_train(workdir, 100000, ["--config.checkpoint.every=1000",
                                       "--config.train.eval_every=1000"])
  deadline = time.monotonic() + 240
  while krc.logged_step(str(workdir)) < 3 and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.01)
  sent = time.monotonic()
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=60)
  took = time.monotonic() - sent
  assert proc.returncode == 143, stderr[-2000:]
  assert took < 20, f"exit took {took:.1f} s after SIGTERM (stated bound: 20 s)"
  line = [ln for ln in stderr.splitlines() if "preempted by SIGTERM at step" in ln]
  assert line and "resume with: jaxlm train" in line[0], stderr[-2000:]
  step = int(line[0].split("at step ")[1].split(":")[0])
  assert steps_on_disk(workdir) == [step]
  assert 3 <= step < 100000 and krc.logged_step(str(workdir)) == step


def test_a_bad_checkpoint_key_is_one_line_on_the_command_line(tmp_path):
  result = subprocess.run(
    krc.train_command(str(tmp_path / "w"), 20, ["--config.checkpoint.best_mode=median"]),
    cwd=REPO, env=krc.env(), capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 1
  assert "checkpoint.best_mode='median' is not one of ('min', 'max')" in result.stderr
  assert "Traceback" not in result.stderr


# --- restore onto other meshes -------------------------------------------------------------------

def _on_mesh(run, data, fsdp, devices):
  """The same run on a (data, fsdp) mesh over `devices`."""
  mesh_cfg = types.SimpleNamespace(data=data, fsdp=fsdp, tensor=1)
  return dataclasses.replace(run, mesh=sharding.make_mesh(mesh_cfg, devices))


def _one_step(run, state, shardings, batch):
  train_fn = step_lib.jit_train_step(shardings, objectives.for_head("lm"))
  with sharding.mesh_rules(run.mesh):
    return train_fn(state, sharding.global_batch(batch, run.mesh))


def _next_loss(run, params, batch) -> float:
  """The loss the next train step reports: the forward loss of `batch` (no dropout)."""
  eval_fn = step_lib.jit_eval_step(run.model.apply, jax.tree.map(lambda x: x.sharding, params),
                                   objectives.for_head("lm"))
  with sharding.mesh_rules(run.mesh):
    sums = jax.device_get(eval_fn(params, sharding.global_batch(batch, run.mesh)))
  return float(sums["loss_sum"] / sums["weight"])


def test_a_checkpoint_from_a_2x4_mesh_restores_on_4x2_and_on_one_device(tmp_path, text_file):
  config = tiny_config(text_file)
  workdir = str(tmp_path)
  base = trainer.setup(config, workdir)
  batches = [next(base.mode.batches) for _ in range(2)]
  run = _on_mesh(base, 2, 4, jax.devices())
  state, shardings = step_lib.sharded_init(run.model, run.tx, jax.random.PRNGKey(0), run.mesh)
  state, _ = _one_step(run, state, shardings, batches[0])
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), use_async=True)
  ckpt.save(1, state, {"step": 1}, {})
  ckpt.wait()
  saved = jax.tree.map(np.asarray, state)
  ref_loss = _next_loss(run, state.params, batches[1])
  for data, fsdp, devices in ((4, 2, jax.devices()), (1, 1, jax.devices()[:1])):
    other = _on_mesh(base, data, fsdp, devices)
    abstract, _ = step_lib.abstract_state(other.model, other.tx, other.mesh)
    restored, data_state, _ = ckpt.restore(1, abstract)
    assert data_state == {"step": 1}
    assert jax.tree.leaves(restored.params)[0].sharding.mesh.shape["data"] == data
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(restored)):
      np.testing.assert_array_equal(a, np.asarray(b))
    np.testing.assert_allclose(_next_loss(other, restored.params, batches[1]), ref_loss,
                               rtol=1e-6)
  params = ckpt.restore_params(1, abstract.params)  # params only, on the 1-device mesh
  for a, b in zip(jax.tree.leaves(saved.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, np.asarray(b))
  ckpt.close()


# --- guards --------------------------------------------------------------------------------------

class _Poisoned:
  """A train iterator that adds loss weights to every batch; the 4th batch (step 4) gets NaN
  weights."""

  def __init__(self, inner):
    self.inner, self.step = inner, 0

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self.inner)
    weights = np.full(batch["targets"].shape, np.nan if self.step == 3 else 1.0, np.float32)
    self.step += 1
    return {**batch, "weights": weights}

  def get_state(self):
    return {"inner": self.inner.get_state(), "step": self.step}

  def set_state(self, state):
    self.inner.set_state(state["inner"])
    self.step = state["step"]


def _poison(monkeypatch):
  real = pipeline.build

  def build(*args, **kwargs):
    data = real(*args, **kwargs)
    return dataclasses.replace(data, train=_Poisoned(data.train))

  monkeypatch.setattr(pipeline, "build", build)


@pytest.mark.parametrize("per_call, every", [(1, 3), (4, 2)])  # (4, 2): calls 1-2, 3-4, 5
def test_a_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    tmp_path, text_file, monkeypatch, per_call, every):
  _poison(monkeypatch)
  config = tiny_config(text_file, **{"train.steps": 5, "checkpoint.every": every,
                                     "train.steps_per_call": per_call})
  with pytest.raises(FloatingPointError, match="at step 4; stopping. The last good checkpoint "
                     f"is step {every}"):
    trainer.train(config, str(tmp_path))
  assert steps_on_disk(tmp_path) == [every]
  # the steps before the bad one are logged, those in its own call too
  assert [r["step"] for r in records(tmp_path) if "loss" in r] == [1, 2, 3]
  _, params = rundir.load_run(str(tmp_path))
  assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(params))


@pytest.mark.parametrize("per_call", [1, 5])  # 5: one call, each step's own count
def test_skip_nonfinite_skips_and_counts_the_bad_batch(tmp_path, text_file, monkeypatch, per_call):
  _poison(monkeypatch)
  config = tiny_config(text_file, **{"train.skip_nonfinite": 2, "train.steps": 5,
                                     "checkpoint.every": 5, "train.steps_per_call": per_call})
  trainer.train(config, str(tmp_path))
  logged = [r for r in records(tmp_path) if "loss" in r]
  assert [r["skipped_nonfinite"] for r in logged] == [0, 0, 0, 1, 1]
  assert np.isnan(logged[3]["loss"]) and np.isfinite(logged[4]["loss"])
  assert steps_on_disk(tmp_path) == [5]
  _, params = rundir.load_run(str(tmp_path))
  assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(params))


def _truncate_arrays(step_dir):
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    for name in files:
      path = os.path.join(root, name)
      if os.path.getsize(path) > 64:
        with open(path, "r+b") as f:
          f.truncate(16)


def test_a_truncated_checkpoint_is_named_and_an_older_step_offered(tmp_path, text_file):
  trainer.train(tiny_config(text_file, **{"train.steps": 4, "checkpoint.every": 2}), str(tmp_path))
  with pytest.raises(ValueError, match="model.embed_dim=32 there but 64 now"):
    trainer.train(tiny_config(text_file, **{"model.embed_dim": 64}), str(tmp_path))
  _truncate_arrays(tmp_path / "checkpoints" / "4")
  config = tiny_config(text_file, **{"train.steps": 6, "checkpoint.every": 2})
  with pytest.raises(ValueError) as err:
    trainer.train(config, str(tmp_path))
  message = str(err.value)
  assert f"checkpoint {tmp_path}/checkpoints/4 is corrupt or incomplete" in message
  assert "--config.checkpoint.restore_step=N (N in [2])" in message
  with open(tmp_path / "metrics.jsonl", "a") as f:  # and a record cut short by a kill
    f.write('{"step": 5, "lo')
  config.checkpoint.restore_step = 2  # the offered way out
  out = trainer.train(config, str(tmp_path))
  assert out["step"] == 6 and steps_on_disk(tmp_path) == [2, 4, 6]
  logged = [r["step"] for r in records(tmp_path) if "loss" in r]
  assert logged == [1, 2, 3, 4, 5, 6], "records after the restored step must be replaced"
  assert os.path.isdir(f"{tmp_path}/checkpoints.after-2/4")


def test_a_checkpoint_missing_its_array_data_is_named(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), use_async=False)
  state = {"w": jnp.ones((64,), jnp.float32)}
  for step in (1, 2):
    ckpt.save(step, state, {"step": step}, {})
  shutil.rmtree(tmp_path / "2" / "state" / "d")  # the array chunks, as if lost
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  with pytest.raises(ValueError, match=f"checkpoint {tmp_path}/2 is corrupt or incomplete .*"
                     r"restore_step=N \(N in \[1\]\)"):
    ckpt.restore(2, abstract)
  restored, _, _ = ckpt.restore(1, abstract)
  np.testing.assert_array_equal(np.asarray(restored["w"]), 1.0)
  ckpt.close()


def test_a_replicated_state_saves_without_compiling_and_restores_exactly(tmp_path):
  """Orbax writes an array held whole by several devices cooperatively, a slice per replica, which
  compiles a slicing program per shape; below MIN_REPLICA_SLICE_BYTES one replica writes it."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  rng = np.random.default_rng(0)
  state = {"w": jax.device_put(rng.normal(size=(6, 94)).astype(np.float32), replicated),
           "b": jax.device_put(rng.normal(size=(94,)).astype(np.float32), replicated)}
  ckpt = checkpoint.Checkpointer(str(tmp_path), use_async=True)
  before = runtime.compile_stats()
  ckpt.save(1, state, {"step": 1}, {})
  ckpt.wait()
  after = runtime.compile_stats()
  assert (after["xla_compiles"] + after["cache_hits"]
          == before["xla_compiles"] + before["cache_hits"]), "saving ran a compiled program"
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  restored, data, _ = ckpt.restore(1, abstract)
  for k in state:
    np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(state[k]))
    assert restored[k].sharding == replicated
  assert data == {"step": 1}
  ckpt.close()


def test_a_full_disk_fails_the_save_loudly_and_keeps_older_checkpoints(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), use_async=True)
  state = {"w": jnp.arange(200_000, dtype=jnp.float32)}
  ckpt.save(1, state, {"step": 1}, {})
  ckpt.wait()
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes fail with EFBIG instead
  resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
  try:
    with pytest.raises(checkpoint.SaveError) as err:
      ckpt.save(2, {"w": state["w"] + 1}, {"step": 2}, {})
      ckpt.wait()
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, old_handler)
  assert "saving checkpoint step 2" in str(err.value)
  assert "older checkpoints are intact: steps [1]" in str(err.value)
  ckpt.manager.reload()
  assert ckpt.all_steps() == [1]
  abstract = {"w": jax.ShapeDtypeStruct((200_000,), jnp.float32,
                                        sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}
  restored, data, _ = ckpt.restore(1, abstract)
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(state["w"]))
  assert data == {"step": 1}


def test_retention_keeps_the_newest_the_best_and_every_kth(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=1, use_async=False, keep_best=2,
                                 best_metric="eval_loss", keep_period=4)
  losses = {1: 3.0, 2: 1.0, 3: 2.5, 4: 2.9, 5: 1.5, 6: 2.8, 7: 2.7}
  for step, loss in losses.items():
    ckpt.save(step, {"w": jnp.full((4,), step, jnp.float32)}, {"step": step}, {},
              {"eval_loss": loss})
  assert ckpt.all_steps() == [2, 4, 5, 7]  # best two (2, 5), every 4th (4), newest (7)
  ckpt.close()


# --- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, error, message", [
  ({"checkpoint.best_mode": "median"}, ValueError,
   "checkpoint.best_mode='median' is not one of ('min', 'max')"),
  ({"checkpoint.keep_best": 2, "checkpoint.best_metric": "accuracy"}, ValueError,
   "checkpoint.best_metric='accuracy' is not one of ('eval_loss', 'eval_ppl')"),
  ({"checkpoint.every": 0}, ValueError, "checkpoint.every=0 must be >= 1"),
  ({"checkpoint.keep": -1}, ValueError, "checkpoint.keep=-1 must be >= 0"),
  ({"checkpoint.restore_step": 7}, ValueError,
   "checkpoint.restore_step=7 is not in"),
  ({"train.skip_nonfinite": -1}, ValueError, "train.skip_nonfinite=-1 must be >= 0"),
  ({"train.steps_per_call": 0}, ValueError, "train.steps_per_call=0 must be >= 1"),
  ({"model.vocab_size": 3}, ValueError, "the tokenizer has"),
  ({"data.seq_len": 65}, ValueError, "data.seq_len=65 exceeds model.max_seq_len=64"),
  ({"data.path": "/no/such/file.txt"}, FileNotFoundError, "data file not found"),
  ({"data.path": ""}, ValueError, "data.source='file' needs data.path"),
  ({"data.source": "ftp"}, ValueError, "data.source='ftp' is not one of"),
])
def test_bad_input_gets_a_clear_message(tmp_path, text_file, overrides, error, message):
  with pytest.raises(error) as err:
    trainer.train(tiny_config(text_file, **overrides), str(tmp_path / "w"))
  assert message in str(err.value)
  assert "\n" not in str(err.value)


def test_an_empty_data_file_is_named(tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  with pytest.raises(ValueError, match="is empty"):
    trainer.train(tiny_config(str(empty)), str(tmp_path / "w"))


def test_a_checkpoint_without_an_iterator_state_restores_none(tmp_path):
  """None (not {}) tells the loop to replay the stream to the step instead of set_state({})."""
  ckpt = checkpoint.Checkpointer(str(tmp_path), use_async=False)
  state = {"w": jnp.arange(4.0)}
  ckpt.save(1, state, {}, {})
  abstract = {"w": jax.ShapeDtypeStruct((4,), jnp.float32,
                                        sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}
  restored, data, _ = ckpt.restore(1, abstract)
  assert data is None
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(4.0))
  ckpt.close()
