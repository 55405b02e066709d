"""Tests jaxlm/train/dpo.py and jaxlm/data/preference.py: the DPO, IPO and SimPO losses and their
logged rewards equal TRL's on the same log-probs; preference rows are rendered with the chat
template, trained on their responses only and packed in pairs whose per-sequence log-probs equal
each sequence's alone; bad rows fail naming the row; a DPO run raises the chosen-minus-rejected
margin and logs TRL's metrics."""

import json
import types
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.config import base_config, model
from jaxlm.data import preference
from jaxlm.data.batch import Batch
from jaxlm.models import heads
from jaxlm.train import dpo, objectives, trainer

METRICS = (
  "rewards/chosen",
  "rewards/rejected",
  "rewards/margins",
  "rewards/accuracies",
  "logps/chosen",
  "logps/rejected",
)


# --- losses against TRL ---------------------------------------------------------------------------


def _trl_dpo(loss_type, beta, pc, pr, rc, rr, nc, nr):
  """TRL DPOTrainer's own _compute_loss on the given per-sequence log-probs: a stand-in model
  returns per-token log-probs that sum to them over each completion."""
  torch = pytest.importorskip("torch")
  trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
  B, T = len(pc), int(max(nc.max(), nr.max())) + 1
  mask = torch.zeros(2 * B, T, dtype=torch.long)
  per_token = torch.zeros(2 * B, T - 1, dtype=torch.float64)
  for i, (logp, n) in enumerate(zip(np.concatenate([pc, pr]), np.concatenate([nc, nr]))):
    mask[i, 1 : 1 + int(n)] = 1
    per_token[i, : int(n)] = float(logp) / int(n)
  out = types.SimpleNamespace(
    log_probs=per_token,
    entropy=torch.zeros(2 * B, T - 1),
    mean_logits=torch.zeros(2 * B, T - 1),
    is_top1=torch.zeros(2 * B, T - 1, dtype=torch.bool),
  )
  fake_model = types.SimpleNamespace(training=True)
  accel = types.SimpleNamespace(device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x)
  this = types.SimpleNamespace(
    model=fake_model,
    accelerator=accel,
    aux_loss_enabled=False,
    ld_alpha=None,
    precompute_ref_logps=True,
    f_divergence_type="reverse_kl",
    loss_types=[loss_type],
    loss_weights=[1.0],
    beta=beta,
    label_smoothing=0.0,
    use_weighting=False,
    _metrics=defaultdict(lambda: defaultdict(list)),
    _total_train_tokens=0,
    _tp_size=1,
  )
  inputs = {
    "input_ids": torch.zeros(2 * B, T, dtype=torch.long),
    "completion_mask": mask,
    "attention_mask": torch.ones(2 * B, T, dtype=torch.long),
    "ref_chosen_logps": torch.tensor(rc, dtype=torch.float64),
    "ref_rejected_logps": torch.tensor(rr, dtype=torch.float64),
  }
  loss = trl_dpo.DPOTrainer._compute_loss(this, lambda **kw: out, inputs, False)
  return float(loss), {k: this._metrics["train"][k][0] for k in METRICS}


def _trl_cpo(loss_type, beta, label_smoothing, gamma, chosen, rejected):
  """TRL CPOTrainer.cpo_loss (its sigmoid is DPO's cDPO form on a log-ratio difference; simpo
  takes length-normalised log-probs)."""
  torch = pytest.importorskip("torch")
  cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
  this = types.SimpleNamespace(
    alpha=0.0,
    loss_type=loss_type,
    simpo_gamma=gamma,
    beta=beta,
    label_smoothing=label_smoothing,
    accelerator=types.SimpleNamespace(device="cpu"),
  )
  losses, c, r = cpo.CPOTrainer.cpo_loss(
    this, torch.tensor(chosen, dtype=torch.float64), torch.tensor(rejected, dtype=torch.float64)
  )
  return losses.numpy(), c.numpy(), r.numpy()


def _ours(loss_type, beta, pc, pr, rc, rr, nc, nr, label_smoothing=0.0, gamma=0.5):
  with jax.enable_x64(True):
    losses, c, r = dpo.preference_loss(
      *(jnp.asarray(x, jnp.float64) for x in (pc, pr, rc, rr, nc, nr)),
      loss_type=loss_type,
      beta=beta,
      label_smoothing=label_smoothing,
      gamma=gamma,
    )
    return np.asarray(losses), np.asarray(c), np.asarray(r)


