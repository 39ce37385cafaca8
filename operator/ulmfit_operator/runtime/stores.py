"""`StoreReader`: the store facts reconcile asks for, read with the operator's own S3 keys.

A job's spec names its bucket; the keys are the operator's (from its environment, not the job's
Secret), and a read never sits in long retries: the next resync tries again. One client per
distinct S3 setting, kept for the life of the process.
"""

from __future__ import annotations

import threading

from ulmfit_trainer.config import S3Settings
from ulmfit_trainer.records import StageProgress
from ulmfit_trainer.store import CheckpointStore, Store, open_store

from ulmfit_operator.metrics import OperatorMetrics
from ulmfit_operator.reconcile import FinalCheckpoint, final_checkpoint


class StoreReader:
    """Reads final checkpoints and progress with the operator's own S3 credentials."""

    ACCESS_KEY_ENV = "AWS_ACCESS_KEY_ID"
    SECRET_KEY_ENV = "AWS_SECRET_ACCESS_KEY"
    SESSION_TOKEN_ENV = "AWS_SESSION_TOKEN"

    def __init__(self, metrics: OperatorMetrics):
        self.metrics = metrics
        self._lock = threading.Lock()
        self._stores: dict[S3Settings, Store] = {}

    def _store(self, s3: S3Settings) -> Store:
        # The job names the bucket; the credentials are the operator's (from its environment),
        # and a reconcile should not sit in long retries: the next resync tries again.
        tuned = s3.model_copy(
            update={
                "access_key_env": self.ACCESS_KEY_ENV,
                "secret_key_env": self.SECRET_KEY_ENV,
                "session_token_env": self.SESSION_TOKEN_ENV,
                "create_bucket": False,
                "max_attempts": 2,
                "retry_base_delay": 0.2,
                "retry_max_delay": 1.0,
                "timeout_seconds": 10.0,
            }
        )
        with self._lock:
            store = self._stores.get(tuned)
            if store is None:
                store = open_store(tuned.root, tuned)
                self._stores[tuned] = store
            return store

    def final(self, s3: S3Settings, run: str, stage: str) -> FinalCheckpoint | None:
        self.metrics.store_reads.labels("checkpoint").inc()
        final = CheckpointStore(self._store(s3), run).final(stage)
        if final is None:
            return None
        return final_checkpoint(final.uri, final.created_at, final.meta)

    def progress(self, s3: S3Settings, run: str, stage: str) -> StageProgress | None:
        self.metrics.store_reads.labels("progress").inc()
        return CheckpointStore(self._store(s3), run).read_progress(stage)
