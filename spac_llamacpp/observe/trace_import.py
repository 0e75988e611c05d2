"""Import public routing traces into the project's trace format (``spac trace import``).

Two formats, each read into a :class:`RoutingTrace` with the same invariants as a recorded one
(ids ``[tokens, layers, k]``, one step per evaluation: a prompt's tokens together, each decoded token
alone; per-step counts are the histogram of the steps' ids; ``-1`` where a (token, layer) has no row):

``route-csv`` (route traces of llama.cpp-based engines)
    ``#`` header lines, then a column header naming at least ``turn,phase,step,layer,slot,expert``
    (read by name; ``weight``, ``residency``, ``expert_bytes``, ``dropped`` and others are optional),
    then one row per routed expert. Header lines are ``# key=value key=value ...`` (as the engines
    write them: ``# model=PATH arch=A n_layer=N n_expert=E n_expert_used=K`` and one
    ``# layer=IL expert_bytes=B dense_bytes=D`` per layer) or ``# key: value``; ``expert_bytes`` may
    also be one list (``# expert_bytes: 1,2,3``, one value per layer) or one value for all layers.
    Each ``turn`` is a prompt; its ``phase`` 0 rows (prefill) are one step, each ``phase`` 1 position
    (decode) a step of its own; ``step`` is the token's context position. A layer is a MoE layer unless
    the header gives it ``expert_bytes=0`` and no row routes it. The size of one expert per layer comes
    from the header, else from the largest per-row ``expert_bytes`` (bytes of one expert's read) of the
    layer. A cell (token, layer) with some but not all ``n_expert_used`` slots is an error; a cell with
    none is ``-1`` (llama.cpp routes only the last prompt token through the last layer).

``jsonl`` (one JSON object per token and layer)
    ``{"dataset": ..., "problem_id": ..., "layer": L, "experts": [e0, e1], "token_idx": T,
    "gating_probs": [...]}``; ``(dataset, problem_id)`` names a prompt (both optional: absent, the file
    is one prompt), ``token_idx`` numbers its tokens. The format has no phase and the public recorder
    keeps only the generated tokens (it strips the prompt's prefill), so every token is a decode step of
    its own; a prompt's tokens are its distinct ``token_idx`` in order. No sizes are recorded (pass
    ``expert_bytes``).

Both: ``n_expert`` is the header's (CSV), else ``n_expert`` given, else the largest id + 1; ``k`` the
header's ``n_expert_used``, else the largest slot + 1 (CSV) or the rows' number of experts (JSONL).
A bad file is one :class:`SpacError` line ``FILE:LINE: what is wrong`` (the first bad line).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.observe.trace import RoutingTrace, TraceLayout, step_counts

FORMATS = ("route-csv", "jsonl")
REQUIRED_COLUMNS = ("turn", "phase", "step", "layer", "slot", "expert")
MAX_EXPERT = int(np.iinfo(np.int16).max)
LIMIT = 1 << 31  # larger layer, slot, position or id values are damage, not data
MAX_LAYER = 1 << 16
_MAX = {"n_layer": MAX_LAYER, "n_expert": MAX_EXPERT, "n_expert_used": MAX_EXPERT}

_COLON = re.compile(r"^([A-Za-z_][\w.-]*)\s*:\s*(.*)$")
_KV = re.compile(r"([A-Za-z_][\w.-]*)=(\S*)")
_INT_KEYS = tuple(_MAX)


def format_for(path: str | Path) -> str | None:
    """The format a file name implies (``.csv``: route-csv, ``.jsonl``/``.json``: jsonl), else None."""
    suffix = Path(path).suffix.lower()
    return {".csv": "route-csv", ".jsonl": "jsonl", ".json": "jsonl"}.get(suffix)


def import_trace(path: str | Path, fmt: str, n_expert: int | None = None,
                 expert_bytes: int | None = None) -> RoutingTrace:
    """Read ``path`` in ``fmt`` (one of :data:`FORMATS`) as a trace.

    ``n_expert`` applies where the source does not say (a different value than the source's is an
    error); ``expert_bytes`` (bytes of one expert, every MoE layer) replaces the recorded sizes.
    """
    path = Path(path)
    if fmt not in FORMATS:
        raise SpacError(f"unknown trace format {fmt!r}; use one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise SpacError(f"trace file not found: {path}")
    if n_expert is not None and not 1 <= n_expert <= MAX_EXPERT:
        raise SpacError(f"--n-expert must be between 1 and {MAX_EXPERT}, not {n_expert}")
    if expert_bytes is not None and expert_bytes <= 0:
        raise SpacError(f"--expert-bytes must be positive, not {expert_bytes}")
    try:
        with path.open(encoding="utf-8", newline="") as fh:
            rows = _read_csv(path, fh) if fmt == "route-csv" else _read_jsonl(path, fh)
    except UnicodeDecodeError as exc:
        raise SpacError(f"{path}: not a text file ({exc.reason} at byte {exc.start})") from exc
    return _build(path, fmt, rows, n_expert, expert_bytes)


class _Bad(SpacError):
    pass


def _bad(path: Path, lineno: int, what: str) -> _Bad:
    return _Bad(f"{path}:{lineno}: {what}")


@dataclass
class _Rows:
    """One entry per routed expert (a CSV row, an element of a JSONL row's experts), in file order."""

    prompt: np.ndarray  # prompt number, in order of first appearance
    phase: np.ndarray  # 0 prefill, 1 decode
    pos: np.ndarray  # token position within the prompt (CSV step, JSONL token_idx)
    layer: np.ndarray
    slot: np.ndarray
    expert: np.ndarray
    line: np.ndarray
    prompt_ids: list[str]
    describe: Callable[[int], str]  # a row's cell in the source's words, for messages
    slot_column: bool = True  # the source numbers slots (CSV) or lists a cell's experts in one row (JSONL)
    n_layer: int | None = None
    n_expert: int | None = None
    k: int | None = None
    header_line: dict[str, int] | None = None  # where the header said n_layer/n_expert/n_expert_used
    layer_bytes: dict[int, int] | None = None  # header: bytes of one expert per layer
    row_bytes: np.ndarray | None = None  # per-row expert_bytes (CSV column)
    residency: np.ndarray | None = None  # per-row residency (CSV column)
    non_expert_bytes: int | None = None
    info: dict[str, Any] | None = None  # model, architecture, format version


def _int_field(value: str, path: Path, lineno: int, column: str, limit: int = LIMIT) -> int:
    try:
        v = int(value)
    except ValueError:
        raise _bad(path, lineno, f"column {column!r} is {value.strip()[:40]!r}, not an integer") from None
    if abs(v) >= limit:
        raise _bad(path, lineno, f"column {column!r} is {value.strip()[:40]}: out of range")
    return v


def _int_list(value: str, path: Path, lineno: int, key: str) -> list[int]:
    parts = [p for p in re.split(r"[\s,]+", value.strip().strip("[]")) if p]
    if not parts:
        raise _bad(path, lineno, f"header {key!r} has no value")
    out = []
    for p in parts:
        try:
            out.append(int(p))
        except ValueError:
            raise _bad(path, lineno, f"header {key!r} has {p!r}, not an integer") from None
        if out[-1] < 0:
            raise _bad(path, lineno, f"header {key!r} has {p!r}: must not be negative")
    return out


def _read_header(path: Path, lines: list[tuple[int, str]]) -> dict[str, Any]:
    """Parse ``#`` lines: ``key=value`` pairs (a ``layer=`` pair makes the others per layer) or ``key: value``."""
    out: dict[str, Any] = {"where": {}, "layer_bytes": {}, "layer_dense": {}}
    for lineno, text in lines:
        body = text.lstrip("#").strip()
        m = _COLON.match(body)
        pairs = [(m.group(1), m.group(2).strip())] if m else _KV.findall(body)
        if not pairs:
            words = body.split()
            if len(words) == 2 and words[0] == "route_trace":
                out["version"] = words[1]
            continue  # a comment
        fields = dict(pairs)
        if "layer" in fields:
            il = _int_list(fields.pop("layer"), path, lineno, "layer")
            if len(il) != 1 or il[0] >= MAX_LAYER:
                raise _bad(path, lineno, f"header 'layer' must be one layer number below {MAX_LAYER}")
            for key, store in (("expert_bytes", "layer_bytes"), ("dense_bytes", "layer_dense")):
                if key in fields:
                    v = _int_list(fields[key], path, lineno, key)
                    if len(v) != 1:
                        raise _bad(path, lineno, f"header {key!r} of layer {il[0]} must be one number")
                    out[store][il[0]] = v[0]
            continue
        for key, value in fields.items():
            if key in _INT_KEYS:
                v = _int_list(value, path, lineno, key)
                if len(v) != 1 or not 1 <= v[0] <= _MAX[key]:
                    raise _bad(path, lineno, f"header {key!r} must be one integer in 1..{_MAX[key]}, not {value!r}")
                out[key] = v[0]
                out["where"][key] = lineno
            elif key in ("expert_bytes", "dense_bytes"):
                out[key] = (lineno, _int_list(value, path, lineno, key))
            elif key in ("model", "arch"):
                out[key] = value
    return out


def _read_csv(path: Path, fh: Any) -> _Rows:
    header_lines: list[tuple[int, str]] = []
    columns: list[str] | None = None
    cols: dict[str, list[int]] = {}
    lines: list[int] = []
    turns: dict[int, int] = {}
    for lineno, raw in enumerate(fh, 1):
        text = raw.strip()
        if not text:
            continue
        if text.startswith("#"):
            if columns is None:
                header_lines.append((lineno, text))
            continue
        parts = [p.strip() for p in text.split(",")]
        if columns is None:
            columns = parts
            missing = [c for c in REQUIRED_COLUMNS if c not in columns]
            if missing:
                raise _bad(path, lineno, f"the column header lacks {', '.join(missing)} (it names {text[:120]!r}); "
                                         f"a route CSV has {','.join(REQUIRED_COLUMNS)},...")
            wanted = [c for c in (*REQUIRED_COLUMNS, "expert_bytes", "residency") if c in columns]
            index = [(c, columns.index(c)) for c in wanted]
            cols = {c: [] for c in wanted}
            continue
        if len(parts) != len(columns):
            raise _bad(path, lineno, f"{len(parts)} fields, the column header has {len(columns)}")
        for c, i in index:
            cols[c].append(_int_field(parts[i], path, lineno, c, 1 << 62 if c == "expert_bytes" else LIMIT))
        lines.append(lineno)
        turn = cols["turn"][-1]
        if turn not in turns:
            turns[turn] = len(turns)
    if columns is None:
        raise SpacError(f"{path}: no column header ({','.join(REQUIRED_COLUMNS)},...); is this a route CSV?")
    header = _read_header(path, header_lines)
    a = {c: np.array(v, dtype=np.int64) for c, v in cols.items()}
    turn_ids = list(turns)
    prompt = np.array([turns[t] for t in cols["turn"]], dtype=np.int64)

    def describe(r: int) -> str:
        return (f"turn {a['turn'][r]} phase {a['phase'][r]} step {a['step'][r]} layer {a['layer'][r]}")

    rows = _Rows(prompt=prompt, phase=a["phase"], pos=a["step"], layer=a["layer"], slot=a["slot"],
                 expert=a["expert"], line=np.array(lines, dtype=np.int64),
                 prompt_ids=[f"turn {t}" for t in turn_ids], describe=describe,
                 n_layer=header.get("n_layer"), n_expert=header.get("n_expert"), k=header.get("n_expert_used"),
                 header_line=header["where"], row_bytes=a.get("expert_bytes"), residency=a.get("residency"),
                 info={k: header[k] for k in ("model", "arch", "version") if k in header})
    _csv_checks(path, rows)
    rows.layer_bytes = _header_sizes(path, header, rows.n_layer)
    if header["layer_dense"]:
        rows.non_expert_bytes = int(sum(header["layer_dense"].values()))
    elif "dense_bytes" in header:
        rows.non_expert_bytes = int(sum(header["dense_bytes"][1]))
    return rows


def _header_sizes(path: Path, header: dict[str, Any], n_layer: int | None) -> dict[int, int]:
    sizes = dict(header["layer_bytes"])
    if "expert_bytes" in header:
        lineno, values = header["expert_bytes"]
        if len(values) == 1 and n_layer is not None:
            values = values * n_layer
        if n_layer is not None and len(values) != n_layer:
            raise _bad(path, lineno, f"header 'expert_bytes' has {len(values)} values for {n_layer} layers")
        sizes.update(enumerate(values))
    if n_layer is not None and sizes and max(sizes) >= n_layer:
        raise SpacError(f"{path}: the header sizes layer {max(sizes)}, but n_layer is {n_layer}")
    return sizes


def _first(path: Path, rows: _Rows, mask: np.ndarray, what: Callable[[int], str]) -> tuple[int, str] | None:
    if not mask.any():
        return None
    r = int(np.argmax(mask))
    return r, what(r)


def _raise_first(path: Path, rows: _Rows, found: list[tuple[int, str] | None]) -> None:
    hits = [f for f in found if f is not None]
    if hits:
        r, what = min(hits)
        raise _bad(path, int(rows.line[r]), what)


def _csv_checks(path: Path, rows: _Rows) -> None:
    """Row-level checks of the CSV's columns (the first bad row in the file is reported)."""
    def where(key: str) -> str:
        line = (rows.header_line or {}).get(key)
        return f" (header line {line})" if line else ""

    found = [
        _first(path, rows, (rows.phase != 0) & (rows.phase != 1),
               lambda r: f"phase {rows.phase[r]}: must be 0 (prompt) or 1 (decode)"),
        _first(path, rows, rows.pos < 0,
               lambda r: f"step {rows.pos[r]}: a row the engine could not attribute to a token position"),
        _first(path, rows, rows.layer < 0, lambda r: f"layer {rows.layer[r]} is negative"),
        _first(path, rows, rows.slot < 0, lambda r: f"slot {rows.slot[r]} is negative"),
        _first(path, rows, rows.expert < 0, lambda r: f"expert {rows.expert[r]} is negative"),
    ]
    if rows.n_layer is not None:
        found.append(_first(path, rows, rows.layer >= rows.n_layer,
                            lambda r: f"layer {rows.layer[r]} >= n_layer {rows.n_layer}{where('n_layer')}"))
    if rows.k is not None:
        found.append(_first(path, rows, rows.slot >= rows.k,
                            lambda r: f"slot {rows.slot[r]} >= n_expert_used {rows.k}{where('n_expert_used')}"))
    if rows.n_expert is not None:
        found.append(_first(path, rows, rows.expert >= rows.n_expert,
                            lambda r: f"expert {rows.expert[r]} >= n_expert {rows.n_expert}{where('n_expert')}"))
    if rows.row_bytes is not None:
        found.append(_first(path, rows, rows.row_bytes < 0,
                            lambda r: f"expert_bytes {rows.row_bytes[r]} is negative"))
    _raise_first(path, rows, found)


def _json_int(obj: dict[str, Any], key: str, path: Path, lineno: int) -> int:
    if key not in obj:
        raise _bad(path, lineno, f"no {key!r} field (a routing row has layer, experts, token_idx)")
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(path, lineno, f"{key!r} is {json.dumps(v)[:40]}, not an integer")
    if not 0 <= v < LIMIT:
        raise _bad(path, lineno, f"{key!r} is {v}: must be in 0..{LIMIT - 1}")
    return v


def _read_jsonl(path: Path, fh: Any) -> _Rows:
    prompts: dict[tuple[Any, Any], int] = {}
    p_list: list[int] = []
    pos: list[int] = []
    layers: list[int] = []
    experts: list[list[int]] = []
    lines: list[int] = []
    k: int | None = None
    k_line = 0
    for lineno, raw in enumerate(fh, 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.rstrip("\r\n"))
        except json.JSONDecodeError as exc:
            raise _bad(path, lineno, f"not JSON ({exc.msg} at column {exc.colno})") from None
        except RecursionError:
            raise _bad(path, lineno, "JSON nested too deeply (a routing row is one flat object)") from None
        if not isinstance(obj, dict):
            raise _bad(path, lineno, f"not a JSON object but {type(obj).__name__}")
        layer = _json_int(obj, "layer", path, lineno)
        token = _json_int(obj, "token_idx", path, lineno)
        ex = obj.get("experts")
        if not isinstance(ex, list) or not ex:
            raise _bad(path, lineno, f"'experts' is {json.dumps(ex)[:40]}, not a list of expert ids")
        if any(isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < LIMIT for e in ex):
            raise _bad(path, lineno, f"'experts' is {json.dumps(ex)[:60]}: ids must be non-negative integers")
        if k is None:
            k, k_line = len(ex), lineno
        elif len(ex) != k:
            raise _bad(path, lineno, f"{len(ex)} experts, line {k_line} has {k} (every row routes the same top-k)")
        probs = obj.get("gating_probs")
        if probs is not None and (not isinstance(probs, list) or len(probs) != len(ex)
                                  or any(isinstance(p, bool) or not isinstance(p, (int, float)) for p in probs)):
            raise _bad(path, lineno, f"'gating_probs' is {json.dumps(probs)[:60]}, not {len(ex)} numbers")
        key = (obj.get("dataset"), obj.get("problem_id"))
        if any(v is not None and (isinstance(v, bool) or not isinstance(v, (str, int))) for v in key):
            raise _bad(path, lineno, "'dataset' and 'problem_id' must be strings or integers")
        if key not in prompts:
            prompts[key] = len(prompts)
        p_list.append(prompts[key])
        pos.append(token)
        layers.append(layer)
        experts.append(ex)
        lines.append(lineno)
    if k is None:
        raise SpacError(f"{path}: no routing rows (one JSON object per token and layer)")
    n_rows = len(lines)

    def rep(v: list[int]) -> np.ndarray:
        return np.repeat(np.array(v, dtype=np.int64), k)

    names = [f"{d}/{p}" if d is not None else str(p) for d, p in prompts]
    prompt = rep(p_list)

    def describe(r: int) -> str:
        return f"prompt {names[int(prompt[r])]} token_idx {pos_a[r]} layer {layer_a[r]}"

    pos_a, layer_a = rep(pos), rep(layers)
    return _Rows(prompt=prompt, phase=np.ones(n_rows * k, np.int64), pos=pos_a, layer=layer_a,
                 slot=np.tile(np.arange(k, dtype=np.int64), n_rows),
                 expert=np.array(experts, dtype=np.int64).ravel(), line=rep(lines),
                 prompt_ids=names, describe=describe, slot_column=False, k=k)


def _duplicate(key: np.ndarray) -> tuple[int, int] | None:
    """The first row (in file order) whose ``key`` an earlier row has, with the first row of that key."""
    order = np.argsort(key, kind="stable")
    sk = key[order]
    starts = np.concatenate([[True], sk[1:] != sk[:-1]])
    if starts.all():
        return None
    group_start = np.maximum.accumulate(np.where(starts, np.arange(len(sk)), 0))
    later = order[~starts]
    i = int(np.argmin(later))
    return int(order[group_start[~starts][i]]), int(later[i])


def _build(path: Path, fmt: str, rows: _Rows, n_expert: int | None, expert_bytes: int | None) -> RoutingTrace:
    if not len(rows.line):
        raise SpacError(f"{path}: no routing rows")
    if rows.n_expert is not None and n_expert is not None and n_expert != rows.n_expert:
        raise SpacError(f"--n-expert {n_expert}, but {path} says n_expert={rows.n_expert}")
    E = rows.n_expert or n_expert
    if E is not None:
        bad = rows.expert >= E
        if bad.any():
            r = int(np.argmax(bad))
            raise _bad(path, int(rows.line[r]), f"expert {rows.expert[r]} >= n_expert {E} (--n-expert)")
    else:
        E = int(rows.expert.max()) + 1
    if E > MAX_EXPERT:
        r = int(np.argmax(rows.expert))
        raise _bad(path, int(rows.line[r]), f"expert {rows.expert[r]}: more than {MAX_EXPERT} experts")
    for what, col, most in (("layer", rows.layer, MAX_LAYER), ("slot", rows.slot, MAX_EXPERT)):
        if int(col.max()) >= most:
            r = int(np.argmax(col))
            raise _bad(path, int(rows.line[r]), f"{what} {col[r]}: more than {most} {what}s")
    sizes = rows.layer_bytes or {}
    L = rows.n_layer or max(int(rows.layer.max()), max(sizes, default=0)) + 1
    k = rows.k or int(rows.slot.max()) + 1

    # tokens: prompts in order of appearance, a prompt's prefill positions, then its decode positions
    tokens, tok = np.unique((rows.prompt * 2 + rows.phase) << 32 | rows.pos, return_inverse=True)
    cell = tok * L + rows.layer
    checks: list[tuple[int, str] | None] = []
    dup = _duplicate(cell * k + rows.slot)
    if dup is not None:
        a, b = dup
        slot = f" slot {rows.slot[b]}" if rows.slot_column else ""
        checks.append((b, f"{rows.describe(b)}{slot} again (first at line {rows.line[a]})"))
    dup = _duplicate(cell * E + rows.expert)
    if dup is not None:
        a, b = dup
        if rows.line[a] == rows.line[b]:
            checks.append((b, f"expert {rows.expert[b]} twice in one row ({rows.describe(b)})"))
        else:
            checks.append((b, f"{rows.describe(b)} routes expert {rows.expert[b]} again "
                              f"(first at line {rows.line[a]})"))
    _raise_first(path, rows, checks)
    per_cell = np.bincount(cell, minlength=len(tokens) * L)
    partial = (per_cell[cell] < k)
    if partial.any():
        r = int(np.argmax(partial))
        slots = sorted(int(s) for s in rows.slot[cell == cell[r]])
        raise _bad(path, int(rows.line[r]), f"{rows.describe(r)} has slots {slots} of {k} (n_expert_used)")

    T = len(tokens)
    ids = np.full((T, L, k), -1, dtype=np.int16)
    ids[tok, rows.layer, rows.slot] = rows.expert
    tok_prompt = (tokens >> 32) // 2
    tok_phase = (tokens >> 32) % 2
    new_step = np.ones(T, dtype=bool)
    new_step[1:] = (tok_phase[1:] == 1) | (tok_prompt[1:] != tok_prompt[:-1])
    token_step = (np.cumsum(new_step) - 1).astype(np.int32)
    n_steps = int(token_step[-1]) + 1
    step_n_tokens = np.bincount(token_step, minlength=n_steps).astype(np.int32)

    seen_layers = set(np.unique(rows.layer).tolist())
    moe_layers = np.array([il for il in range(L) if il in seen_layers or sizes.get(il, 1) > 0], dtype=np.int32)
    layer_bytes = _expert_sizes(rows, moe_layers, expert_bytes)

    runs = []
    for p, name in enumerate(rows.prompt_ids):
        mine = np.nonzero(tok_prompt == p)[0]
        n_prefill = int((tok_phase[mine] == 0).sum())
        run: dict[str, Any] = {"prompt_id": name, "start_step": int(token_step[mine[0]]),
                               "prompt_tokens": n_prefill, "generated_tokens": len(mine) - n_prefill}
        if n_prefill:  # the simulator reads first_step as the run's prompt step
            run["first_step"] = run["start_step"]
        runs.append(run)
    missing = int((ids[:, moe_layers, 0] < 0).sum())
    source: dict[str, Any] = {"file": path.name, "format": fmt, "rows": int(len(np.unique(rows.line))),
                              "missing_cells": missing}
    if rows.residency is not None:
        decode = rows.phase == 1
        if decode.any():
            source["decode_hit_rate"] = round(float((rows.residency[decode] != 0).mean()), 6)
    info = rows.info or {}
    if "version" in info:
        source["version"] = info["version"]
    meta: dict[str, Any] = {"imported": source}
    if "model" in info:
        meta["model"] = info["model"]
    if "arch" in info:
        meta["architecture"] = info["arch"]
    meta["n_expert_used"] = k
    meta["runs"] = runs
    meta["layout"] = TraceLayout(E, k, layer_bytes, rows.non_expert_bytes).to_json()
    trace = RoutingTrace(ids=ids, token_step=token_step, step_n_tokens=step_n_tokens,
                         counts=step_counts(ids, token_step, n_steps, E), moe_layers=moe_layers, n_expert=E,
                         meta=meta)
    trace.check()
    return trace


def _expert_sizes(rows: _Rows, moe_layers: np.ndarray, expert_bytes: int | None) -> tuple[int, ...] | None:
    """Bytes of one expert per MoE layer: the option, else the header's, else the largest per-row read."""
    if expert_bytes is not None:
        return tuple(int(expert_bytes) for _ in moe_layers)
    sizes = {il: b for il, b in (rows.layer_bytes or {}).items() if b > 0}
    if rows.row_bytes is not None:
        for il in moe_layers.tolist():
            if il not in sizes:
                read = rows.row_bytes[rows.layer == il]
                if len(read) and int(read.max()) > 0:
                    sizes[il] = int(read.max())
    if not len(moe_layers) or any(il not in sizes for il in moe_layers.tolist()):
        return None
    return tuple(sizes[il] for il in moe_layers.tolist())
