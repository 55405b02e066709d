"""Tests jaxlm/models/lora.py and LoRA in the trainer: a LoRA model starts bitwise at its base,
only adapters train (the optimizer state holds them alone), the adapters applied inside the layers
(x W + scale (x A) B) equal the merged model forward and backward for every target preset, scanned
or not, quantized or not, on a decoder and on an encoder whose task head trains in full; a
compiled LoRA step holds neither a merged model nor weight gradients (XLA's memory_analysis); a
preempted QLoRA run (int8, int4, NF4 bases) with scanned layers resumes bitwise, its checkpoints
export merged and as a PEFT adapter and generate; the optimizer state of SmolLM2's LoRA is a small
share of a full fine-tune's; bad settings are one-line errors."""

import dataclasses
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from jaxlm import cli, rundir, sharding
from jaxlm.config import base_config
from jaxlm.data import tokenizers as tok_lib
from jaxlm.data.batch import Batch
from jaxlm.models import config as model_config
from jaxlm.models import heads
from jaxlm.models import lora as lora_lib
from jaxlm.models.layers import Dense, OutProjection
from jaxlm.train import objectives, optim, preemption, startup, trainer
from jaxlm.train import step as step_lib
from jaxlm.train.state import TrainState

torch = pytest.importorskip("torch", reason="the base model is a tiny random transformers Llama")
transformers = pytest.importorskip("transformers")

TEXT = "\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(200))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
  """A tiny random HF Llama (GQA, untied) with a character tokenizer saved beside it."""
  from hf_testing import random_hf_model

  cfg = transformers.LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
  )
  out = tmp_path_factory.mktemp("lora") / "tiny-llama"
  random_hf_model(cfg, seed=0).save_pretrained(out)
  tok_lib.char_tokenizer(TEXT).save_pretrained(out)
  (out.parent / "text.txt").write_text(TEXT)
  return str(out)


def lora_config(base_dir: str, **lora):
  c = base_config()
  c.model.init_from = base_dir
  c.data.update(
    {"source": "file", "path": base_dir + "/../text.txt", "seq_len": 16, "tokenizer": ""}
  )
  c.train.update(
    {"steps": 4, "batch_size": 8, "log_every": 1, "eval_every": 100, "eval_batches": 1}
  )
  c.optim.update({"warmup_steps": 0, "lr": 1e-2})
  c.checkpoint.update({"every": 1, "use_async": False})
  c.sample.max_new_tokens = 0
  c.lora.update({"rank": 4, "alpha": 8.0, "targets": "all", **lora})
  return c


