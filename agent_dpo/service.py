"""The service's loops, each a function over one `ServiceContext`, owned and cancelled by `agent-dpo
serve` (cli/serve.py): ingest (noting the calls each batch touched), the training trigger (enough new
pairs -> export -> job on the bus), job results (artifact -> held-out eval -> manifest -> canary), the
canary (decisions, fed with calls ingest just stored), an optional in-process worker, and the gateway.

Policy file (`agent-dpo serve --policy FILE`), every key optional; flags override `[serve]` keys:

    [serve]
    train_after_pairs = 500    # new DPO pairs (train split) since the agent's last job
    check_interval_s = 30      # how often the trigger looks (only agents with new complete calls)
    judge = "auto"             # auto (rubric for the example agents, else none) | rubric | openai:MODEL | none
    canary_interval_s = 5
    settle_s = 60              # an ended call counts for the canary once it has CSAT, or after this long
    worker = false             # also train in this process (single machine)
    gateway_port = 8080        # 0: no gateway
    gateway_host = "127.0.0.1"
    [train]                    # TrainConfig (agent_dpo/training/config.py)
    [eval]                     # EvalSettings: seed, max_pairs, max_prompts, max_new_tokens, batch_size, device
    [gates]                    # EvalGates: min_preference_accuracy, min_win_rate, ...
    [canary]                   # CanaryPolicy: steps, min_calls_per_step, min_feedback, max_csat_drop, ...
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import os
import shutil
import threading
import time
import tomllib
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats.errors

from agent_dpo.canary import CanaryPolicy, EvalGates
from agent_dpo.config import Settings
from agent_dpo.errors import AgentDpoError, UsageError
from agent_dpo.evaluation import EvalSettings
from agent_dpo.logs import get_logger
from agent_dpo.registry import RegistryError, utc_now
from agent_dpo.training.config import TrainConfig

log = get_logger(component="serve")
STATUS_CONSUMER = "agent-dpo-serve"
TOUCHED_MAX = 1_000_000  # calls noted between two canary rounds; beyond this the oldest are dropped
FED_MAX = 200_000  # calls already counted for the canary, remembered so none counts twice


# ---- policy ---------------------------------------------------------------------------------------

@dataclass
class ServicePolicy:
    train_after_pairs: int = 500
    check_interval_s: float = 30.0
    judge: str = "auto"
    canary_interval_s: float = 5.0
    settle_s: float = 60.0
    worker: bool = False
    gateway_port: int = 8080
    gateway_host: str = "127.0.0.1"
    gateway_port_given: bool = False  # an explicit port that is busy is an error; the default is skipped
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: dict[str, Any] = field(default_factory=dict)
    gates: EvalGates = field(default_factory=EvalGates)
    canary: CanaryPolicy = field(default_factory=CanaryPolicy)

    def __post_init__(self) -> None:
        if self.train_after_pairs < 1:
            raise UsageError(f"train_after_pairs must be at least 1, not {self.train_after_pairs}")
        if not 0 <= self.gateway_port <= 65535:
            raise UsageError(f"gateway port must be 0 (off) or 1-65535, not {self.gateway_port}")
        for name in ("check_interval_s", "canary_interval_s"):
            if not getattr(self, name) > 0:
                raise UsageError(f"{name} must be positive")
        unknown = set(self.eval) - {f.name for f in dataclasses.fields(EvalSettings)}
        if unknown:
            raise UsageError(f"policy [eval]: unknown key(s) {', '.join(sorted(unknown))}")

    @classmethod
    def from_file(cls, path: str | Path | None, **overrides: Any) -> ServicePolicy:
        """Defaults < the policy file < overrides that were given (not None)."""
        data: dict[str, Any] = {}
        if path:
            try:
                data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
            except OSError as exc:
                raise UsageError(f"cannot read policy file {path}: {exc.strerror}") from None
            except tomllib.TOMLDecodeError as exc:
                raise UsageError(f"policy file {path} does not parse: {exc}") from None
        unknown = set(data) - {"serve", "train", "eval", "gates", "canary"}
        if unknown:
            raise UsageError(f"policy file {path}: unknown table(s) {', '.join(sorted(unknown))}")
        serve = dict(data.get("serve", {}))
        fields = {f.name for f in dataclasses.fields(cls)} - {"train", "eval", "gates", "canary",
                                                                "gateway_port_given"}
        bad = set(serve) - fields
        if bad:
            raise UsageError(f"policy [serve]: unknown key(s) {', '.join(sorted(bad))}")
        serve.update({k: v for k, v in overrides.items() if v is not None})
        try:
            canary = dict(data.get("canary", {}))
            if "steps" in canary:
                canary["steps"] = tuple(float(s) for s in canary["steps"])
            return cls(train=TrainConfig.from_dict(data.get("train", {})), eval=dict(data.get("eval", {})),
                       gates=EvalGates(**data.get("gates", {})), canary=CanaryPolicy(**canary), **serve)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"policy: {exc}") from None

    def eval_settings(self) -> EvalSettings:
        values = dict(self.eval)
        if "max_length" not in values and self.train.truncation_mode == "keep_end":
            values["max_length"] = self.train.max_length  # score and generate in the training window
        return EvalSettings(beta=self.train.beta, **values)


# ---- what the training trigger remembers across restarts -------------------------------------------

class TrainingState:
    """Per agent: DPO pairs at the last enqueued job, that job and whether it is still running.
    A small JSON file under the store, written atomically after every change."""

    def __init__(self, path: Path):
        self.path = path
        self.agents: dict[str, dict[str, Any]] = {}
        if path.is_file():
            try:
                self.agents = json.loads(path.read_text(encoding="utf-8")).get("agents", {})
            except ValueError:
                raise AgentDpoError(f"{path} is not JSON; fix or remove it") from None

    def get(self, tenant_id: str, agent_id: str) -> dict[str, Any]:
        return self.agents.get(f"{tenant_id}/{agent_id}", {})

    def update(self, tenant_id: str, agent_id: str, **values: Any) -> None:
        self.agents.setdefault(f"{tenant_id}/{agent_id}", {}).update(values)
        self.save()

    def job_ended(self, job_id: str, state: str) -> None:
        for entry in self.agents.values():
            if entry.get("job_id") == job_id and entry.get("in_flight"):
                entry.update(in_flight=False, job_state=state, ended_at=utc_now())
                self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"agents": self.agents}, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)


# ---- the context every task gets -------------------------------------------------------------------

@dataclass
class ServiceContext:
    """What every service task gets. A task runs until `stop` is set, then returns promptly."""

    nc: Any  # nats.aio.client.Client
    nats_url: str
    settings: Settings
    store_dir: Path
    stop: asyncio.Event
    policy: ServicePolicy = field(default_factory=ServicePolicy)
    registry: Any = None  # NatsRegistry
    canary: Any = None  # CanaryController, shared by job results (start) and the canary loop
    state: TrainingState | None = None
    # (tenant, agent, call_id) of every event ingest stored, drained by the canary loop
    touched: deque = field(default_factory=lambda: deque(maxlen=TOUCHED_MAX))


ServiceTask = Callable[[ServiceContext], Awaitable[None]]


async def open_context(nc, nats_url: str, settings: Settings, store_dir: Path, stop: asyncio.Event,
                       policy: ServicePolicy) -> ServiceContext:
    from agent_dpo.canary import CanaryController
    from agent_dpo_adapters.nats_registry import NatsRegistry

    registry = await NatsRegistry.open(nc)
    return ServiceContext(nc=nc, nats_url=nats_url, settings=settings, store_dir=store_dir, stop=stop,
                          policy=policy, registry=registry,
                          canary=CanaryController(registry, policy.canary, policy.gates, actor="serve"),
                          state=TrainingState(store_dir / "serve" / "training-state.json"))


async def sleep_until_stop(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass


# ---- ingest ---------------------------------------------------------------------------------------

class TouchRecorder:
    """The store as ingest sees it: every written batch also notes the calls it touched, so the
    canary reads back only those calls instead of scanning the store."""

    def __init__(self, store, touched: deque):
        self._store = store
        self._touched = touched

    def write_batch(self, events, dead_letters=()):
        result = self._store.write_batch(events, dead_letters)
        # deque.append is atomic: safe from ingest's writer thread.
        for stored in events:
            e = stored.event
            self._touched.append((e.tenant_id, e.agent_id, e.call_id))
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


async def ingest_task(ctx: ServiceContext) -> None:
    from agent_dpo_adapters.nats_bus import Ingestor
    from agent_dpo_adapters.sqlite_store import SqliteStore, is_transient

    store = SqliteStore(ctx.store_dir)
    try:
        await Ingestor(ctx.nc, TouchRecorder(store, ctx.touched), ctx.settings.bus, is_transient=is_transient,
                       stop=ctx.stop).run()
    finally:
        store.close()


# ---- training trigger -------------------------------------------------------------------------------

async def training_task(ctx: ServiceContext) -> None:
    """Every check interval: for agents with new complete calls and no job running, count the DPO
    pairs of the train split; with `train_after_pairs` more than at the last job, enqueue one."""
    from agent_dpo_adapters.sqlite_store import SqliteStore

    reader = SqliteStore(ctx.store_dir)
    seen: dict[tuple[str, str], int] = {}
    try:
        while not ctx.stop.is_set():
            try:
                await check_training(ctx, reader, seen)
            except (AgentDpoError, OSError, TimeoutError, nats.errors.Error) as exc:
                # The store busy, NATS away for a moment: the next round tries again.
                log.warning("training_check_failed", error=f"{type(exc).__name__}: {exc}"[:300])
            await sleep_until_stop(ctx.stop, ctx.policy.check_interval_s)
    finally:
        reader.close()


async def check_training(ctx: ServiceContext, reader, seen: dict[tuple[str, str], int]) -> list[str]:
    """One round of the trigger; returns the job ids it enqueued."""
    from agent_dpo_adapters.sqlite_store import UNKNOWN

    enqueued = []
    for st in await asyncio.to_thread(reader.status):
        key = (st.tenant_id, st.agent_id)
        if UNKNOWN in key or not st.complete_calls or seen.get(key) == st.complete_calls:
            continue
        if ctx.state.get(*key).get("in_flight"):
            continue  # looked at again once the job has ended
        if ctx.stop.is_set():
            break
        job_id = await maybe_enqueue(ctx, reader, *key)
        seen[key] = st.complete_calls  # only now: a round that failed is tried again next time
        if job_id:
            enqueued.append(job_id)
    return enqueued


async def maybe_enqueue(ctx: ServiceContext, reader, tenant_id: str, agent_id: str) -> str | None:
    from agent_dpo.export import export_dataset
    from agent_dpo.training.recipes import new_version
    from agent_dpo_adapters.nats_jobs import enqueue_job

    config = ctx.policy.train
    bound = log.bind(tenant_id=tenant_id, agent_id=agent_id)
    version = new_version(config.method)
    out = ctx.store_dir / "serve" / "data" / tenant_id / agent_id / version
    dpo = await asyncio.to_thread(export_dataset, reader, tenant_id, agent_id, "trl-dpo",
                                  out / "train.trl-dpo.jsonl", split="train")
    before = int(ctx.state.get(tenant_id, agent_id).get("pairs", 0))
    if dpo.rows - before < ctx.policy.train_after_pairs:
        bound.debug("training_not_due", pairs=dpo.rows, at_last_job=before, needed=ctx.policy.train_after_pairs)
        shutil.rmtree(out, ignore_errors=True)
        return None
    data, meta = dpo.out, dpo.meta
    if config.method == "kto":
        kto = await asyncio.to_thread(export_dataset, reader, tenant_id, agent_id, "trl-kto",
                                      out / "train.trl-kto.jsonl", split="train", include_pairs=True)
        data, meta = kto.out, kto.meta
    openai_data = None
    if config.backend == "openai":
        openai_data = (await asyncio.to_thread(export_dataset, reader, tenant_id, agent_id, "openai-dpo",
                                               out / "train.openai-dpo.jsonl", split="train")).out
    doc, _ = await ctx.registry.get_rollout(tenant_id, agent_id)
    spec = await enqueue_job(ctx.nc.jetstream(), tenant_id=tenant_id, agent_id=agent_id, version=version,
                             config=config.to_dict(), dataset=data, meta=meta, openai_dataset=openai_data,
                             parent=doc.champion if doc else None)
    ctx.state.update(tenant_id, agent_id, pairs=dpo.rows, version=version, job_id=spec.job_id, in_flight=True,
                     enqueued_at=utc_now(), job_state="queued")
    bound.info("training_enqueued", version=version, job_id=spec.job_id, pairs=dpo.rows, at_last_job=before)
    return spec.job_id


# ---- job results: artifact -> eval -> manifest -> canary ----------------------------------------------

async def job_results_task(ctx: ServiceContext) -> None:
    """Follow every job's statuses through a durable consumer (a restart resumes where it stopped):
    failures are logged and free the agent's trigger; successes become registered, evaluated versions."""
    import nats.js.errors
    from nats.js import api

    from agent_dpo.jobs import STATUS_STREAM, STATUS_SUBJECT_PREFIX, JobStatus
    from agent_dpo_adapters.nats_jobs import ensure_job_streams

    js = ctx.nc.jetstream()
    await ensure_job_streams(js)
    config = api.ConsumerConfig(durable_name=STATUS_CONSUMER, ack_policy=api.AckPolicy.EXPLICIT, ack_wait=60.0,
                                max_deliver=3, filter_subject=f"{STATUS_SUBJECT_PREFIX}.>",
                                deliver_policy=api.DeliverPolicy.ALL)
    try:
        await js.add_consumer(STATUS_STREAM, config)
    except nats.js.errors.BadRequestError:
        pass  # exists with another config (an older serve): use it as it is
    sub = await js.pull_subscribe_bind(STATUS_CONSUMER, stream=STATUS_STREAM)
    try:
        while not ctx.stop.is_set():
            try:
                msgs = await sub.fetch(16, timeout=1.0)
            except (TimeoutError, nats.errors.TimeoutError):  # nats-py raises either when nothing came
                continue
            except (nats.errors.ConnectionClosedError, nats.errors.NoServersError):
                raise
            except nats.errors.Error as exc:
                log.warning("status_fetch_failed", error=str(exc)[:200])
                await sleep_until_stop(ctx.stop, 0.5)
                continue
            for msg in msgs:
                try:
                    status = JobStatus.model_validate_json(msg.data)
                except ValueError:
                    log.warning("status_invalid", subject=msg.subject)
                    await msg.term()
                    continue
                if status.state in ("succeeded", "failed"):
                    try:
                        await _with_heartbeat(msg, handle_job_end(ctx, status))
                    except Exception as exc:  # noqa: BLE001 - NATS hiccups, KV timeouts: try again later
                        log.error("job_result_failed", job_id=status.job_id, error=f"{type(exc).__name__}: {exc}"[:300])
                        await msg.nak(delay=10)
                        continue
                await msg.ack()
    finally:
        try:
            await sub.unsubscribe()
        except nats.errors.Error:
            pass


