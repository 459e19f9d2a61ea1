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
    assert len(saved) == len(rows) == 2 * 3 + 4  # 2 quick shapes x 3 codecs + the warm/cold table
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
    with pytest.raises(ValueError, match="NxC"):
        bench.main(["--quick", "--shapes", "64by128"])


def test_bench_codecs_fused_columns_and_targets(capsys):
    from compactfusion.codecs import fused

    rows = bench.run(["--reps", "1", "--steps", "2", "--codecs", "binary,int2,int8", "--shapes", "64x128,24x40"])
    printed = capsys.readouterr().out
    main = [r for r in rows if "clone_s" in r]
    assert [(r["codec"], r["n"], r["c"]) for r in main] == [
        ("binary", 64, 128), ("int2", 64, 128), ("int8", 64, 128), ("binary", 24, 40), ("int2", 24, 40), ("int8", 24, 40)]
    assert main[0]["reps"] == 40  # small shapes get more repetitions
    has_fused = fused.backend("auto", bench.torch.device("cpu")) != "reference"
    for r in main:
        assert ("fused_encode_decode_s" in r) == (has_fused and r["codec"] in bench.FUSED_SPECS)
    if has_fused:
        assert "fused enc+dec ms" in printed and "## Targets for the fused codecs" in printed
        goals = bench.targets(main)
        assert [(g["codec"], g["shape"]) for g in goals] == [("binary", "64 x 128"), ("int2", "64 x 128")]
        assert all(g["goal"] == "<= 100 us" and g["met"] in ("yes", "**no**") for g in goals)
    fake = [dict(main[0], n=1088, c=3072, fused_over_clone=2.5), dict(main[0], n=4096, c=3072, fused_over_clone=3.5)]
    if has_fused:
        assert [g["met"] for g in bench.targets(fake)] == ["yes", "**no**"]


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
