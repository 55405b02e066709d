"""The command line, run as a user runs it: train a tiny config, generate, plot, and bad input."""

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO

TINY = [
  "--config.model.num_layers=1", "--config.model.embed_dim=32", "--config.model.num_heads=2",
  "--config.data.seq_len=32", "--config.train.steps=30", "--config.train.batch_size=4",
  "--config.train.eval_every=20", "--config.train.eval_batches=2", "--config.train.log_every=5",
  "--config.optim.warmup_steps=5", "--config.checkpoint.every=20",
  "--config.sample.max_new_tokens=20", "--config.train.steps_per_call=10",
]


def jaxlm(*args, timeout=300):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  return subprocess.run([sys.executable, "-m", "jaxlm.cli", *args], capture_output=True,
                        text=True, timeout=timeout, cwd=REPO, env=env)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  result = jaxlm("train", "--config", "configs/demo.py", "--workdir", workdir, *TINY)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result


def test_train_writes_the_run_directory(trained_run):
  workdir, result = trained_run
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["20", "30"]
  assert os.path.isfile(os.path.join(workdir, "tokenizer", "tokenizer.json"))
  config = json.load(open(os.path.join(workdir, "config.json")))
  assert config["train"]["steps"] == 30 and config["model"]["vocab_size"] > 50
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  steps = [r for r in records if "loss" in r]
  evals = [r for r in records if "eval_loss" in r]
  assert [r["step"] for r in steps] == [5, 10, 15, 20, 25, 30]
  assert all({"loss", "lr", "grad_norm"} <= set(r) for r in steps)
  # calls of 10 steps: the first (it compiles) is left out of the throughput
  assert [r["step"] for r in steps if {"tokens_per_sec", "mfu"} <= set(r)] == [15, 20, 25, 30]
  summary = records[-1]  # the closing record: where the wall time went
  assert {"goodput", "time_to_first_step", "compile_seconds", "mean_mfu"} <= set(summary)
  assert "goodput=" in result.stderr and "mean_mfu=" in result.stderr  # the closing result
  assert "goodput" in result.stdout and "MFU" in result.stdout  # the closing summary line
  assert [r["step"] for r in evals] == [20, 30]
  assert steps[-1]["loss"] < steps[0]["loss"]
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  assert result.stdout.strip(), "no closing sample printed"


def test_generate_reads_the_run_directory(trained_run):
  workdir, _ = trained_run
  result = jaxlm("generate", "--workdir", workdir, "--prompt", "def ", "--max_new_tokens", "25",
                 "--seed", "3")
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.startswith("def ") and len(result.stdout.rstrip("\n")) >= 4 + 25 - 5
  again = jaxlm("generate", "--workdir", workdir, "--prompt", "def ", "--max_new_tokens", "25",
                "--seed", "3")
  assert again.stdout == result.stdout, "sampling with a fixed seed must be reproducible"
  # the second launch loads every program from the persistent compilation cache
  assert "time to first token" in again.stderr, again.stderr[-2000:]
  compiled, loaded = re.search(r"(\d+) programs compiled, (\d+) loaded", again.stderr).groups()
  assert int(compiled) == 0 and int(loaded) > 0, again.stderr[-2000:]


def test_rerun_resumes_from_the_last_checkpoint(trained_run, tmp_path):
  workdir, _ = trained_run
  result = jaxlm("train", "--config", "configs/demo.py", "--workdir", workdir, *TINY,
                 "--config.train.steps=35", "--config.sample.max_new_tokens=0")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "resuming from checkpoint step 30" in result.stderr + result.stdout
  assert "35" in os.listdir(os.path.join(workdir, "checkpoints"))


def test_plot_draws_a_png(trained_run, tmp_path):
  workdir, _ = trained_run
  out = str(tmp_path / "loss.png")
  result = jaxlm("plot", "--workdir", workdir, "--out", out)
  assert result.returncode == 0, result.stderr
  assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_eval_scores_the_held_out_tail_and_refuses_another_split(trained_run):
  workdir, _ = trained_run
  refused = jaxlm("eval", "--workdir", workdir, "--split", "test")
  assert refused.returncode == 1 and "Traceback" not in refused.stderr
  assert ("jaxlm: error: --split='test': a kind='lm' run has one held-out split, 'dev' (the "
          "data.val_fraction tail of its data); use --split=dev\n") in refused.stderr
  assert not refused.stdout
  scored = jaxlm("eval", "--workdir", workdir)  # the newest checkpoint, as the run scored it
  assert scored.returncode == 0, scored.stderr[-3000:]
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  last = [r for r in records if "eval_loss" in r][-1]
  printed = float(re.search(r"^eval_loss=(\S+) ", scored.stdout).group(1))
  assert printed == pytest.approx(last["eval_loss"], abs=1e-4)


