"""The example world's phrasebook: assistant answers of every style (good, pushy, upsell, vague, invented
times, ignoring the conflict...) composed from many interchangeable parts and fills, each returned with
the rubric `Features` the simulator knows it put in. The simulator labels from those features; the
rubric judge has to read them back off the text. No phrase appears only in good answers."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import date

from agent_dpo.world.rubric import Features

WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")

SALON_OFFER_STYLES = ("good", "good", "good", "good", "pushy", "upsell", "vague", "invented")
SALON_CONFIRM_STYLES = ("good", "good", "good", "good", "good", "pushy", "upsell", "vague")
RESOLVE_STYLES = ("good", "good", "good", "good", "pushy", "vague", "ignore", "invented", "upsell")
RESOLVER_CONFIRM_STYLES = ("good", "good", "good", "good", "good", "vague", "upsell", "pushy")
BAD_OFFER_STYLES = ("pushy", "upsell", "vague", "invented")
BAD_RESOLVE_STYLES = ("pushy", "vague", "ignore", "invented", "upsell")


@dataclass(frozen=True)
class Slot:
    """An offered (or booked) slot as the tools returned it and as the answers speak of it."""

    slot_id: str
    day: date
    hour: int
    minute: int
    who: str  # stylist or provider name as spoken
    who_id: str


def _ordinal(n: int) -> str:
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def say_time(rng: random.Random, hour: int, minute: int) -> str:
    """A clock time the way people write it in a transcript: 2:30 pm, 2:30pm, 14:30, 2 PM..."""
    h12 = hour % 12 or 12
    half = "pm" if hour >= 12 else "am"
    k = rng.random()
    if minute == 0 and k < 0.35:
        return f"{h12} {half}" if k < 0.2 else f"{h12} {half.upper()}"
    if k < 0.55:
        return f"{h12}:{minute:02d} {half}"
    if k < 0.7:
        return f"{h12}:{minute:02d}{half}"
    if k < 0.82:
        return f"{h12}:{minute:02d} {half.upper()}"
    if k < 0.9:
        return f"{h12}:{minute:02d} {half[0]}.m."
    return f"{hour:02d}:{minute:02d}"


def say_day(rng: random.Random, d: date) -> str:
    wd, mon = WEEKDAYS[d.weekday()], MONTHS[d.month - 1]
    k = rng.randrange(8)
    if k == 0:
        return f"{wd}, {mon} {d.day}"
    if k == 1:
        return f"{wd} the {_ordinal(d.day)}"
    if k == 2:
        return f"{wd[:3]} {mon[:3]} {d.day}"
    if k == 3:
        return f"{mon} {_ordinal(d.day)}"
    if k == 4:
        return f"{wd} ({mon[:3]} {d.day})"
    if k == 5:
        return f"{wd}, the {_ordinal(d.day)}"
    if k == 6:
        return f"{wd} {mon} {d.day}"
    return f"{wd}"


def say_slot(rng: random.Random, s: Slot, with_who: bool) -> str:
    t, d = say_time(rng, s.hour, s.minute), say_day(rng, s.day)
    k = rng.randrange(4)
    text = f"{t} on {d}" if k == 0 else f"{d} at {t}"
    if with_who:
        text += f" with {s.who}"
    return text


def say_list(rng: random.Random, items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    conj = "or" if rng.random() < 0.7 else "and"
    if len(items) == 2:
        return f"{items[0]} {conj} {items[1]}"
    comma = "," if rng.random() < 0.5 else ""
    return ", ".join(items[:-1]) + f"{comma} {conj} {items[-1]}"


def _sentence(text: str) -> str:
    text = text.strip()
    return text[0].upper() + text[1:] if text else text


class _Answer:
    """Collects sentences and what the simulator knows about them."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.polite = 0
        self.confirms = False

    def add(self, text: str, polite: int = 0, confirms: bool = False) -> None:
        if text:
            self.parts.append(_sentence(text).replace("m..", "m."))  # "2 p.m." ends a sentence once
            self.polite += polite
            self.confirms = self.confirms or confirms or "?" in text

    def pick(self, rng: random.Random, bank: tuple[str, ...], polite: int = 0, confirms: bool = False,
             **fill: str) -> None:
        self.add(rng.choice(bank).format(**fill), polite, confirms)

    def text(self) -> str:
        return " ".join(self.parts)


# ---- shared banks ---------------------------------------------------------------------------------------

