# ruff: noqa: F811  (fixtures come from tests/tiny_model.py and are requested by name)
"""The canary: eval gates keep bad versions out; on a real nats-server, calls routed by the router
produce outcomes per arm, and the controller walks a good version 5% -> 25% -> 50% -> 100% to
champion, rolls a worse-CSAT version back on its own, publishes every decision, and a restarted
controller resumes at the step the KV holds."""

from __future__ import annotations

import asyncio
import json
import random
import sys
from pathlib import Path

import nats
import pytest

from agent_dpo.canary import (
    ArmOutcome,
    ArmStats,
    CanaryController,
    CanaryPolicy,
    EvalGates,
    decide,
    gate_failures,
    outcome_from_call,
)
from agent_dpo.registry import new_doc, promote, start_canary
from agent_dpo.router import Router
from agent_dpo_adapters.nats_registry import NatsRegistry

sys.path.insert(0, str(Path(__file__).parent))
from serving_fixtures import manifest
from tiny_model import smollm2_store, tiny_model_dir  # noqa: F401  (pytest fixtures)

GOOD_EVAL = {"version": "v2", "baseline": "v1", "n": 60, "preference_accuracy": 0.93, "win_rate": 0.8,
             "win_rate_ci": [0.7, 0.88], "tool_call_validity": 0.97, "baseline_tool_call_validity": 0.95}
POLICY = CanaryPolicy(min_calls_per_step=40, min_feedback=20)


def stats(n: int, csat: float, esc: float = 0.0) -> ArmStats:
    s = ArmStats()
    for i in range(n):
        s.add(ArmOutcome("x", csat=csat, thumbs_down=False, tool_calls=1, escalated=i < n * esc))
    return s


def canary_doc(step: int = 0, weight: float = 0.05):
    doc = start_canary(promote(new_doc("acme", "rebook"), "t", version="v1"), "v2", weight, "t")
    return doc.model_copy(update={"step": step})


def test_not_enough_data_holds_the_step():
    d = decide(canary_doc(), stats(500, 0.8), stats(10, 0.8), 10, POLICY)
    assert d.action == "hold" and "not enough data" in d.reason


def test_enough_good_data_advances_then_promotes_at_the_last_step():
    d = decide(canary_doc(), stats(500, 0.8), stats(60, 0.82), 60, POLICY)
    assert (d.action, d.step, d.weight) == ("advance", 1, 0.25)
    d = decide(canary_doc(3, 1.0), stats(500, 0.8), stats(300, 0.8), 60, POLICY)
    assert d.action == "promote"


def test_worse_csat_or_more_escalations_roll_back():
    d = decide(canary_doc(), stats(500, 0.8), stats(40, 0.6), 40, POLICY)
    assert d.action == "rollback" and "csat" in d.reason and d.checks["csat"]["ok"] is False
    d = decide(canary_doc(), stats(500, 0.8), stats(60, 0.8, esc=0.3), 60, POLICY)
    assert d.action == "rollback" and "escalation_rate" in d.reason


def test_without_feedback_the_canary_holds():
    no_feedback = ArmStats()
    for _ in range(100):
        no_feedback.add(ArmOutcome("v2", tool_calls=1))
    d = decide(canary_doc(), stats(500, 0.8), no_feedback, 100, POLICY)
    assert d.action == "hold" and "not enough feedback" in d.reason


def test_eval_gates():
    assert gate_failures(GOOD_EVAL, EvalGates()) == []
    bad = {**GOOD_EVAL, "win_rate": 0.4, "tool_call_validity": 0.8}
    reasons = gate_failures(bad, EvalGates())
    assert any("win_rate" in r for r in reasons) and any("tool_call_validity" in r for r in reasons)
    assert gate_failures(None, EvalGates()) == ["no eval results"]


def test_steps_must_increase():
    with pytest.raises(ValueError):
        CanaryPolicy(steps=(0.5, 0.25))


def test_outcome_from_an_assembled_call():
    from agent_dpo.calls import StoredEvent, assemble_call
    from agent_dpo.events import build_envelope, parse_event, subject_for

    def ev(n, type_, data):
        env = build_envelope(event_id=f"e{n}", event_type=type_, tenant_id="acme", agent_id="rebook",
                             call_id="c1", data=data)
        return StoredEvent(parse_event(subject_for("acme", "rebook", type_), json.dumps(env).encode()), n)

    call = assemble_call([
        ev(1, "call.started", {"system_prompt": "s", "tools": [], "model": {"name": "m", "version": "v2"},
                               "channel": "voice"}),
        ev(2, "call.tool_call", {"turn": 1, "tool_call_id": "t1", "name": "book", "arguments": "{}",
                                 "error": "bad slot"}),
        ev(3, "call.ended", {"outcome": "escalated"}),
        ev(4, "feedback.csat", {"score": 2, "scale_max": 5, "source": "survey"}),
    ])
    assert outcome_from_call(call) == ArmOutcome("v2", csat=0.4, thumbs_down=None, tool_errors=1,
                                                 tool_calls=1, escalated=True)


