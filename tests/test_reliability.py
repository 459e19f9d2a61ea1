"""Reliability: rank failure, configuration agreement, consistency mode, NaN policy, determinism, soak.

Model: the bundled digits architecture (Flux transformer, joint text tokens, 256 image tokens), untrained and
saved to a temporary folder, so nothing depends on the trained assets. Several checks share one 2-rank
spawn (each spawn costs seconds); the CLI tests launch `compactfusion` as users do.
See docs/reliability.md for the policies these tests pin down.
"""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from distributed import run_distributed

pytestmark = pytest.mark.dist

ROOT = Path(__file__).resolve().parent.parent
CONSOLE = ROOT / ".venv" / "bin" / "compactfusion"
STEPS = 4


# ---------------------------------------------------------------------------------------------- 2-rank spawn
def _two_rank_checks(rank, world, digits_dir):
    import torch

    import compactfusion as cf
    from compactfusion.bench.soak import _image_sha
    from compactfusion.loading import call_kwargs, load_pipeline
    from compactfusion.parallel import ConfigMismatchError, ConsistencyError

    def load():
        pipe = load_pipeline(digits_dir, torch.float32, torch.device("cpu"))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def kw(prompt="7", steps=STEPS, seed=0):
        return call_kwargs(load.pipe, prompt, steps, seed)
    load.pipe = load()

    def par(pipe, cfg):
        cf.parallelize(pipe, cfg)
        pipe.set_progress_bar_config(disable=True)  # parallelize turns rank 0's bar on

    def binary(**kw_):
        return cf.ParallelConfig(strategy="ring", timeout_s=30, compression=cf.CompressionConfig(codec="binary"), **kw_)

    def error(fn):
        try:
            fn()
            return None
        except Exception as e:  # noqa: BLE001 - reported to the parent
            return dict(type=type(e).__name__, msg=str(e), stream=repr(getattr(e, "stream", None)))

    out = {}
    ref = load.pipe(**kw()).images  # single device (no parallelize yet)

    # -- 3. configuration agreement ----------------------------------------------------------------
    pipe = load()
    codec = "binary" if rank == 0 else "int2"
    out["agree_codec"] = error(lambda: cf.parallelize(pipe, cf.ParallelConfig(
        strategy="ring", timeout_s=30, compression=cf.CompressionConfig(codec=codec))))
    par(pipe, binary())
    out["agree_steps"] = error(lambda: pipe(**kw(steps=STEPS + rank)))
    out["agree_prompt"] = error(lambda: pipe(**kw(prompt=str(7 - 4 * rank))))
    out["agree_seed"] = error(lambda: pipe(**kw(seed=rank)))
    # after the mismatches the same pipeline still works (nothing half-done is left behind)
    img = pipe(**kw()).images

    # -- 6. determinism: repeated calls and a freshly parallelized pipeline are bitwise identical ------
    img2 = pipe(**kw()).images
    fresh = load()
    par(fresh, binary())
    img3 = fresh(**kw()).images
    out["det_identical"] = bool(np.array_equal(img, img2) and np.array_equal(img, img3))
    out["det_sha"] = _image_sha(img)
    out["det_finite"] = bool(np.isfinite(img).all())
    out["det_psnr"] = float(-10 * np.log10(np.mean((img - ref) ** 2) + 1e-30))
    st = cf.stats(pipe)
    out["state_bytes"] = st["state_bytes"]
    out["ctx_state_nbytes"] = cf.context(pipe).state_nbytes()
    cf.unparallelize(fresh)

    # exact strategies on 2 ranks vs the single-device image (1 vs 2; 4 ranks in its own test)
    out["exact"] = {}
    for strategy in ("ring", "patch", "ulysses"):
        p = load()
        par(p, cf.ParallelConfig(strategy=strategy, timeout_s=30))
        out["exact"][strategy] = float(np.abs(p(**kw()).images - ref).max())

    # -- 4. consistency mode -------------------------------------------------------------------------
    pipe = load()
    par(pipe, binary(check_consistency_every=1))
    clean = pipe(**kw()).images
    out["cons_clean_equal"] = bool(np.array_equal(clean, img))  # checking changes nothing
    out["cons_clean_streams"] = cf.context(pipe).check_consistency("end")  # the final state too
    rt, ctx = pipe._compactfusion, cf.context(pipe)

    def corrupt(module, args):  # before step 3 runs (runtime.step is still 2): flip one receiver base
        if rt.step == 2 and rank == 1:
            key = sorted(ctx.coder.decoder.streams, key=repr)[0]
            ctx.coder.decoder.streams[key].base.view(-1)[0] += 1e-3
            out["cons_corrupted"] = repr(key)
    handle = pipe.transformer.register_forward_pre_hook(corrupt)
    out["cons_error"] = error(lambda: pipe(**kw()))
    handle.remove()

    # -- 5. NaN in one rank's K at one step ----------------------------------------------------------
    pipe = load()
    par(pipe, binary())
    rt, ctx = pipe._compactfusion, cf.context(pipe)

    def poison(module, args, output):
        if rank == 1 and rt.step == 3:
            output = output.clone()
            output[0, 0, 0] = float("nan")
        return output
    handle = pipe.transformer.transformer_blocks[0].attn.to_k.register_forward_hook(poison)
    out["nan_error"] = error(lambda: pipe(**kw()))  # a NaN image is an error on every rank, never a result
    handle.remove()
    states = [st for c in (ctx.coder.encoder, ctx.coder.decoder) for st in c.streams.values()]
    out["nan_states_finite"] = all(bool(torch.isfinite(t).all()) for st in states for t in (st.base, st.delta)
                                   if t is not None)
    out["nan_events"] = ctx.coder.encoder.nonfinite_events()
    out["nan_next_equal"] = bool(np.array_equal(pipe(**kw()).images, img))  # the next request is clean
    # policy "raise": the rank with the NaN raises, the other one times out instead of hanging
    pipe = load()
    par(pipe, cf.ParallelConfig(strategy="ring", timeout_s=3, compression=cf.CompressionConfig(
        codec="binary", on_nonfinite="raise")))
    rt = pipe._compactfusion
    pipe.transformer.transformer_blocks[0].attn.to_k.register_forward_hook(poison)
    t0 = time.monotonic()
    out["nan_raise"] = error(lambda: pipe(**kw()))
    out["nan_raise_s"] = time.monotonic() - t0
    return out


