"""Test setup: 8 simulated CPU devices (set before JAX starts) and strict rank promotion."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# the persistent compilation cache of every `jaxlm` the tests run: one per session, never ~/.cache
os.environ.setdefault("JAXLM_COMPILE_CACHE", tempfile.mkdtemp(prefix="jaxlm-xla-"))

import jax  # noqa: E402
import pytest  # noqa: E402

from jaxlm import runtime  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
# tests build the same tiny models again and again: load their programs instead of compiling
runtime.configure_compile_cache(os.environ["JAXLM_COMPILE_CACHE"])

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")


@pytest.fixture
def shakespeare_path():
  path = os.path.join(SHARED_DATA, "tinyshakespeare", "input.txt")
  if not os.path.isfile(path):
    pytest.skip(f"Tiny Shakespeare not found at {path} (../shared/data is absent)")
  return path


@pytest.fixture(scope="session")
def smollm2():
  """Real SmolLM2-135M weights, read once per session: (jaxlm model, params, HF model, tokenizer)."""
  pytest.importorskip("torch")
  from hf_testing import load_smollm2

  return load_smollm2()
