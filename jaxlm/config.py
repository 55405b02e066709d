"""The default run config, nested by component; `configs/*.py` start from it and change fields.

`kind` says what the run trains (no mode is inferred from which sections a config has). Each
section is validated where it is consumed (ModelConfig, optim, data, task), not by one giant
checker. Configs are locked: an unknown key or a wrong type fails at once.
"""

import ml_collections

from jaxlm.models import config as model_config
from jaxlm.tasks import registry

# What a run trains: each kind is an objective, an evaluator and a data transform over the one
# trainer (jaxlm.train.trainer).
KINDS = {
  "lm": "next-token pretraining or fine-tuning of a decoder on text",
  "sft": "chat/instruction fine-tuning of a decoder: the chat template, loss on responses only",
  "dpo": "preference tuning of a decoder (DPO, IPO, SimPO) on prompt/chosen/rejected pairs",
  "mlm": "masked-LM pretraining of an encoder (BERT, RoBERTa)",
  "finetune": "an encoder task head (GLUE, CoNLL-2003, SQuAD): `task` names the task",
  "distill": "a student (LM, masked LM or sequence classifier) trained towards a frozen teacher's "
             "distributions (`distill`) and the labels",
}


def model(preset: str | None = None, **overrides) -> ml_collections.ConfigDict:
  """The `model` section: a named preset (or the defaults) with `overrides` applied."""
  if preset:
    cfg = model_config.preset(preset, **overrides)
  else:
    cfg = model_config.ModelConfig(**overrides)
  # init_from: an HF checkpoint (directory, .gguf file, hub id) or a jaxlm run directory to start
  # from; its model config wins over the fields above except dropout/dtype/remat/scan_layers
  return ml_collections.ConfigDict({**cfg.to_dict(), "init_from": ""})


