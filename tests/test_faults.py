"""The long fault suite (`make test-faults`, marker `faults`), on real processes: `agent-dpo ingest`
SIGKILLed at random points several times in a row while events stream in, a node of a 3-node JetStream
cluster (stream at R3) killed mid-ingest, and `agent-dpo worker` killed while it trains. Ingest faults
must leave every agent's exports byte-identical to an uninterrupted run over the same events.

The router killed mid-canary lives in test_router.py (`test_a_killed_router_process_resumes_the_canary_
from_kv`): on restart the rollout is what the KV holds. `agent-dpo serve` does not run canaries yet."""

# ruff: noqa: F811  (fixtures come from tests/tiny_model.py, imported after the sys.path line)
from __future__ import annotations

import asyncio
import json
import random
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

import nats.js.errors
import pytest

from agent_dpo.errors import AgentDpoError
from agent_dpo_adapters.nats_artifacts import get_artifact, open_artifact_store
from agent_dpo_adapters.nats_bus import connect
from agent_dpo_adapters.nats_jobs import enqueue_job, job_statuses
from agent_dpo_adapters.nats_registry import NatsRegistry
from agent_dpo_adapters.nats_server import EmbeddedNats

sys.path.insert(0, str(Path(__file__).parent))
from fault_fixtures import (
    FAST_ENV,
    NatsCluster,
    agents_of,
    assert_same_exports,
    cli,
    export_all,
    finish,
    init_bus_patiently,
    locked_store,
    publish_envs,
    reference_exports,
    sigkill,
    world,
)
from ingest_fixtures import FAST_BUS, count_events, init_bus
from test_faults_quick import _wait_for, distinct_events
from test_training import pair_rows, write_jsonl
from tiny_model import smollm2_store, tiny_model_dir  # noqa: F401  (pytest fixtures)

pytestmark = [pytest.mark.faults, pytest.mark.timeout(400)]


async def _trickle(url: str, envs: list[dict], chunk: int = 200, pause_s: float = 0.3) -> None:
    """Publish in chunks with pauses: a stream that keeps arriving while ingest is being killed."""
    for start in range(0, len(envs), chunk):
        await publish_envs(url, envs[start:start + chunk])
        await asyncio.sleep(pause_s)


