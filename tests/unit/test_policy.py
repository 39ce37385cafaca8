"""The operator's reach: the allow-lists' matching (ulmfit_operator.policy) and StoreReader, which
keeps a bounded number of S3 clients and opens none for an endpoint the settings do not allow.

reconcile's decisions about a job outside the lists are in test_reconcile.py; the chart's
admission policy on a real API server in tests/integration/test_operator_policy.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from ulmfit_operator.metrics import OperatorMetrics
from ulmfit_operator.policy import (
    JobPolicy,
    S3Endpoint,
    check_image_pattern,
    image_pattern_kind,
    image_pattern_regex,
)
from ulmfit_operator.runtime.stores import EndpointNotAllowed, StoreReader
from ulmfit_trainer.config import S3Settings
from ulmfit_trainer.store import LocalStore

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def metrics() -> OperatorMetrics:
    return OperatorMetrics()


class Opener:
    """Stands in for open_store: counts the clients made (no network), each a local store."""

    def __init__(self, root: Any):
        self.root = root
        self.opened: list[str] = []

    def __call__(self, uri: str, s3: S3Settings) -> LocalStore:
        self.opened.append(s3.endpoint)
        return LocalStore(self.root)


def s3(endpoint: str) -> S3Settings:
    return S3Settings(endpoint=endpoint, bucket="ulmfit-test")


def test_the_client_cache_is_bounded_and_keeps_the_most_recently_used(
    metrics: OperatorMetrics, tmp_path: Any
) -> None:
    opener = Opener(tmp_path)
    reader = StoreReader(metrics, cache_size=3, opener=opener)
    for port in range(9000, 9010):
        assert reader.final(s3(f"minio:{port}"), "team/job", "finetune") is None
    assert len(reader._stores) == 3 and len(opener.opened) == 10
    # The most recently used stay; using one again keeps it over older ones.
    reader.progress(s3("minio:9007"), "team/job", "finetune")
    reader.progress(s3("minio:9000"), "team/job", "finetune")  # evicted long ago: opened again
    assert opener.opened[-1] == "minio:9000" and len(opener.opened) == 11
    assert [k.endpoint for k in reader._stores] == ["minio:9009", "minio:9007", "minio:9000"]
    reader.progress(s3("minio:9009"), "team/job", "finetune")
    assert len(opener.opened) == 11  # still cached


def test_the_default_cache_is_a_few_clients(metrics: OperatorMetrics, tmp_path: Any) -> None:
    opener = Opener(tmp_path)
    reader = StoreReader(metrics, opener=opener)
    for port in range(1000, 1100):
        reader.final(s3(f"minio:{port}"), "team/job", "finetune")
    assert len(reader._stores) == StoreReader.CACHE_SIZE <= 16


def test_no_client_is_made_for_an_endpoint_not_allowed(
    metrics: OperatorMetrics, tmp_path: Any
) -> None:
    opener = Opener(tmp_path)
    policy = JobPolicy.allowing(["http://minio:9000"], ["*"])
    reader = StoreReader(metrics, policy, opener=opener)
    with pytest.raises(EndpointNotAllowed, match=r"169\.254\.169\.254"):
        reader.final(s3("http://169.254.169.254"), "team/job", "finetune")
    with pytest.raises(EndpointNotAllowed):
        reader.progress(s3("https://minio:9000"), "team/job", "finetune")
    assert opener.opened == [] and not reader._stores
    reader.final(s3("MINIO:9000"), "team/job", "finetune")
    assert opener.opened == ["MINIO:9000"]


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("minio:9000", S3Endpoint(None, "minio", 9000)),
        ("HTTPS://S3.Example.com", S3Endpoint("https", "s3.example.com", None)),
        ("http://[::1]:9000/", S3Endpoint("http", "::1", 9000)),
    ],
)
def test_endpoints_parse_to_scheme_host_and_port(text: str, parsed: S3Endpoint) -> None:
    assert S3Endpoint.parse(text) == parsed
    assert S3Endpoint.parse(str(parsed)) == parsed


@pytest.mark.parametrize(
    "text", ["ftp://minio", "http://minio:9000/bucket", "http://u:p@minio", "minio:x", "", "?a"]
)
def test_endpoints_that_are_not_host_and_port_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        S3Endpoint.parse(text)


@pytest.mark.parametrize(
    ("pattern", "kind"),
    [
        ("ghcr.io/ulmfit-operator/trainer", "repository"),
        ("localhost:5000/trainer", "repository"),
        ("localhost:5000/trainer:dev", "exact"),
        ("ghcr.io/x/trainer@sha256:" + "0" * 64, "exact"),
        ("registry.example.com/ml/*", "prefix"),
        ("*", "prefix"),
    ],
)
def test_image_pattern_kinds(pattern: str, kind: str) -> None:
    assert image_pattern_kind(check_image_pattern(pattern)) == kind


@pytest.mark.parametrize("pattern", ["", "a b", "a,b", "a*b", "**", 'a"', "a\\b", "a'"])
def test_image_patterns_that_cannot_be_matched_alike_are_refused(pattern: str) -> None:
    with pytest.raises(ValueError):
        check_image_pattern(pattern)


def test_image_regexes_match_the_literal_pattern_only() -> None:
    # A dot in the pattern is a dot, not any character.
    regex = image_pattern_regex("ghcr.io/x")
    assert regex.startswith("ghcr\\.io/x")
    assert not JobPolicy(trainer_images=("ghcr.io/x",)).image_allowed("ghcrXio/x")
    assert not JobPolicy(trainer_images=("a/x:1",)).image_allowed("a/x:1\n")
