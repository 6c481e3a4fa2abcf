"""Linting tool definitions before an agent offers them: is each file a function tool, is its
`parameters` a valid JSON Schema, is its name legal and unique, and would OpenAI's strict mode
accept it? `agent-dpo tools check` prints these findings; recorded calls are checked in toolcheck."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import jsonschema_rs

from agent_dpo.errors import UsageError

NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MAX_SCHEMA_ERRORS = 20  # per tool: the first ones are the useful ones

# OpenAI Structured Outputs ("Supported schemas" in its structured-outputs guide): the subset of
# JSON Schema strict mode accepts. Anything else in a strict tool makes the API refuse the request.
STRICT_KEYWORDS = frozenset({
    # any type
    "type", "enum", "const", "anyOf", "description", "title",
    # references
    "$ref", "$defs", "definitions",
    # objects
    "properties", "required", "additionalProperties",
    # strings
    "pattern", "format",
    # numbers
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
    # arrays
    "items", "minItems", "maxItems",
})
STRICT_ROOT_KEYWORDS = STRICT_KEYWORDS | {"$schema"}  # naming the dialect is harmless at the root
STRICT_FORMATS = frozenset({"date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6",
                            "uuid"})
STRICT_MAX_DEPTH = 10  # levels of object nesting
STRICT_MAX_PROPERTIES = 5000  # across the whole schema
STRICT_MAX_ENUM_VALUES = 1000  # across the whole schema


@dataclass(frozen=True)
class Finding:
    severity: str  # "error" or "warning"
    file: str
    tool: str | None  # None when the file holds no recognisable tool
    pointer: str  # JSON pointer into the file ("" is the whole document)
    rule: str  # short stable id, e.g. "strict-required", "schema", "duplicate-name"
    message: str

    def line(self) -> str:
        where = " ".join(p for p in (f"tool {self.tool!r}" if self.tool is not None else "",
                                     f"at {self.pointer}" if self.pointer else "") if p)
        return f"{self.file}: {self.severity}: {where + ': ' if where else ''}{self.message} [{self.rule}]"


@dataclass
class LintReport:
    files: int = 0
    tools: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> int:
        return sum(f.severity == "error" for f in self.findings)

    @property
    def warnings(self) -> int:
        return sum(f.severity == "warning" for f in self.findings)

    @property
    def ok(self) -> bool:
        return self.errors == 0

    def summary(self) -> dict[str, Any]:
        return {"ok": self.ok, "files": self.files, "tools": self.tools, "errors": self.errors,
                "warnings": self.warnings}

    def to_json(self) -> dict[str, Any]:
        return {"findings": [asdict(f) for f in self.findings], "summary": self.summary()}


def tool_files(paths: Iterable[str | Path]) -> list[Path]:
    """The JSON files named, folders searched recursively; a missing path is a usage error."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(path.rglob("*.json"))
            if not found:
                raise UsageError(f"{raw}: no .json files in this folder")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise UsageError(f"{raw}: no such file or folder")
    seen: set[Path] = set()
    return [f for f in files if not (f.resolve() in seen or seen.add(f.resolve()))]


def lint_paths(paths: Iterable[str | Path]) -> LintReport:
    report = LintReport()
    first_seen: dict[str, str] = {}  # tool name -> file that defined it first
    for file in tool_files(paths):
        report.files += 1
        doc, problem = _read(file)
        if problem:
            report.findings.append(Finding("error", str(file), None, "", "not-json", problem))
            continue
        if doc == []:
            report.findings.append(Finding("error", str(file), None, "", "not-a-tool", "the file holds an empty list"))
            continue
        for base, tool in _tools_of(doc):
            name, findings = lint_tool(tool, str(file), base)
            report.findings.extend(findings)
            if name is None:
                continue
            report.tools += 1
            if name in first_seen:
                report.findings.append(Finding("error", str(file), name, f"{base}/function/name", "duplicate-name",
                                               f"tool name {name!r} is already defined in {first_seen[name]}"))
            else:
                first_seen[name] = str(file)
    return report


def lint_tool(tool: Any, file: str = "<tool>", base: str = "") -> tuple[str | None, list[Finding]]:
    """(the tool's name, or None when it has none; its findings). `base` is the tool's JSON pointer
    inside `file`, so findings point into the file as written."""
    findings: list[Finding] = []
    name = None
    try:
        for name, finding in _lint_tool(file, base, tool):  # every yield after the first carries the name
            if finding is not None:
                findings.append(finding)
    except RecursionError:
        findings.append(Finding("error", file, name, base, "schema", "the definition nests too deeply to check"))
    return name, findings


