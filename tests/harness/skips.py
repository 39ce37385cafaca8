"""Under ``CI=true`` a skip is a failure, unless the test says why it may skip.

CI must have every part installed, so a test that skips there has not tested what it promises.
A skip (in the test, in a fixture, or of a whole module at collection) fails the run unless the
test is marked ``@pytest.mark.may_skip(reason="...")``, and that reason is required. Locally,
skips stay skips: a developer without a part sees one line saying how to get it.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

from tests.harness.parts import in_ci

MARKER = "may_skip"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(reason): this test may skip under CI=true (every other skip fails CI)",
    )


def _allowed(item: pytest.Item) -> bool:
    marker = item.get_closest_marker(MARKER)
    if marker is None:
        return False
    reason = marker.kwargs.get("reason") or (marker.args[0] if marker.args else "")
    if not str(reason).strip():
        raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.{MARKER} needs a reason")
    return True


def _skip_reason(longrepr: Any) -> str:
    # A skip's longrepr is (path, line, "Skipped: why").
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not (in_ci() and report.skipped) or hasattr(report, "wasxfail") or _allowed(item):
        return
    report.outcome = "failed"
    report.longrepr = (
        f"skipped under CI=true ({_skip_reason(report.longrepr)}); CI has every part, so a skip "
        f"is a test that did not run. Mark it @pytest.mark.{MARKER}(reason=...) only if it may."
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.CollectReport = outcome.get_result()
    if in_ci() and report.skipped:
        report.outcome = "failed"
        report.longrepr = (
            f"{collector.nodeid} skipped at collection under CI=true "
            f"({_skip_reason(report.longrepr)}): a missing part fails CI."
        )
