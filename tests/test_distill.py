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
  """T = 50 in chunks of 16 (the last padded); the student's vocabulary (96) larger than the
  teacher's (80), widths 16 and 24; the loss and its gradients of the student's hidden states and
  head; the teacher gets none."""
  B, T, D, E, V, Vt = 2, 50, 16, 24, 96, 80
  k = jax.random.split(jax.random.PRNGKey(0), 6)
  hs, ht = jax.random.normal(k[0], (B, T, D)), jax.random.normal(k[1], (B, T, E))
  w_s, w_t = jax.random.normal(k[2], (V, D)) * 0.3, jax.random.normal(k[3], (Vt, E)) * 0.3
  targets = jax.random.randint(k[4], (B, T), 0, Vt)
  weights = (jax.random.uniform(k[5], (B, T)) > 0.3).astype(jnp.float32)

  def loss(fn):
    def total(hs, w_s, ht, w_t):
      kd, ce = fn(hs, w_s, ht, w_t)
      return 0.7 * 4.0 * kd + 0.3 * ce, (kd, ce)
    return jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2, 3), has_aux=True))(hs, w_s, ht, w_t)

  chunked = loss(lambda *a: distill.chunked_kd_sums(*a, targets, weights, chunk=16, beta=beta,
                                                    temperature=2.0))
  whole = loss(lambda *a: _whole(*a, targets, weights, beta, 2.0))
  (value, parts), grads = chunked
  (value_ref, parts_ref), grads_ref = whole
  np.testing.assert_allclose(value, value_ref, rtol=1e-5)
  np.testing.assert_allclose(parts, parts_ref, rtol=1e-5)
  for g, g_ref in zip(grads[:2], grads_ref[:2]):
    np.testing.assert_allclose(g, g_ref, atol=1e-5, rtol=1e-4)
  assert not np.any(grads[2]) and not np.any(grads[3])  # the teacher is frozen
