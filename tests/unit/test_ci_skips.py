"""Under CI=true a skip fails the run (tests/harness/skips.py), unless the test may skip."""

from __future__ import annotations

import pytest

INNER = """
import pytest

def test_skips():
    pytest.skip("no gpu here")

@pytest.mark.may_skip(reason="an optional extra")
def test_may_skip():
    pytest.skip("optional")

def test_passes():
    pass
"""

MODULE_SKIP = """
import pytest

pytest.skip("torch is missing", allow_module_level=True)

def test_never_collected():
    pass
"""


def run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: bool, source: str):
    monkeypatch.setenv("CI", "true" if ci else "")
    pytester.makepyfile(test_inner=source)
    return pytester.runpytest("-p", "tests.harness.skips", "-p", "no:cacheprovider")


def test_a_skip_fails_under_ci_unless_the_test_may_skip(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = run(pytester, monkeypatch, True, INNER)
    result.assert_outcomes(passed=1, skipped=1, failed=1)
    result.stdout.fnmatch_lines(["*test_skips*skipped under CI=true (Skipped: no gpu here)*"])


def test_skips_stay_skips_outside_ci(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    run(pytester, monkeypatch, False, INNER).assert_outcomes(passed=1, skipped=2)


def test_a_module_skipped_at_collection_fails_under_ci(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    run(pytester, monkeypatch, True, MODULE_SKIP).assert_outcomes(errors=1)
    run(pytester, monkeypatch, False, MODULE_SKIP).assert_outcomes(skipped=1)


def test_may_skip_needs_a_reason(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = "import pytest\n\n@pytest.mark.may_skip\ndef test_x():\n    pytest.skip('x')\n"
    result = run(pytester, monkeypatch, True, source)
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*may_skip needs a reason*"])