# ---- on a real nats-server, with the router assigning arms ----

@pytest.fixture
async def nc(nats_url):
    conn = await nats.connect(nats_url)
    yield conn
    await conn.close()


@pytest.fixture
async def registry(nc):
    reg = await NatsRegistry.open(nc)
    for v in ("v1", "v2"):
        await reg.put_manifest(manifest(v))
    await reg.change_rollout("acme", "rebook", lambda d: promote(d, "test", version="v1"))
    return reg


async def simulate(router: Router, controller: CanaryController, quality: dict[str, float], n: int,
                   rng: random.Random, offset: int) -> None:
    """`n` calls through the router; each finished call's CSAT depends on the version that served it."""
    for i in range(n):
        cid = f"call-{offset + i}"
        ref = router.resolve("acme", "rebook", cid)
        router.release(cid)
        csat = min(1.0, max(0.0, rng.gauss(quality[ref.version], 0.1)))
        controller.record("acme", "rebook", ArmOutcome(ref.version, csat=csat, thumbs_down=csat < 0.4,
                                                       tool_calls=1))


async def run_canary(registry, router, controller, quality, rng) -> list[str]:
    actions = []
    offset = 0
    _, rev = await registry.get_rollout("acme", "rebook")
    while router.revision("acme", "rebook") < rev:
        await asyncio.sleep(0.005)
    for _ in range(60):
        doc = router.rollout("acme", "rebook")
        if doc.state != "canary":
            break
        await simulate(router, controller, quality, 200, rng, offset)
        offset += 200
        d = await controller.evaluate("acme", "rebook")
        actions.append(d.action)
        # Wait until the router runs the new document before routing more calls.
        _, rev = await registry.get_rollout("acme", "rebook")
        while router.revision("acme", "rebook") < rev:
            await asyncio.sleep(0.005)
    return actions


async def collect(nc, subject: str) -> list[dict]:
    got: list[dict] = []

    async def on_msg(msg):
        got.append(json.loads(msg.data))

    await nc.subscribe(subject, cb=on_msg)
    await nc.flush()
    return got


async def test_good_version_walks_every_step_to_champion(registry, nc, nats_url):
    published = await collect(nc, "agentdpo.registry.acme.rebook")
    router = await Router.connect(nats_url)
    controller = CanaryController(registry, POLICY)
    d = await controller.start("acme", "rebook", "v2", GOOD_EVAL)
    assert d.action == "start" and d.weight == 0.05
    actions = await run_canary(registry, router, controller, {"v1": 0.7, "v2": 0.8}, random.Random(1))
    assert [a for a in actions if a != "hold"] == ["advance", "advance", "advance", "promote"]
    doc, _ = await registry.get_rollout("acme", "rebook")
    assert (doc.champion, doc.previous, doc.challenger, doc.state) == ("v2", "v1", None, "stable")
    weights = [h.doc.canary_weight for h in await registry.history("acme", "rebook")]
    assert weights[-5:] == [0.05, 0.25, 0.5, 1.0, 0.0]
    await asyncio.sleep(0.1)
    kinds = [(m["kind"], m.get("action")) for m in published]
    assert ("canary", "start") in kinds and ("canary", "promote") in kinds
    assert sum(k == ("canary", "advance") for k in kinds) == 3
    await router.stop()


async def test_worse_csat_version_is_rolled_back_automatically(registry, nc, nats_url):
    published = await collect(nc, "agentdpo.registry.acme.rebook")
    router = await Router.connect(nats_url)
    controller = CanaryController(registry, POLICY)
    await controller.start("acme", "rebook", "v2", GOOD_EVAL)
    actions = await run_canary(registry, router, controller, {"v1": 0.8, "v2": 0.55}, random.Random(2))
    assert actions[-1] == "rollback" and "promote" not in actions
    doc, _ = await registry.get_rollout("acme", "rebook")
    assert (doc.champion, doc.challenger, doc.state) == ("v1", None, "rolled_back")
    assert "csat" in doc.reason and doc.changed_by == "canary"
    assert {router.resolve("acme", "rebook", f"after-{i}").version for i in range(100)} == {"v1"}
    await asyncio.sleep(0.1)
    assert any(m.get("action") == "rollback" for m in published)
    await router.stop()


async def test_eval_gates_refuse_entry_and_say_why(registry):
    controller = CanaryController(registry, POLICY)
    d = await controller.start("acme", "rebook", "v2", {**GOOD_EVAL, "win_rate": 0.3})
    assert d.action == "refuse" and "win_rate" in d.reason
    doc, _ = await registry.get_rollout("acme", "rebook")
    assert doc.state == "stable" and doc.challenger is None


