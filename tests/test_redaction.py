"""Redaction: e-mails, phone numbers and Luhn-valid card numbers are replaced in content and in
tool-call arguments; other digit strings (order numbers, dates, slot ids) are left alone."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from agent_dpo.redaction import CARD, EMAIL, PHONE, luhn_ok, redact_arguments, redact_message, redact_text

PROPERTY = settings(max_examples=300, deadline=None)


def with_luhn_digit(body: str) -> str:
    """`body` plus the check digit that makes it pass Luhn."""
    for d in "0123456789":
        if luhn_ok(body + d):
            return body + d
    raise AssertionError("unreachable")


def test_examples():
    text = ("Mail ana.ruiz+salon@example.co.uk or call (415) 555-0123 / +44 20 7946 0958; "
            "card 4111 1111 1111 1111, order 1234567890123, slot-0a1b2c3d on 2026-12-08 at 14:00.")
    assert redact_text(text) == (f"Mail {EMAIL} or call {PHONE} / {PHONE}; card {CARD}, order 1234567890123, "
                                 "slot-0a1b2c3d on 2026-12-08 at 14:00.")
    assert redact_text("415-555-0123 and 4111-1111-1111-1111") == f"{PHONE} and {CARD}"
    assert redact_text("nothing here") == "nothing here"


def test_tool_call_arguments_are_redacted_and_stay_valid_json():
    arguments = json.dumps({"customer": {"phone": "+14155550123", "email": "ana@example.com"},
                            "card": 4111111111111111, "order": "A-1234567890"})
    out = json.loads(redact_arguments(arguments))
    assert out == {"customer": {"phone": PHONE, "email": EMAIL}, "card": CARD, "order": "A-1234567890"}
    untouched = '{"date": "2026-12-08",  "n": 3}'
    assert redact_arguments(untouched) == untouched  # exact text kept when nothing changes
    assert redact_arguments('{"email": "ana@example.com"') == '{"email": "[EMAIL]"'  # not JSON: as text


def test_messages_are_redacted_in_content_and_tool_calls():
    msg = {"role": "assistant", "content": "Texting +14155550123",
           "tool_calls": [{"id": "a", "type": "function",
                           "function": {"name": "f", "arguments": '{"email": "x@y.io"}'}}]}
    out = redact_message(msg)
    assert out["content"] == f"Texting {PHONE}"
    assert json.loads(out["tool_calls"][0]["function"]["arguments"]) == {"email": EMAIL}
    assert msg["content"] == "Texting +14155550123"  # the input is not changed


_local = st.from_regex(r"[a-z0-9][a-z0-9._+-]{0,15}", fullmatch=True)
_domain = st.from_regex(r"[a-z0-9]{1,12}(\.[a-z0-9]{1,8}){0,2}\.[a-z]{2,6}", fullmatch=True)
_words = st.sampled_from(["Hi", "please write to", "my number is", "thanks", "ok:", "(", "-", ""])


@PROPERTY
@given(_local, _domain, _words, _words)
def test_emails_are_always_replaced(local, domain, before, after):
    email = f"{local}@{domain}"
    out = redact_text(f"{before} {email} {after}")
    assert email not in out and EMAIL in out


@PROPERTY
@given(st.from_regex(r"\+[1-9][0-9]{6,14}", fullmatch=True), _words)
def test_e164_phones_are_always_replaced(phone, before):
    out = redact_text(f"{before} {phone}.")
    assert phone not in out and PHONE in out


@PROPERTY
@given(st.from_regex(r"[2-9][0-9]{2}", fullmatch=True), st.from_regex(r"[0-9]{3}", fullmatch=True),
       st.from_regex(r"[0-9]{4}", fullmatch=True), st.sampled_from(["({a}) {b}-{c}", "{a}-{b}-{c}",
                                                                    "{a}.{b}.{c}", "{a} {b} {c}"]))
def test_north_american_phones_are_always_replaced(a, b, c, shape):
    phone = shape.format(a=a, b=b, c=c)
    assert redact_text(f"call me at {phone} please") == f"call me at {PHONE} please"


@PROPERTY
@given(st.integers(min_value=12, max_value=18).flatmap(
    lambda n: st.from_regex(rf"[1-9][0-9]{{{n - 1}}}", fullmatch=True)), st.sampled_from(["", " ", "-"]))
def test_luhn_cards_are_always_replaced(body, sep):
    card = with_luhn_digit(body)
    grouped = sep.join(card[i:i + 4] for i in range(0, len(card), 4)) if sep else card
    out = redact_text(f"card {grouped} thanks")
    assert out == f"card {CARD} thanks"
    assert redact_arguments(json.dumps({"card": int(card)})) == json.dumps({"card": CARD})


@PROPERTY
@given(st.from_regex(r"[0-9]{1,25}", fullmatch=True).filter(lambda d: not luhn_ok(d)),
       st.sampled_from(["order {}", "Order #{} confirmed", "ref:{}", "{}"]))
def test_digit_strings_that_fail_luhn_are_untouched(digits, shape):
    text = shape.format(digits)
    assert redact_text(text) == text
    arguments = json.dumps({"order_id": digits, "n": int(digits)})
    assert redact_arguments(arguments) == arguments


def test_pathological_texts_take_linear_time():
    import time

    texts = ["x" * 50_000 + "@" + "b" * 50_000, "a@b." * 30_000, "1 " * 50_000, "+1" * 50_000, "9" * 100_000]
    start = time.perf_counter()
    for text in texts:
        redact_text(text)
    assert time.perf_counter() - start < 2.0  # quadratic patterns took minutes here
