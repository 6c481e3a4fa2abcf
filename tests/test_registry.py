"""The registry on a real nats-server: manifests are written once, rollout documents change only by
compare-and-set (concurrent writers all land, none is lost), the bucket's history is the audit
trail, tenants stay apart, and artifacts whose bytes do not match their digest are refused."""

from __future__ import annotations

import asyncio
import json

import nats
import pytest

from agent_dpo.registry import (
    RegistryError,
    VersionManifest,
    advance_canary,
    promote,
    rollback,
    start_canary,
)
from agent_dpo_adapters.nats_artifacts import (
    ArtifactDigestMismatch,
    artifact_digest,
    get_artifact,
    put_artifact,
)
from agent_dpo_adapters.nats_registry import REGISTRY_HISTORY, NatsRegistry


def manifest(version: str, tenant: str = "acme", agent: str = "rebook", **kw) -> VersionManifest:
    return VersionManifest(tenant_id=tenant, agent_id=agent, version=version, base_model="smollm2-135m-instruct",
                           serve_name=f"{agent}--{version}", method="dpo", hyperparameters={"beta": 0.1},
                           **kw)


@pytest.fixture
async def registry(nats_url):
    nc = await nats.connect(nats_url)
    reg = await NatsRegistry.open(nc)
    yield reg
    await nc.close()


async def test_manifest_is_written_once_and_never_overwritten(registry):
    first = manifest("v1", eval={"win_rate": 0.8})
    await registry.put_manifest(first)
    await registry.put_manifest(first)  # a retried publish of the same content is fine
    with pytest.raises(RegistryError, match="immutable"):
        await registry.put_manifest(manifest("v1", eval={"win_rate": 0.99}))
    stored = await registry.get_manifest("acme", "rebook", "v1")
    assert stored.eval == {"win_rate": 0.8}
    assert [m.version for m in await registry.list_manifests("acme", "rebook")] == ["v1"]


async def test_tenants_and_agents_are_kept_apart(registry):
    await registry.put_manifest(manifest("v1", tenant="acme", agent="rebook"))
    await registry.put_manifest(manifest("v1", tenant="globex", agent="rebook"))
    await registry.put_manifest(manifest("v2", tenant="acme", agent="rebook-2"))
    await registry.change_rollout("acme", "rebook", lambda d: promote(d, "test", version="v1"))
    assert [m.version for m in await registry.list_manifests("acme", "rebook")] == ["v1"]
    assert (await registry.get_rollout("globex", "rebook"))[0] is None
    assert (await registry.get_rollout("acme", "rebook-2"))[0] is None


async def test_concurrent_writers_all_land_through_cas_retry(registry):
    """Twenty writers each bump `step` at the same moment: CAS conflicts are retried on fresh
    state, so the final step is exactly 20 and the audit trail has one revision per change."""
    await registry.put_manifest(manifest("v1"))
    await registry.put_manifest(manifest("v2"))
    await registry.change_rollout("acme", "rebook", lambda d: promote(d, "test", version="v1"))
    await registry.change_rollout("acme", "rebook", lambda d: start_canary(d, "v2", 0.05, "test"))

    async def bump(i: int):
        await registry.change_rollout(
            "acme", "rebook", lambda d: advance_canary(d, d.step + 1, 0.05, f"writer-{i}", "bump"))

    await asyncio.gather(*(bump(i) for i in range(20)))
    doc, _ = await registry.get_rollout("acme", "rebook")
    assert doc.step == 20
    history = await registry.history("acme", "rebook")
    assert len(history) == 22
    assert sorted(h.doc.changed_by for h in history[2:]) == sorted(f"writer-{i}" for i in range(20))


async def test_history_is_the_audit_trail_of_at_least_32_changes(registry):
    assert REGISTRY_HISTORY >= 32
    for i in range(1, 4):
        await registry.put_manifest(manifest(f"v{i}"))
    await registry.change_rollout("acme", "rebook", lambda d: promote(d, "alice", "first", version="v1"))
    for i in range(70):
        await registry.change_rollout("acme", "rebook",
                                      lambda d, i=i: promote(d, "bob", f"flip {i}", version="v2" if i % 2 == 0 else "v3"))
    history = await registry.history("acme", "rebook")
    assert len(history) == REGISTRY_HISTORY
    assert history[-1].doc.reason == "flip 69" and history[-1].doc.changed_by == "bob"
    revisions = [h.revision for h in history]
    assert revisions == sorted(revisions)


