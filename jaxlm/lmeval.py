"""lm-evaluation-harness backend: `JaxLM` answers lm-eval's requests with a jaxlm run or an
imported HF model, and `evaluate` is `jaxlm eval --tasks` (lm-eval's table and results JSON).

  lm_eval.simple_evaluate(model=JaxLM(workdir="runs/demo"), tasks=["hellaswag"])
  lm_eval.simple_evaluate(model="jaxlm", model_args="workdir=runs/demo", tasks=[...])

The request types (docs/evaluation.md):
  loglikelihood          requests sharing context + continuation[:-1] share one forward pass (as
                         lm-eval's hf backend caches one-token continuations); the passes, sorted
                         longest first by lm-eval's Collator, run `batch_size` rows at a time,
                         right-padded to a power-of-two length (or 1.5 times one above
                         1,024 tokens): a task compiles one program per length bucket, not one
                         per request
  loglikelihood_rolling  lm-eval's rolling windows (get_rolling_token_windows, make_disjoint_window)
                         with max_length = the model's max_seq_len, scored as above
  generate_until         jaxlm.generate with textgen's stop-string stream, `batch_size` prompts
                         left-padded to a power-of-two length
Each process holds the model on its own devices and splits every batch over them (the data
axis); several processes each take lm-eval's share of the requests (rank, world_size) and lm-eval
gathers the results. Importing this module imports lm_eval (never torch) and registers "jaxlm".
"""

import functools
import os
import pickle
import sys

import jax
import jax.numpy as jnp
import jinja2
import lm_eval.models  # noqa: F401  lm-eval's own backends first: its registry loads them only while empty
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models import utils as lm_model_utils
from tqdm import tqdm

from jaxlm import generate as gen
from jaxlm import rundir, sharding, textgen
from jaxlm.data import tokenizers as tok_lib
from jaxlm.models import transformer

MIN_BUCKET = 16  # the shortest padded length: short requests share one program
FINE_BUCKETS = 1024  # longer rows are padded to 1.5 x 2^k as well as 2^k (see `bucket`)
# tokens per forward pass: a longer bucket scores fewer rows at a time (a 2,048-token window 4,
# an 8,192-token window of a rolling task 1), so its [rows, H, T, T] scores and [rows, T, V]
# logits stay bounded; 16 rows of 512 tokens or less (the batch_size default) are unchanged
TOKENS_PER_PASS = 16 * 512
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")


def bucket(n: int, cap: int) -> int:
  """The padded length of `n` tokens, at most `cap`: the next power of two (at least
  MIN_BUCKET); above FINE_BUCKETS also 1.5 times one, so a long row (a rolling window) grows by
  at most half rather than nearly doubling."""
  power = max(MIN_BUCKET, 1 << (n - 1).bit_length())
  if power > FINE_BUCKETS and n <= power * 3 // 4:
    power = power * 3 // 4
  return min(power, cap)


def load(workdir=None, hf=None, step=None) -> tuple:
  """(model, params, tokenizer) of a run directory (its newest checkpoint or `step`; a LoRA run
  merged) or of an HF directory / .gguf file; nothing is written."""
  if bool(workdir) == bool(hf):
    raise ValueError("the jaxlm lm-eval backend needs exactly one of workdir=RUN_DIR or "
                     "hf=HF_DIR_OR_GGUF")
  if hf:
    from jaxlm.hf import api

    model, params = api.from_hf(hf)
    return model, params, tok_lib.load_tokenizer(hf)
  saved, params = rundir.load_run(workdir, step)
  return saved.model, params, saved.tokenizer


def local_mesh():
  """This process's devices as a data-parallel mesh: each process scores its own requests."""
  cfg = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  return sharding.make_mesh(cfg, jax.local_devices())


