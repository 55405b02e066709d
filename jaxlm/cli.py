"""`jaxlm train | generate | plot | convert | eval | plan`: the command line.

  jaxlm train --config configs/demo.py --workdir runs/demo [--config.train.steps=100 ...]
  jaxlm generate --workdir runs/demo --prompt "The "    (or --hf HF_DIR_OR_GGUF; --stop STR)
  jaxlm plot --workdir runs/demo [--out loss.png]
  jaxlm convert --from-hf SRC --workdir DIR     (HF directory, .gguf file or hub id -> run dir)
  jaxlm convert --workdir DIR --to-hf OUT [--step N]     (a run's checkpoint -> HF directory;
                 a LoRA run's -> a PEFT adapter directory, or with --merge the merged model)
  jaxlm eval --workdir runs/sst2 --split dev     (fine-tuning runs: the task's metrics; other
                 kinds: the eval loss on the held-out tail, their one split, dev)
  jaxlm eval --workdir runs/demo --tasks T1,T2 [--include_path DIR] [--limit N] [--num_fewshot K]
             [--output_path DIR]     (or --hf HF_DIR_OR_GGUF; lm-eval tasks: its results table)
  jaxlm plan --config configs/llama3_8b.py --device v5p-64    (or --device h100 --hosts 4)
"""

import os
import re
import shlex
import sys

from absl import flags
from ml_collections import config_flags

# The flags each command takes (--debug aside, which all take): a flag meant for another command
# is refused rather than silently ignored, since all five share one absl namespace.
COMMAND_FLAGS = {
  "train": ("config", "workdir"),
  "generate": ("workdir", "hf", "prompt", "max_new_tokens", "temperature", "top_k", "top_p",
               "seed", "stop"),
  "plot": ("workdir", "out"),
  "convert": ("from-hf", "to-hf", "workdir", "step", "merge"),
  "eval": ("workdir", "split", "hf", "tasks", "include_path", "limit", "num_fewshot",
           "output_path"),
  "plan": ("config", "device", "hosts", "json"),
}
COMMANDS = tuple(COMMAND_FLAGS)
_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "experiment config file (configs/*.py); override fields with --config.KEY=VALUE",
  lock_config=True,
)
flags.DEFINE_string("workdir", None, "run directory: config, tokenizer, checkpoints, metrics")
flags.DEFINE_string("prompt", "\n", "generate: text to continue")
flags.DEFINE_integer("max_new_tokens", 200, "generate: tokens to sample")
flags.DEFINE_float("temperature", 0.8, "generate: 0 is greedy")
flags.DEFINE_integer("top_k", 0, "generate: keep the k most likely tokens (0: all)")
flags.DEFINE_float("top_p", 1.0, "generate: nucleus sampling mass")
flags.DEFINE_integer("seed", 0, "generate: sampling seed")
flags.DEFINE_multi_string("stop", None, "generate: stop when the text contains this string")
flags.DEFINE_string("hf", None, "generate, eval --tasks: a Hugging Face model directory or .gguf "
                    "file to use instead of --workdir")
flags.DEFINE_string("out", None, "plot: PNG path (default WORKDIR/loss.png)")
flags.DEFINE_string("from-hf", None, "convert: HF model directory, .gguf file or hub id to import")
flags.DEFINE_string("to-hf", None,
                    "convert: directory to write the run's checkpoint to, in HF format")
flags.DEFINE_integer("step", None, "convert --to-hf: checkpoint step (default: the latest)")
flags.DEFINE_bool("merge", False, "convert --to-hf of a LoRA run: write the merged model instead "
                  "of a PEFT adapter")
flags.DEFINE_string("split", "dev", "eval: the split to score: a fine-tuning run's task split "
                    "(dev | test | train); other kinds have dev alone (their held-out tail)")
flags.DEFINE_string("tasks", None, "eval: lm-eval tasks to run, comma-separated "
                    "(docs/evaluation.md)")