def test_losses_and_rewards_equal_trls_on_the_same_logps():
  rng = np.random.default_rng(0)
  B = 16
  pc, pr, rc, rr = (rng.normal(-40, 8, B) for _ in range(4))
  nc, nr = rng.integers(3, 30, B).astype(float), rng.integers(3, 30, B).astype(float)
  for loss_type, beta in (("sigmoid", 0.1), ("ipo", 0.5)):
    trl_loss, trl_metrics = _trl_dpo(loss_type, beta, pc, pr, rc, rr, nc, nr)
    losses, c, r = _ours(loss_type, beta, pc, pr, rc, rr, nc, nr)
    ours = {
      "rewards/chosen": c.mean(),
      "rewards/rejected": r.mean(),
      "rewards/margins": (c - r).mean(),
      "rewards/accuracies": (c > r).mean(),
      "logps/chosen": pc.mean(),
      "logps/rejected": pr.mean(),
    }
    np.testing.assert_allclose(losses.mean(), trl_loss, rtol=1e-6, atol=1e-6)
    for k in METRICS:
      np.testing.assert_allclose(ours[k], trl_metrics[k], rtol=1e-6, atol=1e-6, err_msg=k)
  # conservative DPO (label smoothing) and SimPO, against TRL's CPOTrainer.cpo_loss
  for loss_type, beta, ls, gamma in (("sigmoid", 0.1, 0.2, 0.0), ("simpo", 2.0, 0.1, 0.7)):
    losses, c, r = _ours(loss_type, beta, pc, pr, rc, rr, nc, nr, ls, gamma)
    if loss_type == "simpo":
      want = _trl_cpo("simpo", beta, ls, gamma, pc / nc, pr / nr)
    else:  # cDPO is CPO's sigmoid on (chosen - ref) - (rejected - ref)
      want = _trl_cpo("sigmoid", beta, ls, gamma, pc - rc, pr - rr)
      want = (want[0], beta * (pc - rc), beta * (pr - rr))
    for got, exp in zip((losses, c, r), want):
      np.testing.assert_allclose(got, exp, rtol=1e-6, atol=1e-6)
  assert not np.allclose(
    _ours("sigmoid", 0.1, pc, pr, rc, rr, nc, nr)[0],
    _ours("sigmoid", 0.1, pc, pr, rc, rr, nc, nr, 0.2)[0],
  )


# --- data -----------------------------------------------------------------------------------------

ROWS = [
  {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon, I think."},
  {
    "prompt": [
      {"role": "system", "content": "Be brief."},
      {"role": "user", "content": "Say hi"},
      {"role": "assistant", "content": "Hello."},
      {"role": "user", "content": "Again"},
    ],
    "chosen": [{"role": "assistant", "content": "Hi!"}],
    "rejected": [{"role": "assistant", "content": "No."}],
  },
]


def _tiny_llama(vocab: int):
  return model(
    "smollm2-135m",
    vocab_size=vocab,
    num_layers=2,
    embed_dim=32,
    num_heads=4,
    num_kv_heads=2,
    mlp_dim=64,
    max_seq_len=128,
  )


def test_pairs_train_on_responses_only_and_packed_logps_equal_each_sequence_alone(chat_tokenizer):
  tok = chat_tokenizer
  rows = [(f"row{i}", r) for i, r in enumerate(ROWS * 3)]
  pairs, dropped = preference.encode_pairs(tok, rows, row_len=128)
  assert dropped == 0 and len(pairs) == 6
  for (_, row), pair in zip(rows, pairs):
    for name in ("chosen", "rejected"):
      ids, mask = pair[name]
      response = row[name] if isinstance(row[name], str) else row[name][0]["content"]
      assert tok.decode(ids[mask == 1]) == response + "<|im_end|>\n"  # not the prompt's turns
      assert tok.decode(ids).startswith("<|im_start|>")
  batch = preference.pack(pairs, 4, 128, pad_id=0)
  seg = batch["segment_ids"]
  assert (batch["weights"][seg == 0] == 0).all() and seg.max() >= 4  # several pairs per row
  cfg = _tiny_llama(len(tok)).to_dict()
  cfg.pop("init_from")
  from jaxlm.models.config import ModelConfig

  net = heads.build_model(ModelConfig(**cfg))
  params = jax.jit(net.init)(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]
  packed = jax.jit(lambda p, b: dpo.sequence_logps(objectives.token_logps(net.apply, p, b), b))
  pc, pr, nc, _, valid = map(np.asarray, packed(params, Batch(**batch)))
  got = sorted(zip(pc[valid], pr[valid], nc[valid]), key=lambda x: x[2] + x[0])
  # each sequence alone, unpacked: one row per sequence (causal, so the padding after it is moot)
  seqs = [pair[name] for pair in pairs for name in ("chosen", "rejected")]
  rows_ST = np.zeros((len(seqs), 128), np.int32)
  for i, (ids, _) in enumerate(seqs):
    rows_ST[i, : len(ids)] = ids
  alone = jax.jit(lambda p, x: jax.nn.log_softmax(net.apply({"params": p}, x), -1))
  logp_STV = np.asarray(alone(params, jnp.asarray(rows_ST)))
  sums = [
    float(
      (np.take_along_axis(logp_STV[i, : len(ids) - 1], ids[1:, None], -1)[:, 0] * mask[1:]).sum()
    )
    for i, (ids, mask) in enumerate(seqs)
  ]
  want = [
    (sums[2 * k], sums[2 * k + 1], float(p["chosen"][1][1:].sum())) for k, p in enumerate(pairs)
  ]
  want = sorted(want, key=lambda x: x[2] + x[0])
  assert valid.sum() == len(pairs)
  np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-4)


