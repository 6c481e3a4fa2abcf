"""Checking recorded tool calls: does a call's `arguments` text parse as a JSON object, name a tool
offered in that call, and validate against that tool's `parameters`? Pairing, status and the
simulator ask here; the tool catalog of the example agents (`tools/`) is loaded here too."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jsonschema
import jsonschema.exceptions
import jsonschema_rs

from agent_dpo.redaction import CARD, EMAIL, PHONE

if TYPE_CHECKING:
    from agent_dpo.store import EventStore

CODES = ("invalid_json", "not_an_object", "unknown_tool", "schema_violation", "invalid_schema")
_MAX_REASON = 300  # reasons end up in logs and status tables; instance values can be huge


@dataclass(frozen=True)
class ToolCallVerdict:
    ok: bool
    code: str | None = None  # None when ok; else one of CODES
    reason: str | None = None  # human reason, with the JSON pointer of the offending value
    # A value-free key for aggregation: "/date pattern" for a schema violation, else the code.
    # Reasons quote argument values (which may hold personal data and make every failure
    # unique), so stats count rules instead.
    rule: str | None = field(default=None, compare=False)

    def __reduce__(self) -> tuple:
        # Pickle (and copy) the resolved values, never a pending explanation.
        return (ToolCallVerdict, (self.ok, self.code, self.reason, self.rule))


class _Deferred:
    """`reason` and `rule` of a verdict may hold an `_Explain`, resolved on first read.
    Explaining a schema violation costs ten to a hundred times the check itself, and most
    callers (pairing asks "is this call valid?") never read the reason."""

    def __init__(self, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return None
        value = obj.__dict__[self.slot]
        if type(value) is _Explain:
            value.resolve(obj)
            value = obj.__dict__[self.slot]
        return value

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self.slot] = value


# Installed after @dataclass built __init__/__eq__/__repr__, which all go through these.
ToolCallVerdict.reason = _Deferred("reason")  # type: ignore[assignment]
ToolCallVerdict.rule = _Deferred("rule")  # type: ignore[assignment]


def _verdict(code: str, reason: Any, rule: Any) -> ToolCallVerdict:
    """A failed verdict, built without the frozen dataclass __init__ (four guarded setattrs): the
    same object at half the cost, which shows when a fifth of a batch fails."""
    verdict = object.__new__(ToolCallVerdict)
    verdict.__dict__.update(ok=False, code=code, _reason=reason, _rule=rule)
    return verdict


class _Explain:
    """The pending explanation of one schema violation: the compiled schema and the instance."""

    __slots__ = ("compiled", "instance")

    def __init__(self, compiled: _Compiled, instance: Any) -> None:
        self.compiled, self.instance = compiled, instance

    def resolve(self, verdict: ToolCallVerdict) -> None:
        verdict.__dict__["_reason"], verdict.__dict__["_rule"] = self.compiled.explain(self.instance)


OK = ToolCallVerdict(True, None, None)


# --- the catalog -----------------------------------------------------------------------------

def catalog_dir() -> Path:
    """The repository's `tools/` folder: the example agents' tool definitions, one folder per agent."""
    return Path(__file__).resolve().parents[1] / "tools"


def load_tool_catalog(path: str | Path) -> list[dict[str, Any]]:
    """Tool definitions from a JSON file (one tool or a list of tools) or a folder of such files,
    in file-name order. Use `agent-dpo tools check` to lint them; this only reads."""
    path = Path(path)
    files = sorted(path.rglob("*.json")) if path.is_dir() else [path]
    tools: list[dict[str, Any]] = []
    for file in files:
        doc = json.loads(file.read_text(encoding="utf-8"))
        tools.extend(doc if isinstance(doc, list) else [doc])
    return tools


# --- parsing ---------------------------------------------------------------------------------

class _NonFiniteNumber(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _NonFiniteNumber(f"{name} is not allowed")


# One decoder built once: json.loads(..., parse_constant=...) would build a new one per call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_SCAN = _DECODER.scan_once


def parse_arguments(arguments: str) -> Any:
    """Strict JSON: NaN and Infinity are not JSON (RFC 8259) and no tool backend accepts them."""
    try:
        # The scanner alone handles the common case (no surrounding whitespace) a bit faster
        # than decode(); anything else takes the full path with its precise error message.
        value, end = _SCAN(arguments, 0)
        if end == len(arguments):
            return value
    except StopIteration:
        pass
    return _DECODER.decode(arguments)


# --- compiled schemas ------------------------------------------------------------------------

def schema_digest(schema: Any) -> str:
    """sha256 of canonical JSON (sorted keys, no whitespace): equal schemas share one validator."""
    text = json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=repr)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class _Compiled:
    """One schema, compiled once: jsonschema-rs decides, python-jsonschema explains failures."""

    __slots__ = ("_explainer", "_rs", "error", "is_valid", "schema")

    def __init__(self, schema: Any) -> None:
        self.schema = schema
        self.error: str | None = None
        self._explainer: jsonschema.protocols.Validator | None = None
        try:
            if not isinstance(schema, dict):
                raise TypeError(f"parameters must be a JSON object, got {_json_type(schema)}")
            cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
            cls.check_schema(schema)
            # Formats are asserted: a malformed e-mail or date-time would fail the tool's backend.
            # Offline: a tool definition must never make the checker fetch a remote $ref.
            self._rs = jsonschema_rs.validator_for(schema, validate_formats=True, offline=True)
        except jsonschema.exceptions.SchemaError as exc:
            self._fail(f"{_pointer(exc.path)}: {exc.message}")
        except Exception as exc:  # noqa: BLE001 - whatever the engine refuses, the schema is unusable
            self._fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        else:
            self.is_valid = self._rs.is_valid

    def _fail(self, message: str) -> None:
        self.error = _clip(f"tool parameters are not a valid JSON Schema: {message}")
        self._rs = None
        self.is_valid = _never_valid

    def explain(self, instance: Any) -> tuple[str, str]:
        """(reason, rule) for an instance that failed: jsonschema's best match, JSON-pointed."""
        if self._explainer is None:
            cls = jsonschema.validators.validator_for(self.schema, default=jsonschema.Draft202012Validator)
            self._explainer = cls(self.schema, format_checker=cls.FORMAT_CHECKER)
        try:
            best = jsonschema.exceptions.best_match(self._explainer.iter_errors(instance))
        except Exception:  # noqa: BLE001 - e.g. a $ref python-jsonschema cannot resolve
            best = None
        if best is not None:
            where = _pointer(best.absolute_path)
            rule = f"{where} {best.validator}"
            if best.validator == "required" and isinstance(best.instance, dict):
                missing = [k for k in best.validator_value if k not in best.instance]
                rule += f" {missing[0]}" if missing else ""
            return _clip(f"{where}: {best.message}"), rule
        # The two engines disagree (a regex or format corner case): take jsonschema-rs's word.
        for err in self._rs.iter_errors(instance):
            where = _pointer(err.instance_path)
            return _clip(f"{where}: {err.message}"), f"{where} {_rs_keyword(err)}"
        return "arguments do not match the tool's parameters", "(root) schema"