flags.DEFINE_string("include_path", None, "eval --tasks: a directory of lm-eval task YAML files")
flags.DEFINE_integer("limit", None, "eval --tasks: score the first N documents of each task")
flags.DEFINE_integer("num_fewshot", None, "eval --tasks: few-shot examples per prompt (default: "
                     "each task's own)")
flags.DEFINE_string("output_path", None, "eval --tasks: directory for lm-eval's results JSON")
flags.DEFINE_string("device", "cpu", "plan: the target's devices, NAME or a slice NAME-N "
                    "(v4 v5e v5p v6e a100 a100-40gb h100 h100-pcie h100-nvl h200 h200-nvl cpu; "
                    "h100 = SXM; v5p-64 = 32 chips)")
flags.DEFINE_integer("hosts", None, "plan: hosts of --device NAME (default 1; implied by NAME-N)")
flags.DEFINE_bool("json", False, "plan: print the plan as one JSON object")
flags.DEFINE_bool("debug", False, "show full tracebacks instead of one-line errors")
FLAGS = flags.FLAGS


class UsageError(Exception):
  """A mistake on the command line or in the config: printed as one line, exit code 2."""


def _parse(argv: list[str]) -> list[str]:
  # FLAGS is global: a second in-process main() (tests) must not see the first one's flags
  FLAGS.unparse_flags()
  _check_overrides(argv)
  try:
    return FLAGS(argv)
  except flags.Error as e:  # wrong types and malformed flags
    print(f"jaxlm: error: {e}", file=sys.stderr)
    sys.exit(2)
  except (AttributeError, KeyError) as e:  # config_flags: an override of a key that is not there
    bad = [a.split("=")[0] for a in argv if a.startswith("--config.")]
    while e.args and isinstance(e.args[0], BaseException):  # KeyError inside AttributeError
      e = e.args[0]
    detail = str(e.args[0] if e.args else e).replace("\n", " ")
    print(f"jaxlm: error: unknown config key among {bad}: {detail}", file=sys.stderr)
    sys.exit(2)


def _usage(command: str, flag: str) -> str:
  return (f"{command} does not take --{flag}; its flags: "
          f"{', '.join('--' + f for f in COMMAND_FLAGS[command])}")


def _check_overrides(argv: list[str]):
  """--config.KEY=VALUE overrides to a command without --config; checked before parsing, since
  absl rejects them there with a less helpful "unknown flag" when --config is not given."""
  command = argv[1] if len(argv) > 1 else None
  if command not in COMMAND_FLAGS or "config" in COMMAND_FLAGS[command]:
    return
  for arg in argv[2:]:
    if arg == "--":
      return
    if match := re.match(r"--?(?:no)?(config\.[^=]*)", arg):
      print(f"jaxlm: error: {_usage(command, match.group(1))}", file=sys.stderr)
      sys.exit(2)


def _check_flags(command: str):
  """Refuses the first flag set on the command line that `command` does not take."""
  allowed = {*COMMAND_FLAGS[command], "debug"}
  ours = {name for names in COMMAND_FLAGS.values() for name in names}  # not absl's own flags
  for name in FLAGS:
    base = name.split(".", 1)[0]  # config.KEY overrides count as --config
    if base in ours and base not in allowed and FLAGS[name].present:
      raise UsageError(_usage(command, name))


def _weight_count(config, resolved: bool) -> int:
  """The run's model size from configs alone, for the CPU device split: a saved run's config
  (`resolved`) holds its model's fields; a new run's reads model.init_from's config (no
  weights). 0 when it cannot be read yet (the run itself then says why)."""
  from jaxlm import rundir
  from jaxlm.models.config import ModelConfig

  values = dict(config.get("model", {}))
  src = values.pop("init_from", "")
  try:
    if src and not resolved:
      model_cfg = rundir.init_model_config(src, values)
    else:
      model_cfg = ModelConfig.from_dict(values)
  except (OSError, ValueError, KeyError, TypeError):
    return 0
  return model_cfg.weight_count()


