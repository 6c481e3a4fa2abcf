"""`agent-dpo serve` as a subprocess on a real nats-server, the whole loop on a tiny model: simulated
calls are ingested; once the agent has enough new DPO pairs the training trigger exports and enqueues a
job; the in-process worker (`--worker`) trains it; the job's success becomes an evaluated manifest and a
canary start; live calls go through the gateway (pinned per call, answered by the served model) and the
canary, fed from what ingest stores, advances and promotes. SIGTERM exits 0; a restart does not train
again on the same pairs. Policy pieces are checked as functions."""

# ruff: noqa: F811  (fixtures come from tests/tiny_model.py, imported after the sys.path line)
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nats
import pytest
from openai import AsyncOpenAI

sys.path.insert(0, str(Path(__file__).parent))
from tiny_model import smollm2_store, tiny_model_dir  # noqa: F401  (pytest fixtures)

from agent_dpo.errors import UsageError
from agent_dpo.jobs import JOBS_STREAM, STATUS_STREAM
from agent_dpo.service import ServicePolicy, TrainingState
from agent_dpo.world.simulator import live_feedback, live_prompts, publish_world
from agent_dpo_adapters.nats_bus import ensure_bus
from agent_dpo_adapters.nats_publisher import EventPublisher
from agent_dpo_adapters.nats_registry import NatsRegistry

TENANT, AGENT = "acme-salons", "salon-rebook"
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_DPO_")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_policy(path: Path, model_dir: Path) -> Path:
    path.write_text(f"""
[serve]
train_after_pairs = 10
check_interval_s = 0.5
canary_interval_s = 0.5
settle_s = 1

[train]
base_model = "{model_dir}"
sft_steps = 1
max_steps = 1
batch_size = 2
max_length = 160
truncation_mode = "keep_end"
lora_r = 4
lora_alpha = 8

[eval]
max_pairs = 4
max_prompts = 2
max_new_tokens = 8

[gates]             # lenient: a random tiny model may enter canary
min_preference_accuracy = 0.0
min_win_rate = 0.0
max_tool_validity_drop = 1.0

[canary]
steps = [0.5, 1.0]
min_calls_per_step = 2
min_feedback = 2
max_csat_drop = 1.0
max_thumbs_down_increase = 1.0
max_tool_error_increase = 1.0
max_escalation_increase = 1.0
""")
    return path


async def wait_for(check, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"serve exited ({proc.returncode}) while waiting for {what}: "
                                 f"{proc.stderr.read()[-8000:]}")
        await asyncio.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout}s")


def http(method: str, url: str) -> dict:
    with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=30) as resp:
        return json.loads(resp.read())


async def live_round(gateway: str, pub: EventPublisher, prompts, n: int) -> dict[str | None, int]:
    """`n` live calls as a runtime would make them: pin through the gateway, stamp call.started with
    what serves the call, answer through the gateway, publish the call's end and feedback, hang up."""
    client = AsyncOpenAI(base_url=gateway, api_key="unused", max_retries=0, timeout=60)
    arms: dict[str | None, int] = {}
    for _ in range(n):
        prompt = next(prompts)
        path = f"{gateway}/calls/{TENANT}/{AGENT}/{prompt.call_id}"
        model = (await asyncio.to_thread(http, "GET", path))["model"]
        for env in prompt.envelopes_served_by(model["name"], model.get("version")):
            await pub.publish_envelope(env)
        raw = await client.chat.completions.with_raw_response.create(
            model=f"{TENANT}/{AGENT}", messages=prompt.messages, tools=prompt.tools, max_tokens=8,
            extra_headers={"X-Call-Id": prompt.call_id})
        served = raw.headers.get("x-model-version")
        assert served == (model.get("version") or "base"), "the call kept its model"
        answer = raw.parse().choices[0].message.model_dump(exclude_none=True)
        for env in live_feedback(prompt, answer, seed=3)[1]:
            await pub.publish_envelope(env)
        await asyncio.to_thread(http, "DELETE", path)
        arms[model.get("version")] = arms.get(model.get("version"), 0) + 1
    await client.close()
    return arms