async def _with_heartbeat(msg, work: Awaitable[None]) -> None:
    """Keep the status message ours while a long evaluation runs."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=20.0)
        if done:
            return task.result()
        await msg.in_progress()


async def handle_job_end(ctx: ServiceContext, status) -> None:
    bound = log.bind(tenant_id=status.tenant_id, agent_id=status.agent_id, version=status.version,
                     job_id=status.job_id)
    ctx.state.job_ended(status.job_id, status.state)
    if status.state == "failed":
        bound.warning("training_job_failed", error=(status.error or "")[:500])
        return
    try:
        await register_version(ctx, status)
    except (AgentDpoError, OSError) as exc:
        bound.error("version_not_registered", error=str(exc)[:500])


async def register_version(ctx: ServiceContext, status) -> dict[str, Any] | None:
    """Fetch the adapter (digest-checked), evaluate it on the held-out split, write its manifest and
    ask the canary to start it (the eval gates decide). Returns the eval report; None when the version
    was registered before (a redelivered status)."""
    from agent_dpo.registry import manifest_for
    from agent_dpo.training.backend import TrainResult
    from agent_dpo_adapters.nats_artifacts import get_artifact

    t, a, version = status.tenant_id, status.agent_id, status.version
    bound = log.bind(tenant_id=t, agent_id=a, version=version)
    if await ctx.registry.get_manifest(t, a, version) is not None:
        bound.info("version_already_registered")
        return None
    facts = status.result or {}
    base_model = facts.get("base_model") or ctx.policy.train.base_model
    if status.artifact_name and status.artifact_digest:
        adapter = await get_artifact(ctx.nc.jetstream(), status.artifact_name, status.artifact_digest,
                                     ctx.store_dir / "artifacts")
        report = await evaluate_version(ctx, t, a, version, base_model, adapter)
    else:
        report = {"version": version, "error": "no local weights (hosted backend): evaluate through its endpoint"}
    result = TrainResult(version=version, method=facts.get("method", ""), backend=facts.get("backend", "trl"),
                         base_model=base_model, artifact_dir=None, artifact_digest=status.artifact_digest,
                         serve_name=status.serve_name, metrics_file=Path(), plot_file=None,
                         steps=int(facts.get("steps", 0)), wall_s=float(facts.get("wall_s", 0.0)))
    manifest = manifest_for(t, a, result, artifact_name=status.artifact_name or "",
                            artifact_digest=status.artifact_digest, eval_result=report,
                            parent=facts.get("parent"), data_digest=facts.get("data_digest", ""),
                            event_range=facts.get("event_range") or {},
                            hyperparameters=facts.get("hyperparameters") or {})
    await ctx.registry.put_manifest(manifest)
    bound.info("version_registered", preference_accuracy=report.get("preference_accuracy"),
               win_rate=report.get("win_rate"), eval_error=report.get("error"))
    try:
        decision = await ctx.canary.start(t, a, version, report)
    except RegistryError as exc:  # another version is in canary: this one waits for an operator
        bound.warning("canary_not_started", reason=str(exc))
        await ctx.registry.announce(t, a, {"kind": "canary", "version": version, "action": "refuse",
                                           "reason": str(exc)})
    else:
        bound.info("canary_requested", action=decision.action, reason=decision.reason)
    return report


def judge_for(spec: str, agent_id: str):
    """The judge of held-out eval: `auto` is the rubric for the example world's agents and none for
    any other agent (its win rate then stays unknown, which the gates refuse)."""
    from agent_dpo.cli.eval import make_judge

    if spec == "auto":
        try:
            from agent_dpo.world.agents import AGENTS
        except ModuleNotFoundError:
            return None
        return make_judge("rubric", agent_id) if agent_id in AGENTS else None
    return make_judge(spec, agent_id)


async def evaluate_version(ctx: ServiceContext, tenant_id: str, agent_id: str, version: str, base_model: str,
                           adapter: Path) -> dict[str, Any]:
    """The eval report of `version` against the champion (or the base model when there is none), on
    the agent's held-out split; a report with `error` when it cannot be made."""
    from agent_dpo.evaluation import Policy, check_judge_allowed, evaluate
    from agent_dpo.export import export_dataset
    from agent_dpo.training.recipes import read_rows
    from agent_dpo_adapters.nats_artifacts import get_artifact
    from agent_dpo_adapters.sqlite_store import SqliteStore

    bound = log.bind(tenant_id=tenant_id, agent_id=agent_id, version=version)
    out = ctx.store_dir / "serve" / "eval" / tenant_id / agent_id / version
    with SqliteStore(ctx.store_dir) as reader:
        test = await asyncio.to_thread(export_dataset, reader, tenant_id, agent_id, "trl-dpo",
                                       out / "test.trl-dpo.jsonl", split="test")
    rows = [r for r in read_rows(test.out) if "chosen" in r and "rejected" in r]
    if not rows:
        return {"version": version, "n": 0, "error": "no held-out pairs"}
    baseline = Policy("base", base_model)
    doc, _ = await ctx.registry.get_rollout(tenant_id, agent_id)
    if doc and doc.champion:
        champ = await ctx.registry.get_manifest(tenant_id, agent_id, doc.champion)
        if champ and champ.artifact.store == "nats-object" and champ.base_model == base_model:
            champ_dir = await get_artifact(ctx.nc.jetstream(), champ.artifact.name, champ.artifact.digest,
                                           ctx.store_dir / "artifacts")
            baseline = Policy(champ.version, base_model, champ_dir)
    judge = judge_for(ctx.policy.judge, agent_id)
    note = None
    if judge is not None:
        try:
            check_judge_allowed(judge, test.meta)
        except AgentDpoError as exc:
            judge, note = None, str(exc)
    settings = ctx.policy.eval_settings()
    bound.info("eval_started", baseline=baseline.label, pairs=len(rows), judge=getattr(judge, "name", None))
    try:
        report = await asyncio.to_thread(evaluate, rows, Policy(version, base_model, adapter), baseline, judge,
                                         ctx.store_dir, settings, test.meta)
    except Exception as exc:  # noqa: BLE001 - a failed eval is recorded; the gates then refuse the version
        bound.error("eval_failed", error=f"{type(exc).__name__}: {exc}"[:500])
        return {"version": version, "baseline": baseline.label, "error": f"eval failed: {type(exc).__name__}: {exc}"[:500]}
    if judge is None:
        report["judge_note"] = note or "no judge configured for this agent (serve --judge openai:MODEL)"
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


