"""The example world's call simulator: seeded, pure and fast, it plays calls of the two example agents and
yields their v1 envelopes in the order a bus would see them (interleaved, partly out of order, a few
re-sends, feedback days later), with feedback that follows the hidden rubric plus label noise.
`publish_world` sends them through the publisher API as a runtime would."""

from __future__ import annotations

import asyncio
import heapq
import json
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from agent_dpo.events import SCHEMA_V1
from agent_dpo.world import answers as A
from agent_dpo.world.agents import ExampleAgent, Site, example_agent, tool_by_name
from agent_dpo.world.answers import Slot
from agent_dpo.world.rubric import LABELLER, RESOLVER, Features, Situation, score_features
from agent_dpo.world.rubric import csat_from_scores as _csat

ALL_AGENTS = ("salon-rebook", "appointment-resolver")
DEFAULT_START = datetime(2026, 11, 2, 14, 0, tzinfo=UTC)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MIN, _HOUR, _DAY = 60_000, 3_600_000, 86_400_000

# How often things happen; the defaults make a world that exercises every signal of the contract.
INVALID_TOOL_CALL_RATE = 0.07
TOOL_ERROR_RATE = 0.03
CSAT_RATE = 0.55
THUMBS_RATE = 0.3
PREFERENCE_RATE = 0.22
CORRECTION_RATE = 0.35  # of calls whose key answer was bad
PREFERENCE_FLIP = 0.03  # side-by-side labels the rater got wrong
THUMBS_FLIP = 0.05
CSAT_NOISE = 0.08
LABELLED_BY = LABELLER  # what pairs' meta should name as the labeller of simulated data


# ---- fills -------------------------------------------------------------------------------------------------

FIRST = ("Ana", "Ben", "Chloe", "Dev", "Elena", "Farah", "Gabe", "Hana", "Ivan", "Jade", "Kofi", "Lena", "Marco",
         "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara", "Uma", "Victor", "Wen", "Ximena", "Yusuf", "Zoe",
         "Aisha", "Bruno", "Carmen", "Diego", "Erin", "Felix", "Grace", "Hiro", "Isla", "Jonah", "Kira", "Liam",
         "Maya", "Noah", "Olga", "Pablo", "Rhea", "Sofia", "Tomas", "Valeria", "Will", "Yara")
LAST = ("Garcia", "Nguyen", "Smith", "Okafor", "Kowalski", "Haddad", "Patel", "Rossi", "Johnson", "Kim", "Silva",
        "Novak", "Brown", "Mendes", "Cohen", "Tanaka", "Dubois", "Murphy", "Lindqvist", "Ahmed", "Fischer",
        "Moreau", "Reyes", "Walker", "Ibrahim", "Costa", "Schmidt", "Park", "Oliveira", "Byrne")
STYLISTS = tuple((f"sty-{i:03d}", n) for i, n in enumerate(
    ("Maya", "Jordan", "Alexis", "Sam", "Priya", "Luca", "Tess", "Rafael", "Nina", "Owen", "Bea", "Kai",
     "Mila", "Theo", "Ivy", "Reza"), start=11))
SERVICES = ("haircut", "color", "highlights", "blowout", "beard_trim", "manicure", "pedicure")
SERVICE_SPOKEN = {"haircut": ("haircut", "cut", "trim"), "color": ("color", "color appointment", "root touch-up"),
                  "highlights": ("highlights", "partial highlights"), "blowout": ("blowout", "blow-dry"),
                  "beard_trim": ("beard trim", "beard tidy-up"), "manicure": ("manicure", "gel manicure"),
                  "pedicure": ("pedicure", "spa pedicure")}
SERVICE_SAID = {"haircut": "haircut", "color": "color", "highlights": "highlights", "blowout": "blowout",
                "beard_trim": "beard trim", "manicure": "manicure", "pedicure": "pedicure"}
DURATION = {"haircut": 45, "color": 90, "highlights": 120, "blowout": 45, "beard_trim": 30, "manicure": 45,
            "pedicure": 60}
SPECIALTIES = ("primary_care", "cardiology", "dermatology", "pediatrics", "orthopedics", "radiology")
SPECIALTY_SAID = {s: s.replace("_", " ") for s in SPECIALTIES}
DOCTORS = ("Raman", "Okoye", "Lindgren", "Alvarez", "Chen", "Marsh", "Haddad", "Kaur", "Fontaine", "Brennan",
           "Osei", "Varga", "Yamamoto", "Delgado", "Petrov", "Abara", "Whitfield", "Nakamura")
# (provider id, spoken name, specialty): three providers per specialty
PROVIDERS = tuple((f"prv-{1000 + 37 * i:04d}", f"Dr. {n}", SPECIALTIES[i % len(SPECIALTIES)])
                  for i, n in enumerate(DOCTORS))
OTHER_VISITS = ("lab draw", "MRI", "physical therapy session", "flu shot", "blood pressure check", "X-ray",
                "follow-up with primary care", "ultrasound")


def _when_phrase(rng: random.Random) -> str:
    return rng.choice(("this week", "next week", "on Friday", "tomorrow afternoon", "sometime next week",
                       "in the morning", "after work", "Saturday morning", "early next week", "on Thursday",
                       "any day really", "before the weekend"))


class WorldRandom(random.Random):
    """`random.Random` with cheap `randint` and `choice` (one float draw each): the simulator draws
    millions of them, and the stdlib versions dominate its run time. Still fully seeded."""

    def randint(self, a: int, b: int) -> int:
        return a + int(self.random() * (b - a + 1))

    def choice(self, seq: Any) -> Any:
        return seq[int(self.random() * len(seq))]


# ---- the clock and envelopes -------------------------------------------------------------------------------

class _Stamps:
    """RFC 3339 strings for simulated milliseconds, with the part up to the minute cached: 100k calls
    are about 1.6M timestamps."""

    def __init__(self) -> None:
        self._minutes: dict[int, str] = {}

    def __call__(self, ms: int) -> str:
        minute, rest = divmod(ms, _MIN)
        prefix = self._minutes.get(minute)
        if prefix is None:
            prefix = (_EPOCH + timedelta(minutes=minute)).strftime("%Y-%m-%dT%H:%M:")
            self._minutes[minute] = prefix
        s, milli = divmod(rest, 1000)
        return f"{prefix}{s:02d}.{milli:03d}Z"


@dataclass
class _Key:
    """An assistant turn the rubric cares about, and how to write other answers for its context."""

    turn: int
    score: float
    bad: bool
    regen: Callable[[random.Random, bool], dict[str, Any]]  # (rng, good?) -> an alternative Message


