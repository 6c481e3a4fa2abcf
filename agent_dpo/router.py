"""The runtime's side of a rollout: `resolve(tenant, agent, call_id)` pins a model for a call's whole
life and `release(call_id)` ends the pin at hang-up. Rollout documents are kept in memory from a KV
watch, so resolve is a dict lookup that never waits on the network; versions load before they are
served and unload only when no alias and no live call holds them."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent_dpo.errors import AgentDpoError
from agent_dpo.logs import get_logger
from agent_dpo.registry import (
    ModelRef,
    RolloutDoc,
    VersionManifest,
    base_ref,
    call_bucket,
    parse_rollout_key,
    ref_for,
)
from agent_dpo.serving import Leases, ServingBackend, VersionKey

DEFAULT_BASE_MODEL = "smollm2-135m-instruct"
log = get_logger(component="router")


@dataclass(frozen=True, slots=True)
class _Entry:
    """One agent's rollout, compiled to refs: swapping it is one dict assignment."""

    revision: int
    doc: RolloutDoc
    champion: ModelRef
    challenger: ModelRef | None
    weight: float


def stamp_call_started(data: dict, ref: ModelRef) -> dict:
    """`call.started` data with `model` set to what serves the call, so outcomes attribute to the
    version (and its canary arm). Returns a copy; the caller's dict is not changed."""
    out = copy.deepcopy(data)
    model = dict(out.get("model") or {})
    model["name"] = ref.serve_name
    if ref.version:
        model["version"] = ref.version
    else:
        model.pop("version", None)
    out["model"] = model
    return out


