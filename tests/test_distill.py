"""Tests jaxlm/train/distill.py (kind='distill'): the divergence equals TRL GKDTrainer's
generalized_jsd_loss on the same logits; the chunked loss and its gradients equal the whole-logits
path's; a student initialised from a tiny teacher run's layers trains through the one trainer,
logs its KD and CE parts and the teacher's own eval loss, and resumes bitwise; a sequence
classifier distils on the teacher's class probabilities; a teacher with another tokenizer or a
larger vocabulary is refused in one line."""

import ast
import importlib.util
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.config import base_config, model
from jaxlm.train import distill

# --- the divergence against TRL -------------------------------------------------------------------


def _trl_generalized_jsd_loss():
  """TRL's GKDTrainer.generalized_jsd_loss itself: its source read from the installed trl and run
  with torch (importing the trainer module pulls in transformers' Trainer stack, ~10 s)."""
  torch = pytest.importorskip("torch")
  spec = importlib.util.find_spec("trl")
  if spec is None:
    pytest.skip("trl is not installed")
  path = os.path.join(os.path.dirname(spec.origin), "experimental", "gkd", "gkd_trainer.py")
  tree = ast.parse(open(path).read())
  cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "GKDTrainer")
  fn = next(n for n in cls.body if getattr(n, "name", "") == "generalized_jsd_loss")
  fn.decorator_list = []
  namespace = {"torch": torch, "F": torch.nn.functional}
  exec(compile(ast.Module([fn], []), path, "exec"), namespace)
  return namespace["generalized_jsd_loss"], torch


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_divergence_equals_trls_generalized_jsd_loss(beta, temperature):
  """Random logits [2, 7, 33], some positions labelled -100 (left out); TRL's batchmean over the
  labelled positions against the mean of ours over them. beta=0 is KL(teacher || student)."""
  trl_loss, torch = _trl_generalized_jsd_loss()
  rng = np.random.default_rng(0)
  student = rng.normal(size=(2, 7, 33)).astype(np.float32) * 2
  teacher = rng.normal(size=(2, 7, 33)).astype(np.float32) * 2
  labels = rng.integers(0, 33, size=(2, 7))
  labels[0, :2] = labels[1, 5] = -100
  want = trl_loss(torch.tensor(student), torch.tensor(teacher), labels=torch.tensor(labels),
                  beta=beta, temperature=temperature).item()
  per_position = distill.generalized_jsd(jnp.asarray(student), jnp.asarray(teacher), beta=beta,
                                         temperature=temperature)
  got = float(per_position[labels != -100].mean())
  assert got == pytest.approx(want, abs=1e-5)
  if beta == 0:  # forward KL, by hand
    t = jax.nn.log_softmax(teacher / temperature)
    s = jax.nn.log_softmax(student / temperature)
    np.testing.assert_allclose(per_position, (jnp.exp(t) * (t - s)).sum(-1), atol=1e-5)


# --- chunked over positions -----------------------------------------------------------------------


def _whole(hs, w_s, ht, w_t, targets, weights, beta, temperature):
  s = jnp.einsum("btd,vd->btv", hs, w_s)
  t = jnp.einsum("bte,ve->btv", ht, w_t)
  kd, ce = distill._kd_and_ce(s, t, targets, beta=beta, temperature=temperature)
  return (kd * weights).sum(), (ce * weights).sum()


