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


def test_multiprocess_launch_is_detected_from_the_launchers_environment():
  assert not runtime.is_multiprocess_launch({})
  assert not runtime.is_multiprocess_launch({"SLURM_NTASKS": "1"})
  assert runtime.is_multiprocess_launch({"SLURM_NTASKS": "4"})
  assert runtime.is_multiprocess_launch({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
  assert runtime.is_multiprocess_launch({"TPU_WORKER_HOSTNAMES": "w0,w1"})
  assert not runtime.is_multiprocess_launch({"TPU_WORKER_HOSTNAMES": "w0"})



def test_a_small_cpu_step_compiles_each_dot_alone_and_a_large_one_as_xla_likes():
  """cpu_step_options keeps a small step's reductions and elementwise ops out of YNNPACK's
  fusions (whose fixed cost dominates small matmuls) and leaves larger steps to XLA's defaults."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  assert runtime.cpu_step_options(1024, 384) is None
  options = runtime.cpu_step_options(384, 128)
  assert options is not None

  def norm_mlp(x, w):  # a layer norm's reduction, a matmul and an elementwise epilogue
    x = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)
    return jax.nn.gelu(x @ w)

  rng = np.random.default_rng(0)
  x = rng.normal(size=(384, 128)).astype(np.float32)
  w = rng.normal(size=(128, 512)).astype(np.float32)
  default = _ops_in_ynn_fusions(jax.jit(norm_mlp).lower(x, w).compile().as_text())
  assert {"reduce", "multiply"} <= default, f"XLA's defaults changed ({default}): re-measure"
  small = jax.jit(norm_mlp, compiler_options=options)
  assert _ops_in_ynn_fusions(small.lower(x, w).compile().as_text()) <= {"dot", "parameter",
                                                                        "bitcast", "copy"}
  np.testing.assert_allclose(small(x, w), jax.jit(norm_mlp)(x, w), rtol=1e-5, atol=1e-5)


def _ops_in_ynn_fusions(hlo: str) -> set:
  """The HLO opcodes inside the fusions XLA:CPU handed to YNNPACK (optimized HLO text)."""
  import re

  ops = set()
  for name in re.findall(r"calls=(%[\w.\-]+), [^\n]*__ynn_fusion", hlo):
    body = re.search(r"\n" + re.escape(name) + r" [^\n]*\{\n(.*?)\n\}", hlo, re.S).group(1)
    ops |= set(re.findall(r"= \S+ (\w[\w\-]*)\(", body))
  return ops
