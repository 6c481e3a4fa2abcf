"""`agent-dpo bench toolcheck`: the project's full tool-call check (parse, look up the offered tool,
validate, verdict) against jsonschema-rs on the same realistic calls, built from the example
agents' catalog (about a fifth of them invalid). Last line: the ratio to jsonschema-rs.
Failure reasons are built when first read; one line shows the cost when every one is read."""

from __future__ import annotations

import argparse
import functools
import json
import random
import string
import time
from collections.abc import Callable
from typing import Any

from agent_dpo.errors import UsageError
from agent_dpo.toolcheck import ToolChecker, catalog_dir, load_tool_catalog

Call = tuple[list[dict], str, str]  # (tools offered, tool name, arguments text)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("toolcheck", help="tool-call checking vs jsonschema-rs",
                                   description=__doc__)
    parser.add_argument("--calls", type=int, default=20000, help="tool calls to build (default 20000)")
    parser.add_argument("--rounds", type=int, default=9,
                        help="timed passes; each chunk of calls counts at its best (default 9)")
    parser.add_argument("--invalid-share", type=float, default=0.2, help="share of invalid calls (default 0.2)")
    parser.add_argument("--seed", type=int, default=7)
    parser.set_defaults(func=run)


# --- realistic calls -------------------------------------------------------------------------

def sample_regex(pattern: str, rng: random.Random) -> str:
    """A string matching `pattern`, for the simple patterns tool schemas use (classes, repeats,
    groups, alternation, anchors)."""
    def emit(items: Any) -> str:
        out = []
        for op, arg in items:
            name = str(op)
            if name == "LITERAL":
                out.append(chr(arg))
            elif name == "IN":
                out.append(pick_class(arg))
            elif name == "ANY":
                out.append(rng.choice(string.ascii_letters))
            elif name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
                lo, hi, sub = arg
                hi = min(hi, lo + 8)
                out.extend(emit(sub) for _ in range(rng.randint(lo, hi)))
            elif name == "SUBPATTERN":
                out.append(emit(arg[-1]))
            elif name == "BRANCH":
                out.append(emit(rng.choice(arg[1])))
            elif name == "AT":
                continue
            else:
                raise ValueError(f"pattern {pattern!r}: {name} is beyond this sampler")
        return "".join(out)

    def pick_class(items: Any) -> str:
        choices: list[str] = []
        for op, arg in items:
            name = str(op)
            if name == "LITERAL":
                choices.append(chr(arg))
            elif name == "RANGE":
                choices.extend(chr(c) for c in range(arg[0], arg[1] + 1))
            elif name == "CATEGORY" and str(arg) == "CATEGORY_DIGIT":
                choices.extend(string.digits)
            elif name == "CATEGORY" and str(arg) == "CATEGORY_WORD":
                choices.extend(string.ascii_letters + string.digits + "_")
            else:
                raise ValueError(f"pattern {pattern!r}: class item {name} is beyond this sampler")
        return rng.choice(choices)

    return emit(_parsed(pattern))


@functools.lru_cache(maxsize=256)
def _parsed(pattern: str) -> Any:
    from re import _parser as sre_parse  # the stdlib's own regex parser: exact, no guessing

    return sre_parse.parse(pattern)


_WORDS = ("Maria", "Lopez", "Tuesday", "afternoon", "color", "refresh", "please", "call", "back",
          "allergic", "to", "latex", "running", "late", "prefers", "window", "seat")


def sample_arguments(schema: dict, rng: random.Random, root: dict | None = None) -> Any:
    """A value valid under `schema`, for the subset of JSON Schema the catalog uses."""
    root = root or schema
    if "$ref" in schema:
        target: Any = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            target = target[part] if part else target
        return sample_arguments(target, rng, root)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return rng.choice(schema["enum"])
    if "anyOf" in schema:
        return sample_arguments(rng.choice(schema["anyOf"]), rng, root)
    types = schema.get("type", "object")
    types = types if isinstance(types, list) else [types]
    # Nullable fields are null a quarter of the time, as a model filling optional slots would.
    concrete = [t for t in types if t != "null"]
    kind = "null" if not concrete or ("null" in types and rng.random() < 0.25) else rng.choice(concrete)
    if kind == "null":
        return None
    if kind == "object":
        return {k: sample_arguments(sub, rng, root) for k, sub in schema.get("properties", {}).items()}
    if kind == "array":
        lo, hi = schema.get("minItems", 0), min(schema.get("maxItems", 4), schema.get("minItems", 0) + 4)
        return [sample_arguments(schema.get("items", {}), rng, root) for _ in range(rng.randint(lo, hi))]
    if kind == "integer":
        step = schema.get("multipleOf", 1)
        lo, hi = schema.get("minimum", 0), schema.get("maximum", 100)
        return rng.randrange(-(-lo // step) * step, hi + 1, step)
    if kind == "number":
        return round(rng.uniform(schema.get("minimum", 0), schema.get("maximum", 100)), 2)
    if kind == "boolean":
        return rng.random() < 0.5
    if "pattern" in schema:
        return sample_regex(schema["pattern"], rng)
    if schema.get("format") == "email":
        return f"{rng.choice(_WORDS).lower()}.{rng.randint(1, 999)}@example.com"
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 12)))