def test_chunked_loss_and_gradients_equal_the_whole_logits(beta=0.5):
  """T = 20 in chunks of 8 (the last padded); the student's vocabulary (96) larger than the
  teacher's (80), widths 16 and 24; the loss and its gradients of the student's hidden states and
  head."""
  B, T, D, E, V, Vt = 2, 20, 16, 24, 96, 80
  rng = np.random.default_rng(0)  # numpy: each eager jax.random call would compile a program
  hs, ht = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((B, T, D), (B, T, E)))
  w_s, w_t = (jnp.asarray(rng.normal(size=s) * 0.3, jnp.float32) for s in ((V, D), (Vt, E)))
  targets = jnp.asarray(rng.integers(0, Vt, (B, T)), jnp.int32)
  weights = jnp.asarray(rng.random((B, T)) > 0.3, jnp.float32)

  def loss(fn):
    def total(hs, w_s):
      kd, ce = fn(hs, w_s, ht, w_t)
      return 0.7 * 4.0 * kd + 0.3 * ce, (kd, ce)
    return jax.jit(jax.value_and_grad(total, argnums=(0, 1), has_aux=True))(hs, w_s)

  chunked = loss(lambda *a: distill.chunked_kd_sums(*a, targets, weights, chunk=8, beta=beta,
                                                    temperature=2.0))
  whole = loss(lambda *a: _whole(*a, targets, weights, beta, 2.0))
  (value, parts), grads = chunked
  (value_ref, parts_ref), grads_ref = whole
  np.testing.assert_allclose(value, value_ref, rtol=1e-5)
  np.testing.assert_allclose(parts, parts_ref, rtol=1e-5)
  for g, g_ref in zip(grads, grads_ref):
    np.testing.assert_allclose(g, g_ref, atol=1e-5, rtol=1e-4)


# --- a distill run through the one trainer --------------------------------------------------------

TINY = dict(num_layers=3, embed_dim=32, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64,
            max_seq_len=16, vocab_size=96)  # 96 > the ~65 characters: a padded vocabulary


def _lm_config(path, cache):
  c = base_config()
  c.model = model("smollm2-135m", **TINY)
  c.data.update({"source": "file", "path": path, "seq_len": 16, "tokenizer": "char",
                 "cache_dir": cache})
  c.train.update({"steps": 4, "batch_size": 8, "log_every": 1, "eval_every": 4,
                  "eval_batches": 1})
  c.optim.warmup_steps = 1
  c.checkpoint.update({"every": 2, "keep": 0, "use_async": False})
  c.sample.max_new_tokens = 0
  return c


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
  """A tiny 3-layer char-level decoder trained 2 steps on Tiny Shakespeare: (run dir, text
  file, the module's tmp dir)."""
  from conftest import SHARED_DATA

  from jaxlm.train import trainer

  path = os.path.join(SHARED_DATA, "tinyshakespeare", "input.txt")
  if not os.path.isfile(path):
    pytest.skip(f"Tiny Shakespeare not found at {path} (../shared/data is absent)")
  tmp = tmp_path_factory.mktemp("distill")
  c = _lm_config(path, str(tmp / "cache"))
  c.train.update({"steps": 2, "eval_every": 2})
  trainer.train(c, str(tmp / "teacher"))
  return str(tmp / "teacher"), path, tmp


def _distill_config(teacher_run):
  teacher, path, tmp = teacher_run
  c = _lm_config(path, str(tmp / "cache"))
  c.kind = "distill"
  c.model = model("smollm2-135m", loss_chunk=8, **TINY)  # sizes: the teacher's (init_layers)
  c.data.tokenizer = ""  # the teacher's
  c.distill.update({"teacher": teacher, "init_layers": (0, 2), "alpha": 0.7,
                    "temperature": 2.0, "divergence": "jsd", "beta": 0.5})
  return c


def _records(workdir):
  lines = open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()
  return [json.loads(line) for line in lines]


