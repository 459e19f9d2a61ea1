"""The bundled video model (Wan architecture, moving digits): quality, 2-rank exactness, GIFs from the CLI.

* a per-frame digit classifier fitted on the real digits (``video_digits_data.frame_accuracy``) reads the
  asked digit in >= 90 % of the 240 frames of 30 videos (3 per digit) the bundled asset generates at the
  sampler's defaults (20 steps, guidance 4), and the digit moves as the training
  clips do (a straight track at a constant velocity of at most 1 px per frame);
* on 2 gloo ranks, uncompressed ring attention equals the single-device video (<= 1e-4); a compressed run
  (binary residuals) is finite, the same on both ranks and sends fewer bytes (one spawned group);
* ``compactfusion generate --model bundled:video-digits`` writes an animated GIF.
"""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from distributed import run_distributed

PROMPTS = list(range(10))


@pytest.fixture(scope="module")
def pipe():
    from compactfusion.bundled.video_digits import load_video_digits_pipeline
    p = load_video_digits_pipeline()
    p.set_progress_bar_config(disable=True)
    return p


def _tracks(videos: np.ndarray) -> np.ndarray:
    """Centre of mass (y, x) of every frame: (B, F, 2)."""
    v = np.clip(videos[..., 0], 0, 1)
    h, w = v.shape[-2:]
    mass = v.sum(axis=(2, 3)) + 1e-9
    cy = (v.sum(axis=3) * np.arange(h)).sum(axis=2) / mass
    cx = (v.sum(axis=2) * np.arange(w)).sum(axis=2) / mass
    return np.stack([cy, cx], axis=-1)


def test_quality_bar_frame_classifier_and_motion(pipe):
    from compactfusion.bundled.video_digits_data import frame_accuracy, train_frame_classifier
    prompts = PROMPTS * 3
    videos = pipe(prompts, generator=torch.Generator().manual_seed(123), output_type="np").frames
    assert videos.shape == (30, 8, 16, 16, 1) and np.isfinite(videos).all()
    clf = train_frame_classifier()
    acc = frame_accuracy(videos, prompts, clf)
    assert acc >= 0.90, f"bundled video model: only {acc:.1%} of 240 frames classified as the asked digit"
    wrong = frame_accuracy(videos, [(p + 5) % 10 for p in prompts], clf)
    assert wrong < 0.3, f"the grader reads {wrong:.0%} of the frames as a digit that was not asked for"
    # Motion: per axis, the centre of mass moves along a straight line at <= 1 px/frame (the training clips').
    track = _tracks(videos).transpose(0, 2, 1).reshape(-1, videos.shape[1])  # (B * 2, F)
    f = np.arange(track.shape[1])
    fits = [np.polyfit(f, tr, 1) for tr in track]
    slopes = np.array([c[0] for c in fits])
    deviation = np.array([np.abs(np.polyval(c, f) - tr).max() for c, tr in zip(fits, track)])
    assert np.abs(slopes).max() <= 1.3, slopes.round(2)
    assert (deviation < 1.0).mean() >= 0.9, f"tracks are not straight: max deviation per axis {deviation.round(2)}"


def _two_rank_worker(rank, world):
    import compactfusion as cf
    from compactfusion.bundled.video_digits import load_video_digits_pipeline

    def call(p):
        return p([3, 8], num_inference_steps=4, generator=torch.Generator().manual_seed(7), output_type="np").frames

    p = load_video_digits_pipeline()
    p.set_progress_bar_config(disable=True)
    ref = call(p)
    out = {}
    for name, comp in (("none", None), ("binary", cf.CompressionConfig(codec="binary", warmup_steps=1))):
        cf.parallelize(p, cf.ParallelConfig(strategy="ring", compression=comp))
        try:
            video = call(p)
            st = cf.stats(p)
        finally:
            cf.unparallelize(p)
        out[name] = dict(video=video, diff=float(np.abs(video - ref).max()), sent=st["bytes_sent"],
                         uncompressed=st["bytes_uncompressed"])
    return out


@pytest.mark.dist
def test_two_ranks_ring_exact_and_compressed_finite():
    res = run_distributed(_two_rank_worker, 2, timeout=240)
    for rank, r in enumerate(res):
        assert r["none"]["diff"] <= 1e-4, (rank, r["none"]["diff"])
        assert np.isfinite(r["binary"]["video"]).all(), rank
        assert 0 < r["binary"]["sent"] < r["none"]["sent"], (rank, r["binary"]["sent"], r["none"]["sent"])
    assert np.array_equal(res[0]["binary"]["video"], res[1]["binary"]["video"])  # every rank returns the same video
    assert res[0]["binary"]["diff"] > 0  # the compressed run did go through the coder


def test_cli_generate_writes_animated_gif(tmp_path):
    from PIL import Image
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "compactfusion.cli.main", "generate", "--model", "bundled:video-digits",
                        "--prompt", "4", "--steps", "3", "--seed", "1", "--quiet", "--out", str(out)],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["images"] == ["video_0.gif"], report["images"]
    with Image.open(out / "video_0.gif") as gif:
        assert gif.format == "GIF" and gif.size == (16, 16)
        assert gif.is_animated and gif.n_frames > 1, gif.n_frames


@pytest.mark.dist
def test_bench_quality_video_quick_rows_plot_and_headline(tmp_path):
    """``bench quality --model video --quick``: exact ring at the fp32 wire, binary below 1.5 bits and finite,
    the Pareto plot written, and make_docs' headline gains the video PSNR column from these rows."""
    from compactfusion.bench import make_docs
    from compactfusion.bench.quality_video import main
    out = tmp_path / "bench" / "quality_video"
    assert main(["--quick", "--methods", "ring,ring+binary,pipefusion", "--out", str(out)]) == 0
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())}
    assert set(rows) == {"single-device", "ring", "ring+binary", "pipefusion"}
    assert rows["ring"]["psnr"] == 100.0 and rows["ring"]["bits_per_element"] == 32.0
    b = rows["ring+binary"]
    assert 1.0 < b["bits_per_element"] < 1.5 and 10 < b["psnr"] < 100 and b["compression_ratio"] > 4, b
    assert rows["pipefusion"]["psnr"] < 100 and rows["pipefusion"]["world_size"] == 2  # stale patches: not exact
    assert (out / "quality_video_pareto.png").stat().st_size > 1000
    assert "quality_video_pareto.png" in (out / "results.md").read_text()
    head = make_docs.headline(tmp_path)
    assert "PSNR vs 1 device (video)" in head and f"{b['psnr']:.1f} dB" in head, head
