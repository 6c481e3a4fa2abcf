"""Training jobs on the bus: a JetStream work-queue stream the listener enqueues into and GPU workers
pull from; datasets and trained adapters travel through NATS object stores, statuses on
`agentdpo.train.status.<job_id>` (kept in a stream so a late reader still sees them)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
from nats.js import api

from agent_dpo.errors import AgentDpoError
from agent_dpo.jobs import (
    DATASET_BUCKET,
    JOBS_STREAM,
    JOBS_SUBJECT_PREFIX,
    STATUS_STREAM,
    STATUS_SUBJECT_PREFIX,
    TERMINAL_STATES,
    JobStatus,
    TrainJobSpec,
)
from agent_dpo.logs import get_logger
from agent_dpo_adapters.nats_artifacts import open_object_store, put_artifact

WORKER_CONSUMER = "trainers"
MAX_ATTEMPTS = 3
HEARTBEAT_S = 10.0
ACK_WAIT_S = 60.0
log = get_logger(component="train-jobs")


async def ensure_job_streams(js) -> None:
    """Create or update the job queue, the status stream and the dataset bucket; idempotent."""
    streams = [
        api.StreamConfig(name=JOBS_STREAM, subjects=[f"{JOBS_SUBJECT_PREFIX}.>"], storage=api.StorageType.FILE,
                         retention=api.RetentionPolicy.WORK_QUEUE, duplicate_window=600.0,
                         description="agent-dpo training jobs (work queue)"),
        api.StreamConfig(name=STATUS_STREAM, subjects=[f"{STATUS_SUBJECT_PREFIX}.>"], storage=api.StorageType.FILE,
                         max_age=30 * 24 * 3600.0, description="agent-dpo training job statuses"),
    ]
    for config in streams:
        try:
            await js.add_stream(config)
        except nats.js.errors.BadRequestError:
            await js.update_stream(config)
    await _dataset_store(js)
    consumer = api.ConsumerConfig(
        durable_name=WORKER_CONSUMER, ack_policy=api.AckPolicy.EXPLICIT, ack_wait=ACK_WAIT_S,
        max_deliver=MAX_ATTEMPTS + 1, max_ack_pending=64, filter_subject=f"{JOBS_SUBJECT_PREFIX}.>")
    await js.add_consumer(JOBS_STREAM, consumer)


async def _dataset_store(js):
    return await open_object_store(js, DATASET_BUCKET, "agent-dpo training datasets")


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


async def publish_status(js, status: JobStatus) -> None:
    await js.publish(status.subject, status.model_dump_json().encode())


async def enqueue_job(js, *, tenant_id: str, agent_id: str, version: str, config: dict[str, Any],
                      dataset: Path, meta: dict[str, Any], openai_dataset: Path | None = None,
                      parent: str | None = None) -> TrainJobSpec:
    """Upload the dataset, then publish the job; a worker anywhere on the bus picks it up."""
    await ensure_job_streams(js)
    store = await _dataset_store(js)
    spec = TrainJobSpec(tenant_id=tenant_id, agent_id=agent_id, version=version, config=config,
                        dataset_object="", dataset_digest=file_digest(dataset), meta=meta, parent=parent)
    spec.dataset_object = f"{spec.job_id}/{dataset.name}"
    await store.put(spec.dataset_object, dataset.read_bytes())
    if openai_dataset is not None:
        spec.openai_dataset_object = f"{spec.job_id}/{openai_dataset.name}"
        await store.put(spec.openai_dataset_object, openai_dataset.read_bytes())
    await js.publish(spec.subject, spec.model_dump_json(by_alias=True).encode(), headers={"Nats-Msg-Id": spec.job_id})
    await publish_status(js, JobStatus(job_id=spec.job_id, tenant_id=tenant_id, agent_id=agent_id,
                                       version=version, state="queued"))
    log.info("train_job_enqueued", job_id=spec.job_id, tenant_id=tenant_id, agent_id=agent_id, version=version)
    return spec


async def job_statuses(js, job_id: str, timeout: float | None = None) -> AsyncIterator[JobStatus]:
    """Every status of one job from the start, ending after a terminal state (or the timeout)."""
    sub = await js.subscribe(f"{STATUS_SUBJECT_PREFIX}.{job_id}", ordered_consumer=True,
                             deliver_policy=api.DeliverPolicy.ALL)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            remaining = None if deadline is None else max(0.01, deadline - time.monotonic())
            if deadline is not None and time.monotonic() >= deadline:
                raise AgentDpoError(f"job {job_id}: no terminal status within {timeout:.0f}s")
            try:
                msg = await sub.next_msg(timeout=min(remaining or 5.0, 5.0))
            except nats.errors.TimeoutError:
                continue
            status = JobStatus.model_validate_json(msg.data)
            yield status
            if status.state in TERMINAL_STATES:
                return
    finally:
        await sub.unsubscribe()


async def run_worker(js, store_dir: Path, *, stop: asyncio.Event, max_jobs: int | None = None,
                     name: str | None = None,
                     backend_for: Callable[[str], Any] | None = None, launcher: list[str] | None = None) -> int:
    """Pull jobs until `stop` is set (or `max_jobs` are done); returns the number of jobs handled.
    With `launcher` (e.g. ["accelerate", "launch", "--num_processes", "4"]) each job trains in a child
    process it starts, for several GPUs per job; otherwise in a thread of this process."""
    await ensure_job_streams(js)
    name = name or f"{socket.gethostname()}-{os.getpid()}"
    sub = await js.pull_subscribe_bind(WORKER_CONSUMER, stream=JOBS_STREAM)
    handled = 0
    log.info("worker_started", worker=name)
    while not stop.is_set() and (max_jobs is None or handled < max_jobs):
        try:
            msgs = await sub.fetch(1, timeout=1.0)
        except (TimeoutError, nats.errors.TimeoutError):  # nats-py raises either when nothing came
            continue
        except (nats.errors.ConnectionClosedError, nats.errors.NoServersError):
            raise
        except Exception as exc:  # noqa: BLE001 - reconnecting (503s, stale pulls): wait, fetch again
            log.warning("fetch_failed", error=str(exc))
            await asyncio.sleep(0.5)
            continue
        for msg in msgs:
            await _handle(js, msg, store_dir, name, backend_for, launcher)
            handled += 1
    return handled


async def _handle(js, msg, store_dir: Path, worker: str, backend_for, launcher: list[str] | None = None) -> None:
    attempt = msg.metadata.num_delivered
    try:
        spec = TrainJobSpec.model_validate_json(msg.data)
    except ValueError as exc:
        log.error("train_job_invalid", error=str(exc)[:300])
        await msg.term()
        return
    base = {"job_id": spec.job_id, "tenant_id": spec.tenant_id, "agent_id": spec.agent_id,
            "version": spec.version, "attempt": attempt, "worker": worker}
    bound = log.bind(job_id=spec.job_id, tenant_id=spec.tenant_id, agent_id=spec.agent_id)
    if attempt > MAX_ATTEMPTS:
        # The job outlived its attempts (workers killed mid-job): give up loudly, never silently.
        await publish_status(js, JobStatus(**base, state="failed",
                                           error=f"gave up after {MAX_ATTEMPTS} attempts (worker lost mid-job)"))
        bound.error("train_job_abandoned", attempts=attempt - 1)
        await msg.term()
        return
    await publish_status(js, JobStatus(**base, state="running"))
    bound.info("train_job_started", attempt=attempt)
    progress_q: asyncio.Queue[dict] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    async def heartbeat() -> None:
        last_sent = 0.0
        while True:
            try:
                item = await asyncio.wait_for(progress_q.get(), timeout=HEARTBEAT_S)
            except TimeoutError:
                item = None
            await msg.in_progress()
            if item is not None and time.monotonic() - last_sent > 1.0:
                last_sent = time.monotonic()
                await publish_status(js, JobStatus(**base, state="progress", progress=item))

    beat = asyncio.create_task(heartbeat())
    try:
        with tempfile.TemporaryDirectory(prefix=f"{spec.job_id}-", dir=_work_dir(store_dir)) as tmp:
            result = await _train(js, spec, Path(tmp), store_dir,
                                  lambda p: loop.call_soon_threadsafe(progress_q.put_nowait, dict(p)), backend_for,
                                  launcher)
            artifact_name = artifact_digest = None
            if result.artifact_dir is not None:
                # Uploaded in full before anyone hears of it: a killed worker leaves nothing registered.
                artifact_name = f"{spec.tenant_id}/{spec.agent_id}/{spec.version}"
                artifact_digest = await put_artifact(js, artifact_name, result.artifact_dir)
            metrics = []
            if result.metrics_file and Path(result.metrics_file).exists():
                metrics = [json.loads(line) for line in Path(result.metrics_file).read_text().splitlines() if line]
    except Exception as exc:  # noqa: BLE001 - any training failure becomes a failed status with its reason
        beat.cancel()
        await publish_status(js, JobStatus(**base, state="failed", error=f"{type(exc).__name__}: {exc}"[:2000]))
        bound.error("train_job_failed", error=str(exc)[:500])
        await msg.term()
        return
    beat.cancel()
    # What the listener needs for the version's manifest, so it never has to see the job message again.
    facts = {"version": result.version, "method": result.method, "backend": result.backend,
             "base_model": result.base_model, "hyperparameters": spec.config,
             "data_digest": spec.dataset_digest, "event_range": (spec.meta or {}).get("event_range") or {},
             "parent": spec.parent, "steps": result.steps, "wall_s": round(result.wall_s, 2)}
    await publish_status(js, JobStatus(**base, state="succeeded", artifact_name=artifact_name,
                                       artifact_digest=artifact_digest, serve_name=result.serve_name,
                                       result=facts,
                                       progress={"steps": result.steps, "wall_s": result.wall_s,
                                                 "metrics_tail": metrics[-3:]}))
    await msg.ack_sync()
    bound.info("train_job_succeeded", artifact=artifact_name, digest=artifact_digest)


def _work_dir(store_dir: Path) -> Path:
    path = store_dir / "worker"
    path.mkdir(parents=True, exist_ok=True)
    return path


async def _train(js, spec: TrainJobSpec, tmp: Path, store_dir: Path, on_progress, backend_for,
                 launcher: list[str] | None = None):
    from agent_dpo.training.backend import TrainJob, get_backend
    from agent_dpo.training.config import TrainConfig

    store = await _dataset_store(js)
    data = (await store.get(spec.dataset_object)).data
    train_file = tmp / Path(spec.dataset_object).name
    train_file.write_bytes(data)
    if file_digest(train_file) != spec.dataset_digest:
        raise AgentDpoError(f"dataset {spec.dataset_object}: digest mismatch, refusing to train")
    openai_file = None
    if spec.openai_dataset_object:
        openai_file = tmp / Path(spec.openai_dataset_object).name
        openai_file.write_bytes((await store.get(spec.openai_dataset_object)).data)
    config = TrainConfig.from_dict(spec.config)  # unknown keys: a clear failed status, not a TypeError
    if launcher:
        return await _train_launched(launcher, spec, config, train_file, openai_file, tmp, store_dir)
    backend = (backend_for or get_backend)(config.backend)
    job = TrainJob(tenant_id=spec.tenant_id, agent_id=spec.agent_id, config=config, train_file=train_file,
                   meta=spec.meta, output_dir=tmp / "out", store_dir=store_dir, openai_file=openai_file,
                   version=spec.version)
    return await asyncio.to_thread(backend.train, job, on_progress)


async def _train_launched(launcher: list[str], spec: TrainJobSpec, config, train_file: Path,
                          openai_file: Path | None, tmp: Path, store_dir: Path):
    """Train in a child process started by `launcher` (e.g. `accelerate launch --num_processes 4`):
    the data-parallel processes then share this one job, which a worker process itself cannot do."""
    from agent_dpo.training.backend import TrainResult

    config_file = tmp / "train-config.json"
    config_file.write_text(json.dumps(config.to_dict()), encoding="utf-8")
    # `agent-dpo train --data` reads the export's meta (KTO weights, labelled_by) from beside the file.
    train_file.with_name(train_file.name + ".meta.json").write_text(json.dumps(spec.meta), encoding="utf-8")
    cmd = [*launcher, "-m", "agent_dpo.cli", "--log-format", "json", "train", "--agent",
           f"{spec.tenant_id}/{spec.agent_id}", "--config", str(config_file), "--data", str(train_file),
           "--version", spec.version, "--out", str(tmp / "out"), "--store", str(store_dir), "--json"]
    if openai_file is not None:
        cmd += ["--openai-data", str(openai_file)]
    log_file = tmp / "train.log"
    with log_file.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE, stderr=err)
        try:
            out, _ = await proc.communicate()
        except asyncio.CancelledError:
            proc.terminate()
            raise
    if proc.returncode != 0:
        tail = [line for line in log_file.read_text(errors="replace").splitlines() if line.strip()][-1:]
        raise AgentDpoError(f"launched training exited {proc.returncode}: {tail[0][:1500] if tail else 'no output'}")
    text = out.decode(errors="replace")
    try:  # under a launcher every rank may print its summary: the first one is enough
        summary, _ = json.JSONDecoder().raw_decode(text[text.index("{"):])
    except ValueError:
        raise AgentDpoError(f"launched training printed no result: {text[-500:]!r}") from None
    paths = {"artifact_dir", "metrics_file", "plot_file", "sft_artifact_dir"}
    fields = {k: (Path(v) if k in paths and v not in (None, "None") else (None if v == "None" else v))
              for k, v in summary.items() if k in TrainResult.__dataclass_fields__}
    return TrainResult(**fields)