def _start(config=None, resolved: bool = True):
  """Process set-up before JAX starts: malloc arenas, CPU device count, the persistent compilation
  cache (the run's `runtime` section, else the default cache), and joining a multi-process run."""
  from jaxlm import runtime

  runtime.limit_malloc_arenas()
  rt = config.get("runtime", {}) if config is not None else {}
  if config is not None:
    runtime.configure_cpu_devices(rt.get("cpu_devices", 0), config.train.batch_size,
                                  _weight_count(config, resolved))
  runtime.configure_compile_cache(rt.get("compile_cache", "auto"))
  runtime.compile_stats()  # count compilations from here on
  runtime.init_distributed()


def _train():
  if _CONFIG.value is None:
    raise UsageError("train needs --config=configs/NAME.py")
  config = _CONFIG.value
  _start(config, resolved=False)  # its model section is resolved from model.init_from later
  from jaxlm.train import trainer

  result = trainer.train(config, FLAGS.workdir)
  print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                 for k, v in result.items()), file=sys.stderr)


def _eval():
  if FLAGS.tasks:
    return _eval_tasks()
  for name in ("hf", "include_path", "limit", "num_fewshot", "output_path"):
    if FLAGS[name].present:
      raise UsageError(f"eval --{name} goes with --tasks=T1,T2 (lm-eval tasks); without --tasks "
                       "eval scores a run on its own evaluation (--workdir, --split)")
  from jaxlm import rundir

  config = rundir.read_config(FLAGS.workdir)
  _start(config)
  from jaxlm.train import evaluation

  scores = evaluation.evaluate_run(FLAGS.workdir, FLAGS.split)
  from jaxlm import config as config_lib

  prefix = f"{FLAGS.split}_" if config_lib.data_kind(config) == "finetune" else ""
  import jax

  if jax.process_index():  # every process scores (collectively); process 0 prints
    return
  print(" ".join(f"{prefix}{k}={v:.4f}" for k, v in scores.items()))


def _eval_tasks():
  """lm-eval tasks on a run or an HF model: lm-eval's table printed, its results JSON written."""
  from jaxlm import rundir

  if FLAGS["split"].present:
    raise UsageError("eval --split scores a fine-tuning run; lm-eval tasks pick their own split")
  if bool(FLAGS.workdir) == bool(FLAGS.hf):
    raise UsageError("eval --tasks needs exactly one of --workdir=RUN or --hf=HF_DIR_OR_GGUF")
  _start(None if FLAGS.hf else rundir.read_config(FLAGS.workdir))
  from jaxlm import lmeval

  tasks = [t for t in FLAGS.tasks.split(",") if t]
  results, written = lmeval.evaluate(
    tasks, workdir=FLAGS.workdir, hf=FLAGS.hf, include_path=FLAGS.include_path,
    limit=FLAGS.limit, num_fewshot=FLAGS.num_fewshot, output_path=FLAGS.output_path)
  if results is None:  # processes other than the first: lm-eval gathered their results
    return
  print(lmeval.table(results))
  if written:
    print(f"wrote {written}", file=sys.stderr)


