"""The accelerator benchmark suite, one command: kernel parity, train-step tokens/s and MFU against
Hugging Face transformers on PyTorch (torch.compile, SDPA), decode tokens/s against HF
`generate`, and compile time of 12 and 32 layers, scanned and unrolled. Prints one table.

  python benchmarks/gpu_suite.py                 # on a GPU (or TPU): the real sizes
  python benchmarks/gpu_suite.py --smoke         # tiny sizes, any backend (CPU: a few minutes)
  python benchmarks/gpu_suite.py --parts train decode --json out.json
  python benchmarks/gpu_suite.py --dry-run       # the device JAX sees and the kernel plan only

Parts:
  kernels  every attention kernel the device at hand runs (jaxlm.models.kernels.why_not; on a
           CPU triton and splash in Pallas interpret mode, tokamax's XLA path), and xla in the
           same dtype, against the xla path in fp32: bf16 and fp32, one document per row and
           packed, causal, GQA 8/2; max |difference| of the output and of dq, dk, dv, MISMATCH
           where a kernel is off by more than 4x xla's own error + 1e-3. Kernels that cannot
           run here are listed with the reason, kernels that raise with the error.
  train    AdamW train step, params fp32 and compute bf16: GPT-2 124M at T=1024 and a Llama-3.2-1B
           shaped model at T=2048; jaxlm with attention auto (one document per row, then packed
           documents with segment ids), xla attention, and the chunked loss; HF + torch.compile +
           SDPA under bf16 autocast on the same device (one document per row). tokens/s and MFU
           (jaxlm.devices: model FLOPs per token, causal attention counted as half, over the
           device's bf16 peak). Then LoRA r16 on every linear layer of the Llama shape over a
           bf16 base: jaxlm (adapters unmerged) against PEFT under torch.compile. Every row
           notes its step memory (jaxlm: the compiled step's; PyTorch: max_memory_allocated).
           --models picks the models and their order, --steps the timed steps.
  decode   greedy decode of 128 new tokens after 128 prompt tokens at batch 1, 8 and 64, the
           Llama-shaped model with random weights, jaxlm.generate vs HF generate (bf16).
  compile  seconds to lower and compile the GPT-2 124M train step with 12 and 32 layers, scanned
           (nn.scan) and unrolled (JAX's persistent compilation cache off).
"""

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LLAMA_1B = dict(
  norm="rmsnorm",
  position="rope",
  activation="silu",
  gated_mlp=True,
  use_bias=False,
  vocab_size=128256,
  num_layers=16,
  embed_dim=2048,
  num_heads=32,
  num_kv_heads=8,
  mlp_dim=8192,
  rope_theta=500000.0,
  max_seq_len=8192,
)
GPT2_124M = dict(
  norm="layernorm",
  position="learned",
  activation="gelu_tanh",
  use_bias=True,
  vocab_size=50257,
  num_layers=12,
  embed_dim=768,
  num_heads=12,
  max_seq_len=1024,
)
# --smoke: the same families, tiny
LLAMA_TINY = dict(
  LLAMA_1B,
  vocab_size=512,
  num_layers=2,
  embed_dim=64,
  num_heads=4,
  num_kv_heads=2,
  mlp_dim=128,
  max_seq_len=256,
)
GPT2_TINY = dict(
  GPT2_124M, vocab_size=512, num_layers=2, embed_dim=64, num_heads=4, max_seq_len=128
)


@dataclasses.dataclass
class Sizes:
  gpt2: dict
  gpt2_seq: int
  gpt2_batch: int
  llama: dict
  llama_seq: int
  llama_batch: int
  steps: int
  warmup: int
  decode_batches: tuple
  prompt: int
  new_tokens: int
  compile_layers: tuple
  kernel_seq: int
  loss_chunk: int


FULL = Sizes(
  GPT2_124M, 1024, 16, LLAMA_1B, 2048, 8, 20, 3, (1, 8, 64), 128, 128, (12, 32), 1024, 1024
)
SMOKE = Sizes(GPT2_TINY, 128, 4, LLAMA_TINY, 128, 2, 3, 1, (1, 8), 8, 8, (2, 4), 128, 32)


@dataclasses.dataclass
class Row:
  part: str
  case: str
  metric: str
  jaxlm: float | None
  peer: float | None = None
  note: str = ""

  def __post_init__(self):  # printed as measured: a run cut short still shows what it measured
    print(f"  row: {self.part} | {self.case} | {self.metric} | {self.jaxlm} | {self.peer} | "
          f"{self.note}", flush=True)


