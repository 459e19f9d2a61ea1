"""`make gpu-check` in its CPU smoke mode: every section runs (or says why it is skipped) and the report is JSON."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.dist
def test_gpu_check_cpu_smoke(tmp_path):
    out = tmp_path / "gpu_check.json"
    r = subprocess.run([sys.executable, "-m", "compactfusion.bench.gpu_check", "--cpu-smoke", "--reps", "1",
                        "--out", str(out)], capture_output=True, text=True, timeout=240,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    rep = json.loads(out.read_text())
    assert r.returncode == 0 and rep["ok"], (r.stderr[-3000:], {k: v for k, v in rep.items() if k != "kernels"})
    assert rep["mode"] == "cpu-smoke" and rep["cuda_tests"]["status"] == "skipped"
    assert rep["kernels"]["status"] in ("ok", "skipped")
    for row in rep["kernels"].get("rows", []):
        assert row["same_bytes"] and row["same_reconstruction"] and row["fused_encdec_s"] > 0
    pipe = rep["pipeline"]
    assert pipe["status"] == "ok" and pipe["finite"] and max(pipe["rel_err_vs_plain"]) < 5e-2
    two = rep["two_ranks"]
    assert two["status"] == "ok" and all(x["control_device"] == "cpu" for x in two["ranks"])
    for x in two["ranks"]:
        for errs in x["attention_rel_err"].values():
            assert errs[0] < 1e-4 and 0 < errs[-1] < 0.5  # exact warm-up, then compressed (lossy) steps