# --- one tool --------------------------------------------------------------------------------

def _read(file: Path) -> tuple[Any, str | None]:
    try:
        return json.loads(file.read_text(encoding="utf-8")), None
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 text: {exc.reason} at byte {exc.start}"
    except json.JSONDecodeError as exc:
        return None, f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
    except RecursionError:
        return None, "not usable JSON: nested too deeply to read"
    except OSError as exc:
        return None, f"cannot read: {exc.strerror or exc}"


def _tools_of(doc: Any) -> list[tuple[str, Any]]:
    """(pointer, tool) for a file holding one tool or a list of tools."""
    if isinstance(doc, list):
        return [(f"/{i}", t) for i, t in enumerate(doc)]
    return [("", doc)]


def _lint_tool(file: str, base: str, tool: Any) -> Iterator[tuple[str | None, Finding | None]]:
    """Yields (name, finding) pairs; (name, None) once the tool's name is known."""
    def finding(severity: str, pointer: str, rule: str, message: str) -> tuple[str | None, Finding]:
        return name, Finding(severity, file, name, pointer, rule, message)

    name: str | None = None
    shape = ('expected an OpenAI function tool: {"type": "function", "function": '
             '{"name", "description", "parameters", "strict"}}')
    if not isinstance(tool, dict):
        yield finding("error", base, "not-a-tool", f"{shape}; got {_kind(tool)}")
        return
    fn = tool.get("function")
    if tool.get("type") != "function" or not isinstance(fn, dict):
        what = (f'"type" is {tool.get("type")!r}' if tool.get("type") != "function"
                else '"function" is not an object')
        yield finding("error", base, "not-a-tool", f"{shape}; {what}")
        return
    if not isinstance(fn.get("name"), str):
        yield finding("error", f"{base}/function", "not-a-tool", 'function has no "name" string')
        return
    name = fn["name"]
    yield name, None
    if not NAME.match(name):
        yield finding("error", f"{base}/function/name", "name",
                      f"name {name!r} must be 1-64 characters of a-z A-Z 0-9 _ -")
    description = fn.get("description")
    if description is not None and not isinstance(description, str):
        yield finding("error", f"{base}/function/description", "not-a-tool", "description must be a string")
    elif not description:
        yield finding("warning", f"{base}/function", "description",
                      "no description: the model chooses tools by their descriptions")
    strict = fn.get("strict", False)
    if not isinstance(strict, bool):
        yield finding("error", f"{base}/function/strict", "not-a-tool", f"strict must be true or false, got {strict!r}")
        strict = False
    for key in sorted(set(fn) - {"name", "description", "parameters", "strict"}):
        yield finding("warning", f"{base}/function/{_escape(key)}", "unknown-key",
                      f"{key!r} is not a field of a function tool and will be ignored or refused")
    if "parameters" not in fn:
        if strict:
            yield finding("error", f"{base}/function", "strict-root",
                          "strict mode needs parameters: an object schema")
        return
    params = fn["parameters"]
    at = f"{base}/function/parameters"
    if not isinstance(params, dict):
        yield finding("error", at, "schema", f"parameters must be a JSON Schema object, got {_kind(params)}")
        return
    schema_problems = list(_schema_findings(params, at))
    for pointer, rule, message in schema_problems:
        yield finding("error", pointer, rule, message)
    severity = "error" if strict else "warning"
    suffix = "" if strict else " (a warning: the tool is not marked strict)"
    for pointer, rule, message in strict_mode_problems(params, at):
        yield finding(severity, pointer, rule, message + suffix)


def _schema_findings(params: dict, at: str) -> Iterator[tuple[str, str, str]]:
    """Validity by the schema's own dialect ($schema, default 2020-12), then the fast engine."""
    cls = jsonschema.validators.validator_for(params, default=None)
    if cls is None and "$schema" in params:
        yield f"{at}/$schema", "schema", f"unknown $schema {params['$schema']!r}"
        return
    cls = cls or jsonschema.Draft202012Validator
    meta = cls(cls.META_SCHEMA, format_checker=cls.FORMAT_CHECKER)
    errors = sorted(meta.iter_errors(params), key=lambda e: list(map(str, e.absolute_path)))
    for err in errors[:MAX_SCHEMA_ERRORS]:
        yield at + _pointer(err.absolute_path), "schema", f"not a valid JSON Schema: {err.message}"
    if errors:
        return
    try:
        jsonschema_rs.validator_for(params, validate_formats=True, offline=True)
    except Exception as exc:  # noqa: BLE001 - the engine's refusal is the finding
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        yield at, "schema-compile", f"the validator cannot compile this schema: {first}"


