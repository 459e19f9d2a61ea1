"""The body of one ``compactfusion generate`` rank: load, parallelize, generate, check, report."""
from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .args import UsageError
from .config import build_configs, torch_dtype
from .output import prepare_out, save_image_atomic, save_video_atomic, write_json_atomic


def _device_and_dtype(a):
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if cuda else torch.device("cpu")
    return device, torch_dtype(a.dtype, cuda)


def configure_threads(device: torch.device) -> None:
    """CPU workers share the cores: split them (like torchrun's OMP_NUM_THREADS=1 default) unless the user set
    OMP_NUM_THREADS. Oversubscribed OpenMP pools spin against each other and the gloo threads (measured: a
    2-rank digits generation went from ~0.5 s to ~15 s on 2 cores)."""
    if device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))


def _to_pil(arr: np.ndarray):
    from PIL import Image
    a = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)


def _outputs(result):
    """A pipeline result's images, or its videos (``frames``: video pipelines, e.g. bundled:video-digits)."""
    frames = getattr(result, "frames", None)
    return frames if frames is not None else result.images


def _save(arr, out: Path, stem: str, i: int) -> str:
    """One output: a PNG for an image (H, W, C), an animated GIF for a video (F, H, W, C). Returns the file name."""
    arr = np.asarray(arr)
    if arr.ndim == 4:
        name = f"{'video' if stem == 'image' else stem}_{i}.gif"
        save_video_atomic([_to_pil(f) for f in arr], out / name)
    else:
        name = f"{stem}_{i}.png"
        save_image_atomic(_to_pil(arr), out / name)
    return name


def _ssim(ref, img, ssim) -> float:
    """SSIM of an image, or the mean over the frames of a video."""
    ref, img = np.asarray(ref), np.asarray(img)
    return float(np.mean([ssim(r, x) for r, x in zip(ref, img)])) if ref.ndim == 4 else ssim(ref, img)


def _test_nan_hook(pipe, rank: int) -> None:
    """Test hook ``COMPACTFUSION_TEST_NAN_RANK=R``: rank R's transformer output turns NaN (inert when unset)."""
    target = os.environ.get("COMPACTFUSION_TEST_NAN_RANK")
    if target is None or int(target) != rank or not hasattr(pipe.transformer, "proj_out"):
        return
    pipe.transformer.proj_out.register_forward_hook(lambda m, args, out: out * float("nan"))


def _gather(obj, world: int, timeout_s: float = 60.0) -> list:
    """Every rank's ``obj`` (JSON control message with a timeout: peers' data is never unpickled)."""
    if world == 1:
        return [obj]
    from ..comm import Communicator
    return Communicator(None, None, None, timeout_s).all_gather_object(obj)


def _check_output(images, rank: int, world: int) -> None:
    """Non-finite images are an error on every rank (all hold the same gathered images), and every rank
    must hold the same images."""
    from ..integrations.diffusers.guards import check_finite, check_ranks_agree, tensor_digest
    check_finite(np.asarray(images), f"rank {rank}: the generated images")
    if world > 1:
        check_ranks_agree(lambda d: _gather(d, world), tensor_digest(np.asarray(images)), "the generated images")