async def test_ingest_sigkilled_at_random_points_several_times_then_a_clean_run(nats_url, tmp_path):
    envs = world(260, seed=21)  # ~4,100 events, both agents, late and duplicate ones
    total = distinct_events(envs)
    await init_bus(nats_url)
    await publish_envs(nats_url, envs[: len(envs) // 2])
    trickle = asyncio.create_task(_trickle(nats_url, envs[len(envs) // 2:]))

    store = tmp_path / "crashed"
    args = ("ingest", "--nats-url", nats_url, "--store", str(store), "--batch-size", "50")
    rng = random.Random(7)
    kills = []
    for i, threshold in enumerate(sorted(rng.sample(range(150, total - 600), 5))):
        proc = cli(*args, env=FAST_ENV)
        try:
            target = max(threshold, count_events(store) + rng.randint(50, 300))
            await _wait_for(lambda t=target: count_events(store) >= t, 90, f"{target} events", proc)
            await asyncio.sleep(rng.uniform(0.0, 0.08))  # anywhere inside a batch: fetch, write, ack
            if i % 2:
                # Every other kill lands while a write is stalled (a locked or slow disk): the batch in
                # hand has been fetched but must not have been acked.
                with locked_store(store):
                    await asyncio.sleep(1.0)
                    sigkill(proc)
        finally:
            if proc.poll() is None:
                sigkill(proc)
        kills.append(count_events(store))
    await trickle
    proc = cli(*args, "--until-idle", "2", env=FAST_ENV)
    _, err = finish(proc, 120)
    assert proc.returncode == 0, err[-2000:]

    assert sum(k < total for k in kills) >= 4, f"kills should land mid-stream: {kills} of {total}"
    want = await reference_exports(nats_url, tmp_path, agents_of(envs))
    assert count_events(store) == total
    assert_same_exports(export_all(store, tmp_path / "out", agents_of(envs)), want)
    print(f"ingest SIGKILLed at {kills} of {total} events; final store {count_events(store)}; 0 lost")


async def _consumer_leader(url: str, consumer: str) -> str:
    nc = await connect(url)
    try:
        info = await nc.jetstream().consumer_info(FAST_BUS.stream, consumer)
        return info.cluster.leader
    finally:
        await nc.close()


async def test_a_cluster_node_killed_mid_ingest_with_r3_streams_loses_nothing(tmp_path):
    bus = replace(FAST_BUS, replicas=3)
    async with NatsCluster(tmp_path / "cluster") as cluster:
        envs = world(180, seed=33)
        first, rest = envs[: 2 * len(envs) // 3], envs[2 * len(envs) // 3:]
        await init_bus_patiently(cluster.url, bus)
        nc = await connect(cluster.url)
        info = await nc.jetstream().stream_info(bus.stream)
        await nc.close()
        assert info.config.num_replicas == 3 and len(info.cluster.replicas) == 2
        await publish_envs(cluster.url, first)

        store = tmp_path / "store"
        proc = cli("ingest", "--nats-url", cluster.url, "--store", str(store), "--batch-size", "50",
                   env={**FAST_ENV, "AGENT_DPO_BUS_REPLICAS": "3"})
        try:
            await _wait_for(lambda: count_events(store) >= 700, 90, "the first events", proc)
            leader = await _consumer_leader(cluster.url, bus.consumer)
            victim = next(n for n in cluster.nodes if n.extra_args[1] == leader)
            victim.kill()  # the node leading the ingest consumer, SIGKILL
            killed_at = count_events(store)
            await publish_envs(",".join(n.url for n in cluster.nodes if n is not victim), rest)
            await _wait_for(lambda: count_events(store) >= distinct_events(envs), 120, "every event", proc)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err[-2000:]
        finally:
            if proc.poll() is None:
                sigkill(proc)
        assert killed_at < distinct_events(first)
        assert count_events(store) == distinct_events(envs), "an event was stored twice"
        want = await reference_exports(",".join(n.url for n in cluster.nodes if n is not victim), tmp_path,
                                       agents_of(envs), bus)
        assert_same_exports(export_all(store, tmp_path / "out", agents_of(envs)), want)
        print(f"cluster: killed {leader} (consumer leader) at {killed_at} of {distinct_events(envs)} events; 0 lost")


async def test_a_worker_killed_mid_job_registers_nothing_and_the_job_is_retried(tmp_path, tiny_model_dir):
    with EmbeddedNats(store_dir=tmp_path / "nats") as server:
        nc = await connect(server.url)
        js = nc.jetstream()
        data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(8))
        config = {"base_model": str(tiny_model_dir), "sft_steps": 1, "max_steps": 6, "batch_size": 2,
                  "max_length": 256, "lora_r": 4, "lora_alpha": 8}
        spec = await enqueue_job(js, tenant_id="acme", agent_id="salon", version="v9", config=config,
                                 dataset=data, meta={})
        worker = ("worker", "--nats-url", server.url, "--max-jobs", "1")
        proc = cli(*worker, "--store", str(tmp_path / "box-1"), "--name", "doomed")
        try:
            seen = []
            async for status in job_statuses(js, spec.job_id, timeout=180):
                seen.append(status.state)
                assert status.state != "failed", status.error
                if status.state == "progress":
                    break  # training is under way
        finally:
            sigkill(proc)

        name = f"{spec.tenant_id}/{spec.agent_id}/{spec.version}"
        registry = await NatsRegistry.open(nc)
        assert await registry.get_manifest("acme", "salon", "v9") is None
        assert await registry.list_manifests("acme", "salon") == []
        artifacts = await open_artifact_store(js)
        with pytest.raises(nats.js.errors.ObjectNotFoundError):
            await artifacts.get(name)
        with pytest.raises(AgentDpoError):
            await get_artifact(js, name, "sha256:" + "0" * 64, tmp_path / "fetched")

        # JetStream redelivers the unacked job after the worker's ack wait; another worker finishes it.
        started = time.monotonic()
        retry = cli(*worker, "--store", str(tmp_path / "box-2"), "--name", "survivor")
        try:
            _, err = retry.communicate(timeout=300)
        finally:
            if retry.poll() is None:
                sigkill(retry)
        assert retry.returncode == 0, err[-3000:]
        statuses = [s async for s in job_statuses(js, spec.job_id, timeout=30)]
        final = statuses[-1]
        assert final.state == "succeeded" and final.worker == "survivor" and final.attempt == 2, \
            json.dumps([s.model_dump() for s in statuses], default=str)[-2000:]
        fetched = await get_artifact(js, name, final.artifact_digest, tmp_path / "fetched")
        assert (fetched / "adapter_model.safetensors").is_file() or any(fetched.rglob("*.safetensors"))
        print(f"worker: killed mid-job after {seen}; retried by another worker in {time.monotonic() - started:.0f}s")
        await nc.close()