def _replicate(params, mesh):
  """`params` whole on every device of `mesh` (a copy taken from a run's replicated arrays)."""
  replicated = NamedSharding(mesh, P())

  def place(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if not x.sharding.is_fully_replicated:
        raise ValueError("the lm-eval backend needs every process to hold the whole model (data "
                         "parallel); pass params replicated, as rundir.load_run returns them")
      x = x.addressable_data(0)
    return jax.device_put(x, replicated)

  return jax.tree.map(place, params)


@functools.partial(jax.jit, static_argnames="model")
def token_scores(params, batch, *, model):
  """What scoring needs of right-padded rows: per position, log p(target) [B, T] and whether the
  target is the argmax [B, T]; at each row's last real position (the last nonzero weight), the
  same for the candidate tokens batch.labels [B, K] (continuations that differ only there)."""
  logits_BTV = model.apply({"params": params}, batch.inputs)
  logz_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  best_BT = jnp.argmax(logits_BTV, axis=-1)
  target_BT = jnp.take_along_axis(logits_BTV, batch.targets[..., None], axis=-1)[..., 0]
  rows_B = jnp.arange(logits_BTV.shape[0])
  last_B = jnp.maximum(jnp.sum(batch.weights > 0, axis=1) - 1, 0)
  last_BV = logits_BTV[rows_B, last_B]
  cand_BK = jnp.take_along_axis(last_BV, batch.labels, axis=-1)
  cand_logp_BK = cand_BK - logz_BT[rows_B, last_B][:, None]
  return (target_BT - logz_BT, best_BT == batch.targets, cand_logp_BK,
          best_BT[rows_B, last_B][:, None] == batch.labels)


def _sampler(kwargs: dict) -> gen.Sampler:
  unknown = sorted(k for k, v in kwargs.items() if k not in GEN_KWARGS and v is not None)
  if unknown:
    raise ValueError(f"generation_kwargs {unknown} are not supported by the jaxlm backend; it "
                     f"takes {', '.join(GEN_KWARGS)}")
  if not kwargs.get("do_sample"):
    return gen.Sampler()
  return gen.Sampler(float(kwargs.get("temperature") or 1.0), int(kwargs.get("top_k") or 0),
                     float(kwargs.get("top_p") or 1.0))


@register_model("jaxlm")
class JaxLM(TemplateLM):
  """lm-eval's LM over a jaxlm decoder: a run directory, an HF directory or .gguf file, or a
  (model, params, tokenizer) already in memory.

  Args:
    workdir: a jaxlm run directory (its newest checkpoint, or `step`; LoRA runs merged).
    hf: an HF model directory or .gguf file, imported in float32.
    model, params, tokenizer: a model in memory instead (as `jaxlm.from_hf` returns it).
    batch_size: rows per forward pass and prompts per generation batch (rounded up to a
      multiple of this process's device count). lm-eval's "auto" means the default.
    max_length: the longest window scored (default: the model's max_seq_len).
    max_gen_toks: generate_until's default when a task sets none.
    add_bos_token: passed as add_special_tokens when encoding (None: the tokenizer's default).
    prefix_token_id: what an empty context is (default: BOS, else EOS).
    seed: sampling seed of generate_until with do_sample.
    max_batch_size, device: what lm-eval passes every backend; JAX picks the devices.
  """

  def __init__(self, workdir=None, hf=None, *, step=None, model=None, params=None,
               tokenizer=None, batch_size=16, max_length=None, max_gen_toks=256,
               add_bos_token=None, prefix_token_id=None, seed=0, max_batch_size=None,
               device=None):
    super().__init__()
    if model is None:
      model, params, tokenizer = load(workdir, hf, step)
    elif workdir or hf or params is None or tokenizer is None:
      raise ValueError("give model=, params= and tokenizer= together, or workdir= / hf= alone")
    cfg = model.cfg
    if not cfg.causal:
      raise ValueError(f"lm-eval's requests need a decoder (causal LM) and this model is an "
                       f"encoder (head={cfg.head!r}); score encoders on their fine-tuning task: "
                       "jaxlm eval --workdir RUN --split dev")
    tok_lib.check_fits(tokenizer, cfg.vocab_size)
    self.mesh = local_mesh()
    # layers scanned: each length bucket compiles one layer, not num_layers of them (SmolLM2's
    # 30 layers at 4,096 tokens: 4.6 s against 23.5 s), for about the same time a pass
    self.model = model.clone(cfg=cfg.replace(remat="none", dropout=0.0, scan_layers=True))
    self.params = _replicate(transformer.match_layer_layout(params, self.model.cfg), self.mesh)
    self.tokenizer = tokenizer
    self.source = os.fspath(workdir or hf or "")
    self._devices = devices = sharding.batch_divisor(self.mesh)
    batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)
    self.batch_size = -(-batch_size // devices) * devices
    self._max_length = int(max_length or cfg.max_seq_len)
    self.max_gen_toks = int(max_gen_toks)
    self.add_bos_token = add_bos_token
    self.custom_prefix_token_id = prefix_token_id
    self.seed = int(seed)
    self._rank, self._world_size = jax.process_index(), jax.process_count()

  # --- what lm-eval reads ---------------------------------------------------------------------

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def eot_token_id(self):
    return self.tokenizer.eos_token_id

  @property
  def prefix_token_id(self) -> int:
    for token in (self.custom_prefix_token_id, self.tokenizer.bos_token_id,
                  self.tokenizer.eos_token_id):
      if token is not None:
        return token
    raise ValueError("the tokenizer has no BOS or EOS token to start a text with; pass the "
                     "backend prefix_token_id=ID")

  @property
  def tokenizer_name(self) -> str:
    return self.tokenizer.name_or_path.replace("/", "__")

  def get_model_info(self) -> dict:
    return {"model_num_parameters": int(sum(x.size for x in jax.tree.leaves(self.params))),
            "model_dtype": self.model.cfg.dtype}

  def tok_encode(self, string: str, add_special_tokens=None, left_truncate_len=None,
                 **kwargs) -> list[int]:
    """Token ids as lm-eval's hf backend encodes them (no special tokens before a text that
    starts with the prefix token's text)."""
    choice = self.add_bos_token if add_special_tokens is None else add_special_tokens
    special = {} if choice is None else {"add_special_tokens": choice}
    if add_special_tokens is None and lm_model_utils.has_bos_prefix(
        string, self.tokenizer.decode(self.prefix_token_id)):
      special["add_special_tokens"] = False
    ids = self.tokenizer.encode(string, **special)
    return ids[-left_truncate_len:] if left_truncate_len else ids

  def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
    return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, chat_history: list[dict], add_generation_prompt=True) -> str:
    """The tokenizer's chat template, as lm-eval's hf backend applies it (a template that
    refuses a system turn is retried without it)."""
    kwargs = {"tokenize": False, "add_generation_prompt": add_generation_prompt,
              "continue_final_message": not add_generation_prompt}
    try:
      return self.tokenizer.apply_chat_template(chat_history, **kwargs)
    except jinja2.exceptions.TemplateError:
      chat_history = [m for m in chat_history if m["role"] != "system"]
      return self.tokenizer.apply_chat_template(chat_history, **kwargs)

  # --- several processes (lm-eval calls these on every rank, in the same order) ----------------

  def all_gather(self, tensor):
    """Every process's `tensor` stacked (lm-eval passes torch tensors; they come back as such)."""
    if self.world_size == 1:
      return tensor
    gathered = np.asarray(multihost_utils.process_allgather(np.asarray(tensor)))
    torch = sys.modules.get("torch")  # imported by lm-eval's evaluator when it passed a tensor
    if torch is not None and isinstance(tensor, torch.Tensor):
      return torch.from_numpy(gathered)
    return gathered

  def gather_object(self, obj, dst: int = 0):
    """Every process's `obj` (pickled), as a list on process `dst`; None elsewhere."""
    if self.world_size == 1:
      return [obj]
    data = np.frombuffer(pickle.dumps(obj), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(data.size)))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    everyone = np.asarray(multihost_utils.process_allgather(padded))
    if self.rank != dst:
      return None
    return [pickle.loads(everyone[i, :sizes[i]].tobytes()) for i in range(self.world_size)]

  def barrier(self) -> None:
    if self.world_size > 1:
      multihost_utils.sync_global_devices("jaxlm.lmeval barrier")

  # --- loglikelihood and loglikelihood_rolling --------------------------------------------------

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    """(log p(continuation | context), is greedy) of each (strings, context ids, continuation
    ids) request, in order.

    Requests whose context + continuation[:-1] agree differ only in their last token: one
    forward pass (of the longest continuation) scores them all, its last position reading each
    one's last token among the candidates (labels [B, K]).
    """
    groups = {}
    for i, (_, context, continuation) in enumerate(requests):
      if not continuation:
        raise ValueError(f"a loglikelihood request has an empty continuation (context "
                         f"{requests[i][0]!r}); check the task's doc_to_choice / doc_to_target")
      groups.setdefault(tuple(context + continuation[:-1]), []).append(i)
    passes = [(requests[max(m, key=lambda i: len(requests[i][2]))], m) for m in groups.values()]
    width = 1 << (max((len(m) for m in groups.values()), default=1) - 1).bit_length()
    collator = lm_model_utils.Collator(  # longest first, as the hf backend orders them
      passes, sort_fn=lambda p: (-len(p[0][1] + p[0][2]), tuple(p[0][1] + p[0][2])))
    results = [None] * len(requests)
    bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
               desc="Running loglikelihood requests")
    for chunk in collator.get_batched(n=self.batch_size):
      for i, answer in self._score_passes(chunk, requests, width):
        results[i] = answer
        if requests[i][0] is not None:
          self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
        bar.update(1)
    bar.close()
    return results

  def _score_passes(self, chunk, requests, width: int):
    """(request index, (log p, is greedy)) of every request that the passes of `chunk` score."""
    rows = []
    for (_, context, continuation), members in chunk:
      if len(continuation) > self.max_length:
        raise ValueError(f"a continuation of {len(continuation)} tokens is longer than "
                         f"max_length={self.max_length}")
      tokens = (context + continuation)[-(self.max_length + 1):]
      candidates = sorted({requests[i][2][-1] for i in members})
      rows.append((tokens, candidates + candidates[:1] * (width - len(candidates)), members))
    T = bucket(max(len(t) - 1 for t, _, _ in rows), self.max_length)
    per_pass = self.rows_per_pass(T)
    for first in range(0, len(rows), per_pass):
      part = rows[first:first + per_pass]
      arrays = {"inputs": np.zeros((per_pass, T), np.int32),
                "targets": np.zeros((per_pass, T), np.int32),
                "weights": np.zeros((per_pass, T), np.float32),
                "labels": np.zeros((per_pass, width), np.int32)}
      for b, (tokens, candidates, _) in enumerate(part):
        n = len(tokens) - 1
        arrays["inputs"][b, :n], arrays["targets"][b, :n] = tokens[:-1], tokens[1:]
        arrays["weights"][b, :n] = 1.0
        arrays["labels"][b] = candidates
      with sharding.mesh_rules(self.mesh):
        logp_BT, greedy_BT, cand_logp_BK, cand_greedy_BK = jax.device_get(token_scores(
          self.params, sharding.global_batch(arrays, self.mesh), model=self.model))
      for b, (tokens, candidates, members) in enumerate(part):
        end = len(tokens) - 2  # the position that predicts the last token
        for i in members:
          continuation = requests[i][2]
          k, start = candidates.index(continuation[-1]), end + 1 - len(continuation)
          logp = float(logp_BT[b, start:end].astype(np.float64).sum() + cand_logp_BK[b, k])
          yield i, (logp, bool(greedy_BT[b, start:end].all() and cand_greedy_BK[b, k]))

  def rows_per_pass(self, length: int) -> int:
    """Rows of `length` tokens scored in one forward pass: batch_size, fewer for long rows
    (TOKENS_PER_PASS), at least one per device."""
    rows = min(self.batch_size, max(1, TOKENS_PER_PASS // length))
    return -(-rows // self._devices) * self._devices

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """log p of each whole text: lm-eval's disjoint rolling windows of max_length tokens, each
    scored as a loglikelihood request, summed per text."""
    windows, owners = [], []
    for i, (text,) in enumerate(r.args for r in requests):
      for context, continuation in map(lm_utils.make_disjoint_window,
                                       lm_utils.get_rolling_token_windows(
                                         token_list=self.tok_encode(text),
                                         prefix_token=self.prefix_token_id,
                                         max_seq_len=self.max_length, context_len=1)):
        windows.append((None, context, continuation))
        owners.append(i)
    totals = [0.0] * len(requests)
    for i, (logp, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
      totals[i] += logp
    for request, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
    return totals

  # --- generate_until ---------------------------------------------------------------------------

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Each context's continuation, cut at the first of its stop strings (`until`, plus the EOS
    text) and at max_gen_toks, as lm-eval's hf backend cuts it."""
    collator = lm_model_utils.Collator(
      [r.args for r in requests], sort_fn=lambda a: (-len(self.tok_encode(a[0])), a[0]),
      group_by="gen_kwargs", group_fn=lambda a: a[1])
    eos = self.eot_token_id
    eos_text = None if eos is None else self.tok_decode(eos, skip_special_tokens=False)
    out = []
    bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
               desc="Running generate_until requests")
    for n, chunk in enumerate(collator.get_batched(n=self.batch_size)):
      contexts, all_kwargs = zip(*chunk)
      texts = self._generate_batch(contexts, all_kwargs[0], eos_text, n)
      for context, text in zip(contexts, texts):
        self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), text)
      out.extend(texts)
      bar.update(len(texts))
    bar.close()
    return collator.get_original(out)

  def _generate_batch(self, contexts, gen_kwargs: dict, eos_text, n: int) -> list[str]:
    kwargs = lm_model_utils.normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
    until = lm_model_utils.handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
    max_gen_toks = kwargs.pop("max_gen_toks")
    sampler = _sampler(kwargs)
    room = self.max_length - max_gen_toks
    if room < 1:
      raise ValueError(f"max_gen_toks={max_gen_toks} leaves no room for a prompt in "
                       f"max_length={self.max_length}; lower the task's max_gen_toks")
    prompts = [(self._encode_prompt(c) or [self.prefix_token_id])[-room:] for c in contexts]
    rows = prompts + prompts[:1] * (self.batch_size - len(prompts))  # one batch shape
    eos_ids = textgen.eos_ids_of(self.tokenizer)
    pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
    stream = textgen.TextStream(self.tokenizer, rows, eos_ids, stop=until)
    with sharding.mesh_rules(self.mesh):
      new = gen.generate(self.model, self.params, rows, jax.random.PRNGKey(self.seed + n),
                         max_new_tokens=max_gen_toks, sampler=sampler, eos_ids=eos_ids,
                         pad_id=pad_id, on_step=stream,
                         pad_multiple=bucket(max(map(len, prompts)), room))
    return [lm_model_utils.postprocess_generated_text(self.tok_decode(ids), until, None)
            for ids in new[:len(prompts)]]

  def _encode_prompt(self, context: str) -> list[int]:
    """A prompt's ids as the hf backend's batch encoding makes them."""
    if lm_model_utils.has_bos_prefix(context, getattr(self.tokenizer, "bos_token", None)):
      return self.tokenizer.encode(context, add_special_tokens=False)
    special = {} if self.add_bos_token is None else {"add_special_tokens": self.add_bos_token}
    return self.tokenizer.encode(context, **special)