# ---- canary -------------------------------------------------------------------------------------------

async def canary_task(ctx: ServiceContext) -> None:
    """The controller's decision loop, and beside it the feed: the calls ingest touched, of agents in
    canary, once ended (and rated, or `settle_s` after the end) count once for their arm."""
    def start_runner() -> asyncio.Task:
        return asyncio.create_task(ctx.canary.run(ctx.policy.canary_interval_s, ctx.stop), name="canary-run")

    runner = start_runner()

    def check_runner() -> None:
        nonlocal runner
        if runner.done() and not ctx.stop.is_set():
            # run() survives registry errors; anything else (a NATS timeout) must not end the decisions.
            error = None if runner.cancelled() else runner.exception()
            log.error("canary_loop_restarted", error=f"{type(error).__name__}: {error}"[:300])
            runner = start_runner()

    try:
        await feed_canary(ctx, on_tick=check_runner)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def feed_canary(ctx: ServiceContext, tick_s: float = 1.0, on_tick: Callable[[], None] | None = None) -> None:
    from agent_dpo_adapters.sqlite_store import SqliteStore

    reader = SqliteStore(ctx.store_dir)
    pending: dict[tuple[str, str, str], float] = {}  # ended, waiting for a rating until this time
    fed: OrderedDict[tuple[str, str, str], None] = OrderedDict()
    in_canary: set[tuple[str, str]] = set()
    next_refresh = 0.0
    try:
        while not ctx.stop.is_set():
            await sleep_until_stop(ctx.stop, tick_s)
            if on_tick is not None:
                on_tick()
            now = time.monotonic()
            if now >= next_refresh:
                try:
                    in_canary = {(d.tenant_id, d.agent_id) for d, _ in await ctx.registry.all_rollouts()
                                 if d.state == "canary"}
                except (RegistryError, TimeoutError, nats.errors.Error) as exc:
                    log.warning("canary_refresh_failed", error=str(exc)[:200])
                next_refresh = now + ctx.policy.canary_interval_s
            touched = set()
            while ctx.touched:
                touched.add(ctx.touched.popleft())
            due = {k for k, until in pending.items() if until <= now}
            keys = [k for k in touched | due if k[:2] in in_canary and k not in fed]
            if not keys:
                continue
            calls = await asyncio.to_thread(_read_calls, reader, keys)
            for key, call in calls:
                if call is None or call.ended is None:
                    pending.pop(key, None)
                    continue
                until = pending.setdefault(key, now + ctx.policy.settle_s)
                if call.feedback_of("csat") or until <= now:
                    pending.pop(key, None)
                    if ctx.canary.record_call(call):
                        fed[key] = None
                        if len(fed) > FED_MAX:
                            fed.popitem(last=False)
    finally:
        reader.close()