async def test_promote_and_rollback_keep_previous(registry):
    for v in ("v1", "v2"):
        await registry.put_manifest(manifest(v))
    await registry.change_rollout("acme", "rebook", lambda d: promote(d, "test", version="v1"))
    await registry.change_rollout("acme", "rebook", lambda d: start_canary(d, "v2", 0.05, "test"))
    doc = await registry.change_rollout("acme", "rebook", lambda d: promote(d, "test"))
    assert (doc.champion, doc.previous, doc.challenger, doc.state) == ("v2", "v1", None, "stable")
    doc = await registry.change_rollout("acme", "rebook", lambda d: rollback(d, "test", "bad"))
    assert (doc.champion, doc.previous, doc.state) == ("v1", None, "rolled_back")
    with pytest.raises(RegistryError, match="no previous"):
        await registry.change_rollout("acme", "rebook", lambda d: rollback(d, "test"))


async def test_rollout_changes_are_announced(registry, nats_url):
    nc = await nats.connect(nats_url)
    got: list[dict] = []

    async def on_msg(msg):
        got.append(json.loads(msg.data))

    await nc.subscribe("agentdpo.registry.acme.rebook", cb=on_msg)
    await nc.flush()
    await registry.put_manifest(manifest("v1"))
    await registry.change_rollout("acme", "rebook", lambda d: promote(d, "cli", version="v1"))
    for _ in range(50):
        if got:
            break
        await asyncio.sleep(0.02)
    assert got and got[0]["rollout"]["champion"] == "v1" and got[0]["rollout"]["changed_by"] == "cli"
    await nc.close()


async def test_artifact_round_trip_and_digest_mismatch_is_refused(nats_url, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    (adapter / "adapter_model.safetensors").write_bytes(b"\x00" * 1000 + b"weights")
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    digest = await put_artifact(js, "acme.rebook.v1", adapter)
    assert digest == artifact_digest(adapter)
    got = await get_artifact(js, "acme.rebook.v1", digest, tmp_path / "cache")
    assert (got / "adapter_model.safetensors").read_bytes().endswith(b"weights")

    # Someone replaces the object with other bytes: the manifest's digest no longer matches.
    (adapter / "adapter_model.safetensors").write_bytes(b"\x00" * 1000 + b"tampered")
    await put_artifact(js, "acme.rebook.v2", adapter)
    with pytest.raises(ArtifactDigestMismatch, match="refusing"):
        await get_artifact(js, "acme.rebook.v2", digest, tmp_path / "cache2")
    assert not (tmp_path / "cache2" / digest.split(":")[1]).exists()
    await nc.close()


def registry_cli(nats_url: str, *args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "agent_dpo.cli", "--log-level", "warning", "registry", *args,
                           "--agent", "acme/rebook", "--nats-url", nats_url],
                          check=False, capture_output=True, text=True, timeout=60)


async def test_registry_cli_moves_aliases_and_shows_the_audit_trail(registry, nats_url):
    good = {"preference_accuracy": 0.92, "win_rate": 0.8, "tool_call_validity": 1.0,
            "baseline_tool_call_validity": 1.0}
    await registry.put_manifest(manifest("v1", eval=good))
    await registry.put_manifest(manifest("v2", eval={**good, "win_rate": 0.3}))
    steps = [
        (("promote", "--version", "v1", "--by", "alice"), 0, "champion v1"),
        (("canary", "--version", "v2"), 1, "win_rate 0.300 < 0.5"),
        (("canary", "--version", "v2", "--force"), 0, "v2 in canary at 5%"),
        (("status",), 0, "challenger v2 at 5%"),
        (("promote",), 0, "champion v2 (previous v1)"),
        (("rollback", "--reason", "csat dropped"), 0, "champion v1"),
        (("rollback",), 1, "no previous version"),
        (("promote", "--version", "v9"), 1, "no version v9"),
    ]
    for args, code, text in steps:
        proc = await asyncio.to_thread(registry_cli, nats_url, *args)
        assert proc.returncode == code, (args, proc.stderr)
        assert text in (proc.stdout + proc.stderr), (args, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr
    proc = await asyncio.to_thread(registry_cli, nats_url, "status", "--json")
    status = json.loads(proc.stdout)
    assert status["rollout"]["champion"] == "v1" and status["rollout"]["state"] == "rolled_back"
    assert [v["version"] for v in status["versions"]] == ["v1", "v2"]
    history = json.loads((await asyncio.to_thread(registry_cli, nats_url, "history", "--json")).stdout)
    assert history[0]["rollout"]["changed_by"] == "alice"
    assert history[-1]["rollout"]["reason"] == "csat dropped"


def test_registry_cli_without_nats_is_one_line_exit_1():
    proc = registry_cli("nats://127.0.0.1:1", "status")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "cannot connect to NATS" in proc.stderr.strip().splitlines()[-1]