def unmerged_logits(model, base, lora, adapters, tokens):
  """The model with each adapted layer computing x W + scale (x A) B, as PEFT does, instead of
  merging: flax method interception adds the low-rank branch to each adapted projection's output."""
  flat = traverse_util.flatten_dict(adapters, sep="/")
  by_module = {t.path.rsplit("/", 1)[0]: t for t in lora.targets}

  def add_branch(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    name = "/".join(context.module.path)
    if not isinstance(context.module, (Dense, OutProjection)) or name not in by_module:
      return y
    t, x = by_module[name], args[0]
    xa = jnp.tensordot(x, flat[f"{name}/lora_a"], axes=t.n_in, precision="highest")
    return y + lora.scale * jnp.tensordot(xa, flat[f"{name}/lora_b"], axes=1, precision="highest")

  with nn.intercept_methods(add_branch):
    return np.asarray(model.apply({"params": base}, tokens))


def test_lora_starts_at_the_base_bitwise_trains_only_adapters_and_merged_equals_unmerged(
  base_dir, tmp_path
):
  config = lora_config(base_dir)
  run = trainer.setup(config, str(tmp_path / "run"))
  abstract, shardings = step_lib.abstract_state(run.model, run.tx, run.mesh, run.lora)
  base = rundir.init_params(base_dir, run.model.cfg)
  state = step_lib.sharded_init(run.model, run.tx, jax.random.PRNGKey(0), run.mesh, run.lora,
                                shardings=shardings, params=startup.placed(base, abstract))[0]
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 40, (8, 16)))
  # 2 layers x (q, k, v, o, gate, up, down)
  assert len(run.lora.targets) == 14 and run.lora.scale == 2.0
  with sharding.mesh_rules(run.mesh):
    logits_base = np.asarray(run.model.apply({"params": base}, tokens))
    logits_lora = np.asarray(run.model.apply({"params": state.model_params()}, tokens))
    assert (logits_base == logits_lora).all(), "B = 0: step 0 is bitwise the base model"
    logits_step = np.asarray(run.model.apply({"params": state.apply_params()}, tokens))
    assert (logits_base == logits_step).all(), "and so is the unmerged model a step applies"

    # the optimizer state holds the adapters alone: AdamW's two moments of each, nothing else
    adapter_shapes = sorted(x.shape for x in jax.tree.leaves(state.params))
    moment_shapes = sorted(x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim)
    assert moment_shapes == sorted(adapter_shapes * 2)
    assert all(
      p.endswith(("lora_a", "lora_b")) for p in traverse_util.flatten_dict(state.params, sep="/")
    )

    frozen = jax.tree.map(np.asarray, state.frozen)
    before = jax.tree.map(np.asarray, state.params)
    train_fn = step_lib.jit_train_step(shardings, objectives.for_head("lm"))
    for _ in range(2):  # B moves at step 1; A (whose gradient is 0 while B = 0) at step 2
      state, metrics = train_fn(state, sharding.global_batch(next(run.mode.batches), run.mesh))
    assert np.isfinite(float(metrics["loss"]))
    for x, y in zip(jax.tree.leaves(frozen), jax.tree.leaves(state.frozen)):
      assert (x == np.asarray(y)).all(), "the frozen base never changes"
    for path, x in traverse_util.flatten_dict(before, sep="/").items():
      y = traverse_util.flatten_dict(state.params, sep="/")[path]
      assert (x != np.asarray(y)).any(), f"{path} did not train"
    assert (
      jax.tree.map(np.asarray, state.reference_params())["block_0"]["attn"]["q"]["kernel"]
      == base["block_0"]["attn"]["q"]["kernel"]
    ).all(), "reference = adapters off"

    merged = np.asarray(run.model.apply({"params": state.model_params()}, tokens))
    unmerged = unmerged_logits(run.model, base, run.lora, jax.device_get(state.params), tokens)
  assert np.abs(merged - logits_base).max() > 1e-3, "the adapters changed the model"
  assert np.abs(merged - unmerged).max() <= 1e-5


def _tiny_llama(scan: bool):
  """A random Llama-like decoder (GQA, biases on: every bias path runs) and its fp32 params."""
  cfg = model_config.ModelConfig(
    vocab_size=64, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, mlp_dim=48,
    max_seq_len=32, norm="rmsnorm", position="rope", activation="silu", gated_mlp=True,
    tie_embeddings=False, scan_layers=scan,
  )
  model = heads.build_model(cfg)
  return model, nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 1), "int32")))


def _lora_of(model, params, full=(), **settings):
  """(Lora, adapters with B != 0 so every adapter has a gradient, and the `full` params)."""
  c = base_config().lora
  c.update({"rank": 4, "alpha": 8.0, **settings})
  lora = lora_lib.build(c, heads.param_shapes(model), num_layers=model.cfg.num_layers, full=full)
  trainable = nn.unbox(lora.init(jax.random.PRNGKey(1), params))
  noise = jax.tree.map(lambda x: 0.1 * jax.random.normal(jax.random.PRNGKey(2), x.shape), trainable)
  return lora, jax.tree.map(jnp.add, trainable, noise)


def _merged_and_unmerged(forward, lora, frozen, trainable):
  """((loss, outputs), grads) of `forward(params) -> (loss, outputs)` through the merged params
  and through the params a step applies (adapters inside the layers), the gradients with respect
  to the trainable params."""
  def run(apply_params):
    grad_fn = jax.value_and_grad(lambda t: forward(apply_params(frozen, t)), has_aux=True)
    return jax.jit(grad_fn)(trainable)

  return run(lora.merge), run(lora.unmerged)


