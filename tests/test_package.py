"""Tests the jaxlm package as a whole: its import graph has no cycles (function-local imports
included), `import jaxlm` is light, and reading a run to generate from it imports neither the
optimizer (optax) nor the data pipeline (grain)."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKER = os.path.join(os.path.dirname(REPO), "shared", "tools", "import_cycles.py")


def _python(code: str) -> str:
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-2000:]
  return result.stdout.strip()


def test_the_import_graph_has_no_cycles():
  if not os.path.isfile(CHECKER):
    pytest.skip(f"{CHECKER} not found (../shared is absent)")
  result = subprocess.run([sys.executable, CHECKER, "jaxlm"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)
  assert "import cycles: 0" in result.stdout, result.stdout


def test_import_jaxlm_is_light_and_generation_imports_neither_optax_nor_grain():
  light, generation = _python(
    "import sys, jaxlm; print(sorted(m for m in ('jax', 'flax', 'torch', 'transformers') "
    "if m in sys.modules)); import jaxlm.rundir, jaxlm.textgen, jaxlm.generate, jaxlm.cli; "
    "print(sorted(m for m in ('optax', 'grain') if m in sys.modules))").splitlines()
  assert light == "[]" and generation == "[]"


def test_training_and_reloading_a_char_tokenizer_run_never_imports_torch(tmp_path):
  """transformers' AutoTokenizer import pulls in PyTorch wherever it is installed (about 250 MB
  of a small run's memory): a run's plain fast tokenizer (char) is loaded without it."""
  out = _python(
    "import sys, jaxlm.train.trainer; from jaxlm.data import tokenizers as t; "
    f"tok = t.char_tokenizer('to be or not'); tok.save_pretrained({str(tmp_path)!r}); "
    f"back = t.load_tokenizer({str(tmp_path)!r}); "
    "print(back.encode('not to be') == tok.encode('not to be'), type(back).__name__, "
    "'torch' in sys.modules)")
  assert out == "True TokenizersBackend False"


CORE = ("jax", "flax", "optax", "orbax-checkpoint", "grain", "transformers", "qwix",
        "ml-collections", "datasets", "tokenizers", "safetensors", "etils")


def test_each_core_dependency_has_an_upper_bound_that_admits_the_tested_release():
  """A fresh install must not pull a release nobody ran: every core dependency is bounded above,
  and the installed (tested) release lies inside its range."""
  from importlib import metadata

  import tomllib
  from packaging.requirements import Requirement

  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    deps = [Requirement(d) for d in tomllib.load(f)["project"]["dependencies"]]
  by_name = {d.name.replace("_", "-").lower(): d for d in deps}
  for name in CORE:
    spec = by_name[name].specifier
    assert any(s.operator in ("<", "<=", "==") for s in spec), f"{name} has no upper bound"
    assert spec.contains(metadata.version(name), prereleases=True), (
      f"installed {name} {metadata.version(name)} is outside {spec}")
