"""`agent-dpo tools check`: the example catalog passes; each lint rule fails on a focused case
naming the file, the tool, the JSON pointer and the reason; exit codes 0/1/2 and `--json`."""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_dpo.cli import main
from agent_dpo.toolcheck import catalog_dir
from agent_dpo.toollint import lint_paths, lint_tool

P = "/function/parameters"


def strict_tool(name: str = "find_slots", strict: bool = True, **schema_overrides) -> dict:
    params = {"type": "object",
              "properties": {"date": {"type": "string", "pattern": "^\\d{4}-\\d{2}-\\d{2}$"}},
              "required": ["date"], "additionalProperties": False}
    params.update(schema_overrides)
    return {"type": "function",
            "function": {"name": name, "description": "Find open slots.", "parameters": params, "strict": strict}}


def write(folder: Path, name: str, doc) -> Path:
    path = folder / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc), encoding="utf-8")
    return path


def findings(*paths):
    return [(f.severity, f.rule, f.pointer) for f in lint_paths(paths).findings]


def only(path, rule):
    """The single finding of `rule` for `path`, asserting it names file and tool."""
    found = [f for f in lint_paths([path]).findings if f.rule == rule]
    assert len(found) == 1, lint_paths([path]).findings
    assert found[0].file == str(path)
    return found[0]


def test_the_example_catalog_is_clean(capsys):
    report = lint_paths([catalog_dir()])
    assert report.findings == [] and report.tools == 9 and report.files == 9
    assert main(["tools", "check", str(catalog_dir())]) == 0
    assert capsys.readouterr().out.strip() == "checked 9 tools in 9 files: 0 errors, 0 warnings"


def test_a_clean_strict_tool_has_no_findings(tmp_path):
    assert findings(write(tmp_path, "t.json", strict_tool())) == []


def test_a_tool_offered_at_runtime_can_be_linted_without_a_file():
    name, found = lint_tool(strict_tool(additionalProperties=True))
    assert name == "find_slots"
    assert [(f.file, f.pointer, f.rule) for f in found] == [("<tool>", P, "strict-additional-properties")]


def test_a_file_that_is_not_json(tmp_path):
    f = only(write(tmp_path, "t.json", '{"type": "function",'), "not-json")
    assert (f.severity, f.tool, f.pointer) == ("error", None, "")
    assert "line 1 column 21" in f.message


@pytest.mark.parametrize("doc,fragment", [
    ({"type": "retrieval"}, "\"type\" is 'retrieval'"),
    ([1], "got a number"),
    ({"type": "function", "function": "find_slots"}, '"function" is not an object'),
    ({"type": "function", "function": {"description": "no name"}}, 'no "name"'),
    ([], "empty list"),
])
def test_files_that_are_not_tool_shaped(tmp_path, doc, fragment):
    f = only(write(tmp_path, "t.json", doc), "not-a-tool")
    assert f.severity == "error" and fragment in f.message


def test_tool_names_must_match_the_openai_pattern(tmp_path):
    f = only(write(tmp_path, "t.json", strict_tool(name="find slots")), "name")
    assert (f.severity, f.tool, f.pointer) == ("error", "find slots", "/function/name")
    assert only(write(tmp_path, "u.json", strict_tool(name="x" * 65)), "name").severity == "error"


def test_duplicate_names_across_paths(tmp_path):
    (tmp_path / "a").mkdir()
    first = write(tmp_path / "a", "one.json", strict_tool())
    second = write(tmp_path, "two.json", [strict_tool(name="book_slot"), strict_tool()])
    report = lint_paths([first, second])
    dup = [f for f in report.findings if f.rule == "duplicate-name"]
    assert len(dup) == 1
    assert (dup[0].file, dup[0].tool, dup[0].pointer) == (str(second), "find_slots", "/1/function/name")
    assert str(first) in dup[0].message


def test_parameters_must_be_a_valid_json_schema(tmp_path):
    tool = strict_tool()
    tool["function"]["parameters"]["properties"]["date"]["type"] = "strin"
    f = only(write(tmp_path, "t.json", tool), "schema")
    assert (f.severity, f.tool, f.pointer) == ("error", "find_slots", f"{P}/properties/date/type")
    assert "not a valid JSON Schema" in f.message


def test_a_pattern_that_is_not_a_regex_is_a_schema_error(tmp_path):
    tool = strict_tool()
    tool["function"]["parameters"]["properties"]["date"]["pattern"] = "^(\\d{4}"
    f = only(write(tmp_path, "t.json", tool), "schema")
    assert f.pointer == f"{P}/properties/date/pattern" and "regex" in f.message


def test_validity_follows_the_schemas_own_dialect(tmp_path):
    # Boolean exclusiveMinimum is draft-04; draft 2020-12 (the default) and draft-07 need a number.
    def tool(dialect):
        t = strict_tool()
        date = {"type": "integer", "minimum": 0, "exclusiveMinimum": True}
        t["function"]["parameters"]["properties"]["date"] = date
        if dialect:
            t["function"]["parameters"]["$schema"] = dialect
        return t

    draft4 = write(tmp_path, "d4.json", tool("http://json-schema.org/draft-04/schema#"))
    draft7 = write(tmp_path, "d7.json", tool("http://json-schema.org/draft-07/schema#"))
    default = write(tmp_path, "d.json", tool(None))
    assert [f for f in lint_paths([draft4]).findings if f.rule == "schema"] == []
    assert only(draft7, "schema").pointer == f"{P}/properties/date/exclusiveMinimum"
    assert only(default, "schema").pointer == f"{P}/properties/date/exclusiveMinimum"
    unknown = write(tmp_path, "x.json", tool("https://example.com/my-dialect"))
    f = only(unknown, "schema")
    assert f.pointer == f"{P}/$schema" and "unknown $schema" in f.message