def _assert_close(merged, unmerged, tol=1e-5):
  """Forward outputs, loss and every gradient within `tol`; every gradient nonzero."""
  ((loss_m, out_m), grads_m), ((loss_u, out_u), grads_u) = merged, unmerged
  assert np.abs(np.asarray(out_u) - np.asarray(out_m)).max() <= tol
  assert np.abs(np.asarray(out_m)).max() > 0.1  # outputs of a model, not zeros
  assert abs(float(loss_m) - float(loss_u)) <= tol
  flat_m = traverse_util.flatten_dict(grads_m, sep="/")
  for path, g in traverse_util.flatten_dict(grads_u, sep="/").items():
    assert np.abs(np.asarray(g) - np.asarray(flat_m[path])).max() <= tol, path
    assert np.abs(np.asarray(g)).max() > 1e-4, f"{path} has no gradient"


@pytest.mark.parametrize(
  "scan, targets, quantize",
  [(scan, targets, "") for scan in (False, True) for targets in ("attention", "mlp", "all")]
  + [(True, "all", q) for q in ("int8", "int4", "nf4")],
)
def test_adapters_inside_the_layers_equal_the_merged_model_forward_and_backward(
  scan, targets, quantize
):
  """x W + scale (x A) B in each adapted layer (the frozen kernel dequantized there) gives the
  merged model's logits and loss, and the same gradients of every adapter (fp32, 1e-5)."""
  model, params = _tiny_llama(scan)
  lora, adapters = _lora_of(model, params["params"], targets=targets, quantize=quantize)
  frozen = lora.freeze(params["params"])
  rng = np.random.RandomState(0)
  tokens, labels = (jnp.asarray(rng.randint(0, 64, (4, 12))) for _ in range(2))

  def forward(p):
    logits = model.apply({"params": p}, tokens)
    return objectives.lm_loss_sums(logits, labels)[0] / labels.size, logits

  _assert_close(*_merged_and_unmerged(forward, lora, frozen, adapters))


def test_an_encoders_adapters_and_its_task_head_trained_in_full_get_the_merged_gradients():
  cfg = model_config.preset(
    "bert-mini", head="seq_cls", num_labels=3, num_layers=2, vocab_size=64, scan_layers=True
  )
  model = heads.build_model(cfg)
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 1), "int32")))
  full = tuple(k for k in params["params"] if k != "transformer")
  lora, trainable = _lora_of(model, params["params"], full=full, targets="all")
  assert "classifier" in trainable and "pooler" in trainable
  frozen = lora.freeze(params["params"])
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 64, (4, 10)))
  labels = jnp.asarray([0, 1, 2, 1])

  def forward(p):
    out = model.apply({"params": p}, tokens, padding_mask_BT=jnp.ones((4, 10), bool))
    return objectives._ce(out, labels).mean(), out

  _assert_close(*_merged_and_unmerged(forward, lora, frozen, trainable))


def _compiled_step(model, lora=None) -> dict:
  """XLA's figures for the train step of `model` compiled on one CPU device against abstract
  state and batch (nothing runs): argument, temp and total bytes, and FLOPs."""
  tx, _ = optim.make_optimizer(base_config().optim, 1000)
  mesh = sharding.make_mesh(
    ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}), jax.devices()[:1]
  )
  abstract, shardings = step_lib.abstract_state(model, tx, mesh, lora)
  step = step_lib.jit_train_step(shardings, objectives.for_head("lm"))
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32, sharding=sharding.batch_sharding(mesh))
  with sharding.mesh_rules(mesh):
    compiled = step.lower(abstract, Batch(inputs=tokens, targets=tokens)).compile()
  stats, flops = compiled.memory_analysis(), compiled.cost_analysis()
  argument, temp = stats.argument_size_in_bytes, stats.temp_size_in_bytes
  # outputs alias the donated state
  return {"argument": argument, "temp": temp, "total": argument + temp, "flops": flops["flops"]}


