"""Process-level JAX setup that must happen before the first device is touched.

On CPU, small models train faster as several XLA devices (one per core, data-parallel) than as
one device whose ops are each split over the cores: XLA:CPU parallelises tiny matmuls poorly.
"""

import os

import jax


def auto_cpu_devices(batch_size: int) -> int:
  """The largest device count <= the usable cores that divides `batch_size`."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return max(n for n in range(1, max(cores, 1) + 1) if batch_size % n == 0)


def configure_cpu_devices(requested: int, batch_size: int) -> None:
  """Splits the CPU into `requested` devices (0 = auto) unless XLA_FLAGS already fixes a count
  or the backends are already running (as in tests, which set their own count)."""
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return
  n = requested or auto_cpu_devices(batch_size)
  try:
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError:  # backends already initialised: keep what they have
    pass


def init_distributed() -> None:
  """Joins a multi-process run when launched as one (TPU pods, SLURM, JAX_COORDINATOR_ADDRESS)."""
  launched = any(v in os.environ for v in (
    "JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"
  ))
  if launched and int(os.environ.get("SLURM_NTASKS", "2")) > 1:
    jax.distributed.initialize()