INTRO_NEUTRAL = ("Okay.", "Alright.", "Sure.", "So.", "Right.", "Let's see.", "Good news.", "Here's what I found.",
                 "Looking at the calendar now.", "Okay, I have the calendar up.", "Got it.", "One second, yes.",
                 "Okay, I've checked.", "I've pulled up the schedule.", "Right, let me read these out.")
INTRO_POLITE = ("Thanks for waiting.", "Thank you for holding.", "Thanks for your patience.",
                "Happy to help with that.", "Of course.", "Certainly.", "Absolutely, I can help.",
                "Thank you, I have the calendar open.", "I'd be glad to sort that out.",
                "No problem at all.", "Sorry for the wait.", "Thanks, I have it here.")
Q_POLITE = ("Would either of those work for you?", "Which one would you like?", "Does one of those work?",
            "Would you like me to book one of them?", "Would any of those work for you?",
            "Do any of those suit you?", "Would you like one of those?",
            "Would you like the earlier or the later one?",
            "Does that sound okay?", "Would that work for you?", "Which would you like me to hold?",
            "Would you like me to go ahead with one of those?")
Q_PLAIN = ("Which one?", "Which do you want?", "Any of those good?", "Which one works?",
           "Want one of those?", "Which one should I take?", "First or second?", "Which suits?",
           "Do you want the first one?", "Should I book the earlier one?", "Which time?")
TAIL_POLITE = ("I'm happy to look at other days too.",
               "If you'd prefer a different stylist, I can check that as well.",
               "If you'd like, I can send the details by text.", "Happy to check the following week as well.",
               "I can look at evenings too, if you'd like.", "Thanks again for calling us.")
TAIL_NEUTRAL = ("That's about {dur} minutes.", "That's at our {site} location.", "That's for the {svc}.",
                "Those are the earliest I can see.", "All of those are at {site}.",
                "The {svc} takes about {dur} minutes.",
                "Those are with {who}.", "I can only see those for now on the calendar.")


# ---- salon: offering slots after find_slots ----------------------------------------------------------------

SLOT_LEADS = ("I have {list}.", "I can offer {list}.", "There's {list}.", "We have {list}.",
              "The calendar shows {list}.", "I've got {list}.", "I can get you in {list}.",
              "{who} has {list}.", "Open at the moment: {list}.", "The openings are {list}.",
              "I see {list}.", "You could come in {list}.")
PUSH = ("You need to book it now, these go fast.", "You'll have to decide right away, I can't hold it.",
        "Honestly, I'd grab it now before it's gone.", "Don't wait on this one, it won't last.",
        "That's the last chance this week, so you should book it now.", "You must confirm right now.",
        "Those won't last, you really need to take one.", "You have to commit now or it goes to someone else.",
        "Hurry, there's only one left.", "Decide now, I can't hold these.", "I'd lock it in today, seriously.",
        "There's no guarantee it's there in an hour.", "You've got to pick one immediately.",
        "Just book it, there's no time to waste.", "Don't think too long, these go fast.")
PUSH_CLOSE = ("Should I just put you in?", "Do you want it or not?", "I'll book it unless you stop me.",
              "Yes or no?", "Booking it now, okay?", "So I'm locking that in.", "Shall I book it?", "")
PUSH_NO_SLOT = ("You need to book right now, we're nearly full this week.",
                "You'll have to take whatever's open, decide now.",
                "Those won't last, so you really need to commit today.")
UPSELL = ("While you're here, would you like to add a deep conditioning treatment for just $25?",
          "We also have a color and gloss package that's really popular; I can add it to the booking.",
          "Have you thought about our membership? It makes every third blowout free.",
          "I'd recommend upgrading to the deluxe {svc}, it's only $15 more.",
          "Would you like to add a scalp massage for just $18?",
          "Our keratin smoothing add-on pairs well with that, for only $40 more.",
          "We're running a special offer on gel add-ons this month.",
          "Can I also book you a paraffin hand treatment while you're in?",
          "A lot of clients bundle that with a gloss, it's our most popular package.",
          "If you join our loyalty club today you'd get a premium product kit.",
          "Would you like the premium {svc}? It includes a scalp ritual.",
          "I could add a facial for only $30 while you're at it.")
VAGUE = ("We have some openings later in the week.",
         "There's availability here and there, it depends on the stylist.",
         "We should be able to fit you in sometime next week.",
         "Things usually open up in the afternoons, so probably then.",
         "We're pretty open next week, so whenever works.", "There are a few spots around then, I think.",
         "Sometime next week should be fine.", "We have availability in the coming days.",
         "There are some times on {day_word}, probably.", "It depends, but there's plenty of room most days.",
         "We can probably squeeze you in at some point.", "There are a few openings with {who}, here and there.")