def test_a_compiled_lora_step_holds_no_merged_model_and_no_weight_gradients(monkeypatch):
  """8 scanned layers, D=256 (8.5M params, 32.5 MiB in fp32), rank 8 on every kernel, one row of 8
  tokens, compiled on one CPU device. Measured with XLA:CPU (jax 0.10.2), MiB of temp / argument:
    full fine-tune                       65.0 / 97.6
    LoRA merged before the model ran     72.3 / 36.8   (the implementation this replaced)
    ... with an int8 base                72.3 / 12.9
    LoRA inside the layers                8.9 / 36.8
    ... int8 base                         8.9 / 12.9
    ... int4 or NF4 base                  8.9 /  9.3
  A merged step holds a whole fp32 model and gradients of every kernel; inside the layers the
  temporaries are activations and one layer's kernels at a time."""
  cfg = model_config.ModelConfig(
    vocab_size=256, num_layers=8, embed_dim=256, num_heads=4, mlp_dim=1024, max_seq_len=8,
    norm="rmsnorm", position="rope", activation="silu", gated_mlp=True, use_bias=False,
    tie_embeddings=False, scan_layers=True,
  )
  model = heads.build_model(cfg)
  fp32_bytes = 4 * sum(x.size for x in jax.tree.leaves(nn.unbox(heads.param_shapes(model))))
  c = base_config().lora
  c.update({"rank": 8, "targets": "all"})
  figures = {}
  for quantize in ("", "int8", "int4", "nf4"):
    c.quantize = quantize
    figures[quantize] = _compiled_step(model, lora_lib.build(c, heads.param_shapes(model),
                                                             num_layers=cfg.num_layers))
  c.quantize = ""
  with monkeypatch.context() as m:  # the step as it was: the adapters merged into the base
    m.setattr(TrainState, "apply_params", TrainState.model_params)
    merged = _compiled_step(model, lora_lib.build(c, heads.param_shapes(model), num_layers=8))
  lora = figures[""]
  assert lora["temp"] < merged["temp"] and lora["total"] < merged["total"]
  # no weight gradient is formed (XLA's cost_analysis counts a scan's body once: 48 MFLOP here,
  # the merged step 490, a full fine-tune's 259)
  assert lora["flops"] < 0.5 * merged["flops"]
  # an f32 gradient (or a merged copy) of every kernel would take nearly fp32_bytes alone
  assert merged["temp"] > fp32_bytes
  for quantize, f in figures.items():
    assert f["temp"] < fp32_bytes / 2, (quantize, f)
  assert figures["int4"]["argument"] == figures["nf4"]["argument"]
  assert figures["int4"]["argument"] < figures["int8"]["argument"] < lora["argument"]
  assert figures["int4"]["total"] < figures["int8"]["total"] < lora["total"]


