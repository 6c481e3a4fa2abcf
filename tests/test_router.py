"""The router on a real nats-server: hundreds of calls in flight while promote and rollback happen;
no call ever changes model mid-call, every call started after a change is live gets the new
assignment, versions unload only when nothing holds them, and a killed router process or a
restarted NATS server resumes from the KV state."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import nats
import pytest

from agent_dpo.registry import ModelRef, advance_canary, call_bucket, promote, rollback, start_canary
from agent_dpo.router import Router, stamp_call_started
from agent_dpo_adapters.nats_registry import NatsRegistry

sys.path.insert(0, str(Path(__file__).parent))
from serving_fixtures import EchoBackend, manifest


@pytest.fixture
async def registry(nats_url):
    nc = await nats.connect(nats_url)
    reg = await NatsRegistry.open(nc)
    for v in ("v1", "v2", "v3"):
        await reg.put_manifest(manifest(v))
    yield reg
    await nc.close()


async def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


def expected_version(doc, tenant: str, agent: str, call_id: str) -> str | None:
    if doc.state == "canary" and doc.challenger and call_bucket(tenant, agent, call_id) < doc.canary_weight:
        return doc.challenger
    return doc.champion


def test_unknown_agent_gets_the_base_model_without_any_network():
    router = Router(registry=None, base_model="smollm2-135m-instruct")
    ref = router.resolve("acme", "rebook", "call-1")
    assert ref.version is None and ref.serve_name == "smollm2-135m-instruct" and ref.arm == "base"
    assert router.resolve("acme", "rebook", "call-1") is ref
    router.release("call-1")
    assert router.pinned("acme", "rebook", "call-1") is None


def test_stamp_call_started_sets_the_served_version():
    ref = ModelRef("acme", "rebook", "v2", "local", "rebook--v2", "smollm2-135m-instruct", "challenger")
    data = {"system_prompt": "hi", "tools": [], "model": {"name": "x"}, "channel": "voice"}
    stamped = stamp_call_started(data, ref)
    assert stamped["model"] == {"name": "rebook--v2", "version": "v2"}
    assert data["model"] == {"name": "x"}  # the caller's dict is untouched


async def test_calls_never_switch_mid_call_while_promote_and_rollback_happen(registry, nats_url):
    routers = [await Router.connect(nats_url, backend=EchoBackend()) for _ in range(2)]
    docs = []
    rev_seen = [0, 0]
    for i, r in enumerate(routers):
        r.add_listener(lambda t, a, rev, doc, i=i: rev_seen.__setitem__(i, rev))

    switches = 0
    started_after_change_wrong = 0
    finished = 0
    stop = asyncio.Event()

    async def call(n: int, router: Router) -> None:
        nonlocal switches, finished
        call_id = f"call-{n}"
        first = router.resolve("acme", "rebook", call_id)
        # A call lives through several turns; each turn re-resolves, as a runtime would.
        for _ in range(random.randint(3, 8)):
            await asyncio.sleep(random.uniform(0.002, 0.02))
            if router.resolve("acme", "rebook", call_id) != first:
                switches += 1
        router.release(call_id, "acme", "rebook")
        finished += 1

    async def traffic() -> None:
        n = 0
        tasks = set()
        while not stop.is_set():
            for _ in range(20):
                n += 1
                t = asyncio.create_task(call(n, routers[n % 2]))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            await asyncio.sleep(0.005)
        await asyncio.gather(*tasks)

    traffic_task = asyncio.create_task(traffic())
    changes = [
        lambda d: promote(d, "test", version="v1"),
        lambda d: start_canary(d, "v2", 0.25, "test"),
        lambda d: advance_canary(d, 1, 0.5, "test", "step"),
        lambda d: promote(d, "test"),
        lambda d: start_canary(d, "v3", 0.05, "test"),
        lambda d: rollback(d, "test", "bad csat"),
        lambda d: rollback(d, "test", "back to v1"),
    ]
    in_flight_peak = 0
    for k, change in enumerate(changes):
        await asyncio.sleep(0.08)
        in_flight_peak = max(in_flight_peak, sum(len(r._pins) for r in routers))
        doc = await registry.change_rollout("acme", "rebook", change)
        _, rev = await registry.get_rollout("acme", "rebook")
        docs.append(doc)
        await wait_for(lambda rev=rev: min(rev_seen) >= rev)
        # Every call started now, on either router, gets the new document's assignment.
        for j in range(100):
            cid = f"after-{k}-{j}"
            for r in routers:
                got = r.resolve("acme", "rebook", cid).version
                if got != expected_version(doc, "acme", "rebook", cid):
                    started_after_change_wrong += 1
                r.release(cid, "acme", "rebook")
    stop.set()
    await traffic_task
    assert in_flight_peak >= 100, in_flight_peak
    assert finished > 500
    assert switches == 0
    assert started_after_change_wrong == 0
    assert docs[-1].champion == "v1"
    for r in routers:
        await r.stop()


async def test_versions_unload_only_when_no_alias_and_no_call_holds_them(registry, nats_url):
    backend = EchoBackend()
    router = await Router.connect(nats_url, backend=backend)
    await registry.change_rollout("acme", "rebook", lambda d: promote(d, "test", version="v1"))
    await wait_for(lambda: router.rollout("acme", "rebook") is not None)
    assert backend.loaded == {"v1"}
    live = router.resolve("acme", "rebook", "long-call")
    assert live.version == "v1"

    await registry.change_rollout("acme", "rebook", lambda d: promote(d, "test", version="v2"))
    await wait_for(lambda: router.rollout("acme", "rebook").champion == "v2")
    assert router.resolve("acme", "rebook", "new-call").version == "v2"
    await asyncio.sleep(0.1)
    assert backend.loaded == {"v1", "v2"}  # the long call still holds v1
    assert router.resolve("acme", "rebook", "long-call").version == "v1"

    router.release("long-call")
    await wait_for(lambda: backend.loaded == {"v2"})
    assert ("unload", "v1") in backend.events
    await router.stop()


async def test_a_version_that_fails_to_load_never_gets_calls(registry, nats_url):
    router = await Router.connect(nats_url, backend=EchoBackend(fail_versions={"v2"}))
    await registry.change_rollout("acme", "rebook", lambda d: promote(d, "test", version="v1"))
    await registry.change_rollout("acme", "rebook", lambda d: start_canary(d, "v2", 1.0, "test"))
    await wait_for(lambda: router.revision("acme", "rebook") >= 2 and
                   router.rollout("acme", "rebook").state == "canary")
    assert {router.resolve("acme", "rebook", f"c{i}").version for i in range(50)} == {"v1"}
    await router.stop()


ROUTER_PROCESS = textwrap.dedent("""
    import asyncio, json, sys
    from agent_dpo.logs import configure_logging
    from agent_dpo.router import Router

    async def main():
        configure_logging(fmt="json", level="warning")
        router = await Router.connect(sys.argv[1])
        while router.revision("acme", "rebook") < int(sys.argv[2]):
            await asyncio.sleep(0.01)
        doc = router.rollout("acme", "rebook")
        arms = {f"c{i}": router.resolve("acme", "rebook", f"c{i}").version for i in range(200)}
        print(json.dumps({"revision": router.revision("acme", "rebook"), "step": doc.step,
                          "weight": doc.canary_weight, "arms": arms}), flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
""")


def spawn_router(nats_url: str, revision: int) -> subprocess.Popen:
    env = {**os.environ, "AGENT_DPO_LOG_LEVEL": "warning"}
    return subprocess.Popen([sys.executable, "-c", ROUTER_PROCESS, nats_url, str(revision)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                            start_new_session=True)


async def test_a_killed_router_process_resumes_the_canary_from_kv(registry, nats_url):
    await registry.change_rollout("acme", "rebook", lambda d: promote(d, "test", version="v1"))
    await registry.change_rollout("acme", "rebook", lambda d: start_canary(d, "v2", 0.05, "canary"))
    await registry.change_rollout("acme", "rebook", lambda d: advance_canary(d, 1, 0.25, "canary", "step"))
    _, rev = await registry.get_rollout("acme", "rebook")

    first = spawn_router(nats_url, rev)
    line = await asyncio.wait_for(asyncio.to_thread(first.stdout.readline), 30)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    before = json.loads(line)

    second = spawn_router(nats_url, rev)
    try:
        after = json.loads(await asyncio.wait_for(asyncio.to_thread(second.stdout.readline), 30))
    finally:
        os.killpg(second.pid, signal.SIGKILL)
        second.wait()
    assert (after["step"], after["weight"], after["revision"]) == (1, 0.25, rev)
    assert after["arms"] == before["arms"]  # the same calls land on the same arms
    assert 20 < sum(v == "v2" for v in after["arms"].values()) < 80


@pytest.mark.parametrize("connection", ["own", "shared"])
async def test_router_catches_up_after_nats_restarts(registry, nats_server, nats_url, connection):
    if connection == "own":
        router = await Router.connect(nats_url)
    else:  # the runtime's connection, reconnecting forever, with its own reconnect callback
        from agent_dpo_adapters.nats_bus import connect

        shared = await connect(nats_url)
        router = Router(await NatsRegistry.open(shared))
        await router.start()
    await registry.change_rollout("acme", "rebook", lambda d: promote(d, "test", version="v1"))
    await wait_for(lambda: router.rollout("acme", "rebook") is not None)
    await registry.nc.close()

    nats_server.kill()
    await asyncio.sleep(0.3)
    assert router.resolve("acme", "rebook", "during-outage").version == "v1"  # served from memory
    nats_server.start()

    nc = await nats.connect(nats_url)
    reg = await NatsRegistry.open(nc)
    await reg.change_rollout("acme", "rebook", lambda d: promote(d, "test", version="v2"))
    await wait_for(lambda: router.rollout("acme", "rebook").champion == "v2", timeout=15)
    assert router.resolve("acme", "rebook", "after-outage").version == "v2"
    await router.stop()
    await nc.close()
    if connection == "shared":
        await shared.close()


def test_bench_swap_prints_its_figures_last():
    proc = subprocess.run([sys.executable, "-m", "agent_dpo.cli", "bench", "swap", "--calls", "20000",
                           "--changes", "8", "--routers", "2", "--concurrent", "100"],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    import re

    m = re.fullmatch(r"swap: resolve p99 ([\d.]+) us, propagation p99 ([\d.]+) ms, mid-call switches (\d+)", last)
    assert m, last
    assert int(m.group(3)) == 0


async def test_a_slow_load_never_delays_another_agent_and_superseded_canaries_are_skipped(registry, nats_url):
    await registry.put_manifest(manifest("v1", agent="other"))
    backend = EchoBackend(load_delay=0.5)
    router = await Router.connect(nats_url, backend=backend)
    await registry.change_rollout("acme", "rebook", lambda d: promote(d, "test", version="v1"))
    await registry.change_rollout("acme", "rebook", lambda d: start_canary(d, "v2", 0.5, "test"))
    await registry.change_rollout("acme", "rebook", lambda d: rollback(d, "test", "changed my mind"))
    started = asyncio.get_running_loop().time()
    await registry.change_rollout("acme", "other", lambda d: promote(d, "test", version="v1"))
    await wait_for(lambda: router.rollout("acme", "other") is not None)
    assert asyncio.get_running_loop().time() - started < 0.9  # one load, not queued behind rebook's
    await wait_for(lambda: router.rollout("acme", "rebook") is not None
                   and router.rollout("acme", "rebook").state == "rolled_back")
    assert ("load", "v2") not in backend.events  # the canary ended before its load would have begun
    await router.stop()


async def test_resolve_and_release_from_many_threads_keep_leases_exact(registry, nats_url):
    router = await Router.connect(nats_url, backend=EchoBackend())
    await registry.change_rollout("acme", "rebook", lambda d: promote(d, "test", version="v1"))
    await registry.change_rollout("acme", "rebook", lambda d: start_canary(d, "v2", 0.5, "test"))
    await wait_for(lambda: router.rollout("acme", "rebook") is not None
                   and router.rollout("acme", "rebook").state == "canary")

    def worker(w: int) -> int:
        switches = 0
        for i in range(2000):
            cid = f"t{w}-{i % 50}"
            first = router.resolve("acme", "rebook", cid)
            switches += router.resolve("acme", "rebook", cid) is not first
            if i % 3 == 0:
                router.release(cid, "acme", "rebook")
        return switches

    assert sum(await asyncio.gather(*(asyncio.to_thread(worker, w) for w in range(8)))) == 0
    pinned = list(router._pins)
    assert router.live_calls("acme", "rebook", "v1") + router.live_calls("acme", "rebook", "v2") == len(pinned)
    await router.stop()
