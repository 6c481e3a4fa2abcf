"""The NATS JetStream edge of ingest: connection options (reconnect, auth, TLS), `ensure_bus` (stream,
dead-letter stream, durable pull consumer; idempotent) and `Ingestor`, the loop that moves events from
the stream into an `EventStore`: fetch a batch, validate (agent_dpo/ingest.py), dead-letter the bad,
write the good in one transaction, then ack. Nothing is acked before it is stored or dead-lettered."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api
from nats.js.client import JetStreamContext

from agent_dpo.config import BusConfig, NatsAuth
from agent_dpo.errors import AgentDpoError
from agent_dpo.ingest import Incoming, Rejected, dead_letter_msg_id, store_failure, triage, undeliverable
from agent_dpo.logs import get_logger
from agent_dpo.store import DeadLetter, EventStore, WriteResult

log = get_logger(component="nats_bus")


# ---- connection -----------------------------------------------------------------------------------

def connect_options(auth: NatsAuth) -> dict[str, Any]:
    """nats-py keyword arguments for authentication and TLS."""
    opts: dict[str, Any] = {}
    if auth.user:
        opts["user"], opts["password"] = auth.user, auth.password
    if auth.token:
        opts["token"] = auth.token
    if auth.nkey_seed_file:
        opts["nkeys_seed"] = auth.nkey_seed_file
    if auth.creds_file:
        opts["user_credentials"] = auth.creds_file
    if auth.uses_tls:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=auth.tls_ca)
        if auth.tls_cert:
            context.load_cert_chain(auth.tls_cert, auth.tls_key)
        opts["tls"] = context
    return opts


async def connect(url: str, auth: NatsAuth | None = None, *, name: str = "agent-dpo",
                  connect_timeout: float = 5.0) -> Client:
    """Connect with reconnects that never give up: a restarted server is picked up again, and
    publishes/acks made while it is away are buffered and sent after the reconnect. `url` may list
    several servers of a cluster, comma-separated."""
    auth = auth or NatsAuth()
    servers = [u.strip() for u in url.split(",") if u.strip()]

    errors: list[str] = []  # the last one, for the error message if the first connection fails

    async def on_error(exc: Exception) -> None:
        errors[:] = [f"{type(exc).__name__}: {exc}"[:300]]
        log.warning("nats_error", error=errors[-1])

    client: list[Client] = []

    async def on_disconnected() -> None:
        if client and not client[0].is_closed:  # a deliberate close also reports a disconnect
            log.warning("nats_disconnected", url=url)

    async def on_reconnected() -> None:
        log.info("nats_reconnected", url=url)

    try:
        # nats-py can hang after a failed TLS handshake, even while being cancelled; the first
        # attempt gets a deadline, and a hung attempt is cancelled without waiting on it.
        attempt = asyncio.ensure_future(nats.connect(
            servers, name=name, connect_timeout=connect_timeout, allow_reconnect=True,
            # A few tries for the first connection (a wrong URL fails fast, as a one-line error) ...
            max_reconnect_attempts=2, reconnect_time_wait=0.5, ping_interval=10, max_outstanding_pings=3,
            # Our subjects are built from validated ids; acks are reply subjects from the server.
            skip_subject_validation=True,
            error_cb=on_error, disconnected_cb=on_disconnected, reconnected_cb=on_reconnected,
            **connect_options(auth)))
        done, _ = await asyncio.wait({attempt}, timeout=connect_timeout + 3)
        if not done:
            attempt.cancel()
            raise TimeoutError(f"no connection within {connect_timeout + 3:.0f}s")
        nc = attempt.result()
        client.append(nc)
        # ... and, once connected, reconnects that never give up (nats-py reads this option on each one).
        nc.options["max_reconnect_attempts"] = -1
        return nc
    except (TimeoutError, OSError, nats.errors.Error, ssl.SSLError) as exc:
        detail = errors[-1] if errors else (str(exc) or type(exc).__name__)
        raise AgentDpoError(f"cannot connect to NATS at {url} (auth: {auth.describe()}): {detail}") from None


# ---- bus init -------------------------------------------------------------------------------------

def _seconds(value: float | None) -> float:
    return round(float(value or 0.0), 3)


def stream_config(bus: BusConfig) -> api.StreamConfig:
    return api.StreamConfig(
        name=bus.stream, subjects=bus.subjects, storage=api.StorageType.FILE,
        retention=api.RetentionPolicy.LIMITS, duplicate_window=bus.duplicate_window_s,
        max_age=bus.max_age_s, num_replicas=bus.replicas,
        description="agent-dpo: agent call events (contract v1)")


def dlq_stream_config(bus: BusConfig) -> api.StreamConfig:
    return api.StreamConfig(
        name=bus.dlq_stream, subjects=bus.dlq_subjects, storage=api.StorageType.FILE,
        retention=api.RetentionPolicy.LIMITS, duplicate_window=bus.duplicate_window_s,
        num_replicas=bus.replicas, description="agent-dpo: messages that broke the contract, bytes unchanged")


def consumer_config(bus: BusConfig) -> api.ConsumerConfig:
    return api.ConsumerConfig(
        name=bus.consumer, durable_name=bus.consumer, deliver_policy=api.DeliverPolicy.ALL,
        ack_policy=api.AckPolicy.EXPLICIT, ack_wait=bus.ack_wait_s, max_deliver=bus.max_deliver,
        backoff=list(bus.backoff_s) or None, max_ack_pending=bus.max_ack_pending,
        description="agent-dpo ingest")


def _stream_diff(have: api.StreamConfig, want: api.StreamConfig) -> list[str]:
    diffs = []
    if sorted(have.subjects or []) != sorted(want.subjects or []):
        diffs.append("subjects")
    if _seconds(have.duplicate_window) != _seconds(want.duplicate_window):
        diffs.append("duplicate_window")
    if _seconds(have.max_age) != _seconds(want.max_age):
        diffs.append("max_age")
    if (have.num_replicas or 1) != (want.num_replicas or 1):
        diffs.append("num_replicas")
    if have.storage != want.storage:
        diffs.append("storage")
    return diffs


def _consumer_diff(have: api.ConsumerConfig, want: api.ConsumerConfig) -> list[str]:
    diffs = []
    if _seconds(have.ack_wait) != _seconds(want.ack_wait):
        diffs.append("ack_wait")
    for name in ("max_deliver", "max_ack_pending", "ack_policy"):
        if getattr(have, name) != getattr(want, name):
            diffs.append(name)
    if [_seconds(b) for b in have.backoff or []] != [_seconds(b) for b in want.backoff or []]:
        diffs.append("backoff")
    return diffs


async def _ensure_stream(js: JetStreamContext, want: api.StreamConfig, update: bool) -> str:
    try:
        info = await js.stream_info(want.name)
    except nats.js.errors.NotFoundError:
        await js.add_stream(want)
        return "created"
    diffs = _stream_diff(info.config, want)
    if diffs and not update:
        return "differs " + ",".join(diffs) + " (left as is; run `agent-dpo bus init` to apply)"
    if "storage" in diffs:
        raise AgentDpoError(f"stream {want.name} exists with {info.config.storage} storage; "
                            "storage cannot be changed in place (delete the stream or pick another name)")
    if not diffs:
        return "unchanged"
    # update_stream replaces the whole config: start from what the server has, change only our fields.
    merged = info.config.evolve(subjects=want.subjects, duplicate_window=want.duplicate_window,
                                max_age=want.max_age, num_replicas=want.num_replicas,
                                description=want.description)
    await js.update_stream(merged)
    return "updated " + ",".join(diffs)


async def ensure_bus(js: JetStreamContext, bus: BusConfig, *, update: bool = True) -> dict[str, str]:
    """Create or update the event stream, the dead-letter stream and the ingest consumer.
    Running it twice leaves the same state; changed settings are applied. With `update=False`
    (ingest, serve) missing resources are created but existing ones are left as `bus init` set them.
    Returns what happened to each resource."""
    try:
        result = {
            bus.stream: await _ensure_stream(js, stream_config(bus), update),
            bus.dlq_stream: await _ensure_stream(js, dlq_stream_config(bus), update),
        }
        want = consumer_config(bus)
        try:
            have = (await js.consumer_info(bus.stream, bus.consumer)).config
            diffs = _consumer_diff(have, want)
        except nats.js.errors.NotFoundError:
            diffs = None
        if diffs is None or (diffs and update):
            # CONSUMER.CREATE with a name creates, or updates the changeable settings of, the durable.
            await js.add_consumer(bus.stream, want)
        if diffs is None:
            status = "created"
        elif not diffs:
            status = "unchanged"
        else:
            status = ("updated " if update else "differs (left as is) ") + ",".join(diffs)
        result[f"{bus.stream}/{bus.consumer}"] = status
    except nats.js.errors.APIError as exc:
        raise AgentDpoError(f"bus init failed: {exc.description or exc}") from None
    except (TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError):
        raise AgentDpoError("bus init failed: JetStream did not answer (is JetStream enabled?)") from None
    return result


# ---- pulling batches ------------------------------------------------------------------------------

class BatchPuller:
    """Pulls from a durable consumer with one outstanding pull request at a time; a subscription
    callback collects the messages. Cheaper per message than `PullSubscription.fetch` (no task and
    timer per message), which matters at tens of thousands of events per second.

    A request asks for `batch` messages and expires after `expires_s`; JetStream ends it with a status
    (404/408/409) or by delivering them all. A partial batch is handed out once nothing more arrived
    for `linger_s`; the request then stays open as a long poll. After a reconnect a lost request is
    simply re-sent when its deadline passes; messages that arrive late still land in the buffer."""

    def __init__(self, nc: Client, stream: str, consumer: str, batch: int, *, expires_s: float = 1.0,
                 linger_s: float = 0.01, api_prefix: str = "$JS.API"):
        self.nc = nc
        self.batch = batch
        self.expires_s = expires_s
        self.linger_s = linger_s
        self._next_subject = f"{api_prefix}.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._buffer: list[Msg] = []
        self._wake = asyncio.Event()
        self._open = False
        self._requested = 0
        self._delivered = 0
        self._request_deadline = 0.0
        self._pause_until = 0.0
        self._inbox = ""
        self._sub = None
        self.last_status: str | None = None

    async def start(self) -> BatchPuller:
        self._inbox = self.nc.new_inbox()
        self._sub = await self.nc.subscribe(self._inbox, cb=self._on_msg)
        return self

    async def close(self) -> list[Msg]:
        """Wait for the open pull request to end (at most until its expiry), stop, and hand back what
        was delivered but not taken, so the caller can nak it for prompt redelivery."""
        while self._open and self._sub is not None:
            left = self._request_deadline - time.monotonic()
            if left <= 0:
                break
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except TimeoutError:
                break
        await self.stop()
        return self._take()

    async def stop(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except nats.errors.Error:
                pass  # connection already gone; nothing to clean up server-side
            self._sub = None

    async def _on_msg(self, msg: Msg) -> None:
        if not msg.reply:
            # No ack subject: a status from JetStream, not a stream message (those always have one).
            headers = msg.headers or {}
            status = headers.get("Status", "")
            if status == "100":
                return  # idle heartbeat or flow control
            self._open = False
            if status == "409":
                # e.g. "Exceeded MaxAckPending", "Leadership Change": wait a moment before asking again.
                text = f"{status} {headers.get('Description', '')}".strip()
                if text != self.last_status:
                    log.warning("pull_status", status=text)
                self.last_status = text
                self._pause_until = time.monotonic() + 0.1
            self._wake.set()
            return
        self._buffer.append(msg)
        self._delivered += 1
        if self._delivered >= self._requested:
            self._open = False
        if len(self._buffer) >= self.batch:
            self._wake.set()

    async def _request(self) -> None:
        self._requested, self._delivered, self._open = self.batch, 0, True
        self._request_deadline = time.monotonic() + self.expires_s + 1.0
        body = json.dumps({"batch": self.batch, "expires": int(self.expires_s * 1e9)}).encode()
        await self.nc.publish(self._next_subject, body, reply=self._inbox)

    def _take(self) -> list[Msg]:
        msgs, self._buffer = self._buffer, []
        return msgs

    async def next_batch(self, wait_s: float) -> list[Msg]:
        """Up to about `batch` messages; [] if none arrived within `wait_s`."""
        deadline = time.monotonic() + wait_s
        while True:
            now = time.monotonic()
            if len(self._buffer) >= self.batch:
                return self._take()
            if not self._open or now >= self._request_deadline:
                if self._buffer:
                    return self._take()
                if now < self._pause_until:
                    await asyncio.sleep(self._pause_until - now)
                    continue
                await self._request()
            if self._buffer:
                seen = len(self._buffer)
                timeout = self.linger_s
            else:
                seen = 0
                timeout = min(deadline, self._request_deadline) - now
                if timeout <= 0:
                    return []
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                if self._buffer and len(self._buffer) == seen:
                    return self._take()  # nothing more for linger_s: hand out the partial batch
                if not self._buffer and time.monotonic() >= deadline:
                    return []


def delivery_info(msg: Msg) -> tuple[int, int]:
    """(stream sequence, times delivered) from the ack subject, without building full metadata."""
    tokens = msg.reply.split(".")
    if len(tokens) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ts>.<pending>
        return int(tokens[5]), int(tokens[4])
    md = msg.metadata  # the newer form with domain and account hash
    return md.sequence.stream, md.num_delivered


# ---- ingest ---------------------------------------------------------------------------------------

@dataclass
class IngestStats:
    batches: int = 0
    messages: int = 0
    inserted: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    naks: int = 0
    store_retries: int = 0
    fetch_errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def _never_transient(_exc: BaseException) -> bool:
    return False


class Ingestor:
    """Moves events from the durable consumer into `store`. Owns one worker thread for store writes
    (so the event loop keeps answering pings and sending in-progress acks while SQLite works) and
    at most two batches: the one being written and the next one fetched.

    Stop it by setting `stop` (SIGTERM does this in the CLI): the batch in hand is finished and acked."""

    def __init__(self, nc: Client, store: EventStore, bus: BusConfig, *,
                 is_transient: Callable[[BaseException], bool] = _never_transient,
                 stop: asyncio.Event | None = None):
        self.nc = nc
        self.js = nc.jetstream()
        self.store = store
        self.bus = bus
        self.is_transient = is_transient
        self.stop = stop or asyncio.Event()
        self.stats = IngestStats()
        self._pending_dead_letters: list[DeadLetter] = []  # dead-lettered after a store failure
        self._last_arrival = time.monotonic()
        self._executor: ThreadPoolExecutor | None = None
        self._fetched = 0
        self._last_progress = time.monotonic()
        self._exhausted: list[tuple[int, int]] = []  # (stream seq, deliveries) JetStream gave up on

    async def run(self, *, until_idle: float | None = None, stop_after: int | None = None) -> IngestStats:
        """Ingest until `stop` is set, or `until_idle` seconds pass with nothing new, or (benchmarks,
        tests) `stop_after` messages have been handled."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
        inflight: asyncio.Task | None = None
        puller: BatchPuller | None = None
        advisories = None
        last_report = time.monotonic()
        self._last_arrival = time.monotonic()
        try:
            puller = await self._subscribe()
            advisories = await self.nc.subscribe(
                f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{self.bus.stream}.{self.bus.consumer}",
                cb=self._on_max_deliveries)
            while not self.stop.is_set():
                if self._exhausted:
                    await self._dead_letter_exhausted()
                msgs = await self._fetch(puller)
                # At most one batch is being written while the next is fetched: backpressure.
                if inflight is not None:
                    await inflight
                    inflight = None
                if msgs:
                    self._last_arrival = time.monotonic()
                    inflight = asyncio.create_task(self._handle(msgs), name="ingest-batch")
                    self._fetched += len(msgs)
                    if stop_after is not None and self._fetched >= stop_after:
                        break
                elif until_idle is not None and await self._idle_done(until_idle):
                    break
                if time.monotonic() - last_report >= 10.0:
                    last_report = time.monotonic()
                    log.info("ingest_progress", **self.stats.as_dict())
            if inflight is not None:
                await inflight
            # Delivered to us but not handled: give them back now rather than after the ack wait.
            for msg in await puller.close():
                await msg.nak()
            await self._flush_dead_letter_records()
            try:
                await self.nc.flush(timeout=5)
            except (TimeoutError, nats.errors.Error):
                log.warning("ack_flush_failed")  # unflushed acks mean redelivery, and ingest is idempotent
        finally:
            if inflight is not None and not inflight.done():
                inflight.cancel()
            if puller is not None:
                await puller.stop()
            if advisories is not None:
                try:
                    await advisories.unsubscribe()
                except nats.errors.Error:
                    pass  # connection already gone
            self._executor.shutdown(wait=True)
        return self.stats

    async def _subscribe(self) -> BatchPuller:
        while True:
            try:
                await self.js.consumer_info(self.bus.stream, self.bus.consumer)
                return await BatchPuller(self.nc, self.bus.stream, self.bus.consumer, self.bus.batch_size,
                                         expires_s=self.bus.fetch_timeout_s).start()
            except nats.js.errors.NotFoundError:
                raise AgentDpoError(f"consumer {self.bus.consumer} on stream {self.bus.stream} not found: "
                                    "run `agent-dpo bus init` first") from None
            except (TimeoutError, nats.errors.Error) as exc:
                if self.stop.is_set():
                    raise AgentDpoError("stopped before the consumer could be bound") from None
                log.warning("subscribe_retry", error=str(exc) or type(exc).__name__)
                await asyncio.sleep(0.5)

    async def _fetch(self, puller: BatchPuller) -> list[Msg]:
        try:
            return await puller.next_batch(self.bus.fetch_timeout_s)
        except nats.errors.ConnectionClosedError:
            raise AgentDpoError("NATS connection closed") from None
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            # While the server restarts: 503s, reconnecting errors, stale pull requests. Retry.
            self.stats.fetch_errors += 1
            log.warning("fetch_retry", error=f"{type(exc).__name__}: {exc}"[:200])
            await asyncio.sleep(0.25)
            return []

    async def _idle_done(self, until_idle: float) -> bool:
        """Idle means nothing new arrived for `until_idle` seconds and nothing is still owed a
        redelivery (a nak'ed batch comes back later; leaving now would strand it until the next run)."""
        idle = time.monotonic() - self._last_arrival
        if idle < until_idle or self._exhausted:
            return False
        try:
            info = await self.js.consumer_info(self.bus.stream, self.bus.consumer, timeout=2)
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error):
            return False
        outstanding = (info.num_pending or 0) + (info.num_ack_pending or 0)
        # Give up on waiting for outstanding messages after one full redelivery cycle.
        if outstanding and idle < until_idle + self.bus.nak_delay_s + self.bus.ack_wait_s:
            return False
        await asyncio.sleep(0.2)  # a max-deliveries advisory may still be on its way
        return not self._exhausted

    # ---- messages JetStream gave up on ------------------------------------------------------------

    async def _on_max_deliveries(self, msg: Msg) -> None:
        try:
            advisory = json.loads(msg.data)
            self._exhausted.append((int(advisory["stream_seq"]), int(advisory.get("deliveries", 0))))
        except (ValueError, KeyError, TypeError):
            log.warning("bad_advisory", data=msg.data[:200])

    async def _dead_letter_exhausted(self) -> None:
        """A backstop: normally the last delivery is dead-lettered by `_store_failed`; this catches a
        message whose every delivery died with the process. Idempotent (dead letters are keyed by seq)."""
        exhausted, self._exhausted = self._exhausted, []
        for seq, deliveries in exhausted:
            try:
                raw = await self.js.get_msg(self.bus.stream, seq)
            except nats.js.errors.NotFoundError:
                continue
            except (TimeoutError, nats.errors.Error, nats.js.errors.Error):
                self._exhausted.append((seq, deliveries))  # try again after the next batch
                return
            item = Incoming(0, raw.subject, raw.data or b"", seq, deliveries)
            rej = undeliverable(item, self.bus.subject_prefix)
            if await self._dead_letter(rej, log_level="error"):
                self._pending_dead_letters.append(rej.dead_letter())
            else:
                self._exhausted.append((seq, deliveries))

    # ---- one batch --------------------------------------------------------------------------------

    async def _handle(self, msgs: list[Msg]) -> None:
        incoming = []
        for i, msg in enumerate(msgs):
            seq, delivered = delivery_info(msg)
            incoming.append(Incoming(i, msg.subject, msg.data, seq, delivered))
        result = triage(incoming, self.bus.subject_prefix)
        self.stats.batches += 1
        self.stats.messages += len(msgs)

        # Dead letters first: a rejected message is acked only once its bytes are in the DLQ stream.
        dead_records: list[DeadLetter] = []
        to_ack: list[Msg] = []
        for rej in result.rejected:
            if await self._dead_letter(rej, log_level="warning"):
                dead_records.append(rej.dead_letter())
                to_ack.append(msgs[rej.incoming.index])
        dead_records.extend(self._pending_dead_letters)
        self._pending_dead_letters = []

        events = result.events
        try:
            last_chance = any(item.num_delivered >= self.bus.max_deliver for item, _ in result.accepted)
            written = await self._write(events, dead_records, msgs, last_chance=last_chance)
        except Exception as exc:  # noqa: BLE001 - every store failure is handled per message below
            await self._store_failed(result.accepted, dead_records, msgs, exc)
            written = None
        if written is not None:
            self._count(written)
            to_ack.extend(msgs[item.index] for item, _ in result.accepted)
        for msg in to_ack:
            await msg.ack()  # fire-and-forget: a lost ack means a redelivery, which changes nothing

    async def _write(self, events: Sequence, dead_letters: Sequence[DeadLetter], msgs: list[Msg], *,
                     last_chance: bool = False) -> WriteResult:
        """One transaction; transient errors (a locked database) are retried here, holding the batch
        with in-progress acks so it is not redelivered elsewhere, and fetching nothing meanwhile.
        After `store_retry_s` the batch is nak'ed with a delay, unless it holds a message on its last
        delivery: then it is held until the store recovers, since a busy disk is no reason to
        dead-letter a valid event."""
        deadline = time.monotonic() + self.bus.store_retry_s
        delay = 0.05
        while True:
            try:
                return await self._in_store_thread(msgs, events, dead_letters)
            except Exception as exc:
                if not self.is_transient(exc) or self.stop.is_set() or \
                        (time.monotonic() >= deadline and not last_chance):
                    raise
                self.stats.store_retries += 1
                log.warning("store_busy", error=str(exc)[:200], retry_in_s=delay, events=len(events))
                await self._hold(msgs, delay)
                delay = min(delay * 2, 2.0)

    async def _in_store_thread(self, msgs: list[Msg], events: Sequence,
                               dead_letters: Sequence[DeadLetter] = ()) -> WriteResult:
        """`store.write_batch` on the writer thread; a slow write (fsync stall, busy wait) keeps its
        messages from being redelivered with in-progress acks."""
        future = asyncio.get_running_loop().run_in_executor(
            self._executor, self.store.write_batch, events, dead_letters)
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(future), self.bus.ack_wait_s / 3)
            except TimeoutError:
                log.warning("store_slow", events=len(events))
                await self._progress(msgs)

    async def _hold(self, msgs: list[Msg], seconds: float) -> None:
        """Sleep while keeping `msgs` ours."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if time.monotonic() - self._last_progress > self.bus.ack_wait_s / 3:
                await self._progress(msgs)
            await asyncio.sleep(min(left, self.bus.ack_wait_s / 3))

    async def _progress(self, msgs: list[Msg]) -> None:
        self._last_progress = time.monotonic()
        for msg in msgs:
            await msg.in_progress()

    async def _store_failed(self, accepted: list, dead_records: list[DeadLetter], msgs: list[Msg],
                            exc: Exception) -> None:
        """The batch could not be written. A poison event is found by writing events one by one
        (unless the whole store is unavailable); what still fails is nak'ed with a delay, or
        dead-lettered with the store's error on its last allowed delivery."""
        log.warning("store_failed", error=f"{type(exc).__name__}: {exc}"[:300], events=len(accepted))
        if dead_records:
            self._pending_dead_letters.extend(dead_records)  # recorded with a later batch
        failed: list[tuple[Any, Any, BaseException]] = []
        if len(accepted) > 1 and not self.is_transient(exc):
            for item, stored in accepted:
                try:
                    written = await self._in_store_thread([msgs[item.index]], [stored])
                except Exception as one_exc:  # noqa: BLE001
                    failed.append((item, stored, one_exc))
                else:
                    self._count(written)
                    await msgs[item.index].ack()
        else:
            failed = [(item, stored, exc) for item, stored in accepted]
        for item, stored, err in failed:
            msg = msgs[item.index]
            if item.num_delivered >= self.bus.max_deliver and not self.is_transient(err):
                rej = store_failure(item, stored.event, err)
                if await self._dead_letter(rej, log_level="error", call_id=stored.event.call_id,
                                           event_id=stored.event.event_id):
                    self._pending_dead_letters.append(rej.dead_letter())
                    await msg.ack()
                    continue
            self.stats.naks += 1
            await msg.nak(delay=self.bus.nak_delay_s)
        if self.is_transient(exc):
            # The store is down: wait before fetching more rather than spin through redeliveries.
            await asyncio.sleep(min(self.bus.nak_delay_s, 5.0))

    async def _dead_letter(self, rej: Rejected, *, log_level: str, **context: str) -> bool:
        item = rej.incoming
        bound = log.bind(tenant_id=rej.rejection.tenant_id, agent_id=rej.rejection.agent_id,
                         stream_seq=item.stream_seq, subject=item.subject[:200], code=rej.rejection.code,
                         **context)
        headers = {**rej.headers(), "Nats-Msg-Id": dead_letter_msg_id(self.bus.stream, item.stream_seq)}
        try:
            await self.js.publish(rej.rejection.dlq_subject, item.payload, headers=headers, timeout=5)
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
            # Not acked: the message comes back and is dead-lettered on a later delivery.
            bound.warning("dead_letter_publish_failed", error=str(exc) or type(exc).__name__)
            return False
        self.stats.dead_letters += 1
        getattr(bound, log_level)("event_dead_lettered", reason=rej.rejection.reason,
                                  dlq_subject=rej.rejection.dlq_subject, delivered=item.num_delivered)
        return True

    async def _flush_dead_letter_records(self) -> None:
        if not self._pending_dead_letters:
            return
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self.store.write_batch, [], self._pending_dead_letters)
            self._pending_dead_letters = []
        except Exception as exc:  # noqa: BLE001 - the dead letters themselves are safe in the DLQ stream
            log.warning("dead_letter_records_lost", count=len(self._pending_dead_letters), error=str(exc)[:200])

    def _count(self, written: WriteResult) -> None:
        self.stats.inserted += written.inserted
        self.stats.duplicates += written.duplicates
        log.debug("batch_written", inserted=written.inserted, duplicates=written.duplicates,
                  dead_letters=written.dead_letters)