@pytest.mark.parametrize("args, message", [
  (["--config.train.stepz=5"], "stepz"),
  (["--config.train.steps=many"], "steps"),
  (["--config.data.source=file", "--config.data.path=/no/such/file.txt"],
   "data file not found: '/no/such/file.txt'"),
  (["--config.data.seq_len=4096"], "exceeds model.max_seq_len"),
  (["--config.data.tokenizer=/no/such/tokenizer"], "cannot load tokenizer"),
  (["--config.optim.name=adam9"], "optim.name='adam9' is not one of"),
  (["--config.model.norm=batchnorm"], "model.norm='batchnorm' is not one of"),
])
def test_bad_input_fails_with_a_clear_message(tmp_path, args, message):
  result = jaxlm("train", "--config", "configs/demo.py", "--workdir", str(tmp_path / "w"), *TINY,
                 *args, timeout=120)
  assert result.returncode != 0
  assert message in result.stderr
  assert "Traceback" not in result.stderr, result.stderr[-2000:]


def test_missing_workdir_and_command_are_usage_errors(tmp_path):
  assert "needs --workdir" in jaxlm("train", "--config", "configs/demo.py").stderr
  assert "usage: jaxlm" in jaxlm("fly", "--workdir", str(tmp_path)).stderr
  assert "not a jaxlm run directory" in jaxlm("generate", "--workdir", str(tmp_path)).stderr


def _main_in_process(capsys, *args) -> tuple[int, str]:
  """(exit code, stderr) of jaxlm.cli.main run in this process."""
  from jaxlm import cli

  with pytest.raises(SystemExit) as exit_info:
    cli.main(["jaxlm", *args])
  return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
  (["plot", "--top_k", "5"], "plot does not take --top_k; its flags: --workdir, --out"),
  (["eval", "--config.train.steps=3"],
   "eval does not take --config.train.steps; its flags: --workdir, --split"),
  (["train", "--config", "configs/demo.py", "--nodebug", "--seed", "1"],  # all take --debug
   "train does not take --seed; its flags: --config, --workdir"),
  (["convert", "--from-hf", "x", "--prompt", "hi"], "convert does not take --prompt"),
])
def test_a_flag_of_another_command_is_a_usage_error(tmp_path, capsys, args, message):
  code, err = _main_in_process(capsys, *args, "--workdir", str(tmp_path))
  assert code == 2
  assert f"jaxlm: error: {message}" in err and err.count("\n") == 1, err
  # absl's FLAGS is global: the flags of that call must not leak into the next one
  code, err = _main_in_process(capsys, "plot", "--workdir", str(tmp_path))
  assert code == 1 and "metrics.jsonl not found" in err and "does not take" not in err, err


def test_the_cpu_split_reads_the_model_size_from_the_config_alone(tmp_path):
  """A saved run's config holds its model; a new run's model.init_from is read for its size (no
  weights); a source that cannot be read counts as small (the run itself then says why)."""
  from jaxlm import cli
  from jaxlm.config import base_config, model

  saved = base_config()
  saved.model = model("smollm2-135m")
  saved.model.init_from = str(tmp_path / "gone")  # a saved run's source may be gone
  assert cli._weight_count(saved, resolved=True) == 134_479_872
  assert cli._weight_count(saved, resolved=False) == 0
  hf = tmp_path / "hf"
  hf.mkdir()
  (hf / "config.json").write_text(json.dumps({
    "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
    "max_position_embeddings": 8192, "tie_word_embeddings": True, "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0}))
  fresh = base_config()
  fresh.model.init_from = str(hf)  # a new run: its model section still holds the defaults
  assert cli._weight_count(fresh, resolved=False) == 134_479_872