def test_a_student_from_teacher_layers_trains_logs_its_parts_and_resumes_bitwise(teacher_run):
  """Student layers 0, 1 start as teacher layers 0, 2 (embeddings, final norm and head copied);
  4 steps log the KD and CE parts (loss = alpha T^2 kd + (1 - alpha) ce) and the teacher's own
  eval loss; MFU counts the teacher's forward FLOPs; resumed at step 2 (the teacher read again),
  steps 3-4 are bitwise the same."""
  from jaxlm import devices, rundir
  from jaxlm.train import reporter, trainer

  c, tmp = _distill_config(teacher_run), teacher_run[2]
  run = trainer.setup(c, str(tmp / "setup"))
  assert run.model.cfg.num_layers == 2 and run.model.cfg.vocab_size == 96
  _, teacher = rundir.load_run(teacher_run[0])
  student = distill.layer_init_params(run.config, run.model)
  for j, i in enumerate((0, 2)):
    for a, b in zip(jax.tree.leaves(student[f"block_{j}"]), jax.tree.leaves(teacher[f"block_{i}"])):
      np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(student["embed"]["embedding"], teacher["embed"]["embedding"])
  per_token = (devices.model_flops_per_token(run.model.cfg, 16)
               + devices.model_flops_per_token(run.mode.teacher.cfg, 16, training=False))
  assert reporter.step_flops(run)((8, 16)) == pytest.approx(per_token * 8 * 16)

  first = str(tmp / "student")
  result = trainer.train(c, first)
  records = _records(first)
  steps = [r for r in records if "loss" in r]
  assert len(steps) == 4
  for r in steps:
    assert r["loss"] == pytest.approx(0.7 * 4.0 * r["distill/kd"] + 0.3 * r["distill/ce"],
                                      rel=1e-5)
    assert r["distill/kd"] > 0
  assert steps[-1]["loss"] < steps[0]["loss"]  # it learns
  evals = [r for r in records if "teacher_eval_loss" in r]
  assert [r["step"] for r in evals] == [0, 4]  # before the first step, and at the end
  assert evals[0]["teacher_eval_loss"] == evals[1]["teacher_eval_loss"]  # frozen
  assert result["eval_loss"] < evals[0]["eval_loss"]

  resumed = str(tmp / "resumed")
  shutil.copytree(first, resumed)
  c.checkpoint.restore_step = 2
  again = trainer.train(c, resumed)
  after = [r for r in _records(resumed) if "loss" in r][-2:]
  assert [(r["loss"], r["distill/kd"], r["distill/ce"]) for r in after] == \
    [(r["loss"], r["distill/kd"], r["distill/ce"]) for r in steps[2:]]  # bitwise
  assert again["eval_loss"] == result["eval_loss"]


def test_a_teacher_with_another_tokenizer_or_a_larger_vocabulary_is_refused(teacher_run):
  from jaxlm.data import tokenizers
  from jaxlm.train import trainer

  tmp = teacher_run[2]
  c = _distill_config(teacher_run)
  tok_dir = str(tmp / "other_tok")
  tokenizers.char_tokenizer("abcdefgh ij\n").save_pretrained(tok_dir)
  c.data.tokenizer = tok_dir
  c.distill.init_layers = ()
  c.model = model("smollm2-135m", **dict(TINY, vocab_size=0, num_layers=2))
  with pytest.raises(ValueError, match="has another tokenizer than the student"):
    trainer.setup(c, str(tmp / "refused1"))
  c.data.tokenizer = ""  # the teacher's tokenizer (student vocab 0: its ~65 tokens) < 96
  c.model.init_from = ""
  with pytest.raises(ValueError, match=r"vocab_size=96, more than the student's"):
    trainer.setup(c, str(tmp / "refused2"))


def test_a_sequence_classifier_distils_on_the_teachers_class_probabilities(tiny_bert, tmp_path):
  """SST-2 through the task pipeline: the student (init_layers=[0]: all of the 1-layer teacher,
  its new classifier too) starts equal to the teacher, so its step-0 dev accuracy is the
  teacher's and its first step's KD is 0; then it trains on soft labels and the labels."""
  from conftest import SHARED_DATA

  from jaxlm.config import finetune_config
  from jaxlm.train import trainer

  data_dir = os.path.join(SHARED_DATA, "glue")
  if not os.path.isdir(data_dir):
    pytest.skip(f"{data_dir} not found (../shared/data is absent)")
  c = finetune_config("sst2", data_dir, 64, epochs=1, lr=1e-3, batch_size=8, warmup_steps=0,
                      max_train_examples=16, max_eval_examples=16, buckets=(64,))
  c.kind = "distill"
  c.model.update(init_from="", dropout=0.0)
  c.distill.update({"teacher": tiny_bert, "init_layers": (0,), "alpha": 0.5})
  c.train.log_every = 1
  c.checkpoint.use_async = False
  result = trainer.train(c, str(tmp_path))
  records = _records(str(tmp_path))
  start = next(r for r in records if r["step"] == 0)
  assert start["dev_accuracy"] == start["dev_teacher_accuracy"]
  steps = [r for r in records if "loss" in r]
  assert len(steps) == 2 and steps[0]["distill/kd"] < 1e-6 < steps[-1]["distill/kd"]
  assert all(np.isfinite(r["distill/ce"]) for r in steps)
  assert np.isfinite(result["accuracy"]) and "teacher_accuracy" in result
