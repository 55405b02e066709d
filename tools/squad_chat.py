r"""SQuAD as chat: build SFT and DPO data from the local SQuAD copy, and score a decoder's greedy
answers with SQuAD's official exact match and F1.

  # data: SFT chats and DPO pairs from test-v1.1.json (the train half of the local copy)
  python tools/squad_chat.py build --out data/squad_chat --tokenizer RUN_OR_HF

  # score: greedy answers to the first 500 questions of dev-v1.1.json
  python tools/squad_chat.py eval --workdir runs/sft_lora_smollm2_squad --questions 500
  python tools/squad_chat.py eval --hf path/to/SmolLM2-135M-Instruct.Q4_1.gguf --questions 500

  # the run's exported PEFT adapter on transformers + peft (PyTorch) against jaxlm's answers
  jaxlm convert --workdir runs/sft_lora_smollm2_squad --to-hf runs/sft_lora_adapter
  python tools/squad_chat.py compare --workdir runs/sft_lora_smollm2_squad \
    --adapter runs/sft_lora_adapter --questions 20

The prompt is one user turn (`prompt`): the context, the question and "Answer with a span from
the context."; the answer is the assistant turn. DPO pairs take the gold answer as chosen and, as
rejected, the model's own wrong answer when `--rejected_from PREDICTIONS.json` (written by
`eval --split train --out`) has one, else another span of the context as long as the answer.
"""

import argparse
import json
import os
import re
import sys
import time

import numpy as np

from jaxlm.tasks import metrics, squad

SQUAD_DIR = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "squad_v1.1"
)


def prompt(context: str, question: str) -> str:
  """The user turn of one question."""
  return f"{context}\n\nQuestion: {question}\nAnswer with a span from the context."


def clean(answer: str) -> str:
  """A generated answer as a span: first line, without a trailing full stop."""
  answer = answer.strip().split("\n")[0].strip()
  return answer.removesuffix(".")


def other_span(context: str, answers: list[str], rng: np.random.Generator) -> str:
  """A span of `context` with as many words as the first answer that matches no answer."""
  words = context.split()
  n = max(1, len(answers[0].split()))
  gold = {metrics.squad_normalize(a) for a in answers}
  for _ in range(50):
    start = int(rng.integers(0, max(1, len(words) - n + 1)))
    span = re.sub(r"[.,;:]+$", "", " ".join(words[start : start + n]))
    if span and metrics.squad_normalize(span) not in gold:
      return span
  return ""


def build(args):
  """Writes sft.jsonl (messages) and dpo.jsonl (prompt/chosen/rejected) under args.out."""
  from jaxlm.data import tokenizers

  ex = squad.load_split("train", args.data_dir)
  tokenizer = tokenizers.load_tokenizer(args.tokenizer) if args.tokenizer else None
  own = {}
  if args.rejected_from:
    with open(args.rejected_from) as f:
      own = json.load(f)
  rng = np.random.default_rng(args.seed)
  os.makedirs(args.out, exist_ok=True)
  n_sft = n_dpo = n_own = n_long = 0
  with (
    open(os.path.join(args.out, "sft.jsonl"), "w") as sft,
    open(os.path.join(args.out, "dpo.jsonl"), "w") as dpo,
  ):
    for qid, q, c, answers in zip(ex["id"], ex["question"], ex["context"], ex["answers"]):
      user = prompt(c, q)
      if tokenizer is not None and len(tokenizer.encode(user)) > args.max_prompt_tokens:
        n_long += 1
        continue
      sft.write(
        json.dumps(
          {
            "messages": [
              {"role": "user", "content": user},
              {"role": "assistant", "content": answers[0]},
            ]
          }
        )
        + "\n"
      )
      n_sft += 1
      pred = own.get(qid, "")
      wrong = pred and max(metrics.squad_f1_one(pred, a) for a in answers) == 0.0
      rejected = pred if wrong else other_span(c, answers, rng)
      n_own += bool(wrong)
      if rejected:
        dpo.write(json.dumps({"prompt": user, "chosen": answers[0], "rejected": rejected}) + "\n")
        n_dpo += 1
  print(
    f"wrote {n_sft} SFT chats and {n_dpo} DPO pairs ({n_own} rejected answers are the "
    f"model's own) to {args.out}; {n_long} questions with prompts over "
    f"{args.max_prompt_tokens} tokens left out"
  )


def load_model(args):
  """(model, params, tokenizer) of --workdir (a run; LoRA adapters merged) or --hf."""
  if args.hf:
    from jaxlm.data import tokenizers
    from jaxlm.hf import api

    model, params = api.from_hf(args.hf)
    return model, params, tokenizers.load_tokenizer(args.hf)
  from jaxlm import rundir

  saved, params = rundir.load_run(args.workdir, args.step)
  return saved.model, params, saved.tokenizer