VAGUE_Q = (("What works for you?", 0), ("When would you like to come in?", 1), ("Any day in mind?", 0),
           ("Does that help?", 0), ("", 0), ("When suits you?", 0))
DAY_WORDS = ("the weekend", "Thursday", "weekday mornings", "the weekdays", "Friday", "most evenings")


def salon_offer(rng: random.Random, style: str, slots: list[Slot], *, svc: str, site: str, dur: int,
                avoid: set[tuple[int, int]]) -> tuple[str, Features]:
    """An answer offering (or failing to offer) the slots find_slots returned."""
    a = _Answer()
    if rng.random() < 0.55:
        if style in ("good", "upsell", "invented", "vague") and rng.random() < 0.6:
            a.pick(rng, INTRO_POLITE, polite=1)
        else:
            a.pick(rng, INTRO_NEUTRAL)
    who = slots[0].who if slots else "the team"
    grounded = invented = date_match = pushy = upsell = vague = False
    if style in ("good", "upsell", "invented", "pushy"):
        k = {"good": rng.choice((1, 2, 2, 3, 3)), "upsell": rng.choice((1, 1, 2)),
             "invented": rng.choice((1, 2, 2, 3)), "pushy": rng.choice((1, 1, 2, 2))}[style]
        chosen = rng.sample(slots, min(k, len(slots)))
        if style == "invented":
            chosen = [_invent(rng, s, avoid) for s in chosen]
        with_who = rng.random() < 0.3
        spoken = [say_slot(rng, s, with_who) for s in chosen]
        if style == "pushy" and rng.random() < 0.12:
            a.pick(rng, PUSH_NO_SLOT)
        else:
            a.pick(rng, SLOT_LEADS, list=say_list(rng, spoken), who=who)
            grounded = style != "invented"
            invented = style == "invented"
            date_match = grounded  # every spoken slot names its day
    if style in ("good", "invented"):
        if rng.random() < 0.45:
            a.pick(rng, TAIL_NEUTRAL, svc=svc, site=site, dur=str(dur), who=who)
        if rng.random() < 0.75:
            a.pick(rng, Q_POLITE, polite=1, confirms=True)
        else:
            a.pick(rng, Q_PLAIN, confirms=True)
        if rng.random() < 0.25:
            a.pick(rng, TAIL_POLITE, polite=1)
    elif style == "pushy":
        pushy = True
        a.pick(rng, PUSH)
        if rng.random() < 0.4:
            a.pick(rng, PUSH)
        close = rng.choice(PUSH_CLOSE)
        a.add(close, confirms="?" in close)
    elif style == "upsell":
        upsell = True
        if rng.random() < 0.5:
            a.pick(rng, Q_POLITE, polite=1, confirms=True)
            a.pick(rng, UPSELL, svc=svc)
        else:
            a.pick(rng, UPSELL, svc=svc)
            a.pick(rng, Q_POLITE, polite=1, confirms=True)
    elif style == "vague":
        vague = True
        first = rng.choice(VAGUE)
        a.add(first.format(day_word=rng.choice(DAY_WORDS), who=who))
        if rng.random() < 0.8:
            a.add(rng.choice([v for v in VAGUE if v != first]).format(day_word=rng.choice(DAY_WORDS), who=who))
        q, p = rng.choice(VAGUE_Q)
        a.add(q, polite=p, confirms=bool(q))
        if rng.random() < 0.45:
            a.pick(rng, TAIL_POLITE, polite=1)
    return a.text(), Features(grounded=grounded, date_match=date_match, invented=invented,
                              polite=min(a.polite, 2), confirms=a.confirms, pushy=pushy, upsell=upsell,
                              vague=vague)


def _invent(rng: random.Random, s: Slot, avoid: set[tuple[int, int]]) -> Slot:
    """A slot at a time no tool result holds: what a model that makes up times would say."""
    for _ in range(50):
        hour, minute = rng.randint(9, 18), rng.choice((0, 15, 30, 45))
        if (hour, minute) not in avoid and (hour - 12, minute) not in avoid:
            return Slot(s.slot_id, s.day, hour, minute, s.who, s.who_id)
    return Slot(s.slot_id, s.day, 20, 5, s.who, s.who_id)


# ---- salon: confirming a booking ---------------------------------------------------------------------------