def _break(args: dict, schema: dict, rng: random.Random) -> tuple[str | None, str]:
    """Turn valid arguments into one of the failures models really make: (new name or None, text)."""
    props = schema.get("properties", {})
    kind = rng.choice(["invalid_json", "nan", "not_object", "unknown_tool", "missing", "extra", "type",
                       "enum", "pattern", "pattern"])
    if kind == "invalid_json":
        text = json.dumps(args)
        return None, text[: rng.randint(1, len(text) - 1)]
    if kind == "nan":
        return None, json.dumps({**args, next(iter(props)): float("nan")})
    if kind == "not_object":
        return None, json.dumps(list(args.values()))
    if kind == "unknown_tool":
        return "search_calendar", json.dumps(args)
    if kind == "missing" and args:
        del args[rng.choice(sorted(args))]
    elif kind == "extra":
        args["confirmed_by_caller"] = True
    elif kind == "enum" and any("enum" in s for s in props.values()):
        args[rng.choice([k for k, s in props.items() if "enum" in s])] = "asap"
    elif kind == "pattern" and any("pattern" in s for s in props.values()):
        args[rng.choice([k for k, s in props.items() if "pattern" in s])] = "12/08"
    else:  # "type", and the fallback when the schema has no enum or pattern at the top
        key = rng.choice(sorted(props))
        args[key] = 42 if props[key].get("type") != "integer" else "forty-two"
    return None, json.dumps(args)


def build_calls(n: int, seed: int = 7, invalid_share: float = 0.2) -> list[Call]:
    """`n` tool calls over both example agents. Each agent's tools list is one object, as a
    runtime holding its tool list (or a call's `tools`, fetched once) would pass it."""
    rng = random.Random(seed)
    agents = [load_tool_catalog(folder) for folder in sorted(p for p in catalog_dir().iterdir() if p.is_dir())]
    calls: list[Call] = []
    for _ in range(n):
        tools = rng.choice(agents)
        fn = rng.choice(tools)["function"]
        args = sample_arguments(fn["parameters"], rng)
        name, text = fn["name"], json.dumps(args)
        if rng.random() < invalid_share:
            renamed, text = _break(args, fn["parameters"], rng)
            name = renamed or name
        calls.append((tools, name, text))
    return calls


# --- the contenders --------------------------------------------------------------------------

def _validators(calls: list[Call], compile_one: Callable[[dict], Any]) -> dict[str, Any]:
    return {t["function"]["name"]: compile_one(t["function"]["parameters"])
            for tools in {id(c[0]): c[0] for c in calls}.values() for t in tools}


def contenders(chunks: list[list[Call]]) -> dict[str, Callable[[list[Call]], None]]:
    """Each contender runs over one chunk of calls (one of `chunks`, which it may prepare for)."""
    import jsonschema
    import jsonschema_rs

    calls = [c for chunk in chunks for c in chunk]
    rs = _validators(calls, lambda s: jsonschema_rs.validator_for(s, validate_formats=True).is_valid)
    parsed: dict[int, list[tuple[Any, Any]]] = {}  # id(chunk) -> (validator, value), built untimed
    for chunk in chunks:
        parsed[id(chunk)] = []
        for _tools, name, text in chunk:
            try:
                parsed[id(chunk)].append((rs.get(name), json.loads(text)))
            except ValueError:
                pass  # text that does not parse never reaches a validator

    def rs_preparsed(chunk: list[Call]) -> None:
        for is_valid, value in parsed[id(chunk)]:
            if is_valid is not None:
                is_valid(value)

    # The anchor parses with the stdlib's C scanner directly, as the full path does, so the
    # ratio measures the project's own overhead rather than a json.loads detour.
    scan, decode = json.JSONDecoder().scan_once, json.JSONDecoder().decode

    def rs_scan(calls: list[Call]) -> None:
        get = rs.get
        for _tools, name, text in calls:
            try:
                try:
                    value, end = scan(text, 0)
                except StopIteration:  # leading whitespace or nothing at all: let decode() judge
                    end = -1
                if end != len(text):
                    value = decode(text)
            except ValueError:
                continue
            is_valid = get(name)
            if is_valid is not None:
                is_valid(value)

    checker = ToolChecker()

    def full(calls: list[Call]) -> None:
        check = checker.check
        for tools, name, text in calls:
            check(tools, name, text)

    explaining = ToolChecker()

    def full_explained(calls: list[Call]) -> None:
        check = explaining.check
        for tools, name, text in calls:
            check(tools, name, text).reason  # noqa: B018 - reading it is the point

    fresh = ToolChecker()

    def full_fresh_lists(calls: list[Call]) -> None:
        # Every call brings its own copy of the tools list, as `Call.tools` rebuilds it per access.
        check = fresh.check
        for tools, name, text in calls:
            check(list(tools), name, text)

    py = _validators(calls, lambda s: jsonschema.Draft202012Validator(
        s, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER).is_valid)
    out = {
        "jsonschema-rs is_valid, arguments pre-parsed": rs_preparsed,
        "jsonschema-rs C-scanner parse + is_valid (anchor)": rs_scan,
        "jsonschema-rs json.loads + is_valid": _parse_then(rs),
        "agent-dpo check, full path": full,
        "agent-dpo check, every failure's reason read": full_explained,
        "agent-dpo check, a new tools list per call": full_fresh_lists,
        "jsonschema Draft202012Validator json.loads + is_valid": _parse_then(py),
    }
    try:
        import fastjsonschema
    except ImportError:
        return out
    fj = _validators(calls, lambda s: fastjsonschema.compile(s, formats={}))

    def fj_valid(validate: Callable) -> Callable[[Any], bool]:
        def is_valid(value: Any) -> bool:
            try:
                validate(value)
                return True
            except fastjsonschema.JsonSchemaException:
                return False
        return is_valid

    out["fastjsonschema json.loads + validate"] = _parse_then({k: fj_valid(v) for k, v in fj.items()})
    return out


