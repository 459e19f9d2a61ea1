"""`compactfusion generate` end to end: self-launched workers, and two launchers acting as two nodes."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist

EXE = [sys.executable, "-m", "compactfusion.cli.main"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_generate_nproc2_end_to_end(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run(EXE + ["generate", "--nproc", "2", "--strategy", "ring", "--codec", "binary", "--steps", "4",
                              "--reference", "--prompt", "3", "--bandwidth", "100MB/s", "--latency", "50us",
                              "--out", str(out)], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    for key in ("strategy", "codec", "world_size", "steps", "seed", "images", "bytes_sent", "bytes_uncompressed",
                "compression_ratio", "wall_time_s", "modeled_comm_s", "link", "psnr_vs_reference", "ssim_vs_reference"):
        assert key in report, key
    assert report["world_size"] == 2 and report["codec"] == "binary"
    assert report["bytes_sent"] < report["bytes_uncompressed"]
    assert report["modeled_comm_s"] > 0
    assert report["psnr_vs_reference"] > 30
    assert (out / report["images"][0]).is_file() and (out / "reference_0.png").is_file()
    assert "compression ratio" in r.stdout


def test_two_launchers_as_two_nodes(tmp_path):
    endpoint = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen(EXE + ["generate", "--nproc", "1", "--nnodes", "2", "--rdzv-endpoint", endpoint,
                                     "--codec", "int2", "--steps", "3", "--quiet", "--out", str(tmp_path / f"node{i}")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0], [p.stderr.read()[-1500:] for p in procs]
    reports = [json.loads(f.read_text()) for f in tmp_path.glob("node*/report.json")]
    assert len(reports) == 1  # only global rank 0 writes
    assert reports[0]["world_size"] == 2 and reports[0]["bytes_sent"] > 0