CONFIRM_LEADS = ("You're all set: {svc} on {slot}.", "Done, you're booked for {slot}.",
                 "I've booked {slot} for your {svc}.",
                 "Great, that's {slot} for the {svc}.", "Your {svc} is now {slot}.",
                 "Okay, I have you down for {slot}.",
                 "That's confirmed for {slot}.", "All booked: {slot}.", "I've moved you to {slot}.")
CONFIRM_NOTICE = ("You'll get a text confirmation shortly.", "I've sent the details to your email.",
                  "We'll text you a reminder the day before.", "A confirmation is on its way by text.",
                  "You'll get an email with the details.", "")
CLOSE_POLITE = ("Thanks for calling!", "Thank you, is there anything else I can help with?", "Have a great day.",
                "See you then, take care.", "Thank you, enjoy the rest of your day.",
                "Anything else I can do for you? Thanks for calling.", "Thanks, we look forward to seeing you.")
CONFIRM_PUSH = ("You must cancel 24 hours ahead or you'll be charged in full.",
                "You need to be there 15 minutes early, don't be late or you lose the slot.",
                "You have to confirm by text right away or it gets released.",
                "And you really need to book your next one now, we fill up fast.")
CONFIRM_UPSELL = ("Since you're coming in, want to add a scalp massage for just $15?",
                  "While you're here, I can add a gloss treatment for only $20.",
                  "Would you like to upgrade to our premium {svc} package?",
                  "You might like our membership, it comes with free add-ons.",
                  "Can I interest you in our take-home product bundle?")
CONFIRM_VAGUE = ("Okay, that should be in the system now, probably.", "I think that's done, something like that.",
                 "It should be booked, you'll probably get a text at some point.",
                 "Alright, that should be fine, I think.", "We'll see you sometime then.",
                 "Should be all set, not sure about the exact time.")


def salon_confirm(rng: random.Random, style: str, slot: Slot, *, svc: str) -> tuple[str, Features]:
    a = _Answer()
    if style == "vague":
        if rng.random() < 0.3:
            a.pick(rng, INTRO_POLITE, polite=1)
        for line in rng.sample(CONFIRM_VAGUE, 2):
            a.add(line)
        if rng.random() < 0.6:
            a.pick(rng, CLOSE_POLITE, polite=1)
        return a.text(), Features(vague=True, polite=min(a.polite, 2), confirms=a.confirms)
    if rng.random() < 0.3:
        a.pick(rng, INTRO_POLITE if style != "pushy" else INTRO_NEUTRAL, polite=int(style != "pushy"))
    a.pick(rng, CONFIRM_LEADS, svc=svc, slot=say_slot(rng, slot, rng.random() < 0.5))
    if style == "good":
        a.pick(rng, CONFIRM_NOTICE)
        a.pick(rng, CLOSE_POLITE, polite=1, confirms=True)
    elif style == "pushy":
        if rng.random() < 0.4:
            a.pick(rng, CONFIRM_NOTICE)
        a.pick(rng, CONFIRM_PUSH)
    elif style == "upsell":
        if rng.random() < 0.4:
            a.pick(rng, CONFIRM_NOTICE)
        a.pick(rng, CONFIRM_UPSELL, svc=svc)
    if style in ("pushy", "upsell") and rng.random() < 0.4:
        a.pick(rng, CLOSE_POLITE, polite=1)
    return a.text(), Features(grounded=True, date_match=True, polite=min(a.polite, 2), confirms=a.confirms,
                              pushy=style == "pushy", upsell=style == "upsell")


# ---- resolver: settling the conflict after lookup and availability -----------------------------------------

ACK = {
    "double_booking": ("I see your {spec} visit with {dr} at {t1} overlaps your {other} at {t2} on {day}.",
                       "It looks like you're double-booked on {day}: {dr} at {t1} and your {other} at {t2}.",
                       "Your {other} at {t2} and your {spec} appointment at {t1} on {day} clash.",
                       "You have two appointments at the same time on {day}: {spec} and the {other}.",
                       "There's a conflict on {day}: {dr} at {t1} runs into your {other} at {t2}."),
    "provider_away": ("{dr} is out of the office on {day}, so your {t1} visit can't go ahead.",
                      "I see {dr} is on leave that week, which affects your {day} appointment.",
                      "{dr} will be away on {day}, so that {spec} visit needs a new time.",
                      "Your {spec} visit on {day} is affected because {dr} is unavailable that day.",
                      "There's a conflict with your {t1} appointment: {dr} is out on {day}."),
    "facility_closure": ("The {site} is closed on {day}, so your {t1} appointment has to move.",
                         "Because of a closure at {site} on {day}, your {t1} visit needs a new time.",
                         "{site} will be closed for maintenance on {day}, which affects your {t1} visit.",
                         "Your {day} appointment conflicts with a closure at {site}."),
}
ALT_LEADS = ("{dr2} has {list}.", "I can move it to {list}.", "The next openings are {list}.",
             "I have {list} available with {dr2}.", "There's {list} with {dr2}.", "I could offer {list}.",
             "{dr2} can see you {list}.", "Availability shows {list}.")
