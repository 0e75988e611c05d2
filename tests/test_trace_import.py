"""`spac trace import`: public route CSVs and JSONL routing logs into the project's trace format.

The files are small synthetic ones written here in the public formats' exact field names.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.observe.trace import RoutingTrace, TraceLayout
from spac_llamacpp.observe.trace_import import import_trace
from spac_llamacpp.tools.cli import spac

BIN = Path(sys.executable).parent
CSV_COLUMNS = "turn,phase,step,layer,slot,expert,weight,residency,expert_bytes,dropped"

# (turn, phase, step) -> {layer: [slot 0, slot 1]}; layer 0 is dense, layer 2 the last layer
CELLS: dict[tuple[int, int, int], dict[int, list[int]]] = {
    (0, 0, 0): {1: [0, 1]},
    (0, 0, 1): {1: [2, 0]},
    (0, 0, 2): {1: [0, 3], 2: [1, 2]},  # the last layer routes only the final prompt token
    (0, 1, 3): {1: [3, 2], 2: [0, 1]},
    (0, 1, 4): {1: [0, 1], 2: [3, 1]},
    (1, 0, 5): {1: [1, 2]},  # a second turn continuing the context
    (1, 0, 6): {1: [1, 3], 2: [2, 0]},
    (1, 1, 7): {1: [2, 1], 2: [0, 3]},
}
HEADER = [
    "# route_trace v1",
    "# model=/models/toy.gguf arch=qwen3moe n_layer=3 n_expert=4 n_expert_used=2",
    "# layer=0 expert_bytes=0 dense_bytes=100",
    "# layer=1 expert_bytes=1000 dense_bytes=110",
    "# layer=2 expert_bytes=2000 dense_bytes=120",
]


def csv_rows(cells=CELLS) -> list[str]:
    out = []
    for (turn, phase, step), layers in cells.items():
        for layer, experts in layers.items():
            for slot, e in enumerate(experts):
                residency = (e + step) % 2
                nbytes = 0 if residency else 1000 * layer
                out.append(f"{turn},{phase},{step},{layer},{slot},{e},0.5,{residency},{nbytes},0")
    return out


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def cli(*args: str):
    result = CliRunner().invoke(spac, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def assert_line_error(result, path: Path, line: int, *words: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}:{line}: "), result.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]


def expected_ids(cells, n_layer: int, k: int) -> np.ndarray:
    ids = np.full((len(cells), n_layer, k), -1)
    for t, key in enumerate(sorted(cells, key=lambda c: (c[0], c[1], c[2]))):
        for layer, experts in cells[key].items():
            ids[t, layer] = experts
    return ids


def test_route_csv(tmp_path):
    src = write(tmp_path / "route.csv", [*HEADER, CSV_COLUMNS, *csv_rows()])
    out = tmp_path / "t.npz"
    result = cli("trace", "import", str(src), "-o", str(out), "--format", "route-csv")
    assert result.exit_code == 0, result.output
    assert "8 tokens, 5 steps, 2 prompts, 2 MoE layers x 4 experts (top-2)" in result.stderr
    t = RoutingTrace.load(out)
    t.check()
    np.testing.assert_array_equal(t.ids, expected_ids(CELLS, 3, 2))
    assert t.ids.dtype == np.int16
    # turn 0: its 3 prompt tokens, 2 decode tokens; turn 1: 2 prompt tokens, 1 decode token
    assert t.step_n_tokens.tolist() == [3, 1, 1, 2, 1]
    assert t.token_step.tolist() == [0, 0, 0, 1, 2, 3, 3, 4]
    assert t.moe_layers.tolist() == [1, 2]  # the header gives layer 0 no expert bytes and no row routes it
    assert t.n_expert == 4 and t.counts.shape == (5, 3, 4)
    assert t.counts[0, 1].tolist() == [3, 1, 1, 1] and t.counts[0, 2].tolist() == [0, 1, 1, 0]
    assert t.meta["model"] == "/models/toy.gguf" and t.meta["architecture"] == "qwen3moe"
    assert t.meta["imported"]["file"] == "route.csv" and t.meta["imported"]["format"] == "route-csv"
    assert t.meta["imported"]["rows"] == 26 and t.meta["imported"]["missing_cells"] == 3
    assert t.meta["imported"]["version"] == "v1"
    assert [r["first_step"] for r in t.meta["runs"]] == [0, 3]
    assert [(r["prompt_tokens"], r["generated_tokens"]) for r in t.meta["runs"]] == [(3, 2), (2, 1)]
    assert t.layout == TraceLayout(n_expert=4, n_expert_used=2, expert_bytes=(1000, 2000), non_expert_bytes=330)
    hits = sum(1 for r in csv_rows() if r.split(",")[1] == "1" and r.split(",")[7] != "0")
    assert t.meta["imported"]["decode_hit_rate"] == pytest.approx(hits / 12)


def test_route_csv_colon_header_any_column_order_and_row_sizes(tmp_path):
    cells = {(0, 0, 0): {0: [1, 0], 1: [2, 3]}, (0, 0, 1): {0: [0, 2], 1: [3, 1]}, (0, 1, 2): {0: [1, 2], 1: [0, 1]}}
    rows = []
    for (turn, phase, step), layers in cells.items():
        for layer, experts in layers.items():
            for slot, e in reversed(list(enumerate(experts))):  # slots out of order
                rows.append(f"{e},{layer},{slot},{phase},{turn},{step},{(layer + 1) * 512 if slot == 0 else 0}")
    src = write(tmp_path / "r.csv", ["# n_expert: 4", "# n_expert_used: 2", "# a comment",
                                     "expert,layer,slot,phase,turn,step,expert_bytes", *rows])
    t = import_trace(src, "route-csv")
    np.testing.assert_array_equal(t.ids, expected_ids(cells, 2, 2))
    assert t.step_n_tokens.tolist() == [2, 1] and t.moe_layers.tolist() == [0, 1]
    assert t.layout.expert_bytes == (512, 1024)  # the largest read of each layer
    assert t.layout.non_expert_bytes is None and "model" not in t.meta
    # an expert_bytes list in the header wins over the rows; --expert-bytes over both
    src2 = write(tmp_path / "r2.csv", ["# n_layer: 2", "# expert_bytes: 7, 9", *src.read_text().splitlines()])
    assert import_trace(src2, "route-csv").layout.expert_bytes == (7, 9)
    assert import_trace(src2, "route-csv", expert_bytes=5).layout.expert_bytes == (5, 5)


def test_route_csv_without_header(tmp_path):
    src = write(tmp_path / "r.csv", ["turn,phase,step,layer,slot,expert", "0,0,0,0,0,5", "0,1,1,0,0,2"])
    t = import_trace(src, "route-csv")
    assert t.n_expert == 6 and t.ids.shape == (2, 1, 1) and t.step_n_tokens.tolist() == [1, 1]
    assert t.layout.expert_bytes is None and t.layout.n_expert_used == 1
    assert import_trace(src, "route-csv", n_expert=8).n_expert == 8


@pytest.mark.parametrize(("lines", "line", "words"), [
    ([*HEADER, "turn,phase,step,layer,expert,weight", "0,0,0,1,0,0.5"], 6, ["lacks slot"]),
    ([*HEADER, CSV_COLUMNS, "0,1,3,1,0,x,0.5,0,0,0", "0,1,3,1,1,2,0.5,0,0,0"], 7, ["'expert'", "not an integer"]),
    ([*HEADER, CSV_COLUMNS, "0,1,3,1,0,1,0.5,0,0,0", "0,1,3,1,1,4,0.5,0,0,0"], 8, ["expert 4 >= n_expert 4",
                                                                                   "header line 2"]),
    ([*HEADER, CSV_COLUMNS, "0,1,3,1,2,1,0.5,0,0,0"], 7, ["slot 2 >= n_expert_used 2"]),
    ([*HEADER, CSV_COLUMNS, "0,1,3,3,0,1,0.5,0,0,0", "0,1,3,3,1,2,0.5,0,0,0"], 7, ["layer 3 >= n_layer 3"]),
    ([*HEADER, CSV_COLUMNS, *csv_rows()[:4], "0,1,9,1,0,3,0.5,0,0,0", *csv_rows()[4:]], 11,
     ["turn 0 phase 1 step 9 layer 1", "has slots [0] of 2"]),
    ([*HEADER, CSV_COLUMNS, "0,1,3,1,0,1,0.5,0,0", "0,1,3,1,1,2,0.5,0,0,0"], 7, ["9 fields", "has 10"]),
    ([*HEADER, CSV_COLUMNS, "0,1,3,1,0,1,0.5,0,0,0", "0,1,3,1,1,2,0.5,0,0,0", "0,1,3,1,1,3,0.5,0,0,0"], 9,
     ["slot 1 again", "first at line 8"]),
    ([*HEADER, CSV_COLUMNS, "0,1,3,1,0,1,0.5,0,0,0", "0,1,3,1,1,1,0.5,0,0,0"], 8, ["routes expert 1 again"]),
    ([*HEADER, CSV_COLUMNS, "0,2,3,1,0,1,0.5,0,0,0", "0,2,3,1,1,2,0.5,0,0,0"], 7, ["phase 2"]),
    ([*HEADER, CSV_COLUMNS, "0,1,-1,1,0,1,0.5,0,0,0", "0,1,-1,1,1,2,0.5,0,0,0"], 7, ["step -1"]),
    (["# n_expert=abc", CSV_COLUMNS, "0,1,3,1,0,1,0.5,0,0,0"], 1, ["'n_expert'", "'abc'"]),
    (["# n_layer: 2", "# expert_bytes: 1,2,3", CSV_COLUMNS, "0,1,3,1,0,1,0.5,0,0,0"], 2, ["3 values for 2 layers"]),
])
def test_route_csv_bad_lines(tmp_path, lines, line, words):
    src = write(tmp_path / "bad.csv", lines)
    assert_line_error(cli("trace", "import", str(src), "-o", str(tmp_path / "t.npz")), src, line, *words)
    assert not (tmp_path / "t.npz").exists()


def jsonl_rows(problems: dict[int, int], n_layer: int, skip: set[tuple[int, int, int]] = frozenset()) -> list[str]:
    """Layer-major per problem, as the public recorder writes them; ids cycle through 0..5."""
    out = []
    for p, n_tok in problems.items():
        for layer in range(n_layer):
            for t in range(n_tok):
                if (p, t, layer) in skip:
                    continue
                e = [(p + t + layer) % 6, (p + 2 * t + layer + 1) % 6]
                if e[0] == e[1]:
                    e[1] = (e[1] + 1) % 6
                out.append(json.dumps({"dataset": "gsm8k", "problem_id": p, "layer": layer, "experts": e,
                                       "gating_probs": [0.7, 0.3], "token_idx": t}))
    return out


def test_jsonl(tmp_path):
    src = write(tmp_path / "mixtral_routing.jsonl", jsonl_rows({0: 5, 1: 3}, 4, skip={(0, 4, 3)}))
    out = tmp_path / "t.npz"
    result = cli("trace", "import", str(src), "-o", str(out))  # the format from the extension
    assert result.exit_code == 0, result.output
    assert "8 tokens, 8 steps, 2 prompts, 4 MoE layers x 6 experts (top-2), no expert sizes" in result.stderr
    assert "1 (token, layer) without a row" in result.stderr
    t = RoutingTrace.load(out)
    t.check()
    assert t.n_tokens == 8 and t.step_n_tokens.tolist() == [1] * 8  # every token a decode step
    assert t.moe_layers.tolist() == [0, 1, 2, 3] and t.n_expert == 6
    assert t.ids[4, 3].tolist() == [-1, -1] and t.counts[4, 3].sum() == 0
    assert t.ids[5, 2].tolist() == [(1 + 0 + 2) % 6, (1 + 0 + 2 + 1) % 6]  # problem 1, token 0, layer 2
    assert [r["prompt_id"] for r in t.meta["runs"]] == ["gsm8k/0", "gsm8k/1"]
    assert [r["start_step"] for r in t.meta["runs"]] == [0, 5]
    assert all("first_step" not in r and r["prompt_tokens"] == 0 for r in t.meta["runs"])
    assert t.meta["imported"] == {"file": "mixtral_routing.jsonl", "format": "jsonl", "rows": 31, "missing_cells": 1}
    assert t.layout == TraceLayout(n_expert=6, n_expert_used=2)
    t8 = import_trace(src, "jsonl", n_expert=8, expert_bytes=1 << 20)
    assert t8.n_expert == 8 and t8.counts.shape[2] == 8 and t8.layout.expert_bytes == (1 << 20,) * 4


def test_jsonl_prompts_without_ids(tmp_path):
    rows = [json.dumps({"layer": 0, "experts": [1], "token_idx": t}) for t in (2, 0, 7)]
    t = import_trace(write(tmp_path / "x.jsonl", rows), "jsonl")
    assert t.ids[:, 0, 0].tolist() == [1, 1, 1] and len(t.meta["runs"]) == 1  # tokens 0, 2, 7 in order


GOOD = '{"problem_id": 0, "layer": 0, "experts": [1, 2], "token_idx": 0}'


@pytest.mark.parametrize(("lines", "line", "words"), [
    ([GOOD, "", '{"problem_id": 0, "layer": 1, "experts": [1, 2], "token_idx": 0'], 3, ["not JSON"]),
    ([GOOD, "[1, 2]"], 2, ["not a JSON object"]),
    ([GOOD, '{"problem_id": 0, "layer": 1, "experts": [1, 2]}'], 2, ["no 'token_idx' field"]),
    ([GOOD, '{"problem_id": 0, "layer": "1", "experts": [1, 2], "token_idx": 0}'], 2, ["'layer'", "not an integer"]),
    ([GOOD, '{"problem_id": 0, "layer": 1, "experts": [1], "token_idx": 0}'], 2, ["1 experts, line 1 has 2"]),
    ([GOOD, '{"problem_id": 0, "layer": 1, "experts": [1, -2], "token_idx": 0}'], 2, ["non-negative"]),
    ([GOOD, '{"problem_id": 0, "layer": 1, "experts": [3, 3], "token_idx": 0}'], 2, ["expert 3 twice"]),
    ([GOOD, '{"problem_id": 0, "layer": 1, "experts": [1, 2], "token_idx": 1}', GOOD], 3,
     ["prompt 0 token_idx 0 layer 0 again", "first at line 1"]),
    ([GOOD, '{"problem_id": 0, "layer": 1, "experts": [1, 2], "token_idx": 0, "gating_probs": [1]}'], 2,
     ["gating_probs"]),
    ([GOOD, '{"problem_id": 0, "layer": 1, "experts": [1, 9], "token_idx": 0}'], 2, ["expert 9 >= n_expert 8"]),
])
def test_jsonl_bad_lines(tmp_path, lines, line, words):
    src = write(tmp_path / "bad.jsonl", lines)
    result = cli("trace", "import", str(src), "-o", str(tmp_path / "t.npz"), "--n-expert", "8")
    assert_line_error(result, src, line, *words)


def test_first_layers(tmp_path):
    """--layers N keeps the first N MoE layers' routing as it was (replay on `spac synth --layers N`)."""
    src = write(tmp_path / "route.csv", [*HEADER, CSV_COLUMNS, *csv_rows()])
    full = import_trace(src, "route-csv")
    out = tmp_path / "t1.npz"
    result = cli("trace", "import", str(src), "-o", str(out), "--layers", "1")
    assert result.exit_code == 0, result.output
    assert "1 MoE layers x 4 experts" in result.stderr
    t = RoutingTrace.load(out)
    t.check()
    assert t.moe_layers.tolist() == [1] and t.ids.shape[1] == 2 and t.counts.shape == (5, 2, 4)
    np.testing.assert_array_equal(t.ids, full.ids[:, :2])
    np.testing.assert_array_equal(t.counts, full.counts[:, :2])
    assert t.step_n_tokens.tolist() == full.step_n_tokens.tolist() and t.meta["runs"] == full.meta["runs"]
    assert t.layout == TraceLayout(n_expert=4, n_expert_used=2, expert_bytes=(1000,))  # no whole-model dense bytes
    assert t.meta["first_layers"] == {"kept": 1, "of": 2} and "first_layers" not in full.meta
    assert full.first_layers(2).moe_layers.tolist() == [1, 2]
    for n in ("3", "0"):
        result = cli("trace", "import", str(src), "-o", str(tmp_path / "t3.npz"), "--layers", n)
        assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert f"first {n} MoE layers of 2" in result.stderr


