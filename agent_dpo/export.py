"""Exports: one agent's pairs and KTO examples (pairing.py) become a JSON Lines file in `trl-dpo`,
`trl-kto` or `openai-dpo` shape (spec/events-v1.md "Output formats"), with a `<out>.meta.json` beside
it. `agent-dpo pairs`, training and the demo all come through `export_dataset`.

On the way out, in this order: the split side is picked (train, test or all), messages are redacted
(default), rows are rendered, identical rows are kept once (sha256 of the row's canonical JSON without
`meta`), `caps` keep at most N rows of a signal or rater (a seeded draw, dropped as `capped`), and with
`length_balance` the length-bias tail is dropped (lengthbias.py). In `trl-kto`, an
example whose prompt and completion appear with both labels (a greeting turn of a well-rated and of a
badly rated call, say) drops as `conflicting_labels`.

Tool-call `arguments`: JSON text in `openai-dpo` (as OpenAI takes them), a JSON object in the trl
formats. Text that does not parse to a JSON object can only come from a message that is never
chosen or desirable (pairing drops those), i.e. a rejected/undesirable answer or an earlier turn of
the context; there it stays the raw string the model produced, so the malformed call is what the
model is taught away from. `datasets` loads such mixed columns as JSON values.

Every row has a `meta` object: call_id, signal, turn, event_ids, rater, split (and other_call_id for
`csat_prefix`, from_pair for pairs expanded into KTO rows). OpenAI's upload ignores it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent_dpo import __version__ as _version
from agent_dpo.calls import Call
from agent_dpo.lengthbias import LengthStats, balance, length_stats, message_length
from agent_dpo.pairing import (
    KTO_SIGNALS,
    PAIR_SIGNALS,
    Examples,
    KtoExample,
    Pair,
    PairingConfig,
    build_examples,
)
from agent_dpo.redaction import redact_message
from agent_dpo.split import DEFAULT_TEST_FRACTION, split_of
from agent_dpo.store import EventStore
from agent_dpo.toolcheck import parse_arguments

FORMATS = ("trl-dpo", "trl-kto", "openai-dpo")
SPLITS = ("train", "test", "all")
# TRL's KTO trainer warns unless desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
# lies in [1, 4/3] (KTO paper, eq. 8). We aim at the middle so rounding never pushes it out.
KTO_TARGET_RATIO = 7 / 6
DEFAULT_CONFIG = PairingConfig()


@dataclass
class ExportSummary:
    out: Path
    meta_path: Path
    format: str
    split: str
    rows: int
    counts_by_signal: dict[str, int]
    drops: dict[str, int]
    sha256: str
    meta: dict[str, Any] = field(repr=False)


def kto_weights(n_desirable: int, n_undesirable: int) -> dict[str, Any]:
    """Weights by TRL's ratio rule: desirable_weight*n_desirable / (undesirable_weight*n_undesirable)
    must lie in [1, 4/3]. When the counts already do, both weights stay 1; otherwise the larger side
    keeps weight 1 and the smaller is scaled up so the weighted ratio is 7/6, the middle of the range."""
    out: dict[str, Any] = {"n_desirable": n_desirable, "n_undesirable": n_undesirable,
                           "desirable_weight": 1.0, "undesirable_weight": 1.0, "rule": "trl-kto [1, 4/3]"}
    if n_desirable and n_undesirable:
        if 1.0 <= n_desirable / n_undesirable <= 4 / 3:
            pass  # already balanced enough: TRL's defaults of 1.0 apply
        elif n_desirable > n_undesirable:
            out["undesirable_weight"] = round(n_desirable / (n_undesirable * KTO_TARGET_RATIO), 4)
        else:
            out["desirable_weight"] = round(KTO_TARGET_RATIO * n_undesirable / n_desirable, 4)
        out["weighted_ratio"] = round(out["desirable_weight"] * n_desirable
                                      / (out["undesirable_weight"] * n_undesirable), 4)
    return out


# ---- shaping messages -------------------------------------------------------------------------------

def _object_arguments(message: dict[str, Any]) -> dict[str, Any]:
    if not message.get("tool_calls"):
        return message
    calls = []
    for tc in message["tool_calls"]:
        text = tc["function"]["arguments"]
        try:
            value = parse_arguments(text)
        except (ValueError, TypeError, RecursionError):
            value = text
        args = value if isinstance(value, dict) else text
        calls.append({**tc, "function": {**tc["function"], "arguments": args}})
    return {**message, "tool_calls": calls}


class _Shaper:
    """Redacts and reshapes each message once: prompts of one call share their message dicts, so
    caching by identity keeps the export linear in the distinct messages, not in prompt lengths."""

    def __init__(self, fmt: str, redact: bool) -> None:
        self.trl = fmt.startswith("trl")
        self.redact = redact
        self._cache: dict[int, tuple[dict, dict, dict]] = {}

    def _entry(self, message: dict[str, Any]) -> tuple[dict, dict, dict]:
        hit = self._cache.get(id(message))
        if hit is not None and hit[0] is message:
            return hit
        neutral = redact_message(message) if self.redact else message
        shaped = _object_arguments(neutral) if self.trl else neutral
        entry = self._cache[id(message)] = (message, neutral, shaped)
        return entry

    def one(self, message: dict[str, Any]) -> dict[str, Any]:
        return self._entry(message)[2]

    def many(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [self._entry(m)[2] for m in messages]

    def length(self, message: dict[str, Any]) -> int:
        return message_length(self._entry(message)[1])


def _canonical(row: dict[str, Any]) -> str:
    return json.dumps(row, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _pair_body(pair: Pair, fmt: str, shape: _Shaper) -> dict[str, Any]:
    if fmt == "openai-dpo":
        inp: dict[str, Any] = {"messages": shape.many(pair.prompt)}
        if pair.tools:
            inp["tools"] = pair.tools
        return {"input": inp, "preferred_output": [shape.one(pair.chosen)],
                "non_preferred_output": [shape.one(pair.rejected)]}
    row = {"prompt": shape.many(pair.prompt), "chosen": [shape.one(pair.chosen)],
           "rejected": [shape.one(pair.rejected)]}
    if pair.tools:
        row["tools"] = pair.tools
    return row


def _kto_row(prompt: list[dict], completion: dict, label: bool, tools: list[dict], shape: _Shaper,
             meta: dict[str, Any], signal: str) -> _Row:
    """A KTO row; `example_key` identifies it without its label, to find one example labelled both ways.
    The label goes first in the line (key order means nothing in JSON) so one serialization serves both."""
    rest: dict[str, Any] = {"prompt": shape.many(prompt), "completion": [shape.one(completion)]}
    if tools:
        rest["tools"] = tools
    text = _canonical(rest)
    body = '{"label":' + ("true" if label else "false") + "," + text[1:]
    return _Row(body, hashlib.sha256(body.encode()).hexdigest(), meta, signal, label=label,
                lengths=(shape.length(completion), 0), example_key=hashlib.sha256(text.encode()).hexdigest())


def _meta(item: Pair | KtoExample, **extra: Any) -> dict[str, Any]:
    meta = {"call_id": item.call_id, "signal": item.signal, "turn": item.turn,
            "event_ids": list(item.event_ids), "rater": item.rater, "split": item.side}
    if isinstance(item, Pair) and item.other_call_id:
        meta["other_call_id"] = item.other_call_id
    meta.update(extra)
    return meta


@dataclass
class _Row:
    body: str  # canonical JSON without meta
    digest: str
    meta: dict[str, Any]
    signal: str
    label: bool | None = None
    lengths: tuple[int, int] | None = None  # pairs: chosen, rejected chars; KTO: completion chars, 0
    example_key: str | None = None  # KTO: digest without the label

    def line(self) -> str:
        return self.body[:-1] + ',"meta":' + json.dumps(self.meta, ensure_ascii=False) + "}\n"


def _row(body: dict[str, Any], meta: dict[str, Any], signal: str, **kw: Any) -> _Row:
    text = _canonical(body)
    return _Row(text, hashlib.sha256(text.encode()).hexdigest(), meta, signal, **kw)


def _dedupe(rows: Iterable[_Row], drops: Counter) -> list[_Row]:
    seen: set[str] = set()
    kept = []
    for row in rows:
        if row.digest in seen:
            drops["duplicate"] += 1
            continue
        seen.add(row.digest)
        kept.append(row)
    return kept


def _drop_conflicting_labels(rows: list[_Row], drops: Counter) -> list[_Row]:
    """The same prompt and completion labelled desirable by one signal and undesirable by another
    teaches nothing but noise (typically a greeting turn credited by good and bad CSAT calls alike):
    every copy drops as `conflicting_labels`."""
    labels: dict[str, set[bool]] = {}
    for row in rows:
        labels.setdefault(row.example_key, set()).add(row.label)
    kept = [r for r in rows if len(labels[r.example_key]) == 1]
    drops["conflicting_labels"] += len(rows) - len(kept)
    return kept


def parse_cap(text: str) -> tuple[str, int]:
    """`signal:NAME=N` or `rater:NAME=N` -> ("signal:NAME", N); a ValueError says what is wrong."""
    key, sep, count = text.rpartition("=")
    kind, colon, name = key.partition(":")
    if not sep or not colon or kind not in ("signal", "rater") or not name:
        raise ValueError(f"cap {text!r} is not signal:NAME=N or rater:NAME=N")
    try:
        n = int(count)
    except ValueError:
        raise ValueError(f"cap {text!r}: {count!r} is not a whole number") from None
    if n < 0:
        raise ValueError(f"cap {text!r}: N must be 0 or more")
    if kind == "signal" and name not in PAIR_SIGNALS + KTO_SIGNALS:
        raise ValueError(f"cap {text!r}: unknown signal {name!r}; known: {', '.join(PAIR_SIGNALS + KTO_SIGNALS)}")
    return key, n


def _apply_caps(rows: list[_Row], caps: Mapping[str, int], seed: int, drops: Counter) -> list[_Row]:
    """Keep at most N rows of each capped signal or rater, chosen by a seeded hash of the row (the same
    rows for the same data and seed, whatever their order), in file order. A row matching two caps
    counts against the first one given."""
    if not caps:
        return rows
    groups: dict[str, list[int]] = {key: [] for key in caps}
    for i, row in enumerate(rows):
        for key in caps:
            kind, _, name = key.partition(":")
            if (row.signal if kind == "signal" else row.meta.get("rater")) == name:
                groups[key].append(i)
                break
    dropped: set[int] = set()
    for key, members in groups.items():
        ranked = sorted(members, key=lambda i: hashlib.sha256(f"{seed}:{rows[i].digest}".encode()).hexdigest())
        dropped.update(ranked[caps[key]:])
    drops["capped"] += len(dropped)
    return [row for i, row in enumerate(rows) if i not in dropped]


def _balance_pairs(pairs: list[Pair], keys: list[str], shape: _Shaper,
                   drops: Counter) -> tuple[list[Pair], LengthStats]:
    lengths = [(shape.length(p.chosen), shape.length(p.rejected)) for p in pairs]
    dropped = balance(lengths, keys)
    drops["length_balance"] += len(dropped)
    kept = [p for i, p in enumerate(pairs) if i not in dropped]
    return kept, length_stats([x for i, x in enumerate(lengths) if i not in dropped])


# ---- the export -------------------------------------------------------------------------------------

def export_calls(calls: Iterable[Call], tenant_id: str, agent_id: str, fmt: str, out: str | Path, *,
                 split: str = "train", redact: bool = True, length_balance: bool = False,
                 include_pairs: bool = False, test_fraction: float = DEFAULT_TEST_FRACTION,
                 config: PairingConfig = DEFAULT_CONFIG, labelled_by: Any = None,
                 store_event_range: tuple[int, int] | None = None,
                 signals: Collection[str] = (), raters: Collection[str] = (),
                 caps: Mapping[str, int] | None = None, cap_seed: int = 0) -> ExportSummary:
    """Build, select, redact, dedupe and write; the store-free core of `export_dataset`. With `signals`
    or `raters`, only examples whose signal is one of `signals` or whose rater is one of `raters` are
    written (for example one side-by-side campaign's pairs plus every schema retry). `caps` maps
    "signal:NAME" or "rater:NAME" to the most rows of that kind to keep (a mix weighted toward one
    campaign); `cap_seed` picks which."""
    caps = dict(caps or {})
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    out = Path(out)
    examples = build_examples(
        calls, tenant_id, agent_id, config,
        side_of=lambda call: split_of(tenant_id, agent_id, call.call_id, test_fraction))

    def on_side(call_id: str, side: str | None = None) -> bool:
        if split == "all":
            return True
        return (side or split_of(tenant_id, agent_id, call_id, test_fraction)) == split

    def selected(item: Pair | KtoExample) -> bool:
        return not (signals or raters) or item.signal in signals or item.rater in raters

    pairs = [p for p in examples.pairs if on_side(p.call_id, p.side) and selected(p)]
    kto = [k for k in examples.kto if on_side(k.call_id, k.side) and selected(k)]
    # Drops of the signals this file could have held (and whole calls): a CSAT drop says nothing
    # about a DPO file.
    wanted = {"call", *(PAIR_SIGNALS if fmt != "trl-kto" or include_pairs else ()),
              *(KTO_SIGNALS if fmt == "trl-kto" else ())}
    drops: Counter = Counter(d.reason for d in examples.drops if d.signal in wanted and on_side(d.call_id))
    shape = _Shaper(fmt, redact)
    pair_lengths = [(shape.length(p.chosen), shape.length(p.rejected)) for p in pairs]
    length_before = length_stats(pair_lengths)

    if fmt in ("trl-dpo", "openai-dpo"):
        rows = _dedupe((_row(_pair_body(p, fmt, shape), _meta(p), p.signal, lengths=lens)
                        for p, lens in zip(pairs, pair_lengths)), drops)
        rows = _apply_caps(rows, caps, cap_seed, drops)
        if length_balance:
            dropped = balance([r.lengths for r in rows], [r.digest for r in rows])
            drops["length_balance"] += len(dropped)
            rows = [r for i, r in enumerate(rows) if i not in dropped]
        length_after = length_stats([r.lengths for r in rows])
        kto_counts = Counter(k.label for k in kto)
        weights = kto_weights(kto_counts[True], kto_counts[False])
        weights["applies_to"] = "the trl-kto export of this split (counted before de-duplication)"
    else:
        if include_pairs and length_balance:
            pairs, _ = _balance_pairs(pairs, [f"{p.call_id}/{p.signal}/{p.turn}" for p in pairs], shape, drops)
        candidates = [_kto_row(k.prompt, k.completion, k.label, k.tools, shape, _meta(k), k.signal) for k in kto]
        if include_pairs:
            for p in pairs:
                candidates.append(_kto_row(p.prompt, p.chosen, True, p.tools, shape,
                                           _meta(p, from_pair="chosen"), p.signal))
                candidates.append(_kto_row(p.prompt, p.rejected, False, p.tools, shape,
                                           _meta(p, from_pair="rejected"), p.signal))
        rows = _apply_caps(_drop_conflicting_labels(_dedupe(candidates, drops), drops), caps, cap_seed, drops)
        length_after = length_stats([(shape.length(p.chosen), shape.length(p.rejected)) for p in pairs]
                                    if include_pairs else [])
        labels = Counter(r.label for r in rows)
        weights = kto_weights(labels[True], labels[False])
        weights["completion_mean_chars"] = {
            name: round(sum(r.lengths[0] for r in rows if r.label is want) / max(labels[want], 1), 2)
            for name, want in (("desirable", True), ("undesirable", False))}

    digest = _write(out, rows)
    counts = dict(sorted(Counter(r.signal for r in rows).items()))
    meta = _export_meta(examples, tenant_id, agent_id, fmt, split, test_fraction, redact, config, out,
                        rows, counts, drops, digest, length_before, length_after, length_balance,
                        include_pairs, weights, labelled_by, store_event_range)
    if signals or raters:
        meta["selected"] = {"signals": sorted(signals), "raters": sorted(raters)}
    if caps:
        meta["caps"] = {"max_rows": dict(caps), "seed": cap_seed}
    meta_path = out.with_name(out.name + ".meta.json")
    _atomic_write(meta_path, (json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode())
    return ExportSummary(out, meta_path, fmt, split, len(rows), counts,
                         dict(sorted((k, v) for k, v in drops.items() if v)), digest, meta)


def export_dataset(store: EventStore, tenant_id: str, agent_id: str, fmt: str, out: str | Path, *,
                   split: str = "train", redact: bool = True, length_balance: bool = False,
                   include_pairs: bool = False, test_fraction: float = DEFAULT_TEST_FRACTION,
                   config: PairingConfig = DEFAULT_CONFIG, labelled_by: Any = None,
                   signals: Collection[str] = (), raters: Collection[str] = (),
                   caps: Mapping[str, int] | None = None, cap_seed: int = 0) -> ExportSummary:
    """Export one agent's data from a store. Only that agent's calls are read; only complete calls
    give examples. Returns what was written and why the rest was left out."""
    return export_calls(store.calls(tenant_id, agent_id), tenant_id, agent_id, fmt, out, split=split,
                        redact=redact, length_balance=length_balance, include_pairs=include_pairs,
                        test_fraction=test_fraction, config=config, labelled_by=labelled_by,
                        store_event_range=store.event_range(tenant_id, agent_id),
                        signals=signals, raters=raters, caps=caps, cap_seed=cap_seed)


def _write(out: Path, rows: list[_Row]) -> str:
    """Write the rows atomically (a reader never sees half a file); sha256 of the bytes written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    with tmp.open("wb") as f:
        for row in rows:
            data = row.line().encode()
            digest.update(data)
            f.write(data)
    os.replace(tmp, out)
    return digest.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _export_meta(examples: Examples, tenant_id: str, agent_id: str, fmt: str, split: str,
                 test_fraction: float, redact: bool, config: PairingConfig, out: Path, rows: list[_Row],
                 counts: dict[str, int], drops: Counter, digest: str, length_before: LengthStats,
                 length_after: LengthStats, length_balance: bool, include_pairs: bool,
                 weights: dict[str, Any], labelled_by: Any,
                 store_event_range: tuple[int, int] | None) -> dict[str, Any]:
    by_side_pairs = Counter(p.side for p in examples.pairs)
    by_side_kto = Counter(k.side for k in examples.kto)
    return {
        "agent": f"{tenant_id}/{agent_id}",
        "tenant_id": tenant_id,
        "agent_id": agent_id,
        "format": fmt,
        "split": split,
        "file": out.name,
        "rows": len(rows),
        "sha256": digest,
        "redacted": redact,
        "include_pairs": include_pairs if fmt == "trl-kto" else None,
        "counts_by_signal": counts,
        "drops": dict(sorted((k, v) for k, v in drops.items() if v)),
        "calls": {"seen": examples.calls_seen, "complete": examples.calls_complete,
                  "events": examples.events},
        "split_sizes": {side: {"calls": examples.calls_by_side[side], "pairs": by_side_pairs[side],
                               "kto_examples": by_side_kto[side]} for side in ("train", "test")},
        "test_fraction": test_fraction,
        "length": {"before_balance": length_before.as_dict(), "written": length_after.as_dict(),
                   "balanced": length_balance, "method": "drop the extreme-ratio tail until the ratio "
                   "of means is within [0.9, 1.1] (agent_dpo/lengthbias.py)"},
        "kto": weights,
        "event_range": {"first_seq": examples.first_seq, "last_seq": examples.last_seq,
                        "store": list(store_event_range) if store_event_range else None},
        "labelled_by": labelled_by if labelled_by is not None else dict(sorted(examples.raters.items())),
        "pairing": {"csat_desirable": config.csat_desirable, "csat_undesirable": config.csat_undesirable,
                    "csat_policies": list(config.csat_policies), "csat_margin": config.csat_margin},
        "agent_dpo_version": _version,
    }