# --- strict mode -----------------------------------------------------------------------------

def strict_mode_problems(params: dict, at: str = "") -> list[tuple[str, str, str]]:
    """(pointer, rule, message) for everything OpenAI strict mode would refuse in `params`."""
    problems: list[tuple[str, str, str]] = []
    if params.get("type") != "object":
        problems.append((at, "strict-root", ('the root of parameters must be {"type": "object"} (not anyOf, '
                                            "not a union)")))
    counts = {"properties": 0, "enum": 0}
    _walk_strict(params, at, 1, True, problems, counts)
    if counts["properties"] > STRICT_MAX_PROPERTIES:
        problems.append((at, "strict-limits", (f"{counts['properties']} properties in all; strict mode allows "
                                              f"{STRICT_MAX_PROPERTIES}")))
    if counts["enum"] > STRICT_MAX_ENUM_VALUES:
        problems.append((at, "strict-limits", (f"{counts['enum']} enum values in all; strict mode allows "
                                              f"{STRICT_MAX_ENUM_VALUES}")))
    return problems


def _walk_strict(schema: Any, at: str, depth: int, root: bool, out: list, counts: dict[str, int]) -> None:
    if not isinstance(schema, dict):
        if schema is not False or not at.endswith("/additionalProperties"):
            out.append((at, "strict-keyword", "boolean schemas are not supported in strict mode"))
        return
    allowed = STRICT_ROOT_KEYWORDS if root else STRICT_KEYWORDS
    for key in schema:
        if key not in allowed:
            out.append((f"{at}/{_escape(key)}", "strict-keyword", f"{key!r} is not supported in strict mode"))
    fmt = schema.get("format")
    if isinstance(fmt, str) and fmt not in STRICT_FORMATS:
        out.append((f"{at}/format", "strict-format",
                    f"format {fmt!r} is not supported in strict mode (supported: {', '.join(sorted(STRICT_FORMATS))})"))
    ref = schema.get("$ref")
    if isinstance(ref, str) and not ref.startswith("#"):
        out.append((f"{at}/$ref", "strict-ref", f"$ref {ref!r} is not local; strict mode resolves only '#...'"))
    if isinstance(schema.get("enum"), list):
        counts["enum"] += len(schema["enum"])

    types = schema.get("type")
    types = types if isinstance(types, list) else [types]
    props = schema.get("properties")
    if "object" in types or isinstance(props, dict):
        props = props if isinstance(props, dict) else {}
        counts["properties"] += len(props)
        if depth > STRICT_MAX_DEPTH:
            out.append((at, "strict-limits", (f"objects nest {depth} levels deep; strict mode allows "
                                             f"{STRICT_MAX_DEPTH}")))
        if schema.get("additionalProperties") is not False:
            out.append((at, "strict-additional-properties",
                        'every object needs "additionalProperties": false in strict mode'))
        required = schema.get("required", [])
        required = required if isinstance(required, list) else []
        missing = [p for p in props if p not in required]
        if missing:
            out.append((f"{at}/required" if "required" in schema else at, "strict-required",
                        (f"every property must be required in strict mode; not required: {', '.join(missing)} "
                        '(make optional ones nullable, e.g. "type": ["string", "null"])')))
        unknown = [r for r in required if isinstance(r, str) and r not in props]
        if unknown:
            out.append((f"{at}/required", "strict-required",
                        f"required names no property: {', '.join(unknown)}"))
        for key, sub in props.items():
            _walk_strict(sub, f"{at}/properties/{_escape(key)}", depth + 1, False, out, counts)
    items = schema.get("items")
    if isinstance(items, (dict, bool)):
        _walk_strict(items, f"{at}/items", depth, False, out, counts)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        _walk_strict(extra, f"{at}/additionalProperties", depth, False, out, counts)
    branches = schema.get("anyOf")
    for i, sub in enumerate(branches if isinstance(branches, list) else []):
        _walk_strict(sub, f"{at}/anyOf/{i}", depth, False, out, counts)
    for group in ("$defs", "definitions"):
        defs = schema.get(group)
        if isinstance(defs, dict):
            for key, sub in defs.items():
                _walk_strict(sub, f"{at}/{group}/{_escape(key)}", depth, False, out, counts)


# --- small formatting ------------------------------------------------------------------------

def _escape(part: Any) -> str:
    return str(part).replace("~", "~0").replace("/", "~1")


def _pointer(path: Iterable[Any]) -> str:
    return "".join(f"/{_escape(p)}" for p in path)


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)