def run_worker(a) -> int:
    from ..api import parallelize, stats, unparallelize
    from ..integrations.diffusers.guards import NonFiniteOutputError, RankDivergenceError
    from ..loading import call_kwargs, load_pipeline, spatial_factor
    from ..metrics import finite_psnr, psnr, ssim

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cfg, compression, link = build_configs(a, world)
    device, dtype = _device_and_dtype(a)
    configure_threads(device)
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # Start-up (imports, model loading) is bounded by the rendezvous timeout, not by --timeout: on a loaded
        # machine ranks reach the first collective seconds apart. --timeout bounds every op after the barrier.
        startup = max(a.timeout, float(getattr(a, "rdzv_timeout", 60.0)))
        if device.type == "cuda":  # gloo for CPU control data, NCCL for device payloads (see comm/device.py)
            from ..comm.device import cuda_init_kwargs, nccl_environment
            nccl_environment()  # a failed NCCL op aborts the communicator and raises; it does not kill the rank
            dist.init_process_group(**cuda_init_kwargs(device.index or 0, startup))
        else:
            dist.init_process_group("gloo", timeout=timedelta(seconds=startup))
    failed = False
    try:
        pipe = load_pipeline(a.model, dtype, device)
        if world > 1:
            dist.barrier()  # every rank has loaded the model (waits at most the start-up bound)
        factor = spatial_factor(pipe)
        for name in ("height", "width"):
            v = getattr(a, name)
            if v is not None and v % factor:
                raise UsageError(f"--{name} {v} must be a multiple of {factor} for this model")
        if a.cfg_parallel and type(pipe).__name__.startswith("Flux") and not hasattr(pipe, "label_embedder"):
            raise UsageError("--cfg-parallel needs a pipeline with classifier-free guidance; Flux pipelines have none")
        kwargs = call_kwargs(pipe, a.prompt, a.steps, a.seed, a.height, a.width, a.guidance_scale, a.num_images)
        if world > 1:
            parallelize(pipe, cfg)  # enables the progress bar on rank 0 only
        if a.quiet and hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        _test_nan_hook(pipe, rank)
        start = time.perf_counter()
        images = _outputs(pipe(**kwargs))
        wall = time.perf_counter() - start
        per_rank = _gather(stats(pipe) if world > 1 else {}, world)
        wall = max(_gather(wall, world))
        out = Path(a.out)
        report = _report(a, cfg, link, world, per_rank, wall, images)
        try:
            _check_output(images, rank, world)
        except (NonFiniteOutputError, RankDivergenceError) as e:
            if rank == 0:  # the report says why there is no image; nothing else is written
                prepare_out(out, a.overwrite)
                write_json_atomic(out / "report.json", dict(report, error=f"{type(e).__name__}: {e}"))
            raise
        if rank != 0:
            return 0
        prepare_out(out, a.overwrite)
        report["images"] = [_save(img, out, "image", i) for i, img in enumerate(images)]
        if a.reference:
            if world > 1:
                unparallelize(pipe)
                if cfg.strategy == "pipefusion":  # its stage released the other stages' weights: load afresh
                    pipe = load_pipeline(a.model, dtype, device)
            pipe.set_progress_bar_config(disable=True)
            kwargs = call_kwargs(pipe, a.prompt, a.steps, a.seed, a.height, a.width, a.guidance_scale, a.num_images)
            start = time.perf_counter()
            refs = _outputs(pipe(**kwargs))
            report["reference_wall_time_s"] = round(time.perf_counter() - start, 4)
            for i, ref in enumerate(refs):
                _save(ref, out, "reference", i)
            report["psnr_vs_reference"] = float(np.mean([finite_psnr(psnr(r, x)) for r, x in zip(refs, images)]))
            report["ssim_vs_reference"] = round(float(np.mean([_ssim(r, x, ssim) for r, x in zip(refs, images)])), 5)
            report["max_abs_diff_vs_reference"] = float(max(np.abs(r - x).max() for r, x in zip(refs, images)))
        write_json_atomic(out / "report.json", report)  # last: a folder with report.json is a finished run
        if not a.quiet:
            print(summary_table(report))
        return 0
    except BaseException:
        failed = True  # no destroy_process_group: after a peer failure it can block on the dead peer
        raise
    finally:
        if not failed and world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _report(a, cfg, link, world, per_rank, wall, images) -> dict:
    def total(key):
        return int(sum(s.get(key, 0) for s in per_rank))
    sent, raw = total("bytes_sent"), total("bytes_uncompressed")
    return {
        "strategy": cfg.strategy, "codec": a.codec, "world_size": world, "steps": a.steps, "seed": a.seed,
        "prompt": a.prompt, "model": a.model or "bundled:digits", "residual_order": a.residual,
        "error_feedback": not a.no_error_feedback and a.residual != 0, "warmup_steps": a.warmup_steps,
        "cfg_parallel": a.cfg_parallel, "ulysses_degree": a.ulysses_degree, "ring_degree": a.ring_degree,
        "images": [], "bytes_sent": sent, "bytes_uncompressed": raw,
        "bytes_sent_per_rank": [int(s.get("bytes_sent", 0)) for s in per_rank],
        "compression_ratio": round(raw / sent, 3) if sent else 1.0,
        "wall_time_s": round(wall, 4),
        "modeled_comm_s": round(max((s.get("modeled_comm_s", 0.0) for s in per_rank), default=0.0), 6),
        "state_bytes_per_rank": [int(s.get("state_bytes", 0)) for s in per_rank],
        "link": link.to_dict(), "image_shape": list(np.asarray(images[0]).shape),
    }


def summary_table(r: dict) -> str:
    rows = [("strategy", r["strategy"]), ("codec", r["codec"]), ("world size", r["world_size"]),
            ("steps", r["steps"]), ("bytes sent (all ranks)", f"{r['bytes_sent']:,}"),
            ("bytes uncompressed", f"{r['bytes_uncompressed']:,}"), ("compression ratio", f"{r['compression_ratio']:.2f}x"),
            ("wall time", f"{r['wall_time_s']:.3f} s"), ("modelled link time", f"{r['modeled_comm_s']:.4f} s")]
    if "psnr_vs_reference" in r:
        rows += [("PSNR vs single device", f"{r['psnr_vs_reference']:.2f} dB"),
                 ("SSIM vs single device", f"{r['ssim_vs_reference']:.4f}")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
