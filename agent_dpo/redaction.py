"""Redaction of personal data in exported examples: e-mail addresses, phone numbers and payment card
numbers become `[EMAIL]`, `[PHONE]` and `[CARD]` in message content and in tool-call arguments.
Exports call this by default (`--no-redact` turns it off); tool definitions are configuration and are
left as they are.

What counts:
- e-mail: `local@domain.tld` (local part up to 64 characters, as RFC 5321 allows).
- card: 13 to 19 digits, optionally grouped by single spaces or hyphens, that pass the Luhn check.
  Digit runs that fail Luhn (order numbers, booking references) are left alone.
- phone: `+` and 7 to 15 digits (E.164, separators allowed), or a North American number written with
  separators: `(415) 555-0123`, `415-555-0123`, `415.555.0123`, `415 555 0123`, optionally `1-` first.
  A bare run of digits is never taken for a phone number: it is far more often an order number.
"""

from __future__ import annotations

import json
import re
from typing import Any

EMAIL = "[EMAIL]"
PHONE = "[PHONE]"
CARD = "[CARD]"

# Bounded parts (RFC 5321: local part <= 64, labels <= 63) and a match that may only start where a
# local-part run starts keep this linear: unbounded, a long run of word characters around an "@"
# is rescanned from every position (minutes for 100 KB).
_EMAIL = re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}"
                    r"(?:\.[A-Za-z0-9-]{1,63})*\.[A-Za-z]{2,63}")
# Up to 19 digits with optional single separators; the lookarounds keep it from starting or ending
# inside a longer digit run, so a long reference number is judged whole (and left alone).
_CARD = re.compile(r"(?<![\d+])\d(?:[ -]?\d){12,18}(?![\d])")
_PHONE = re.compile(
    r"(?<![\w+])\+\d(?:[ .-]?\(?\d\)?){6,14}(?!\d)"  # +44 20 7946 0958, +14155550123
    r"|(?<![\w(])(?:1[ .-])?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}(?!\d)"  # (415) 555-0123
)
_TRIGGERS = re.compile(r"[@\d]")
_DIGIT = re.compile(r"\d")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(match: re.Match[str]) -> str:
    digits = re.sub(r"[ -]", "", match.group(0))
    return CARD if luhn_ok(digits) else match.group(0)


def redact_text(text: str) -> str:
    # Cheap checks first: most sentences hold neither an "@" nor a digit.
    if "@" in text:
        text = _EMAIL.sub(EMAIL, text)
    if _DIGIT.search(text):
        text = _CARD.sub(_card, text)
        text = _PHONE.sub(PHONE, text)
    return text


def redact_value(value: Any) -> Any:
    """Strings anywhere inside a JSON value; an integer that is a Luhn-valid card number becomes the
    string `[CARD]` (a card stored as a JSON number is still a card)."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: redact_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_value(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and 13 <= len(str(abs(value))) <= 19:
        return CARD if luhn_ok(str(abs(value))) else value
    return value


def redact_arguments(arguments: str) -> str:
    """Tool-call arguments text. JSON is redacted value by value and written back only when something
    changed (so valid JSON stays valid, and untouched arguments keep their exact text); text that does
    not parse is redacted as text."""
    if not _TRIGGERS.search(arguments):
        return arguments
    try:
        value = json.loads(arguments)
    except ValueError:
        return redact_text(arguments)
    redacted = redact_value(value)
    return arguments if redacted == value else json.dumps(redacted, ensure_ascii=False)


def redact_message(message: dict[str, Any]) -> dict[str, Any]:
    """A chat message in the neutral shape (arguments as text); returns a new dict."""
    out = dict(message)
    if isinstance(out.get("content"), str):
        out["content"] = redact_text(out["content"])
    if out.get("tool_calls"):
        out["tool_calls"] = [
            {**tc, "function": {**tc["function"], "arguments": redact_arguments(tc["function"]["arguments"])}}
            for tc in out["tool_calls"]]
    return out
