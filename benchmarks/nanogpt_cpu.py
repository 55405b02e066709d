"""nanoGPT's CPU recipe, whole processes side by side: jaxlm vs nanoGPT's own train.py.

  git clone https://github.com/karpathy/nanoGPT /tmp/nanoGPT
  python benchmarks/nanogpt_cpu.py --nanogpt /tmp/nanoGPT [--pairs 2] [--steps 2000]
      [--set KEY=VALUE] [--variant KEY=VALUE]

Both train the 0.8M-parameter character-level GPT on Tiny Shakespeare (4 layers, 4 heads, 128
dims, block 64, batch 12, AdamW lr 1e-3 cosine to 1e-4, 2000 steps, eval every 250 steps) on the
CPU, as nanoGPT's README gives it. Runs alternate (jaxlm, nanoGPT, jaxlm, nanoGPT, ...) so both
see the same machine; each is timed as a whole process (start-up, data, compilation, evaluation,
checkpoints, jaxlm's closing sample included) with its peak resident memory. Prints each run, the
medians and the ratios jaxlm / nanoGPT, and jaxlm's MFU from its metrics.jsonl. jaxlm compiles
from scratch in every run unless --warm-cache (then runs after the first load their programs).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

import whole_process

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "tinyshakespeare", "input.txt")
def timed(cwd: str, cmd: list[str]) -> dict:
  result = whole_process.run(cwd, cmd)
  if result["rc"]:
    sys.exit(f"{cmd[:3]} failed:\n{result['err']}")
  return result


def nanogpt_command(steps: int) -> list[str]:
  return [sys.executable, "train.py", "config/train_shakespeare_char.py", "--device=cpu",
          "--compile=False", "--eval_iters=20", "--log_interval=1", "--block_size=64",
          "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128",
          f"--max_iters={steps}", f"--lr_decay_iters={steps}", "--dropout=0.0"]


def jaxlm_command(workdir: str, steps: int, data: str, overrides=()) -> list[str]:
  return [sys.executable, "-m", "jaxlm.cli", "train", "--config", "configs/shakespeare_char.py",
          "--workdir", workdir, f"--config.data.path={data}", f"--config.train.steps={steps}",
          f"--config.checkpoint.every={steps}", *(f"--config.{o}" for o in overrides)]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--nanogpt", required=True, help="a clone of karpathy/nanoGPT")
  parser.add_argument("--pairs", type=int, default=2)
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--data", default=DATA, help="Tiny Shakespeare input.txt")
  parser.add_argument("--warm-cache", action="store_true",
                      help="let jaxlm's runs share one persistent compilation cache (a rerun of "
                      "the same config), instead of a fresh one per run (a first launch)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="a config override for jaxlm's runs (repeatable)")
  parser.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE",
                      help="adds a third run to each round: jaxlm with these overrides on top "
                      "(repeatable), e.g. train.steps_per_call=1, to measure what it changes")
  args = parser.parse_args()
  tmp = tempfile.mkdtemp(prefix="nanogpt-bench-")
  nano = os.path.join(tmp, "nanoGPT")
  shutil.copytree(args.nanogpt, nano, ignore=shutil.ignore_patterns(".git", "out*"))
  shutil.copy(args.data, os.path.join(nano, "data", "shakespeare_char", "input.txt"))
  subprocess.run([sys.executable, "data/shakespeare_char/prepare.py"], cwd=nano, check=True,
                 capture_output=True)
  arms = {"jaxlm": args.set}
  if args.variant:
    arms["variant"] = args.set + args.variant
    print(f"variant: jaxlm with {' '.join(args.variant)}")
  runs = {name: [] for name in (*arms, "nanoGPT")}
  for pair in range(args.pairs):
    for name, overrides in arms.items():
      workdir = os.path.join(tmp, f"{name}-{pair}")
      os.environ["JAXLM_COMPILE_CACHE"] = os.path.join(tmp, "xla" if args.warm_cache else workdir)
      run = timed(REPO, jaxlm_command(workdir, args.steps, args.data, overrides))
      records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
      run["mfu"] = records[-1].get("mean_mfu", float("nan"))
      run["eval_loss"] = [r for r in records if "eval_loss" in r][-1]["eval_loss"]
      runs[name].append(run)
    shutil.rmtree(os.path.join(nano, "out-shakespeare-char"), ignore_errors=True)
    runs["nanoGPT"].append(timed(nano, nanogpt_command(args.steps)))
    for name in runs:
      r = runs[name][-1]
      extra = f", MFU {100 * r['mfu']:.1f}%, eval_loss {r['eval_loss']:.3f}" if "mfu" in r else ""
      print(f"pair {pair} {name:8s} {r['wall']:7.1f} s wall, peak RSS {r['rss'] / 2**20:6.0f} MiB"
            f"{extra}", flush=True)
  med = {name: {k: statistics.median(r[k] for r in rs) for k in ("wall", "rss")}
         for name, rs in runs.items()}
  for name, m in med.items():
    print(f"median {name:8s} {m['wall']:7.1f} s wall, peak RSS {m['rss'] / 2**20:6.0f} MiB")
  for name in arms:
    print(f"ratio {name} / nanoGPT: wall {med[name]['wall'] / med['nanoGPT']['wall']:.2f}x, "
          f"peak memory {med[name]['rss'] / med['nanoGPT']['rss']:.2f}x; {name} MFU "
          f"{100 * statistics.median(r['mfu'] for r in runs[name]):.1f}%")
  if args.variant:
    ratios = [v["wall"] / j["wall"] for j, v in zip(runs["jaxlm"], runs["variant"])]
    print(f"ratio variant / jaxlm: wall {med['variant']['wall'] / med['jaxlm']['wall']:.2f}x "
          f"(per round {', '.join(f'{r:.2f}' for r in ratios)})")
  shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
