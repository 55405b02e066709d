"""Knowledge distillation (kind='distill'): a frozen teacher beside the trained student, and the
loss `alpha * T^2 * D(teacher/T, student/T) + (1 - alpha) * CE(labels)` per token (LM, MLM) or
per example (sequence classification on the teacher's class probabilities).

D is TRL's GKDTrainer.generalized_jsd_loss: beta=0 is forward KL(teacher || student), beta=1
reverse KL(student || teacher), between them the generalized JSD against the mixture
beta * teacher + (1 - beta) * student. The teacher is a jaxlm run or an HF checkpoint (imported as
model.init_from is), held in its own dtype, bf16 or int8 (Qwix), never trained nor checkpointed:
a resumed run reads it again. With a decoder student whose model.loss_chunk is set, both LM heads
are applied `loss_chunk` positions at a time, so neither [B, T, V] logits tensor exists whole.
Shape letters: B rows, T tokens, C chunk positions, N chunks, D/E student/teacher width, V vocab.
"""

import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxlm import rundir
from jaxlm.data.batch import Batch
from jaxlm.models import heads
from jaxlm.models import lora as lora_lib
from jaxlm.models.config import ModelConfig
from jaxlm.models.transformer import match_layer_layout
from jaxlm.train import objectives

DIVERGENCES = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": None}  # name -> TRL's beta
TEACHER_DTYPES = ("", "float32", "bfloat16")
TEACHER_QUANTIZE = ("", "int8")
HEADS = ("lm", "mlm", "seq_cls")  # students distil these heads
_BLOCK = re.compile(r"(^|/)block_(\d+)/")


def check_config(cfg) -> None:
  """Fails at start-up on a bad `distill` section (one line, naming the key)."""
  if not cfg.teacher:
    raise ValueError("kind='distill' needs distill.teacher: a jaxlm run directory or an HF "
                     "checkpoint (directory, .gguf file or hub id)")
  if cfg.divergence not in DIVERGENCES:
    raise ValueError(f"distill.divergence={cfg.divergence!r} is not one of {tuple(DIVERGENCES)}")
  if not 0.0 <= cfg.beta <= 1.0:
    raise ValueError(f"distill.beta={cfg.beta} must be in [0, 1] (0: forward KL, 1: reverse KL)")
  if not 0.0 <= cfg.alpha <= 1.0:
    raise ValueError(f"distill.alpha={cfg.alpha} must be in [0, 1] (0: labels only)")
  if cfg.temperature <= 0:
    raise ValueError(f"distill.temperature={cfg.temperature} must be > 0")
  if cfg.teacher_dtype not in TEACHER_DTYPES:
    raise ValueError(f"distill.teacher_dtype={cfg.teacher_dtype!r} is not one of "
                     f"{TEACHER_DTYPES}")
  if cfg.teacher_quantize not in TEACHER_QUANTIZE:
    raise ValueError(f"distill.teacher_quantize={cfg.teacher_quantize!r} is not one of "
                     f"{TEACHER_QUANTIZE}")


def beta_of(cfg) -> float:
  """TRL's beta of the `distill` section's divergence."""
  beta = DIVERGENCES[cfg.divergence]
  return float(cfg.beta) if beta is None else beta


# --- the divergence ------------------------------------------------------------------------------

def generalized_jsd(student_logits, teacher_logits, *, beta: float, temperature: float = 1.0):
  """Per position (the last axis summed), TRL's GKDTrainer.generalized_jsd_loss before its
  reduction: log-softmax of both logits over `temperature`; beta=0: KL(teacher || student);
  beta=1: KL(student || teacher); else beta KL(teacher || M) + (1 - beta) KL(student || M) with
  M = beta teacher + (1 - beta) student. fp32."""
  s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)

  def kl(p, q):  # KL(p || q) of log-probs, as torch's F.kl_div(q, p, log_target=True) sums
    return (jnp.exp(p) * (p - q)).sum(-1)

  if beta == 0:
    return kl(t, s)
  if beta == 1:
    return kl(s, t)
  m = jnp.logaddexp(s + math.log1p(-beta), t + math.log(beta))
  return beta * kl(t, m) + (1 - beta) * kl(s, m)


def _kd_and_ce(student_logits, teacher_logits, labels, *, beta, temperature):
  """(divergence, labels' cross entropy) per position/example; the divergence over the teacher's
  vocabulary (a student's extra padding entries are left out of it, not of the CE)."""
  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  shared = student_logits[..., : teacher_logits.shape[-1]]
  kd = generalized_jsd(shared, teacher_logits, beta=beta, temperature=temperature)
  ce = objectives._ce(student_logits, labels)
  return kd, ce


