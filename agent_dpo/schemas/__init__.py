"""JSON Schemas of the files agent-dpo hands to other systems, shipped as package data.
`openai_preference_row` is one line of OpenAI's preference (DPO) fine-tuning input: exports are
checked against it before they leave, and the loopback API in the tests enforces it too."""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema

OPENAI_PREFERENCE_ROW = "openai_preference_row.schema.json"


@cache
def load_schema(name: str) -> dict[str, Any]:
    return json.loads(resources.files(__package__).joinpath(name).read_text(encoding="utf-8"))


@cache
def _validator(name: str) -> jsonschema.protocols.Validator:
    schema = load_schema(name)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def _pointer(path: Iterable[Any]) -> str:
    return "/" + "/".join(str(p).replace("~", "~0").replace("/", "~1") for p in path)


def _reason(error: jsonschema.ValidationError) -> str:
    # anyOf/oneOf failures say only "not valid under any of the given schemas"; the closest
    # branch's own error says what to fix.
    if error.context:
        inner = jsonschema.exceptions.best_match(error.context)
        return f"{_message(inner)} (at {_pointer(inner.absolute_path)})"
    return _message(error)


def _message(error: jsonschema.ValidationError) -> str:
    # jsonschema quotes the whole array for length errors; a count is what a reader needs.
    if error.validator == "maxItems":
        return f"has {len(error.instance)} items, at most {error.validator_value} allowed"
    if error.validator == "minItems":
        return f"has {len(error.instance)} items, at least {error.validator_value} required"
    return error.message


def openai_row_errors(row: Any) -> list[str]:
    """Why `row` is not a valid OpenAI preference row: `<json pointer>: <reason>` lines, [] if valid."""
    errors = sorted(_validator(OPENAI_PREFERENCE_ROW).iter_errors(row),
                    key=lambda e: (list(map(str, e.absolute_path)), e.message))
    return [f"{_pointer(e.absolute_path)}: {_reason(e)}" for e in errors]


def openai_file_errors(path: Path, limit: int = 20) -> list[str]:
    """Check every line of an openai-dpo JSONL file; `line N: <pointer>: <reason>`, at most `limit`."""
    found: list[str] = []
    with Path(path).open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                found.append(f"line {number}: not JSON ({exc.msg})")
            else:
                found.extend(f"line {number}: {reason}" for reason in openai_row_errors(row))
            if len(found) >= limit:
                return found[:limit]
    return found