def test_bad_inputs_one_line(tmp_path):
    for args, words in [
        ((str(tmp_path / "missing.csv"),), ["not found", "missing.csv"]),
        ((str(write(tmp_path / "x.txt", ["a"])),), ["--format"]),
        ((str(write(tmp_path / "e.jsonl", [""])),), ["no routing rows"]),
        ((str(write(tmp_path / "h.csv", ["# n_expert=4"])),), ["no column header"]),
        ((str(write(tmp_path / "j.jsonl", [GOOD])), "--expert-bytes", "lots"), ["invalid size"]),
        ((str(write(tmp_path / "n.csv", ["# n_expert=4", "turn,phase,step,layer,slot,expert", "0,1,0,0,0,1"])),
          "--n-expert", "8"), ["--n-expert 8", "n_expert=4"]),
    ]:
        result = cli("trace", "import", *args, "-o", str(tmp_path / "t.npz"))
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert all(w.lower() in lines[0].lower() for w in words), lines[0]
    binary = tmp_path / "b.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    assert "not a text file" in cli("trace", "import", str(binary), "-o", str(tmp_path / "t.npz")).stderr


def test_trace_command_keeps_recording(tmp_path):
    help_text = cli("trace", "--help").output
    assert "Usage: spac trace [OPTIONS] MODEL" in help_text and "trace import FILE" in help_text
    assert "Usage: spac trace import [OPTIONS] FILE" in cli("trace", "import", "--help").output
    assert "Missing argument 'MODEL'" in cli("trace").output