def base_config() -> ml_collections.ConfigDict:
  """Every key a training run reads, with its default."""
  c = ml_collections.ConfigDict()
  c.kind = "lm"  # lm | sft | dpo | mlm | finetune (see KINDS)
  c.model = model()
  c.data = ml_collections.ConfigDict(dict(
    source="file",  # file | hf | pydoc (Python's reference docs, no download)
    path="",  # text file for source=file
    hf_dataset="",  # hub id or local path for source=hf
    hf_config="",  # dataset config name, e.g. wikitext-103-raw-v1
    hf_split="train",
    text_column="text",
    tokenizer="char",  # char | a tokenizer directory | a hub id
    seq_len=256,  # tokens per training window
    val_fraction=0.1,  # last fraction of the stream held out for eval
    # document pipeline (jaxlm.data.pipeline), used when packing is not "none"
    packing="none",  # none: random windows of one stream (nanoGPT) | concat | best_fit
    mixture="",  # "PATH_OR_GLOB[=W],hf:ID[:CONFIG][=W],...": weighted sources; "" = the above
    format="",  # text | json | jsonl | csv | tsv | parquet; "" = from the file extension
    sample_by="line",  # text files: a document per line | paragraph | document (whole file)
    streaming=False,  # stream hub datasets instead of downloading them first
    messages_column="messages",  # sft: a list of {role, content}; else prompt/response columns
    prompt_column="prompt",
    response_column="response",
    add_bos=False,  # put the tokenizer's BOS before every document
    add_eos=True,  # put the tokenizer's EOS after every document
    truncate=False,  # best_fit: cut documents longer than seq_len + 1 instead of failing
    best_fit_bins=64,  # rows best_fit packs into at once (more: less padding)
    cache_dir="",  # tokenized-data cache; "" = ~/.cache/jaxlm
    prefetch=4,  # batches prepared ahead in background threads
    read_threads=4,  # threads reading and packing rows
  ))
  c.mlm = ml_collections.ConfigDict(dict(  # kind=mlm
    prob=0.15,  # chance a token (or a whole word) is chosen: 80% [MASK], 10% random, 10% kept
    whole_word=False,  # choose whole words: every sub-word of a chosen word
  ))
  c.dpo = ml_collections.ConfigDict(dict(  # kind=dpo; data.path: JSONL of prompt/chosen/rejected
    loss="sigmoid",  # sigmoid (DPO) | ipo | simpo (reference-free, length-normalised)
    beta=0.1,  # strength of the pull to the reference (SimPO: reward scale, ~2)
    label_smoothing=0.0,  # sigmoid/simpo: assumed chance a pair's labels are flipped (cDPO)
    simpo_gamma=0.5,  # simpo: target reward margin
  ))
  c.task = task()  # kind=finetune; kind=distill with a seq_cls student
  c.distill = ml_collections.ConfigDict(dict(  # kind=distill (jaxlm.train.distill)
    teacher="",  # the frozen teacher: a jaxlm run directory or an HF checkpoint (dir, .gguf, id)
    divergence="forward_kl",  # forward_kl | reverse_kl | jsd (TRL GKD's generalized JSD, beta)
    beta=0.5,  # jsd: TRL's beta (0 would be forward KL, 1 reverse KL)
    alpha=0.5,  # loss = alpha * T^2 * D(teacher, student) + (1 - alpha) * CE(labels)
    temperature=2.0,  # T: both distributions softened by it
    teacher_dtype="",  # "" (as imported) | bfloat16 | float32
    teacher_quantize="",  # "" | int8: the teacher's block kernels held int8 (Qwix)
    # teacher layers the student starts from (DistilBERT: 0, 2, 4); embeddings, final norm and
    # heads copied too, the student's config the teacher's with len(init_layers) layers; () = off
    init_layers=(),
  ))
  c.lora = ml_collections.ConfigDict(dict(  # LoRA on a run that starts from model.init_from
    rank=0,  # adapter rank r; 0: LoRA off (every parameter trained)
    alpha=16.0,  # PEFT's lora_alpha: the update is scaled by alpha/r (alpha/sqrt(r) with rslora)
    rslora=False,  # rank-stabilised scaling alpha/sqrt(r)
    dropout=0.0,  # must be 0: the adapters' inputs are not dropped
    targets="attention",  # attention | mlp | all | "attention,mlp" | a regex over param paths
    base_dtype="",  # frozen base dtype: "" (the model's param dtype) | bfloat16 | float16
    # "" | int8 | int4 | nf4: the frozen base's block kernels quantized (QLoRA; Qwix), int8 per
    # output channel, int4/NF4 per block of 64 inputs; each layer dequantizes its own as it runs
    quantize="",
    init_adapter="",  # a PEFT adapter directory to start from (its r/alpha/targets are used)
  ))
  c.train = ml_collections.ConfigDict(dict(
    steps=1000,  # finetune: 0 = train.epochs passes over the training examples
    epochs=0,  # finetune, when train.steps is 0
    batch_size=16,  # global, over all devices and processes
    grad_accum=1,  # micro-batches per step (batch_size must divide evenly)
    # optimizer steps per jitted call: K > 1 runs K steps in one lax.scan over K batches (one
    # dispatch and one metrics fetch per K steps: small models); evaluation, checkpoints and
    # SIGTERM act between calls. Calls end at multiples of K and at eval/checkpoint steps (keep
    # those multiples of K: a call of another length compiles its own program). Batches must
    # share a shape (not finetune)
    steps_per_call=1,
    seed=0,
    log_every=10,  # steps between metrics.jsonl records
    eval_every=250,  # steps between evaluations (and a checkpoint after each); finetune: 0 = epochs
    eval_batches=20,
    eval_at_start=True,  # lm with model.init_from: score the imported weights before step 1
    skip_nonfinite=0,  # 0: stop at a NaN/Inf loss; N: skip such updates, up to N in a row
  ))
  c.optim = ml_collections.ConfigDict(dict(
    name="adamw",  # adamw | adafactor | lion | sgd
    lr=1e-3,  # peak learning rate after warmup
    min_lr=1e-4,  # end of the cosine decay
    warmup_steps=100,
    decay_steps=0,  # 0: decay over train.steps
    schedule="cosine",  # decay after warmup: cosine | linear
    b1=0.9,
    b2=0.95,
    eps=1e-8,
    weight_decay=0.1,  # not applied to biases and norm scales
    clip=1.0,  # global-norm gradient clipping; 0 disables
  ))
  c.mesh = ml_collections.ConfigDict(dict(  # strategies as sizes (jaxlm/sharding.py); -1: the rest
    data=-1,  # data parallel: the batch split, params replicated
    fsdp=1,  # batch split and params, grads and optimizer state sharded (ZeRO-3)
    expert=1,  # a mixture of experts' experts split (expert parallelism); the batch split too
    sequence=1,  # activations split along the length (long contexts)
    tensor=1,  # heads and MLP columns split (Megatron)
    slices=1,  # TPU slices (or GPU nodes) joined by the data-centre network; data spans them
  ))
  c.runtime = ml_collections.ConfigDict(dict(
    cpu_devices=0,  # on CPU, devices to split the cores into; 0 = auto (see jaxlm.runtime)
    # persistent XLA compilation cache: "auto" = $JAXLM_COMPILE_CACHE or ~/.cache/jaxlm/xla,
    # a directory (or gs:// path), or "" for none
    compile_cache="auto",
    peak_flops=0.0,  # peak FLOP/s of one device for MFU; 0 = jaxlm.devices' table
  ))
  c.profile = ml_collections.ConfigDict(dict(
    steps="",  # "A-B": a JAX profiler trace of steps A..B into WORKDIR/profile ("" = none)
  ))
  c.wandb = ml_collections.ConfigDict(dict(  # Weights & Biases, beside metrics.jsonl/TensorBoard
    project="",  # "" = off
    entity="",
    name="",  # "" = W&B's own
    mode="online",  # online | offline (sync later: wandb sync WORKDIR/wandb) | disabled
  ))
  c.checkpoint = ml_collections.ConfigDict(dict(
    every=1000,  # steps between checkpoints (also saved at the last step and on SIGTERM/SIGINT)
    keep=3,  # newest checkpoints kept (0: all)
    use_async=True,  # save in the background while training continues
    keep_best=0,  # also keep the best N by best_metric (0: off)
    best_metric="eval_loss",  # eval_loss | eval_ppl
    best_mode="min",  # min | max
    keep_period=0,  # also keep every step that is a multiple of this, forever (0: off)
    restore_step=-1,  # -1: resume from the newest checkpoint in the workdir; N: from step N
    fresh=False,  # ignore (move aside) existing checkpoints and metrics; start from step 0
  ))
  c.sample = ml_collections.ConfigDict(dict(
    prompt="\n", max_new_tokens=200, temperature=0.8, top_k=0, top_p=1.0, seed=0,
  ))
  return c