def start_serve(url: str, store: Path, policy: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "agent_dpo.cli", "--log-format", "json", "serve",
                             "--nats-url", url, "--store", str(store), "--policy", str(policy), *extra],
                            env=CLEAN_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop_serve(proc: subprocess.Popen) -> tuple[int, str, str]:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err


@pytest.mark.timeout(300)
async def test_serve_ingests_trains_after_n_pairs_registers_and_rolls_out(nats_url, tmp_path, tiny_model_dir):
    store = tmp_path / "store"
    policy = write_policy(tmp_path / "policy.toml", tiny_model_dir)
    port = free_port()
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    from agent_dpo.config import BusConfig

    await ensure_bus(js, BusConfig())
    registry = await NatsRegistry.open(nc)
    started = time.monotonic()
    proc = start_serve(nats_url, store, policy, "--worker", "--gateway-port", str(port))
    try:
        assert proc.stdout.readline().startswith("serving:")
        assert proc.stdout.readline().strip() == f"gateway: http://127.0.0.1:{port}/v1 (model TENANT/AGENT, header X-Call-Id)"
        await publish_world(js, 60, 7, agents=(AGENT,))

        async def manifests():
            return await registry.list_manifests(TENANT, AGENT)

        found = await wait_for(manifests, 150, "a trained, evaluated, registered version", proc)
        took = time.monotonic() - started
        manifest = found[0]
        version = manifest.version
        assert version.startswith("dpo-") and manifest.base_model == str(tiny_model_dir)
        assert manifest.artifact.name == f"{TENANT}/{AGENT}/{version}"
        assert manifest.artifact.digest.startswith("sha256:") and manifest.data_digest.startswith("sha256:")
        assert manifest.hyperparameters["max_steps"] == 1 and manifest.method == "dpo"
        assert manifest.eval["n"] >= 1 and manifest.eval["judge"] == "rubric"  # the example agent's judge
        assert manifest.eval["baseline"] == "base" and manifest.eval["win_rate"] is not None

        async def in_canary():
            doc, _ = await registry.get_rollout(TENANT, AGENT)
            return doc if doc and doc.state == "canary" and doc.challenger == version else None

        doc = await wait_for(in_canary, 20, "the canary start", proc)
        assert doc.canary_weight == 0.5 and doc.champion is None

        state = json.loads((store / "serve" / "training-state.json").read_text())["agents"][f"{TENANT}/{AGENT}"]
        assert state["version"] == version and state["pairs"] >= 10 and state["in_flight"] is False
        assert state["job_state"] == "succeeded"

        # Live calls through the gateway; the canary is fed from what ingest stores.
        pub, prompts = EventPublisher(js), live_prompts(AGENT, 1000, seed=11)
        gateway = f"http://127.0.0.1:{port}/v1"

        async def promoted():
            doc, _ = await registry.get_rollout(TENANT, AGENT)
            if doc.champion == version:
                return doc
            await live_round(gateway, pub, prompts, 6)
            return None

        doc = await wait_for(promoted, 90, "the canary to promote the version", proc)
        assert doc.state == "stable" and doc.previous is None and "promoted" in doc.reason
        print(f"serve: events -> registered version in {took:.1f}s, promoted after {time.monotonic() - started:.1f}s")
    finally:
        code, _out, err = stop_serve(proc)
    assert code == 0, err[-3000:]
    assert "Traceback" not in err
    jobs = (await js.stream_info(STATUS_STREAM)).state.messages

    # A restart remembers the pairs it trained on: no second job for the same data.
    again = start_serve(nats_url, store, policy, "--gateway-port", "0")
    try:
        assert again.stdout.readline().startswith("serving:")
        await asyncio.sleep(4)
    finally:
        code, _, err = stop_serve(again)
    assert code == 0, err[-2000:]
    assert (await js.stream_info(STATUS_STREAM)).state.messages == jobs
    assert (await js.stream_info(JOBS_STREAM)).state.messages == 0
    await nc.close()