def _read_calls(reader, keys: list[tuple[str, str, str]]) -> list[tuple[tuple[str, str, str], Any]]:
    return [(k, reader.call(*k)) for k in keys]


# ---- worker and gateway --------------------------------------------------------------------------------

async def worker_task(ctx: ServiceContext) -> None:
    """A training worker in this process (single-machine setups): SIGTERM finishes the job in hand."""
    from agent_dpo_adapters.nats_jobs import run_worker

    await run_worker(ctx.nc.jetstream(), ctx.store_dir, stop=ctx.stop, name=f"serve-{os.getpid()}")


class LazyLocalBackend:
    """The local serving backend, built on first use (the first version to load or call to answer), in
    a daemon thread: a service with nothing to serve never loads torch, and a stop never waits on a
    model load."""

    name = "local"

    def __init__(self, base_model: str, store_dir: Path, js, **kwargs: Any):
        self.base_model, self.store_dir, self.js, self.kwargs = base_model, store_dir, js, kwargs
        self._future: concurrent.futures.Future | None = None

    def _build(self, future: concurrent.futures.Future) -> None:
        from agent_dpo_adapters.local_serving import LocalPeftBackend

        try:
            future.set_result(LocalPeftBackend.from_store(self.base_model, self.store_dir, js=self.js,
                                                          **self.kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever awaits the backend
            future.set_exception(exc)

    async def backend(self):
        if self._future is None:
            self._future = concurrent.futures.Future()
            log.info("serving_model_loading", base_model=self.base_model)
            threading.Thread(target=self._build, args=(self._future,), name="model-load", daemon=True).start()
        return await asyncio.wrap_future(self._future)

    async def load(self, ref) -> None:
        await (await self.backend()).load(ref)

    async def unload(self, ref) -> None:
        if self._future is not None and self._future.done() and not self._future.exception():
            await self._future.result().unload(ref)

    async def chat(self, ref, messages: list[dict], tools: list[dict] | None = None, **params: Any):
        return await (await self.backend()).chat(ref, messages, tools, **params)


async def gateway_task(ctx: ServiceContext) -> None:
    """The OpenAI-compatible gateway over a router on the service's connection."""
    from agent_dpo.router import Router
    from agent_dpo_adapters.gateway import start_gateway

    base_model = ctx.policy.train.base_model
    backend = LazyLocalBackend(base_model, ctx.store_dir, ctx.nc.jetstream())
    router = Router(ctx.registry, backend, base_model=base_model)
    await router.start()
    gateway = None
    try:
        try:
            gateway = await start_gateway(router, backend, ctx.policy.gateway_host, ctx.policy.gateway_port)
        except OSError as exc:
            where = f"{ctx.policy.gateway_host}:{ctx.policy.gateway_port}"
            if ctx.policy.gateway_port_given:
                raise AgentDpoError(f"gateway cannot listen on {where}: {exc.strerror}") from None
            log.warning("gateway_off", reason=f"{where}: {exc.strerror}")
            print(f"gateway off: {where} {exc.strerror} (pass --gateway-port PORT, or 0)", flush=True)
            await ctx.stop.wait()
            return
        print(f"gateway: {gateway.base_url} (model TENANT/AGENT, header X-Call-Id)", flush=True)
        await ctx.stop.wait()
    finally:
        if gateway is not None:
            await gateway.close()
        await router.stop()


def service_tasks(policy: ServicePolicy | None = None) -> dict[str, ServiceTask]:
    """The tasks `serve` owns, by name."""
    policy = policy or ServicePolicy()
    tasks: dict[str, ServiceTask] = {"ingest": ingest_task, "training": training_task,
                                     "job-results": job_results_task, "canary": canary_task}
    if policy.worker:
        tasks["worker"] = worker_task
    if policy.gateway_port:
        tasks["gateway"] = gateway_task
    return tasks
