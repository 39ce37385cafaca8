"""`StoreReader`: the store facts reconcile asks for, read with the operator's own S3 keys.

A job's spec names its bucket; the keys are the operator's (from its environment, not the job's
Secret), and a read never sits in long retries: the next resync tries again. The endpoints it
may contact are the operator's `--allowed-s3-endpoints`: reconcile refuses a job naming another
before it asks for a store fact, and the reader refuses too (`EndpointNotAllowed`) should one
ever reach it. It keeps a client per distinct S3 setting, the `cache_size` used last (an LRU), so
jobs naming ever new settings cannot grow it without bound.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

from ulmfit_trainer.config import S3Settings
from ulmfit_trainer.errors import PermanentError
from ulmfit_trainer.records import StageProgress
from ulmfit_trainer.store import CheckpointStore, Store, open_store

from ulmfit_operator.metrics import OperatorMetrics
from ulmfit_operator.policy import UNBOUNDED, JobPolicy
from ulmfit_operator.reconcile import FinalCheckpoint, final_checkpoint


class EndpointNotAllowed(PermanentError):
    """A store read for an S3 endpoint the operator's settings do not allow (nothing sent)."""


class StoreReader:
    """Reads final checkpoints and progress with the operator's own S3 credentials."""

    ACCESS_KEY_ENV = "AWS_ACCESS_KEY_ID"
    SECRET_KEY_ENV = "AWS_SECRET_ACCESS_KEY"
    SESSION_TOKEN_ENV = "AWS_SESSION_TOKEN"
    CACHE_SIZE = 8
    """Clients kept: a cluster's jobs usually share one or two stores."""
    CONNECTIONS = 36
    """Kept-alive connections of each store's client: the reconcile workers (16 by default)
    share it, and a request finding the pool full opens a connection it then drops."""

    def __init__(
        self,
        metrics: OperatorMetrics,
        policy: JobPolicy = UNBOUNDED,
        cache_size: int = CACHE_SIZE,
        opener: Callable[[str, S3Settings], Store] = open_store,
    ):
        self.metrics = metrics
        self.policy = policy
        self.cache_size = max(1, cache_size)
        self._open = opener
        """Makes a store's client (without I/O): `open_store`, or a test's stand-in."""
        self._lock = threading.Lock()
        self._stores: OrderedDict[S3Settings, Store] = OrderedDict()

    def _store(self, s3: S3Settings) -> Store:
        if not self.policy.s3_allowed(s3):
            raise EndpointNotAllowed(
                f"S3 endpoint {s3.endpoint!r} is not among the operator's --allowed-s3-endpoints"
            )
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
                # The operator never uploads: the transfer settings only size the client's
                # connection pool (files x uploads + 4).
                "parallel_files": 1,
                "parallel_uploads": self.CONNECTIONS - 4,
            }
        )
        with self._lock:
            store = self._stores.get(tuned)
            if store is not None:
                self._stores.move_to_end(tuned)
                return store
            store = self._open(tuned.root, tuned)
            self._stores[tuned] = store
            while len(self._stores) > self.cache_size:
                self._stores.popitem(last=False)
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