def task(name: str = "", data_dir: str = "", max_len: int = 128, **overrides):
  """The `task` section: which fine-tuning task, where its data is, how examples are batched."""
  return ml_collections.ConfigDict({
    "name": name,  # sst2 | cola | mrpc | rte | stsb | conll2003 | squad
    "data_dir": data_dir,  # local files; "" reads the hub dataset (hub_dataset)
    "hub_dataset": "",  # hub id or local dataset dir; "" = glue / conll2003 / squad
    "max_len": max_len,  # tokens per example (window for squad)
    "buckets": (),  # padded lengths; () = powers of two up to max_len
    "pack": True,  # train on each step's examples packed into rows of max_len (not squad)
    "pack_row_multiple": 4,  # packed row counts are multiples of this: fewer shapes compile
    "doc_stride": 128,  # squad: tokens shared by consecutive windows
    "eval_split": "dev",
    "max_train_examples": 0,  # 0 = all
    "max_eval_examples": 0,
    **overrides,
  })


def finetune_config(name: str, data_dir: str, max_len: int, *, epochs: int = 3, lr: float = 2e-5,
                    batch_size: int = 32, warmup_steps: int = 0, **task_overrides):
  """A whole fine-tuning run config: BERT-style AdamW with linear decay, an encoder imported from
  model.init_from (an HF directory or hub id) with the task's new head."""
  c = base_config()
  c.kind = "finetune"
  head, num_labels = registry.head_of(name)
  c.model = model("bert-base", head=head, num_labels=num_labels, dropout=0.1)
  c.model.init_from = "google-bert/bert-base-uncased"  # HF encoder dir or hub id; sizes from it
  c.task = task(name, data_dir, max_len, **task_overrides)
  c.train.epochs = epochs
  c.train.steps = 0  # 0: epochs x full batches per epoch
  c.train.eval_every = 0  # 0: after each epoch
  c.train.batch_size = batch_size
  c.train.log_every = 50
  c.optim.update(dict(lr=lr, min_lr=0.0, schedule="linear", warmup_steps=warmup_steps, b1=0.9,
                      b2=0.999, eps=1e-8, weight_decay=0.01, clip=1.0))
  c.sample.max_new_tokens = 0
  # on a CPU, one device: splitting the cores data-parallel would replicate the AdamW update and
  # all-reduce every gradient of a 20M+ parameter model each step, costing more than it saves
  c.runtime.cpu_devices = 1
  return c


def data_kind(config) -> str:
  """The kind whose data and evaluator a run uses: its own, or for kind='distill' the student's
  head's (model.head seq_cls: finetune's task examples, mlm: masked text, else lm's text)."""
  if config.kind != "distill":
    return config.kind
  return {"seq_cls": "finetune", "mlm": "mlm"}.get(config.model.head, "lm")
