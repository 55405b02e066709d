"""Tests jaxlm/lmeval.py, the lm-eval backend: on local task files (a multiple-choice task, a
rolling-loglikelihood task, a generate-until task with a stop string), a tiny GPT-2 scores as
lm-eval's own hf backend scores its `jaxlm.to_hf` export (accuracies equal, log-likelihoods and
perplexities within 1e-4 relative, generations identical, with and without a chat template);
a LoRA run scores as its merged export; 200 requests of varied lengths compile a handful of
programs; `jaxlm eval --tasks` prints lm-eval's table and writes its results JSON without
touching the run; encoders are refused in one line; `import jaxlm` imports neither lm_eval nor
torch."""

import glob
import json
import os
import subprocess
import sys

import lm_eval
import numpy as np
import pytest
import torch  # the reference is lm-eval's hf backend, on torch
import transformers
from conftest import CHATML, REPO, SHARED_DATA

import jaxlm
from jaxlm import lmeval, runtime
from jaxlm.data import tokenizers as tok_lib

MAX_LEN = 128  # the model's max_seq_len: lm-eval's max_length, the rolling window
GEN_TOKENS = 12
QUESTIONS = [
  ("What is the capital of France?", [" Paris", " Berlin", " the city of Rome", " Madrid"], 0),
  ("Which animal barks?", [" A", " B", " C", " D"], 1),
  ("What colour is the sky on a clear day?", [" blue", " green", " red", " a deep purple"], 0),
  ("Pick the even number.", [" A", " B", " C", " D"], 3),
  ("How many legs does a spider have?", [" eight", " six", " four", " ten"], 0),
  ("Which is a fruit?", [" A", " B", " C", " D"], 2),
  ("What do bees make?", [" honey", " milk", " silk from worms", " wax and paper"], 0),
  ("Which planet is the largest?", [" Jupiter", " Mars", " Venus", " Mercury"], 0),
]
PROMPTS = ["The quick brown fox", "Once upon a time, in a land far away,", "def main():",
           "In 1905 Einstein published"]


