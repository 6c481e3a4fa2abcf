"""The example world: the simulator is deterministic, speaks the event contract, produces every signal
the pairs need (schema retries that really fail and really pass, CSAT, thumbs, side-by-side labels,
corrections), arrives like a real bus (interleaved, late, re-sent), and publishes to a real nats-server."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter, defaultdict

import nats
import pytest

from agent_dpo.calls import Call, StoredEvent, assemble_call
from agent_dpo.events import Event, Rejection, parse_event, subject_for
from agent_dpo.toolcheck import check_tool_call
from agent_dpo.world.agents import AGENTS, example_agent
from agent_dpo.world.simulator import (
    BREAKS,
    break_tool_call,
    count_by_type,
    live_feedback,
    live_prompts,
    malformed_ids,
    publish_world,
    simulate,
)


def _bytes(envs: list[dict]) -> bytes:
    return b"\n".join(json.dumps(e, separators=(",", ":")).encode() for e in envs)


def _parse(env: dict) -> Event | Rejection:
    return parse_event(
        subject_for(env["tenant_id"], env["agent_id"], env["type"]),
        json.dumps(env, separators=(",", ":")).encode(),
    )


def _calls(envs: list[dict]) -> list[Call]:
    by_call: dict[tuple[str, str], list[StoredEvent]] = defaultdict(list)
    for seq, env in enumerate(envs, start=1):
        event = _parse(env)
        assert isinstance(event, Event), event
        by_call[(event.tenant_id, event.call_id)].append(StoredEvent(event, seq))
    return [assemble_call(events) for events in by_call.values()]


@pytest.fixture(scope="module")
def world() -> list[dict]:
    return list(simulate(400, seed=3))


@pytest.fixture(scope="module")
def calls(world) -> list[Call]:
    return _calls(world)


def test_same_seed_gives_identical_bytes_and_another_seed_differs():
    first = _bytes(list(simulate(150, seed=42)))
    assert first == _bytes(list(simulate(150, seed=42)))
    assert first != _bytes(list(simulate(150, seed=43)))


def test_same_seed_gives_the_same_world_in_another_process():
    import hashlib
    import os
    import subprocess
    import sys

    code = ("import hashlib, json; from agent_dpo.world.simulator import simulate; "
            "print(hashlib.sha256(b''.join(json.dumps(e).encode() for e in simulate(120, 42))).hexdigest())")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    here = hashlib.sha256(b"".join(json.dumps(e).encode() for e in simulate(120, 42))).hexdigest()
    assert other.stdout.strip() == here


def test_every_event_follows_the_contract(world):
    rejected = [r for r in map(_parse, world) if isinstance(r, Rejection)]
    assert not rejected, rejected[:3]


def test_requested_malformed_messages_are_rejected_each_for_a_reason():
    envs = list(simulate(60, seed=9, malformed=6))
    bad = malformed_ids(9, 6)
    verdicts = {e["event_id"]: _parse(e) for e in envs}
    assert {i for i, v in verdicts.items() if isinstance(v, Rejection)} == bad
    codes = {v.code for i, v in verdicts.items() if i in bad}
    assert codes == {"unknown_schema", "invalid_envelope", "unknown_type", "invalid_data"}
    assert count_by_type(envs, seed=9, malformed=6)["malformed"] == 6


def test_both_agents_in_their_own_tenants(world):
    pairs = {(e["tenant_id"], e["agent_id"]) for e in world}
    assert pairs == {("acme-salons", "salon-rebook"), ("northside-health", "appointment-resolver")}
    only_salon = {e["agent_id"] for e in simulate(30, seed=3, agents=("acme-salons/salon-rebook",))}
    assert only_salon == {"salon-rebook"}
    assert example_agent("northside-health/appointment-resolver") is AGENTS["appointment-resolver"]


def test_arrival_is_interleaved_partly_out_of_order_with_resends(world, calls):
    counts = count_by_type(world)
    assert counts["call.ended"] == 400 and counts["call.started"] == 400
    assert counts["duplicates"] > 0
    by_id: dict[str, list[bytes]] = defaultdict(list)
    for env in world:
        by_id[env["event_id"]].append(json.dumps(env).encode())
    assert all(len(set(copies)) == 1 for copies in by_id.values())  # a re-send is the same bytes
    # Calls interleave, and within a call some events arrive before earlier-stamped ones.
    assert any(world[i]["call_id"] != world[i + 1]["call_id"] for i in range(50))
    late = 0
    last_ts: dict[str, str] = {}
    for env in world:
        if env["ts"] < last_ts.get(env["call_id"], ""):
            late += 1
        last_ts[env["call_id"]] = max(env["ts"], last_ts.get(env["call_id"], ""))
    assert late > 0
    # Some feedback arrives days after the call ended.
    days_later = [
        c
        for c in calls
        for f in c.feedback
        if (f.ts - max(t.ts for t in c.turns.values())).total_seconds() > 86_400
    ]
    assert days_later


def test_calls_are_multi_turn_voice_and_chat_with_asr_and_barge_ins(calls):
    channels = Counter(c.started.channel for c in calls)
    assert channels["voice"] > channels["chat"] > 0 and channels["sms"] > 0
    assert sum(len(c.turns) for c in calls) / len(calls) > 6
    voice_user = [
        t for c in calls if c.started.channel == "voice" for t in c.turns.values() if t.role == "user"
    ]
    assert all(t.asr_confidence is not None and 0 <= t.asr_confidence <= 1 for t in voice_user)
    chat_user = [
        t for c in calls if c.started.channel != "voice" for t in c.turns.values() if t.role == "user"
    ]
    assert all(t.asr_confidence is None for t in chat_user)
    assert any(t.interrupted for c in calls for t in c.turns.values())
    outcomes = Counter(c.ended.outcome for c in calls)
    assert {"completed", "transferred", "escalated", "abandoned"} <= set(outcomes)
    for c in calls:  # turns number 0..n-1 without gaps
        assert sorted(c.turns) == list(range(len(c.turns)))


def test_tool_calls_validate_except_the_invalid_ones_which_are_retried_validly(calls):
    failures, retried, codes, errors = 0, 0, Counter(), 0
    for call in calls:
        tools = call.tools
        for tc in call.tool_calls:
            verdict = check_tool_call(tools, tc.name, tc.arguments)
            if tc.error is not None:
                errors += 1
            if verdict.ok:
                assert tc.has_result or tc.error  # valid calls got a result (or a service error)
                continue
            failures += 1
            codes[verdict.code] += 1
            assert tc.error and not tc.has_result
            nxt = call.turns.get(tc.turn + 1)
            assert nxt is not None and nxt.role == "assistant"  # no user turn between
            retry = call.tool_calls_of(tc.turn + 1)
            assert retry and all(check_tool_call(tools, r.name, r.arguments).ok for r in retry)
            if retry[0].name == tc.name or verdict.code == "unknown_tool":
                retried += 1
    assert failures > 20 and retried == failures
    assert {"invalid_json", "unknown_tool", "schema_violation"} <= set(codes)
    used = {
        tc.name
        for call in calls
        for tc in call.tool_calls
        if check_tool_call(call.tools, tc.name, tc.arguments).ok
    }
    assert used == {t["function"]["name"] for a in AGENTS.values() for t in a.tools}  # every tool, validly
    assert errors > failures  # some valid calls failed in the service and were simply repeated


def test_feedback_has_every_kind_the_pairs_need(calls):
    kinds = Counter(f.kind for c in calls for f in c.feedback)
    assert all(kinds[k] > 10 for k in ("csat", "thumbs", "preference", "correction"))
    csat = [f.data for c in calls for f in c.feedback_of("csat")]
    assert {d.scale_max for d in csat} == {5, 10}
    assert {d.source for d in csat} == {"survey", "sms", "ivr", "csm"}
    assert 0.3 < len(csat) / len(calls) < 0.8  # some calls have no CSAT
    assert {f.data.rater for c in calls for f in c.feedback_of("thumbs")} == {"caller", "csm"}
    for c in calls:
        for f in c.feedback:
            if f.kind in ("thumbs", "preference", "correction"):
                assert c.turns[f.data.turn].role == "assistant"
            if f.kind == "preference":
                assert f.data.chosen != f.data.rejected


def test_csat_follows_the_rubric(calls):
    # Calls whose key answers were rubric-good (no correction, not abandoned) get better CSAT.
    good, bad = [], []
    for c in calls:
        for f in c.feedback_of("csat"):
            frac = f.data.score / f.data.scale_max
            (bad if c.feedback_of("correction") or c.ended.outcome == "abandoned" else good).append(frac)
    assert sum(good) / len(good) > sum(bad) / len(bad) + 0.15


def test_live_prompts_end_where_the_model_must_answer_and_feedback_follows_the_answer():
    prompts = list(live_prompts("salon-rebook", 6, seed=5))
    assert len(prompts) == 6 and len({p.call_id for p in prompts}) == 6
    for p in prompts:
        assert p.messages[0]["role"] == "system" and p.messages[-1]["role"] == "tool"
        assert all(isinstance(_parse(e), Event) for e in p.envelopes)
        served = p.envelopes_served_by("salon-rebook", "v3")
        assert next(e for e in served if e["type"] == "call.started")["data"]["model"]["version"] == "v3"
        assert all(isinstance(_parse(e), Event) for e in served)
        slots = json.loads(p.messages[-1]["content"])["slots"]
        s = slots[0]
        hour, minute = map(int, s["start"].split(":"))
        good = (
            f"Thanks for waiting. I have {s['date']} at {hour % 12 or 12}:{minute:02d} "
            f"{'pm' if hour >= 12 else 'am'} with {s['stylist']['name']}. Would that work for you?"
        )
        pushy = "You need to book right now, we're nearly full. Decide now."
        good_score, good_envs = live_feedback(p, good, seed=1)
        bad_score, bad_envs = live_feedback(p, pushy, seed=1)
        assert good_score > 0.8 and bad_score < 0.3
        for envs in (good_envs, bad_envs):
            assert [e["type"] for e in envs] == [
                "call.turn",
                "call.ended",
                "feedback.csat",
                "feedback.thumbs",
            ]
            assert all(isinstance(_parse(e), Event) for e in envs)
            assert envs[0]["data"]["turn"] == p.turn
        assert good_envs[3]["data"]["up"] or bad_envs[3]["data"]["up"] is False


async def _publish_and_count(url: str, n: int) -> tuple[Counter, int]:
    from agent_dpo.config import BusConfig
    from agent_dpo_adapters.nats_bus import ensure_bus

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        bus = BusConfig()
        await ensure_bus(js, bus)
        counts = await publish_world(js, n, seed=21, malformed=2)
        info = await js.stream_info(bus.stream, subjects_filter="agents.*.*.call.ended")
        ended = sum((info.state.subjects or {}).values())
        return counts, ended
    finally:
        await nc.close()


def test_publishing_n_calls_stores_n_call_ended_events(nats_url):
    counts, ended = asyncio.run(_publish_and_count(nats_url, 120))
    assert counts["call.ended"] == 120 and counts["calls"] == 120 and counts["malformed"] == 2
    assert ended == 120  # re-sends were dropped by Nats-Msg-Id


def test_example_script_publishes_and_prints_counts(nats_url, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "simulate_calls.py"
    spec = importlib.util.spec_from_file_location("simulate_calls", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = [
        "--calls",
        "40",
        "--seed",
        "4",
        "--nats-url",
        nats_url,
        "--init-bus",
        "--agent",
        "acme-salons/salon-rebook",
    ]
    assert script.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("published ") and "call.ended                   40" in out


def test_every_way_of_breaking_a_call_really_fails_its_schema(calls):
    seen = set()
    rng = random.Random(0)
    for call in calls:
        for tc in call.tool_calls:
            if tc.name in seen or not check_tool_call(call.tools, tc.name, tc.arguments).ok:
                continue
            seen.add(tc.name)
            args = json.loads(tc.arguments)
            for kind in BREAKS:
                name, text, error = break_tool_call(rng, call.agent_id, tc.name, args, kind)
                verdict = check_tool_call(call.tools, name, text)
                assert not verdict.ok and error, (tc.name, kind, text)
                if kind == "unknown_tool":
                    assert verdict.code == "unknown_tool"
    assert len(seen) == 9
