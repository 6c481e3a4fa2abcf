"""The hidden rubric of the example world: what a caller of each example agent actually rewards.
The simulator derives CSAT, thumbs and side-by-side labels from it (through the features it knows it
generated); eval uses `RubricJudge`, which reads the same rubric off the answer's text, as the offline
judge; the demo scores the served model's live answers with `score_answer` and `csat_from_scores`.

Salon (`salon-rebook`): concrete slots from the calendar's results, offered courteously with a question
that lets the caller choose, beat pushing the caller, upselling, vague answers and invented times.
Resolver (`appointment-resolver`): naming the conflict and settling it with a concrete alternative from
the availability results (or flagging it for staff when nothing fits) beats vague deferral, ignoring
the conflict and invented times. A valid, grounded tool call is good; an invalid one is bad."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import Any

SALON = "salon-rebook"
RESOLVER = "appointment-resolver"
LABELLER = "simulator-rubric"  # who labelled the simulated data; the judge below is a different reader


@dataclass(frozen=True)
class Features:
    """What the rubric looks at in one answer. The simulator fills these from what it generated; the
    judge recovers them from text with `extract_features`."""

    grounded: bool = False  # mentions a time the tools offered (or makes a tool call built on the results)
    date_match: bool = False  # also names the day of such a slot
    invented: bool = False  # mentions a time that no tool result holds
    polite: int = 0  # courtesy markers, counted up to 2
    confirms: bool = False  # asks the caller to choose or confirm
    pushy: bool = False
    upsell: bool = False
    vague: bool = False  # vague availability or deferral without anything concrete
    acknowledges: bool = False  # resolver: names the conflict
    flags: bool = False  # resolver: hands the case to staff with a concrete follow-up (or a flag call)
    tool_call: str | None = None  # "valid" or "invalid" when the answer calls a tool


@dataclass(frozen=True)
class Situation:
    """What the context offers the answer: slots to mention, a conflict to settle, nothing available."""

    has_slots: bool = False
    has_conflict: bool = False
    no_availability: bool = False


def score_features(agent_id: str, f: Features, s: Situation) -> float:
    """The rubric itself: a score in [0, 1]; higher is what callers reward."""
    if f.tool_call == "invalid":
        return 0.05
    if agent_id == RESOLVER:
        return _score_resolver(f, s)
    return _score_salon(f, s)


def _clip(x: float) -> float:
    return 0.0 if x < 0.0 else 1.0 if x > 1.0 else round(x, 4)


def _score_salon(f: Features, s: Situation) -> float:
    x = 0.40
    if f.tool_call == "valid":
        x = 0.72 + (0.15 if f.grounded else 0.0)
    elif s.has_slots:
        x += 0.30 if f.grounded else -0.05
        x += 0.05 if f.date_match and f.grounded else 0.0
    else:
        x += 0.15  # nothing to offer yet: courtesy and no pressure is all there is to get right
    x += 0.10 * min(f.polite, 2) + (0.07 if f.confirms else 0.0)
    x -= (0.20 if f.invented else 0.0) + (0.35 if f.pushy else 0.0) + (0.45 if f.upsell else 0.0)
    x -= 0.20 if f.vague and not f.grounded else 0.0
    return _clip(x)


def _score_resolver(f: Features, s: Situation) -> float:
    x = 0.35
    if f.tool_call == "valid" and not (s.has_conflict or s.no_availability):
        x = 0.72 + (0.15 if f.grounded else 0.0)
    else:
        if s.has_conflict:
            x += 0.15 if f.acknowledges else -0.10
        if s.no_availability:
            x += 0.30 if f.flags else -0.05
        elif s.has_slots:
            x += 0.30 if f.grounded else -0.05
            x += 0.04 if f.date_match and f.grounded else 0.0
        else:
            x += 0.15 + (0.10 if f.tool_call == "valid" else 0.0)
    x += 0.08 * min(f.polite, 2) + (0.06 if f.confirms else 0.0)
    x -= (0.20 if f.invented else 0.0) + (0.30 if f.pushy else 0.0) + (0.20 if f.upsell else 0.0)
    x -= 0.25 if f.vague and not (f.grounded or f.flags) else 0.0
    return _clip(x)


# ---- reading features off text ---------------------------------------------------------------------

_MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august", "september",
           "october", "november", "december")
_WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_MONTH_RE = "|".join(m[:3] + ("" if len(m) <= 3 else f"(?:{m[3:]})?") for m in _MONTHS)

_TIME_12 = re.compile(r"\b(1[0-2]|0?[1-9])(?:[:.]([0-5]\d))?\s*([ap])\.?\s?m\b\.?", re.IGNORECASE)
_TIME_24 = re.compile(r"(?<![\d:])([01]?\d|2[0-3]):([0-5]\d)(?![\d:]*\s*[ap]\.?\s?m\b)", re.IGNORECASE)
_NOON = re.compile(r"\bnoon\b", re.IGNORECASE)
_DAY_AFTER_MONTH = re.compile(rf"\b(?:{_MONTH_RE})\.?\s+(\d{{1,2}})(?:st|nd|rd|th)?\b", re.IGNORECASE)
_DAY_ORDINAL = re.compile(r"\bthe\s+(\d{1,2})(?:st|nd|rd|th)\b", re.IGNORECASE)
_DAY_NUMERIC = re.compile(r"\b(\d{1,2})/(\d{1,2})\b")
_WEEKDAY = re.compile(r"\b(" + "|".join(d[:3] for d in _WEEKDAYS) + r")[a-z]*\b", re.IGNORECASE)

_POLITE = re.compile(
    r"\b(please|thank(?:s| you)|happy to|glad to|my pleasure|of course|certainly|absolutely|sorry|"
    r"apologi[sz]e|i understand|no problem|you'?re welcome|would you like|if you'?d (?:like|prefer)|"
    r"(?:does|do|would|will) (?:that|either|either of those|one of those|any of those|those|one|any) "
    r"(?:work|suit|sound)|"
    r"whichever|what(?:ever)? works best|take care|have a (?:great|good|lovely|nice)|appreciate)\b",
    re.IGNORECASE)
_CONFIRMS = re.compile(
    r"\?|\b(shall i|should i|would you like|want me to|do you want|let me know which|"
    r"just say which|tell me which|which (?:one|of those|would|works|suits))\b", re.IGNORECASE)
_PUSHY = re.compile(
    r"\b((?:you|you'll|you've) (?:really )?(?:need|have|must|got) to "
    r"(?:book|decide|grab|take|lock|commit|choose|"
    r"pick|confirm|do)|you must\b|hurry|last chance|now or never|"
    r"won'?t last|(?:go|goes|going) fast|before (?:it'?s|they'?re|it is|they are) gone|"
    r"(?:don'?t|do not) (?:wait|delay|think too long|miss out|be late)|no time to waste|"
    r"or (?:you'?ll|you will) lose|"
    r"i'?d (?:grab|lock|take) it (?:in )?(?:now|today)|decide (?:now|quickly|fast)|can'?t hold|"
    r"(?:there'?s|there is) no guarantee|"
    r"(?:should|better) (?:book|decide|grab|commit|take it)\w* (?:now|today)|"
    r"(?:just|simply) (?:book|take) it|(?:only|just) (?:one|two|a couple) left)\b", re.IGNORECASE)
_UPSELL_SALON = re.compile(
    r"\b(add[- ]?ons?|package|upgrade|bundle|membership|premium|deluxe|treatments?|gloss|conditioning|"
    r"facial|keratin|scalp (?:massage|ritual|scrub)|paraffin|while you'?re (?:here|in|at it)|"
    r"add (?:a|an|on)|for (?:just|only) (?:an extra )?\$?\d+|special offer|promo(?:tion)?|"
    r"(?:product|retail) (?:bundle|kit)|gift card|loyalty (?:plan|club))\b", re.IGNORECASE)
_UPSELL_RESOLVER = re.compile(
    r"\b(wellness (?:package|plan|program)|premium|concierge|membership|upgrade|add[- ]?ons?|"
    r"executive (?:physical|health)|while you'?re (?:here|at it)|for (?:just|only) \$?\d+|"
    r"special offer|self-pay (?:package|bundle))\b", re.IGNORECASE)
_VAGUE = re.compile(
    r"\b(some (?:times|openings|slots|availability|options|spots)|"
    r"a few (?:openings|times|slots|options|spots)|"
    r"sometime|at some point|we have availability|(?:there'?s|there is) availability|things? open(?:s)? up|"
    r"should be able to|probably|around then|various times|here and there|get back to you|"
    r"(?:someone|somebody) will (?:call|reach|contact|get)|look into it|"
    r"in (?:the )?(?:coming|next) (?:days|week)s?|"
    r"(?:a|one) of these days|when (?:we|they) can|try (?:calling )?(?:again|back) later|not sure|"
    r"(?:it )?depends|(?:fairly|pretty) open|plenty of (?:time|room|openings)|i think|something like that|"
    r"should be (?:fine|in|on|good|booked|all set|moved))\b", re.IGNORECASE)
_ACKNOWLEDGE = re.compile(
    r"\b(overlap\w*|conflict\w*|clash\w*|double[- ]?book\w*|same time|at the same hour|back[- ]to[- ]back|"
    r"(?:is|will be|are) (?:away|out|on leave|unavailable|off)|out of (?:the )?office|on leave|"
    r"(?:is|are|will be) closed|closure|closed (?:for|that|on)|can'?t (?:be|make) (?:in|it to) both|"
    r"collide|coincide|run into each other|both (?:at|on|booked))\b", re.IGNORECASE)
_FLAG = re.compile(
    r"\b(flag\w*|escalat\w*|scheduling (?:team|staff|desk|coordinator)|care team|staff member|"
    r"worklist|(?:passed|handed|sent|referred) (?:this|it|your case) (?:on )?to|front desk team|"
    r"our schedulers?|a (?:scheduler|coordinator))\b", re.IGNORECASE)

_WHEN = re.compile(r"\b(today|tomorrow|tonight|business days?|\d+ hours?|this (?:afternoon|evening))\b",
                   re.IGNORECASE)

_SLOT_KEYS = frozenset({"slots", "slot", "new_slot", "available", "availability", "openings"})
_TIME_KEYS = frozenset({"start", "start_time", "time", "starts_at"})
_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)")
_ISO_DT = re.compile(r"(\d{4})-(\d{2})-(\d{2})[T ]([01]\d|2[0-3]):([0-5]\d)")
_ANY_TIME = re.compile(r"(?<![\d:])([01]\d|2[0-3]):([0-5]\d)(?!\d)")
_ANY_DATE = re.compile(r"(\d{4})-(\d{2})-(\d{2})")


@dataclass
class _Context:
    slot_times: set[tuple[int, int]]
    slot_days: set[int]  # day of month of offered slots
    slot_weekdays: set[int]
    all_times: set[tuple[int, int]]
    tool_text: str
    situation: Situation


def _as_json(content: Any) -> Any:
    if isinstance(content, str):
        try:
            return json.loads(content)
        except ValueError:
            return content
    return content


def _walk_slots(node: Any, inside: bool, ctx: _Context) -> None:
    if isinstance(node, dict):
        if inside:
            when = next((node[k] for k in _TIME_KEYS if isinstance(node.get(k), str)), None)
            day = node.get("date")
            if isinstance(when, str):
                iso = _ISO_DT.match(when)
                if iso:
                    ctx.slot_times.add((int(iso.group(4)), int(iso.group(5))))
                    day = day or when[:10]
                elif (m := _HHMM.match(when)):
                    ctx.slot_times.add((int(m.group(1)), int(m.group(2))))
            if isinstance(day, str) and _ANY_DATE.match(day):
                _add_day(ctx, day)
        for key, value in node.items():
            _walk_slots(value, inside or key in _SLOT_KEYS, ctx)
    elif isinstance(node, list):
        for value in node:
            _walk_slots(value, inside, ctx)


def _add_day(ctx: _Context, iso_date: str) -> None:
    from datetime import date

    try:
        d = date.fromisoformat(iso_date[:10])
    except ValueError:
        return
    ctx.slot_days.add(d.day)
    ctx.slot_weekdays.add(d.weekday())


def _has_empty_slots(node: Any) -> bool | None:
    """True if the latest availability-like list in the result is empty, False if it has entries."""
    if isinstance(node, dict):
        for key in ("slots", "available", "availability", "openings"):
            if isinstance(node.get(key), list):
                return not node[key]
    return None


def _has_conflict(node: Any) -> bool:
    if isinstance(node, dict):
        if node.get("conflicts"):
            return True
        return any(_has_conflict(v) for v in node.values())
    if isinstance(node, list):
        return any(_has_conflict(v) for v in node)
    return False


def read_context(prompt_messages: list[dict[str, Any]]) -> _Context:
    ctx = _Context(set(), set(), set(), set(), "", Situation())
    texts = []
    last_availability: bool | None = None
    conflict = False
    for msg in prompt_messages:
        if msg.get("role") != "tool":
            continue
        content = msg.get("content")
        text = content if isinstance(content, str) else json.dumps(content)
        texts.append(text)
        doc = _as_json(content)
        _walk_slots(doc, False, ctx)
        empty = _has_empty_slots(doc)
        if empty is not None:
            last_availability = empty
        conflict = conflict or _has_conflict(doc)
    ctx.tool_text = "\n".join(texts)
    for h, m in _ANY_TIME.findall(ctx.tool_text):
        ctx.all_times.add((int(h), int(m)))
    ctx.all_times |= ctx.slot_times
    ctx.situation = Situation(has_slots=bool(ctx.slot_times), has_conflict=conflict,
                              no_availability=last_availability is True)
    return ctx


def answer_times(text: str) -> list[set[tuple[int, int]]]:
    """Clock times named in an answer, one set of readings per mention, as (hour, minute) on a 24-hour
    clock. A bare `2:30` could be either half of the day, so it has both readings."""
    found: list[set[tuple[int, int]]] = []
    for h, m, half in _TIME_12.findall(text):
        found.append({(int(h) % 12 + (12 if half.lower() == "p" else 0), int(m or 0))})
    for h, m in _TIME_24.findall(_TIME_12.sub(" ", text)):
        hour = int(h)
        found.append({(hour, int(m)), (hour + 12, int(m))} if 1 <= hour <= 11 else {(hour, int(m))})
    if _NOON.search(text):
        found.append({(12, 0)})
    return found


def _answer_days(text: str) -> tuple[set[int], set[int]]:
    days = {int(d) for d in _DAY_AFTER_MONTH.findall(text)} | {int(d) for d in _DAY_ORDINAL.findall(text)}
    days |= {int(d) for _, d in _DAY_NUMERIC.findall(text)} | {int(d) for _, _, d in _ANY_DATE.findall(text)}
    weekdays = {[w[:3] for w in _WEEKDAYS].index(w[:3].lower()) for w in _WEEKDAY.findall(text)}
    return days, weekdays


def _tool_calls(answer: dict[str, Any]) -> list[tuple[str, str]]:
    calls = []
    for tc in answer.get("tool_calls") or []:
        fn = tc.get("function", tc) if isinstance(tc, dict) else {}
        name = fn.get("name") or ""
        args = fn.get("arguments", "")
        calls.append((name, args if isinstance(args, str) else json.dumps(args)))
    return calls


def _check(tools: list[dict[str, Any]], name: str, arguments: str) -> bool:
    try:
        from agent_dpo.toolcheck import check_redacted_call
    except ImportError:  # without the checker: parse, and the tool must be offered
        try:
            ok = isinstance(json.loads(arguments), dict)
        except ValueError:
            return False
        return ok and any(t.get("function", {}).get("name") == name for t in tools)
    # Judged contexts are redacted exports: a placeholder copied into a call stands for the removed value.
    return check_redacted_call(tools, name, arguments).ok


def extract_features(agent_id: str, prompt_messages: list[dict[str, Any]], tools: list[dict[str, Any]],
                     answer_message: dict[str, Any] | str,
                     ctx: _Context | None = None) -> tuple[Features, Situation]:
    """Read the rubric's features off an answer's text and tool calls, in its context."""
    answer = answer_message
    if isinstance(answer, str):
        answer = {"role": "assistant", "content": answer}
    ctx = ctx or read_context(prompt_messages)
    text = answer.get("content") or ""
    times = answer_times(text)
    grounded = any(m & ctx.slot_times for m in times)
    invented = any(not m & ctx.all_times for m in times)
    days, weekdays = _answer_days(text)
    date_match = bool(days & ctx.slot_days or weekdays & ctx.slot_weekdays)

    tool_state = None
    flag_call = False
    calls = _tool_calls(answer)
    if calls:
        valid = all(_check(tools, name, args) for name, args in calls)
        tool_state = "valid" if valid else "invalid"
        if valid:
            for name, args in calls:
                flag_call = flag_call or name.startswith("flag")
                values = _string_values(_as_json(args))
                grounded = grounded or any(len(v) >= 6 and v in ctx.tool_text for v in values)
                grounded = grounded or any(m & ctx.slot_times for m in answer_times(" ".join(values)))
    polite = len({m.lower() for m in _POLITE.findall(text)})
    upsell_re = _UPSELL_RESOLVER if agent_id == RESOLVER else _UPSELL_SALON
    # Handing over counts only with a concrete follow-up: "someone will call" alone is deferral.
    flags = flag_call or (bool(_FLAG.search(text)) and bool(times or days or weekdays or _WHEN.search(text)))
    feats = Features(
        grounded=grounded, date_match=date_match, invented=invented, polite=min(polite, 2),
        confirms=bool(_CONFIRMS.search(text)), pushy=bool(_PUSHY.search(text)),
        upsell=bool(upsell_re.search(text)), vague=bool(_VAGUE.search(text)),
        acknowledges=bool(_ACKNOWLEDGE.search(text)), flags=flags, tool_call=tool_state)
    return feats, ctx.situation


def _string_values(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _string_values(v)]
    if isinstance(node, list):
        return [s for v in node for s in _string_values(v)]
    return []


def infer_agent(prompt_messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> str:
    names = {t.get("function", {}).get("name") for t in tools or []}
    if names & {"find_provider_availability", "move_appointment", "flag_for_staff",
                "lookup_patient_appointments"}:
        return RESOLVER
    if names:
        return SALON
    system = next((m.get("content") or "" for m in prompt_messages if m.get("role") == "system"), "")
    return RESOLVER if re.search(r"patient|clinic|provider", system, re.IGNORECASE) else SALON


def score_answer(agent_id: str | None, prompt_messages: list[dict[str, Any]], tools: list[dict[str, Any]],
                 answer_message: dict[str, Any] | str) -> float:
    """The rubric's score of one assistant answer in its context, in [0, 1]. Deterministic."""
    agent = agent_id.split("/")[-1] if agent_id else infer_agent(prompt_messages, tools)
    feats, situation = extract_features(agent, prompt_messages, tools, answer_message)
    return score_features(agent, feats, situation)