def chunked_kd_sums(student_hidden_BTD, student_head_VD, teacher_hidden_BTE, teacher_head_VE,
                    targets_BT, weights_BT, *, chunk: int, beta: float, temperature: float,
                    dtype=None, teacher_dtype=None, teacher_softcap: float = 0.0):
  """(sum of weighted divergences, sum of weighted cross entropies) of the logits
  hidden @ head.T of student and teacher, `chunk` positions of every row at a time: only
  [B, chunk, V] logits of each exist at once; the backward pass recomputes each chunk's
  (jax.checkpoint). The teacher gets no gradient."""
  dtype = dtype or student_hidden_BTD.dtype
  teacher_dtype = teacher_dtype or teacher_hidden_BTE.dtype
  s_VD = student_head_VD.astype(dtype)
  t_VE = jax.lax.stop_gradient(teacher_head_VE).astype(teacher_dtype)

  @jax.checkpoint
  def body(carry, xs):
    hs_BCD, ht_BCE, targets_BC, weights_BC = xs
    s_BCV = jnp.einsum("bcd,vd->bcv", hs_BCD, s_VD, preferred_element_type=jnp.float32)
    t_BCV = jnp.einsum("bce,ve->bcv", ht_BCE, t_VE, preferred_element_type=jnp.float32)
    if teacher_softcap:
      t_BCV = teacher_softcap * jnp.tanh(t_BCV / teacher_softcap)
    kd_BC, ce_BC = _kd_and_ce(s_BCV, t_BCV, targets_BC, beta=beta, temperature=temperature)
    return (carry[0] + (kd_BC * weights_BC).sum(), carry[1] + (ce_BC * weights_BC).sum()), None

  xs = objectives._in_chunks(chunk, student_hidden_BTD.astype(dtype),
                             jax.lax.stop_gradient(teacher_hidden_BTE).astype(teacher_dtype),
                             targets_BT, weights_BT.astype(jnp.float32))
  zero = jnp.zeros((), jnp.float32)
  (kd, ce), _ = jax.lax.scan(body, (zero, zero), xs)
  return kd, ce


# --- the teacher ---------------------------------------------------------------------------------

@dataclasses.dataclass
class Teacher:
  """The frozen teacher: its model, its params on the devices (cast, or with block kernels
  quantized) and how a step applies them."""

  model: nn.Module
  params: Any  # as held: cast to teacher_dtype, block kernels int8 QArrays with teacher_quantize
  freezer: lora_lib.Lora  # a Lora without adapters: casts/quantizes the base and boxes it Frozen
  src: str

  @property
  def cfg(self) -> ModelConfig:
    return self.model.cfg

  def apply_params(self, params=None):
    """The params the teacher's model applies in a step (block kernels boxed linear.Frozen,
    each layer casting or dequantizing its own)."""
    return self.freezer.unmerged(self.params if params is None else params)


def _vocab(tokenizer) -> dict:
  return dict(tokenizer.get_vocab())


def check_tokenizers(student_tok, teacher_tok, src: str) -> None:
  """Refuses a teacher whose tokenizer maps tokens to other ids than the student's (one line)."""
  s, t = _vocab(student_tok), _vocab(teacher_tok)
  if s != t:
    diff = sorted(set(s.items()) ^ set(t.items()), key=str)[:3]
    raise ValueError(
      f"distill.teacher={src!r} has another tokenizer than the student ({len(t)} vs {len(s)} "
      f"tokens; differing, e.g. {diff}): distillation compares distributions over the same "
      "token ids; use the teacher's tokenizer (data.tokenizer='' takes it)")


def teacher_config(config, student_cfg: ModelConfig | None = None) -> ModelConfig:
  """The teacher's ModelConfig: its own (run or HF checkpoint), run in eval (no dropout), in
  distill.teacher_dtype when set and, for an encoder student, with the student's head (an HF
  encoder without it gets a new one, as model.init_from does; a jaxlm run must have it)."""
  c = config.distill
  values = {"dropout": 0.0}
  if c.teacher_dtype:
    values.update(dtype=c.teacher_dtype, param_dtype=c.teacher_dtype)
  if student_cfg is not None and student_cfg.head == "seq_cls":
    values.update(head=student_cfg.head, num_labels=student_cfg.num_labels)
  elif student_cfg is not None and student_cfg.head == "mlm":
    values.update(head="mlm")
  if rundir.is_run_dir(c.teacher) and "head" in values:
    saved = rundir.read_config(c.teacher).model
    if (saved.head, saved.num_labels) != (values["head"], values.get("num_labels",
                                                                      saved.num_labels)):
      raise ValueError(
        f"distill.teacher={c.teacher!r} is a run with model.head={saved.head!r} "
        f"num_labels={saved.num_labels}, but the student has head={values['head']!r} "
        f"num_labels={student_cfg.num_labels}: a teacher's head must be trained; distil from a "
        "run of the same head")
  return rundir.init_model_config(c.teacher, values)