R_Q_POLITE = ("Would one of those work for you?", "Would you like me to move it to one of those?",
              "Does either of those work for you?", "Would that work for you?", "Would you like the earlier one?",
              "Happy to hold one, which would you prefer?", "Please tell me which you'd like.")
R_Q_PLAIN = ("Which one?", "Should I move it?", "Which time do you want?", "Want the first one?",
             "Is the earlier one fine?", "Which would you prefer?", "Shall I book one of those?")
NO_AVAIL = ("Unfortunately nothing opens up with {dr} before the {until}.",
            "There's nothing open in that window, I checked the whole range.",
            "I couldn't find an opening that fits before the {until}.",
            "{dr}'s calendar is full through the {until}.")
FLAG_TEXT = ("I've flagged this for our scheduling team, and they'll call you within one business day.",
             "I've put it on the scheduling team's worklist; you'll hear from them by tomorrow.",
             "I've escalated it to a scheduler, who will call you today or tomorrow.",
             "I've passed this to our scheduling coordinator, and they'll call you within 24 hours.",
             "A staff member will call you tomorrow; I've flagged it as {urgency}.")
SORRY = ("I'm sorry about the trouble.", "Sorry for the inconvenience.", "I apologize for the mix-up.",
         "Thank you for letting us know.", "I understand, that's frustrating.")
R_VAGUE = ("I'll make a note of it and someone will get back to you.",
           "We'll look into it and somebody will call at some point.",
           "It depends on the provider's schedule, so try calling back later.",
           "There's probably something in the coming weeks; the office will reach out.",
           "I'm not sure what's open, someone will contact you.", "We'll sort it out when we can.",
           "It should be fine, they usually work these things out.", "Things open up all the time, so probably soon.")
R_IGNORE = ("You're all set for {day} at {t1} with {dr}.",
            "Everything looks fine on my end; your {spec} appointment is {day} at {t1}.",
            "I see your {spec} visit on {day} at {t1}, that's confirmed.",
            "Your appointment with {dr} is still {day} at {t1}.",
            "Nothing to change, you're booked with {dr} on {day}.")
R_IGNORE_MORE = ("Your reminder will come the day before.", "Bring your insurance card and a photo ID.",
                 "Check-in opens 15 minutes before.", "Parking is in the garage on the east side.",
                 "You'll get the usual text reminder.", "Nothing else needs to change on our side.")
R_IGNORE_CLOSE = (("Anything else I can help with?", 1), ("Is there anything else?", 0), ("See you then.", 0),
                  ("Have a good day.", 1), ("", 0))
R_PUSH = ("You'll have to take it or you lose the appointment.", "You need to decide right now, these go fast.",
          "You must confirm immediately, I can't hold it.", "Just take it, there's no guarantee after today.",
          "You really need to pick one now.")
R_UPSELL = ("While you're here, you might like our executive physical package.",
            "You could also upgrade to our concierge membership for faster scheduling.",
            "We have a wellness package that adds a few screenings for only $99.",
            "If you'd like, I can add our premium telehealth add-on.")


