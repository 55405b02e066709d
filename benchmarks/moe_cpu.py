"""A sparse MoE against a dense model of the same active FLOPs, trained on the CPU, side by side.

  python benchmarks/moe_cpu.py [--steps 500] [--pairs 2] [--experts 8] [--top 2]

Both are the nanoGPT character recipe's shape made Llama-style (RoPE, RMSNorm, SwiGLU, no biases:
the experts are SwiGLU MLPs), 4 layers of 128, batch 12 x 64 of Tiny Shakespeare, AdamW, the
recipe's schedule shortened to --steps:
  dense  one SwiGLU MLP of width k * F per layer;
  moe    X experts of width F, each token sent to its top k (router aux loss 0.01), so a token
         runs the dense model's MLP FLOPs plus the router's [128 x X].
Each run is a whole `jaxlm train` process on its own fresh compilation cache; dense and MoE
alternate --pairs times. Step time is the median over a run's records of batch x seq over
`tokens_per_sec` (50 steps a jitted call; the first call, which compiles, left out). Prints each
run, the medians, the ratio MoE / dense of the step time, and both runs' eval cross entropy at
the last step (20 batches of the validation split; the MoE's 0.01 x load-balancing loss taken
out).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile

import whole_process

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "tinyshakespeare", "input.txt")
LLAMA_STYLE = ["position=rope", "norm=rmsnorm", "gated_mlp=True", "activation=silu",
               "use_bias=False"]
AUX_COEF = 0.01


def command(workdir: str, steps: int, model: list[str]) -> list[str]:
  sets = [f"--config.model.{kv}" for kv in LLAMA_STYLE + model]
  return [sys.executable, "-m", "jaxlm.cli", "train", "--config", "configs/shakespeare_char.py",
          "--workdir", workdir, f"--config.data.path={DATA}", f"--config.train.steps={steps}",
          f"--config.train.eval_every={steps}",
          f"--config.optim.warmup_steps={min(100, steps // 5)}",
          f"--config.checkpoint.every={steps}", "--config.sample.max_new_tokens=0", *sets]


def one_run(tmp: str, name: str, i: int, steps: int, model: list[str]) -> dict:
  workdir = os.path.join(tmp, f"{name}{i}")
  env = dict(os.environ, JAXLM_COMPILE_CACHE=os.path.join(tmp, f"xla-{name}{i}"))
  result = whole_process.run(REPO, command(workdir, steps, model), env)
  if result["rc"]:
    sys.exit(f"{name} run failed:\n{result['err']}")
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  tps = [r["tokens_per_sec"] for r in records if r.get("tokens_per_sec")]
  evals = [r for r in records if "eval_loss" in r]
  step_ms = statistics.median(12 * 64 / t for t in tps[1:] or tps) * 1e3
  last = evals[-1]
  # an MoE model's eval loss carries 0.01 x its load-balancing loss: compare the cross entropy
  aux = next((v for k, v in last.items() if k.endswith("moe/aux_loss")), 0.0)
  row = {"step_ms": step_ms, "wall": result["wall"], "rss_mib": result["rss"] / 2**20,
         "eval_loss": last["eval_loss"] - AUX_COEF * aux, "eval_step": last["step"]}
  print(f"{name:5s} run {i}: step {step_ms:.1f} ms, wall {result['wall']:.1f} s, "
        f"eval_loss {row['eval_loss']:.4f} at step {row['eval_step']}, "
        f"peak RSS {row['rss_mib']:.0f} MiB", flush=True)
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=500)
  parser.add_argument("--pairs", type=int, default=2)
  parser.add_argument("--experts", type=int, default=8)
  parser.add_argument("--top", type=int, default=2)
  parser.add_argument("--expert_dim", type=int, default=256, help="F, one expert's width")
  args = parser.parse_args()
  arms = {
    "dense": [f"mlp_dim={args.top * args.expert_dim}"],
    "moe": [f"mlp_dim={args.expert_dim}", f"num_experts={args.experts}",
            f"experts_per_token={args.top}", f"moe_intermediate_size={args.expert_dim}",
            f"router_aux_loss_coef={AUX_COEF}"],
  }
  runs = {name: [] for name in arms}
  with tempfile.TemporaryDirectory() as tmp:
    for i in range(args.pairs):
      for name, model in arms.items():
        runs[name].append(one_run(tmp, name, i, args.steps, model))
  med = {name: {k: statistics.median(r[k] for r in rows) for k in ("step_ms", "wall", "eval_loss")}
         for name, rows in runs.items()}
  for name, m in med.items():
    print(f"median {name:5s}: step {m['step_ms']:.1f} ms, wall {m['wall']:.1f} s, "
          f"eval_loss {m['eval_loss']:.4f}")
  ratios = [m["step_ms"] / d["step_ms"] for d, m in zip(runs["dense"], runs["moe"])]
  print(f"ratio moe / dense: step {med['moe']['step_ms'] / med['dense']['step_ms']:.2f}x "
        f"(pairs: {', '.join(f'{r:.2f}' for r in ratios)}); eval_loss moe - dense "
        f"{med['moe']['eval_loss'] - med['dense']['eval_loss']:+.4f}")


if __name__ == "__main__":
  main()
