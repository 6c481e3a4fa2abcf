"""The registry's storage: one NATS KV bucket holding version manifests (written once) and one
rollout document per agent (changed only by compare-and-set). The bucket's per-key history is the
audit trail. Rules for moving aliases are in `agent_dpo.registry`; this module only stores them."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import nats.errors
import nats.js.errors
from nats.js import api
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from agent_dpo.logs import get_logger
from agent_dpo.registry import (
    RegistryError,
    RolloutDoc,
    VersionManifest,
    decision_subject,
    manifest_key,
    new_doc,
    rollout_key,
)

REGISTRY_BUCKET = "agentdpo-registry"
REGISTRY_HISTORY = 64  # NATS caps KV history at 64; the brief asks for at least 32 audit entries
HISTORY_ATTEMPTS = 3  # reads of a rollout's history before "none" is believed (see NatsRegistry.history)
log = get_logger(component="registry")


class ConflictError(RegistryError):
    """The rollout document kept changing under us; every retry lost the compare-and-set."""


@dataclass(frozen=True)
class HistoryEntry:
    revision: int
    created: datetime | None
    doc: RolloutDoc | None  # None: the key was deleted


async def open_registry_bucket(js, bucket: str = REGISTRY_BUCKET) -> KeyValue:
    """Create the bucket when missing (idempotent), else open it."""
    try:
        return await js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        pass
    try:
        return await js.create_key_value(api.KeyValueConfig(
            bucket=bucket, history=REGISTRY_HISTORY, storage=api.StorageType.FILE,
            description="agent-dpo registry: version manifests and rollout documents"))
    except nats.js.errors.BadRequestError:
        return await js.key_value(bucket)  # another process created it first


def _dump(model) -> bytes:
    return model.model_dump_json(by_alias=True).encode()


class NatsRegistry:
    """Manifests and rollout documents of every agent, in one KV bucket."""

    def __init__(self, kv: KeyValue, nc=None):
        self.kv = kv
        self.nc = nc  # when given, every rollout change is announced on agentdpo.registry.<t>.<a>

    @classmethod
    async def open(cls, nc, bucket: str = REGISTRY_BUCKET) -> NatsRegistry:
        return cls(await open_registry_bucket(nc.jetstream(), bucket), nc)

    # ---- manifests ----

    async def put_manifest(self, manifest: VersionManifest) -> int:
        """Write a version's manifest once. Writing the same content again is a no-op (a retried
        publish); writing different content under an existing version is refused."""
        key = manifest_key(manifest.tenant_id, manifest.agent_id, manifest.version)
        try:
            return await self.kv.create(key, _dump(manifest))
        except nats.js.errors.KeyWrongLastSequenceError:
            existing = await self.get_manifest(manifest.tenant_id, manifest.agent_id, manifest.version)
            if existing is not None and existing == manifest:
                return 0
            raise RegistryError(f"manifest {manifest.tenant_id}/{manifest.agent_id}/{manifest.version} "
                                "already exists; versions are immutable, publish a new version") from None

    async def get_manifest(self, tenant_id: str, agent_id: str, version: str) -> VersionManifest | None:
        try:
            entry = await self.kv.get(manifest_key(tenant_id, agent_id, version))
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        return VersionManifest.model_validate_json(entry.value)

    async def list_manifests(self, tenant_id: str, agent_id: str) -> list[VersionManifest]:
        prefix = f"manifest.{tenant_id}.{agent_id}."
        out = []
        for key in await self._keys(prefix + "*"):
            m = await self.get_manifest(tenant_id, agent_id, key[len(prefix):])
            if m is not None:
                out.append(m)
        return sorted(out, key=lambda m: m.created_at)

    async def _keys(self, pattern: str) -> list[str]:
        """Live keys matching a subject pattern, filtered by the server (KeyValue.keys filters
        client-side after reading every key of the bucket)."""
        watcher = await self.kv.watch(pattern, meta_only=True, ignore_deletes=True)
        keys = []
        try:
            async for entry in watcher:
                if entry is None:
                    break
                keys.append(entry.key)
        finally:
            await watcher.stop()
        return keys

    # ---- rollout documents ----

    async def get_rollout(self, tenant_id: str, agent_id: str) -> tuple[RolloutDoc | None, int]:
        """The document and its revision (0 when the agent has none yet)."""
        try:
            entry = await self.kv.get(rollout_key(tenant_id, agent_id))
        except nats.js.errors.KeyNotFoundError:
            return None, 0
        except nats.js.errors.KeyDeletedError as err:
            return None, err.entry.revision if err.entry else 0
        return RolloutDoc.model_validate_json(entry.value), entry.revision

    async def change_rollout(self, tenant_id: str, agent_id: str,
                             change: Callable[[RolloutDoc], RolloutDoc], attempts: int = 20) -> RolloutDoc:
        """Read, apply `change`, write back only if nobody wrote in between; else re-read and retry.
        `change` sees the freshest document each time, so a rule is never applied to stale state."""
        key = rollout_key(tenant_id, agent_id)
        for attempt in range(attempts):
            current, revision = await self.get_rollout(tenant_id, agent_id)
            doc = change(current or new_doc(tenant_id, agent_id))
            try:
                if revision == 0:
                    new_rev = await self.kv.create(key, _dump(doc))
                else:
                    new_rev = await self.kv.update(key, _dump(doc), last=revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                log.info("rollout_conflict", tenant_id=tenant_id, agent_id=agent_id, attempt=attempt)
                await asyncio.sleep(random.uniform(0, 0.005 * (attempt + 1)))
                continue
            log.info("rollout_changed", tenant_id=tenant_id, agent_id=agent_id, revision=new_rev,
                     champion=doc.champion, challenger=doc.challenger, weight=doc.canary_weight,
                     state=doc.state, reason=doc.reason, changed_by=doc.changed_by)
            await self.announce(tenant_id, agent_id, {"kind": "rollout", "revision": new_rev,
                                                      "rollout": doc.model_dump(by_alias=True)})
            return doc
        raise ConflictError(f"rollout of {tenant_id}/{agent_id} changed concurrently {attempts} times; "
                            "try again")

    async def announce(self, tenant_id: str, agent_id: str, payload: dict) -> None:
        """Publish a registry or canary decision for dashboards and the audit log (core NATS)."""
        if self.nc is not None and self.nc.is_connected:
            await self.nc.publish(decision_subject(tenant_id, agent_id), json.dumps(payload).encode())

    async def history(self, tenant_id: str, agent_id: str) -> list[HistoryEntry]:
        """Every kept revision of the agent's rollout document, oldest first."""
        # nats-py's history can report "no keys" when the watcher's first messages are already on their way
        # but not yet counted (its start marker then comes first); a key with history answers on a retry.
        for attempt in range(HISTORY_ATTEMPTS):
            try:
                entries = await self.kv.history(rollout_key(tenant_id, agent_id))
                break
            except nats.js.errors.NoKeysError:
                if attempt == HISTORY_ATTEMPTS - 1:
                    return []
                await asyncio.sleep(0.05 * (attempt + 1))
        out = []
        for e in entries:
            doc = None if e.operation in (KV_DEL, KV_PURGE) else RolloutDoc.model_validate_json(e.value)
            out.append(HistoryEntry(e.revision, e.created, doc))
        return out

    async def all_rollouts(self) -> list[tuple[RolloutDoc, int]]:
        out = []
        for key in await self._keys("rollout.*.*"):
            _, tenant_id, agent_id = key.split(".")
            doc, rev = await self.get_rollout(tenant_id, agent_id)
            if doc is not None:
                out.append((doc, rev))
        return out
