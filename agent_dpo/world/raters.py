"""The example world's side-by-side raters: for each record of `agent-dpo sample`, a simulated rater reads
the candidates to one turn and picks the one callers would reward over the one they would not, as a
`feedback.preference` event for that call and turn, ready to publish. Raters read the hidden rubric with
noise (like the simulator's labels, `simulator-rubric`) and pass when the candidates are about as good."""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

from agent_dpo.events import SCHEMA_V1
from agent_dpo.world.rubric import score_answer

SIDE_BY_SIDE_RATER = "sbs-panel"


def side_by_side_events(tenant_id: str, agent_id: str, records: Iterable[dict[str, Any]], seed: int, *,
                        noise: float = 0.03, margin: float = 0.05, rater: str = SIDE_BY_SIDE_RATER,
                        ts: str = "2026-11-20T12:00:00.000Z") -> tuple[list[dict[str, Any]], dict[str, int]]:
    """(envelopes, counts). One `feedback.preference` per record whose best candidate beats its worst by
    more than `margin` in the rater's (noisy) reading; counts say how many were rated and passed."""
    rng = random.Random(f"sbs:{seed}")
    envelopes: list[dict[str, Any]] = []
    counts = {"records": 0, "rated": 0, "passed_as_equal": 0}
    for record in records:
        counts["records"] += 1
        candidates = [_message(c) for c in record["candidates"]]
        tools = record.get("tools") or []
        scores = [score_answer(agent_id, record["prompt"], tools, c) + rng.gauss(0.0, noise) for c in candidates]
        best = max(range(len(candidates)), key=lambda i: scores[i])
        worst = min(range(len(candidates)), key=lambda i: scores[i])
        if scores[best] - scores[worst] <= margin:
            counts["passed_as_equal"] += 1
            continue
        meta = record["meta"]
        call_id = meta["call_id"]
        envelopes.append({
            # one id per campaign (version, seed) and turn: a re-sent pick is deduplicated, a new campaign is not
            "schema": SCHEMA_V1, "event_id": f"{call_id}-sbs-{record.get('version', 'v')}-{seed}-t{meta['turn']}",
            "type": "feedback.preference",
            "tenant_id": tenant_id, "agent_id": agent_id, "call_id": call_id, "ts": ts,
            "data": {"turn": meta["turn"], "chosen": candidates[best], "rejected": candidates[worst],
                     "rater": rater, "reason": f"side-by-side of {record.get('version', 'a version')}'s answers"}})
        counts["rated"] += 1
    return envelopes, counts


def _message(candidate: dict[str, Any]) -> dict[str, Any]:
    """A candidate as the contract's assistant Message (content null only beside tool calls)."""
    calls = [{"id": c.get("id") or f"call_{i}", "type": "function",
              "function": {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}}
             for i, c in enumerate(candidate.get("tool_calls") or [])]
    content = candidate.get("content")
    message: dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None}
    if calls:
        message["tool_calls"] = calls
    elif message["content"] is None:
        message["content"] = ""
    return message
