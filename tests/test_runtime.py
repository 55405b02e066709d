"""Tests jaxlm/runtime.py's process set-up that needs no backend: the malloc arena cap, the CPU
device count for a batch, and the detection of a multi-process launch."""

import os
import subprocess
import sys

import pytest

from jaxlm import runtime


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_malloc_arenas_are_capped_unless_the_user_set_malloc_arena_max():
  code = "from jaxlm import runtime; print(runtime.limit_malloc_arenas())"

  def run(env):
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()

  assert run({"PATH": "/usr/bin:/bin"}) == "True"
  assert run({"PATH": "/usr/bin:/bin", "MALLOC_ARENA_MAX": "8"}) == "False"


def test_auto_cpu_devices_divides_the_batch_and_fits_the_cores():
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  for batch in (1, 7, 12, 64):
    n = runtime.auto_cpu_devices(batch)
    assert 1 <= n <= cores and batch % n == 0
  assert runtime.auto_cpu_devices(1) == 1
  # a model of 20M+ parameters runs as one device: a replica of its train state per core costs
  # memory and buys no speed
  assert runtime.auto_cpu_devices(64, weights=runtime.SPLIT_MAX_WEIGHTS - 1) == \
    runtime.auto_cpu_devices(64)
  assert runtime.auto_cpu_devices(64, weights=134_479_872) == 1


def test_multiprocess_launch_is_detected_from_the_launchers_environment():
  assert not runtime.is_multiprocess_launch({})
  assert not runtime.is_multiprocess_launch({"SLURM_NTASKS": "1"})
  assert runtime.is_multiprocess_launch({"SLURM_NTASKS": "4"})
  assert runtime.is_multiprocess_launch({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
  assert runtime.is_multiprocess_launch({"TPU_WORKER_HOSTNAMES": "w0,w1"})
  assert not runtime.is_multiprocess_launch({"TPU_WORKER_HOSTNAMES": "w0"})
