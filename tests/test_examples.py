"""The integration snippets in examples/ run as a platform engineer would run them, against a real
nats-server: the agent loop and the OpenAI client through a gateway serving a real tiny model, the
router inside a runtime following a promote, and the auth config's users against nats-server."""

# ruff: noqa: F811  (fixtures come from tests/tiny_model.py, imported after the sys.path line)
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import nats
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny_model import smollm2_store, tiny_model_dir  # noqa: F401  (pytest fixtures)

from agent_dpo.config import BusConfig
from agent_dpo.registry import VersionManifest, promote
from agent_dpo.router import Router
from agent_dpo_adapters.gateway import start_gateway
from agent_dpo_adapters.local_serving import LocalPeftBackend
from agent_dpo_adapters.nats_bus import Ingestor, ensure_bus
from agent_dpo_adapters.nats_registry import NatsRegistry
from agent_dpo_adapters.nats_server import free_port, nats_server_binary, port_open
from agent_dpo_adapters.sqlite_store import SqliteStore

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TENANT, AGENT = "acme-salons", "salon-rebook"
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_DPO_")}


async def run_example(name: str, *args: str, env: dict | None = None, timeout: float = 120) -> tuple[int, str, str]:
    """Run an example without blocking this loop (the gateway under test lives in it)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, str(EXAMPLES / name), *args,
                                                env={**CLEAN_ENV, **(env or {})}, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
async def gateway(nats_url, tiny_model_dir, tmp_path):
    """What `agent-dpo serve` offers runtimes: a router on the registry and the gateway over a local
    backend serving the tiny model (no version yet: the base answers)."""
    nc = await nats.connect(nats_url)
    await ensure_bus(nc.jetstream(), BusConfig())
    backend = LocalPeftBackend.from_store(str(tiny_model_dir), tmp_path, js=nc.jetstream(), max_new_tokens=8)
    router = Router(await NatsRegistry.open(nc), backend, base_model=str(tiny_model_dir))
    await router.start()
    gw = await start_gateway(router, backend, port=0)
    yield gw.base_url, nc
    await gw.close()
    await router.stop()
    await nc.close()


async def test_agent_loop_publishes_a_whole_call_answered_through_the_gateway(gateway, nats_url, tmp_path):
    url, nc = gateway
    code, out, err = await run_example("agent_loop.py", "--nats-url", nats_url, "--gateway", url,
                                       "--max-tokens", "8")
    assert code == 0, err[-2000:]
    call_id = out.split()[1].rstrip(":")
    assert "served by base" in out
    store = SqliteStore(tmp_path / "store")
    try:
        await Ingestor(nc, store, BusConfig()).run(until_idle=0.5)
        call = store.call(TENANT, AGENT, call_id)
    finally:
        store.close()
    assert call is not None and call.complete and call.ended is not None
    assert call.started.model.name and call.served_version is None  # stamped from the pin
    assert [t.role for t in call.ordered_turns()][:2] == ["user", "assistant"]
    assert call.feedback_of("csat")


async def test_gateway_client_keeps_one_version_for_the_whole_call(gateway):
    url, _ = gateway
    code, out, err = await run_example("gateway_client.py", "--gateway", url, "--max-tokens", "8")
    assert code == 0, err[-2000:]
    assert out.strip().splitlines()[-1] == "one call, 2 requests, 1 version(s): base"


async def test_router_in_runtime_follows_a_promote(nats_url):
    nc = await nats.connect(nats_url)
    try:
        await ensure_bus(nc.jetstream(), BusConfig())
        code, out, err = await run_example("router_in_runtime.py", "--nats-url", nats_url, "--calls", "3")
        assert code == 0, err[-2000:]
        assert out.strip() == "3 calls published; served by base (base): 3"
        registry = await NatsRegistry.open(nc)
        await registry.put_manifest(VersionManifest(tenant_id=TENANT, agent_id=AGENT, version="v1",
                                                    base_model="smollm2-135m-instruct"))
        await registry.change_rollout(TENANT, AGENT, lambda d: promote(d, "test", version="v1"))
        code, out, err = await run_example("router_in_runtime.py", "--nats-url", nats_url, "--calls", "4")
        assert code == 0, err[-2000:]
        assert out.strip() == "4 calls published; served by v1 (champion): 4"
        events = (await nc.jetstream().stream_info("AGENT_EVENTS")).state.messages
        assert events == 7 * 4
    finally:
        await nc.close()


def test_examples_without_a_server_say_so_in_one_line():
    for name, args in (("agent_loop.py", ["--nats-url", "nats://127.0.0.1:1", "--gateway", "http://127.0.0.1:1/v1"]),
                       ("gateway_client.py", ["--gateway", "http://127.0.0.1:1/v1"]),
                       ("router_in_runtime.py", ["--nats-url", "nats://127.0.0.1:1"])):
        proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], env=CLEAN_ENV, capture_output=True,
                              text=True, timeout=60, check=False)
        assert proc.returncode == 1, (name, proc.stderr[-1000:])
        assert proc.stderr.strip().splitlines()[-1].startswith(name.removesuffix(".py") + ":"), proc.stderr
        assert "Traceback" not in proc.stderr


@pytest.fixture
def auth_server(tmp_path, monkeypatch):
    """nats-server with examples/nats-auth.conf (its store_dir pointed at tmp), passwords from the env."""
    monkeypatch.setenv("AGENT_DPO_SERVICE_PASSWORD", "svc-secret")
    monkeypatch.setenv("AGENT_DPO_RUNTIME_PASSWORD", "rt-secret")
    conf = tmp_path / "nats-auth.conf"
    conf.write_text((EXAMPLES / "nats-auth.conf").read_text().replace("/var/lib/nats", str(tmp_path / "js")))
    port = free_port()
    proc = subprocess.Popen([nats_server_binary(), "-c", str(conf), "-a", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not port_open("127.0.0.1", port):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-1000:]
        time.sleep(0.05)
    yield port
    proc.terminate()
    proc.wait(timeout=10)


def test_nats_auth_config_users_work_with_agent_dpo_and_a_runtime(auth_server):
    url = f"nats://127.0.0.1:{auth_server}"

    def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "agent_dpo.cli", *args], env={**CLEAN_ENV, **env},
                              capture_output=True, text=True, timeout=120, check=False)

    ok = cli("bus", "init", "--nats-url", url, AGENT_DPO_NATS_USER="agent-dpo",
             AGENT_DPO_NATS_PASSWORD="svc-secret")
    assert ok.returncode == 0, ok.stderr[-2000:]
    bad = cli("bus", "init", "--nats-url", url, AGENT_DPO_NATS_USER="agent-dpo", AGENT_DPO_NATS_PASSWORD="wrong")
    assert bad.returncode == 1 and "Authorization Violation" in bad.stderr and "wrong" not in bad.stderr
    # The runtime user publishes events and follows the registry, with no admin rights.
    runtime = subprocess.run([sys.executable, str(EXAMPLES / "router_in_runtime.py"), "--nats-url",
                              f"nats://runtime:rt-secret@127.0.0.1:{auth_server}", "--calls", "2"],
                             env=CLEAN_ENV, capture_output=True, text=True, timeout=120, check=False)
    assert runtime.returncode == 0, runtime.stderr[-2000:]
    assert "permissions violation" not in runtime.stderr
    assert runtime.stdout.strip() == "2 calls published; served by base (base): 2"
    denied = cli("bus", "init", "--nats-url", f"nats://runtime:rt-secret@127.0.0.1:{auth_server}")
    assert denied.returncode != 0  # a runtime cannot change streams


def test_gpu_worker_and_auth_docs_name_real_flags():
    text = (EXAMPLES / "gpu_worker.md").read_text()
    assert "--launcher" in text and "accelerate launch" in text
    help_text = subprocess.run([sys.executable, "-m", "agent_dpo.cli", "worker", "--help"], capture_output=True,
                               text=True, timeout=60, check=True).stdout
    for flag in ("--launcher", "--max-jobs", "--name", "--store", "--nats-url"):
        assert flag in help_text
    auth = (EXAMPLES / "nats_auth.md").read_text()
    from agent_dpo.config import NatsAuth

    for field in NatsAuth.__dataclass_fields__:
        assert f"AGENT_DPO_NATS_{field.upper()}" in auth, field