def test_dpo_with_loss_chunk_has_the_same_loss_rewards_and_gradients(chat_tokenizer):
  """model.loss_chunk=48 on rows of 128: the policy's and the reference's token log-probs come
  from the LM head applied chunk by chunk (the last chunk padded); DPO's loss, rewards and
  gradients equal the logits path (fp32, rtol 1e-5), tied and untied; and with chunks of 16 the
  compiled step holds under half the [B, T, V] fp32 logits the plain path holds."""
  from jaxlm.models.config import ModelConfig

  pairs, _ = preference.encode_pairs(
    chat_tokenizer, [(f"r{i}", r) for i, r in enumerate(ROWS * 3)], row_len=128
  )
  batch = Batch(**preference.pack(pairs, 4, 128, pad_id=0))
  values = _tiny_llama(len(chat_tokenizer)).to_dict()
  values.pop("init_from")
  objective = dpo.objective(base_config().dpo)
  for tied in (True, False):
    cfg = ModelConfig(**{**values, "tie_embeddings": tied})
    nets = [heads.build_model(cfg.replace(loss_chunk=chunk)) for chunk in (0, 48)]
    params, reference = (
      jax.jit(nets[0].init)(jax.random.PRNGKey(seed), jnp.zeros((1, 1), jnp.int32))["params"]
      for seed in (0, 1)
    )
    ((loss_ref, aux_ref), grads_ref), ((loss, aux), grads) = (
      jax.jit(jax.value_and_grad(
        lambda p, net=net: objective(net.apply, p, batch, None, True, reference=reference),
        has_aux=True,
      ))(params)
      for net in nets
    )
    assert aux_ref["weight"] == len(pairs) and abs(float(aux_ref["rewards/margins"])) > 1e-3
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
    for k, value in aux_ref.items():
      np.testing.assert_allclose(aux[k], value, rtol=1e-5, atol=1e-6, err_msg=k)
    for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True):
      np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-7)

  def temp_bytes(chunk):  # of the compiled train-time program (loss and gradients)
    net = heads.build_model(cfg.replace(loss_chunk=chunk))
    fn = jax.grad(lambda p: objective(net.apply, p, batch, None, True, reference=reference)[0])
    return jax.jit(fn).lower(params).compile().memory_analysis().temp_size_in_bytes

  logits_bytes = 4 * 128 * cfg.vocab_size * 4  # [B, T, V] fp32
  assert temp_bytes(16) < logits_bytes / 2 < logits_bytes <= temp_bytes(0)


def test_bad_preference_rows_fail_naming_the_row(chat_tokenizer, tmp_path):
  for row, says in (
    ({"prompt": "q", "chosen": "a"}, "row f:3 has no rejected"),
    ({"prompt": "q", "chosen": "a", "rejected": "a"}, "chosen equal to rejected"),
    ({"prompt": "q", "chosen": "a", "rejected": "b" * 400}, "data.seq_len=64"),
  ):
    with pytest.raises(ValueError, match=says):
      preference.encode_pairs(chat_tokenizer, [("f:3", row)], row_len=64)
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n[1, 2]\n')
  with pytest.raises(TypeError, match="bad.jsonl:2 is not a JSON object"):
    preference.read_rows(str(bad))


# --- training -------------------------------------------------------------------------------------