def check_pair(student_cfg: ModelConfig, teacher_cfg: ModelConfig, src: str) -> None:
  """Refuses a teacher the student cannot be distilled from (one line each)."""
  if student_cfg.head not in HEADS:
    raise ValueError(f"kind='distill' trains a student with model.head in {HEADS}; this one "
                     f"has head={student_cfg.head!r}")
  if student_cfg.head == "seq_cls" and student_cfg.num_labels < 2:
    raise ValueError("kind='distill' on sequence classification needs model.num_labels >= 2 "
                     "(class probabilities); regression has none")
  if teacher_cfg.vocab_size > student_cfg.vocab_size:
    raise ValueError(
      f"distill.teacher={src!r} has vocab_size={teacher_cfg.vocab_size}, more than the "
      f"student's {student_cfg.vocab_size}: the student cannot represent all the teacher's "
      f"tokens; set model.vocab_size >= {teacher_cfg.vocab_size}")
  if (teacher_cfg.causal, teacher_cfg.head) != (student_cfg.causal, student_cfg.head):
    raise ValueError(
      f"distill.teacher={src!r} is causal={teacher_cfg.causal} head={teacher_cfg.head!r} but "
      f"the student causal={student_cfg.causal} head={student_cfg.head!r}: distil a decoder "
      "into a decoder, an encoder into an encoder with the same head")


def load_teacher(config, tokenizer, student_cfg: ModelConfig, mesh) -> Teacher:
  """The frozen teacher of a distill run, its tokenizer and vocabulary checked against the
  student's before any weight is read; params placed on `mesh` as the teacher's logical axis
  rules say, then cast or quantized."""
  c = config.distill
  check_config(c)
  check_tokenizers(tokenizer, rundir.init_tokenizer(c.teacher), c.teacher)
  t_cfg = teacher_config(config, student_cfg)
  check_pair(student_cfg, t_cfg, c.teacher)
  model = heads.build_model(t_cfg)
  host = rundir.init_params(c.teacher, t_cfg)
  shardings = jax.tree.map(lambda a: a.sharding, rundir.abstract_params(model, mesh))
  params = jax.device_put(host, shardings)
  freezer = lora_lib.Lora((), 1, 1.0, base_dtype=c.teacher_dtype, quantize=c.teacher_quantize)
  if c.teacher_quantize or c.teacher_dtype:
    params = jax.jit(freezer.freeze)(params)
  return Teacher(model, params, freezer, c.teacher)


# --- the student from the teacher's layers -------------------------------------------------------

def from_teacher_layers(config) -> bool:
  """Whether the run's student is built and initialised from the teacher's layers
  (distill.init_layers set, model.init_from not)."""
  return (config.kind == "distill" and bool(config.distill.init_layers)
          and not config.model.init_from)


def student_config(config, tokenizer_vocab: int = 0) -> dict:
  """The student's model values when distill.init_layers is set and model.init_from is not: the
  teacher's ModelConfig with len(init_layers) layers (their layer types kept), the run fields
  (dropout, dtypes, head, loss_chunk...) of config.model on top."""
  layers = tuple(config.distill.init_layers)
  values = dict(config.model)
  values.pop("init_from", None)
  t_cfg = rundir.init_model_config(config.distill.teacher, values)
  bad = [i for i in layers if not 0 <= i < t_cfg.num_layers]
  if bad or len(set(layers)) != len(layers):
    raise ValueError(f"distill.init_layers={list(layers)} must be distinct teacher layers in "
                     f"0..{t_cfg.num_layers - 1}")
  out = t_cfg.to_dict()
  out["num_layers"] = len(layers)
  if t_cfg.layer_types:
    types = [t_cfg.layer_types[i % len(t_cfg.layer_types)] for i in range(t_cfg.num_layers)]
    out["layer_types"] = tuple(types[i] for i in layers)
  return out


