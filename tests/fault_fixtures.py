"""Helpers for the fault, soak and security tests: a simulated world published to a real nats-server,
a reference ingest, every agent's exports as bytes (the yardstick: a faulted run must export exactly
what an uninterrupted one does), `agent-dpo` subprocesses to SIGKILL, and a 3-node NATS cluster on
loopback (JetStream, R3) whose nodes can be killed and restarted."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Self

import nats.errors
import nats.js.errors

from agent_dpo.config import BusConfig
from agent_dpo.errors import AgentDpoError
from agent_dpo.events import subject_for
from agent_dpo.export import FORMATS, export_dataset
from agent_dpo.world.simulator import simulate
from agent_dpo_adapters.nats_bus import connect
from agent_dpo_adapters.nats_server import EmbeddedNats, free_port
from agent_dpo_adapters.sqlite_store import STORE_FILE, SqliteStore

sys.path.insert(0, str(Path(__file__).parent))
from ingest_fixtures import FAST_BUS, encode, ingest_once, init_bus

# The subprocess reads its bus settings from the environment: short timers so a crash is redelivered fast.
FAST_ENV = {"AGENT_DPO_BUS_ACK_WAIT_S": "3", "AGENT_DPO_BUS_BACKOFF_S": "3", "AGENT_DPO_BUS_STORE_RETRY_S": "1",
            "AGENT_DPO_BUS_NAK_DELAY_S": "0.2", "AGENT_DPO_BUS_FETCH_TIMEOUT_S": "0.3"}


def world(n_calls: int, seed: int = 7) -> list[dict[str, Any]]:
    """The simulator's envelopes in arrival order (late events, re-sent duplicates, both agents)."""
    return list(simulate(n_calls, seed))


def agents_of(envs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return sorted({(e["tenant_id"], e["agent_id"]) for e in envs})


async def publish_envs(url: str, envs: list[dict[str, Any]], *, window: int = 256,
                       msg_id: Callable[[dict[str, Any]], str] = lambda e: e["event_id"]) -> None:
    """Publish with Nats-Msg-Id (the event id, as the contract says), each acknowledged by JetStream,
    `window` in flight at a time."""
    nc = await connect(url)
    try:
        js = nc.jetstream()

        async def one(env: dict[str, Any]) -> None:
            subject = subject_for(env["tenant_id"], env["agent_id"], env["type"])
            deadline = time.monotonic() + 30
            while True:
                try:
                    await js.publish(subject, encode(env), headers={"Nats-Msg-Id": msg_id(env)}, timeout=5)
                    return
                except nats.js.errors.APIError as exc:
                    # A clustered stream answers 409 while a re-sent copy's first publish is in process.
                    if exc.err_code != 10158 or time.monotonic() > deadline:
                        raise
                except (nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError,
                        nats.errors.TimeoutError):
                    # A node was lost and the stream is electing a leader: retry, as a runtime would.
                    if time.monotonic() > deadline:
                        raise
                await asyncio.sleep(0.1)

        for start in range(0, len(envs), window):
            await asyncio.gather(*(one(e) for e in envs[start:start + window]))
    finally:
        await nc.close()


async def init_bus_patiently(url: str, bus: BusConfig, timeout: float = 60.0) -> None:
    """`ensure_bus`, retried while a cluster elects leaders (JetStream answers nothing meanwhile)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await init_bus(url, bus)
        except AgentDpoError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


def export_all(store_dir: Path, out_dir: Path, agents: list[tuple[str, str]]) -> dict[str, bytes]:
    """Every agent's dataset in every format (all splits) as the bytes written: what a user trains on."""
    out: dict[str, bytes] = {}
    with SqliteStore(store_dir) as store:
        for tenant, agent in agents:
            for fmt in FORMATS:
                path = out_dir / f"{tenant}.{agent}.{fmt}.jsonl"
                export_dataset(store, tenant, agent, fmt, path, split="all")
                out[f"{tenant}/{agent}/{fmt}"] = path.read_bytes()
    return out


async def reference_exports(url: str, tmp: Path, agents: list[tuple[str, str]],
                            bus: BusConfig = FAST_BUS) -> dict[str, bytes]:
    """An uninterrupted ingest of what is on the stream (by its own durable consumer), exported."""
    ref = replace(bus, consumer="reference")
    await init_bus_patiently(url, ref)
    await ingest_once(url, tmp / "reference", ref)
    return export_all(tmp / "reference", tmp / "reference-out", agents)


def assert_same_exports(got: dict[str, bytes], want: dict[str, bytes]) -> None:
    assert sorted(got) == sorted(want)
    differ = [k for k in want if got[k] != want[k]]
    assert not differ, f"exports differ from the uninterrupted run: {differ}"
    assert all(want[k] for k in want if not k.endswith("trl-kto")), "reference exports should not be empty"


def cli(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    """`agent-dpo <args>` as its own process (so it can be SIGKILLed), JSON logs on stderr."""
    return subprocess.Popen([sys.executable, "-m", "agent_dpo.cli", "--log-format", "json", *args],
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """Wait for a process to exit by itself; SIGKILL it if it does not within `timeout`."""
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            sigkill(proc)


def sigkill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate()


@contextlib.contextmanager
def locked_store(store_dir: Path) -> Iterator[None]:
    """Another process's write lock on the store's SQLite file while inside: ingest's writes stall."""
    db = sqlite3.connect(Path(store_dir) / STORE_FILE, isolation_level=None, timeout=30)
    try:
        db.execute("BEGIN IMMEDIATE")
        yield
        db.execute("ROLLBACK")
    finally:
        db.close()


def rss_kib(pid: int) -> int:
    """Resident set size of a live process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@dataclass
class NatsCluster:
    """Three nats-servers on loopback routed into one JetStream cluster, each with its own store dir
    and server name, so a stream at R3 survives losing any one of them."""

    root: Path
    size: int = 3
    name: str = "agentdpo-test"
    nodes: list[EmbeddedNats] = field(default_factory=list)

    def __post_init__(self) -> None:
        cluster_ports = [free_port() for _ in range(self.size)]
        routes = ",".join(f"nats://127.0.0.1:{p}" for p in cluster_ports)
        for i, cport in enumerate(cluster_ports):
            self.nodes.append(EmbeddedNats(
                store_dir=self.root / f"n{i}", port=free_port(),
                extra_args=["--server_name", f"n{i}", "--cluster_name", self.name,
                            "--cluster", f"nats://127.0.0.1:{cport}", "--routes", routes]))

    @property
    def url(self) -> str:
        """All members, comma-separated, as `connect` and `--nats-url` take them."""
        return ",".join(n.url for n in self.nodes)

    async def start(self, timeout: float = 60.0) -> NatsCluster:
        for node in self.nodes:
            node.start()
        await self.wait_ready(timeout)
        return self

    async def wait_ready(self, timeout: float = 60.0) -> None:
        """Until JetStream has a meta leader and answers through every live node."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                for node in self.nodes:
                    if node.process is None or node.process.poll() is not None:
                        continue
                    nc = await connect(node.url)
                    try:
                        await nc.jetstream().account_info()
                    finally:
                        await nc.close()
                return
            except Exception as exc:  # noqa: BLE001 - not ready yet: no meta leader
                last = exc
                await asyncio.sleep(0.3)
        raise RuntimeError(f"cluster not ready within {timeout}s: {last}")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    async def __aenter__(self) -> Self:
        try:
            return await self.start()
        except BaseException:
            self.stop()
            raise

    async def __aexit__(self, *exc: object) -> None:
        self.stop()