def _generate():
  from jaxlm import generate, rundir, runtime, textgen

  _start(None if FLAGS.hf else rundir.read_config(FLAGS.workdir))
  if FLAGS.hf:
    from jaxlm.data import tokenizers
    from jaxlm.hf import api

    model, params = api.from_hf(FLAGS.hf)
    tokenizer = tokenizers.load_tokenizer(FLAGS.hf)
  else:
    saved, params = rundir.load_run(FLAGS.workdir)
    model, tokenizer = saved.model, saved.tokenizer
  sampler = generate.Sampler(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
  timing = {}
  textgen.print_completion(model, params, tokenizer, FLAGS.prompt, sys.stdout,
                           max_new_tokens=FLAGS.max_new_tokens, sampler=sampler, seed=FLAGS.seed,
                           stop=FLAGS.stop or (), timing=timing)
  compiled = runtime.compile_stats()
  print(f"time to first token {timing['time_to_first_token']:.2f} s, "
        f"then {timing['decode_tokens_per_sec']:.1f} tokens/s; {compiled['xla_compiles']} "
        f"programs compiled, {compiled['cache_hits']} loaded from the compilation cache",
        file=sys.stderr)


def _plot():
  from jaxlm import plot

  print(plot.plot_run(FLAGS.workdir, FLAGS.out))


def _convert():
  src, out = FLAGS["from-hf"].value, FLAGS["to-hf"].value
  if bool(src) == bool(out):
    raise UsageError("convert needs exactly one of --from-hf=SRC or --to-hf=OUT")
  _start()
  if src:
    from jaxlm.train import convert

    print(f"converted {src} into the run directory {convert.convert_from_hf(src, FLAGS.workdir)}")
    return
  from jaxlm import rundir
  from jaxlm.hf import api

  config = rundir.read_config(FLAGS.workdir)
  if config.get("lora", {}).get("rank") and not FLAGS.merge:
    from jaxlm.hf import adapters

    saved, lora, trainable, _ = rundir.load_lora_run(FLAGS.workdir, FLAGS.step)
    adapters.export_adapter(saved.model_cfg, lora, trainable, out, base=config.model.init_from,
                            tokenizer=saved.tokenizer)
    print(f"wrote the PEFT adapter {out} (base {config.model.init_from}; --merge writes the "
          "merged model)")
    return
  saved, params = rundir.load_run(FLAGS.workdir, FLAGS.step)
  print(f"wrote {api.to_hf(saved.model, params, out, tokenizer=saved.tokenizer)}")


def _plan():
  from jaxlm import runtime

  if _CONFIG.value is None:
    raise UsageError("plan needs --config=configs/NAME.py")
  config = _CONFIG.value
  if FLAGS.device.split("-")[0] == "cpu":  # plan for this CPU split as a run of it would be
    runtime.configure_cpu_devices(config.runtime.cpu_devices, config.train.batch_size,
                                  _weight_count(config, resolved=False))
  from jaxlm import plan

  target = plan.target(FLAGS.device, FLAGS.hosts)
  result = plan.make_plan(config, target)
  lever_plans = None if result.fits else plan.levers(config, target)
  if FLAGS.json:
    print(plan.to_json(result, lever_plans))
    return
  print(plan.report(result, config_flags.get_config_filename(FLAGS["config"]), lever_plans))


def _main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise UsageError(f"usage: jaxlm {{{'|'.join(COMMANDS)}}} --workdir DIR [flags]; got {argv[1:]}")
  _check_flags(argv[1])
  if not FLAGS.workdir and argv[1] != "plan" and not (argv[1] in ("generate", "eval")
                                                      and FLAGS.hf):
    raise UsageError(f"{argv[1]} needs --workdir=DIR")
  {"train": _train, "generate": _generate, "plot": _plot, "convert": _convert,
   "eval": _eval, "plan": _plan}[argv[1]]()


def main(argv=None):
  argv = list(sys.argv if argv is None else argv)
  # transformers advises installing PyTorch on import; jaxlm needs it only for parity tests
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
  rest = _parse(argv)
  try:
    _main(rest)
  except (UsageError, ValueError, OSError, FloatingPointError) as e:
    if FLAGS.debug:
      raise
    print(f"jaxlm: error: {e}", file=sys.stderr)
    sys.exit(2 if isinstance(e, UsageError) else 1)
  except Exception as e:  # only Preempted (SIGTERM/SIGINT, checkpoint saved) is handled
    from jaxlm.train.preemption import Preempted

    if not isinstance(e, Preempted):
      raise
    print(f"jaxlm: {e}; resume with: jaxlm {shlex.join(argv[1:])}", file=sys.stderr, flush=True)
    sys.exit(e.code)


if __name__ == "__main__":
  main()
