"""Signals into training data: assembled calls in, DPO pairs and KTO examples out, with a reason for
everything left out. Follows spec/events-v1.md "From a call to training data"; exports (export.py)
only select, redact, dedupe and reshape what this builds. One pass over the calls, linear in their size.

Signals: `preference` and `correction` (feedback events), `schema_retry` (a failing tool call fixed by
the next assistant turn), `thumbs` (per turn) and `csat` (per call). A call that has not ended, or
whose `call.started` never arrived, gives nothing.

CSAT credit policies (`PairingConfig.csat_policies`):
- `all-turns` (default, the spec's): the call's latest CSAT, scaled to score/scale_max, labels every
  assistant turn: desirable at >= `csat_desirable` (0.8), undesirable at <= `csat_undesirable` (0.4),
  nothing in between.
- `last-turn`: the same label on the call's last assistant turn only (the turn closest to the outcome
  the caller rated).
- `shared-prefix` (off by default): calls of one agent (on the same split side) whose conversation is
  identical up to an assistant turn - same system prompt, tools and earlier turns, tool results
  included - but which answered that turn differently, give a DPO pair (signal `csat_prefix`) when
  their CSAT differs by at least `csat_margin` (0.4 of the scale): chosen = the best-rated call's
  answer, rejected = the worst-rated one's. Turn-level evidence from call-level feedback: the two
  calls differ first at exactly that turn. It keeps one entry per assistant turn of every rated call
  in memory until the end of the pass.

Precedence and conflicts, so one turn never teaches two things:
- several CSAT events on one call: the latest (by ts) stands, earlier ones drop as `csat_superseded`;
- a turn with thumbs: its CSAT example drops as `overridden_by_thumbs` (turn-level feedback is more
  specific than call-level);
- thumbs up and thumbs down on one turn: all drop as `conflicting_thumbs`; several thumbs agreeing on
  one turn make one example.

An example whose context or completion touches a turn that arrived twice with different content
drops as `conflicting_turn`; one whose context misses turn numbers (counting from the call's first
turn) drops as `turns_missing`.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from pydantic import TypeAdapter

from agent_dpo.calls import Call, FeedbackRecord
from agent_dpo.context import CallContexts, assistant_message, message_dict, tool_result_text
from agent_dpo.events import Tool
from agent_dpo.toolcheck import ToolCallVerdict, check_tool_call

PAIR_SIGNALS = ("preference", "correction", "schema_retry", "csat_prefix")
KTO_SIGNALS = ("thumbs", "csat")
SIGNALS = PAIR_SIGNALS + KTO_SIGNALS
CSAT_POLICIES = ("all-turns", "last-turn", "shared-prefix")

# Drop reasons, stable for dashboards and tests.
DROP_REASONS = (
    "call_incomplete", "call_started_missing", "foreign_agent",
    "feedback_turn_missing", "feedback_turn_not_assistant", "conflicting_turn", "turns_missing",
    "invalid_tool_call_chosen", "invalid_tool_call_desirable", "chosen_equals_rejected",
    "conflicting_thumbs", "overridden_by_thumbs", "csat_neutral", "csat_superseded",
    "csat_no_assistant_turns", "failed_tool_call_without_retry",
    # decided by the export, listed here so every reason is in one place
    "duplicate", "conflicting_labels", "length_balance",
)

Checker = Callable[[list[dict], str, str], ToolCallVerdict]


@dataclass(frozen=True)
class PairingConfig:
    csat_desirable: float = 0.8
    csat_undesirable: float = 0.4
    csat_policies: tuple[str, ...] = ("all-turns",)
    csat_margin: float = 0.4  # shared-prefix: the least CSAT gap (fraction of the scale) that makes a pair

    def __post_init__(self) -> None:
        if not 0.0 <= self.csat_undesirable < self.csat_desirable <= 1.0:
            raise ValueError(f"CSAT thresholds need 0 <= undesirable ({self.csat_undesirable}) "
                             f"< desirable ({self.csat_desirable}) <= 1")
        unknown = [p for p in self.csat_policies if p not in CSAT_POLICIES]
        if unknown:
            raise ValueError(f"unknown CSAT policy {unknown[0]!r}; known: {', '.join(CSAT_POLICIES)}")
        if not 0.0 < self.csat_margin <= 1.0:
            raise ValueError(f"csat_margin {self.csat_margin} is outside (0, 1]")


@dataclass(frozen=True)
class Pair:
    """One DPO pair. Messages are in the neutral shape of context.py (arguments as JSON text)."""

    call_id: str
    signal: str
    turn: int
    prompt: list[dict[str, Any]] = field(repr=False)
    chosen: dict[str, Any]
    rejected: dict[str, Any]
    tools: list[dict[str, Any]] = field(repr=False)
    event_ids: tuple[str, ...]
    side: str = "train"
    rater: str | None = None
    other_call_id: str | None = None  # csat_prefix: the call the rejected answer comes from


@dataclass(frozen=True)
class KtoExample:
    call_id: str
    signal: str
    turn: int
    prompt: list[dict[str, Any]] = field(repr=False)
    completion: dict[str, Any]
    label: bool
    tools: list[dict[str, Any]] = field(repr=False)
    event_ids: tuple[str, ...]
    side: str = "train"
    rater: str | None = None


@dataclass(frozen=True)
class Drop:
    reason: str
    signal: str  # the signal that lost something, or "call" for a whole call
    call_id: str
    event_id: str | None = None
    detail: str = ""


@dataclass
class Examples:
    """What pairing made of one agent's calls."""

    pairs: list[Pair] = field(default_factory=list)
    kto: list[KtoExample] = field(default_factory=list)
    drops: list[Drop] = field(default_factory=list)
    calls_seen: int = 0
    calls_complete: int = 0
    calls_by_side: Counter = field(default_factory=Counter)  # complete calls per split side
    events: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    raters: Counter = field(default_factory=Counter)  # "thumbs:caller" -> feedback events of complete calls

    def drop_counts(self) -> Counter:
        return Counter(d.reason for d in self.drops)

    def signal_counts(self) -> Counter:
        return Counter(p.signal for p in self.pairs) + Counter(k.signal for k in self.kto)