def init_from_layers(teacher_params: dict, teacher_cfg: ModelConfig, student_cfg: ModelConfig,
                     layers, student_shapes: dict) -> dict:
  """The student's params (host numpy, in the student's layout) copied from the teacher
  (DistilBERT), `student_shapes` its params' shapes unscanned (one block_{j} each):
  student block j is teacher block layers[j]; embeddings, final norm, LM/MLM head and any task
  head of the same shape copied as they are; what has no counterpart (a new task head) is left
  out, for the caller's initialisation to keep."""
  flat_t = traverse_util.flatten_dict(
    match_layer_layout(jax.device_get(teacher_params), dataclasses.replace(
      teacher_cfg, scan_layers=False)), sep="/")
  target = traverse_util.flatten_dict(student_shapes, sep="/")
  out = {}
  for path, shape in target.items():
    src = _BLOCK.sub(lambda m: f"{m.group(1)}block_{layers[int(m.group(2))]}/", path, count=1)
    if src in flat_t and tuple(flat_t[src].shape) == tuple(shape.shape):
      out[path] = np.asarray(flat_t[src], shape.dtype)
  if not any("block_" in p for p in out):
    raise ValueError("distill.init_layers copied no block: the student's layers are not the "
                     "teacher's shape (leave model sizes to the teacher's config)")
  params = traverse_util.unflatten_dict(out, sep="/")
  return match_layer_layout(params, student_cfg) if student_cfg.scan_layers else params


def layer_init_params(config, student_model) -> dict:
  """The student's params copied from distill.init_layers of the teacher (init_from_layers), the
  teacher read again in full precision (it may be held cast or quantized)."""
  s_cfg = student_model.cfg
  t_cfg = rundir.init_model_config(config.distill.teacher,
                                   {"head": s_cfg.head, "num_labels": s_cfg.num_labels})
  host = rundir.init_params(config.distill.teacher, t_cfg)
  unscanned = heads.build_model(dataclasses.replace(s_cfg, scan_layers=False))
  shapes = nn.unbox(heads.param_shapes(unscanned))
  return init_from_layers(host, t_cfg, student_model.cfg, tuple(config.distill.init_layers), shapes)


# --- the objective -------------------------------------------------------------------------------

def _weights(batch: Batch, head: str):
  """Each token's (LM, MLM) or example's (seq_cls) weight, fp32: batch.weights, or all ones."""
  if batch.weights is not None:
    return batch.weights.astype(jnp.float32)
  shape = batch.inputs.shape[:1] if head == "seq_cls" else batch.inputs.shape
  return jnp.ones(shape, jnp.float32)


def objective(cfg, teacher: Teacher, student_cfg: ModelConfig):
  """The `forward_sums` of a distill run: `(apply_fn, params, batch, rng, deterministic, *,
  teacher) -> (loss sum, {"weight", "distill/kd", "distill/ce"})`, summed over the weighted
  tokens (LM, MLM: the batch's weights and targets) or examples (seq_cls: batch.weights and
  labels); kd is the divergence unscaled, ce the labels' cross entropy. `teacher`: the teacher's
  params as held (Teacher.params); the step passes them."""
  check_config(cfg)
  beta, temp, alpha = beta_of(cfg), float(cfg.temperature), float(cfg.alpha)
  t_cfg = teacher.cfg
  chunk = student_cfg.loss_chunk if student_cfg.causal and student_cfg.head == "lm" else 0

  def sums(apply_fn, params, batch: Batch, rng, deterministic, *, teacher):
    t_params = jax.lax.stop_gradient(_applied(teacher))
    w = _weights(batch, student_cfg.head)
    if chunk:
      hs = objectives._final_hidden(apply_fn, params, batch, rng, deterministic)
      ht = objectives._final_hidden(teacher_apply, t_params, batch, None, True)
      kd, ce = chunked_kd_sums(
        hs, objectives.lm_head_VD(student_cfg, params), ht, objectives.lm_head_VD(t_cfg, t_params),
        batch.targets, w, chunk=chunk, beta=beta, temperature=temp,
        dtype=jnp.dtype(student_cfg.dtype), teacher_dtype=jnp.dtype(t_cfg.dtype),
        teacher_softcap=t_cfg.logit_softcap)
      weight = w.sum()
    else:
      s_out = objectives.model_outputs(apply_fn, params, batch, rng, deterministic)
      t_out = objectives.model_outputs(teacher_apply, t_params, batch, None, True)
      labels = batch.labels if student_cfg.head == "seq_cls" else batch.targets
      kd_, ce_ = _kd_and_ce(s_out, t_out, labels, beta=beta, temperature=temp)
      kd, ce, weight = (kd_ * w).sum(), (ce_ * w).sum(), w.sum()
    total = alpha * temp**2 * kd + (1 - alpha) * ce
    aux = {"weight": weight, "distill/kd": jax.lax.stop_gradient(kd),
           "distill/ce": jax.lax.stop_gradient(ce)}
    return total, aux

  teacher_apply = teacher.model.apply
  _applied = teacher.apply_params
  return sums