class _KeyReached(Exception):
    def __init__(self, turn: int) -> None:
        super().__init__(turn)
        self.turn = turn


class _Call:
    """One call being played: turns, tool calls and their timing, in generation order."""

    def __init__(self, rng: random.Random, agent: ExampleAgent, call_id: str, t0: int, channel: str) -> None:
        self.rng = rng
        self.agent = agent
        self.call_id = call_id
        self.t = t0
        self.t0 = t0
        self.channel = channel
        self.voice = channel == "voice"
        self.turn = 0
        self.events: list[tuple[int, str, dict[str, Any]]] = []
        self.keys: list[_Key] = []
        self.outcome = "completed"
        self.tc = 0
        self.noisy = True  # label noise on: raters flip now and then, CSAT scatters
        self.stop_at_key = False  # live prompts stop the call where the served model must answer

    def emit(self, event_type: str, data: dict[str, Any], at: int | None = None) -> None:
        self.events.append((self.t if at is None else at, event_type, data))

    def _advance(self, lo: int, hi: int) -> None:
        self.t += self.rng.randint(lo, hi) * (1 if self.voice else 4)

    def user(self, text: str) -> int:
        self._advance(1500, 9000)
        data: dict[str, Any] = {"turn": self.turn, "role": "user", "content": text}
        if self.voice:
            # ASR is usually sure; now and then a noisy line drags it down.
            r = self.rng.random
            conf = 0.55 + 0.44 * r() ** 0.3 if r() > 0.08 else 0.3 + 0.3 * r()
            data["asr_confidence"] = round(conf, 3)
        self.emit("call.turn", data)
        self.turn += 1
        return self.turn - 1

    def assistant(self, text: str, interrupted: bool = False) -> int:
        self._advance(600, 2500)
        data: dict[str, Any] = {"turn": self.turn, "role": "assistant", "content": text}
        if self.voice and interrupted:
            data["interrupted"] = True
        self.emit("call.turn", data)
        self.turn += 1
        return self.turn - 1

    def tool_call(self, turn: int, name: str, arguments: str, *, result: Any = None,
                  error: str | None = None) -> str:
        self.t += self.rng.randint(150, 1400)
        self.tc += 1
        tc_id = f"call_{self.tc}"
        data: dict[str, Any] = {"turn": turn, "tool_call_id": tc_id, "name": name, "arguments": arguments}
        if error is not None:
            data["error"] = error
        else:
            data["result"] = result
        self.emit("call.tool_call", data)
        return tc_id

    def use_tool(self, name: str, args: dict[str, Any], result: Any, filler: str = "") -> int:
        """The assistant calls a tool; sometimes the first try is invalid and the next assistant turn,
        with no user turn between, retries it validly (the contract's schema-retry signal)."""
        rng = self.rng
        if rng.random() < INVALID_TOOL_CALL_RATE:
            bad_name, bad_args, error = break_tool_call(rng, self.agent.agent_id, name, args)
            turn = self.assistant(filler)
            self.tool_call(turn, bad_name, bad_args, error=error)
            filler = rng.choice(("", "", "Sorry, one moment.", "Just a second.", "Bear with me."))
        elif rng.random() < TOOL_ERROR_RATE:
            turn = self.assistant(filler)
            self.tool_call(turn, name, json.dumps(args), error=rng.choice(
                ("upstream timeout after 5000 ms", "service unavailable (503)", "rate limited, retry later")))
            filler = rng.choice(("Sorry, the system is slow, let me try that again.", "One more moment, please.",
                                 "Still checking."))
        turn = self.assistant(filler)
        self.tool_call(turn, name, json.dumps(args), result=result)
        return turn

    def key(self, text: str, feats: Features, situation: Situation, bad: bool,
            regen: Callable[[random.Random, bool], dict[str, Any]], interrupted: bool = False) -> int:
        if self.stop_at_key:
            raise _KeyReached(self.turn)
        turn = self.assistant(text, interrupted=interrupted)
        self.keys.append(_Key(turn, score_features(self.agent.agent_id, feats, situation), bad, regen))
        return turn


# ---- invalid tool calls ------------------------------------------------------------------------------------

_MISNAMED = {"book_slot": "book_appointment", "find_slots": "search_slots", "reschedule_appointment": "reschedule",
             "cancel_appointment": "cancel_booking", "transfer_to_human": "transfer_call",
             "lookup_patient_appointments": "get_patient_appointments",
             "find_provider_availability": "find_availability",
             "move_appointment": "reschedule_appointment", "flag_for_staff": "flag_staff"}
_WRONG_ENUM = {"haircut": "hair_cut", "color": "colour", "highlights": "highlight", "blowout": "blow_dry",
               "beard_trim": "beard", "manicure": "nails", "pedicure": "feet", "sms": "text", "email": "e-mail",
               "morning": "am", "afternoon": "pm", "evening": "night", "any": "anytime",
               "customer_request": "customer",
               "in_person": "office", "telehealth": "video", "routine": "normal", "same_day": "today",
               "double_booking": "double_booked", "provider_conflict": "provider", "phone": "call",
               "caller_request": "requested", "normal": "medium", "unresolvable_conflict": "conflict"}


def _enum_paths(schema: dict[str, Any], path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], dict]]:
    for key, sub in (schema.get("properties") or {}).items():
        if "enum" in sub:
            yield path + (key,), sub
        if sub.get("type") == "object":
            yield from _enum_paths(sub, path + (key,))


