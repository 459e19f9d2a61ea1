"""The launcher under attack (issue 14): loopback-only sockets, Ctrl-C / SIGTERM, a stopped rank, a rendezvous
that cannot complete, NaN output, atomic outputs and --overwrite.

Model: the bundled digits architecture, untrained, saved to a temporary folder. Launches are real
`compactfusion generate --nproc 2` processes in their own session (so a failing test can end all of them);
the single-process cases run `main()` in-process (no spawn). Measured figures: docs/reliability.md.
"""
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist

ROOT = Path(__file__).resolve().parent.parent
CONSOLE = ROOT / ".venv" / "bin" / "compactfusion"


def _launch(digits_dir, tmp_path, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", COMPACTFUSION_TEST_STEP_FILE=str(tmp_path / "step.{rank}"))
    cmd = [str(CONSOLE), "generate", "--model", digits_dir, "--nproc", "2", "--steps", "400", "--codec", "binary",
           "--quiet", "--out", str(tmp_path / "out"), *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for(proc, tmp_path, min_step, timeout=300):
    """PIDs of ranks 0 and 1 once both reached ``min_step`` (read from the runtime's step markers)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        marks = {}
        for r in (0, 1):
            try:
                pid, step = (tmp_path / f"step.{r}").read_text().split()
                marks[r] = (int(pid), int(step))
            except (OSError, ValueError):
                pass
        if len(marks) == 2 and all(s >= min_step for _, s in marks.values()):
            return {r: pid for r, (pid, _) in marks.items()}
        assert proc.poll() is None, f"launcher exited early: {proc.communicate()}"
        time.sleep(0.05)
    raise AssertionError("generation did not get underway in time")


def _finish(proc, timeout=120):
    t0 = time.monotonic()
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    lines = [x for x in err.splitlines() if x.strip()]
    return proc.returncode, time.monotonic() - t0, lines, err


def _assert_no_orphans(procs):
    import psutil
    _, alive = psutil.wait_procs(procs, timeout=10)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"processes left running: {[(p.pid, p.cmdline()) for p in alive]}"


def _listening(procs):
    """(process, ip, port) of every listening TCP socket of ``procs``."""
    import psutil
    out = []
    for p in procs:
        try:
            out += [(p.pid, c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet")
                    if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            continue
    return out


def test_loopback_only_then_ctrl_c(digits_dir, tmp_path):
    """Every socket of a --nproc run listens on 127.0.0.1 (stores of the launcher, gloo of the workers);
    Ctrl-C (SIGINT to the whole process group) then ends it with one line, exit 130, nothing left."""
    import ipaddress

    import psutil
    proc = _launch(digits_dir, tmp_path)
    try:
        _wait_for(proc, tmp_path, 1)
        tree = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
        listening = _listening(tree)
        os.killpg(proc.pid, signal.SIGINT)
        rc, elapsed, lines, err = _finish(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert listening, "no listening socket found: the check would pass vacuously"
    assert {pid for pid, _, _ in listening} >= {proc.pid}, listening  # the launcher's stores are among them
    off_host = [x for x in listening if not ipaddress.ip_address(x[1]).is_loopback]
    assert not off_host, f"listening beyond loopback: {off_host}"
    assert rc == 130 and len(lines) == 1 and "interrupted by SIGINT" in lines[0], (rc, err)
    assert elapsed < 15, elapsed
    _assert_no_orphans(tree[1:])


def test_sigterm_of_the_launcher(digits_dir, tmp_path):
    import psutil
    proc = _launch(digits_dir, tmp_path)
    _wait_for(proc, tmp_path, 1)
    tree = psutil.Process(proc.pid).children(recursive=True)
    os.kill(proc.pid, signal.SIGTERM)
    rc, elapsed, lines, err = _finish(proc)
    assert rc == 143 and len(lines) == 1 and "interrupted by SIGTERM" in lines[0], (rc, err)
    assert elapsed < 15, elapsed
    _assert_no_orphans(tree)


def test_stopped_rank_is_named_within_timeout(digits_dir, tmp_path):
    """SIGSTOP one rank mid-generation: the run ends within --timeout + 10 s, naming the stopped rank."""
    import psutil
    timeout = 3
    proc = _launch(digits_dir, tmp_path, "--timeout", str(timeout))
    pids = _wait_for(proc, tmp_path, 2)
    tree = psutil.Process(proc.pid).children(recursive=True)
    os.kill(pids[1], signal.SIGSTOP)
    try:
        rc, elapsed, lines, err = _finish(proc)
    finally:
        try:
            os.kill(pids[1], signal.SIGKILL)
        except OSError:
            pass
    assert rc == 1 and len(lines) == 1 and "Traceback" not in err, (rc, err)
    assert "rank 1 was stopped" in lines[0] and "timed out after 3 s" in lines[0], lines[0]
    assert elapsed < timeout + 10, elapsed
    _assert_no_orphans(tree)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rendezvous_that_cannot_complete(tmp_path):
    """--nnodes 2 with no second node, and an endpoint nobody serves: one line each within --rdzv-timeout
    (plus start-up), exit 1. Both launchers run at once."""
    cases = {"alone": f"127.0.0.1:{_free_port()}", "unreachable": "10.255.255.1:29400"}
    t0 = time.monotonic()
    procs = {name: subprocess.Popen([str(CONSOLE), "generate", "--nproc", "1", "--nnodes", "2", "--rdzv-endpoint", ep,
                                     "--rdzv-timeout", "3", "--out", str(tmp_path / name)], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, start_new_session=True)
             for name, ep in cases.items()}
    results = {name: _finish(p, timeout=120) for name, p in procs.items()}
    for name, (rc, _, lines, err) in results.items():
        assert rc == 1 and len(lines) == 1 and "Traceback" not in err, (name, rc, err)
        assert "rendezvous" in lines[0] and "3 s" in lines[0] and len(lines[0]) <= 300, (name, lines[0])
    assert time.monotonic() - t0 < 60  # start-up (imports) included; torch's default waits 600 s in silence


# ---------------------------------------------------------------------------------------------- in-process
def _main(argv, capsys):
    from compactfusion.cli.main import main
    rc = main(argv)
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    return rc, err


def test_nan_output_is_an_error_not_an_image(digits_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COMPACTFUSION_TEST_NAN_RANK", "0")  # the transformer's output turns NaN
    out = tmp_path / "out"
    rc, err = _main(["generate", "--model", digits_dir, "--steps", "2", "--quiet", "--out", str(out)], capsys)
    assert rc == 1 and len(err) == 1 and "NonFiniteOutputError" in err[0], (rc, err)
    assert not list(out.glob("*.png"))
    report = json.loads((out / "report.json").read_text())
    assert "NonFiniteOutputError" in report["error"] and report["images"] == []
    assert not list(out.glob(".*.tmp"))


def test_outputs_are_atomic_and_reruns_need_overwrite(digits_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["generate", "--model", digits_dir, "--steps", "2", "--quiet", "--out", str(out)]
    assert _main(argv, capsys)[0] == 0
    first = (out / "image_0.png").read_bytes()
    rc, err = _main(argv, capsys)  # a re-run into a folder with results refuses (before any work)
    assert rc == 2 and "--overwrite" in err[0], err
    (out / "image_5.png").write_bytes(b"stale")  # e.g. left by an earlier run with more images
    assert _main(argv + ["--overwrite", "--seed", "1"], capsys)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["image_0.png", "report.json"]  # no stale file, no temp file
    assert (out / "image_0.png").read_bytes() != first
    assert json.loads((out / "report.json").read_text())["seed"] == 1
