"""The operator's store reader: its own credentials, short retries, a pool for every worker."""

from __future__ import annotations

from typing import Any

import pytest
from ulmfit_operator.metrics import OperatorMetrics
from ulmfit_operator.runtime.stores import StoreReader
from ulmfit_trainer.config import S3Settings

pytestmark = pytest.mark.timeout(30)


def test_operator_store_client_has_a_connection_for_every_worker() -> None:
    opened: list[S3Settings] = []

    def opener(root: str, settings: S3Settings) -> Any:
        opened.append(settings)
        return object()

    reader = StoreReader(OperatorMetrics(), opener=opener)
    s3 = S3Settings(endpoint="http://minio:9000", bucket="ulmfit")
    first = reader._store(s3)
    assert reader._store(s3) is first  # one client per store, shared
    [settings] = opened
    assert settings.parallel_files * settings.parallel_uploads + 4 >= 16 + 4
    assert (settings.access_key_env, settings.max_attempts) == ("AWS_ACCESS_KEY_ID", 2)
    assert settings.bucket == "ulmfit" and not settings.create_bucket
