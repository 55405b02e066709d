"""Tests jaxlm/rundir.py: the run directory's files, reading a run without writing to it (also
through `jaxlm generate` and `jaxlm convert --to-hf`), `model.init_from` another run, and the
start-up precedence end to end (resume > init_from > scratch; jaxlm/train/startup.py, whose own
tests are test_startup.py)."""

import hashlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxlm import rundir
from jaxlm.config import base_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(text_path, **train):
  c = base_config()
  c.model.update({"num_layers": 1, "embed_dim": 32, "num_heads": 2, "max_seq_len": 32})
  c.data.update({"source": "file", "path": str(text_path), "seq_len": 16})
  c.train.update({"steps": 2, "batch_size": 8, "log_every": 1, "eval_every": 2,
                  "eval_batches": 1, **train})
  c.optim.update(warmup_steps=1, decay_steps=4)  # one schedule for runs of 1 or 2 steps
  c.checkpoint.update({"every": 2, "use_async": False})
  c.sample.max_new_tokens = 0
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny character-level run, trained for 2 steps: (its directory, its text file)."""
  from jaxlm.train import trainer

  tmp = tmp_path_factory.mktemp("rundir")
  text = tmp / "text.txt"
  text.write_text("to be or not to be, that is the question\n" * 40)
  workdir = str(tmp / "run")
  trainer.train(_config(text), workdir)
  return workdir, text


def _snapshot(workdir) -> dict:
  """{relative path: sha256} of every file under `workdir`."""
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _jaxlm(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "jaxlm.cli", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600, check=False)


def test_the_run_directory_holds_config_tokenizer_checkpoints_and_metrics(trained):
  workdir, _ = trained
  names = set(os.listdir(workdir))
  assert {rundir.CONFIG_FILE, rundir.TOKENIZER_DIR, rundir.CHECKPOINT_DIR,
          rundir.METRICS_FILE, rundir.TENSORBOARD_DIR} <= names
  config = rundir.read_config(workdir)
  assert config.kind == "lm" and config.model.vocab_size == len(rundir.load_tokenizer(workdir))
  saved, params = rundir.load_run(workdir)
  assert saved.model_cfg.embed_dim == 32
  assert params["embed"]["embedding"].shape == (config.model.vocab_size, 32)


def test_generate_and_convert_leave_the_run_directory_byte_identical(trained, tmp_path):
  workdir, _ = trained
  before = _snapshot(workdir)
  gen = _jaxlm("generate", "--workdir", workdir, "--prompt", "to be", "--max_new_tokens", "5")
  assert gen.returncode == 0, gen.stderr[-2000:]
  out = _jaxlm("convert", "--workdir", workdir, "--to-hf", str(tmp_path / "hf"))
  assert out.returncode == 0, out.stderr[-2000:]
  rundir.load_run(workdir)
  assert _snapshot(workdir) == before


def test_init_from_another_run_reads_it_without_writing_and_resume_comes_first(
    trained, tmp_path, monkeypatch):
  """A second run starting from the first has its weights (learning rate 0 keeps them) and the
  first run's directory is unchanged; rerun, it resumes from its own checkpoint and never reads
  model.init_from again."""
  from jaxlm.train import trainer

  workdir, text = trained
  before = _snapshot(workdir)
  c = _config(text, steps=1, eval_every=1)
  c.model.init_from = workdir
  c.optim.update(lr=0.0, min_lr=0.0, warmup_steps=0)
  child = str(tmp_path / "child")
  trainer.train(c, child)
  assert _snapshot(workdir) == before
  _, parent = rundir.load_run(workdir)
  _, params = rundir.load_run(child)
  for a, b in zip(jax.tree.leaves(parent), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert rundir.read_config(child).model.init_from == workdir

  def no_import(*args, **kwargs):
    raise AssertionError("a resumed run read the weights of model.init_from")

  monkeypatch.setattr(rundir, "init_params", no_import)
  c.train.steps = 2
  assert trainer.train(c, child)["step"] == 2


def test_a_directory_that_is_not_a_run_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="is not a jaxlm run directory"):
    rundir.read_config(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no tokenizer in"):
    rundir.load_tokenizer(str(tmp_path))
  assert not rundir.is_run_dir(str(tmp_path)) and not os.listdir(tmp_path)
  with pytest.raises(ValueError, match="no run directory given"):
    rundir.path("")


def test_config_round_trips_and_is_written_atomically(tmp_path):
  c = base_config()
  c.train.steps = 7
  rundir.write_config(str(tmp_path), c)
  assert rundir.read_config(str(tmp_path)).train.steps == 7
  assert sorted(os.listdir(tmp_path)) == [rundir.CONFIG_FILE]  # no temporary file left


def test_a_bucket_path_stays_remote():
  """gs:// paths are epaths on their bucket, never a local folder named 'gs:'."""
  p = rundir.path("gs://bucket/run")
  assert os.fspath(p).startswith("gs://bucket/run") and not rundir.is_local(p)
  assert rundir.is_local(rundir.path("runs/x"))
  assert os.path.isabs(os.fspath(rundir.path("runs/x")))


def test_trim_metrics_drops_records_after_the_step_and_lines_cut_short(tmp_path):
  lines = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3, 4)] + ['{"step": 5, "lo']
  (tmp_path / rundir.METRICS_FILE).write_text("\n".join(lines))
  assert rundir.trim_metrics(str(tmp_path), 2) == 3
  kept = (tmp_path / rundir.METRICS_FILE).read_text().splitlines()
  assert [json.loads(x)["step"] for x in kept] == [1, 2]
  assert rundir.trim_metrics(str(tmp_path), 2) == 0