def _parse_then(validators: dict[str, Callable[[Any], bool]]) -> Callable[[list[Call]], None]:
    def run_all(calls: list[Call]) -> None:
        for _tools, name, text in calls:
            try:
                value = json.loads(text)
            except ValueError:
                continue
            is_valid = validators.get(name)
            if is_valid is not None:
                is_valid(value)
    return run_all


# Slow contenders run on a share of the chunks; rates are per call either way.
_SHARE = {"jsonschema Draft202012Validator json.loads + is_valid": 0.05,
          "agent-dpo check, a new tools list per call": 0.1,
          "agent-dpo check, every failure's reason read": 0.1}
CHUNK = 500


def measure(calls: list[Call], rounds: int) -> dict[str, float]:
    """Calls per second for each contender. The calls are cut into chunks of CHUNK; every round
    times each contender on each chunk in turn, and a chunk counts at its fastest round. On a
    machine shared with others, a burst of load then spoils one sample, not a contender's result."""
    chunks = [calls[i:i + CHUNK] for i in range(0, len(calls), CHUNK)]
    runners = contenders(chunks)
    best: dict[str, list[float]] = {}
    for name, fn in runners.items():
        mine = chunks[: max(1, round(len(chunks) * _SHARE.get(name, 1.0)))]
        fn(mine[0])  # warm-up: compile, fill caches
        best[name] = [float("inf")] * len(mine)
    for _ in range(rounds):
        for i, chunk in enumerate(chunks):
            for name, fn in runners.items():
                if i < len(best[name]):
                    start = time.perf_counter()
                    fn(chunk)
                    best[name][i] = min(best[name][i], time.perf_counter() - start)
    return {name: sum(len(c) for c in chunks[: len(times)]) / sum(times) for name, times in best.items()}


def run(args: argparse.Namespace) -> int:
    if args.calls < 1 or args.rounds < 1 or not 0 <= args.invalid_share <= 1:
        raise UsageError("--calls and --rounds must be at least 1, --invalid-share between 0 and 1")
    calls = build_calls(args.calls, args.seed, args.invalid_share)
    checker = ToolChecker()
    invalid = sum(not checker.check(*c).ok for c in calls)
    print(f"{len(calls)} tool calls over {len({id(c[0]) for c in calls})} agents' catalogs, "
          f"{invalid} invalid ({invalid / len(calls):.0%}); best of {args.rounds} rounds per chunk of {CHUNK}")
    rates = measure(calls, args.rounds)
    width = max(map(len, rates))
    for name, rate in rates.items():
        print(f"  {name:<{width}}  {rate:>12,.0f} calls/s  {1e6 / rate:8.2f} us/call")
    anchor = rates["jsonschema-rs C-scanner parse + is_valid (anchor)"]
    full = rates["agent-dpo check, full path"]
    print(f"  (full path vs jsonschema-rs on pre-parsed arguments: "
          f"{full / rates['jsonschema-rs is_valid, arguments pre-parsed']:.2f}; arguments arrive as JSON text, "
          "so the anchor parses them too)")
    print(f"toolcheck: ratio {full / anchor:.2f} vs jsonschema-rs")
    return 0
