"""Process-level JAX setup that must happen before the first device is touched.

On CPU, small models train faster as several XLA devices (one per core, data-parallel) than as
one device whose ops are each split over the cores: XLA:CPU parallelises tiny matmuls poorly.
From about 20M parameters on, the split buys no speed and each device holds its own replica of
the train state: SmolLM2-135M fine-tuned at 4 x 128 took 4.89 s a step and 7.77 GiB as two
devices, 5.05 s and 4.64 GiB as one (benchmarks/finetune_cpu.py, same run). So `auto` splits
only smaller models.
"""

import ctypes
import os
import sys

import jax

SPLIT_MAX_WEIGHTS = 20_000_000  # models from this many parameters on run as one CPU device


def auto_cpu_devices(batch_size: int, weights: int = 0) -> int:
  """The largest device count <= the usable cores that divides `batch_size`; one device for a
  model of `weights` >= SPLIT_MAX_WEIGHTS parameters (0: unknown, taken as small)."""
  if weights >= SPLIT_MAX_WEIGHTS:
    return 1
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return max(n for n in range(1, max(cores, 1) + 1) if batch_size % n == 0)


def configure_cpu_devices(requested: int, batch_size: int, weights: int = 0) -> None:
  """Splits the CPU into `requested` devices (0 = auto, for a model of `weights` parameters)
  unless XLA_FLAGS already fixes a count or the backends are already running (as in tests,
  which set their own count)."""
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return
  n = requested or auto_cpu_devices(batch_size, weights)
  try:
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError:  # backends already initialised: keep what they have
    pass


_M_ARENA_MAX = -8  # mallopt's parameter, glibc's malloc.h


def limit_malloc_arenas(arenas: int = 2) -> bool:
  """Caps glibc's malloc arenas (M_ARENA_MAX) unless MALLOC_ARENA_MAX is set; True when capped.

  glibc gives each thread that meets contention its own arena, up to 8 per core, and XLA's
  compiler and thread pools touch many threads: memory freed after compilation stays spread over
  those arenas, resident but unused. Called before the backends start, two arenas cut a small CPU
  run's peak memory by about 100 MB (15%) at the same speed (docs/performance.md). A no-op off
  glibc (musl, macOS).
  """
  if "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
    return False
  try:
    return ctypes.CDLL("libc.so.6").mallopt(_M_ARENA_MAX, arenas) == 1
  except (OSError, AttributeError):  # not glibc: nothing to cap
    return False


def configure_compile_cache(where: str) -> str:
  """Turns on JAX's persistent compilation cache, so a second launch of the same config, a
  resumed run or a second `jaxlm generate` loads its programs instead of compiling them.

  Args:
    where: "auto" ($JAXLM_COMPILE_CACHE, else ~/.cache/jaxlm/xla), a directory or gs:// path,
      or "" (off).
  Returns:
    the cache directory ("" when off).
  """
  if where == "auto":
    where = os.environ.get("JAXLM_COMPILE_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "jaxlm", "xla")
  if not where:
    return ""
  jax.config.update("jax_compilation_cache_dir", where)
  # every program, however quick to compile: small models on CPU compile in well under a second
  # each, but there are dozens of them (train, eval, generate buckets)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return where


# What JAX reports of each compilation through jax.monitoring: its phases' durations (trace,
# lowering, XLA), XLA compilations proper, and persistent-cache hits.
_COMPILE_PHASES = (
  "/jax/core/compile/jaxpr_trace_duration",
  "/jax/core/compile/jaxpr_to_mlir_module_duration",
  "/jax/core/compile/backend_compile_duration",
)
_compiles = {"seconds": 0.0, "xla_compiles": 0, "cache_hits": 0}
_listening = []


def compile_stats() -> dict:
  """This process's compilation so far: {"seconds" (tracing, lowering, XLA; a persistent-cache
  hit costs only its tracing and loading), "xla_compiles" (programs XLA compiled),
  "cache_hits" (programs loaded from the persistent cache)}. Counts from the first call on."""
  if not _listening:
    _listening.append(True)

    def on_duration(event: str, seconds: float, **_):
      if event in _COMPILE_PHASES:
        _compiles["seconds"] += seconds
      if event == _COMPILE_PHASES[-1]:
        _compiles["xla_compiles"] += 1

    def on_event(event: str, **_):
      if event == "/jax/compilation_cache/cache_hits":
        _compiles["cache_hits"] += 1

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
  # JAX reports the backend-compile phase for cache hits too: a compilation is a request not hit
  return {**_compiles, "xla_compiles": _compiles["xla_compiles"] - _compiles["cache_hits"]}


def is_multiprocess_launch(env=os.environ) -> bool:
  """True under a multi-process launcher: several SLURM tasks, a multi-host TPU slice, or an
  explicit JAX_COORDINATOR_ADDRESS (with JAX_NUM_PROCESSES and JAX_PROCESS_ID)."""
  return bool(
    env.get("JAX_COORDINATOR_ADDRESS")
    or int(env.get("SLURM_NTASKS", "1")) > 1
    or "," in env.get("TPU_WORKER_HOSTNAMES", "")
  )


def init_distributed() -> None:
  """Joins the multi-process run (jax.distributed) when launched as one; a no-op otherwise."""
  if not is_multiprocess_launch():
    return
  # CPU devices of different processes talk through gloo (the CPU backend's collectives); set
  # before any backend starts. Accelerator backends ignore it.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(
      coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
      num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
      process_id=int(os.environ["JAX_PROCESS_ID"]),
    )
  else:  # SLURM and Cloud TPU are detected by JAX itself
    jax.distributed.initialize()