class Router:
    """Per-process model router. Start it inside the runtime's event loop (`await start()`); then
    `resolve` and `release` may be called from the loop or from any thread."""

    def __init__(self, registry=None, backend: ServingBackend | None = None,
                 base_model: str = DEFAULT_BASE_MODEL, default_backend: str = "local",
                 default_ref: Callable[[str, str], ModelRef] | None = None):
        self.registry = registry  # NatsRegistry (or anything with .kv and get_manifest)
        self.backend = backend
        self._default_ref = default_ref or (lambda t, a: base_ref(t, a, base_model, default_backend))
        self._defaults: dict[tuple[str, str], ModelRef] = {}
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._pins: dict[tuple[str, str, str], ModelRef] = {}
        self._call_index: dict[str, tuple[str, str, str]] = {}
        self._leases = Leases()
        self._manifests: dict[VersionKey, VersionManifest] = {}
        self._loaded: set[VersionKey] = set()
        self._locks: dict[VersionKey, asyncio.Lock] = {}
        self._listeners: list[Callable[[str, str, int, RolloutDoc | None], None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._pending: dict[tuple[str, str], Any] = {}  # newest KV entry per agent, not yet applied
        self._appliers: dict[tuple[str, str], asyncio.Task] = {}
        self._mu = threading.Lock()  # resolve/release may come from the runtime's threads
        self._watcher = None
        self._ready = asyncio.Event()
        self._nc = None  # set by connect(); closed by stop()

    # ---- the hot path: plain dict work, no awaits ----

    def resolve(self, tenant_id: str, agent_id: str, call_id: str) -> ModelRef:
        key = (tenant_id, agent_id, call_id)
        ref = self._pins.get(key)
        if ref is not None:
            return ref
        # The lock makes "read the live entry, pin, take a lease" one step against a swap and an
        # unload, also when the runtime calls from several threads; uncontended it costs ~0.1 us.
        with self._mu:
            ref = self._pins.get(key)
            if ref is not None:
                return ref
            entry = self._entries.get((tenant_id, agent_id))
            if entry is None:
                ref = self._defaults.get((tenant_id, agent_id)) or self._default_for(tenant_id, agent_id)
            elif entry.challenger is not None and call_bucket(tenant_id, agent_id, call_id) < entry.weight:
                ref = entry.challenger
            else:
                ref = entry.champion
            self._pins[key] = ref
            self._call_index[call_id] = key
            if ref.version is not None:
                self._leases.acquire(ref.key)
        return ref

    def release(self, call_id: str, tenant_id: str | None = None, agent_id: str | None = None) -> None:
        """End the call's pin. Pass tenant and agent when call ids are only unique per agent."""
        with self._mu:
            key = (tenant_id, agent_id, call_id) if tenant_id and agent_id else self._call_index.get(call_id)
            if key is None:
                return
            ref = self._pins.pop(key, None)
            if self._call_index.get(call_id) == key:
                del self._call_index[call_id]
            if ref is None or ref.version is None:
                return
            now_free = self._leases.release(ref.key)
        if now_free and self._loop is not None:
            self._loop.call_soon_threadsafe(self._spawn_unload, ref)

    def _default_for(self, tenant_id: str, agent_id: str) -> ModelRef:
        ref = self._default_ref(tenant_id, agent_id)
        self._defaults[(tenant_id, agent_id)] = ref
        return ref

    # ---- what operators and the service read ----

    def pinned(self, tenant_id: str, agent_id: str, call_id: str) -> ModelRef | None:
        return self._pins.get((tenant_id, agent_id, call_id))

    def revision(self, tenant_id: str, agent_id: str) -> int:
        entry = self._entries.get((tenant_id, agent_id))
        return entry.revision if entry else 0

    def rollout(self, tenant_id: str, agent_id: str) -> RolloutDoc | None:
        entry = self._entries.get((tenant_id, agent_id))
        return entry.doc if entry else None

    def agents(self) -> list[tuple[str, str]]:
        """Agents with a rollout document live in this router."""
        return sorted(self._entries)

    def live_calls(self, tenant_id: str, agent_id: str, version: str) -> int:
        return self._leases.live_calls((tenant_id, agent_id, version))

    def loaded_versions(self) -> set[VersionKey]:
        return set(self._loaded)

    def add_listener(self, fn: Callable[[str, str, int, RolloutDoc | None], None]) -> None:
        """`fn(tenant, agent, revision, doc)` after a rollout change is live in this router."""
        self._listeners.append(fn)

    # ---- lifecycle ----

    @classmethod
    async def connect(cls, url: str, **kwargs: Any) -> Router:
        """Own NATS connection, re-reading every rollout document after each reconnect."""
        import nats
        import nats.errors

        from agent_dpo_adapters.nats_registry import NatsRegistry

        router: Router | None = None

        async def reconnected() -> None:
            if router is not None:
                router.resync()

        async def on_error(exc: Exception) -> None:
            log.warning("router_nats_error", error=f"{type(exc).__name__}: {exc}"[:300])

        try:
            nc = await nats.connect(url, name="agent-dpo-router", reconnected_cb=reconnected, error_cb=on_error,
                                    max_reconnect_attempts=2, reconnect_time_wait=0.2, connect_timeout=5)
        except (OSError, TimeoutError, nats.errors.Error) as exc:
            raise AgentDpoError(f"router cannot connect to NATS at {url}: {type(exc).__name__}") from None
        nc.options["max_reconnect_attempts"] = -1  # once up, a router never gives up reconnecting
        router = cls(await NatsRegistry.open(nc), **kwargs)
        router._nc = nc
        await router.start()
        return router

    async def start(self, wait_ready: float | None = 5.0) -> None:
        """Begin watching; waits (bounded) for the first full read so a fresh process starts with
        the current assignments. Calls resolved before that get the default (base) model."""
        self._loop = asyncio.get_running_loop()
        if self._nc is None:
            self._chain_reconnect(getattr(self.registry, "nc", None))
        if self.registry is not None and self._task is None:
            self._task = asyncio.create_task(self._watch_forever(), name="router-watch")
            if wait_ready:
                try:
                    await asyncio.wait_for(self._ready.wait(), wait_ready)
                except TimeoutError:
                    log.warning("router_not_ready", waited_s=wait_ready)

    def _chain_reconnect(self, nc) -> None:
        """On a connection shared with the runtime, re-read after its reconnects too, keeping any
        callback it set. nats-py keeps one reconnected callback per client, read at each reconnect."""
        if nc is None or not hasattr(nc, "_reconnected_cb"):
            return
        previous = nc._reconnected_cb

        async def reconnected() -> None:
            if previous is not None:
                await previous()
            self.resync()

        nc._reconnected_cb = reconnected

    async def ready(self) -> None:
        await self._ready.wait()

    def resync(self) -> None:
        """Restart the watch: the new one replays the last value of every rollout key, and only
        newer revisions are applied, so anything missed while disconnected is caught up."""
        watcher = self._watcher
        if watcher is not None and self._loop is not None:
            log.info("router_resync")
            self._loop.call_soon_threadsafe(lambda: self._spawn(watcher.stop()))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        tasks = [*self._tasks, *self._appliers.values()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._watcher is not None:
            with contextlib.suppress(Exception):  # the connection may already be gone
                await self._watcher.stop()
        if self._nc is not None:
            await self._nc.close()

    async def _watch_forever(self) -> None:
        backoff = 0.05
        while True:
            try:
                self._watcher = await self.registry.kv.watch("rollout.>")
                backoff = 0.05
                async for entry in self._watcher:
                    if entry is None:  # end of the initial replay
                        if not self._ready.is_set():
                            self._spawn(self._mark_ready())
                        continue
                    await self._on_entry(entry)
                log.info("router_watch_restarted")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep serving the last known state, retry
                log.warning("router_watch_failed", error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _on_entry(self, entry) -> None:
        """Queue the newest revision per agent. Each agent has its own applier, so a slow adapter
        load for one agent never delays another's change, and revisions that arrive while a load
        runs collapse into the latest (a canary rolled back meanwhile is never loaded at all)."""
        agent = parse_rollout_key(entry.key)
        if agent is None:
            return
        current = self._entries.get(agent)
        pending = self._pending.get(agent)
        if (current is not None and entry.revision <= current.revision) or (
                pending is not None and entry.revision <= pending.revision):
            return
        self._pending[agent] = entry
        if agent not in self._appliers:
            self._appliers[agent] = asyncio.create_task(self._applier(agent), name=f"router-apply-{agent}")

    async def _applier(self, agent: tuple[str, str]) -> None:
        try:
            while (entry := self._pending.pop(agent, None)) is not None:
                try:
                    await self._apply_entry(agent, entry)
                except Exception as exc:  # noqa: BLE001 - the next revision or resync retries
                    log.error("rollout_apply_failed", tenant_id=agent[0], agent_id=agent[1],
                              error=f"{type(exc).__name__}: {exc}")
        finally:
            self._appliers.pop(agent, None)

    async def _mark_ready(self) -> None:
        await asyncio.gather(*list(self._appliers.values()), return_exceptions=True)
        self._ready.set()

    async def _apply_entry(self, agent: tuple[str, str], entry) -> None:
        tenant_id, agent_id = agent
        current = self._entries.get(agent)
        if current is not None and entry.revision <= current.revision:
            return
        if entry.operation in ("DEL", "PURGE"):
            with self._mu:
                self._entries.pop(agent, None)
            self._free(tenant_id, agent_id, set())
            self._notify(tenant_id, agent_id, entry.revision, None)
            return
        try:
            doc = RolloutDoc.model_validate_json(entry.value)
        except ValueError as exc:
            log.error("rollout_unreadable", tenant_id=tenant_id, agent_id=agent_id, error=str(exc))
            return
        await self.apply(doc, entry.revision)

    async def apply(self, doc: RolloutDoc, revision: int) -> None:
        """Make `doc` live: load its versions first, then swap the entry in one assignment."""
        t, a = doc.tenant_id, doc.agent_id
        bound = log.bind(tenant_id=t, agent_id=a, revision=revision)
        old = self._entries.get((t, a))
        # Hold old and new aliases while loading, so no unload can race the swap.
        with self._mu:
            self._leases.set_aliases(t, a, doc.aliased() | (old.doc.aliased() if old else set()))
        champion = self._default_for(t, a) if not doc.champion else None
        if doc.champion:
            champion = await self._ready_ref(t, a, doc.champion, "champion", bound)
            if champion is None:  # cannot serve it: keep what calls get today
                self._free(t, a, old.doc.aliased() if old else set())
                return
        challenger = None
        if doc.state == "canary" and doc.challenger:
            challenger = await self._ready_ref(t, a, doc.challenger, "challenger", bound)
        weight = doc.canary_weight if challenger is not None else 0.0
        held = {champion.version} if champion.version else set()
        if challenger is not None:
            held.add(challenger.version)
        with self._mu:
            self._entries[(t, a)] = _Entry(revision, doc, champion, challenger, weight)
        self._free(t, a, held)
        bound.info("rollout_live", champion=doc.champion, challenger=doc.challenger if challenger else None,
                   weight=weight, state=doc.state)
        self._notify(t, a, revision, doc)

    async def _ready_ref(self, t: str, a: str, version: str, arm, bound) -> ModelRef | None:
        key = (t, a, version)
        manifest = self._manifests.get(key)
        if manifest is None:
            manifest = await self.registry.get_manifest(t, a, version) if self.registry else None
            if manifest is None:
                bound.error("manifest_missing", version=version)
                return None
            self._manifests[key] = manifest
        ref = ref_for(manifest, arm)
        if self.backend is not None:
            try:
                async with self._lock(key):
                    if key not in self._loaded:
                        await self.backend.load(ref)
                        self._loaded.add(key)
            except Exception as exc:  # noqa: BLE001 - a bad version must not take calls down
                bound.error("version_load_failed", version=version, error=f"{type(exc).__name__}: {exc}")
                return None
        return ref

    def _free(self, t: str, a: str, held: set[str]) -> None:
        with self._mu:
            freed = self._leases.set_aliases(t, a, held)
        for key in freed:
            manifest = self._manifests.get(key)
            if manifest is not None:
                self._spawn_unload(ref_for(manifest, "champion"))

    def _notify(self, t: str, a: str, revision: int, doc: RolloutDoc | None) -> None:
        for fn in self._listeners:
            try:
                fn(t, a, revision, doc)
            except Exception as exc:  # noqa: BLE001
                log.warning("router_listener_failed", error=str(exc))

    def _lock(self, key: VersionKey) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _spawn_unload(self, ref: ModelRef) -> None:
        if self.backend is not None and ref.version is not None:
            self._spawn(self._unload(ref))

    async def _unload(self, ref: ModelRef) -> None:
        key = ref.key
        async with self._lock(key):
            # Re-check under the lock: a new rollout or a new call may hold it again by now.
            with self._mu:
                if key not in self._loaded or self._leases.held(key):
                    return
            try:
                await self.backend.unload(ref)
            except Exception as exc:  # noqa: BLE001
                log.warning("version_unload_failed", version=ref.version, error=str(exc))
                return
            self._loaded.discard(key)
            log.info("version_unloaded", tenant_id=ref.tenant_id, agent_id=ref.agent_id, version=ref.version)