# --- jaxlm eval --tasks -----------------------------------------------------------------------

def task_manager(tasks, include_path=None):
  """lm-eval's TaskManager: the tasks of `include_path` alone when they hold every task named
  (indexing lm-eval's ~15,000 built-in task files takes tens of seconds), else with them."""
  from lm_eval.tasks import TaskManager

  if include_path:
    local = TaskManager(include_path=include_path, include_defaults=False)
    if all(local.match_tasks([t]) for t in tasks):
      return local
  return TaskManager(include_path=include_path)


def resolve_tasks(manager, tasks) -> list[str]:
  """The task names `tasks` stand for (glob patterns expanded, YAML paths kept), as lm-eval's
  command line resolves them; unknown ones are refused before any model is loaded."""
  names, unknown = [], []
  for t in tasks:
    matched = manager.match_tasks([t]) or ([t] if os.path.isfile(t) else [])
    names += matched
    unknown += [] if matched else [t]
  if unknown:
    raise ValueError(f"no lm-eval task named {unknown}: give names lm-eval knows (lm-eval ls "
                     "tasks) or that the YAML files under --include_path define")
  return names


def evaluate(tasks, *, workdir=None, hf=None, include_path=None, limit=None, num_fewshot=None,
             output_path=None, **model_args) -> tuple:
  """lm-eval's simple_evaluate of the jaxlm backend on `tasks` (names, as lm-eval knows them or
  as the YAML files under `include_path` define them).

  Returns:
    (lm-eval's results dict, or None on processes other than the first; the results JSON
    written under `output_path` in lm-eval's layout, or None).
  """
  from lm_eval import simple_evaluate
  from lm_eval.loggers import EvaluationTracker

  manager = task_manager(list(tasks), include_path)
  names = resolve_tasks(manager, tasks)
  source = {"workdir": os.fspath(workdir)} if workdir else {"hf": os.fspath(hf or "")}
  tracker = EvaluationTracker(output_path=os.fspath(output_path)) if output_path else None
  results = simple_evaluate(model="jaxlm", model_args={**source, **model_args}, tasks=names,
                            num_fewshot=num_fewshot, limit=limit, log_samples=False,
                            task_manager=manager, evaluation_tracker=tracker)
  if results is None or tracker is None:
    return results, None
  return results, _save(tracker, results, next(iter(source.values())))


def _save(tracker, results: dict, name: str) -> str:
  """Writes lm-eval's results JSON (OUTPUT/<model name>/results_<date>.json, the model named by
  its path as the hf backend's `pretrained` is); returns its path."""
  tracker.general_config_tracker.model_name = name
  tracker.general_config_tracker.model_name_sanitized = lm_utils.sanitize_model_name(name)
  tracker.save_results_aggregated(results=results, samples=None)
  if not hasattr(tracker, "date_id"):  # lm-eval logs a failed write and carries on
    raise OSError(f"lm-eval could not write its results JSON under {tracker.output_path}; "
                  "check that the directory is writable")
  out = tracker.output_path
  if out.endswith(".json"):
    return f"{out[:-len('.json')]}_{tracker.date_id}.json"
  return os.path.join(out, tracker.general_config_tracker.model_name_sanitized,
                      f"results_{tracker.date_id}.json")


def table(results: dict) -> str:
  """lm-eval's results table (and its groups table, when there are groups)."""
  out = lm_utils.make_table(results)
  return out + ("\n" + lm_utils.make_table(results, "groups") if "groups" in results else "")
