"""Training jobs on the bus, through a real nats-server: `agent-dpo train --enqueue` puts a job on the
work queue, `agent-dpo worker` (a separate process) trains a tiny model, the statuses queued, running,
progress and succeeded arrive on agentdpo.train.status.<job_id>, and the adapter sits in the object
store under a digest that `get_artifact` verifies. A job with a bad config fails with its reason."""

# ruff: noqa: F811  (fixtures come from tests/tiny_model.py, imported after the sys.path line)
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import nats
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_training import pair_rows, write_jsonl
from tiny_model import smollm2_store, tiny_model_dir  # noqa: F401  (pytest fixtures)

from agent_dpo.jobs import JOBS_STREAM
from agent_dpo.training.backend import artifact_digest
from agent_dpo_adapters.nats_artifacts import ArtifactDigestMismatch, get_artifact
from agent_dpo_adapters.nats_jobs import enqueue_job, job_statuses


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent_dpo.cli", "--log-format", "json", *args],
                          check=False, capture_output=True, text=True, timeout=timeout)


async def statuses(url: str, job_id: str) -> list:
    nc = await nats.connect(url)
    try:
        return [s async for s in job_statuses(nc.jetstream(), job_id, timeout=30)]
    finally:
        await nc.close()


@pytest.fixture(scope="module")
def worked(tmp_path_factory, tiny_model_dir):
    """One enqueued good job (through the CLI), one bad one, one worker process that handles both."""
    from agent_dpo_adapters.nats_server import EmbeddedNats

    tmp = tmp_path_factory.mktemp("worker")
    server = EmbeddedNats(store_dir=tmp / "nats").start()
    try:
        data = write_jsonl(tmp / "pairs.jsonl", pair_rows(4))
        (tmp / "pairs.jsonl.meta.json").write_text(json.dumps({"event_range": {"first_seq": 1, "last_seq": 9}}))
        enq = cli("train", "--agent", "acme/salon", "--enqueue", "--data", str(data), "--base-model",
                  str(tiny_model_dir), "--sft-steps", "1", "--max-steps", "2", "--batch-size", "2",
                  "--max-length", "256", "--lora-r", "4", "--version", "v1", "--nats-url", server.url,
                  "--store", str(tmp / "listener"), "--json", timeout=60)
        assert enq.returncode == 0, enq.stderr[-2000:]
        good = json.loads(enq.stdout)["job_id"]

        async def enqueue_bad() -> str:
            nc = await nats.connect(server.url)
            try:
                spec = await enqueue_job(nc.jetstream(), tenant_id="acme", agent_id="salon", version="v2",
                                         config={"base_model": str(tiny_model_dir), "learning_rte": 0.1},
                                         dataset=data, meta={})
            finally:
                await nc.close()
            return spec.job_id

        bad = asyncio.run(enqueue_bad())
        started = time.monotonic()
        proc = cli("worker", "--nats-url", server.url, "--store", str(tmp / "gpu-box"), "--max-jobs", "2",
                   "--name", "gpu-1")
        wall = time.monotonic() - started
        assert proc.returncode == 0, proc.stderr[-3000:]
        yield {"url": server.url, "good": good, "bad": bad, "proc": proc, "tmp": tmp, "wall": wall,
               "model": tiny_model_dir}
    finally:
        server.stop()


def test_enqueued_job_is_trained_by_a_worker_process_with_statuses_in_order(worked):
    assert "worker: 2 job(s) handled" in worked["proc"].stdout
    seen = asyncio.run(statuses(worked["url"], worked["good"]))
    states = [s.state for s in seen]
    assert states[0] == "queued" and states[1] == "running" and states[-1] == "succeeded", states
    assert "progress" in states[2:-1], states
    assert all(s.job_id == worked["good"] and s.version == "v1" for s in seen)
    assert {s.worker for s in seen[1:]} == {"gpu-1"}
    progress = next(s for s in seen if s.state == "progress").progress
    assert progress, "a progress status carries the trainer's step figures"
    done = seen[-1]
    assert done.artifact_name == "acme/salon/v1" and done.artifact_digest.startswith("sha256:")
    # What the listener writes into the version's manifest travels with the success.
    assert done.result["version"] == "v1" and done.result["method"] == "dpo"
    assert done.result["base_model"] == str(worked["model"])
    assert done.result["hyperparameters"]["max_steps"] == 2
    assert done.result["event_range"] == {"first_seq": 1, "last_seq": 9}
    assert done.result["data_digest"].startswith("sha256:")


def test_the_adapter_in_the_object_store_matches_its_digest(worked):
    done = asyncio.run(statuses(worked["url"], worked["good"]))[-1]

    async def fetch(digest: str, dest: Path) -> Path:
        nc = await nats.connect(worked["url"])
        try:
            return await get_artifact(nc.jetstream(), done.artifact_name, digest, dest)
        finally:
            await nc.close()

    path = asyncio.run(fetch(done.artifact_digest, worked["tmp"] / "serving"))
    assert (path / "adapter_model.safetensors").is_file()
    assert artifact_digest(path) == done.artifact_digest
    wrong = "sha256:" + "0" * 64
    with pytest.raises(ArtifactDigestMismatch):
        asyncio.run(fetch(wrong, worked["tmp"] / "serving-wrong"))
    assert not (worked["tmp"] / "serving-wrong" / ("0" * 64)).exists()


def test_a_bad_config_fails_with_its_reason_and_leaves_the_queue(worked):
    seen = asyncio.run(statuses(worked["url"], worked["bad"]))
    assert [s.state for s in seen] == ["queued", "running", "failed"]
    assert "learning_rte" in seen[-1].error and "unknown training config key" in seen[-1].error

    async def queue_depth() -> int:
        nc = await nats.connect(worked["url"])
        try:
            return (await nc.jetstream().stream_info(JOBS_STREAM)).state.messages
        finally:
            await nc.close()

    # The work queue is empty: the success was acked, the failure terminated (not retried forever).
    assert asyncio.run(queue_depth()) == 0


def test_worker_bad_input_is_one_line(tmp_path):
    bad = cli("worker", "--max-jobs", "0", timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "Traceback" not in bad.stderr
    down = cli("worker", "--nats-url", "nats://127.0.0.1:1", "--store", str(tmp_path), timeout=60)
    assert down.returncode == 1 and "cannot connect to NATS" in down.stderr and "Traceback" not in down.stderr


def test_a_launcher_trains_the_job_in_a_child_process(worked):
    """`--launcher "accelerate launch --num_processes N"` on a GPU box; here plain python stands in."""
    data = write_jsonl(worked["tmp"] / "pairs3.jsonl", pair_rows(4))

    async def enqueue() -> str:
        nc = await nats.connect(worked["url"])
        try:
            spec = await enqueue_job(nc.jetstream(), tenant_id="acme", agent_id="salon", version="v3",
                                     config={"base_model": str(worked["model"]), "sft_steps": 1, "max_steps": 1,
                                             "batch_size": 2, "max_length": 256, "lora_r": 4},
                                     dataset=data, meta={"event_range": {"first_seq": 3, "last_seq": 4}})
        finally:
            await nc.close()
        return spec.job_id

    job = asyncio.run(enqueue())
    proc = cli("worker", "--nats-url", worked["url"], "--store", str(worked["tmp"] / "multi-gpu-box"),
               "--max-jobs", "1", "--launcher", sys.executable)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = asyncio.run(statuses(worked["url"], job))[-1]
    assert done.state == "succeeded", done.error
    assert done.artifact_name == "acme/salon/v3" and done.result["version"] == "v3"
    assert done.result["event_range"] == {"first_seq": 3, "last_seq": 4}