class RubricJudge:
    """The offline judge for eval: the example world's rubric read off the answers' text. It is not the
    labeller (`simulator-rubric` labels from the features it generated, with label noise)."""

    name = "rubric"

    def __init__(self, agent_id: str | None = None, margin: float = 0.02) -> None:
        self.agent_id = agent_id
        self.margin = margin

    def scores(self, prompt: list[dict[str, Any]], tools: list[dict[str, Any]],
               a: dict[str, Any] | str, b: dict[str, Any] | str) -> tuple[float, float]:
        agent = self.agent_id.split("/")[-1] if self.agent_id else infer_agent(prompt, tools)
        ctx = read_context(prompt)
        fa, sit = extract_features(agent, prompt, tools, a, ctx)
        fb, _ = extract_features(agent, prompt, tools, b, ctx)
        return score_features(agent, fa, sit), score_features(agent, fb, sit)

    def compare(self, prompt: list[dict[str, Any]], tools: list[dict[str, Any]],
                a: dict[str, Any] | str, b: dict[str, Any] | str) -> str:
        """'a', 'b' or 'tie'. Symmetric: swapping a and b swaps the verdict."""
        sa, sb = self.scores(prompt, tools, a, b)
        if abs(sa - sb) <= self.margin:
            return "tie"
        return "a" if sa > sb else "b"


# ---- from scores to what callers report ---------------------------------------------------------------

def csat_from_scores(scores: list[float], rng: random.Random, *, scale_max: int = 5,
                     outcome: str = "completed", noise: float = 0.08) -> float:
    """A caller's CSAT for a call whose rated answers scored `scores`: dominated by the worst answer,
    lowered by a bad outcome, with noise like real surveys. 1..5 on a 5-point scale, 0..10 on 10."""
    if scores:
        q = 0.5 * (sum(scores) / len(scores)) + 0.5 * min(scores)
    else:
        q = 0.6
    q += {"completed": 0.0, "transferred": -0.05, "escalated": -0.05, "abandoned": -0.25,
          "failed": -0.3}.get(outcome, 0.0)
    q += rng.gauss(0.0, noise)
    q = 0.0 if q < 0.0 else min(q, 1.0)
    if scale_max == 5:
        return float(1 + round(q * 4))
    return float(round(q * scale_max))


def thumbs_from_score(score: float, rng: random.Random, *, flip: float = 0.05) -> bool:
    """Thumbs up when the answer scored well, flipped now and then like real raters."""
    up = score >= 0.6
    return (not up) if rng.random() < flip else up
