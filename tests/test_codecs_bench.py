"""`compactfusion bench codecs` and the shared bench output helpers."""
from __future__ import annotations

import csv
import json

import pytest

from compactfusion.bench import _common
from compactfusion.bench import codecs as bench


def test_bench_codecs_quick_writes_all_outputs(tmp_path, capsys):
    out, js = tmp_path / "out", tmp_path / "rows.json"
    rows = bench.run(["--quick", "--reps", "1", "--steps", "2", "--codecs", "binary,lowrank:8,raw:float32",
                      "--out", str(out), "--json", str(js)])
    printed = capsys.readouterr().out
    assert "| codec |" in printed and "warm" in printed
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(js.read_text())
    assert len(saved) == len(rows) == 2 * 3 + 4
    for r in saved[:6]:
        for key in ("codec", "bytes", "ratio_vs_fp16", "rel_error", "encode_decode_s", "clone_s"):
            assert key in r
        assert r["rel_error"] >= 0 and r["bytes"] > 0
    raw = [r for r in saved if r["codec"] == "raw:float32"]
    assert all(r["rel_error"] == 0 for r in raw)
    with open(out / "results.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(saved)
    assert (out / "results.md").read_text().startswith("# Codec benchmark")


def test_bench_codecs_rejects_bad_spec():
    with pytest.raises(ValueError, match="valid specs"):
        bench.main(["--quick", "--codecs", "binary,nope"])


def test_common_helpers(tmp_path):
    env = _common.environment_record()
    for key in ("date_utc", "machine", "cpu", "cores", "python", "torch", "diffusers"):
        assert key in env
    rows = [{"a": 1, "b": float("nan")}, {"a": 2, "c": {"x": [1, 2]}}]
    paths = _common.write_outputs(tmp_path, rows, "# t")
    assert json.loads(paths["json"].read_text()) == [{"a": 1, "b": None}, {"a": 2, "c": {"x": [1, 2]}}]
    lines = paths["csv"].read_text().splitlines()
    assert lines[0] == "a,b,c" and len(lines) == 3
    assert paths["md"].read_text() == "# t\n"
    table = _common.markdown_table(rows, [("a", "A"), ("b", "B")])
    assert table.splitlines()[0] == "| A | B |" and "| 1 | - |" in table