def resolver_resolve(rng: random.Random, style: str, *, conflict: str, slots: list[Slot], fill: dict[str, str],
                     avoid: set[tuple[int, int]]) -> tuple[str, Features]:
    """The answer once the conflict and the availability are in the context. With no slots, `good`
    means flagging the case for staff (the caller adds the flag tool call)."""
    a = _Answer()
    ack = style in ("good", "invented", "upsell") or (style in ("vague", "pushy") and rng.random() < 0.6)
    if rng.random() < 0.35 and style != "pushy":
        a.pick(rng, SORRY, polite=1)
    if ack:
        a.pick(rng, ACK[conflict], **fill)
    grounded = invented = date_match = flags = pushy = upsell = vague = False
    if style == "good" and not slots:
        if rng.random() < 0.5:
            a.pick(rng, NO_AVAIL, **fill)
        a.pick(rng, FLAG_TEXT, **fill)
        flags = True
        if rng.random() < 0.2:
            a.pick(rng, ("Thank you, is there anything else I can help with?",
                         "Anything else I can do for you? Thanks for calling."), polite=1, confirms=True)
    elif style in ("good", "invented", "pushy", "upsell") and slots:
        k = rng.choice((1, 1, 2, 3)) if style != "pushy" else rng.choice((1, 2))
        chosen = rng.sample(slots, min(k, len(slots)))
        if style == "invented":
            chosen = [_invent(rng, s, avoid) for s in chosen]
        spoken = [say_slot(rng, s, False) for s in chosen]
        a.pick(rng, ALT_LEADS, list=say_list(rng, spoken), dr2=chosen[0].who)
        grounded, invented = style != "invented", style == "invented"
        date_match = grounded
        if style == "pushy":
            pushy = True
            for line in rng.sample(R_PUSH, rng.choice((1, 2))):
                a.add(line)
        else:
            if style == "upsell":
                upsell = True
                a.pick(rng, R_UPSELL)
            if rng.random() < 0.75:
                a.pick(rng, R_Q_POLITE, polite=1, confirms=True)
            else:
                a.pick(rng, R_Q_PLAIN, confirms=True)
    elif style == "ignore":
        a.pick(rng, R_IGNORE, **fill)
        a.pick(rng, R_IGNORE_MORE)
        q, p = rng.choice(R_IGNORE_CLOSE)
        a.add(q, polite=p, confirms="?" in q)
    else:  # vague, or a pushy/invented/upsell answer with nothing to offer
        vague = style != "pushy"
        if not slots and rng.random() < 0.4:
            a.pick(rng, NO_AVAIL, **fill)
        first = rng.choice(R_VAGUE if vague else R_PUSH)
        a.add(first)
        if rng.random() < 0.7:
            a.add(rng.choice([v for v in R_VAGUE if v != first]))
            vague = True
        if rng.random() < 0.3:
            a.pick(rng, ("Thanks for calling.", "Have a good day.", "Anything else?"), polite=1, confirms=False)
    return a.text(), Features(grounded=grounded, date_match=date_match, invented=invented,
                              polite=min(a.polite, 2), confirms=a.confirms or "?" in a.text(), pushy=pushy,
                              upsell=upsell, vague=vague, acknowledges=ack, flags=flags)


R_CONFIRM = ("All done: your {spec} visit is now {slot}.", "You're moved to {slot}.",
             "I've rescheduled it for {slot}.", "That's updated, your appointment is {slot}.",
             "Okay, your new time is {slot}.", "Your {spec} appointment is now {slot}.")
R_NOTICE = ("You'll get a text with the details.", "A confirmation is on its way to your patient portal.",
            "We'll send an email confirmation.", "We'll call you the day before as a reminder.",
            "Plan to arrive 10 minutes early for check-in.", "")
R_CONFIRM_VAGUE = ("Okay, it should be moved now, I think.",
                   "That's probably updated, someone will confirm at some point.",
                   "I think it went through, not sure.", "It should be fine, you'll hear from the office.")


def resolver_confirm(rng: random.Random, style: str, slot: Slot, *, spec: str) -> tuple[str, Features]:
    a = _Answer()
    if style == "vague":
        for line in rng.sample(R_CONFIRM_VAGUE, 2):
            a.add(line)
        if rng.random() < 0.6:
            a.pick(rng, CLOSE_POLITE, polite=1)
        return a.text(), Features(vague=True, polite=min(a.polite, 2), confirms=a.confirms)
    a.pick(rng, R_CONFIRM, spec=spec, slot=say_slot(rng, slot, rng.random() < 0.6))
    if style == "good":
        a.pick(rng, R_NOTICE)
        a.pick(rng, CLOSE_POLITE, polite=1, confirms=True)
    elif style == "upsell":
        if rng.random() < 0.4:
            a.pick(rng, R_NOTICE)
        a.pick(rng, R_UPSELL)
    elif style == "pushy":
        if rng.random() < 0.4:
            a.pick(rng, R_NOTICE)
        a.pick(rng, ("You must arrive 30 minutes early or you'll have to rebook.",
                     "You need to confirm right away or it gets released."))
    if style in ("pushy", "upsell") and rng.random() < 0.4:
        a.pick(rng, CLOSE_POLITE, polite=1)
    return a.text(), Features(grounded=True, date_match=True, polite=min(a.polite, 2), confirms=a.confirms,
                              pushy=style == "pushy", upsell=style == "upsell")
