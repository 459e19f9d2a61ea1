"""Catalogue of wrong inputs: every one ends in a clear error, never a traceback, hang or garbage.

API: a ValueError/TypeError whose message names what to change (we assert on a key word of it).
CLI: `compactfusion ...` prints exactly one line on stderr, no traceback, exit code 2. Most CLI cases run
`main([...])` in-process (fast: they fail before any worker starts); a few run the installed console
script to prove the real exit code, and one goes through the launcher to prove a worker-side user error
also ends in one line. Cases that need a process group run in one 2-rank spawn (each spawn costs seconds).
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from distributed import run_distributed

ROOT = Path(__file__).resolve().parent.parent
CONSOLE = ROOT / ".venv" / "bin" / "compactfusion"


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """model_index.json-only folders: a UNet pipeline, a Flux pipeline (no CFG), a broken transformer pipeline."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, index in {
        "unet": {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
                 "scheduler": ["diffusers", "DDPMScheduler"]},
        "flux": {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"],
                 "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]},
    }.items():
        (root / name).mkdir()
        (root / name / "model_index.json").write_text(json.dumps(index))
        out[name] = str(root / name)
    # the Flux folder passes the layout checks (component folders, a transformer config with 3 heads and a
    # weights file) but cannot be loaded (empty weights, empty scheduler folder): a worker-side failure
    (root / "flux" / "transformer").mkdir()
    (root / "flux" / "transformer" / "config.json").write_text('{"num_attention_heads": 3}')
    (root / "flux" / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    (root / "flux" / "scheduler").mkdir()
    (root / "afile").write_text("not a folder")
    out["file"] = str(root / "afile")
    (root / "empty").mkdir()
    out["empty"] = str(root / "empty")
    (root / "digits-marker-only").mkdir()
    (root / "digits-marker-only" / "digits_pipeline.json").write_text('{"pipeline": "DigitsPipeline"}')
    out["marker_only"] = str(root / "digits-marker-only")
    (root / "index-only").mkdir()
    (root / "index-only" / "model_index.json").write_text((root / "flux" / "model_index.json").read_text())
    out["index_only"] = str(root / "index-only")
    (root / "done").mkdir()  # a folder with an earlier run's results
    (root / "done" / "report.json").write_text("{}")
    out["done"] = str(root / "done")
    return out


# ---------------------------------------------------------------------------------------------- API, no process group
def _tiny_unet_pipeline():
    import diffusers
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(4,),
                                 layers_per_block=1, down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",),
                                 norm_num_groups=1)
    return diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler())


def _digits():
    from compactfusion.bundled.digits import build_digits_pipeline
    pipe = build_digits_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _cf():
    import compactfusion
    return compactfusion