def _dpo_config(chat_tokenizer, tmp_path):
  """A tiny DPO run: 48 pairs whose chosen response repeats the prompt's word, a quarter held
  out."""
  tok_dir = tmp_path / "tok"
  chat_tokenizer.save_pretrained(str(tok_dir))
  data = tmp_path / "pairs.jsonl"
  rng = np.random.default_rng(0)
  words = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree"]
  lines = []
  for i in range(48):
    a, b = rng.choice(words, 2, replace=False)
    lines.append({"prompt": f"Say {a} {i}", "chosen": f"{a} {a}", "rejected": f"{b} {b} {b}"})
  data.write_text("".join(json.dumps(r) + "\n" for r in lines))
  c = base_config()
  c.kind = "dpo"
  c.model = _tiny_llama(0)
  c.data.update(
    {
      "path": str(data),
      "tokenizer": str(tok_dir),
      "seq_len": 64,
      "add_eos": False,
      "val_fraction": 0.25,
    }
  )
  c.train.update({"steps": 4, "batch_size": 8, "eval_every": 4, "eval_batches": 2, "log_every": 1})
  c.optim.update({"lr": 3e-3, "warmup_steps": 0, "min_lr": 3e-3})
  c.dpo.beta = 0.5
  c.checkpoint.use_async = False
  c.sample.max_new_tokens = 0
  c.runtime.cpu_devices = 1
  return c


def test_a_dpo_run_raises_the_margin_and_logs_trls_metrics(chat_tokenizer, tmp_path):
  c = _dpo_config(chat_tokenizer, tmp_path)
  final = trainer.train(c, str(tmp_path / "run"))
  records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  train_recs = [r for r in records if "rewards/margins" in r]
  assert len(train_recs) == 4 and all(k in train_recs[0] for k in METRICS)
  # step 1: the policy is the reference, so rewards are 0 and the loss is log 2
  assert abs(train_recs[0]["rewards/margins"]) < 1e-5
  np.testing.assert_allclose(train_recs[0]["loss"], np.log(2), rtol=1e-5)
  # later steps (new pairs) and the held-out pairs: chosen now beats rejected
  assert train_recs[-1]["rewards/margins"] > 0 and train_recs[-1]["loss"] < np.log(2)
  assert final["eval_rewards/margins"] > 0 and final["eval_loss"] < np.log(2)
  assert final["eval_rewards/accuracies"] > 0.5


def test_dpo_evaluates_through_the_one_eval_step_with_the_reference(
  chat_tokenizer, tmp_path, monkeypatch
):
  """The dpo mode scores the held-out pairs with step.jit_eval_step (reference=True), as the
  other modes do; its metrics are the objective's sums over the eval batches divided by their
  pairs, computed here batch by batch without the mode."""
  from jaxlm import sharding
  from jaxlm.data.batch import process_rows
  from jaxlm.train import step as step_lib

  jitted, evals = [], []
  real_jit, real_batches = step_lib.jit_eval_step, preference.eval_batches
  monkeypatch.setattr(
    step_lib, "jit_eval_step", lambda *a, **kw: jitted.append(kw) or real_jit(*a, **kw)
  )
  monkeypatch.setattr(
    preference, "eval_batches", lambda *a, **kw: evals.extend(real_batches(*a, **kw)) or evals
  )
  c = _dpo_config(chat_tokenizer, tmp_path)
  c.data.val_fraction = 0.75  # 36 held-out pairs: two eval batches
  run = trainer.setup(c, str(tmp_path / "run"))
  assert jitted == [{"reference": True}] and len(evals) == 2
  params, reference = (
    step_lib.sharded_init(run.model, run.tx, jax.random.PRNGKey(seed), run.mesh)[0].params
    for seed in (0, 1)
  )
  with sharding.mesh_rules(run.mesh):
    got = run.mode.evaluate(params, reference)
    with pytest.raises(ValueError, match="dpo.loss='sigmoid' needs the reference model's params"):
      run.mode.evaluate(params)  # a params-only restore (jaxlm eval) has no reference
  objective = dpo.objective(c.dpo)
  sums_fn = jax.jit(lambda p, b, r: objective(run.model.apply, p, b, None, True, reference=r))
  host = jax.device_get((params, reference))
  sums = [sums_fn(host[0], Batch(**process_rows(b, 0, 1)), host[1]) for b in evals]
  pairs = sum(float(aux["weight"]) for _, aux in sums)
  want = {"eval_loss": sum(float(loss) for loss, _ in sums) / pairs}
  want.update({f"eval_{k}": sum(float(aux[k]) for _, aux in sums) / pairs for k in METRICS})
  assert sorted(got) == sorted(want) and abs(want["eval_rewards/margins"]) > 1e-3
  for k, value in want.items():
    np.testing.assert_allclose(got[k], value, rtol=1e-5, atol=1e-6, err_msg=k)