def _texts() -> list[str]:
  """Three documents of real text: one window, about two, and several past max_seq_len."""
  with open(os.path.join(SHARED_DATA, "wikitext2", "valid.txt"), encoding="utf-8") as f:
    paragraphs = [p.strip() for p in f.read().split("\n") if len(p.strip()) > 200]
  return [paragraphs[0][:150], paragraphs[1][:700], " ".join(paragraphs[2:6])[:2000]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A tiny random GPT-2 with the GPT-2 tokenizer (plus ChatML's tokens and template): its HF
  directory, jaxlm's import of it and that import exported back by `jaxlm.to_hf`."""
  from hf_testing import random_hf_model

  root = tmp_path_factory.mktemp("lmeval")
  tok = tok_lib.load_tokenizer(os.path.join(SHARED_DATA, "tokenizers", "gpt2"))
  tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
  tok.chat_template = CHATML
  config = transformers.GPT2Config(vocab_size=len(tok), n_positions=MAX_LEN, n_embd=32, n_layer=2,
                                   n_head=2)
  hf_model = random_hf_model(config, seed=0)
  src, export = str(root / "src"), str(root / "export")
  hf_model.save_pretrained(src)
  tok.save_pretrained(src)
  model, params = jaxlm.from_hf(src)
  jaxlm.to_hf(model, params, export, tokenizer=tok)
  return {"root": root, "src": src, "export": export, "model": model, "params": params,
          "tokenizer": tok, "hf_model": hf_model}


def _write_task(directory, name: str, rows: list[dict], spec: str):
  data = directory / f"{name}.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))
  (directory / f"{name}.yaml").write_text(
    f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
    f"test_split: test\n{spec}")


def _metrics(*metrics) -> str:
  return "metric_list:\n" + "".join(
    f"  - metric: {name}\n    aggregation: {aggregation}\n"
    f"    higher_is_better: {str(higher).lower()}\n" for name, aggregation, higher in metrics)


def _greedy_hf(tiny, prompt: str, n: int) -> list[int]:
  ids = tiny["tokenizer"].encode(prompt)
  with torch.no_grad():
    out = tiny["hf_model"].generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                    pad_token_id=0)
  return out[0, len(ids):].tolist()


def _stop_string(tiny) -> tuple[str, int]:
  """(a word of some prompt's greedy continuation that is not in the text before it, which
  prompt)."""
  tok = tiny["tokenizer"]
  for i, prompt in enumerate(PROMPTS):
    ids = _greedy_hf(tiny, prompt, GEN_TOKENS)
    for j in range(1, len(ids)):
      piece = tok.decode(ids[j:j + 1])
      if piece.strip().isalpha() and piece not in tok.decode(ids[:j]):
        return piece, i
  raise AssertionError("no prompt's continuation has a word to stop at")


@pytest.fixture(scope="module")
def tasks(tiny):
  """Three lm-eval task files with local data; the generate task's stop string cuts a prompt's
  greedy continuation after a few tokens."""
  directory = tiny["root"] / "tasks"
  directory.mkdir()
  _write_task(directory, "tiny_mc",
              [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS],
              "output_type: multiple_choice\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
              "doc_to_choice: choices\ndoc_to_target: answer\n"
              + _metrics(("acc", "mean", True), ("acc_norm", "mean", True)))
  _write_task(directory, "tiny_ppl", [{"text": t} for t in _texts()],
              "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\n"
              "doc_to_target: \"{{text}}\"\n"
              + _metrics(("word_perplexity", "weighted_perplexity", False),
                         ("byte_perplexity", "weighted_perplexity", False),
                         ("bits_per_byte", "bits_per_byte", False)))
  stop, cut = _stop_string(tiny)
  _write_task(directory, "tiny_gen", [{"prompt": p, "answer": "x"} for p in PROMPTS],
              "output_type: generate_until\ndoc_to_text: \"{{prompt}}\"\n"
              f"doc_to_target: answer\ngeneration_kwargs:\n  until: [{json.dumps(stop)}]\n"
              f"  max_gen_toks: {GEN_TOKENS}\n  do_sample: false\n"
              + _metrics(("exact_match", "mean", True)))
  return {"dir": str(directory), "stop": stop, "cut": cut,
          "manager": lmeval.task_manager(["tiny_mc"], str(directory))}


def _evaluate(model, tasks, names, **kwargs) -> dict:
  return lm_eval.simple_evaluate(model=model, tasks=names, task_manager=tasks["manager"],
                                 log_samples=True, bootstrap_iters=0, **kwargs)


def _hf_backend(tiny, tasks, names, **kwargs) -> dict:
  return _evaluate("hf", tasks, names, model_args=f"pretrained={tiny['export']},dtype=float32",
                   device="cpu", batch_size=1, **kwargs)


def _responses(results: dict, task: str) -> list:
  samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
  return [[r[0] for r in s["resps"]] for s in samples]


def _relative(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


@pytest.fixture(scope="module")
def jax_lm(tiny):
  return lmeval.JaxLM(model=tiny["model"], params=tiny["params"], tokenizer=tiny["tokenizer"])


def test_jaxlm_scores_as_lm_evals_hf_backend_scores_the_export(tiny, tasks, jax_lm):
  names = ["tiny_mc", "tiny_ppl", "tiny_gen"]
  ours, ref = _evaluate(jax_lm, tasks, names), _hf_backend(tiny, tasks, names)

  mc, mc_ref = _responses(ours, "tiny_mc"), _responses(ref, "tiny_mc")
  logp = [[ll for ll, _ in doc] for doc in mc]
  logp_ref = [[ll for ll, _ in doc] for doc in mc_ref]
  ll_err = _relative(logp, logp_ref)
  assert ll_err <= 1e-4
  assert [[g for _, g in doc] for doc in mc] == [[g for _, g in doc] for doc in mc_ref]
  for metric in ("acc,none", "acc_norm,none"):
    assert ours["results"]["tiny_mc"][metric] == ref["results"]["tiny_mc"][metric]

  rolling, rolling_ref = _responses(ours, "tiny_ppl"), _responses(ref, "tiny_ppl")
  assert _relative(rolling, rolling_ref) <= 1e-4
  ppl_err = max(_relative(ours["results"]["tiny_ppl"][m], ref["results"]["tiny_ppl"][m])
                for m in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"))
  assert ppl_err <= 1e-4
  n_tokens = [len(tiny["tokenizer"].encode(t)) for t in _texts()]
  assert max(n_tokens) > 2 * MAX_LEN, "the long document spans three rolling windows"

  generations = _responses(ours, "tiny_gen")
  assert generations == _responses(ref, "tiny_gen")
  cut = tasks["cut"]
  full = tiny["tokenizer"].decode(_greedy_hf(tiny, PROMPTS[cut], GEN_TOKENS))
  assert generations[cut] == [full.split(tasks["stop"])[0]] and 0 < len(generations[cut][0]) \
    < len(full), "the stop string cut a continuation short"
  print(f"\nparity with lm-eval's hf backend: loglikelihood max rel. diff {ll_err:.2e}, "
        f"perplexities {ppl_err:.2e}, rolling log-likelihoods "
        f"{_relative(rolling, rolling_ref):.2e}; {len(generations)} generations identical")


def test_generate_until_with_the_chat_template_matches_the_hf_backend(tiny, tasks, jax_lm):
  ours = _evaluate(jax_lm, tasks, ["tiny_gen"], apply_chat_template=True)
  ref = _hf_backend(tiny, tasks, ["tiny_gen"], apply_chat_template=True)
  prompts = [s["arguments"][0][0] for s in ours["samples"]["tiny_gen"]]
  assert all(p.startswith("<|im_start|>user\n") and p.endswith("<|im_start|>assistant\n")
             for p in prompts), prompts[0]
  assert _responses(ours, "tiny_gen") == _responses(ref, "tiny_gen")
  assert jax_lm.tokenizer_name == tiny["tokenizer"].name_or_path.replace("/", "__")


def test_a_task_of_200_varied_requests_compiles_a_handful_of_programs(tiny):
  from lm_eval.api.instance import Instance

  # a batch size of its own: none of its programs was compiled by the tests before it
  jax_lm = lmeval.JaxLM(model=tiny["model"], params=tiny["params"], tokenizer=tiny["tokenizer"],
                        batch_size=8)

  rng = np.random.RandomState(0)
  words = tiny["tokenizer"].decode(rng.randint(0, 50000, 4000).tolist()).split()
  requests = []
  for i in range(200):
    n = int(rng.randint(1, 100))
    context, continuation = " ".join(words[i:i + n]), " " + " ".join(words[i + n:i + n + 3])
    requests.append(Instance("loglikelihood", {}, (context, continuation), i))
  runtime.compile_stats()  # counting from here
  before = runtime.compile_stats()
  scores = jax_lm.loglikelihood(requests, disable_tqdm=True)
  after = runtime.compile_stats()
  compiled = sum(after[k] - before[k] for k in ("xla_compiles", "cache_hits"))
  lengths = {len(jax_lm.tok_encode(r.args[0] + r.args[1])) for r in requests}
  assert len(lengths) > 50 and 1 <= compiled <= 8, (compiled, len(lengths))
  assert len(scores) == 200 and all(np.isfinite(ll) and ll < 0 for ll, _ in scores)
  print(f"\n200 loglikelihood requests of {len(lengths)} lengths: {compiled} programs compiled")


def test_long_rows_are_padded_by_at_most_a_half():
  """Up to FINE_BUCKETS, rows pad to a power of two (few programs); above it to 1.5 x 2^k as
  well (a 3,000-token rolling window runs as 3,072 tokens, not 4,096), never past max_length."""
  assert [lmeval.bucket(n, 8192) for n in (1, 17, 1000, 1025, 1537, 3000, 3073, 9000)] == [
    16, 32, 1024, 1536, 2048, 3072, 4096, 8192]
  for n in range(lmeval.FINE_BUCKETS + 1, 8193, 37):
    assert n <= lmeval.bucket(n, 8192) <= 3 * n // 2
  assert lmeval.bucket(5000, 4500) == 4500


def test_long_rows_are_scored_fewer_at_a_time_to_the_same_log_likelihoods(tiny, jax_lm,
                                                                            monkeypatch):
  """A rolling task over texts longer than the model's window: with a smaller token budget per
  forward pass (as an 8,192-token window meets the default one) the windows go through in
  smaller passes, and every text's log-likelihood is the same."""
  from lm_eval.api.instance import Instance

  words = tiny["tokenizer"].decode(np.random.RandomState(1).randint(0, 50000, 6000).tolist())
  texts = [" ".join(words.split()[i * 500:(i + 1) * 500]) for i in range(4)]
  requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
  whole = jax_lm.loglikelihood_rolling(requests, disable_tqdm=True)
  assert jax_lm.rows_per_pass(128) == jax_lm.batch_size  # 16 x 128 tokens: within the default
  monkeypatch.setattr(lmeval, "TOKENS_PER_PASS", 64)
  small = lmeval.JaxLM(model=tiny["model"], params=tiny["params"], tokenizer=tiny["tokenizer"])
  devices = small._devices
  assert small.rows_per_pass(128) == devices < small.batch_size  # one row per device a pass
  assert small.rows_per_pass(16) == min(small.batch_size, -(-4 // devices) * devices)
  windows = sum(len(small.tok_encode(t)) for t in texts) // small.max_length
  assert windows > small.batch_size  # more windows than one pass of the default holds
  assert _relative(small.loglikelihood_rolling(requests, disable_tqdm=True), whole) < 1e-6


def test_a_lora_run_scores_as_its_merged_export(tiny, tasks, tmp_path):
  from jaxlm import config as config_lib
  from jaxlm import rundir
  from jaxlm.train import trainer

  text = tmp_path / "text.txt"
  text.write_text(" ".join(_texts()) * 4)
  c = config_lib.base_config()
  c.model.init_from = tiny["src"]
  c.data.update({"source": "file", "path": str(text), "seq_len": 32, "tokenizer": ""})
  c.train.update({"steps": 3, "batch_size": 8, "log_every": 1, "eval_every": 100,
                  "eval_batches": 1})
  c.optim.update({"warmup_steps": 0, "lr": 3e-2})
  c.checkpoint.update({"every": 3, "use_async": False})
  c.sample.max_new_tokens = 0
  c.lora.update({"rank": 4, "alpha": 8.0, "targets": "all"})
  run = str(tmp_path / "run")
  trainer.train(c, run)
  saved, merged = rundir.load_run(run)
  export = str(tmp_path / "merged")
  jaxlm.to_hf(saved.model, merged, export, tokenizer=saved.tokenizer)

  ours = _evaluate(lmeval.JaxLM(workdir=run), tasks, ["tiny_mc"])
  ref = _evaluate("hf", tasks, ["tiny_mc"], model_args=f"pretrained={export},dtype=float32",
                  device="cpu", batch_size=1)
  base = _hf_backend(tiny, tasks, ["tiny_mc"])
  logp, logp_ref, logp_base = (np.asarray(_responses(r, "tiny_mc"))[..., 0]
                               for r in (ours, ref, base))
  assert _relative(logp, logp_ref) <= 1e-4
  assert np.abs(logp - logp_base).max() > 1e-3, "the adapters changed the scores"


def test_an_encoder_is_refused_in_one_line(tiny):
  from jaxlm.models import heads
  from jaxlm.models.config import ModelConfig

  cfg = ModelConfig(vocab_size=len(tiny["tokenizer"]), num_layers=1, embed_dim=16, num_heads=2,
                    causal=False, norm_position="post", head="mlm")
  with pytest.raises(ValueError, match=r"need a decoder .* encoder \(head='mlm'\)"):
    lmeval.JaxLM(model=heads.build_model(cfg), params={}, tokenizer=tiny["tokenizer"])
  with pytest.raises(ValueError, match="exactly one of workdir=RUN_DIR or hf="):
    lmeval.JaxLM()


def _jaxlm(*args):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  return subprocess.run([sys.executable, "-m", "jaxlm.cli", *args], capture_output=True,
                        text=True, timeout=600, cwd=REPO, env=env, check=False)


def _listing(directory) -> dict:
  return {os.path.relpath(os.path.join(d, f), directory): os.stat(os.path.join(d, f)).st_mtime_ns
          for d, _, files in os.walk(directory) for f in files}


def test_jaxlm_eval_tasks_prints_the_table_and_writes_the_results_json(tiny, tasks, tmp_path):
  run, out = str(tmp_path / "run"), str(tmp_path / "out")
  made = _jaxlm("convert", "--from-hf", tiny["src"], "--workdir", run)
  assert made.returncode == 0, made.stderr[-3000:]
  before = _listing(run)
  args = ["--tasks", "tiny_mc,tiny_ppl", "--include_path", tasks["dir"], "--limit", "3"]
  result = _jaxlm("eval", "--workdir", run, *args, "--output_path", out)
  assert result.returncode == 0, result.stderr[-3000:]
  assert _listing(run) == before, "reading a run never changes it"
  for piece in ("| Tasks ", "|tiny_mc |", "|acc ", "|tiny_ppl|", "|word_perplexity|"):
    assert piece in result.stdout, result.stdout
  [written] = glob.glob(os.path.join(out, "*", "results_*.json"))
  assert f"wrote {written}" in result.stderr
  with open(written) as f:
    saved = json.load(f)
  assert {"results", "configs", "versions", "n-shot", "config", "n-samples"} <= set(saved)
  assert saved["n-samples"]["tiny_mc"]["effective"] == 3 and saved["config"]["limit"] == 3
  assert saved["config"]["model"] == "jaxlm" and saved["config"]["model_args"]["workdir"] == run

  from_hf = _jaxlm("eval", "--hf", tiny["src"], *args)
  assert from_hf.returncode == 0, from_hf.stderr[-3000:]
  assert _rows(from_hf.stdout) == _rows(result.stdout), "the run and its source score alike"


def _rows(table: str) -> list[str]:
  return [r for r in table.splitlines() if r.startswith("|")][2:]


@pytest.mark.parametrize("args, message", [
  (["--limit", "3"], "eval --limit goes with --tasks"),
  (["--tasks", "x", "--split", "dev"], "eval --split scores a fine-tuning run"),
])
def test_eval_flags_out_of_place_are_usage_errors(tmp_path, capsys, args, message):
  from jaxlm import cli

  with pytest.raises(SystemExit) as exit_info:
    cli.main(["jaxlm", "eval", "--workdir", str(tmp_path), *args])
  err = capsys.readouterr().err
  assert exit_info.value.code == 2 and f"jaxlm: error: {message}" in err, err


def test_an_unknown_task_is_refused_before_the_model_loads(tasks, capsys, tmp_path):
  from jaxlm import cli

  with pytest.raises(SystemExit) as exit_info:
    cli.main(["jaxlm", "eval", "--hf", str(tmp_path / "absent"), "--tasks", "tiny_mc,tiny_nope",
              "--include_path", tasks["dir"]])
  err = capsys.readouterr().err
  assert exit_info.value.code == 1 and "no lm-eval task named ['tiny_nope']" in err, err


def test_import_jaxlm_imports_neither_lm_eval_nor_torch():
  code = ("import sys, jaxlm, jaxlm.cli; print(sorted(m for m in ('lm_eval', 'torch') "
          "if m in sys.modules)); import jaxlm.lmeval; print(sorted(m for m in "
          "('lm_eval', 'torch') if m in sys.modules))")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=False)
  assert result.stdout.split() == ["[]", "['lm_eval']"], result.stderr[-2000:]


@pytest.mark.slow  # real processes joined by jax.distributed: the slow tier (pytest -m slow)
def test_two_processes_each_score_their_share_and_lm_eval_gathers_it(tiny, tasks, tmp_path):
  from test_multihost import launch, wait

  run, out = str(tmp_path / "run"), str(tmp_path / "out")
  assert _jaxlm("convert", "--from-hf", tiny["src"], "--workdir", run).returncode == 0
  names = ["tiny_mc", "tiny_ppl", "tiny_gen"]
  logs = wait(launch(2, 2, ["eval", "--workdir", run, "--tasks", ",".join(names),
                            "--include_path", tasks["dir"], "--output_path", out], str(tmp_path)),
              str(tmp_path))
  assert "|tiny_mc |" in logs[0] and "|tiny_mc |" not in logs[1], "the first process prints"
  [written] = glob.glob(os.path.join(out, "*", "results_*.json"))
  with open(written) as f:
    two = json.load(f)["results"]
  one = _evaluate(lmeval.JaxLM(workdir=run), tasks, names)["results"]
  for name in names:
    for metric, value in one[name].items():
      if isinstance(value, float) and "stderr" not in metric:
        assert two[name][metric] == pytest.approx(value, rel=1e-6), (name, metric)