@pytest.fixture(scope="module")
def two_ranks(digits_dir):
    return run_distributed(_two_rank_checks, 2, digits_dir, timeout=400)


def test_config_agreement(two_ranks):
    """Ranks with a different codec / steps / prompt / seed fail on every rank, naming what differs."""
    for rank, r in enumerate(two_ranks):
        for case, word in (("agree_codec", "compression.codec"), ("agree_steps", "num_inference_steps"),
                           ("agree_prompt", "prompt"), ("agree_seed", "generator")):
            e = r[case]
            assert e is not None and e["type"] == "ConfigMismatchError", (rank, case, e)
            assert word in e["msg"] and "rank 0" in e["msg"] and "rank 1" in e["msg"], (rank, case, e["msg"])
        assert "'binary'" in r["agree_codec"]["msg"] and "'int2'" in r["agree_codec"]["msg"]
        assert r["agree_seed"]["msg"].count("generator state") == 2, r["agree_seed"]["msg"]  # full state, by rank


def test_consistency_mode(two_ranks):
    for rank, r in enumerate(two_ranks):
        assert r["cons_clean_equal"] and r["cons_clean_streams"] > 0, r  # no false positive on a clean run
        e = r["cons_error"]
        assert e is not None and e["type"] == "ConsistencyError", (rank, e)
        corrupted = two_ranks[1]["cons_corrupted"]
        assert e["stream"] == corrupted and corrupted in e["msg"] and "after step 2" in e["msg"], (rank, e)


def test_nan_never_reaches_a_cache(two_ranks):
    r0, r1 = two_ranks
    for r in two_ranks:
        assert r["nan_states_finite"], "a stream state holds NaN/Inf"
        assert r["nan_next_equal"], "the request after the NaN differs from a clean one"
    assert r1["nan_events"] >= 1 and r0["nan_events"] == 0
    # the NaN stays in rank 1's own tokens (the model itself computes with it); rank 0's rows stay finite
    for r in (r0, r1):
        assert r["nan_error"]["type"] == "NonFiniteOutputError" and "rank(s) [0, 1]" in r["nan_error"]["msg"], r
    assert r1["nan_raise"]["type"] == "NonFiniteError" and "NaN" in r1["nan_raise"]["msg"], r1["nan_raise"]
    assert r0["nan_raise"]["type"] in ("CommTimeoutError", "CommError"), r0["nan_raise"]
    assert r0["nan_raise_s"] < 30


def test_determinism_and_exactness_two_ranks(two_ranks):
    assert two_ranks[0]["det_sha"] == two_ranks[1]["det_sha"]  # every rank ends with the same image
    for r in two_ranks:
        assert r["det_identical"] and r["det_finite"], r
        assert r["det_psnr"] > 30, r["det_psnr"]
        assert r["state_bytes"] == r["ctx_state_nbytes"] > 0  # still held after the call (freed at the next)
        for strategy, diff in r["exact"].items():
            assert diff <= 1e-4, (strategy, diff)


def _four_rank_exact(rank, world, digits_dir):
    import torch

    import compactfusion as cf
    from compactfusion.loading import call_kwargs, load_pipeline
    pipe = load_pipeline(digits_dir, torch.float32, torch.device("cpu"))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(**call_kwargs(pipe, "7", STEPS, 0)).images
    out = {}
    for name, cfg in (("ring", dict(strategy="ring")), ("ulysses", dict(strategy="ulysses")),
                      ("usp 2x2", dict(strategy="usp", ulysses_degree=2, ring_degree=2)),
                      ("ring + cfg", dict(strategy="ring", cfg_parallel=True))):
        cf.parallelize(pipe, cf.ParallelConfig(timeout_s=60, **cfg))
        pipe.set_progress_bar_config(disable=True)
        out[name] = float(np.abs(pipe(**call_kwargs(pipe, "7", STEPS, 0)).images - ref).max())
        cf.unparallelize(pipe)
    return out