def test_policy_file_flags_and_errors(tmp_path, tiny_model_dir):
    path = write_policy(tmp_path / "p.toml", tiny_model_dir)
    policy = ServicePolicy.from_file(path, train_after_pairs=42, judge=None)
    assert policy.train_after_pairs == 42 and policy.check_interval_s == 0.5  # flag over file
    assert policy.train.max_steps == 1 and policy.canary.steps == (0.5, 1.0) and policy.gates.min_win_rate == 0
    assert policy.eval_settings().max_length == 160  # keep_end: eval in the training window
    assert ServicePolicy().train_after_pairs == 500 and ServicePolicy().gateway_port == 8080
    for text, needle in (("[serve]\nnope = 1\n", "nope"), ("[train]\nlearning_rte = 1\n", "learning_rte"),
                         ("[what]\n", "what"), ("[serve]\ntrain_after_pairs = 0\n", "train_after_pairs"),
                         ("[canary]\nsteps = [0.5, 0.2]\n", "steps")):
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(UsageError, match=needle):
            ServicePolicy.from_file(bad)


def test_training_state_survives_a_restart(tmp_path):
    path = tmp_path / "serve" / "training-state.json"
    state = TrainingState(path)
    state.update("acme", "salon", pairs=510, job_id="job-1", in_flight=True)
    state.job_ended("job-1", "failed")
    again = TrainingState(path)
    assert again.get("acme", "salon")["pairs"] == 510 and again.get("acme", "salon")["in_flight"] is False
    assert again.get("acme", "salon")["job_state"] == "failed"


def test_serve_bad_flags_are_one_line(tmp_path):
    for args in (("--gateway-port", "70000"), ("--train-after-pairs", "0"),
                 ("--policy", str(tmp_path / "missing.toml"), "--nats-url", "nats://127.0.0.1:1")):
        proc = subprocess.run([sys.executable, "-m", "agent_dpo.cli", "serve", *args], env=CLEAN_ENV,
                              capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
        assert "Traceback" not in proc.stderr


async def test_a_failed_job_frees_the_agents_trigger_and_registers_nothing(nats_url, tmp_path):
    """The job-results loop as a function over a real nats-server: a `failed` status is remembered in
    the training state (the trigger may enqueue again once N more pairs arrive), nothing is registered."""
    from agent_dpo.config import Settings
    from agent_dpo.jobs import JobStatus
    from agent_dpo.service import job_results_task, open_context
    from agent_dpo_adapters.nats_jobs import ensure_job_streams, publish_status

    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await ensure_job_streams(js)
    stop = asyncio.Event()
    ctx = await open_context(nc, nats_url, Settings(), tmp_path, stop, ServicePolicy(gateway_port=0))
    ctx.state.update(TENANT, AGENT, pairs=600, job_id="job-x", version="dpo-1", in_flight=True)
    base = {"job_id": "job-x", "tenant_id": TENANT, "agent_id": AGENT, "version": "dpo-1"}
    for state, extra in (("queued", {}), ("running", {}), ("failed", {"error": "CUDA out of memory"})):
        await publish_status(js, JobStatus(**base, state=state, **extra))
    task = asyncio.create_task(job_results_task(ctx))

    async def ended():
        return TrainingState(ctx.state.path).get(TENANT, AGENT).get("in_flight") is False

    await wait_for(ended, 20, "the failure to reach the training state")
    stop.set()
    await asyncio.wait_for(task, 10)
    entry = TrainingState(ctx.state.path).get(TENANT, AGENT)
    assert entry["job_state"] == "failed" and entry["pairs"] == 600
    assert await ctx.registry.list_manifests(TENANT, AGENT) == []
    await nc.close()