@pytest.mark.slow  # three trainings and three CLI processes: the slow tier (pytest -m slow)
@pytest.mark.parametrize(
  "quantize, adapters", [("int8", "float32"), ("int4", "bfloat16"), ("nf4", "float32")]
)
def test_a_preempted_qlora_run_with_scanned_layers_resumes_bitwise_exports_and_generates(
  base_dir, tmp_path, monkeypatch, capsys, quantize, adapters
):
  """A quantized base (Qwix: int8, or 4-bit packed two codes a byte), bf16 non-quantized base
  leaves, fp32 or bf16 adapters (model.param_dtype), scanned layers: stopped at step 2 and
  resumed, the run ends with the same losses and bitwise the same adapters as one never stopped;
  its checkpoint exports merged (transformers reproduces jaxlm's logits) and as a PEFT adapter
  (peft on the fp32 base reproduces jaxlm's fp32-base logits), and generates."""
  config = lora_config(base_dir, quantize=quantize, base_dtype="bfloat16", targets="attention")
  config.model.scan_layers = True
  config.model.param_dtype = adapters
  config.train.steps = 3
  whole = trainer.train(config, str(tmp_path / "whole"))
  out = capsys.readouterr().out + capsys.readouterr().err
  assert "trainable parameters" in out and "of a full fine-tune's" in out
  monkeypatch.setattr(preemption.PreemptionGuard, "should_stop", lambda self, step: step == 2)
  with pytest.raises(preemption.Preempted, match="at step 2"):
    trainer.train(config, str(tmp_path / "cut"))
  monkeypatch.undo()
  resumed = trainer.train(config, str(tmp_path / "cut"))
  assert resumed["step"] == whole["step"] == 3

  def losses(run):
    lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]

  assert losses("cut") == losses("whole") and len(losses("whole")) == 3
  _, lora, a, frozen_a = rundir.load_lora_run(str(tmp_path / "whole"))
  saved, _, b, frozen_b = rundir.load_lora_run(str(tmp_path / "cut"))
  assert lora.quantize == quantize and all(t.stacked for t in lora.targets)
  codes = "int8" if quantize == "int8" else "uint8"  # 4-bit: two codes a byte
  assert {str(x.dtype) for x in jax.tree.leaves(frozen_a)} == {codes, "float32", "bfloat16"}
  assert {str(x.dtype) for x in jax.tree.leaves(a)} == {adapters}
  for x, y in zip(jax.tree.leaves((a, frozen_a)), jax.tree.leaves((b, frozen_b))):
    assert (np.asarray(x) == np.asarray(y)).all()

  tokens = np.random.RandomState(1).randint(0, 40, (2, 12))

  @functools.partial(jax.jit, static_argnums=0)
  def logits(lora, frozen, trainable):
    return saved.model.apply({"params": lora.merge(frozen, trainable)}, jnp.asarray(tokens))

  run_dir, merged_dir, adapter_dir = (str(tmp_path / n) for n in ("cut", "merged", "adapter"))
  # --merge: the whole merged model (the base dequantized), which transformers loads alone; bf16
  # adapters merge in bf16, where two programs may round a merged weight 1 ulp apart (5e-3 seen)
  cli.main(["jaxlm", "convert", "--workdir", run_dir, "--to-hf", merged_dir, "--merge"])
  hf = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
  with torch.no_grad():
    assert (
      np.abs(np.asarray(logits(lora, frozen_b, b)) - hf(torch.tensor(tokens)).logits.numpy()).max()
      <= (1e-4 if adapters == "float32" else 1e-2)
    )
  # a PEFT adapter, applied by peft to the original fp32 base
  peft = pytest.importorskip("peft")
  cli.main(["jaxlm", "convert", "--workdir", run_dir, "--to-hf", adapter_dir])
  with torch.no_grad():
    theirs = (
      peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir
      )
      .eval()(torch.tensor(tokens))
      .logits.numpy()
    )
  fp32 = dataclasses.replace(lora, quantize="", base_dtype="")
  cfg32 = saved.model_cfg.replace(param_dtype="float32")
  base = rundir.init_params(base_dir, cfg32)
  b32 = jax.tree.map(lambda x: np.asarray(x, np.float32), b)
  ours = heads.build_model(cfg32).apply({"params": fp32.merge(fp32.freeze(base), b32)}, tokens)
  assert np.abs(np.asarray(ours) - theirs).max() <= 1e-4
  capsys.readouterr()
  cli.main(
    [
      "jaxlm",
      "generate",
      "--workdir",
      run_dir,
      "--prompt",
      "the quick",
      "--max_new_tokens",
      "2",
      "--temperature",
      "0",
    ]
  )
  assert capsys.readouterr().out.startswith("the quick")


def test_smollm2_lora_optimizer_state_is_under_5_percent_of_a_full_fine_tune():
  """Planned from shapes alone (nothing allocated): rank 8 on attention and MLP of SmolLM2-135M."""
  cfg = model_config.preset("smollm2-135m", scan_layers=True)
  model = heads.build_model(cfg)
  c = base_config().lora
  c.update({"rank": 8, "targets": "all"})
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), "int32")))
  lora = lora_lib.build(c, boxed["params"], num_layers=cfg.num_layers)
  tx, _ = optim.make_optimizer(base_config().optim, 1000)

  def opt_bytes(lora_or_none):
    state = jax.eval_shape(
      lambda: step_lib.init_state(jax.random.PRNGKey(0), model, tx, lora_or_none)
    )
    leaves = jax.tree.leaves(sharding.strip_boxes(state.opt_state))
    return sum(x.size * x.dtype.itemsize for x in leaves)

  share = opt_bytes(lora) / opt_bytes(None)
  assert 0.005 < share < 0.05, f"LoRA optimizer state is {share:.2%} of a full fine-tune's"


