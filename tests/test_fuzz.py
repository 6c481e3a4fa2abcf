"""Property-based fuzzing (hypothesis) of what parses outside input, beside the event parser's own
fuzzing in test_events_fuzz.py: tool definitions (toollint), tool-call arguments (toolcheck), config
files and environment (config.load_settings) and CLI arguments. Random JSON, huge strings, deep
nesting, invalid UTF-8, NaN and Infinity, numbers as strings, wrong types: every input is accepted as
the spec says or rejected with a reason; never a traceback, a hang, or garbage accepted.

Each test counts its inputs into FUZZ_COUNTS; `-s` prints the totals."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_dpo.cli import build_parser, main
from agent_dpo.config import BusConfig, NatsAuth, Settings, load_settings
from agent_dpo.errors import AgentDpoError
from agent_dpo.toolcheck import CODES, catalog_dir, check_tool_call, load_tool_catalog
from agent_dpo.toollint import lint_paths, lint_tool

N = int(os.environ.get("AGENT_DPO_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=N, deadline=None, suppress_health_check=list(HealthCheck), database=None)
FUZZ_COUNTS: Counter = Counter()

json_scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
                | st.text(max_size=40) | st.sampled_from(["1", "2.5", "NaN", "-Infinity", "true", "", "\x00"]))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=25)


def nested(depth: int, leaf=None):
    value = leaf
    for i in range(depth):
        value = {"type": "object", "properties": {"x": value or {"type": "string"}}} if i % 2 else [value]
    return value


@pytest.fixture(scope="module", autouse=True)
def _print_counts():
    yield
    print("\nfuzz inputs tried:", dict(FUZZ_COUNTS), "total", sum(FUZZ_COUNTS.values()))


# ---- tool definitions -------------------------------------------------------------------------------

CATALOG = load_tool_catalog(catalog_dir() / "salon-rebook") + load_tool_catalog(catalog_dir() / "appointment-resolver")


def _schema_is_valid(schema) -> bool:
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
        return True
    except Exception:  # noqa: BLE001 - any refusal means invalid
        return False


def _check_lint(tool) -> None:
    name, findings = lint_tool(tool)
    assert name is None or isinstance(name, str)
    for f in findings:
        assert f.severity in ("error", "warning") and f.rule and f.message and isinstance(f.pointer, str)
    if not any(f.severity == "error" for f in findings):
        # Nothing invalid passes clean: a function tool with a name and a valid JSON Schema.
        assert isinstance(tool, dict) and tool.get("type") == "function", tool
        fn = tool["function"]
        assert isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"]
        assert "parameters" not in fn or _schema_is_valid(fn["parameters"]), fn.get("parameters")


def _mutate(tool: dict, path: list, value):
    """The catalog tool with the value at `path` replaced: near-valid definitions."""
    tool = json.loads(json.dumps(tool))
    node = tool
    for key in path[:-1]:
        node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            return tool
    node[path[-1]] = value
    return tool


PATHS = [["type"], ["function"], ["function", "name"], ["function", "description"], ["function", "parameters"],
         ["function", "strict"], ["function", "parameters", "type"], ["function", "parameters", "properties"],
         ["function", "parameters", "required"], ["function", "parameters", "additionalProperties"]]


@FUZZ
@given(json_values)
def test_lint_random_json_tools(tool):
    FUZZ_COUNTS["toollint"] += 1
    _check_lint(tool)


@FUZZ
@given(st.sampled_from(CATALOG), st.sampled_from(PATHS), json_values)
def test_lint_near_valid_tools(tool, path, value):
    FUZZ_COUNTS["toollint"] += 1
    _check_lint(_mutate(tool, path, value))


@pytest.mark.parametrize("depth", [50, 400, 5000])
def test_lint_deep_nesting_and_huge_strings(depth):
    FUZZ_COUNTS["toollint"] += 2
    tool = {"type": "function", "function": {"name": "deep", "parameters": nested(depth, {"type": "string"})}}
    _check_lint(tool)
    huge = {"type": "function", "function": {"name": "n" * 100_000, "description": "d" * 2_000_000,
                                             "parameters": {"type": "object", "properties": {}}}}
    _check_lint(huge)


@settings(max_examples=max(N // 3, 20), deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(st.binary(max_size=300) | st.sampled_from([b"\xff\xfe{", b'{"type": "function", "function": {"name": "\xc3"}}',
                                                   b"[" * 100_000, b'{"a": NaN}']))
def test_lint_files_of_any_bytes(tmp_path_factory, data):
    FUZZ_COUNTS["toollint"] += 1
    path = tmp_path_factory.mktemp("lint") / "tool.json"
    path.write_bytes(data)
    report = lint_paths([path])
    if data and not data.isspace():
        assert report.findings or report.tools, data[:80]  # accepted as tools, or refused with a reason


# ---- tool-call arguments ----------------------------------------------------------------------------

def _reference_ok(tools, name: str, arguments: str) -> bool:
    """The verdict per the spec, from the reference `jsonschema` implementation."""
    def strict(text):
        return json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))

    try:
        value = strict(arguments)
    except (ValueError, RecursionError):
        return False
    tool = next((t for t in tools if t["function"]["name"] == name), None)
    if tool is None or not isinstance(value, dict):
        return False
    schema = tool["function"].get("parameters", {})
    return jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)(
        schema, format_checker=None).is_valid(value)


def _check_call(tools, name, arguments) -> None:
    verdict = check_tool_call(tools, name, arguments)
    assert verdict.ok == (verdict.code is None)
    if not verdict.ok:
        assert verdict.code in CODES and verdict.reason and len(verdict.reason) <= 2000
    assert verdict.ok == _reference_ok(tools, name, arguments), (name, arguments[:200], verdict)


TOOL_NAMES = sorted({t["function"]["name"] for t in CATALOG}) + ["no_such_tool", ""]


def _json_text(value) -> str:
    return json.dumps(value, allow_nan=True)


arguments_text = (
    st.text(max_size=200)
    | json_values.map(_json_text)
    | st.dictionaries(st.sampled_from(["date", "time", "slot_id", "service", "appointment_id", "reason",
                                       "phone", "name", "notes"]), json_scalars, max_size=6).map(_json_text)
    | st.sampled_from(['{"date": NaN}', '{"date": Infinity}', '{"n": -Infinity}', '{"date": "2026-12-08"}',
                       '{"date": 20261208}', '{"date": "20261208"}', '{"a": 1} trailing', ' {"a": 1}',
                       '{"a": "\\ud800"}', "[" * 3000 + "]" * 3000, '{"a": ' * 2000 + "1" + "}" * 2000,
                       '{"s": "' + "x" * 1_000_000 + '"}', "\ud800", '{"\x00": 1}'])
)


@FUZZ
@given(st.sampled_from(TOOL_NAMES), arguments_text)
def test_tool_call_arguments_match_the_reference_verdict(name, arguments):
    FUZZ_COUNTS["toolcheck"] += 1
    _check_call(CATALOG, name, arguments)


@FUZZ
@given(st.lists(json_values, max_size=3), st.text(max_size=20), arguments_text)
def test_tool_calls_against_garbage_tool_lists_never_crash(tools, name, arguments):
    FUZZ_COUNTS["toolcheck"] += 1
    verdict = check_tool_call(tools, name, arguments)
    assert verdict.ok == (verdict.code is None)
    assert verdict.ok or verdict.code in CODES


# ---- config files and environment -------------------------------------------------------------------

BUS_KEYS = [f for f in BusConfig.__dataclass_fields__]
NATS_KEYS = [f for f in NatsAuth.__dataclass_fields__]
toml_scalars = st.one_of(
    st.integers(min_value=-10**12, max_value=10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda f: "nan" if math.isnan(f) else
                                                        ("inf" if f == math.inf else "-inf" if f == -math.inf else repr(f))),
    st.text(max_size=30).map(json.dumps),
    st.booleans().map(lambda b: str(b).lower()),
    st.sampled_from(['"30"', '"nan"', '"inf"', '"1e400"', '["30", "60"]', "[nan]", "[inf, 1]", "[]", "[true]",
                     '"-1"', "1e400", "0", "-0.0", '"/etc/passwd"', '"\\u0000"', "{a = 1}", "1979-05-27T07:32:00Z"]),
)
toml_lines = st.tuples(st.sampled_from(BUS_KEYS + NATS_KEYS + ["unknown_key", "batch-size"]), toml_scalars)


def _toml(bus_lines, nats_lines, extra: str) -> str:
    bus = "\n".join(f"{k} = {v}" for k, v in bus_lines)
    nats = "\n".join(f"{k} = {v}" for k, v in nats_lines)
    return f"[bus]\n{bus}\n[nats]\n{nats}\n{extra}"


def _check_settings(loaded: Settings) -> None:
    """Accepted settings hold what BusConfig promises: finite, in range, consistent."""
    bus = loaded.bus
    numbers = [bus.duplicate_window_s, bus.fetch_timeout_s, bus.ack_wait_s, bus.nak_delay_s, bus.store_retry_s,
               bus.max_age_s, *bus.backoff_s]
    assert all(math.isfinite(x) for x in numbers), bus
    assert all(b >= bus.ack_wait_s for b in bus.backoff_s[:1]) and all(b > 0 for b in bus.backoff_s), bus
    assert 1 <= bus.batch_size <= bus.max_ack_pending and bus.max_deliver >= 2, bus


def _load(run) -> None:
    try:
        _check_settings(run())
    except AgentDpoError as exc:
        message = str(exc)
        assert message and "\n" not in message.strip() and "Traceback" not in message


@FUZZ
@given(st.lists(toml_lines, max_size=5), st.lists(toml_lines, max_size=3),
       st.sampled_from(["", "[other]\n", "bus = 1\n", "[bus.deep]\nx = 1\n", "[[bus]]\n"]))
def test_config_files_are_loaded_or_refused_in_one_line(tmp_path_factory, bus_lines, nats_lines, extra):
    FUZZ_COUNTS["config"] += 1
    path = tmp_path_factory.mktemp("cfg") / "agent-dpo.toml"
    path.write_text(_toml(bus_lines, nats_lines, extra), encoding="utf-8", errors="surrogatepass")
    _load(lambda: load_settings(path, env={}))


@settings(max_examples=max(N // 3, 20), deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(st.binary(max_size=400))
def test_config_files_of_any_bytes(tmp_path_factory, data):
    FUZZ_COUNTS["config"] += 1
    path = tmp_path_factory.mktemp("cfg") / "agent-dpo.toml"
    path.write_bytes(data)
    _load(lambda: load_settings(path, env={}))


env_values = st.text(max_size=30) | st.sampled_from(["nan", "inf", "-1", "1e400", "30,60", "30, nan", " ", "0x10",
                                                     "1_000", "true", "10.5", "\x00"])


@FUZZ
@given(st.dictionaries(st.sampled_from([f"AGENT_DPO_BUS_{k.upper()}" for k in BUS_KEYS]
                                       + [f"AGENT_DPO_NATS_{k.upper()}" for k in NATS_KEYS]), env_values, max_size=4))
def test_config_environment_is_loaded_or_refused_in_one_line(env):
    FUZZ_COUNTS["config"] += 1
    env = {k: v.replace("\x00", "") if "NATS" in k else v for k, v in env.items()}  # the OS forbids NUL in env
    _load(lambda: load_settings(None, env=env))


# ---- CLI arguments ----------------------------------------------------------------------------------

OFFLINE_VERBS = [["tools", "check"], ["pairs"], ["status"]]
NETWORK_VERBS = [["bus", "init"], ["ingest"], ["serve"], ["worker"], ["train"], ["eval"], ["registry", "status"],
                 ["registry", "promote"], ["demo"], ["bench", "ingest"]]
FLAGS = ["--agent", "--format", "--out", "--split", "--store", "--nats-url", "--until-idle", "--batch-size",
         "--json", "--no-redact", "--config", "--max-jobs", "--labelled-by", "--include-pairs", "--version", "-h",
         "--", "--log-level", "--backend"]
tokens = st.sampled_from(FLAGS) | st.text(max_size=20) | st.sampled_from(
    ["acme/salon", "a/b/c", "/", "trl-dpo", "csv", "-1", "0", "nan", "1e999", "all", "x" * 5000, "\udcff\udcfe"])


def _run_cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 2
    return code, err.getvalue()


@FUZZ
@given(st.sampled_from(OFFLINE_VERBS), st.lists(tokens, max_size=6))
def test_offline_verbs_exit_cleanly_on_any_arguments(tmp_path_factory, verb, rest):
    FUZZ_COUNTS["cli"] += 1
    store = tmp_path_factory.mktemp("store")
    argv = ["--log-format", "json", *verb, *rest]
    if "--store" not in rest:
        argv += ["--store", str(store)]
    if "--out" not in rest:
        argv += ["--out", str(store / "out.jsonl")] if verb == ["pairs"] else []
    code, err = _run_cli(argv)
    assert code in (0, 1, 2), (argv, code, err[-500:])
    if code:
        lines = [line for line in err.splitlines() if line.startswith("agent-dpo") or "error" in line]
        assert lines and "Traceback" not in err, (argv, err[-1000:])


@FUZZ
@given(st.sampled_from(NETWORK_VERBS), st.lists(tokens, max_size=6))
def test_every_verb_parses_or_refuses_in_one_line(verb, rest):
    """Verbs that reach NATS (or start servers) are fuzzed up to parsing: exit 2 with one line, or parsed."""
    FUZZ_COUNTS["cli"] += 1
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            build_parser().parse_args([*verb, *rest])
            return
        except SystemExit as exc:
            code = exc.code
    if "-h" in rest and code == 0:
        return
    text = err.getvalue()
    # One line of our own; the arguments it quotes are the user's and may hold line breaks themselves.
    own_breaks = text.count("\n") - sum(t.count("\n") for t in rest)
    assert code == 2 and text.startswith("agent-dpo") and own_breaks <= 1 and "usage:" not in text, \
        ([*verb, *rest], text[-500:])


@pytest.mark.parametrize("argv", [
    [b"pairs", b"--agent", b"\xff\xfe/x", b"--format", b"trl-dpo", b"--out", b"/tmp/x"],
    [b"tools", b"check", b"/no/such/\xc3"],
    [b"ingest", b"--until-idle", b"nan"],
    [b"status", b"--store", b"\xff"],
])
def test_cli_subprocess_with_invalid_utf8_arguments(tmp_path, argv):
    FUZZ_COUNTS["cli"] += 1
    proc = subprocess.run([sys.executable.encode(), b"-m", b"agent_dpo.cli", *argv], capture_output=True, check=False,
                          timeout=60, cwd=tmp_path, env={**os.environ, "AGENT_DPO_STORE": str(tmp_path / "s")})
    assert proc.returncode in (0, 1, 2), proc.stderr[-1000:]
    assert b"Traceback" not in proc.stderr, proc.stderr[-2000:]
    if proc.returncode:
        assert proc.stderr.strip().splitlines()[-1].startswith(b"agent-dpo"), proc.stderr[-500:]


def test_fuzz_counts_were_recorded():
    assert Path(__file__).exists()
