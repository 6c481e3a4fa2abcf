"""On-policy pairs, as an operator runs them: a version's candidates for exported prompts are rated side
by side, the picks travel a real nats-server as `feedback.preference`, `agent-dpo ingest` stores them and
`agent-dpo pairs --rater` exports exactly those pairs (plus any signal asked for with --signal)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import nats
import pytest

from agent_dpo.cli import main
from agent_dpo.errors import AgentDpoError, UsageError
from agent_dpo.events import parse_event, subject_for
from agent_dpo.sampling import SampleSettings, candidate_prompts, read_candidates, write_candidates
from agent_dpo.world.raters import SIDE_BY_SIDE_RATER, side_by_side_events
from agent_dpo.world.rubric import read_context, score_answer
from agent_dpo.world.simulator import LABELLED_BY, publish_world

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "side_by_side.py"
AGENT = "acme-salons/salon-rebook"
TENANT, AGENT_ID = AGENT.split("/")


async def _publish_world(url: str) -> None:
    nc = await nats.connect(url)
    try:
        await publish_world(nc.jetstream(), 60, seed=5, agents=(AGENT_ID,))
    finally:
        await nc.close()


def _offer_prompts(rows: list[dict]) -> list[dict]:
    """Prompts where the answer offers slots (the find_slots result is in the context)."""
    return [p for p in candidate_prompts(rows) if any(m["role"] == "tool" and "slots" in (m.get("content") or "")
                                                      for m in p["prompt"])]


def _candidates(prompt: dict) -> list[dict]:
    """A good offer (a real slot, courteous, asks), an invented one, and the good one again."""
    hour, minute = min(read_context(prompt["prompt"]).slot_times)
    good = {"role": "assistant", "content": f"Of course. I have {hour:02d}:{minute:02d} open. Would you like it?",
            "tool_calls": []}
    invented = {"role": "assistant", "content": "You must book 3:07 am now.", "tool_calls": []}
    return [good, invented, good]


def test_rated_candidates_become_pairs_through_nats(nats_url, tmp_path, capsys):
    store = tmp_path / "store"
    assert main(["bus", "init", "--nats-url", nats_url]) == 0
    asyncio.run(_publish_world(nats_url))
    assert main(["ingest", "--nats-url", nats_url, "--store", str(store), "--until-idle", "1"]) == 0
    before = tmp_path / "before.jsonl"
    assert main(["pairs", "--agent", AGENT, "--format", "trl-dpo", "--out", str(before), "--store", str(store),
                 "--split", "all", "--no-redact"]) == 0
    rows = [json.loads(line) for line in before.read_text().splitlines()]
    prompts = _offer_prompts(rows)[:6]
    assert len(prompts) >= 3
    records = [{**p, "version": "v1:sft", "candidates": _candidates(p)} for p in prompts]
    # one record whose candidates are all alike: raters pass on it
    records.append({**prompts[0], "meta": {**prompts[0]["meta"]}, "version": "v1:sft",
                    "candidates": [_candidates(prompts[0])[0]] * 2})
    write_candidates(tmp_path / "cand.jsonl", records)
    records = read_candidates(tmp_path / "cand.jsonl")

    envelopes, counts = side_by_side_events(TENANT, AGENT_ID, records, seed=1)
    assert counts == {"records": len(records), "rated": len(prompts), "passed_as_equal": 1}
    for env in envelopes:  # every event keeps the contract
        event = parse_event(subject_for(TENANT, AGENT_ID, env["type"]), json.dumps(env).encode())
        assert event.type == "feedback.preference" and event.data.rater == SIDE_BY_SIDE_RATER
        assert "3:07" in event.data.rejected.content and "Of course" in event.data.chosen.content

    # the example stands in for a platform's rating screen: it rates the same way and publishes the picks
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--candidates", str(tmp_path / "cand.jsonl"),
                           "--agent", AGENT, "--nats-url", nats_url, "--seed", "1"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"{len(records)} prompts: {len(prompts)} rated"), proc.stdout
    assert main(["ingest", "--nats-url", nats_url, "--store", str(store), "--until-idle", "1"]) == 0
    capsys.readouterr()
    out = tmp_path / "onpolicy.jsonl"
    assert main(["pairs", "--agent", AGENT, "--format", "trl-dpo", "--out", str(out), "--store", str(store),
                 "--split", "all", "--no-redact", "--rater", SIDE_BY_SIDE_RATER,
                 "--labelled-by", LABELLED_BY]) == 0
    assert "preference" in capsys.readouterr().out
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(pairs) == len(prompts)
    by_turn = {(p["meta"]["call_id"], p["meta"]["turn"]): p for p in prompts}
    for pair in pairs:
        prompt = by_turn[(pair["meta"]["call_id"], pair["meta"]["turn"])]
        assert pair["prompt"] == prompt["prompt"] and pair["meta"]["rater"] == SIDE_BY_SIDE_RATER
        assert pair["chosen"][0]["content"].startswith("Of course")
        tools = prompt["tools"]
        assert score_answer(AGENT, pair["prompt"], tools, pair["chosen"][0]) > score_answer(
            AGENT, pair["prompt"], tools, pair["rejected"][0])
    meta = json.loads(Path(f"{out}.meta.json").read_text())
    assert meta["selected"] == {"signals": [], "raters": [SIDE_BY_SIDE_RATER]}

    # --signal adds up with --rater: the side-by-side pairs plus every schema retry
    both = tmp_path / "both.jsonl"
    assert main(["pairs", "--agent", AGENT, "--format", "trl-dpo", "--out", str(both), "--store", str(store),
                 "--split", "all", "--no-redact", "--rater", SIDE_BY_SIDE_RATER, "--signal", "schema_retry"]) == 0
    signals = [json.loads(line)["meta"]["signal"] for line in both.read_text().splitlines()]
    retries = sum(r["meta"]["signal"] == "schema_retry" for r in rows)
    assert retries and signals.count("schema_retry") == retries and signals.count("preference") == len(prompts)


def test_side_by_side_example_without_a_server_says_so_in_one_line(tmp_path):
    write_candidates(tmp_path / "c.jsonl", [])
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--candidates", str(tmp_path / "c.jsonl"), "--agent", AGENT,
                           "--nats-url", "nats://127.0.0.1:1"], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("side_by_side: cannot publish")
    assert "Traceback" not in proc.stderr


def test_unknown_signal_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["pairs", "--agent", AGENT, "--format", "trl-dpo", "--out", str(tmp_path / "x.jsonl"),
              "--store", str(tmp_path), "--signal", "sideways"])
    assert exit_.value.code == 2 and "sideways" in capsys.readouterr().err


def test_prompts_need_their_call_and_turn_and_repeat_once():
    row = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [], "rejected": [],
           "meta": {"call_id": "c1", "turn": 3}}
    assert len(candidate_prompts([row, {**row, "chosen": [{"role": "assistant", "content": "x"}]}])) == 1
    with pytest.raises(AgentDpoError, match="meta.call_id"):
        candidate_prompts([{"prompt": row["prompt"], "chosen": [], "rejected": []}])


@pytest.mark.parametrize("kwargs, word", [({"samples": 1}, "samples"), ({"temperature": 0}, "temperature"),
                                          ({"precision": "fp8"}, "precision"), ({"top_p": 0}, "top_p")])
def test_sample_settings_refuse_what_cannot_give_a_choice(kwargs, word):
    with pytest.raises(UsageError, match=word):
        SampleSettings(**kwargs)