def _abstract(scan: bool = False, head_dim: int = 0):
  cfg = model_config.ModelConfig(
    vocab_size=64,
    num_layers=2,
    embed_dim=32,
    num_heads=4,
    mlp_dim=48,
    max_seq_len=32,
    scan_layers=scan,
    head_dim=head_dim,
  )
  model = heads.build_model(cfg)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), "int32")))[
    "params"
  ]


@pytest.mark.parametrize(
  "settings, message",
  [
    ({"targets": "attn/nothing"}, r"lora.targets='attn/nothing' matches no layer; presets"),
    ({"rank": 40}, r"lora.rank=40 exceeds block_0/attn/k/kernel's dims \(32 in, 32 out\)"),
    ({"dropout": 0.1}, r"lora.dropout=0.1: jaxlm does not drop the adapters' inputs"),
    ({"quantize": "int3"}, r"lora.quantize='int3' is not one of"),
    ({"quantize": "nf4", "head_dim": 7}, r"packs two 4-bit codes a byte along block_0/attn/o"),
    (
      {"targets": "block_0/attn/q/kernel", "scan": True},
      r"matches only some layers of the scanned",
    ),
  ],
)
def test_bad_lora_settings_are_one_line_errors(settings, message):
  c = base_config().lora
  scan, head_dim = settings.pop("scan", False), settings.pop("head_dim", 0)
  c.update({"rank": 4, **settings})
  with pytest.raises(ValueError, match=message) as err:
    lora_lib.build(c, _abstract(scan, head_dim), num_layers=2)
  assert "\n" not in str(err.value)


def test_lora_needs_a_model_to_start_from_and_a_kind_that_tunes_one(base_dir, tmp_path):
  config = lora_config(base_dir)
  config.model.init_from = ""
  config.model.update({"num_layers": 1, "embed_dim": 32, "num_heads": 2, "max_seq_len": 64})
  config.data.tokenizer = "char"
  with pytest.raises(ValueError, match=r"lora.rank=4 needs model.init_from \(the base model"):
    trainer.setup(config, str(tmp_path / "a"))
  config = lora_config(base_dir)
  config.kind = "mlm"
  with pytest.raises(ValueError, match=r"lora.rank=4 on kind='mlm': LoRA tunes a pretrained"):
    lora_lib.check_allowed(config)


def test_an_encoder_task_head_trains_in_full_beside_the_adapters():
  cfg = model_config.preset(
    "bert-mini", head="seq_cls", num_labels=3, num_layers=2, vocab_size=64, scan_layers=True
  )
  model = heads.build_model(cfg)
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), "int32")))
  c = base_config().lora
  c.update({"rank": 2, "targets": "attention"})
  full = tuple(k for k in boxed["params"] if k != "transformer")
  lora = lora_lib.build(c, boxed["params"], num_layers=2, full=full)
  assert {t.path for t in lora.targets} == {f"transformer/blocks/attn/{n}/kernel" for n in "qkvo"}
  assert all(t.stacked for t in lora.targets)
  trainable = traverse_util.flatten_dict(
    sharding.strip_boxes(jax.eval_shape(lambda: lora.init(jax.random.PRNGKey(0), boxed["params"]))),
    sep="/",
  )
  assert "classifier/kernel" in trainable and "transformer/blocks/attn/q/lora_a" in trainable
  a_shape = trainable["transformer/blocks/attn/q/lora_a"].shape  # [L, D, r]
  assert (a_shape[0], a_shape[-1]) == (2, 2)
  frozen = lora.freeze(sharding.strip_boxes(boxed["params"]))
  assert "classifier" not in frozen and "transformer" in frozen