API_CASES = {
    # id: (callable, exception type, key word of the message)
    "unknown codec": (lambda: _cf().CompressionConfig(codec="bogus"), ValueError, "codec"),
    "codec parameter out of range": (lambda: _cf().CompressionConfig(codec="lowrank:0"), ValueError, "lowrank"),
    "codec not a string": (lambda: _cf().CompressionConfig(codec=8), TypeError, "codec"),
    "unknown strategy": (lambda: _cf().ParallelConfig(strategy="bogus"), ValueError, "strategy"),
    "usp degrees do not multiply to world": (
        lambda: _cf().ParallelConfig(strategy="usp", ulysses_degree=2, ring_degree=2).resolve(2), ValueError, "ring_degree"),
    "ring degree differs from world": (lambda: _cf().ParallelConfig(strategy="ring", ring_degree=3).resolve(2),
                                       ValueError, "ring_degree"),
    "usp degree does not divide world": (lambda: _cf().ParallelConfig(strategy="usp", ring_degree=3).resolve(4),
                                         ValueError, "divide"),
    "cfg parallel on odd world": (lambda: _cf().ParallelConfig(cfg_parallel=True).resolve(3), ValueError, "even"),
    "strategy none on several ranks": (lambda: _cf().ParallelConfig(strategy="none").resolve(2), ValueError, "ring"),
    "ulysses degree with ring strategy": (lambda: _cf().ParallelConfig(strategy="ring", ulysses_degree=2),
                                          ValueError, "usp"),
    "degree zero": (lambda: _cf().ParallelConfig(strategy="usp", ulysses_degree=0), ValueError, "ulysses_degree"),
    "world size not an int": (lambda: _cf().ParallelConfig().resolve(True), ValueError, "world size"),
    "residual 2 without error feedback": (
        lambda: _cf().CompressionConfig(residual_order=2, error_feedback=False), ValueError, "error_feedback"),
    "residual order 3": (lambda: _cf().CompressionConfig(residual_order=3), ValueError, "residual_order"),
    "negative warmup": (lambda: _cf().CompressionConfig(warmup_steps=-1), ValueError, "warmup_steps"),
    "delta decay out of range": (lambda: _cf().CompressionConfig(delta_decay=2.0), ValueError, "delta_decay"),
    "unknown state dtype": (lambda: _cf().CompressionConfig(state_dtype="int8"), ValueError, "state_dtype"),
    "unknown nonfinite policy": (lambda: _cf().CompressionConfig(on_nonfinite="ignore"), ValueError, "on_nonfinite"),
    "unknown tensor": (lambda: _cf().CompressionConfig(tensors=("x",)), ValueError, "tensors"),
    "malformed bandwidth": (lambda: _cf().LinkModel(bandwidth="fast"), ValueError, "bandwidth"),
    "negative bandwidth": (lambda: _cf().LinkModel(bandwidth="-5MB/s"), ValueError, "negative"),
    "malformed latency": (lambda: _cf().LinkModel(latency="5 parsecs"), ValueError, "latency"),
    "unknown link mode": (lambda: _cf().LinkModel(mode="turbo"), ValueError, "mode"),
    "zero timeout": (lambda: _cf().ParallelConfig(timeout_s=0), ValueError, "timeout_s"),
    "negative consistency period": (lambda: _cf().ParallelConfig(check_consistency_every=-1), ValueError,
                                    "check_consistency_every"),
    "compression of wrong type": (lambda: _cf().ParallelConfig(compression=42), TypeError, "CompressionConfig"),
    "link as a string": (lambda: _cf().ParallelConfig(link="100MB/s"), TypeError, "LinkModel"),
    "cfg_parallel not a bool": (lambda: _cf().ParallelConfig(cfg_parallel="yes"), TypeError, "cfg_parallel"),
    "config not a ParallelConfig": (lambda: _cf().parallelize(_digits(), "ring"), TypeError, "ParallelConfig"),
    "object without transformer": (lambda: _cf().parallelize(object(), _cf().ParallelConfig()), TypeError,
                                   "diffusers pipeline or a diffusers transformer"),
    "UNet pipeline": (lambda: _cf().parallelize(_tiny_unet_pipeline(), _cf().ParallelConfig()), ValueError, "UNet"),
    "parallelize before init_process_group": (lambda: _cf().parallelize(_digits(), _cf().ParallelConfig()),
                                              ValueError, "init_process_group"),
    "stats of a plain pipeline": (lambda: _cf().stats(_digits()), ValueError, "parallelize"),
    "unparallelize a plain pipeline": (lambda: _cf().unparallelize(_digits()), ValueError, "not parallelized"),
    "context of a plain pipeline": (lambda: _cf().context(_digits()), ValueError, "not parallelized"),
    "digits: bad prompt": (lambda: _digits()(prompt="a cat", num_inference_steps=1), ValueError, "digit"),
    "digits: prompt of wrong type": (lambda: _digits()(prompt=3.5, num_inference_steps=1), TypeError, "digit"),
    "digits: height not a multiple of 2": (lambda: _digits()(prompt=7, height=31, num_inference_steps=1), ValueError,
                                           "multiple"),
    "digits: zero steps": (lambda: _digits()(prompt=7, num_inference_steps=0), ValueError, "num_inference_steps"),
}


@pytest.mark.parametrize("case", list(API_CASES))
def test_api_rejects(case):
    import torch.distributed as dist
    if case == "parallelize before init_process_group" and dist.is_initialized():
        pytest.skip("another test left a process group in this process")
    fn, exc, word = API_CASES[case]
    with pytest.raises(exc) as info:
        fn()
    assert word.lower() in str(info.value).lower(), str(info.value)