def test_recorded_layout_accessor(tmp_path):
    t = RoutingTrace(ids=np.zeros((1, 2, 1), np.int16), token_step=np.zeros(1, np.int32),
                     step_n_tokens=np.ones(1, np.int32), counts=np.zeros((1, 2, 2), np.int32),
                     moe_layers=np.array([0, 1], np.int32), n_expert=2)
    t.counts[0, :, 0] = 1
    t.check()
    assert t.layout is None
    t.meta["layout"] = TraceLayout(2, 1, (10, 20)).to_json()
    assert RoutingTrace.load(t.save(tmp_path / "t.npz")).layout == TraceLayout(2, 1, (10, 20), None)
    t.meta["layout"] = TraceLayout(2, 1, (10,)).to_json()
    with pytest.raises(SpacError, match="sizes 1 layers"):
        t.check()
    t.meta["layout"] = {"n_expert": "two"}
    with pytest.raises(SpacError, match="layout is damaged"):
        _ = t.layout
    t.meta.pop("layout")
    t.counts[0, 0, 0] = 2
    with pytest.raises(SpacError, match="histogram"):
        t.check()


def test_round_trip_through_the_tools(tmp_path):
    """The installed `spac` imports, then eval-utility and plot run on the result without a model file."""
    src = write(tmp_path / "route.csv", [*HEADER, CSV_COLUMNS, *csv_rows()])
    out, png = tmp_path / "t.npz", tmp_path / "hits.png"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "spac"), *args], capture_output=True, text=True, timeout=300,
                              env=dict(os.environ))

    proc = run("trace", "import", str(src), "-o", str(out), "--format", "route-csv")
    assert proc.returncode == 0, proc.stderr
    proc = run("eval-utility", str(out), "--budget-experts", "2")
    assert proc.returncode == 0, proc.stderr
    assert "5 steps, 8 tokens, 2 MoE layers x 4 experts" in proc.stdout and "lru" in proc.stdout
    proc = run("plot", str(out), "-o", str(png))
    assert proc.returncode == 0 and png.stat().st_size > 0, proc.stderr
    bad = write(tmp_path / "bad.jsonl", [GOOD, "{"])
    proc = run("trace", "import", str(bad), "-o", str(out))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {bad}:2: not JSON (Expecting property name enclosed in double quotes at column 2)"]


@pytest.mark.parametrize(("name", "lines", "line", "words"), [
    ("a.csv", ["turn,phase,step,layer,slot,expert", "0,1,0,0,0,99999999999"], 2, ["out of range"]),
    ("b.csv", ["turn,phase,step,layer,slot,expert", "0,1,0,70000,0,1"], 2, ["more than 65536 layers"]),
    ("c.csv", ["# layer=99999999 expert_bytes=5", "turn,phase,step,layer,slot,expert"], 1, ["layer number"]),
    ("d.csv", ["# n_layer=100000", "turn,phase,step,layer,slot,expert"], 1, ["'n_layer'", "1..65536"]),
    ("e.jsonl", ['{"layer": 0, "experts": [1], "token_idx": 100000000000000000000000}'], 1, ["'token_idx'"]),
])
def test_damaged_numbers(tmp_path, name, lines, line, words):
    src = write(tmp_path / name, lines)
    assert_line_error(cli("trace", "import", str(src), "-o", str(tmp_path / "t.npz")), src, line, *words)