def _cfg(fields: dict, **changes):
  from jaxlm.models.config import ModelConfig

  return ModelConfig(**{**fields, "dtype": "bfloat16", "param_dtype": "float32", **changes})


def _peak():
  import jax

  from jaxlm import devices

  kind = devices.kind_of(jax.devices()[0].device_kind)
  return kind, (devices.peak_flops(kind, "bfloat16") if kind else 0.0)


def _batch_arrays(rng, batch, seq, vocab, packed):
  """Random tokens; packed: documents of random lengths (mean seq / 4), positions restarting."""
  import numpy as np

  tokens = rng.integers(0, vocab, (batch, seq + 1)).astype(np.int32)
  out = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  if packed:
    seg = np.zeros((batch, seq), np.int32)
    pos = np.zeros((batch, seq), np.int32)
    for b in range(batch):
      t, doc = 0, 1
      while t < seq:
        n = min(int(rng.integers(seq // 16 + 1, seq // 2 + 2)), seq - t)
        seg[b, t : t + n], pos[b, t : t + n] = doc, np.arange(n)
        t, doc = t + n, doc + 1
    out.update(segment_ids=seg, positions=pos)
  return out


# ------------------------------------------------------------------------------------- kernels
def _kernel_inputs(B, T, H, K, E, dtype):
  """q, k, v and an output cotangent (fp32 draws cast to `dtype`) and packed segment ids: three
  documents in row 0, two in row 1, boundaries off the kernels' blocks."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q, ct = (jax.random.normal(k, (B, T, H, E)).astype(dtype) for k in keys[:2])
  k, v = (jax.random.normal(kk, (B, T, K, E)).astype(dtype) for kk in keys[2:])
  seg = np.ones((B, T), np.int32)
  seg[:, T // 3 :] = 2
  seg[0, (3 * T) // 4 :] = 3
  return (q, k, v, ct), jnp.asarray(seg[:, :T])


def kernel_plan(T: int, E: int):
  """[(dtype, packed, auto's pick, {kernel: None or why it cannot run})] for the device at hand."""
  from jaxlm.models import kernels

  device = kernels.device_at_hand()
  plan = []
  for dtype in ("bfloat16", "float32"):
    for packed in (False, True):
      call = kernels.Call(dtype, E, T, packed)
      reasons = {k: kernels.why_not(k, device, call) for k in kernels.KERNELS}
      plan.append((dtype, packed, kernels.choose("auto", device, call), reasons))
  return device, plan


def _out_and_grads(fn, q, k, v, ct):
  import jax

  out, vjp = jax.vjp(fn, q, k, v)
  return (out, *vjp(ct))


def _max_errors(got, ref):
  import jax.numpy as jnp

  return [float(jnp.abs(a.astype(jnp.float32) - b).max()) for a, b in zip(got, ref)]


def _kernel_case(rows: list, args, seg, label: str, auto: str, reasons: dict):
  """One dtype x packing: xla in that dtype (the baseline), then each kernel, against fp32 xla."""
  import jax
  import jax.numpy as jnp

  from jaxlm.models import kernels
  from jaxlm.models.layers import attend, attention_mask

  mask = attention_mask(seg, causal=True)
  xla = jax.jit(lambda *a: _out_and_grads(lambda q, k, v: attend(q, k, v, mask), *a))
  ref = xla(*(x.astype(jnp.float32) for x in args))
  base = _max_errors(xla(*args), ref)

  def grads_note(errs):
    return "dq,dk,dv " + ", ".join(f"{e:.3g}" for e in errs[1:])

  rows.append(Row("kernels", f"xla {label}", "max|err| out", base[0],
                  note=grads_note(base) + " (baseline)"))
  for impl in kernels.KERNELS:
    case = f"{impl}{' (auto)' if impl == auto else ''} {label}"
    if reasons[impl]:
      rows.append(Row("kernels", case, "refused", None, note=reasons[impl][:110]))
      continue
    try:
      fn = functools.partial(kernels.attend, impl, segment_ids_BT=seg)
      errs = _max_errors(jax.jit(functools.partial(_out_and_grads, fn))(*args), ref)
    except Exception as e:  # noqa: BLE001  (report and go on: one kernel's failure is a result)
      rows.append(Row("kernels", case, "error", None,
                      note=f"{type(e).__name__}: {str(e).splitlines()[0][:110]}"))
      continue
    bad = [n for n, e, b in zip(("out", "dq", "dk", "dv"), errs, base) if e > 4 * b + 1e-3]
    verdict = f"MISMATCH in {', '.join(bad)}" if bad else "ok"
    note = f"{grads_note(errs)}; {verdict}"
    rows.append(Row("kernels", case, "max|err| out", errs[0], note=note))


def part_kernels(sz: Sizes, rows: list, dry_run: bool = False):
  """Every kernel the device at hand runs, and xla in the same dtype, against the xla path in
  fp32 (forward and dq, dk, dv), bf16 and fp32, one document per row and packed. A kernel that
  cannot run here is reported with why_not's reason, one that raises with its error; an error
  over 4x xla's own (same dtype) plus 1e-3 is flagged MISMATCH (a kernel attending across
  documents, as MaxText #4476's cuDNN path did, is off by O(1))."""
  B, T, H, K, E = 2, sz.kernel_seq, 8, 2, 64
  device, plan = kernel_plan(T, E)
  rows.append(Row("kernels", "device", "note", None, note=str(device)))
  for dtype, packed, auto, reasons in plan:
    label = f"{dtype} T={T} GQA {H}/{K} {'packed' if packed else 'one doc/row'}"
    if dry_run:
      runs = [k for k, r in reasons.items() if r is None]
      rows.append(Row("kernels", label, "plan", None, note=f"auto: {auto}; runs: {runs}"))
      continue
    args, seg = _kernel_inputs(B, T, H, K, E, dtype)
    _kernel_case(rows, args, seg if packed else None, label, auto, reasons)


# --------------------------------------------------------------------------------------- train
def jaxlm_train(cfg, batch, seq, steps, warmup, packed, lora_rank=0):
  """Median-free throughput: tokens/s over `steps` timed steps after `warmup`. `lora_rank` > 0:
  LoRA of that rank on every linear layer (adapters fp32, applied unmerged) over a bf16 frozen
  base. Returns (tokens/s, compile s, last loss, the compiled step's memory in bytes)."""
  import jax
  import ml_collections
  import numpy as np

  from jaxlm import sharding
  from jaxlm.config import base_config
  from jaxlm.models import lora as lora_lib
  from jaxlm.models.heads import param_shapes
  from jaxlm.models.transformer import Transformer
  from jaxlm.train import objectives, optim
  from jaxlm.train import step as step_lib

  model = Transformer(cfg)
  ocfg = base_config().optim
  ocfg.update(dict(warmup_steps=0, clip=1.0))
  tx, _ = optim.make_optimizer(ocfg, 10_000)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
  lora = None
  if lora_rank:
    section = base_config().lora
    section.update(dict(rank=lora_rank, alpha=float(lora_rank), targets="all",
                        base_dtype="bfloat16"))
    lora = lora_lib.build(section, param_shapes(model), num_layers=cfg.num_layers)
  state, shardings = step_lib.sharded_init(model, tx, jax.random.PRNGKey(0), mesh, lora)
  fn = step_lib.jit_train_step(shardings, objectives.for_head("lm"))
  rng = np.random.default_rng(0)
  data = [_batch_arrays(rng, batch, seq, cfg.vocab_size, packed) for _ in range(4)]
  with sharding.mesh_rules(mesh):
    batches = [sharding.global_batch(d, mesh) for d in data]
    t0 = time.perf_counter()
    fn = fn.lower(state, batches[0]).compile()
    mem = fn.memory_analysis()
    mem_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                 - mem.alias_size_in_bytes + mem.temp_size_in_bytes) if mem else 0
    state, metrics = fn(state, batches[0])
    float(metrics["loss"])
    compile_s = time.perf_counter() - t0
    for i in range(warmup):
      state, metrics = fn(state, batches[i % 4])
    float(metrics["loss"])
    t0 = time.perf_counter()
    for i in range(steps):
      state, metrics = fn(state, batches[i % 4])
    loss = float(metrics["loss"])
    elapsed = time.perf_counter() - t0
  del state
  return batch * seq * steps / elapsed, compile_s, loss, mem_bytes


def torch_train(cfg, batch, seq, steps, warmup, compile_model, lora_rank=0):
  """HF model of the same config on PyTorch: fp32 params, bf16 autocast, SDPA, fused AdamW.
  `lora_rank` > 0: PEFT LoRA of that rank on every linear layer over the model in bf16.
  Returns (tokens/s, seconds to the end of the first steps, last loss, peak CUDA bytes)."""
  import numpy as np
  import torch
  import transformers

  from jaxlm.hf import families

  device = "cuda" if torch.cuda.is_available() else "cpu"
  hf_config = families.family_for(cfg).config_to_hf(cfg)
  hf_config._attn_implementation = "sdpa"
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa")
  model = model.to(device).train()
  if lora_rank:
    import peft

    model = peft.get_peft_model(model.to(torch.bfloat16), peft.LoraConfig(
      r=lora_rank, lora_alpha=lora_rank, lora_dropout=0.0, target_modules="all-linear"))
  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  trained = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(trained, lr=3e-4, weight_decay=0.1, fused=device == "cuda")
  step_model = torch.compile(model) if compile_model else model
  rng = np.random.default_rng(0)
  data = [
    torch.from_numpy(rng.integers(0, cfg.vocab_size, (batch, seq)).astype(np.int64)).to(device)
    for _ in range(4)
  ]

  def step(x):
    with torch.autocast(device, dtype=torch.bfloat16):
      loss = step_model(input_ids=x, labels=x).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trained, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  t0 = time.perf_counter()
  for i in range(warmup + 1):
    loss = step(data[i % 4])
  loss.item()
  compile_s = time.perf_counter() - t0
  sync()
  t0 = time.perf_counter()
  for i in range(steps):
    loss = step(data[i % 4])
  loss = loss.item()
  sync()
  elapsed = time.perf_counter() - t0
  peak = 0
  if device == "cuda":
    peak = torch.cuda.max_memory_allocated()
    del model, opt, step_model
    torch.cuda.empty_cache()
  return batch * seq * steps / elapsed, compile_s, loss, peak


def part_train(sz: Sizes, rows: list, torch_peer: bool, torch_compile: bool,
               models=("gpt2-124m", "llama-1b")):
  from jaxlm import devices

  kind, peak = _peak()
  shapes = {
    "gpt2-124m": (sz.gpt2, sz.gpt2_seq, sz.gpt2_batch),
    "llama-1b": (sz.llama, sz.llama_seq, sz.llama_batch),
  }
  for name in models:
    fields, seq, batch = shapes[name]
    base = _cfg(fields, max_seq_len=max(fields["max_seq_len"], seq))
    flops = devices.model_flops_per_token(base, seq)
    mfu = lambda tps, flops=flops: 100 * tps * flops / peak if peak else None
    peer_tps = None
    if torch_peer:
      try:
        peer_tps, peer_compile, _, peer_mem = torch_train(
          base, batch, seq, sz.steps, sz.warmup, torch_compile
        )
        rows.append(
          Row(
            "train",
            f"{name} HF torch{'.compile' if torch_compile else ''} SDPA",
            "tokens/s",
            None,
            peer_tps,
            note=f"MFU {mfu(peer_tps) or 0:.1f}%, first steps {peer_compile:.0f} s, "
            f"peak {peer_mem / 2**30:.1f} GiB",
          )
        )
      except Exception as e:  # noqa: BLE001
        rows.append(
          Row(
            "train",
            f"{name} HF torch",
            "error",
            None,
            note=f"{type(e).__name__}: {str(e).splitlines()[0][:90]}",
          )
        )
    variants = (
      ("auto", {}, False),
      ("auto packed", {}, True),
      ("xla", {"attention": "xla"}, False),
      (f"auto loss_chunk={sz.loss_chunk}", {"loss_chunk": sz.loss_chunk}, False),
    )
    for label, changes, packed in variants:
      cfg = base.replace(**changes)
      try:
        tps, compile_s, loss, mem = jaxlm_train(cfg, batch, seq, sz.steps, sz.warmup, packed)
        m = mfu(tps)
        rows.append(
          Row(
            "train",
            f"{name} T={seq} B={batch} {label}",
            "tokens/s",
            tps,
            peer_tps,
            note=(f"MFU {m:.1f}% " if m is not None else "")
            + f"compile {compile_s:.0f} s, loss {loss:.2f}, step memory {mem / 2**30:.1f} GiB",
          )
        )
      except Exception as e:  # noqa: BLE001
        rows.append(
          Row(
            "train",
            f"{name} {label}",
            "error",
            None,
            note=f"{type(e).__name__}: {str(e).splitlines()[0][:90]}",
          )
        )
    if name == "llama-1b":
      _lora_rows(rows, base, batch, seq, sz, torch_peer, torch_compile)
  if kind is None:
    rows.append(Row("train", "MFU", "note", None, note="device kind not in jaxlm.devices"))


def _lora_rows(rows, cfg, batch, seq, sz, torch_peer, torch_compile):
  """LoRA r16 on every linear layer of the Llama-shaped model: jaxlm (adapters unmerged, base
  bf16) against PEFT over the bf16 HF model, step time and memory."""
  peer = peer_note = None
  if torch_peer:
    try:
      peer, first, _, peak = torch_train(cfg, batch, seq, sz.steps, sz.warmup, torch_compile, 16)
      peer_note = f"first steps {first:.0f} s, peak {peak / 2**30:.1f} GiB"
      rows.append(Row("train", "llama-1b LoRA r16 all, PEFT torch", "tokens/s", None, peer,
                      note=peer_note))
    except Exception as e:  # noqa: BLE001
      rows.append(Row("train", "llama-1b LoRA PEFT", "error", None,
                      note=f"{type(e).__name__}: {str(e).splitlines()[0][:90]}"))
  try:
    tps, compile_s, loss, mem = jaxlm_train(cfg, batch, seq, sz.steps, sz.warmup, False, 16)
    rows.append(Row("train", f"llama-1b T={seq} B={batch} LoRA r16 all", "tokens/s", tps, peer,
                    note=f"compile {compile_s:.0f} s, loss {loss:.2f}, "
                    f"step memory {mem / 2**30:.1f} GiB"))
  except Exception as e:  # noqa: BLE001
    rows.append(Row("train", "llama-1b LoRA", "error", None,
                    note=f"{type(e).__name__}: {str(e).splitlines()[0][:90]}"))


# -------------------------------------------------------------------------------------- decode
def part_decode(sz: Sizes, rows: list, torch_peer: bool):
  import flax.linen as nn
  import jax
  import numpy as np

  from jaxlm import generate as gen
  from jaxlm.hf import convert, families
  from jaxlm.models.transformer import Transformer

  cfg = _cfg(sz.llama, param_dtype="bfloat16")
  model = Transformer(cfg)
  params = jax.jit(lambda r: nn.unbox(model.init(r, np.zeros((1, 1), np.int32))["params"]))(
    jax.random.PRNGKey(0)
  )
  hf_model = device = None
  if torch_peer:
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    fam = families.family_for(cfg)
    tensors = convert.export_params(fam, cfg, params)
    hf_model = transformers.AutoModelForCausalLM.from_config(fam.config_to_hf(cfg))
    hf_model.load_state_dict(
      {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in tensors.items()}, strict=False
    )
    hf_model.tie_weights()
    hf_model = hf_model.to(device=device, dtype=torch.bfloat16).eval()
    hf_model.generation_config.eos_token_id = None
  rng = np.random.default_rng(0)
  N = sz.new_tokens
  for B in sz.decode_batches:
    prompts = rng.integers(1, cfg.vocab_size, (B, sz.prompt)).tolist()
    t0 = time.perf_counter()
    gen.generate(model, params, prompts, max_new_tokens=N)
    first = time.perf_counter() - t0
    times = []
    for _ in range(3):
      t0 = time.perf_counter()
      gen.generate(model, params, prompts, max_new_tokens=N)
      times.append(time.perf_counter() - t0)
    tps = B * N / statistics.median(times)
    peer = None
    if hf_model is not None:
      import torch

      x = torch.tensor(prompts, device=device)
      hf_times = []
      for _ in range(4):
        t0 = time.perf_counter()
        with torch.no_grad():
          hf_model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=N,
            min_new_tokens=N,
            do_sample=False,
            pad_token_id=0,
          )
        hf_times.append(time.perf_counter() - t0)
      peer = B * N / statistics.median(hf_times[1:])
    rows.append(
      Row(
        "decode",
        f"llama-1b-shaped bf16 batch {B}, {sz.prompt}+{N} tokens",
        "tokens/s",
        tps,
        peer,
        note=f"first call {first:.1f} s incl. compile",
      )
    )


# ------------------------------------------------------------------------------------- compile
def part_compile(sz: Sizes, rows: list):
  import jax
  import jax.numpy as jnp
  import ml_collections

  from jaxlm import sharding
  from jaxlm.config import base_config
  from jaxlm.data.batch import Batch
  from jaxlm.models.transformer import Transformer
  from jaxlm.train import objectives, optim
  from jaxlm.train import step as step_lib

  try:
    jax.config.update("jax_enable_compilation_cache", False)
  except AttributeError:
    pass
  tx, _ = optim.make_optimizer(base_config().optim, 1000)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
  tokens = jax.ShapeDtypeStruct((sz.gpt2_batch, sz.gpt2_seq), jnp.int32)
  for layers in sz.compile_layers:
    for scan in (True, False):
      cfg = _cfg(sz.gpt2, num_layers=layers, scan_layers=scan)
      abstract, shardings = step_lib.abstract_state(Transformer(cfg), tx, mesh)
      fn = step_lib.jit_train_step(shardings, objectives.for_head("lm"))
      t0 = time.perf_counter()
      with sharding.mesh_rules(mesh):
        fn.lower(abstract, Batch(inputs=tokens, targets=tokens)).compile()
      rows.append(
        Row(
          "compile",
          f"gpt2 {layers} layers {'scanned' if scan else 'unrolled'}",
          "seconds",
          time.perf_counter() - t0,
        )
      )


# --------------------------------------------------------------------------------------- table
def print_table(rows: list, header: str):
  print(f"\n{header}")
  fmt = "{:<8} {:<44} {:<13} {:>12} {:>12} {:>7}  {}"
  print(fmt.format("part", "case", "metric", "jaxlm", "peer", "ratio", "note"))
  for r in rows:
    ratio = f"{r.jaxlm / r.peer:.2f}x" if r.jaxlm and r.peer else ""
    num = lambda x: "" if x is None else (f"{x:.3g}" if abs(x) < 1 else f"{x:,.1f}")
    print(fmt.format(r.part, r.case[:44], r.metric, num(r.jaxlm), num(r.peer), ratio, r.note))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--smoke", action="store_true", help="tiny sizes: check it runs anywhere")
  parser.add_argument(
    "--parts",
    nargs="+",
    default=["kernels", "train", "decode", "compile"],
    choices=["kernels", "train", "decode", "compile"],
  )
  parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch peers")
  parser.add_argument(
    "--no-torch-compile",
    action="store_true",
    help="PyTorch eager instead of torch.compile (default off in --smoke)",
  )
  parser.add_argument("--json", default=None, help="also write the rows here (after each part)")
  parser.add_argument("--steps", type=int, default=None, help="timed train steps (default 20)")
  parser.add_argument("--models", nargs="+", default=["gpt2-124m", "llama-1b"],
                      choices=["gpt2-124m", "llama-1b"], help="train: the models, in this order")
  parser.add_argument(
    "--dry-run", action="store_true", help="print the device and the kernel plan, run nothing"
  )
  args = parser.parse_args()
  import jax

  sz = SMOKE if args.smoke else FULL
  if args.steps:
    sz = dataclasses.replace(sz, steps=args.steps)
  torch_peer = not args.no_torch
  torch_compile = not (args.no_torch_compile or args.smoke)
  device = jax.devices()[0]
  header = (
    f"jaxlm benchmark suite{' (smoke sizes)' if args.smoke else ''}: {len(jax.devices())} x "
    f"{device.device_kind} ({jax.default_backend()}), jax {jax.__version__}"
  )
  print(header, flush=True)
  rows: list[Row] = []
  parts = {
    "kernels": lambda: part_kernels(sz, rows, args.dry_run),
    "train": lambda: part_train(sz, rows, torch_peer, torch_compile, args.models),
    "decode": lambda: part_decode(sz, rows, torch_peer),
    "compile": lambda: part_compile(sz, rows),
  }
  for part in ["kernels"] if args.dry_run else args.parts:
    t0 = time.perf_counter()
    parts[part]()
    print(f"[{part} done in {time.perf_counter() - t0:.0f} s]", flush=True)
    print_table(rows, header)  # after every part: a run cut short still shows what it measured
    if args.json:
      with open(args.json, "w") as f:
        json.dump([dataclasses.asdict(r) for r in rows], f, indent=1)


if __name__ == "__main__":
  main()