# ---- one call -------------------------------------------------------------------------------------

class _CallView:
    """Per-call caches: tools built once, tool-call verdicts computed once, contexts built once."""

    def __init__(self, call: Call, checker: Checker, tools: list[dict[str, Any]]) -> None:
        self.call = call
        self.tools = tools
        self.checker = checker
        self.contexts = CallContexts(call)
        self._verdicts: dict[int, list[ToolCallVerdict]] = {}
        turns = sorted(call.turns)
        self.first_conflict = min(call.conflicting_turns) if call.conflicting_turns else None
        # The first turn number that comes after a hole: contexts from it on miss something.
        self.first_gap = next((b for a, b in pairwise(turns) if b != a + 1), None)

    def verdicts(self, turn: int) -> list[ToolCallVerdict]:
        found = self._verdicts.get(turn)
        if found is None:
            found = self._verdicts[turn] = [self.checker(self.tools, tc.name, tc.arguments)
                                            for tc in self.call.tool_calls_of(turn)]
        return found

    def message_valid(self, message: dict[str, Any]) -> ToolCallVerdict | None:
        """None when every tool call of the message validates; else the first failing verdict."""
        for tc in message.get("tool_calls") or ():
            verdict = self.checker(self.tools, tc["function"]["name"], tc["function"]["arguments"])
            if not verdict.ok:
                return verdict
        return None

    def turn_problem(self, turn: int) -> str | None:
        """Why an example at `turn` (its context and the turn itself) cannot be trusted, if it cannot."""
        if self.first_conflict is not None and self.first_conflict <= turn:
            return "conflicting_turn"
        if self.first_gap is not None and self.first_gap <= turn:
            return "turns_missing"
        return None

    def feedback_turn_problem(self, turn: int) -> str | None:
        record = self.call.turns.get(turn)
        if record is None:
            return "feedback_turn_missing"
        if record.role != "assistant":
            return "feedback_turn_not_assistant"
        return self.turn_problem(turn)

    def turn_event_ids(self, turn: int) -> tuple[str, ...]:
        return (self.call.turns[turn].event_id, *(tc.event_id for tc in self.call.tool_calls_of(turn)))