# ---------------------------------------------------------------------------------------------- API, 2 ranks
def _dist_cases(rank, world):
    """Each case in try/except: returns {case: (exception type, message)} (None when nothing was raised)."""
    import torch

    import compactfusion as cf

    def ring(**kw):
        return cf.ParallelConfig(strategy="ring", timeout_s=20, **kw)

    def digits_call(pipe, **kw):
        return pipe(prompt=7, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np", **kw)

    class NoTokens(torch.nn.Module):  # a transformer with no patch embedding / output projection to hook
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

    class Pipe:
        transformer = NoTokens()

    def twice():
        pipe = _digits()
        cf.parallelize(pipe, ring())
        cf.parallelize(pipe, ring())

    def stats_before():
        pipe = _digits()
        cf.parallelize(pipe, ring())
        cf.stats(pipe)

    def too_many_ranks():  # a 2x2 image is one token: it cannot be split over 2 ranks
        pipe = _digits()
        cf.parallelize(pipe, ring())
        digits_call(pipe, height=2, width=2)

    def cfg_without_cfg():  # guidance 1.0 turns classifier-free guidance off: batch 1, nothing to split
        pipe = _digits()
        cf.parallelize(pipe, cf.ParallelConfig(strategy="none", cfg_parallel=True, timeout_s=20))
        digits_call(pipe, guidance_scale=1.0)

    cases = {
        "parallelize twice": twice,
        "stats before a generation": stats_before,
        "more ranks than tokens": too_many_ranks,
        "cfg parallel without CFG": cfg_without_cfg,
        "unsupported transformer class": lambda: cf.parallelize(Pipe(), ring()),
        "usp degrees vs world at parallelize": lambda: cf.parallelize(
            _digits(), cf.ParallelConfig(strategy="usp", ulysses_degree=2, ring_degree=2)),
    }
    out = {}
    for name, fn in cases.items():
        try:
            fn()
            out[name] = None
        except Exception as e:  # noqa: BLE001 - reported to the parent
            out[name] = (type(e).__name__, str(e))
    return out


DIST_CASES = {
    "parallelize twice": ("ValueError", "already parallelized"),
    "stats before a generation": ("ValueError", "no generation"),
    "more ranks than tokens": ("ValueError", "fewer ranks"),
    "cfg parallel without CFG": ("ValueError", "guidance"),
    "unsupported transformer class": ("ValueError", "cannot parallelize"),
    "usp degrees vs world at parallelize": ("ValueError", "ring_degree"),
}


@pytest.fixture(scope="module")
def dist_results():
    return run_distributed(_dist_cases, 2, timeout=240)


@pytest.mark.dist
@pytest.mark.parametrize("case", list(DIST_CASES))
def test_api_rejects_on_two_ranks(dist_results, case):
    exc, word = DIST_CASES[case]
    for rank, res in enumerate(dist_results):  # every rank gets the same error (none is left waiting)
        assert res[case] is not None, f"rank {rank}: {case} raised nothing"
        assert res[case][0] == exc and word in res[case][1], (rank, res[case])


# ---------------------------------------------------------------------------------------------- CLI in-process
def _cli_cases(d, f):
    g = ["generate", "--model", d, "--out", "/tmp/compactfusion-test-unused"]
    return {
        "unknown codec": (g + ["--codec", "bogus"], "codec"),
        "unknown strategy": (g + ["--strategy", "bogus"], "strategy"),
        "usp degrees do not multiply": (g + ["--nproc", "2", "--strategy", "usp", "--ulysses-degree", "2",
                                             "--ring-degree", "2"], "ring_degree"),
        "ring degree vs world": (g + ["--nproc", "2", "--ring-degree", "3"], "ring_degree"),
        "ulysses degree with ring": (g + ["--nproc", "2", "--strategy", "ring", "--ulysses-degree", "2"], "usp"),
        "more ranks than tokens": (g + ["--nproc", "4", "--height", "2", "--width", "2"], "tokens"),
        "steps zero": (g + ["--steps", "0"], "--steps"),
        "steps negative": (g + ["--steps", "-3"], "--steps"),
        "steps not a number": (g + ["--steps", "abc"], "invalid int"),
        "warmup >= steps": (g + ["--codec", "binary", "--steps", "4", "--warmup-steps", "4"], "warmup"),
        "negative warmup": (g + ["--warmup-steps", "-1"], "warmup"),
        "residual 2 without EF": (g + ["--codec", "binary", "--residual", "2", "--no-error-feedback"], "error_feedback"),
        "residual without codec": (g + ["--no-error-feedback"], "--codec"),
        "delta decay out of range": (g + ["--codec", "binary", "--residual", "2", "--delta-decay", "2"], "delta_decay"),
        "malformed bandwidth": (g + ["--bandwidth", "fast"], "bandwidth"),
        "malformed latency": (g + ["--latency", "1parsec"], "latency"),
        "unknown link mode": (g + ["--link-mode", "warp"], "link-mode"),
        "height not multiple of model factor": (g + ["--height", "31"], "multiple of 2"),
        "width not multiple of model factor": (g + ["--width", "33"], "multiple of 2"),
        "negative height": (g + ["--height", "-32"], "--height"),
        "missing model path": (["generate", "--model", "/nonexistent/model/dir"], "does not exist"),
        "model neither folder nor hub id": (["generate", "--model", "nothing-here"], "neither"),
        "UNet pipeline folder": (["generate", "--model", f["unet"]], "UNet"),
        "cfg parallel on Flux (no CFG)": (["generate", "--model", f["flux"], "--nproc", "2", "--cfg-parallel"], "guidance"),
        "cfg parallel with guidance off": (g + ["--nproc", "2", "--cfg-parallel", "--guidance-scale", "1"], "guidance"),
        "cfg parallel on odd world": (g + ["--nproc", "3", "--cfg-parallel"], "even"),
        "nproc too large": (g + ["--nproc", "1000"], "--nproc"),
        "nproc zero": (g + ["--nproc", "0"], "--nproc"),
        "strategy none on 2 ranks": (g + ["--nproc", "2", "--strategy", "none"], "strategy"),
        "bad prompt for digits": (g + ["--prompt", "a cat"], "digit"),
        "two digits prompt": (g + ["--prompt", "42"], "digit"),
        "zero timeout": (g + ["--timeout", "0"], "--timeout"),
        "negative seed": (g + ["--seed", "-1"], "--seed"),
        "negative consistency period": (g + ["--check-consistency", "-1"], "--check-consistency"),
        "zero images": (g + ["--num-images", "0"], "--num-images"),
        "unknown dtype": (g + ["--dtype", "fp64"], "dtype"),
        "unknown flag": (g + ["--turbo"], "unrecognized"),
        "out is a file": (["generate", "--model", d, "--out", f["file"]], "not a folder"),
        "multi-node without endpoint": (g + ["--nnodes", "2"], "rdzv-endpoint"),
        "node rank out of range": (g + ["--nnodes", "2", "--rdzv-endpoint", "h:1", "--node-rank", "2"], "node-rank"),
        "unknown command": (["generat"], "unknown command"),
        "unknown bench": (["bench", "speed"], "bench"),
        "soak: zero generations": (["bench", "soak", "--model", d, "--generations", "0"], "--generations"),
        "soak: warm-up covers everything": (["bench", "soak", "--model", d, "--generations", "5",
                                             "--warmup-generations", "5"], "warmup"),
        "soak: not a digits folder": (["bench", "soak", "--model", f["flux"]], "digits"),
        "train-digits: zero steps": (["train-digits", "--out", "/tmp/x", "--steps", "0"], "--steps"),
        # issue 14: everything knowable without weights fails before any worker starts
        "model empty string": (["generate", "--model", ""], "empty"),
        "model is a file": (["generate", "--model", f["file"]], "is a file"),
        "model folder empty": (["generate", "--model", f["empty"]], "neither model_index.json"),
        "digits marker only (never the hub)": (["generate", "--model", f["marker_only"]], "incomplete digits folder"),
        "diffusers folder missing a component": (["generate", "--model", f["index_only"]], "without a folder"),
        "hub id not in the local cache": (["generate", "--model", "nobody-cf/not-cached-model"], "cache"),
        "ulysses degree vs heads (digits: 4)": (g + ["--nproc", "8", "--strategy", "ulysses"], "4 attention heads"),
        "ulysses degree vs heads (config.json: 3)": (["generate", "--model", f["flux"], "--nproc", "2", "--strategy",
                                                      "ulysses"], "3 attention heads"),
        "out empty string": (["generate", "--model", d, "--out", ""], "--out is empty"),
        "out not writable": (["generate", "--model", d, "--out", f["file"] + "/sub"], "not writable"),
        "out holds results": (["generate", "--model", d, "--out", f["done"]], "--overwrite"),
        "steps too large": (g + ["--steps", "1000000000"], "limit"),
        "height too large": (g + ["--height", "1000000000"], "limit"),
        "num-images too large": (g + ["--num-images", "1000000"], "limit"),
        "timeout too large": (g + ["--timeout", "1e20"], "--timeout"),
        "timeout too small": (g + ["--timeout", "1e-9"], "--timeout"),
        "timeout nan": (g + ["--timeout", "nan"], "finite"),
        "guidance inf": (g + ["--guidance-scale", "inf"], "finite"),
        "guidance nan": (g + ["--guidance-scale", "nan"], "finite"),
        "delta decay nan": (g + ["--codec", "binary", "--delta-decay", "nan"], "finite"),
        "rdzv timeout zero": (g + ["--rdzv-timeout", "0"], "--rdzv-timeout"),
        "rdzv endpoint without port": (g + ["--nnodes", "2", "--rdzv-endpoint", "somehost"], "HOST:PORT"),
        "sleep link slower than the timeout": (g + ["--nproc", "2", "--bandwidth", "1B/s", "--link-mode", "sleep",
                                                    "--timeout", "5"], "sleep"),
        "prompt too long": (g + ["--prompt", "9" * 100_000], "limit"),
        "long bad prompt is cut": (g + ["--prompt", "x" * 5000], "chars)"),
    }


CLI_IDS = list(_cli_cases("D", {k: "" for k in ("unet", "flux", "file", "empty", "marker_only", "index_only", "done")}))


@pytest.mark.parametrize("case", CLI_IDS)
def test_cli_one_line_exit_2(case, digits_dir, folders, capsys):
    import time

    from compactfusion.cli.main import main
    argv, word = _cli_cases(digits_dir, folders)[case]
    t0 = time.monotonic()
    rc = main(argv)
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("compactfusion: error:") and word.lower() in lines[0].lower(), lines[0]
    assert len(lines[0]) <= 300, len(lines[0])
    assert elapsed < 2.0 or case.startswith(("soak", "train")), f"validation took {elapsed:.2f} s"


# ---------------------------------------------------------------------------------------------- CLI, real processes
@pytest.mark.parametrize("argv", [
    ["generate", "--steps", "0"],
    ["generate", "--bandwidth", "10 furlongs"],
], ids=lambda a: " ".join(a))
def test_console_script_exit_2(argv):
    r = subprocess.run([str(CONSOLE)] + argv, capture_output=True, text=True, timeout=120)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2, r
    assert len(lines) == 1 and "Traceback" not in r.stderr and lines[0].startswith("compactfusion: error:"), r.stderr


@pytest.mark.dist
def test_worker_side_user_error_is_one_line(folders, tmp_path):
    """A user error that only shows up in the workers (the model folder cannot be loaded) still ends in one
    stderr line and exit 2 from the launcher: no traceback from the launcher, the workers or the libraries."""
    import shutil
    bad = tmp_path / "broken"
    shutil.copytree(folders["flux"], bad)  # passes the layout checks; its empty weights fail in the workers
    r = subprocess.run([str(CONSOLE), "generate", "--model", str(bad), "--nproc", "2", "--steps", "2",
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=240)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2, r
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "cannot load model" in lines[0] and "rank" in lines[0], lines[0]
