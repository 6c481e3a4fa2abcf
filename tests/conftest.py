"""Shared fixtures: a real nats-server with JetStream on a free loopback port, one per test,
stopped afterwards. No NATS mocks anywhere."""

from __future__ import annotations

import pytest

from agent_dpo_adapters.nats_server import EmbeddedNats


@pytest.fixture
def nats_server(tmp_path):
    server = EmbeddedNats(store_dir=tmp_path / "nats").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_url(nats_server) -> str:
    return nats_server.url