def test_strict_objects_must_be_closed(tmp_path):
    f = only(write(tmp_path, "t.json", strict_tool(additionalProperties=True)), "strict-additional-properties")
    assert (f.severity, f.tool, f.pointer) == ("error", "find_slots", P)
    assert '"additionalProperties": false' in f.message


def test_strict_needs_every_property_required_at_every_depth(tmp_path):
    tool = strict_tool()
    params = tool["function"]["parameters"]
    params["properties"]["stylist"] = {"type": ["string", "null"]}
    params["properties"]["customer"] = {"type": "object", "properties": {"name": {"type": "string"}},
                                        "additionalProperties": False}
    params["required"] = ["date", "customer"]
    found = [f for f in lint_paths([write(tmp_path, "t.json", tool)]).findings if f.rule == "strict-required"]
    assert [(f.pointer, f.severity) for f in found] == [(f"{P}/required", "error"),
                                                       (f"{P}/properties/customer", "error")]
    assert "not required: stylist" in found[0].message and "not required: name" in found[1].message


def test_strict_refuses_unsupported_keywords_and_formats(tmp_path):
    tool = strict_tool()
    tool["function"]["parameters"]["properties"]["date"].update({"minLength": 10, "format": "uri"})
    path = write(tmp_path, "t.json", tool)
    keyword = only(path, "strict-keyword")
    assert keyword.pointer == f"{P}/properties/date/minLength" and "'minLength' is not supported" in keyword.message
    fmt = only(path, "strict-format")
    assert fmt.pointer == f"{P}/properties/date/format" and "'uri'" in fmt.message


def test_strict_root_must_be_an_object(tmp_path):
    tool = strict_tool()
    tool["function"]["parameters"] = {"anyOf": [{"type": "object", "properties": {},
                                                 "additionalProperties": False}, {"type": "null"}]}
    f = only(write(tmp_path, "t.json", tool), "strict-root")
    assert (f.severity, f.pointer) == ("error", P)


def test_strict_findings_are_warnings_when_the_tool_is_not_strict(tmp_path, capsys):
    loose = write(tmp_path, "t.json", strict_tool(strict=False, additionalProperties=True, required=[]))
    assert {(s, r) for s, r, _ in findings(loose)} == {("warning", "strict-additional-properties"),
                                                        ("warning", "strict-required")}
    assert main(["tools", "check", str(loose)]) == 0  # warnings alone pass
    out = capsys.readouterr().out
    assert f"{loose}: warning: tool 'find_slots' at {P}:" in out
    assert "0 errors, 2 warnings" in out


def test_missing_description_is_a_warning(tmp_path):
    tool = strict_tool()
    del tool["function"]["description"]
    f = only(write(tmp_path, "t.json", tool), "description")
    assert (f.severity, f.pointer) == ("warning", "/function")


def test_cli_exits_1_on_errors_and_prints_json(tmp_path, capsys):
    bad = write(tmp_path, "bad.json", strict_tool(name="find_slots_v2", additionalProperties=True))
    assert main(["tools", "check", "--json", str(bad), str(catalog_dir())]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["summary"] == {"ok": False, "files": 10, "tools": 10, "errors": 1, "warnings": 0}
    assert out["findings"] == [{"severity": "error", "file": str(bad), "tool": "find_slots_v2", "pointer": P,
                                "rule": "strict-additional-properties",
                                "message": 'every object needs "additionalProperties": false in strict mode'}]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "agent_dpo.cli", *args], check=False, capture_output=True,
                          text=True, timeout=120)


def test_cli_exit_codes_from_a_real_process(tmp_path):
    ok = run_cli("tools", "check", str(catalog_dir()))
    assert ok.returncode == 0, ok.stderr
    bad = run_cli("tools", "check", str(write(tmp_path, "t.json", "nope")))
    assert bad.returncode == 1 and "not-json" in bad.stdout and "Traceback" not in bad.stderr
    missing = run_cli("tools", "check", str(tmp_path / "missing.json"))
    assert missing.returncode == 2 and "no such file or folder" in missing.stderr
    assert missing.stderr.strip().count("\n") == 0
    assert run_cli("tools", "check").returncode == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli("tools", "check", str(empty)).returncode == 2


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["type", "function", "name", "parameters", "properties", "required", "strict",
                         "additionalProperties", "items", "anyOf", "$ref", "$schema", "pattern", "enum", "x"]),
        inner, max_size=4),
    max_leaves=15)


@settings(max_examples=150, deadline=None)
@given(_json)
def test_any_json_file_gives_findings_never_a_traceback(doc):
    with tempfile.TemporaryDirectory() as folder:
        path = write(Path(folder), "t.json", json.dumps(doc))
        report = lint_paths([path])
    assert report.files == 1
    assert all(f.severity in ("error", "warning") and f.message for f in report.findings)


def test_deeply_nested_definitions_are_an_error_not_a_crash(tmp_path):
    deep = write(tmp_path, "deep.json", "[" * 100_000 + "]" * 100_000)
    assert only(deep, "not-json").message == "not usable JSON: nested too deeply to read"
    # Readable JSON (under the parser's limit) whose schema is too deep for the schema checks.
    levels = 450
    schema = ('{"type": "object", "properties": {"a": ' * levels + '{"type": "string"}'
              + '}, "required": ["a"], "additionalProperties": false}' * levels)
    path = write(tmp_path, "nested.json",
                 '{"type": "function", "function": {"name": "deep", "description": "d", "strict": true, '
                 f'"parameters": {schema}}}}}')
    report = lint_paths([path])
    assert report.errors >= 1
    assert any(f.rule == "strict-limits" or "too deeply" in f.message for f in report.findings)