def _same_answer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal content and tool calls (names and arguments); tool call ids do not make answers differ."""
    def key(m: dict[str, Any]) -> tuple:
        calls = tuple((tc["function"]["name"], tc["function"]["arguments"]) for tc in m.get("tool_calls") or ())
        return (m.get("content") or "", calls)
    return key(a) == key(b)


def _call_pairs(view: _CallView, side: str, out: Examples) -> None:
    call = view.call
    for fb in call.feedback:
        if fb.kind not in ("preference", "correction"):
            continue
        data = fb.data
        problem = view.feedback_turn_problem(data.turn)
        if problem:
            out.drops.append(Drop(problem, fb.kind, call.call_id, fb.event_id, f"turn {data.turn}"))
            continue
        if fb.kind == "preference":
            chosen, rejected = message_dict(data.chosen), message_dict(data.rejected)
            event_ids: tuple[str, ...] = (fb.event_id,)
        else:
            chosen, rejected = message_dict(data.corrected), assistant_message(call, data.turn)
            event_ids = (fb.event_id, *view.turn_event_ids(data.turn))
        bad = view.message_valid(chosen)
        if bad:
            out.drops.append(Drop("invalid_tool_call_chosen", fb.kind, call.call_id, fb.event_id,
                                  f"{bad.code}: {bad.reason}"))
            continue
        if _same_answer(chosen, rejected):
            out.drops.append(Drop("chosen_equals_rejected", fb.kind, call.call_id, fb.event_id))
            continue
        out.pairs.append(Pair(call.call_id, fb.kind, data.turn, view.contexts.context(data.turn), chosen,
                              rejected, view.tools, event_ids, side, data.rater))


def _schema_retries(view: _CallView, side: str, out: Examples) -> None:
    call = view.call
    ordered = call.ordered_turns()
    for i, record in enumerate(ordered):
        if record.role != "assistant":
            continue
        verdicts = view.verdicts(record.turn)
        failing = {tc.name for tc, v in zip(call.tool_calls_of(record.turn), verdicts) if not v.ok}
        if not failing:
            continue
        nxt = ordered[i + 1] if i + 1 < len(ordered) else None
        retried = nxt is not None and nxt.role == "assistant" and any(
            v.ok and tc.name in failing
            for tc, v in zip(call.tool_calls_of(nxt.turn), view.verdicts(nxt.turn)))
        first_event = call.tool_calls_of(record.turn)[0].event_id
        if not retried:
            out.drops.append(Drop("failed_tool_call_without_retry", "schema_retry", call.call_id, first_event,
                                  f"turn {record.turn}: {', '.join(sorted(failing))}"))
            continue
        if not all(v.ok for v in view.verdicts(nxt.turn)):
            out.drops.append(Drop("invalid_tool_call_chosen", "schema_retry", call.call_id, first_event,
                                  f"turn {nxt.turn} also makes an invalid tool call"))
            continue
        problem = view.turn_problem(nxt.turn)
        if problem:
            out.drops.append(Drop(problem, "schema_retry", call.call_id, first_event, f"turn {record.turn}"))
            continue
        out.pairs.append(Pair(
            call.call_id, "schema_retry", record.turn, view.contexts.context(record.turn),
            assistant_message(call, nxt.turn), assistant_message(call, record.turn), view.tools,
            (*view.turn_event_ids(record.turn), *view.turn_event_ids(nxt.turn)), side, "toolcheck"))


def _turn_example(view: _CallView, signal: str, turn: int, label: bool, event_ids: tuple[str, ...],
                  side: str, rater: str | None, out: Examples) -> None:
    call = view.call
    problem = view.turn_problem(turn)
    if problem:
        out.drops.append(Drop(problem, signal, call.call_id, event_ids[0], f"turn {turn}"))
        return
    if label and not all(v.ok for v in view.verdicts(turn)):
        out.drops.append(Drop("invalid_tool_call_desirable", signal, call.call_id, event_ids[0], f"turn {turn}"))
        return
    out.kto.append(KtoExample(call.call_id, signal, turn, view.contexts.context(turn),
                              assistant_message(call, turn), label, view.tools,
                              (*event_ids, *view.turn_event_ids(turn)), side, rater))


def _thumbs(view: _CallView, side: str, out: Examples) -> set[int]:
    """Thumbs examples; returns the turns that carry thumbs (CSAT yields to them)."""
    call = view.call
    by_turn: dict[int, list[FeedbackRecord]] = defaultdict(list)
    for fb in call.feedback_of("thumbs"):
        problem = view.feedback_turn_problem(fb.data.turn)
        if problem in ("feedback_turn_missing", "feedback_turn_not_assistant"):
            out.drops.append(Drop(problem, "thumbs", call.call_id, fb.event_id, f"turn {fb.data.turn}"))
            continue
        by_turn[fb.data.turn].append(fb)
    for turn in sorted(by_turn):
        group = by_turn[turn]
        labels = {fb.data.up for fb in group}
        if len(labels) > 1:
            out.drops.extend(Drop("conflicting_thumbs", "thumbs", call.call_id, fb.event_id, f"turn {turn}")
                             for fb in group)
            continue
        raters = ",".join(sorted({fb.data.rater for fb in group}))
        _turn_example(view, "thumbs", turn, group[0].data.up, tuple(fb.event_id for fb in group), side,
                      raters, out)
    return set(by_turn)


def csat_label(score: float, scale_max: float, config: PairingConfig) -> bool | None:
    scaled = score / scale_max
    if scaled >= config.csat_desirable:
        return True
    if scaled <= config.csat_undesirable:
        return False
    return None


def _latest_csat(view: _CallView, out: Examples) -> FeedbackRecord | None:
    csats = view.call.feedback_of("csat")  # feedback is sorted by (ts, event_id)
    for fb in csats[:-1]:
        out.drops.append(Drop("csat_superseded", "csat", view.call.call_id, fb.event_id))
    return csats[-1] if csats else None


def _csat(view: _CallView, csat: FeedbackRecord, thumbed: set[int], side: str, config: PairingConfig,
          out: Examples) -> None:
    call = view.call
    label = csat_label(csat.data.score, csat.data.scale_max, config)
    if label is None:
        out.drops.append(Drop("csat_neutral", "csat", call.call_id, csat.event_id,
                              f"{csat.data.score}/{csat.data.scale_max}"))
        return
    turns = [t.turn for t in call.ordered_turns() if t.role == "assistant"]
    if not turns:
        out.drops.append(Drop("csat_no_assistant_turns", "csat", call.call_id, csat.event_id))
        return
    if "all-turns" not in config.csat_policies:
        turns = turns[-1:]  # last-turn
    for turn in turns:
        if turn in thumbed:
            out.drops.append(Drop("overridden_by_thumbs", "csat", call.call_id, csat.event_id, f"turn {turn}"))
            continue
        _turn_example(view, "csat", turn, label, (csat.event_id,), side, f"csat:{csat.data.source}", out)


# ---- the shared-prefix CSAT policy ------------------------------------------------------------------

@dataclass(frozen=True)
class _PrefixEntry:
    scaled: float
    call_id: str
    side: str
    turn: int
    prompt: list[dict[str, Any]]
    completion: dict[str, Any]
    completion_key: str
    valid: bool
    tools: list[dict[str, Any]]
    event_ids: tuple[str, ...]


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _answer_key(message: dict[str, Any]) -> str:
    # Tool call ids are per call; two answers making the same calls are the same answer.
    calls = [(tc["function"]["name"], tc["function"]["arguments"]) for tc in message.get("tool_calls") or ()]
    return hashlib.sha256(_canonical([message.get("content") or "", calls])).hexdigest()


def _collect_prefixes(view: _CallView, csat: FeedbackRecord, side: str,
                      groups: dict[str, list[_PrefixEntry]]) -> None:
    """Key every assistant turn by a rolling digest of everything before it (linear in the call)."""
    call = view.call
    scaled = csat.data.score / csat.data.scale_max
    rolling = hashlib.sha256(_canonical([side, view.tools, view.contexts.messages[0]]))
    for record in call.ordered_turns():
        if view.turn_problem(record.turn):
            break
        if record.role != "assistant":
            rolling.update(_canonical(["user", record.content]))
            continue
        completion = assistant_message(call, record.turn)
        key = _answer_key(completion)
        groups[rolling.hexdigest()].append(_PrefixEntry(
            scaled, call.call_id, side, record.turn, view.contexts.context(record.turn), completion, key,
            all(v.ok for v in view.verdicts(record.turn)), view.tools,
            (csat.event_id, *view.turn_event_ids(record.turn))))
        results = [tool_result_text(tc) for tc in call.tool_calls_of(record.turn)]
        rolling.update(_canonical(["assistant", key, results]))


def _prefix_pairs(groups: dict[str, list[_PrefixEntry]], config: PairingConfig, out: Examples) -> None:
    for entries in groups.values():
        if len(entries) < 2 or len({e.completion_key for e in entries}) < 2:
            continue
        chosen_pool = [e for e in entries if e.valid]
        if not chosen_pool:
            continue
        # Ties go to the smallest call_id, so the result does not depend on call order.
        best = min(chosen_pool, key=lambda e: (-e.scaled, e.call_id))
        worst = min(entries, key=lambda e: (e.scaled, e.call_id))
        if best.scaled - worst.scaled < config.csat_margin or best.completion_key == worst.completion_key:
            continue
        out.pairs.append(Pair(best.call_id, "csat_prefix", best.turn, best.prompt, best.completion,
                              worst.completion, best.tools, (*best.event_ids, *worst.event_ids),
                              best.side, "csat", worst.call_id))


# ---- all calls of one agent -------------------------------------------------------------------------

_TOOLS_JSON = TypeAdapter(list[Tool])


class _ToolLists:
    """One list object per distinct tools list. An agent offers the same tools on every call; sharing
    the list lets the tool checker find its compiled validators by identity instead of digesting the
    whole list again for every call (which cost more than everything else in pairing together)."""

    def __init__(self) -> None:
        self._lists: dict[bytes, list[dict[str, Any]]] = {}

    def get(self, call: Call) -> list[dict[str, Any]]:
        key = _TOOLS_JSON.dump_json(call.started.tools, exclude_none=True)  # pydantic-core: fast, exact
        found = self._lists.get(key)
        if found is None:
            found = self._lists[key] = call.tools
        return found


def build_examples(calls: Iterable[Call], tenant_id: str, agent_id: str,
                   config: PairingConfig | None = None, *,
                   side_of: Callable[[Call], str] = lambda _call: "train",
                   checker: Checker = check_tool_call) -> Examples:
    """Every pair and KTO example in one agent's calls, each tagged with its call's split side."""
    config = config or PairingConfig()
    interned = _ToolLists()
    out = Examples()
    groups: dict[str, list[_PrefixEntry]] = defaultdict(list)
    shared_prefix = "shared-prefix" in config.csat_policies
    label_turns = any(p in config.csat_policies for p in ("all-turns", "last-turn"))
    for call in calls:
        out.calls_seen += 1
        out.events += len(call.event_ids)
        if call.first_seq is not None:
            out.first_seq = call.first_seq if out.first_seq is None else min(out.first_seq, call.first_seq)
            out.last_seq = call.last_seq if out.last_seq is None else max(out.last_seq, call.last_seq)
        if (call.tenant_id, call.agent_id) != (tenant_id, agent_id):
            # Stores filter by agent already; this guards the rule against a store that does not.
            out.drops.append(Drop("foreign_agent", "call", call.call_id, None,
                                  f"{call.tenant_id}/{call.agent_id}"))
            continue
        if not call.complete:
            out.drops.append(Drop("call_incomplete", "call", call.call_id))
            continue
        if call.started is None:
            out.drops.append(Drop("call_started_missing", "call", call.call_id))
            continue
        out.calls_complete += 1
        for fb in call.feedback:
            rater = fb.data.source if fb.kind == "csat" else fb.data.rater
            out.raters[f"{fb.kind}:{rater}"] += 1
        side = side_of(call)
        out.calls_by_side[side] += 1
        view = _CallView(call, checker, interned.get(call))
        _call_pairs(view, side, out)
        _schema_retries(view, side, out)
        thumbed = _thumbs(view, side, out)
        csat = _latest_csat(view, out)
        if csat is not None and label_turns:
            _csat(view, csat, thumbed, side, config, out)
        if csat is not None and shared_prefix:
            _collect_prefixes(view, csat, side, groups)
    if shared_prefix:
        _prefix_pairs(groups, config, out)
    return out