def answer_all(
  model, params, tokenizer, examples: dict, *, batch: int, max_new_tokens: int, log=print
) -> dict[str, str]:
  """Greedy answers (id -> text) to every question of `examples`, `batch` prompts at a time
  (sorted by length, so a batch pads little)."""
  from jaxlm import generate, textgen

  texts = [
    tokenizer.apply_chat_template(
      [{"role": "user", "content": prompt(c, q)}], tokenize=False, add_generation_prompt=True
    )
    for c, q in zip(examples["context"], examples["question"])
  ]
  order = np.argsort([len(t) for t in texts])
  preds, begin = {}, time.perf_counter()
  for i in range(0, len(order), batch):
    idx = order[i : i + batch]
    rows = [texts[j] for j in idx]
    rows += rows[-1:] * (batch - len(rows))  # one batch shape for every call
    outs = textgen.complete(
      model,
      params,
      tokenizer,
      rows,
      max_new_tokens=max_new_tokens,
      sampler=generate.Sampler(0.0),
      pad_multiple=128,
    )
    for j, out in zip(idx, outs):
      preds[examples["id"][j]] = clean(out)
    log(f"{min(i + batch, len(order))}/{len(order)} questions, {time.perf_counter() - begin:.0f} s")
  return preds


def evaluate(args):
  """Prints (and with --out writes) EM/F1 of greedy answers to the first --questions questions."""
  ex = squad.load_split(args.split, args.data_dir)
  n = args.questions or len(ex["id"])
  ex = {k: v[:n] for k, v in ex.items()}
  model, params, tokenizer = load_model(args)
  begin = time.perf_counter()
  preds = answer_all(
    model,
    params,
    tokenizer,
    ex,
    batch=args.batch,
    max_new_tokens=args.max_new_tokens,
    log=lambda m: print(m, file=sys.stderr),
  )
  seconds = time.perf_counter() - begin
  scores = metrics.squad_scores(preds, dict(zip(ex["id"], ex["answers"])))
  result = {
    "questions": n,
    "split": args.split,
    "model": args.workdir or args.hf,
    **scores,
    "seconds": round(seconds, 1),
  }
  print(json.dumps(result))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(preds, f, indent=0)
  return result


def compare(args):
  """Greedy answers of the exported PEFT adapter, loaded by `peft` onto its base in
  `transformers` (PyTorch, no jaxlm code), against the run's own (jaxlm) answers."""
  import peft
  import torch
  import transformers

  ex = squad.load_split(args.split, args.data_dir)
  n = args.questions or len(ex["id"])
  ex = {k: v[:n] for k, v in ex.items()}
  model, params, tokenizer = load_model(args)
  ours = answer_all(model, params, tokenizer, ex, batch=args.batch,
                    max_new_tokens=args.max_new_tokens, log=lambda m: print(m, file=sys.stderr))
  with open(os.path.join(args.adapter, "adapter_config.json")) as f:
    base = json.load(f)["base_model_name_or_path"]
  where = {"gguf_file": os.path.basename(base)} if base.endswith(".gguf") else {}
  hf = transformers.AutoModelForCausalLM.from_pretrained(
    os.path.dirname(base) if where else base, dtype=torch.float32, **where)
  hf = peft.PeftModel.from_pretrained(hf, args.adapter).eval()
  equal = 0
  for qid, c, q in zip(ex["id"], ex["context"], ex["question"]):
    text = tokenizer.apply_chat_template(
      [{"role": "user", "content": prompt(c, q)}], tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
    with torch.no_grad():
      out = hf.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    theirs = clean(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    equal += theirs == ours[qid]
    if theirs != ours[qid]:
      print(f"{qid}: peft {theirs!r} != jaxlm {ours[qid]!r}", file=sys.stderr)
  result = {"questions": len(ex["id"]), "equal_answers": equal, "adapter": args.adapter}
  print(json.dumps(result))
  return result


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="command", required=True)
  b = sub.add_parser("build", help="SFT chats and DPO pairs from test-v1.1.json")
  b.add_argument("--out", required=True)
  b.add_argument("--tokenizer", default="", help="run dir, HF dir or .gguf: drop long prompts")
  b.add_argument("--max_prompt_tokens", type=int, default=200)
  b.add_argument("--rejected_from", default="", help="predictions JSON (eval --split train --out)")
  b.add_argument("--seed", type=int, default=0)
  e = sub.add_parser("eval", help="EM/F1 of greedy answers")
  e.add_argument("--workdir", default="")
  e.add_argument("--hf", default="")
  e.add_argument("--out", default="", help="write the predictions (id -> answer) here")
  c = sub.add_parser("compare", help="the exported PEFT adapter in peft vs jaxlm, greedy answers")
  c.add_argument("--workdir", required=True)
  c.add_argument("--adapter", required=True, help="`jaxlm convert --workdir RUN --to-hf OUT`")
  for sp in (e, c):
    sp.add_argument("--step", type=int, default=None)
    sp.add_argument("--split", default="dev", choices=("dev", "train"))
    sp.add_argument("--questions", type=int, default=500, help="first N questions (0: all)")
    sp.add_argument("--batch", type=int, default=16)
    sp.add_argument("--max_new_tokens", type=int, default=24)
  c.set_defaults(hf="")
  for sp in (b, e, c):
    sp.add_argument("--data_dir", default=SQUAD_DIR)
  args = p.parse_args(argv)
  if args.command == "eval" and bool(args.workdir) == bool(args.hf):
    p.error("eval needs exactly one of --workdir RUN or --hf HF_DIR_OR_GGUF")
  return {"build": build, "eval": evaluate, "compare": compare}[args.command](args)


if __name__ == "__main__":
  main()
