"""Data pipeline throughput: jaxlm's tokenize-and-pack vs the Hugging Face examples' recipe.

  python benchmarks/data_throughput.py [--seq-len 1024] [--hf-num-proc 0]

Tokenizes WikiText-2 (valid + test) and Tiny Shakespeare from ../shared/data with the GPT-2
tokenizer and packs them into 1024-token rows, in the same process, three ways:
  hf          datasets.load_dataset("text") -> .map(tokenizer, batched) -> .map(group_texts),
              as in transformers' examples/pytorch/language-modeling/run_clm.py
  jaxlm cold  jaxlm.data: tokenize into an empty cache, then iterate every packed batch
  jaxlm warm  the same again, reading the tokens back from the cache
Prints tokens/s for each and the ratios (goal: jaxlm cold >= 1.5x hf; warm faster still).
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
from itertools import chain

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared",
                    "data")
FILES = ["wikitext2/valid.txt", "wikitext2/test.txt", "tinyshakespeare/input.txt"]


def run_hf(files, tokenizer, seq_len, num_proc, cache_dir):
  """run_clm.py's preprocessing: returns (seconds, tokens tokenized, first row)."""
  import datasets

  t0 = time.perf_counter()
  raw = datasets.load_dataset("text", data_files={"train": files}, keep_linebreaks=True,
                              cache_dir=cache_dir)["train"]
  tokenized = raw.map(lambda ex: tokenizer(ex["text"]), batched=True, num_proc=num_proc or None,
                      remove_columns=["text"], load_from_cache_file=False)

  def group_texts(examples):
    concatenated = {k: list(chain(*examples[k])) for k in examples}
    total = (len(concatenated["input_ids"]) // seq_len) * seq_len
    return {k: [t[i : i + seq_len] for i in range(0, total, seq_len)]
            for k, t in concatenated.items()}

  grouped = tokenized.map(group_texts, batched=True, num_proc=num_proc or None,
                          load_from_cache_file=False)
  seconds = time.perf_counter() - t0
  n_tokens = sum(len(x) for x in tokenized["input_ids"])
  return seconds, n_tokens, grouped[0]["input_ids"], len(grouped)


def run_jaxlm(files, tokenizer, seq_len, cache_dir):
  """jaxlm's pipeline from raw files to every packed batch: (seconds, tokens, first row)."""
  from jaxlm.config import base_config
  from jaxlm.data import pipeline

  cfg = base_config().data
  cfg.update({"packing": "concat", "mixture": ",".join(files), "seq_len": seq_len,
              "add_eos": False, "cache_dir": cache_dir, "val_fraction": 0.0})
  t0 = time.perf_counter()
  parts = pipeline.load_parts(cfg, tokenizer)
  first, rows = None, 0
  for _, docs in parts:  # each source in order, unshuffled, as the recipe does
    stream = pipeline.batches([(1.0, docs)], cfg, 8, 0, pipeline.Shard(), shuffle=False,
                              num_epochs=1)
    for batch in stream:
      first = batch["inputs"][0] if first is None else first
      rows += len(batch["inputs"])
  seconds = time.perf_counter() - t0
  return seconds, sum(len(d.tokens) for _, d in parts), first, rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seq-len", type=int, default=1024)
  parser.add_argument("--hf-num-proc", type=int, default=0, help="datasets.map num_proc (0: 1)")
  args = parser.parse_args()
  files = [os.path.abspath(os.path.join(DATA, f)) for f in FILES]
  missing = [f for f in files if not os.path.isfile(f)]
  if missing:
    sys.exit(f"missing data files {missing}: ../shared/data is absent")
  from transformers import AutoTokenizer

  tokenizer = AutoTokenizer.from_pretrained(os.path.join(DATA, "tokenizers", "gpt2"))
  tmp = tempfile.mkdtemp(prefix="jaxlm_bench_")
  try:
    hf_s, hf_tok, hf_row, hf_rows = run_hf(files, tokenizer, args.seq_len, args.hf_num_proc,
                                           os.path.join(tmp, "hf"))
    cold_s, tok, row, rows = run_jaxlm(files, tokenizer, args.seq_len, os.path.join(tmp, "jaxlm"))
    warm_s, _, _, _ = run_jaxlm(files, tokenizer, args.seq_len, os.path.join(tmp, "jaxlm"))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  print(f"tokens: hf {hf_tok:,}  jaxlm {tok:,} (same stream: {hf_tok == tok}); "
        f"first row identical: {list(hf_row) == [int(x) for x in row]}; "
        f"rows hf {hf_rows:,} jaxlm {rows:,} (hf drops each 1000-line batch's tail, jaxlm "
        "drops incomplete batches of 8)")
  for name, seconds in (("hf (run_clm recipe)", hf_s), ("jaxlm cold", cold_s),
                        ("jaxlm warm (cache)", warm_s)):
    print(f"{name:20s} {seconds:7.2f} s  {tok / seconds:12,.0f} tokens/s")
  print(f"ratio jaxlm cold / hf: {hf_s / cold_s:.2f}x   jaxlm warm / hf: {hf_s / warm_s:.2f}x")


if __name__ == "__main__":
  main()