def _never_valid(_instance: Any) -> bool:
    return False


def _rs_keyword(err: Any) -> str:
    path = list(getattr(err, "schema_path", []) or [])
    return str(path[-1]) if path else "schema"


# --- the checker -----------------------------------------------------------------------------

class ToolChecker:
    """Checks tool calls against the tools offered in their call. Owns two caches: compiled
    validators keyed by schema digest, and, per tools list, its name -> validator map."""

    def __init__(self, max_tool_lists: int = 1024) -> None:
        self._by_digest: dict[str, _Compiled] = {}
        # id(tools) -> (tools, offered map). Holding the list itself keeps its id from being
        # reused while cached. Tools lists are event data and are never edited in place.
        self._by_identity: dict[int, tuple[list, dict[str, _Compiled]]] = {}
        # digest of a whole tools list -> offered map, for equal lists that are new objects
        # (every `Call.tools` is freshly built).
        self._by_list_digest: dict[str, dict[str, _Compiled]] = {}
        self._max_lists = max_tool_lists
        self.compiles = 0

    def check(self, tools: list[dict], name: str, arguments: str) -> ToolCallVerdict:
        hit = self._by_identity.get(id(tools))
        offered = hit[1] if hit is not None and hit[0] is tools else self._offered(tools)
        try:
            # parse_arguments, inlined: this is the hot path of every export and status run.
            try:
                value, end = _SCAN(arguments, 0)
            except StopIteration:
                end = -1
            if end != len(arguments):
                value = _DECODER.decode(arguments)
        except _NonFiniteNumber as exc:
            return _verdict("invalid_json", f"arguments are not valid JSON: {exc}",
                                   "invalid_json")
        except (ValueError, TypeError, RecursionError) as exc:
            return _invalid_json(arguments, exc)
        if type(value) is dict:
            compiled = offered.get(name)
            if compiled is not None and compiled.is_valid(value):
                return OK
        return _failure(offered, name, value)

    def stats(self) -> dict[str, int]:
        return {"validators": len(self._by_digest), "compiles": self.compiles,
                "tool_lists": len(self._by_list_digest)}

    def _offered(self, tools: list[dict]) -> dict[str, _Compiled]:
        key = schema_digest(tools) if isinstance(tools, list) else ""
        offered = self._by_list_digest.get(key)
        if offered is None:
            offered = {}
            for tool in tools if isinstance(tools, list) else ():
                fn = tool.get("function") if isinstance(tool, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or fn["name"] in offered:
                    continue  # not a function tool: nothing a call could name
                # A function without parameters takes no arguments: any object passes.
                offered[fn["name"]] = self.compiled(fn.get("parameters", {"type": "object"}))
            if len(self._by_list_digest) >= self._max_lists:
                self._by_list_digest.clear()
            self._by_list_digest[key] = offered
        if len(self._by_identity) >= self._max_lists:
            self._by_identity.clear()
        if isinstance(tools, list):
            self._by_identity[id(tools)] = (tools, offered)
        return offered

    def compiled(self, schema: Any) -> _Compiled:
        digest = schema_digest(schema)
        found = self._by_digest.get(digest)
        if found is None:
            found = self._by_digest[digest] = _Compiled(schema)
            self.compiles += 1
        return found


def _failure(offered: dict[str, _Compiled], name: str, value: Any) -> ToolCallVerdict:
    """The verdict for parsed arguments that did not pass, in the order the checks are made."""
    if type(value) is not dict:
        return _verdict("not_an_object", f"arguments must be a JSON object, got {_json_type(value)}",
                               "not_an_object")
    compiled = offered.get(name)
    if compiled is None:
        names = ", ".join(sorted(offered)) or "none"
        return _verdict("unknown_tool",
                               _clip(f"tool {name!r} was not offered in this call (offered: {names})"),
                               "unknown_tool")
    if compiled.error is not None:
        return _verdict("invalid_schema", compiled.error, "invalid_schema")
    pending = _Explain(compiled, value)
    return _verdict("schema_violation", pending, pending)


_SHARED = ToolChecker()


def check_tool_call(tools: list[dict], name: str, arguments: str) -> ToolCallVerdict:
    """`ToolChecker.check` on a process-wide checker (validators shared by every caller)."""
    return _SHARED.check(tools, name, arguments)


# What a redaction placeholder stands for when a call in redacted data is checked: a value of its kind.
_STAND_INS = {EMAIL: "redacted@example.com", PHONE: "+15550100000", CARD: "4111111111111111"}


def _with_stand_ins(value: Any) -> Any:
    if isinstance(value, str):
        return _STAND_INS.get(value, value)
    if isinstance(value, dict):
        return {k: _with_stand_ins(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_with_stand_ins(v) for v in value]
    return value


def check_redacted_call(tools: list[dict], name: str, arguments: str) -> ToolCallVerdict:
    """`check_tool_call` for a call made in redacted data (an export's held-out prompts, and what a model
    trained on them writes): the export put `[EMAIL]`, `[PHONE]` or `[CARD]` where a value was, so a string
    that is exactly a placeholder is checked as a value of its kind (an e-mail address, an E.164 number, a
    card number). A placeholder where its kind does not fit (an enum, an e-mail field holding `[PHONE]`), a
    missing field or a wrong real value fails as usual, with the strict check's reason."""
    verdict = check_tool_call(tools, name, arguments)
    if verdict.ok or verdict.code != "schema_violation":
        return verdict
    value = parse_arguments(arguments)
    swapped = _with_stand_ins(value)
    if swapped != value and check_tool_call(tools, name, json.dumps(swapped)).ok:
        return OK
    return verdict


# --- stats -----------------------------------------------------------------------------------

@dataclass
class _ToolTally:
    calls: int = 0
    failures: int = 0
    by_code: Counter = field(default_factory=Counter)
    by_rule: Counter = field(default_factory=Counter)


class ToolStats:
    """Per agent and tool: calls checked, failures, failures by code and the commonest rules
    broken. Feed it verdicts as calls are checked; `rows()` is what status tables print."""

    def __init__(self) -> None:
        self._tally: dict[tuple[str, str, str], _ToolTally] = {}

    def add(self, tenant_id: str, agent_id: str, tool: str, verdict: ToolCallVerdict) -> None:
        tally = self._tally.get((tenant_id, agent_id, tool))
        if tally is None:
            tally = self._tally[(tenant_id, agent_id, tool)] = _ToolTally()
        tally.calls += 1
        if not verdict.ok:
            tally.failures += 1
            tally.by_code[verdict.code] += 1
            rule = verdict.rule
            tally.by_rule[verdict.code if rule in (None, verdict.code) else f"{verdict.code}: {rule}"] += 1

    def rows(self, top: int = 3) -> list[dict[str, Any]]:
        return [
            {"tenant_id": t, "agent_id": a, "tool": name, "calls": tally.calls, "failures": tally.failures,
             "failure_rate": round(tally.failures / tally.calls, 4) if tally.calls else 0.0,
             "by_code": dict(tally.by_code), "top_reasons": tally.by_rule.most_common(top)}
            for (t, a, name), tally in sorted(self._tally.items())
        ]


def store_tool_stats(store: EventStore, agents: Iterable[tuple[str, str]] | None = None,
                     checker: ToolChecker | None = None) -> ToolStats:
    """Check every recorded tool call of the given agents (default: all in the store). Calls whose
    `call.started` has not arrived are skipped: what they offered is not known yet."""
    checker = checker or _SHARED
    stats = ToolStats()
    for tenant_id, agent_id in agents if agents is not None else store.agents():
        for call in store.calls(tenant_id, agent_id):
            if call.started is None or not call.tool_calls:
                continue
            tools = call.tools  # built once per call: each access makes a new list
            for tc in call.tool_calls:
                stats.add(tenant_id, agent_id, tc.name, checker.check(tools, tc.name, tc.arguments))
    return stats


def tool_call_stats(calls: Iterable[tuple[str, str, list[dict], str, str]],
                    checker: ToolChecker | None = None) -> ToolStats:
    """Check (tenant_id, agent_id, tools, name, arguments) tuples and tally the verdicts."""
    checker = checker or _SHARED
    stats = ToolStats()
    for tenant_id, agent_id, tools, name, arguments in calls:
        stats.add(tenant_id, agent_id, name, checker.check(tools, name, arguments))
    return stats


# --- small formatting ------------------------------------------------------------------------

def _pointer(path: Iterable[Any]) -> str:
    parts = [str(p).replace("~", "~0").replace("/", "~1") for p in path]
    return "/" + "/".join(parts) if parts else "(root)"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _invalid_json(arguments: Any, exc: Exception) -> ToolCallVerdict:
    if not isinstance(arguments, str):
        reason = f"arguments must be JSON text, got a Python {type(arguments).__name__}"
    else:
        reason = f"arguments are not valid JSON: {exc}"
    return _verdict("invalid_json", _clip(reason), "invalid_json")


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 1] + "…"