def test_exact_strategies_four_ranks(digits_dir):
    for rank, r in enumerate(run_distributed(_four_rank_exact, 4, digits_dir, timeout=400)):
        for name, diff in r.items():
            assert diff <= 1e-4, (rank, name, diff)


# ---------------------------------------------------------------------------------------------- CLI launches
def _launch(digits_dir, tmp_path, env_extra, nproc=3):
    env = dict(os.environ, OMP_NUM_THREADS="1", COMPACTFUSION_TEST_STEP_FILE=str(tmp_path / "step.{rank}"),
               **env_extra)
    cmd = [str(CONSOLE), "generate", "--model", digits_dir, "--nproc", str(nproc), "--steps", "200", "--codec",
           "binary", "--quiet", "--out", str(tmp_path / "out")]
    # own session: if the test fails, the finally below can end everything this launch started
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _marker(tmp_path, rank):
    try:
        pid, step = (tmp_path / f"step.{rank}").read_text().split()
        return int(pid), int(step)
    except (OSError, ValueError):
        return None


def _wait_for(proc, tmp_path, ranks, min_step, timeout=240):
    """Poll the step markers until every rank in ``ranks`` reached ``min_step`` (the launcher must still run)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        marks = {r: _marker(tmp_path, r) for r in ranks}
        if all(m is not None and m[1] >= min_step for m in marks.values()):
            return marks
        assert proc.poll() is None, f"launcher exited early: {proc.communicate()}"
        time.sleep(0.05)
    raise AssertionError("generation did not get underway in time")


def _descendants(proc):
    import psutil
    return psutil.Process(proc.pid).children(recursive=True)


def _assert_no_orphans(procs):
    import psutil
    _, alive = psutil.wait_procs(procs, timeout=10)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"processes left running: {[(p.pid, p.cmdline()) for p in alive]}"


def _cleanup(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def test_killed_rank_stops_everything(digits_dir, tmp_path):
    """SIGKILL one of 3 workers mid-generation: the launcher exits non-zero within 30 s, names the rank and
    the signal, and no process of the launch is left."""
    proc = _launch(digits_dir, tmp_path, {})
    try:
        marks = _wait_for(proc, tmp_path, (0, 1, 2), min_step=2)
        workers = _descendants(proc)
        victim = marks[2][0]
        assert victim in {p.pid for p in workers}
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=30)
        elapsed = time.monotonic() - t0
    finally:
        _cleanup(proc)
    assert proc.returncode == 1 and elapsed < 30, (proc.returncode, elapsed, err)
    assert "rank 2 failed" in err and "SIGKILL" in err and "Traceback" not in err, err
    _assert_no_orphans(workers)


def test_raising_rank_stops_everything(digits_dir, tmp_path):
    """Rank 2 raises at step 3 (test hook COMPACTFUSION_TEST_FAIL_AT): reported by rank and reason, exit 1."""
    proc = _launch(digits_dir, tmp_path, {"COMPACTFUSION_TEST_FAIL_AT": "2:3"})
    try:
        _wait_for(proc, tmp_path, (0, 1, 2), min_step=1)
        workers = _descendants(proc)
        _wait_for(proc, tmp_path, (2,), min_step=3)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=30)
        elapsed = time.monotonic() - t0
    finally:
        _cleanup(proc)
    assert proc.returncode == 1 and elapsed < 30, (proc.returncode, elapsed, err)
    assert "rank 2 failed: InjectedFailure" in err and "at step 3" in err, err
    _assert_no_orphans(workers)


# ---------------------------------------------------------------------------------------------- soak
def test_soak_short(digits_dir, tmp_path, two_ranks):
    """10 generations in one launch: RSS growth <= 5 % after warm-up, state freed, images identical; the
    image is bitwise the one the 2-rank spawn produced (another process, same seed and configuration)."""
    out = tmp_path / "soak"
    r = subprocess.run([str(CONSOLE), "bench", "soak", "--model", digits_dir, "--generations", "10", "--nproc", "2",
                        "--steps", str(STEPS), "--study-images", "1", "--out", str(out), "--quiet"], capture_output=True, text=True,
                       timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    rec = json.loads((out / "soak.json").read_text())
    assert rec["pass"] and all(c["ok"] for c in rec["checks"]), rec["checks"]
    for name in ("results.json", "results.csv", "results.md"):
        assert (out / name).is_file()
    rows = [x for x in json.loads((out / "results.json").read_text()) if x["kind"] == "generation"]
    assert len(rows) == 20 and {x["image_sha"] for x in rows} == {two_ranks[0]["det_sha"]}
    study = {s["state_dtype"]: s for s in rec["state_dtype_study"] if s["rank"] == 0}
    fp32, bf16 = study["float32 (model dtype)"], study["bfloat16"]
    assert bf16["state_bytes"] * 2 == fp32["state_bytes"] == rows[0]["state_bytes"]
    assert bf16["finite"] and bf16["psnr_vs_single_device_db"] > 30