async def test_a_restarted_controller_resumes_at_the_kv_step(registry, nats_url):
    router = await Router.connect(nats_url)
    rng = random.Random(3)
    first = CanaryController(registry, POLICY)
    await first.start("acme", "rebook", "v2", GOOD_EVAL)
    offset = 0
    while (await registry.get_rollout("acme", "rebook"))[0].step < 1:
        await simulate(router, first, {"v1": 0.7, "v2": 0.8}, 200, rng, offset)
        offset += 200
        await first.evaluate("acme", "rebook")
    del first  # the process dies; its in-memory stats are gone

    second = CanaryController(registry, POLICY)
    doc = await second.refresh("acme", "rebook")
    assert (doc.state, doc.step, doc.canary_weight) == ("canary", 1, 0.25)
    actions = await run_canary(registry, router, second, {"v1": 0.7, "v2": 0.8}, rng)
    assert [a for a in actions if a != "hold"] == ["advance", "advance", "promote"]
    await router.stop()


# ---- end to end: a version trained by the TRL recipe, served by the local PEFT backend ----

@pytest.mark.slow
async def test_a_trained_version_reaches_champion_and_a_worse_one_is_rolled_back(
        registry, nc, nats_url, tiny_model_dir, smollm2_store, tmp_path):
    from test_serving import make_adapter
    from test_training import pair_rows, tiny_job

    from agent_dpo.registry import manifest_for
    from agent_dpo.training.backend import get_backend
    from agent_dpo_adapters.hf_models import load_model, load_tokenizer
    from agent_dpo_adapters.local_serving import LocalPeftBackend
    from agent_dpo_adapters.nats_artifacts import get_artifact, put_artifact

    js = nc.jetstream()
    job = tiny_job(tmp_path, tiny_model_dir, smollm2_store, pair_rows(), sft_steps=1, max_steps=2)
    job.tenant_id, job.agent_id, job.version = "acme", "rebook", "dpo-good"
    trained = get_backend("trl").train(job, lambda _p: None)
    name = "acme/rebook/dpo-good"
    digest = await put_artifact(js, name, trained.artifact_dir)
    assert digest == trained.artifact_digest
    await registry.put_manifest(manifest_for("acme", "rebook", trained, artifact_name=name, eval_result=GOOD_EVAL,
                                             parent="v1"))
    bad_dir = make_adapter(tiny_model_dir, tmp_path / "bad", seed=9)
    bad_digest = await put_artifact(js, "acme/rebook/dpo-bad", bad_dir)
    await registry.put_manifest(manifest_for("acme", "rebook", trained.__class__(**{
        **vars(trained), "version": "dpo-bad", "artifact_digest": bad_digest}),
        artifact_name="acme/rebook/dpo-bad", eval_result=GOOD_EVAL))

    async def fetch(ref):
        return await get_artifact(js, ref.artifact_name, ref.artifact_digest, tmp_path / "cache")

    base = str(tiny_model_dir)
    backend = LocalPeftBackend(load_model(base, tmp_path), load_tokenizer(base, tmp_path), fetch,
                               base_model=base, max_new_tokens=4)
    router = Router(registry, backend, base_model=base)
    await router.start()
    # The champion so far is the base model (no version): outcomes with version None are its arm.
    await registry.change_rollout("acme", "rebook", lambda d: d.model_copy(update={"champion": None}))
    quality = {None: 0.7, "v1": 0.7, "dpo-good": 0.8, "dpo-bad": 0.5}

    async def canary(version: str, seed: int) -> list[str]:
        controller = CanaryController(registry, POLICY)
        assert (await controller.start("acme", "rebook", version, GOOD_EVAL)).action == "start"
        actions = await run_canary(registry, router, controller, quality, random.Random(seed))
        # Real generation through the pinned adapter, for a call on each arm.
        for i in range(2):
            ref = router.resolve("acme", "rebook", f"real-{version}-{i}")
            answer = await backend.chat(ref, [{"role": "user", "content": "Tuesday?"}])
            assert answer.message["role"] == "assistant"
            router.release(f"real-{version}-{i}")
        return actions

    actions = await canary("dpo-good", 4)
    assert [a for a in actions if a != "hold"] == ["advance", "advance", "advance", "promote"]
    doc, _ = await registry.get_rollout("acme", "rebook")
    assert (doc.champion, doc.state) == ("dpo-good", "stable")

    actions = await canary("dpo-bad", 5)
    assert actions[-1] == "rollback"
    doc, _ = await registry.get_rollout("acme", "rebook")
    assert (doc.champion, doc.challenger, doc.state) == ("dpo-good", None, "rolled_back")
    await wait_unloaded(backend, "acme__rebook__dpo-bad")
    assert backend.adapters == {"acme__rebook__dpo-good"}
    await router.stop()


async def wait_unloaded(backend, name: str) -> None:
    for _ in range(500):
        if name not in backend.adapters:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{name} still loaded")
