"""Free loopback ports and a polling wait, shared by the real-parts fixtures."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` (loopback by default) that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class WaitAborted(Exception):
    """Raised by a ``wait_for`` predicate to stop waiting at once (e.g. the server exited)."""


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Call ``predicate`` until it returns something truthy; return that value.

    Exceptions from ``predicate`` count as "not yet", except ``WaitAborted``, which propagates.
    After ``timeout`` seconds raise ``TimeoutError`` naming ``what`` and the last exception seen.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = predicate()
        except WaitAborted:
            raise
        except Exception as exc:  # a server that is still starting refuses or resets
            last_error = exc
        else:
            if result:
                return result
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error is not None else ""
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)
