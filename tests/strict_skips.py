"""A pytest plugin: with the CI environment variable set, a skipped test (or a module skipped at
collection) fails the run, unless it is marked `accelerator`; those are listed in the summary."""

import os

import pytest

# a skip in CI means a dependency, a data file or a feature area silently went missing
STRICT_SKIPS = bool(os.environ.get("CI"))


def _fail_skip(report, what: str):
  reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
  report.outcome = "failed"
  report.longrepr = (f"{what} skipped under CI ({reason}); in CI only tests marked "
                     "`accelerator` may skip: install the test extra and keep ../shared beside "
                     "the repo")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  outcome = yield
  report = outcome.get_result()
  if STRICT_SKIPS and report.skipped and not hasattr(report, "wasxfail"):
    if item.get_closest_marker("accelerator") is None:
      _fail_skip(report, item.nodeid)
    else:
      report.user_properties.append(("accelerator_skip", item.nodeid))


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
  outcome = yield
  report = outcome.get_result()
  if STRICT_SKIPS and report.skipped:  # a module-level importorskip or skip
    _fail_skip(report, collector.nodeid)


def pytest_terminal_summary(terminalreporter):
  """Lists the accelerator tests that skipped (they need a GPU or TPU this machine lacks)."""
  skipped = [r.nodeid for r in terminalreporter.stats.get("skipped", [])
             if r.when in ("setup", "call") and ("accelerator_skip", r.nodeid) in
             getattr(r, "user_properties", [])]
  if skipped:
    terminalreporter.section("accelerator tests skipped (need a GPU or TPU)")
    for nodeid in skipped:
      terminalreporter.line(nodeid)