def _get(obj: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        obj = obj[key]
    return obj


BREAKS = ("bad_json", "wrong_enum", "missing_required", "bad_format", "unknown_tool")


def break_tool_call(rng: random.Random, agent_id: str, name: str, args: dict[str, Any],
                    kind: str | None = None) -> tuple[str, str, str]:
    """A realistic invalid version of a valid call: (name, arguments text, the runtime's error). A kind
    the tool's schema cannot show (no enum, no pattern) falls back to a missing required property."""
    schema = tool_by_name(agent_id)[name]["function"]["parameters"]
    kind = kind or rng.choice(BREAKS)
    if kind == "wrong_enum":
        paths = [p for p, sub in _enum_paths(schema) if isinstance(_get(args, p), str)]
        if paths:
            path = rng.choice(paths)
            broken = json.loads(json.dumps(args))
            parent = _get(broken, path[:-1])
            value = parent[path[-1]]
            parent[path[-1]] = _WRONG_ENUM.get(value, value.upper())
            return name, json.dumps(broken), f"invalid arguments: {'.'.join(path)} is not an allowed value"
        kind = "missing_required"
    if kind == "bad_format":
        for key, sub in (schema.get("properties") or {}).items():
            value = args.get(key)
            if "pattern" in sub and isinstance(value, str):
                broken = dict(args)
                if len(value) == 10 and value[4] == "-":
                    broken[key] = f"{value[5:7]}/{value[8:10]}/{value[:4]}"
                else:
                    broken[key] = value.split("-", 1)[-1]
                return name, json.dumps(broken), f"invalid arguments: {key} does not match the expected format"
        kind = "missing_required"
    if kind == "missing_required":
        required = [k for k in schema.get("required", []) if k in args]
        drop = rng.choice(required)
        broken = {k: v for k, v in args.items() if k != drop}
        return name, json.dumps(broken), f"invalid arguments: missing required property {drop}"
    if kind == "unknown_tool":
        wrong = _MISNAMED.get(name, name + "_v2")
        return wrong, json.dumps(args), f"unknown tool {wrong}"
    text = json.dumps(args)
    if rng.random() < 0.5:
        return name, text[: max(1, len(text) - rng.randint(2, 12))], "arguments are not valid JSON"
    return name, text.replace('"', "'"), "arguments are not valid JSON"


def _msg(content: str | None, tool_calls: list[tuple[str, dict[str, Any]]] | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        msg["tool_calls"] = [{"id": f"call_alt{i}", "type": "function",
                              "function": {"name": n, "arguments": json.dumps(a)}}
                             for i, (n, a) in enumerate(tool_calls, start=1)]
    return msg


# ---- the salon agent --------------------------------------------------------------------------------------

def _person(rng: random.Random) -> tuple[str, str, str, str | None]:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    phone = f"+1{rng.choice(('415', '312', '646', '303', '617', '512'))}555{rng.randint(0, 9999):04d}"
    email = f"{first.lower()}.{last.lower()}@example.com" if rng.random() < 0.6 else None
    return first, last, phone, email


_HOURS = {"morning": (9, 11), "afternoon": (12, 16), "evening": (17, 18), "any": (9, 18)}


def _salon_slots(rng: random.Random, today: date, tod: str, k: int,
                 stylist: tuple[str, str] | None) -> list[Slot]:
    slots, seen = [], set()
    lo, hi = _HOURS[tod]
    first = rng.randint(1, 4)
    while len(slots) < k:
        day = today + timedelta(days=first + rng.randint(0, 6))
        hour, minute = rng.randint(lo, hi), rng.choice((0, 15, 30, 45))
        if (day, hour, minute) in seen:
            continue
        seen.add((day, hour, minute))
        sid, sname = stylist or rng.choice(STYLISTS)
        slots.append(Slot(f"slot-{rng.getrandbits(32):08x}", day, hour, minute, sname, sid))
    slots.sort(key=lambda s: (s.day, s.hour, s.minute))
    return slots


def _slot_json(s: Slot, svc: str) -> dict[str, Any]:
    end = s.hour * 60 + s.minute + DURATION[svc]
    return {"slot_id": s.slot_id, "date": s.day.isoformat(), "start": f"{s.hour:02d}:{s.minute:02d}",
            "end": f"{end // 60:02d}:{end % 60:02d}", "stylist": {"id": s.who_id, "name": s.who}}


def _salon_call(c: _Call, site: Site, today: date) -> None:
    rng = c.rng
    first, last, phone, email = _person(rng)
    svc = rng.choice(SERVICES)
    spoken = rng.choice(SERVICE_SPOKEN[svc])
    scenario = rng.choices(("book", "reschedule", "cancel", "transfer"), (50, 32, 10, 8))[0]
    apt_id = f"apt-{rng.randint(100000, 999999)}"
    c.assistant(rng.choice((f"Thanks for calling {site.name}, this is the booking assistant. How can I help?",
                            f"Hi, you've reached {site.name}. What can I do for you today?",
                            f"{site.name}, booking line. How can I help you?",
                            "Hello! I can book, move or cancel appointments. What do you need?")))
    stylist = rng.choice(STYLISTS) if rng.random() < 0.3 else None
    if scenario == "transfer":
        c.user(rng.choice(("Can I just talk to a person?", "I want to complain about my last visit.",
                           "I have a question about a charge on my card.", "Is the manager there?")))
        reason = rng.choice(("caller_request", "complaint", "billing"))
        callback = None
        if rng.random() < 0.4:
            callback = {"phone": phone, "date": (today + timedelta(days=1)).isoformat(),
                        "window_start": "10:00", "window_end": "12:00"}
        args = {"reason": reason, "priority": rng.choice(("low", "normal", "urgent")),
                "summary": f"{first} {last} called about a {reason.replace('_', ' ')} and asked for staff.",
                "callback": callback}
        c.use_tool("transfer_to_human", args, {"status": "queued" if callback else "transferring",
                                                "queue_position": rng.randint(1, 4)},
                   filler=rng.choice(("Of course, let me get someone for you.", "Sure, connecting you now.",
                                      "I'll pass you to the front desk.")))
        c.outcome = "transferred"
        return
    who = f" with {stylist[1]}" if stylist else ""
    if scenario == "book":
        c.user(rng.choice((f"Hi, I'd like to book a {spoken}{who} {_when_phrase(rng)}.",
                           f"Hey, do you have anything for a {spoken} {_when_phrase(rng)}?",
                           f"Yeah hi, I need a {spoken}{who}, {_when_phrase(rng)} if possible.",
                           f"Can I get in for a {spoken}{who} {_when_phrase(rng)}?",
                           f"I was hoping to come in for a {spoken} {_when_phrase(rng)}.")))
    elif scenario in ("reschedule", "cancel"):
        verb = "move" if scenario == "reschedule" else "cancel"
        c.user(rng.choice((f"Hi, I need to {verb} my {spoken} appointment, the number is {apt_id}.",
                           f"I have a {spoken} booked and I can't make it. Can I {verb} it? It's {apt_id}.",
                           f"Hello, this is {first}. I'd like to {verb} appointment {apt_id}.")))
        if scenario == "cancel":
            c.assistant(rng.choice(("I can do that. Would you like to move it to another day instead?",
                                    "Sure. Before I cancel, would another time work for you?")))
            if rng.random() < 0.6:
                sick = rng.random() < 0.3
                c.user("Just cancel, I'm sick." if sick else rng.choice(("No, just cancel it please.",
                                                                         "No thanks, cancel it.")))
                args = {"appointment_id": apt_id, "reason": "illness" if sick else "customer_request",
                        "waive_late_fee": sick, "note": None if rng.random() < 0.7 else "Caller will rebook later."}
                c.use_tool("cancel_appointment", args, {"appointment_id": apt_id, "status": "cancelled",
                                                        "late_fee": 0 if sick else 15})
                c.assistant(rng.choice((f"Done, appointment {apt_id} is cancelled. Thanks for letting us know.",
                                        "That's cancelled. Feel better, and call us when you'd like to rebook.",
                                        f"Okay, {apt_id} is cancelled.")))
                c.user(rng.choice(("Thanks.", "Great, bye.", "Thank you.")))
                return
            c.user(rng.choice(("Oh, actually yes, let's move it.", "Sure, what do you have?")))
            scenario = "reschedule"
    tod = rng.choice(("morning", "afternoon", "evening", "any"))
    d_from = today + timedelta(days=1)
    slots = _salon_slots(rng, today, tod, rng.randint(2, 5), stylist)
    args = {"service": svc, "date_from": d_from.isoformat(),
            "date_to": (None if rng.random() < 0.5
                        else (d_from + timedelta(days=rng.randint(3, 10))).isoformat()),
            "time_of_day": tod, "stylist_id": stylist[0] if stylist else None, "location_id": site.site_id,
            "max_results": rng.choice((3, 5, 5, 8))}
    c.use_tool("find_slots", args, {"slots": [_slot_json(s, svc) for s in slots], "timezone": site.timezone},
               filler=rng.choice(("", "", "Let me check the calendar.", "One moment while I look.",
                                  "Let me see what's open.")))
    _salon_offer_and_book(c, site, svc, slots, scenario, apt_id, (first, last, phone, email), today)


def _salon_offer_and_book(c: _Call, site: Site, svc: str, slots: list[Slot], scenario: str, apt_id: str,
                          person: tuple[str, str, str, str | None], today: date) -> None:
    rng = c.rng
    said = SERVICE_SAID[svc]
    # Invented times must not coincide with any time in the results (slot ends included).
    avoid = {(s.hour, s.minute) for s in slots}
    avoid |= {divmod(s.hour * 60 + s.minute + DURATION[svc], 60) for s in slots}
    offer_sit = Situation(has_slots=True)

    def offer(r: random.Random, style: str) -> tuple[str, Features]:
        return A.salon_offer(r, style, slots, svc=said, site=site.name, dur=DURATION[svc], avoid=avoid)

    def regen_offer(r: random.Random, good: bool) -> dict[str, Any]:
        return _msg(offer(r, "good" if good else r.choice(A.BAD_OFFER_STYLES))[0])

    picked: Slot | None = None
    for attempt in range(3):
        style = rng.choice(A.SALON_OFFER_STYLES) if attempt == 0 else rng.choice(("good", "good", "vague", "pushy"))
        text, feats = offer(rng, style)
        interrupted = style == "pushy" and rng.random() < 0.5
        c.key(text, feats, offer_sit, style != "good", regen_offer, interrupted)
        if style == "pushy" and rng.random() < 0.3:
            c.user(rng.choice(("Wow, okay, never mind.", "I'll call somewhere else.", "Forget it.")))
            c.outcome = "abandoned"
            return
        if style == "vague":
            c.user(rng.choice(("Okay but what times exactly?", "Can you give me actual times?",
                               "Which days though?", "Sorry, what's actually open?")))
            continue
        choice = rng.choice(slots)
        t = A.say_time(rng, choice.hour, choice.minute)
        if style == "upsell":
            c.user(rng.choice((f"No thanks, just the {said}. {t} is fine.", f"Just the {said} please, at {t}.",
                               f"No add-ons. I'll take {t}.")))
        elif style == "invented":
            c.user(rng.choice(("The first one works.", "I'll take the first one.", "Yes, the earlier one.")))
            c.use_tool("book_slot" if scenario == "book" else "reschedule_appointment",
                       _book_args(rng, scenario, choice, svc, apt_id, person),
                       {"error": "slot_unavailable", "detail": "no such slot at that time"})
            c.user(rng.choice(("Wait, so is it not available?", "Huh? What happened?")))
            continue
        else:
            c.user(rng.choice((f"{t} works.", f"Let's do {t}.", f"I'll take {t} please.", f"Okay, {t}.",
                               f"The {t} one, thanks.")))
        picked = choice
        break
    if picked is None:
        c.user(rng.choice(("I'll call back later.", "Never mind, bye.")))
        c.outcome = "abandoned"
        return
    name = "book_slot" if scenario == "book" else "reschedule_appointment"
    result = {"appointment_id": apt_id if scenario == "reschedule" else f"apt-{rng.randint(100000, 999999)}",
              "status": "booked" if scenario == "book" else "rescheduled", "slot": _slot_json(picked, svc)}
    c.use_tool(name, _book_args(rng, scenario, picked, svc, apt_id, person), result,
               filler=rng.choice(("", "Booking that now.", "One moment.")))

    def confirm(r: random.Random, style: str) -> tuple[str, Features]:
        return A.salon_confirm(r, style, picked, svc=said)

    def regen_confirm(r: random.Random, good: bool) -> dict[str, Any]:
        return _msg(confirm(r, "good" if good else r.choice(("pushy", "upsell", "vague")))[0])

    style = rng.choice(A.SALON_CONFIRM_STYLES)
    text, feats = confirm(rng, style)
    c.key(text, feats, Situation(has_slots=True), style != "good", regen_confirm)
    c.user(rng.choice(("Thanks, bye.", "Great, thank you.", "Perfect.", "Okay.", "Thanks!", "Cool, see you then.")))
    if rng.random() < 0.5:
        c.assistant(rng.choice(("Bye now.", "Take care!", "You're welcome, goodbye.", "See you soon.")))


def _book_args(rng: random.Random, scenario: str, slot: Slot, svc: str, apt_id: str,
               person: tuple[str, str, str, str | None]) -> dict[str, Any]:
    first, last, phone, email = person
    if scenario == "book":
        return {"slot_id": slot.slot_id, "service": svc,
                "customer": {"name": f"{first} {last}", "phone": phone, "email": email,
                             "returning": rng.random() < 0.6},
                "notes": rng.choice((None, None, None, None, "Sensitive scalp.", "Long hair.", "First visit.")),
                "send_confirmation": "email" if email and rng.random() < 0.5 else "sms"}
    return {"appointment_id": apt_id, "new_slot_id": slot.slot_id,
            "reason": rng.choice(("customer_request", "customer_request", "running_late", "other")),
            "notify_customer": rng.random() < 0.8}


# ---- the appointment resolver ------------------------------------------------------------------------------

def _resolver_call(c: _Call, site: Site, today: date) -> None:
    rng = c.rng
    first, last, _phone, _email = _person(rng)
    dob = date(rng.randint(1940, 2012), rng.randint(1, 12), rng.randint(1, 28))
    mrn = f"MRN-{rng.randint(0, 9999999):07d}"
    prv_id, dr, spec = rng.choice(PROVIDERS)
    conflict = rng.choices(("double_booking", "provider_away", "facility_closure"), (55, 30, 15))[0]
    day = today + timedelta(days=rng.randint(2, 12))
    t1h, t1m = rng.randint(8, 15), rng.choice((0, 15, 30))
    t2m_total = t1h * 60 + t1m + rng.choice((15, 30))
    t2h, t2m = divmod(t2m_total, 60)
    other = rng.choice(OTHER_VISITS)
    appt_a, appt_b = f"appt-{rng.randint(10**7, 10**8 - 1)}", f"appt-{rng.randint(10**7, 10**8 - 1)}"
    dur = rng.choice((15, 30, 30, 45, 60))
    day_said = A.say_day(rng, day)
    c.assistant(rng.choice((f"{site.name} scheduling, how can I help you today?",
                            "Hello, this is the Northside Health scheduling line. What can I do for you?",
                            f"Thanks for calling {site.name}. How can I help?")))
    opener = {
        "double_booking": (f"I think I'm booked twice on {day_said}, can you check?",
                           f"I got two appointment reminders for the same morning, {day_said}.",
                           f"My {SPECIALTY_SAID[spec]} visit and my {other} are at the same time, I think."),
        "provider_away": (f"I got a message that {dr} is out, and I'm supposed to see them {day_said}.",
                          f"Someone said my {SPECIALTY_SAID[spec]} visit can't happen, the doctor's away?"),
        "facility_closure": (f"The clinic texted me it's closed on {day_said}. What about my appointment?",
                             "I heard the building is closed for repairs the day of my visit."),
    }[conflict]
    c.user(rng.choice(opener))
    c.assistant(rng.choice(("I can help with that. Can I have your last name and date of birth?",
                            "Sure. What's your last name and date of birth, please?",
                            "Let's sort it out. Could you give me your date of birth and last name?")))
    known_mrn = rng.random() < 0.3
    c.user(f"{last}, born {A.MONTHS[dob.month - 1]} {dob.day}, {dob.year}." +
           (f" My MRN is {mrn[4:]}." if known_mrn else ""))
    appts = [{"appointment_id": appt_a, "date": day.isoformat(), "start_time": f"{t1h:02d}:{t1m:02d}",
              "duration_minutes": dur, "provider": {"id": prv_id, "name": dr}, "specialty": spec,
              "facility_id": site.site_id, "status": "scheduled"}]
    if conflict == "double_booking":
        appts.append({"appointment_id": appt_b, "date": day.isoformat(), "start_time": f"{t2h:02d}:{t2m:02d}",
                      "duration_minutes": 30, "provider": None, "specialty": None, "visit": other,
                      "facility_id": site.site_id, "status": "confirmed"})
        conflicts = [{"type": "double_booking", "appointment_ids": [appt_a, appt_b],
                      "detail": f"{SPECIALTY_SAID[spec]} visit overlaps {other}"}]
    elif conflict == "provider_away":
        conflicts = [{"type": "provider_unavailable", "appointment_ids": [appt_a], "detail": f"{dr} out of office"}]
    else:
        conflicts = [{"type": "facility_closure", "appointment_ids": [appt_a], "detail": "building maintenance"}]
    lookup = {"patient": {"mrn": mrn if known_mrn else None, "last_name": last, "date_of_birth": dob.isoformat()},
              "date_range": {"from": today.isoformat(), "to": (today + timedelta(days=30)).isoformat()},
              "statuses": ["scheduled", "confirmed"]}
    c.use_tool("lookup_patient_appointments", lookup,
               {"patient": {"mrn": mrn, "name": f"{first} {last}"}, "appointments": appts, "conflicts": conflicts},
               filler=rng.choice(("", "Thank you, one moment.", "Let me pull that up.")))
    same_provider = conflict == "double_booking" or rng.random() < 0.3
    visit_type = "telehealth" if rng.random() < 0.2 else "in_person"
    d_from, d_to = day, day + timedelta(days=rng.randint(5, 14))
    avail_args = {"provider_id": prv_id if same_provider else None, "specialty": spec, "visit_type": visit_type,
                  "date_from": d_from.isoformat(), "date_to": d_to.isoformat(), "duration_minutes": dur,
                  "facility_id": None if conflict == "facility_closure" else site.site_id}
    slots: list[Slot] = []
    if rng.random() > 0.2:
        pool = [p for p in PROVIDERS if p[2] == spec] if not same_provider else [(prv_id, dr, spec)]
        seen = set()
        for _ in range(rng.randint(1, 4)):
            pid, pname, _s = rng.choice(pool)
            sd = d_from + timedelta(days=rng.randint(0 if conflict == "double_booking" else 1, (d_to - d_from).days))
            sh, sm = rng.randint(8, 16), rng.choice((0, 15, 30, 45))
            if (sd, sh, sm) in seen or (sh, sm) in ((t1h, t1m), (t2h, t2m)):
                continue
            seen.add((sd, sh, sm))
            slots.append(Slot("", sd, sh, sm, pname, pid))
        slots.sort(key=lambda s: (s.day, s.hour, s.minute))
    c.use_tool("find_provider_availability", avail_args,
               {"slots": [{"provider_id": s.who_id, "provider_name": s.who, "date": s.day.isoformat(),
                           "start_time": f"{s.hour:02d}:{s.minute:02d}", "duration_minutes": dur,
                           "visit_type": visit_type} for s in slots]},
               filler=rng.choice(("", "", "Let me check what's open.", "I'll look for another time.")))
    fill = {"spec": SPECIALTY_SAID[spec], "dr": dr, "t1": A.say_time(rng, t1h, t1m), "t2": A.say_time(rng, t2h, t2m),
            "other": other, "day": A.say_day(rng, day), "site": site.name,
            "until": A._ordinal(d_to.day), "urgency": "routine"}
    avoid = {(t1h, t1m), (t2h, t2m)} | {(s.hour, s.minute) for s in slots}
    situation = Situation(has_slots=bool(slots), has_conflict=True, no_availability=not slots)
    category = "unresolvable_conflict"
    flag_args = {"patient_mrn": mrn, "appointment_id": appt_a, "category": category,
                 "urgency": rng.choice(("routine", "routine", "same_day")),
                 "details": f"{conflict.replace('_', ' ')} on {day.isoformat()}; no {SPECIALTY_SAID[spec]} slot "
                            f"between {d_from.isoformat()} and {d_to.isoformat()}.",
                 "suggested_actions": rng.sample(["offer waitlist", "open an overflow slot", "call patient back",
                                                  "check other facilities"], rng.randint(1, 3))}

    def resolve(r: random.Random, style: str) -> tuple[str, Features]:
        return A.resolver_resolve(r, style, conflict=conflict, slots=slots, fill=fill, avoid=avoid)

    def regen_resolve(r: random.Random, good: bool) -> dict[str, Any]:
        if good:
            text, _ = resolve(r, "good")
            return _msg(text, [("flag_for_staff", flag_args)] if not slots else None)
        return _msg(resolve(r, r.choice(A.BAD_RESOLVE_STYLES))[0])

    picked: Slot | None = None
    for attempt in range(3):
        style = rng.choice(A.RESOLVE_STYLES) if attempt == 0 else rng.choice(("good", "good", "vague", "ignore"))
        text, feats = resolve(rng, style)
        if style == "good" and not slots:
            turn = c.key(text, feats, situation, False, regen_resolve)
            ticket = f"STF-{rng.randint(10000, 99999)}"
            c.tool_call(turn, "flag_for_staff", json.dumps(flag_args),
                        result={"ticket_id": ticket, "queue": "scheduling", "status": "open"})
            c.user(rng.choice(("Okay, thank you.", "Alright, I'll wait for the call.", "Thanks for your help.")))
            c.outcome = "escalated"
            return
        c.key(text, feats, situation, style != "good", regen_resolve, style == "pushy" and rng.random() < 0.5)
        if style in ("vague", "ignore") or not slots:
            c.user(rng.choice(("But I still have two things at once.", "Can't you just give me another time?",
                               "That doesn't really solve it.", "So what do I do?")))
            continue
        if style == "pushy" and rng.random() < 0.3:
            c.user(rng.choice(("I'll call my doctor's office directly.", "Never mind.")))
            c.outcome = "abandoned"
            return
        choice = rng.choice(slots)
        if style == "invented":
            c.user(rng.choice(("The first one is fine.", "Yes, the earlier one please.")))
            c.use_tool("move_appointment", _move_args(rng, appt_a, appt_b, conflict, choice, dur),
                       {"error": "slot_not_available"})
            c.user(rng.choice(("So that time doesn't exist?", "What happened?")))
            continue
        when = A.say_time(rng, choice.hour, choice.minute)
        c.user(rng.choice((f"{when} works for me.", f"Let's do {A.say_day(rng, choice.day)} at {when}.",
                           f"The {when} one, please.",
                           f"Okay, {A.say_day(rng, choice.day)} then.")))
        picked = choice
        break
    if picked is None:
        c.user("I'll call back.")
        c.outcome = "abandoned"
        return
    moved = {"provider_id": picked.who_id, "date": picked.day.isoformat(),
             "start_time": f"{picked.hour:02d}:{picked.minute:02d}", "duration_minutes": dur}
    c.use_tool("move_appointment", _move_args(rng, appt_a, appt_b, conflict, picked, dur),
               {"appointment_id": appt_a, "status": "moved", "new_slot": moved},
               filler=rng.choice(("", "Moving it now.", "One moment.")))

    def confirm(r: random.Random, style: str) -> tuple[str, Features]:
        return A.resolver_confirm(r, style, picked, spec=SPECIALTY_SAID[spec])

    def regen_confirm(r: random.Random, good: bool) -> dict[str, Any]:
        return _msg(confirm(r, "good" if good else r.choice(("vague", "upsell", "pushy")))[0])

    style = rng.choice(A.RESOLVER_CONFIRM_STYLES)
    text, feats = confirm(rng, style)
    c.key(text, feats, Situation(has_slots=True), style != "good", regen_confirm)
    c.user(rng.choice(("Thank you so much.", "Great, thanks.", "Okay, bye.", "Perfect, that works.")))


def _move_args(rng: random.Random, appt_a: str, appt_b: str, conflict: str, slot: Slot,
               dur: int) -> dict[str, Any]:
    reason = {"double_booking": "double_booking", "provider_away": "provider_conflict",
              "facility_closure": "facility_closure"}[conflict]
    return {"appointment_id": appt_a,
            "new_slot": {"provider_id": slot.who_id, "date": slot.day.isoformat(),
                         "start_time": f"{slot.hour:02d}:{slot.minute:02d}", "duration_minutes": dur},
            "reason": reason, "conflicting_appointment_id": appt_b if conflict == "double_booking" else None,
            "notify_patient": {"channel": rng.choice(("sms", "email", "phone", "portal")), "message": None}}


# ---- feedback ----------------------------------------------------------------------------------------------

CSAT_COMMENTS_GOOD = ("Quick and easy.", "Very helpful, thanks!", "Great service.", "Got exactly what I needed.",
                      "Smooth call.")
CSAT_COMMENTS_BAD = ("Not helpful.", "Frustrating call.", "Took forever and didn't fix it.", "Would not use again.",
                     "Felt like nobody listened.")


def _feedback(c: _Call) -> None:
    rng = c.rng
    end = c.t
    keys = c.keys
    scores = [k.score for k in keys]
    if rng.random() < CSAT_RATE:
        source = rng.choices(("ivr", "sms", "survey", "csm"), (30 if c.voice else 0, 30, 30, 10))[0]
        delay = {"ivr": rng.randint(10_000, 120_000), "sms": rng.randint(5 * _MIN, 6 * _HOUR),
                 "survey": rng.randint(_DAY, 4 * _DAY), "csm": rng.randint(2 * _DAY, 7 * _DAY)}[source]
        scale = 10 if source == "survey" and rng.random() < 0.6 else 5
        score = _csat(scores, rng, scale_max=scale, outcome=c.outcome, noise=CSAT_NOISE if c.noisy else 0.0)
        data: dict[str, Any] = {"score": score, "scale_max": scale, "source": source}
        if rng.random() < 0.2:
            data["comment"] = rng.choice(CSAT_COMMENTS_GOOD if score / scale >= 0.6 else CSAT_COMMENTS_BAD)
        c.emit("feedback.csat", data, at=end + delay)
    if keys and rng.random() < THUMBS_RATE:
        for k in rng.sample(keys, min(len(keys), rng.choice((1, 1, 2)))):
            rater = "caller" if not c.voice and rng.random() < 0.8 else "csm"
            up = k.score >= 0.6
            if rng.random() < THUMBS_FLIP and c.noisy:
                up = not up
            delay = rng.randint(2_000, 10 * _MIN) if rater == "caller" else rng.randint(_DAY, 5 * _DAY)
            c.emit("feedback.thumbs", {"turn": k.turn, "up": up, "rater": rater}, at=end + delay)
    if keys and rng.random() < PREFERENCE_RATE:
        k = keys[0] if rng.random() < 0.75 else rng.choice(keys)
        good, bad = k.regen(rng, True), k.regen(rng, False)
        if rng.random() < PREFERENCE_FLIP and c.noisy:
            good, bad = bad, good
        data = {"turn": k.turn, "chosen": good, "rejected": bad, "rater": rng.choice(("csm", "csm", "qa-reviewer"))}
        c.emit("feedback.preference", data, at=end + rng.randint(_DAY, 6 * _DAY))
    bad_keys = [k for k in keys if k.bad]
    if bad_keys and rng.random() < CORRECTION_RATE:
        k = bad_keys[0]
        c.emit("feedback.correction", {"turn": k.turn, "corrected": k.regen(rng, True), "rater": "csm"},
               at=end + rng.randint(_DAY, 6 * _DAY))


# ---- the world ---------------------------------------------------------------------------------------------

def _malformed(j: int, seed: int, agent: ExampleAgent, ts: str) -> dict[str, Any]:
    """Messages that break the contract in the ways runtimes do; ingest must dead-letter each one."""
    env = {"schema": SCHEMA_V1, "event_id": f"sim{seed}-bad{j}", "type": "call.turn",
           "tenant_id": agent.tenant_id, "agent_id": agent.agent_id, "call_id": f"sim{seed}-bad{j}", "ts": ts,
           "data": {"turn": 0, "role": "user", "content": "hello"}}
    kind = j % 6
    if kind == 0:
        env["schema"] = "agent-dpo.event.v0"
    elif kind == 1:
        env["ts"] = ts[:19]  # no zone
    elif kind == 2:
        env["type"] = "call.transcript"
    elif kind == 3:
        env["type"] = "feedback.csat"
        env["data"] = {"score": 7, "scale_max": 5, "source": "survey"}
    elif kind == 4:
        env["data"] = {"turn": -1, "role": "user", "content": "hi", "asr_confidence": 1.4}
    else:
        del env["call_id"]
    return env


def _start_call(rng: random.Random, agent: ExampleAgent, call_id: str, t: int) -> tuple[_Call, Site, date]:
    channel = rng.choices(("voice", "chat", "sms"), (75, 15, 10))[0]
    c = _Call(rng, agent, call_id, t, channel)
    site = rng.choice(agent.sites)
    today = (_EPOCH + timedelta(milliseconds=t)).date()
    c.emit("call.started", {"system_prompt": agent.system_prompt(site, today), "tools": agent.tools,
                            "model": {"name": agent.model_name, "version": agent.model_version},
                            "channel": channel, "locale": "en-US"})
    return c, site, today


def _play(c: _Call, site: Site, today: date) -> None:
    if c.rng.random() < 0.01:
        c.user("Hello?")
        c.outcome = "failed"  # the runtime fell over
    elif c.agent.agent_id == RESOLVER:
        _resolver_call(c, site, today)
    else:
        _salon_call(c, site, today)


def _envelopes(c: _Call, stamp: _Stamps, first: int = 0) -> list[tuple[int, dict[str, Any]]]:
    tenant, agent_id, call_id = c.agent.tenant_id, c.agent.agent_id, c.call_id
    return [(ts, {"schema": SCHEMA_V1, "event_id": f"{call_id}-{k:02d}", "type": event_type, "tenant_id": tenant,
                  "agent_id": agent_id, "call_id": call_id, "ts": stamp(ts), "data": data})
            for k, (ts, event_type, data) in enumerate(c.events[first:], start=first)]


def _ms(when: datetime) -> int:
    return int((when - _EPOCH).total_seconds() * 1000)


def simulate(n_calls: int, seed: int, agents: Iterable[str] = ALL_AGENTS, *, malformed: int = 0,
             duplicate_rate: float = 0.004, late_rate: float = 0.03, label_noise: bool = True,
             start: datetime = DEFAULT_START) -> Iterator[dict[str, Any]]:
    """Yield the envelopes of `n_calls` simulated calls in bus arrival order. Pure and deterministic:
    the same arguments give the same envelopes, event ids and timestamps included.

    Calls of the chosen agents interleave; events arrive slightly late, some much later (out of
    order), `duplicate_rate` of them twice under the same event id; feedback arrives up to days after
    the call. `malformed` contract-breaking messages are mixed in for dead-letter demos.
    `label_noise=False` turns off rater flips and CSAT scatter (rubric tests)."""
    chosen = [example_agent(a) for a in ((agents,) if isinstance(agents, str) else agents)]
    if not chosen:
        raise ValueError("simulate needs at least one agent")
    rng = WorldRandom(seed)
    stamp = _Stamps()
    t = _ms(start)
    heap: list[tuple[int, int, dict[str, Any]]] = []
    seq = 0
    bad_at = {(j + 1) * n_calls // (malformed + 1): j for j in range(malformed)} if malformed else {}
    for i in range(n_calls):
        t += int(rng.expovariate(1 / 45_000)) + 1000  # calls start ~45 s apart, across the agents
        while heap and heap[0][0] <= t:
            yield heapq.heappop(heap)[2]
        c, site, today = _start_call(rng, rng.choice(chosen), f"sim{seed}-{i:07d}", t)
        c.noisy = label_noise
        _play(c, site, today)
        c.t += rng.randint(500, 3000)
        c.emit("call.ended", {"outcome": c.outcome, "duration_s": round((c.t - c.t0) / 1000, 1)})
        _feedback(c)
        for ts, env in _envelopes(c, stamp):
            arrive = ts + rng.randint(5, 400)
            if rng.random() < late_rate:
                arrive += rng.randint(2_000, 90_000)
            seq += 1
            heapq.heappush(heap, (arrive, seq, env))
            if rng.random() < duplicate_rate:
                seq += 1
                heapq.heappush(heap, (arrive + rng.randint(1_000, 600_000), seq, env))
        if i in bad_at:
            seq += 1
            heapq.heappush(heap, (t, seq, _malformed(bad_at[i], seed, c.agent, stamp(t))))
    if malformed and not n_calls:
        for j in range(malformed):
            yield _malformed(j, seed, chosen[j % len(chosen)], stamp(t))
    while heap:
        yield heapq.heappop(heap)[2]


# ---- live calls (the demo's canary) ------------------------------------------------------------------------

@dataclass(frozen=True)
class LivePrompt:
    """A simulated call up to the turn where the served model must answer: the envelopes so far (to
    publish first), the chat context in the project's own prompt shape, and the tools offered."""

    agent: ExampleAgent
    call_id: str
    turn: int  # the assistant turn the answer becomes
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    envelopes: list[dict[str, Any]]
    channel: str
    t_ms: int  # simulated clock at the answer

    def envelopes_served_by(self, name: str, version: str | None) -> list[dict[str, Any]]:
        """The envelopes so far, with `call.started` naming the model (canary arm) that serves the call."""
        out = []
        for env in self.envelopes:
            if env["type"] == "call.started":
                model = {"name": name} if version is None else {"name": name, "version": version}
                env = {**env, "data": {**env["data"], "model": model}}
            out.append(env)
        return out


def live_prompts(agent_id: str, n: int, seed: int, *, start: datetime = DEFAULT_START) -> Iterator[LivePrompt]:
    """`n` live calls of one agent, each stopped where the first answer the rubric cares about is due
    (offering slots, settling a conflict). Deterministic for a seed."""
    from agent_dpo.calls import StoredEvent, assemble_call
    from agent_dpo.context import CallContexts
    from agent_dpo.events import parse_event, subject_for

    agent = example_agent(agent_id)
    rng = WorldRandom(seed)
    stamp = _Stamps()
    t = _ms(start)
    made = i = 0
    while made < n:
        t += int(rng.expovariate(1 / 45_000)) + 1000
        c, site, today = _start_call(rng, agent, f"live{seed}-{i:07d}", t)
        i += 1
        c.stop_at_key = True
        try:
            _play(c, site, today)
        except _KeyReached as reached:
            envs = [env for _, env in _envelopes(c, stamp)]
            stored = []
            for k, env in enumerate(envs):
                event = parse_event(subject_for(env["tenant_id"], env["agent_id"], env["type"]),
                                    json.dumps(env).encode())
                stored.append(StoredEvent(event, k))
            # Every turn so far is the context of the turn about to be answered.
            messages = list(CallContexts(assemble_call(stored)).messages)
            yield LivePrompt(agent, c.call_id, reached.turn, messages, agent.tools, envs, c.channel, c.t)
            made += 1


def live_feedback(prompt: LivePrompt, answer: dict[str, Any] | str, seed: int, *,
                  ts_ms: int | None = None) -> tuple[float, list[dict[str, Any]]]:
    """Finish a live call with the served model's answer: the answer's turn (and its tool calls),
    `call.ended`, and the caller's CSAT and thumbs as the hidden rubric makes them (with the usual
    noise). Returns (rubric score, envelopes). `ts_ms` places the events on a real clock if given."""
    from agent_dpo.world.rubric import score_answer, thumbs_from_score

    message = {"role": "assistant", "content": answer} if isinstance(answer, str) else answer
    score = score_answer(prompt.agent.agent_id, prompt.messages, prompt.tools, message)
    rng = WorldRandom(f"{seed}:{prompt.call_id}")
    c = _Call(rng, prompt.agent, prompt.call_id, prompt.t_ms if ts_ms is None else ts_ms, prompt.channel)
    c.turn = prompt.turn
    turn = c.assistant(message.get("content") or "")
    for tc in message.get("tool_calls") or []:
        fn = tc.get("function", {})
        args = fn.get("arguments", "")
        c.tool_call(turn, fn.get("name") or "?", args if isinstance(args, str) else json.dumps(args))
    c.t += rng.randint(2_000, 20_000)
    c.emit("call.ended", {"outcome": "completed" if score >= 0.4 else "abandoned",
                          "duration_s": round((c.t - prompt.t_ms) / 1000 + 60, 1)})
    scale = 5
    c.emit("feedback.csat", {"score": _csat([score], rng, scale_max=scale, outcome="completed"),
                             "scale_max": scale, "source": "ivr" if c.voice else "sms"}, at=c.t + 30_000)
    c.emit("feedback.thumbs", {"turn": turn, "up": thumbs_from_score(score, rng),
                               "rater": "csm" if c.voice else "caller"}, at=c.t + 40_000)
    envs = [env for _, env in _envelopes(c, _Stamps())]
    for k, env in enumerate(envs):
        env["event_id"] = f"{prompt.call_id}-live{k:02d}"
    return score, envs


def malformed_ids(seed: int, malformed: int) -> set[str]:
    """The event ids `simulate(..., malformed=k)` gives its contract-breaking messages."""
    return {f"sim{seed}-bad{j}" for j in range(malformed)}


class _Tally:
    def __init__(self, bad_ids: set[str]) -> None:
        self.counts: Counter = Counter()
        self.seen: set[str] = set()
        self.bad_ids = bad_ids

    def add(self, env: dict[str, Any]) -> None:
        counts, event_id = self.counts, env.get("event_id")
        counts["events"] += 1
        if event_id in self.bad_ids:
            counts["malformed"] += 1
        elif event_id in self.seen:
            counts["duplicates"] += 1
        else:
            self.seen.add(event_id)
            counts[str(env.get("type"))] += 1


def count_by_type(envelopes: Iterable[dict[str, Any]], *, seed: int | None = None, malformed: int = 0) -> Counter:
    """Counts per event type of distinct events, plus `events` (all messages), `duplicates` (re-sends)
    and `malformed` (given the run's seed and malformed count)."""
    tally = _Tally(malformed_ids(seed, malformed) if seed is not None else set())
    for env in envelopes:
        tally.add(env)
    return tally.counts


async def publish_world(target: Any, n_calls: int, seed: int, agents: Iterable[str] = ALL_AGENTS, *,
                        malformed: int = 0, window: int = 128, prefix: str | None = None,
                        on_event: Callable[[dict[str, Any]], None] | None = None, **options: Any) -> Counter:
    """Publish a simulated world through the publisher API, as runtimes would. `target` is an object with
    `async publish_envelope(envelope)` (the runtime publisher) or a JetStream context to wrap in one.
    Up to `window` publishes are in flight at once; each is acknowledged. Returns `count_by_type`."""
    publisher = target
    if not hasattr(target, "publish_envelope"):
        # A bare JetStream context: the runtime publisher is the edge that owns subjects and headers.
        from agent_dpo_adapters.nats_publisher import EventPublisher

        publisher = EventPublisher(target, prefix=prefix) if prefix else EventPublisher(target)
    tally = _Tally(malformed_ids(seed, malformed))
    pending: set[asyncio.Future] = set()
    for env in simulate(n_calls, seed, agents, malformed=malformed, **options):
        tally.add(env)
        pending.add(asyncio.ensure_future(publisher.publish_envelope(env)))
        if on_event:
            on_event(env)
        if len(pending) >= window:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                fut.result()
    if pending:
        for fut in (await asyncio.wait(pending))[0]:
            fut.result()
    tally.counts["calls"] = n_calls
    tally.counts["malformed"] += 0  # present even when zero
    return tally.counts

