"""Tests tests/strict_skips.py: under CI=true a skip fails the run, accelerator tests aside."""

import os

SAMPLE = """
import pytest

pytest_plugins = []

def test_runs():
  assert True

def test_skips():
  pytest.skip("a dependency is missing")

@pytest.mark.accelerator
def test_needs_a_gpu():
  pytest.skip("no GPU here")
"""

MODULE_SKIP = """
import pytest

pytest.importorskip("a_package_that_is_not_installed")

def test_never_collected():
  pass
"""


def _run(pytester, monkeypatch, ci: bool, **files):
  pytester.makepyfile(**files)
  pytester.makeini("[pytest]\nmarkers =\n  accelerator: needs a GPU or TPU\n")
  monkeypatch.setenv("PYTHONPATH", os.path.dirname(__file__))
  if ci:
    monkeypatch.setenv("CI", "true")
  else:
    monkeypatch.delenv("CI", raising=False)
  return pytester.runpytest_subprocess("-p", "strict_skips", "-p", "no:xdist", "-rA")


def test_a_skip_fails_under_ci_but_an_accelerator_skip_is_listed(pytester, monkeypatch):
  result = _run(pytester, monkeypatch, ci=True, test_sample=SAMPLE)
  result.assert_outcomes(passed=1, failed=1, skipped=1)
  out = result.stdout.str()
  assert "test_skips skipped under CI" in out and "a dependency is missing" in out
  assert "accelerator tests skipped (need a GPU or TPU)" in out
  assert "test_sample.py::test_needs_a_gpu" in out


def test_a_module_skipped_at_collection_fails_under_ci(pytester, monkeypatch):
  result = _run(pytester, monkeypatch, ci=True, test_module=MODULE_SKIP)
  assert result.ret != 0
  assert "skipped under CI" in result.stdout.str()


def test_skips_stay_skips_outside_ci(pytester, monkeypatch):
  result = _run(pytester, monkeypatch, ci=False, test_sample=SAMPLE)
  result.assert_outcomes(passed=1, skipped=2)