def test_with_lora_the_reference_is_the_base_and_a_step_raises_the_margin(chat_tokenizer):
  import ml_collections

  from jaxlm import sharding
  from jaxlm.models import lora as lora_lib
  from jaxlm.models.config import ModelConfig
  from jaxlm.train import optim
  from jaxlm.train import step as step_lib

  tok = chat_tokenizer
  c = base_config()
  c.kind = "dpo"
  c.model = _tiny_llama(len(tok))
  c.model.init_from = "base"  # LoRA adapts an imported model; the base here is random
  c.lora.update({"rank": 4, "alpha": 8.0, "targets": "all"})
  values = c.model.to_dict()
  values.pop("init_from")
  net = heads.build_model(ModelConfig(**values))
  lora = lora_lib.for_model(c, net)
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}))
  tx, _ = optim.make_optimizer(
    ml_collections.ConfigDict({**c.optim.to_dict(), "lr": 1e-2, "warmup_steps": 0}), 10
  )
  state, shardings = step_lib.sharded_init(net, tx, jax.random.PRNGKey(0), mesh, lora)
  frozen0 = jax.device_get(state.frozen)
  pairs, _ = preference.encode_pairs(
    tok, [(f"r{i}", r) for i, r in enumerate(ROWS * 4)], row_len=128
  )
  batch = preference.pack(pairs, 8, 128, pad_id=0)
  step = step_lib.jit_train_step(shardings, dpo.objective(c.dpo), reference=True)
  with sharding.mesh_rules(mesh):
    rows = sharding.global_batch(batch, mesh)
    state, first = step(state, rows)
    state, second = step(state, rows)
  # adapters start at zero: the policy is the base, which is the reference
  np.testing.assert_allclose(float(first["loss"]), np.log(2), rtol=1e-5)
  assert abs(float(first["rewards/margins"])) < 1e-5
  assert float(second["rewards/margins"]) > 0 and float(second["loss"]) < np.log(2)
  # only the adapters train; the frozen base (the reference) is untouched
  names = {p[-1].key for p, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  assert names == {lora_lib.LORA_A, lora_lib.LORA_B}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.frozen), frozen0)


def test_with_lora_the_adapters_inside_the_layers_get_the_merged_models_dpo_gradients(
  chat_tokenizer,
):
  """A DPO step with LoRA applies the policy's adapters inside the layers and the reference as
  the frozen base with the adapters off, its kernels left int8 for the layers to dequantize: the
  loss, rewards and adapter gradients equal those of the merged policy against the dequantized
  base (fp32, 1e-5)."""
  import flax.linen as nn
  from flax import traverse_util

  from jaxlm.data import batch as batch_lib
  from jaxlm.models import lora as lora_lib
  from jaxlm.models.config import ModelConfig

  tok = chat_tokenizer
  c = base_config()
  c.kind = "dpo"
  c.model = _tiny_llama(len(tok))
  c.model.init_from = "base"
  c.lora.update({"rank": 4, "alpha": 8.0, "targets": "all", "quantize": "int8"})
  values = c.model.to_dict()
  values.pop("init_from")
  net = heads.build_model(ModelConfig(**values))
  lora = lora_lib.for_model(c, net)
  params = nn.unbox(jax.jit(net.init)(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
  frozen = lora.freeze(params["params"])
  adapters = nn.unbox(lora.init(jax.random.PRNGKey(1), params["params"]))
  adapters = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(2), x.shape),
                          adapters)  # B != 0: the policy is no longer the reference
  pairs, _ = preference.encode_pairs(tok, [(f"r{i}", r) for i, r in enumerate(ROWS)], row_len=128)
  batch = batch_lib.from_dict(jax.tree.map(jnp.asarray, preference.pack(pairs, 4, 128, pad_id=0)))
  objective = dpo.objective(c.dpo)

  def run(policy, reference):
    def loss(t):
      return objective(net.apply, policy(frozen, t), batch, None, True, reference=reference)

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(adapters)

  (loss_m, aux_m), grads_m = run(lora.merge, lora.base(frozen))
  (loss_u, aux_u), grads_u = run(lora.unmerged, lora.unmerged(frozen))
  assert abs(float(loss_u) - float(loss_m)) <= 1e-5 and abs(float(aux_m["rewards/margins"])) > 0
  for k in aux_m:
    assert abs(float(aux_u[k]) - float(aux_m[k])) <= 1e-5, k
  flat_m = traverse_util.flatten_dict(grads_m, sep="/")
  for path, g in traverse_util.flatten_dict(grads_u, sep="/").items():
    assert np.abs(np.asarray(g) - np.asarray(flat_m[path])).max() <= 1e-5, path
    assert np.abs(np.asarray(g)).max() > 0, path
