"""A Llama-3-8B-class decoder pretrained from scratch on FineWeb, for a TPU pod slice or GPU nodes.

  jaxlm plan --config configs/llama3_8b.py --device v5p-64
  jaxlm train --config configs/llama3_8b.py --workdir gs://BUCKET/runs/llama3_8b
  (on every worker: launch/tpu_vm.sh run configs/llama3_8b.py gs://BUCKET/runs/llama3_8b;
   4 GPU nodes: sbatch --nodes=4 launch/slurm.sbatch configs/llama3_8b.py /shared/runs/l3)

The Llama-3-8B shape (32 layers, 4096 wide, 32 query / 8 key-value heads, SwiGLU 14336, RoPE
theta 500k, vocabulary 128,256, 8.03B parameters) with the Llama-3 tokenizer; bf16 compute on fp32
parameters and AdamW state, FSDP over every device (mesh.fsdp=-1), scanned layers, full remat.
2M tokens a step (256 rows of 8192) as 4 micro-batches: 2 rows per device on a v5p-64 (32 chips)
or 4 x 8 H100, which `jaxlm plan` fits (55 GiB a device, analytic); one 8 x H100 node needs
--config.train.grad_accum=16 (docs/scaling.md).
Cost: not a CPU config. 5.1e10 FLOPs a token (`jaxlm plan`), 1.1e17 a step: 7.4 s a step at a
v5p-64's bf16 peak (14.7 PFLOP/s), ~18 s at 40% MFU, so ~50 hours for 10,000 steps (21B tokens);
3.4 s / ~8.5 s a step on 4 x 8 H100. Estimates from the FLOP count, not timed.
Expected: not measured.
"""

from jaxlm.config import base_config, model


def get_config():
  c = base_config()
  c.model = model("llama3-8b", max_seq_len=8192, dtype="bfloat16", remat="full", scan_layers=True)
  c.data.source = "hf"
  c.data.hf_dataset = "HuggingFaceFW/fineweb"
  c.data.hf_config = "sample-10BT"
  c.data.streaming = True  # 10B tokens: read as a stream, not downloaded first
  c.data.tokenizer = "NousResearch/Meta-Llama-3-8B"  # the Llama-3 tokenizer, not gated
  c.data.seq_len = 8192
  c.data.packing = "concat"  # documents cut into 8192-token rows that attend within themselves
  c.data.val_fraction = 0.001
  c.train.steps = 10000
  c.train.batch_size = 256  # rows of 8192 tokens: 2M tokens a step
  c.train.grad_accum = 4  # micro-batches of 64 rows; raise it when the plan does not fit
  c.train.eval_every = 1000
  c.train.eval_batches = 10
  c.train.log_every = 10
  c.optim.lr = 3e-4
  c.optim.min_lr = 3e-5
  c.optim.warmup_steps = 2000
  c.optim.b2 = 0.95
  c.optim.weight_decay = 0.1
  c.mesh.data = 1
  c.mesh.fsdp = -1  # parameters, gradients and AdamW state split over every device
  c.checkpoint.every = 500
  c.sample.prompt = "The history of"
  c.sample.max_new_tokens = 100
  c.sample.top_k = 50
  return c
